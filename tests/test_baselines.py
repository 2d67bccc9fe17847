"""Single-model baselines end to end through ``run_stream`` on a tiny three-stage file."""

from __future__ import annotations

import json
import os

import pytest

from conftest import TEST_SETTINGS, random_rows, write_inter

pytestmark = pytest.mark.usefixtures("isolated")

METRICS = {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("model, strategy, output_dir", [
    ("BPR", "finetune", None),
    ("MF", "retrain", "run-mf"),
    ("LightGCN", "retrain", "run-lightgcn"),
])
def test_baseline_runs_the_stream(tmp_path, model, strategy, output_dir):
    from recbole_ccd.quick_start import run_stream

    write_inter(tmp_path, "tiny", random_rows(40, 60, 1200, seed=2, min_per_user=15))
    settings = {**TEST_SETTINGS, "data_path": str(tmp_path), "stage_incremental": 2,
                "stream_strategy": strategy, "epochs": 2}

    summary = run_stream(model, "tiny", config_dict=settings, output_dir=output_dir)

    # The output folder: given, or outputs/<model>-<dataset>-<time>.
    out = summary["output_dir"]
    if output_dir is None:
        assert os.path.dirname(out) == "outputs"
        assert os.path.basename(out).startswith(f"{model}-tiny-")
    else:
        assert out == output_dir
    with open(os.path.join(out, "results.json"), encoding="utf-8") as handle:
        written = json.load(handle)
    assert written == {k: v for k, v in summary.items() if k != "output_dir"}

    assert written["model"] == model and written["dataset"] == "tiny"
    assert written["n_stages"] == 3
    assert set(written["results"]) == {"model"}
    body = written["results"]["model"]
    assert set(body["matrix"]) == METRICS
    for metric, rows in body["matrix"].items():
        assert [len(row) for row in rows] == [1, 2, 3]
        assert all(0 <= v <= 1 for row in rows for v in row)
        la = _mean([rows[1][1], rows[2][2]])
        ra = _mean([rows[1][0], _mean(rows[2][:2])])
        assert body["LA"][metric] == pytest.approx(la)
        assert body["RA"][metric] == pytest.approx(ra)
        assert body["H-mean"][metric] == pytest.approx(
            0.0 if la + ra == 0 else 2 * la * ra / (la + ra))
    assert set(written["timing"]) == {"stage_0", "stage_1", "stage_2"}
    for timing in written["timing"].values():
        assert {"train", "evaluate"} <= set(timing)
    for k in range(3):
        assert os.path.isfile(os.path.join(out, "checkpoints", f"stage_{k}.pt"))

    # Nothing written outside the output folder: the working directory holds only the
    # dataset folder and the outputs.
    top = out.split(os.sep)[0]
    assert sorted(os.listdir(tmp_path)) == sorted(["tiny", top])
    assert sorted(os.listdir(tmp_path / "tiny")) == ["tiny.inter"]


@pytest.mark.parametrize("model", ["BPR", "MF", "LightGCN"])
def test_finetune_resume_gives_the_uninterrupted_results(tmp_path, model):
    """A run stopped after stage 1 and resumed ends where the uninterrupted run ends.

    The stop is simulated by removing the last stage's checkpoint from a copy of a finished
    run; the resumed run must continue from the stage-1 weights, not from fresh ones.
    """
    import shutil

    from recbole_ccd.quick_start import run_stream

    write_inter(tmp_path, "tiny", random_rows(40, 60, 1200, seed=2, min_per_user=15))
    settings = {**TEST_SETTINGS, "data_path": str(tmp_path), "stage_incremental": 2,
                "stream_strategy": "finetune", "epochs": 2}
    whole = run_stream(model, "tiny", config_dict=settings, output_dir="whole")
    shutil.copytree("whole", "stopped")
    os.remove(os.path.join("stopped", "checkpoints", "stage_2.pt"))

    resumed = run_stream(resume="stopped")

    assert resumed["completed_stages"] == 3
    assert resumed["results"] == whole["results"]


def test_recbole_model_is_rebuilt_on_each_stage_and_keeps_its_weights(tmp_path, monkeypatch):
    """MultiVAE reads the users' histories when it is built: with finetune it must be rebuilt
    on each stage's train split and start from the previous stage's weights."""
    import torch

    from recbole_ccd.config import CCDConfig
    from recbole_ccd.data import build_stages, create_stream_dataset
    from recbole_ccd.trainer.stream import SingleModelLearner

    write_inter(tmp_path, "tiny", random_rows(40, 60, 1200, seed=2, min_per_user=15))
    settings = {**TEST_SETTINGS, "data_path": str(tmp_path), "stage_incremental": 1,
                "stream_strategy": "finetune", "epochs": 1}
    config = CCDConfig(model="MultiVAE", dataset="tiny", config_dict=settings)
    stages = build_stages(config, create_stream_dataset(config))
    learner = SingleModelLearner(config, stages, str(tmp_path / "out"))

    learner.learn_stage(0)
    after_stage_0 = {k: v.clone() for k, v in learner.model.state_dict().items()}
    built_before = learner.model
    # With training switched off, stage 1 must start from exactly stage 0's weights.
    monkeypatch.setattr("recbole_ccd.trainer.stream.StreamTrainer.fit",
                        lambda self, *args, **kwargs: None)
    learner.learn_stage(1)
    assert learner.model is not built_before
    for key, value in learner.model.state_dict().items():
        assert torch.equal(value, after_stage_0[key])

    # The model's histories are stage 1's train items, per user (set comparison).
    users, items = stages[1].train_pairs()
    expected = {}
    for u, i in zip(users.tolist(), items.tolist()):
        expected.setdefault(u, set()).add(i)
    history = learner.model.history_item_id
    for user, wanted in expected.items():
        got = set(history[user].tolist()) - {0}
        assert got == wanted
