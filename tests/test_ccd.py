"""Tests of CCD: the teacher ensemble, parameter counts, whole stream runs, checkpoints and
resume, the replay switch, ``distil_once`` and bad CCD settings.

Every run uses a tiny generated stream (80 users x 60 items, 2,000 timestamped
interactions) and tiny models, so the whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import recbole_ccd  # noqa: F401  (numpy compatibility before any recbole import)

import numpy as np
import pytest
import torch
from recbole.utils import init_seed

from recbole_ccd.compat import load_checkpoint
from recbole_ccd.config import CCDConfig, validate_stream_config
from recbole_ccd.data import build_stages, create_stream_dataset
from recbole_ccd.errors import StreamConfigError
from recbole_ccd.evaluation import evaluate_scorer
from recbole_ccd.model.backbones import LightGCN
from recbole_ccd.model.ccd import CCD, approximate_rank_transform
from recbole_ccd.quick_start import run_stream
from recbole_ccd.trainer.ccd import CCDLearner
from recbole_ccd.trainer.stream import StreamRunner

DATASET = "ccdtiny"
N_USERS, N_ITEMS, N_INTERACTIONS = 80, 60, 2000
EXPONENT = 0.05
MODELS = ("student", "distilled", "stability", "plasticity")


# ---------------------------------------------------------------------------------------------
# data, settings and helpers
# ---------------------------------------------------------------------------------------------
def write_dataset(folder: Path, seed: int = 7) -> Path:
    """``folder/ccdtiny/ccdtiny.inter``: uniform users, popularity-skewed items, times 1000+t.

    With 80 users and 2,000 interactions every user appears in every stage of a 3-stage
    stream (about 6 interactions per user in each incremental stage).
    """
    rng = np.random.default_rng(seed)
    users = rng.integers(0, N_USERS, N_INTERACTIONS)
    popularity = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.7
    items = rng.choice(N_ITEMS, N_INTERACTIONS, p=popularity / popularity.sum())
    path = Path(folder) / DATASET / f"{DATASET}.inter"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    lines += [f"u{u}\ti{i}\t{1000 + t}" for t, (u, i) in enumerate(zip(users, items))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def settings(folder: Path, **overrides) -> dict:
    """A tiny CCD configuration: an MF and a LightGCN teacher, a LightGCN student."""
    base = {
        "data_path": str(folder),
        "show_progress": False,
        "use_gpu": False,
        "stage_base_ratio": 0.5,
        "stage_incremental": 2,
        "teachers": [{"model": "MF", "embedding_size": 8, "seed": 0},
                     {"model": "LightGCN", "embedding_size": 6, "n_layers": 1, "seed": 2}],
        "student": {"model": "LightGCN", "embedding_size": 3, "n_layers": 1, "seed": 1},
        "teacher_epochs": 2,
        "distill_epochs": 2,
        "update_epochs": 2,
        "teacher_batch_size": 256,
        "distill_batch_size": 256,
        "update_batch_size": 256,
        "distill_interesting": 5,
        "distill_uninteresting_items": 20,
        "distill_uninteresting_users": 20,
        "exclusion_topk": 5,
        "replay_top_a": 10,
        "replay_resample_every": 1,
        "teacher_structure_anchors": 32,
        "metrics": ["Recall", "NDCG"],
        "topk": [5, 10],
        "valid_metric": "Recall@5",
    }
    base.update(overrides)
    return base


def _drop_plugin_log_handlers() -> None:
    from recbole_ccd.quick_start import remove_log_handlers

    remove_log_handlers()


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """The tiny dataset in ``tmp_path``; cwd and ``sys.argv`` isolated (RecBole parses it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["x"])
    write_dataset(tmp_path)
    yield tmp_path
    _drop_plugin_log_handlers()


def load_stream(folder: Path, **overrides):
    """``(config, stages)`` built the way ``run_stream`` builds them."""
    config = CCDConfig(model="CCD", dataset=DATASET, config_dict=settings(folder, **overrides))
    validate_stream_config(config)
    init_seed(config["seed"], config["reproducibility"])
    return config, build_stages(config, create_stream_dataset(config))


def read_results(folder: Path) -> dict:
    return json.loads((Path(folder) / "results.json").read_text(encoding="utf-8"))


def checkpoint(folder: Path, k: int) -> dict:
    """``checkpoints/stage_k.pt``, loaded in torch's safe mode (tensors and plain values)."""
    return torch.load(Path(folder) / "checkpoints" / f"stage_{k}.pt", map_location="cpu",
                      weights_only=True)


def snapshot(learner: CCDLearner) -> dict:
    """Everything that defines the learner's models: weights, seen counts, LightGCN graphs."""
    def one(model):
        if model is None:
            return None
        graph = model.adjacency.to_dense().clone() if isinstance(model, LightGCN) else None
        return {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "seen": (model.n_users_seen, model.n_items_seen), "graph": graph}

    state = {name: one(getattr(learner, name)) for name in MODELS}
    state["teachers"] = [one(t) for t in learner.ccd.teachers]
    state["generator"] = learner.generator.get_state().clone()
    return state


def assert_same(a, b, path: str = "") -> None:
    """Exact equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), path
    else:
        assert a == b, path


def run_recording(folder: Path, output: Path, **overrides) -> tuple[dict, list[dict]]:
    """``run_stream`` that also records a snapshot of the live learner after every stage."""
    live: list[dict] = []
    original_save = StreamRunner.save

    def save(runner, k):
        original_save(runner, k)
        live.append(snapshot(runner.learner))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StreamRunner, "save", save)
        summary = run_stream(model="CCD", dataset=DATASET,
                             config_dict=settings(folder, **overrides), output_dir=str(output))
    return summary, live


def restored_learner(folder: Path, output: Path, k: int, **overrides):
    """A fresh learner (fresh config and stages) loaded from ``output``'s stage-k checkpoint."""
    config, stages = load_stream(folder, **overrides)
    learner = CCDLearner(config, stages, str(output))
    learner.load_state_dict(checkpoint(output, k)["learner"])
    return config, stages, learner


def expected_summary(matrix: list[list[float]]) -> tuple[list, list, list, float, float, float]:
    """LA, RA and H-mean per incremental stage and over the stream, from r[k][j]."""
    la = [matrix[k][k] for k in range(1, len(matrix))]
    ra = [sum(matrix[k][:k]) / k for k in range(1, len(matrix))]
    h = [2 * a * b / (a + b) if a + b else 0.0 for a, b in zip(la, ra)]
    la_all, ra_all = sum(la) / len(la), sum(ra) / len(ra)
    h_all = 2 * la_all * ra_all / (la_all + ra_all) if la_all + ra_all else 0.0
    return la, ra, h, la_all, ra_all, h_all


def check_stream_results(output: Path, n_stages: int) -> dict:
    """Shape, summary and timing checks of a finished CCD run's results.json."""
    results = read_results(output)
    assert results["n_stages"] == n_stages
    assert results["completed_stages"] == n_stages
    assert set(results["results"]) == {"student", "teacher"}
    metrics = {f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10)}
    for role, body in results["results"].items():
        assert set(body["matrix"]) == metrics
        for metric, matrix in body["matrix"].items():
            # lower-triangular: after stage k, one value per stage j <= k
            assert [len(row) for row in matrix] == list(range(1, n_stages + 1)), (role, metric)
            assert all(0.0 <= v <= 1.0 for row in matrix for v in row)
            la, ra, h, la_all, ra_all, h_all = expected_summary(matrix)
            per_stage = body["per_stage"][metric]
            assert per_stage["LA"] == pytest.approx(la, abs=1e-12)
            assert per_stage["RA"] == pytest.approx(ra, abs=1e-12)
            assert per_stage["H-mean"] == pytest.approx(h, abs=1e-12)
            assert body["LA"][metric] == pytest.approx(la_all, abs=1e-12)
            assert body["RA"][metric] == pytest.approx(ra_all, abs=1e-12)
            assert body["H-mean"][metric] == pytest.approx(h_all, abs=1e-12)
            assert len(body["new_users"][metric]) == n_stages
            assert body["new_users"][metric][0] is None
    timing = results["timing"]
    assert set(timing) == {f"stage_{k}" for k in range(n_stages)}
    assert {"teachers", "distil", "evaluate"} <= set(timing["stage_0"])
    for k in range(1, n_stages):
        steps = set(timing[f"stage_{k}"])
        assert {"student_update", "teacher_update", "evaluate"} <= steps, k
        # D_{k+1} is distilled only when a next stage will use it
        assert ("distil" in steps) == (k + 1 < n_stages), k
        assert all(v >= 0 for v in timing[f"stage_{k}"].values())
    for k in range(n_stages):
        state = checkpoint(output, k)
        assert state["stage"] == k
        assert state["learner"]["current"] == k
    assert not (output / "checkpoints" / f"stage_{n_stages}.pt").exists()
    return results


# ---------------------------------------------------------------------------------------------
# the shared three-stage run (used by the end-to-end, restore and resume tests)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_stages(tmp_path_factory):
    """One uninterrupted 3-stage CCD run: ``(data folder, output folder, live snapshots)``."""
    folder = tmp_path_factory.mktemp("ccd3")
    write_dataset(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr(sys, "argv", ["x"])
        try:
            _, live = run_recording(folder, folder / "A")
        finally:
            _drop_plugin_log_handlers()
    return folder, folder / "A", live


# ---------------------------------------------------------------------------------------------
# 1. the teacher ensemble
# ---------------------------------------------------------------------------------------------
def test_teacher_scores_match_hand_computed_rank_ensemble(data_dir):
    config, _ = load_stream(data_dir, stage_incremental=0, stage_base_ratio=1.0, teachers=[
        {"model": "MF", "embedding_size": 2, "seed": 0},
        {"model": "MF", "embedding_size": 2, "seed": 1}])
    ccd = CCD(config, create_stream_dataset(config))
    # user 1 reads the first coordinate, user 2 the second
    users = torch.tensor([1, 2])
    items_a = [[9, 9], [0.1, 0.3], [0.4, 0.1], [0.3, 0.4], [0.2, 0.2], [9, 9]]
    items_b = [[5, 5], [0.5, -0.1], [-0.2, 0.6], [0.1, 0.2], [0.3, 0.0], [9, 9]]
    with torch.no_grad():
        for teacher, items in zip(ccd.teachers, (items_a, items_b)):
            teacher.user_embedding.weight[1:3] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
            teacher.item_embedding.weight[: len(items)] = torch.tensor(items)
    ccd.eval()
    scores = ccd.teacher_scores(users, 5)

    # Ranks over items 0..4 (item 5 is not seen yet, however high it scores); the padding
    # item 0 ranks last (4) although it has the highest score.
    #   teacher A, user 1: 0.1 0.4 0.3 0.2 -> ranks 3 0 1 2;  user 2: 0.3 0.1 0.4 0.2 -> 1 3 0 2
    #   teacher B, user 1: 0.5 -.2 0.1 0.3 -> ranks 0 3 2 1;  user 2: -.1 0.6 0.2 0.0 -> 3 0 1 2
    ranks_a = [[4, 3, 0, 1, 2], [4, 1, 3, 0, 2]]
    ranks_b = [[4, 0, 3, 2, 1], [4, 3, 0, 1, 2]]
    expected = [[((ra + 1) ** -EXPONENT + (rb + 1) ** -EXPONENT) / 2
                 for ra, rb in zip(row_a, row_b)] for row_a, row_b in zip(ranks_a, ranks_b)]
    assert scores.shape == (2, ccd.n_items)
    torch.testing.assert_close(scores[:, :5], torch.tensor(expected), rtol=0, atol=1e-7)
    assert torch.all(scores[:, 5:] == 0)  # unseen items
    torch.testing.assert_close(scores[:, 0], torch.full((2,), 5.0 ** -EXPONENT), rtol=0,
                               atol=1e-7)
    assert torch.all(scores[:, 0] < scores[:, 1:5].min(dim=1).values)


def test_top_only_ensemble_matches_the_full_one_where_it_matters(data_dir):
    """``full=False`` scores each teacher's top items as the full ensemble does, gives every
    other item the bound (exact_top + 1)^-e, and so has the same top items."""
    config, _ = load_stream(data_dir, stage_incremental=0, stage_base_ratio=1.0,
                            ensemble_exact_rank_items=10, ensemble_exact_top=8, teachers=[
                                {"model": "MF", "embedding_size": 4, "seed": s}
                                for s in range(3)])
    ccd = CCD(config, create_stream_dataset(config))
    with torch.no_grad():
        base = torch.randn(ccd.n_items, 4, generator=torch.Generator().manual_seed(3))
        for teacher in ccd.teachers:  # correlated teachers, as trained ones are
            teacher.user_embedding.weight.normal_(generator=torch.Generator().manual_seed(1))
            teacher.item_embedding.weight.copy_(base + 0.3 * torch.randn_like(base))
    ccd.eval()
    users = torch.arange(1, ccd.n_users)
    n_seen = ccd.n_items
    full = ccd.teacher_scores(users, n_seen, full=True)
    top_only = ccd.teacher_scores(users, n_seen, full=False)

    bound = 9.0 ** -EXPONENT
    candidates = torch.zeros_like(full, dtype=torch.bool)
    for teacher in ccd.teachers:
        index = torch.topk(teacher.score_users(users)[:, 1:], 8, dim=1).indices + 1
        candidates.scatter_(1, index, True)
    torch.testing.assert_close(top_only[candidates], full[candidates], rtol=0, atol=1e-6)
    others = top_only[:, 1:][~candidates[:, 1:]]
    torch.testing.assert_close(others, torch.full_like(others, bound), rtol=0, atol=1e-6)
    assert torch.all(full[:, 1:][~candidates[:, 1:]] <= bound + 1e-6)
    # the top-5 lists agree wherever the 5th best candidate is above the bound
    k = 5
    sure = torch.topk(full, k, dim=1).values[:, -1] > bound
    assert sure.sum() > len(users) // 2
    assert torch.equal(torch.topk(full[sure], k, dim=1).indices.sort(1).values,
                       torch.topk(top_only[sure], k, dim=1).indices.sort(1).values)


def _true_ranks(scores: torch.Tensor) -> np.ndarray:
    """0-based descending ranks per row, computed with numpy (no ties in the test data)."""
    order = np.argsort(-scores.numpy(), axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[1])[None].repeat(len(order), 0), 1)
    return ranks


def test_approximate_rank_transform_is_exact_on_top_and_bounded_below():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 50, generator=generator)
    scores[:, 0] = -torch.inf
    scores[2, 7] = -torch.inf
    n, top = scores.shape[1], 5
    ranks = torch.from_numpy(_true_ranks(scores))
    exact = (ranks.double() + 1) ** -EXPONENT

    out = approximate_rank_transform(scores, top, EXPONENT).double()
    in_top = ranks < top
    torch.testing.assert_close(out[in_top], exact[in_top], rtol=1e-6, atol=0)
    assert torch.all(out[~in_top] <= (top + 1) ** -EXPONENT + 1e-7)
    # items that must rank last get the weight of the last rank
    torch.testing.assert_close(out[~torch.isfinite(scores)],
                               torch.full((7,), float(n) ** -EXPONENT, dtype=torch.float64))
    # the estimate never inverts the order of two scores
    order = torch.argsort(scores, dim=1, descending=True)
    assert torch.all(torch.diff(out.gather(1, order), dim=1) <= 1e-7)

    # With the exact top covering the row it is the exact transform (on rows without ties:
    # the order of tied scores is unspecified).
    scores[2, 7] = 0.123
    exact = (torch.from_numpy(_true_ranks(scores)).double() + 1) ** -EXPONENT
    for exact_top in (n, n + 30):
        torch.testing.assert_close(approximate_rank_transform(scores, exact_top, EXPONENT).double(),
                                   exact, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# 2. parameter counts
# ---------------------------------------------------------------------------------------------
def test_student_is_smaller_and_parameter_counts_are_hand_computed(data_dir):
    # CCD.yaml's defaults: teachers MF 64, MF 64, LightGCN 64; student LightGCN 16.
    config, _ = load_stream(data_dir, stage_incremental=0, stage_base_ratio=1.0,
                            teachers=[{"model": "MF", "embedding_size": 64, "seed": 0},
                                      {"model": "MF", "embedding_size": 64, "seed": 1},
                                      {"model": "LightGCN", "embedding_size": 64, "seed": 2}],
                            student={"model": "LightGCN", "embedding_size": 16, "seed": 1})
    dataset = create_stream_dataset(config)
    ccd = CCD(config, dataset)
    # every id of the file plus RecBole's padding id 0
    assert (ccd.n_users, ccd.n_items) == (N_USERS + 1, N_ITEMS + 1)
    for teacher in ccd.teachers:
        assert ccd.student.parameter_count() < teacher.parameter_count()
    # padding id 0 is not a parameter in use
    assert ccd.parameter_counts() == {"teacher_system": 3 * (80 + 60) * 64,
                                      "student": (80 + 60) * 16, "compression_ratio": 12.0}

    for model in (*ccd.teachers, ccd.student):
        model.set_stage(30, 20, None, init_new_rows=False)
        # what is counted is the seen prefix of the two tables, padding row 0 excluded
        prefix = (model.user_embedding.weight[1:30].numel()
                  + model.item_embedding.weight[1:20].numel())
        assert model.parameter_count() == prefix
    assert ccd.parameter_counts() == {"teacher_system": 3 * 48 * 64, "student": 48 * 16,
                                      "compression_ratio": 12.0}

    config, _ = load_stream(data_dir, stage_incremental=0, stage_base_ratio=1.0)
    small = CCD(config, dataset)  # teachers 8 and 6, student 3
    for model in (*small.teachers, small.student):
        model.set_stage(30, 20, None, init_new_rows=False)
    assert small.parameter_counts() == {"teacher_system": 48 * 8 + 48 * 6, "student": 48 * 3,
                                        "compression_ratio": 4.67}  # 672 / 144 = 4.666...


# ---------------------------------------------------------------------------------------------
# 3-4. whole runs
# ---------------------------------------------------------------------------------------------
def test_stage_zero_only_run_writes_both_roles(data_dir):
    out = data_dir / "out"
    run_stream(model="CCD", dataset=DATASET, output_dir=str(out),
               config_dict=settings(data_dir, stage_incremental=0, stage_base_ratio=1.0))
    results = read_results(out)
    assert results["n_stages"] == results["completed_stages"] == 1
    assert results["stages"][0]["users_seen"] == N_USERS
    assert results["stages"][0]["items_seen"] == N_ITEMS
    assert set(results["results"]) == {"student", "teacher"}
    for body in results["results"].values():
        for matrix in body["matrix"].values():
            assert len(matrix) == 1 and len(matrix[0]) == 1 and 0 <= matrix[0][0] <= 1
        assert all(v is None for v in body["LA"].values())  # no incremental stage
    # every id seen (80 users, 60 items); the padding id 0 is not counted
    rows = N_USERS + N_ITEMS
    teacher, student = rows * (8 + 6), rows * 3
    assert results["parameters"] == {"teacher_system": teacher, "student": student,
                                     "compression_ratio": round(teacher / student, 2)}
    assert results["parameters"]["compression_ratio"] == 4.67
    assert set(results["timing"]["stage_0"]) == {"teachers", "distil", "evaluate"}
    assert checkpoint(out, 0)["stage"] == 0


def test_two_stage_run_end_to_end(data_dir):
    out = data_dir / "out"
    run_stream(model="CCD", dataset=DATASET, output_dir=str(out),
               config_dict=settings(data_dir, stage_incremental=1))
    check_stream_results(out, 2)


def test_three_stage_run_end_to_end(three_stages):
    _, out, _ = three_stages
    results = check_stream_results(out, 3)
    stages = results["stages"]
    assert sum(s["new_users"] for s in stages) == N_USERS
    assert stages[-1]["users_seen"] == N_USERS and stages[-1]["items_seen"] == N_ITEMS


def test_checkpoints_restore_every_model_and_reproduce_the_last_row(three_stages):
    folder, out, live = three_stages
    assert len(live) == 3
    results = read_results(out)
    for k in range(3):
        config, stages, learner = restored_learner(folder, out, k)
        # weights, seen counts, LightGCN graphs (teachers, student, D, proxies), generator
        assert_same(snapshot(learner), live[k], f"stage {k}")
        if k == 2:
            learner.eval_mode()
            for role in ("student", "teacher"):
                scorer = learner.scorer(role)
                for j in range(3):
                    row = evaluate_scorer(scorer, stages[j].test_loader, config, stages[2].n_items)
                    for metric, matrix in results["results"][role]["matrix"].items():
                        assert row[metric] == matrix[2][j], (role, j, metric)


def test_kept_teacher_top_lists_are_the_ensembles_best_items_outside_training(three_stages):
    """The top lists kept from a distillation scan (and checkpointed) are the teacher system's
    best non-training items, checked against a dense sort of the tiny ensemble; a checkpoint
    without them (an older layout) rescans the ensemble to the same lists."""
    folder, out, _ = three_stages
    config, stages, learner = restored_learner(folder, out, 1)
    stage = stages[1]
    kept = learner.teacher_top
    users = torch.arange(1, stage.n_users)
    scores = learner.ccd.teacher_scores(users, stage.n_items, full=True)[:, : stage.n_items]
    train = torch.from_numpy(stage.train_matrix().toarray()[1: stage.n_users, : stage.n_items])
    scores[train > 0] = -torch.inf
    scores[:, 0] = -torch.inf
    k = config["exclusion_topk"]
    assert kept.shape == (stage.train_matrix().shape[0], k)
    assert (kept[0] == -1).all()
    checked = 0
    for row, user in enumerate(users.tolist()):
        items = kept[user][kept[user] >= 0]
        allowed = int(torch.isfinite(scores[row]).sum())
        assert len(items) == min(k, allowed)
        assert torch.isfinite(scores[row, items]).all()
        # the same scores as the best ones (ties may pick either item)
        expected = torch.sort(scores[row], descending=True).values[: len(items)]
        assert torch.equal(torch.sort(scores[row, items], descending=True).values, expected)
        checked += len(items)
    assert checked > 0

    before = learner._negative_exclusion(2, [])
    learner.teacher_top = None
    after = learner._negative_exclusion(2, [])
    assert (before != after).nnz == 0 and before.nnz > stages[2].train_matrix().nnz


@pytest.mark.parametrize("inactive_pass", [False, True])
def test_users_without_pairs_in_the_stage_learn_only_with_distill_inactive_users(
        three_stages, inactive_pass):
    """Without weight decay and item-side term, a user with no training pair in the stage gets
    no gradient at all (no BPR batch, no graph edge), so its row keeps its initial value;
    the extra pass of ``distill_inactive_users`` is then the only thing that moves it."""
    folder, out, _ = three_stages
    config, stages, learner = restored_learner(
        folder, out, 1, ccd_weight_decay=0.0, distill_item_weight=0.0,
        distill_inactive_users=inactive_pass)
    stage = stages[1]
    active = np.diff(stage.train_matrix().indptr)[: stage.n_users] > 0
    inactive = np.flatnonzero(~active[1:]) + 1
    assert len(inactive) > 0 and active.sum() > 0
    captured = {}
    fit = learner._fit

    def recording_fit(model, k, **kwargs):
        captured["before"] = model.user_embedding.weight.detach().clone()
        return fit(model, k, **kwargs)

    learner._fit = recording_fit
    learner._distil(1)
    before = captured["before"]
    after = learner.distilled.user_embedding.weight.detach()
    moved = (after[inactive] != before[inactive]).any(1)
    assert bool(moved.all()) == inactive_pass and bool(moved.any()) == inactive_pass
    assert (after[np.flatnonzero(active)] != before[np.flatnonzero(active)]).any(1).all()


# ---------------------------------------------------------------------------------------------
# 5. kill and resume
# ---------------------------------------------------------------------------------------------
def test_killed_run_resumes_to_the_same_results(three_stages, tmp_path, monkeypatch):
    folder, out_a, _ = three_stages
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["x"])
    out_b = tmp_path / "B"
    original = CCDLearner._update_teachers

    def killed_in_stage_2(self, k):
        if k == 2:
            raise RuntimeError("killed during stage 2")
        return original(self, k)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(CCDLearner, "_update_teachers", killed_in_stage_2)
            with pytest.raises(RuntimeError, match="killed during stage 2"):
                run_stream(model="CCD", dataset=DATASET, config_dict=settings(folder),
                           output_dir=str(out_b))
        assert sorted(p.name for p in (out_b / "checkpoints").glob("stage_*.pt")) == \
            ["stage_0.pt", "stage_1.pt"]
        assert read_results(out_b)["completed_stages"] == 2

        learned = []
        original_learn = CCDLearner.learn_stage

        def learn_stage(self, k):
            learned.append(k)
            return original_learn(self, k)

        monkeypatch.setattr(CCDLearner, "learn_stage", learn_stage)
        run_stream(resume=str(out_b))
    finally:
        _drop_plugin_log_handlers()
    assert learned == [2]  # stages 0 and 1 come from the checkpoint

    a, b = read_results(out_a), read_results(out_b)
    assert b["completed_stages"] == 3
    assert b["results"] == a["results"]  # matrices, new users, LA / RA / H-mean
    assert b["parameters"] == a["parameters"]
    assert set(b["timing"]) == set(a["timing"])
    for k in range(3):
        state_a, state_b = checkpoint(out_a, k), checkpoint(out_b, k)
        assert_same(state_b["learner"], state_a["learner"], f"stage {k} learner")
        assert_same(state_b["rng"], state_a["rng"], f"stage {k} rng")
    assert load_checkpoint(str(out_b / "checkpoints" / "stage_2.pt"))["stage"] == 2


# ---------------------------------------------------------------------------------------------
# 6. the replay switch
# ---------------------------------------------------------------------------------------------
def _rng_state(learner):
    return (torch.get_rng_state(), np.random.get_state(), random.getstate(),
            learner.generator.get_state())


def _set_rng_state(learner, state) -> None:
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])
    learner.generator.set_state(state[3])


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_replay_off_is_a_plain_finetune_and_replay_on_changes_the_student(data_dir,
                                                                           monkeypatch):
    config, stages = load_stream(data_dir, stage_incremental=1, replay=False,
                                 use_stability_proxy=True, use_plasticity_proxy=True)
    init_seed(config["seed"], config["reproducibility"])
    learner = CCDLearner(config, stages, str(data_dir))
    learner.learn_stage(0)
    start = _rng_state(learner)
    distilled = copy.deepcopy(learner.distilled)
    stability = copy.deepcopy(learner.stability)

    calls = {"_replay_set": 0, "_replay_pass": 0}
    for name in calls:
        def spy(self, *args, _name=name, _original=getattr(CCDLearner, name)):
            calls[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(CCDLearner, name, spy)

    learner._update_student(1)
    replay_off = _weights(learner.student)
    assert calls == {"_replay_set": 0, "_replay_pass": 0}
    assert_same(_weights(learner.distilled), _weights(distilled))  # D_1 is not touched

    # By hand: the same exclusions (stage-1 positives, top items of E_0, D_1 and the stability
    # proxy; the plasticity proxy joins from stage 2), the same growth, BPR only.
    _set_rng_state(learner, start)
    forbidden = learner._negative_exclusion(1, [distilled, stability])
    student = copy.deepcopy(distilled)
    learner._grow(student, 1)
    learner._fit(student, 1, prefix="update", forbidden=forbidden)
    assert_same(_weights(student), replay_off)
    assert student.n_users_seen == stages[1].n_users
    assert student.n_items_seen == stages[1].n_items

    # Replay on, from the same start: the proxy-guided replay runs and moves the student.
    _set_rng_state(learner, start)
    learner.stability = copy.deepcopy(stability)
    learner.distilled = copy.deepcopy(distilled)
    config["replay"] = True
    learner._update_student(1)
    assert calls["_replay_set"] >= 1 and calls["_replay_pass"] >= 1
    replay_on = _weights(learner.student)
    assert any(not torch.equal(replay_on[k], replay_off[k]) for k in replay_off)


# ---------------------------------------------------------------------------------------------
# 7. distil_once
# ---------------------------------------------------------------------------------------------
def test_distil_once_keeps_the_teachers_of_stage_zero(data_dir):
    out = data_dir / "out"
    overrides = {"stage_incremental": 1, "ccd_mode": "distil_once"}
    _, live = run_recording(data_dir, out, **overrides)
    results = read_results(out)
    assert set(results["results"]) == {"student", "teacher"}
    assert set(results["timing"]["stage_1"]) == {"student_update", "evaluate"}

    stage_0, stage_1 = checkpoint(out, 0)["learner"], checkpoint(out, 1)["learner"]
    for before, after in zip(stage_0["teachers"], stage_1["teachers"]):
        assert_same(after["weights"], before["weights"])
    # the MF teacher has no graph; the LightGCN teacher keeps stage 0's
    assert [t["graph_stage"] for t in stage_1["teachers"]] == [-1, 0]
    # the student was fine-tuned, and D_1 (the stage-0 student) is kept apart from it
    assert any(not torch.equal(stage_1["student"]["weights"][k], v)
               for k, v in stage_0["student"]["weights"].items())
    assert_same(stage_1["distilled"]["weights"], stage_0["student"]["weights"])

    # The teacher row of stage 1 on stage 0, recomputed from the stage-0 teachers.
    config, stages, learner = restored_learner(data_dir, out, 0, **overrides)
    learner.eval_mode()
    uid = stages[0].uid_field
    row = evaluate_scorer(lambda inter: learner.ccd.teacher_scores(inter[uid], stages[1].n_items),
                          stages[0].test_loader, config, stages[1].n_items)
    for metric, matrix in results["results"]["teacher"]["matrix"].items():
        assert row[metric] == matrix[1][0], metric

    # every checkpoint restores the live models, the teachers' stage-0 graph included
    for k in range(2):
        _, _, restored = restored_learner(data_dir, out, k, **overrides)
        assert_same(snapshot(restored), live[k], f"stage {k}")


@pytest.mark.parametrize("scope", ["stage", "history"])
def test_lightgcn_graphs_follow_ccd_graph_and_survive_a_checkpoint(data_dir, scope):
    """Every LightGCN of the stream propagates over the graph ``ccd_graph`` names, rebuilt
    here from the stages' training pairs with numpy: after stage 1 the updated student and
    the LightGCN teacher use stage 1's pairs (``stage``) or stages 0 and 1's (``history``);
    D_1 and the proxies mixed from it keep stage 0's. Checkpoints restore the same graphs."""
    out = data_dir / "out"
    overrides = {"stage_incremental": 1, "ccd_graph": scope}
    _, live = run_recording(data_dir, out, **overrides)
    _, stages, learner = restored_learner(data_dir, out, 1, **overrides)
    assert_same(snapshot(learner), live[1], "stage 1")

    def pairs(matrix) -> set:
        coo = matrix.tocoo()
        return set(zip(coo.row.tolist(), coo.col.tolist()))

    stage_0 = {(int(u), int(i)) for u, i in zip(*(t.numpy() for t in stages[0].train_pairs()))}
    stage_1 = {(int(u), int(i)) for u, i in zip(*(t.numpy() for t in stages[1].train_pairs()))}
    assert stage_0 - stage_1 and stage_1  # the two graphs differ on this data
    expected = stage_1 if scope == "stage" else stage_0 | stage_1
    assert pairs(learner.student.graph_matrix) == expected
    assert pairs(learner.ccd.teachers[1].graph_matrix) == expected
    for model in (learner.distilled, learner.stability, learner.plasticity):
        assert pairs(model.graph_matrix) == stage_0
    assert checkpoint(out, 1)["learner"]["student"]["graph_stage"] == 1


# ---------------------------------------------------------------------------------------------
# 8. bad CCD settings
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, setting", [
    ({"ccd_mode": "distil_twice"}, "ccd_mode"),
    ({"init_kind": "zero_hop"}, "init_kind"),
    ({"ccd_graph": "everything"}, "ccd_graph"),
    ({"teachers": [{"model": "BPR", "embedding_size": 8}]}, "teachers"),
    ({"teachers": []}, "teachers"),
])
def test_bad_ccd_settings_name_the_setting(data_dir, overrides, setting):
    config_dict = settings(data_dir, stage_incremental=0, stage_base_ratio=1.0, **overrides)
    with pytest.raises(StreamConfigError, match=setting):
        run_stream(model="CCD", dataset=DATASET, config_dict=config_dict,
                   output_dir=str(data_dir / "out"))
    assert not (data_dir / "out" / "results.json").exists()
