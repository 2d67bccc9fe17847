"""The teachers' cross-knowledge replay on a tiny stream, against a dense numpy reference.

Sources are the stability proxy, the plasticity proxy (both with the training pairs of this
and the previous stage masked) and the updated student (unmasked); the reference ranks are
the teacher's own. The models are MF tables with positive random embeddings set by hand, so
every score and rank can be recomputed densely here (the padding item 0 has a zero
embedding and ranks last).
"""

from __future__ import annotations

import recbole_ccd  # noqa: F401

import numpy as np
import pytest
import torch

from recbole_ccd.model.ccd import build_backbone
from recbole_ccd.trainer.ccd import CCDLearner
from test_ccd import load_stream  # noqa: F401  (the tiny stream and its settings)
from test_ccd import data_dir  # noqa: F401  (fixture)

K = 2          # the stage whose teacher update is replayed
TOP_A = 4      # only a source's top 4 allowed items are candidates


def hand_mf(config, stages, seen, seed):
    """An MF model with positive random 3-dim embeddings; padding item 0 is the zero vector."""
    model = build_backbone(config, stages[0].train, {"model": "MF", "embedding_size": 3})
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        model.user_embedding.weight.copy_(
            torch.from_numpy(rng.uniform(0.1, 1.0, model.user_embedding.weight.shape)))
        model.item_embedding.weight.copy_(
            torch.from_numpy(rng.uniform(0.1, 1.0, model.item_embedding.weight.shape)))
        model.item_embedding.weight[0] = 0.0
    model.set_stage(*seen, None, init_new_rows=False)
    model.eval()
    return model


def dense_scores(model) -> np.ndarray:
    return (model.user_embedding.weight @ model.item_embedding.weight.T).detach().numpy()


def candidates(model, user: int, forbidden: set[int]) -> list[int]:
    """The model's top TOP_A items for ``user`` among its seen items, outside ``forbidden``
    and the padding item, best first."""
    row = dense_scores(model)[user, : model.n_items_seen]
    order = [int(i) for i in np.argsort(-row, kind="stable") if i != 0 and i not in forbidden]
    return order[:TOP_A]


def train_items(stage, user: int) -> set[int]:
    matrix = stage.train_matrix()
    return set(matrix.indices[matrix.indptr[user]: matrix.indptr[user + 1]].tolist())


@pytest.fixture
def setup(data_dir):  # noqa: F811
    config, stages = load_stream(data_dir, stage_incremental=2, replay_top_a=TOP_A)
    learner = CCDLearner(config, stages, str(data_dir))
    previous, stage = stages[K - 1], stages[K]
    proxy_seen = (previous.n_users, previous.n_items)
    stability = hand_mf(config, stages, proxy_seen, 1)
    plasticity = hand_mf(config, stages, proxy_seen, 2)
    student = hand_mf(config, stages, (stage.n_users, stage.n_items), 3)
    teacher = hand_mf(config, stages, (stage.n_users, stage.n_items), 4)
    return config, stages, learner, (stability, plasticity, student), teacher


def test_take_all_gives_every_candidate_with_its_best_label(setup):
    """With more samples per user than candidates, the replay set is exactly the union of the
    sources' candidates; a pair offered by several sources keeps its highest sigmoid label."""
    config, stages, learner, (stability, plasticity, student), teacher = setup
    sources = [(stability, 10, True), (plasticity, 10, True), (student, 10, False)]
    users, items, labels = learner._replay_set(K, sources, teacher)

    expected: dict[tuple[int, int], float] = {}
    for user in range(1, stages[K].n_users_before):
        masked = train_items(stages[K - 1], user) | train_items(stages[K], user)
        for model, _, is_masked in sources:
            score = dense_scores(model)[user]
            for item in candidates(model, user, masked if is_masked else set()):
                label = 1 / (1 + np.exp(-score[item]))
                expected[(user, item)] = max(expected.get((user, item), 0.0), label)
    got = {(int(u), int(i)): float(y) for u, i, y in zip(users, items, labels)}
    assert set(got) == set(expected)
    for pair, label in expected.items():
        assert got[pair] == pytest.approx(label, rel=1e-5), pair
    # The proxies never replay this or the previous stage's training pairs; the student may.
    proxy_pairs = {(u, i) for u in range(1, stages[K].n_users_before)
                   for model in (stability, plasticity)
                   for i in candidates(model, u, train_items(stages[K - 1], u)
                                       | train_items(stages[K], u))}
    for user, item in proxy_pairs:
        assert item not in train_items(stages[K], user)


@pytest.mark.parametrize("source_index", [0, 2])
def test_a_sharp_preference_picks_the_largest_rank_gap(setup, source_index):
    """With a large eps one item per user is drawn, and it has the largest gap between the
    teacher's rank and the source's rank among the user's candidates (ties may go either
    way)."""
    config, stages, learner, models, teacher = setup
    config["replay_eps"] = 50.0
    model = models[source_index]
    masked_source = source_index < 2
    users, items, _ = learner._replay_set(K, [(model, 1, masked_source)], teacher)
    picked = dict(zip(users.tolist(), items.tolist()))
    teacher_scores = dense_scores(teacher)[:, : teacher.n_items_seen]
    assert set(picked) == set(range(1, stages[K].n_users_before))
    gaps_seen = set()
    for user, item in picked.items():
        forbidden = train_items(stages[K - 1], user) | train_items(stages[K], user)
        cands = candidates(model, user, forbidden if masked_source else set())
        row = teacher_scores[user]
        # the teacher's 0-based rank: how many items it scores higher
        gap = {c: int((row > row[c]).sum()) - position for position, c in enumerate(cands)}
        assert item in gap
        assert gap[item] == max(gap.values()), (user, gap)
        gaps_seen.add(len(set(gap.values())))
    assert max(gaps_seen) > 1  # the case really has a preference to express


def test_replay_sources_of_the_teacher_update(setup):
    """The teachers read the stability proxy, the plasticity proxy from stage 2 on, and the
    updated student, each with its own count; the student update reads only the proxies."""
    config, stages, learner, (stability, plasticity, student), _ = setup
    learner.stability, learner.plasticity, learner.student = stability, plasticity, student
    config["replay_stability_samples"] = 3
    config["teacher_replay_stability_samples"] = 1
    config["teacher_replay_plasticity_samples"] = None
    config["replay_plasticity_samples"] = 2
    config["replay_student_samples"] = 4
    assert learner._replay_sources(2, with_student=True) == [
        (stability, 1, True), (plasticity, 2, True), (student, 4, False)]
    assert learner._replay_sources(1, with_student=True) == [
        (stability, 1, True), (student, 4, False)]
    assert learner._replay_sources(2, with_student=False) == [
        (stability, 3, True), (plasticity, 2, True)]
    config["replay"] = False
    assert learner._replay_sources(2, with_student=True) == []
