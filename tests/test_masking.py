"""What evaluation masks and what the sampler may draw, checked against plain reference loops.

The scorers are adversarial: the items that must be masked (the stage's own history, items
not seen yet) get the highest scores, so any masking mistake changes Recall and NDCG.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from conftest import write_inter
from recbole_ccd.evaluation import evaluate_scorer

pytestmark = pytest.mark.usefixtures("isolated")

TOPK = [5, 10]


def _two_stage_rows(seed=5):
    """40 users; stage 0 (times 0..599) uses items 0..49, stage 1 (600..1199) items 0..59,
    so stage 1 brings new items. Every user has at least 8 interactions in each stage."""
    rng = np.random.default_rng(seed)
    rows = []
    for stage, n_items in ((0, 50), (1, 60)):
        users = np.concatenate([np.repeat(np.arange(40), 8), rng.integers(0, 40, 280)])
        rng.shuffle(users)
        items = rng.integers(0, n_items, 600)
        rows += [(f"u{u}", f"i{i}", 600 * stage + t) for t, (u, i) in enumerate(zip(users, items))]
    return rows


@pytest.fixture
def stream(tmp_path, build_stream):
    write_inter(tmp_path, "m", _two_stage_rows())
    config, dataset, stages = build_stream("m", stage_incremental=1, topk=TOPK,
                                           metric_decimal_place=12)
    assert len(stages) == 2
    # Stage 1 brings items that stage 0 has not seen.
    assert stages[0].n_items < stages[1].n_items == dataset.item_num
    return config, dataset, stages


def _pairs(dataset):
    out = defaultdict(set)
    for u, i in zip(dataset.inter_feat["user_id"].tolist(), dataset.inter_feat["item_id"].tolist()):
        out[u].add(i)
    return out


def _reference(scores, positives, masked, n_items_seen, k):
    """Mean Recall@k and NDCG@k over users with positives; ranks items 1..n_items_seen-1
    that are not masked, by descending score (all scores distinct)."""
    recalls, ndcgs = [], []
    for user, pos in positives.items():
        candidates = [i for i in range(1, n_items_seen) if i not in masked.get(user, set())]
        ranking = sorted(candidates, key=lambda i: -scores[user, i])[:k]
        hits = [rank for rank, item in enumerate(ranking, start=1) if item in pos]
        recalls.append(len(hits) / len(pos))
        dcg = sum(1 / math.log2(rank + 1) for rank in hits)
        ideal = sum(1 / math.log2(rank + 1) for rank in range(1, min(len(pos), k) + 1))
        ndcgs.append(dcg / ideal)
    return {f"recall@{k}": float(np.mean(recalls)), f"ndcg@{k}": float(np.mean(ndcgs))}


def _adversarial_scores(n_users, n_items, masked, others, positives, seed=0):
    """Integer scores, distinct per user: masked items highest, then ``others`` (items that
    must stay rankable), then the positives, then the rest; ties broken by a permutation."""
    rng = np.random.default_rng(seed)
    scores = np.zeros((n_users, n_items))
    for user in range(n_users):
        scores[user] = rng.permutation(n_items)
        for group, level in ((positives, 1000), (others, 2000), (masked, 3000)):
            for item in group.get(user, ()):
                scores[user, item] += level
    return scores


def _scorer(scores):
    table = torch.as_tensor(scores, dtype=torch.float32)

    def score(interaction):
        return table[interaction["user_id"].long()].clone()

    return score


def _history(stage, loader):
    train, valid = _pairs(stage.train), _pairs(stage.valid)
    if loader == "valid":
        return train, valid
    return {u: train[u] | valid[u] for u in set(train) | set(valid)}, _pairs(stage.test)


@pytest.mark.parametrize("loader", ["valid", "test"])
@pytest.mark.parametrize("j", [0, 1])
def test_stage_history_is_masked_and_nothing_else(stream, loader, j):
    config, dataset, stages = stream
    stage = stages[j]
    masked, positives = _history(stage, loader)
    # What else the user touched in the stream must stay rankable: put it just below the
    # masked items, above the positives.
    everything = defaultdict(set)
    for s in stages:
        for part in (s.train, s.valid, s.test):
            for u, items in _pairs(part).items():
                everything[u] |= items
    # A few such items per user (0 to 6), so some positives still reach the top 5.
    others = {u: set(sorted(everything[u] - masked.get(u, set()) - positives.get(u, set()))[
        : u % 7]) for u in everything}
    scores = _adversarial_scores(dataset.user_num, dataset.item_num, masked, others, positives)
    n_seen = stages[-1].n_items

    result = evaluate_scorer(_scorer(scores), getattr(stage, f"{loader}_loader"), config, n_seen)

    for k in TOPK:
        expected = _reference(scores, positives, masked, n_seen, k)
        for metric, value in expected.items():
            assert result[metric] == pytest.approx(value, abs=1e-9)
    # The case is sensitive: without masking, or masking only train for test, it differs.
    assert _reference(scores, positives, {}, n_seen, 10)["recall@10"] < result["recall@10"]
    if loader == "test":
        train_only = _pairs(stage.train)
        wrong = _reference(scores, positives, train_only, n_seen, 5)["recall@5"]
        assert wrong < result["recall@5"]
    # Some users keep "others" above their positives, so Recall@5 is neither 0 nor 1.
    assert 0 < result["recall@5"] < 1


def test_items_not_seen_yet_are_never_ranked(stream):
    config, dataset, stages = stream
    stage = stages[0]
    masked, positives = _history(stage, "test")
    unseen = set(range(stage.n_items, dataset.item_num))
    scores = _adversarial_scores(dataset.user_num, dataset.item_num, masked,
                                 {u: unseen for u in range(dataset.user_num)}, positives)

    result = evaluate_scorer(_scorer(scores), stage.test_loader, config, stage.n_items)

    for k in TOPK:
        expected = _reference(scores, positives, masked, stage.n_items, k)
        for metric, value in expected.items():
            assert result[metric] == pytest.approx(value, abs=1e-9)
    # Ranked among all ids, the unseen items would take the first places.
    assert _reference(scores, positives, masked, dataset.item_num, 10)["recall@10"] \
        < result["recall@10"]


def test_trainer_validation_masks_like_evaluate_scorer(stream, tmp_path):
    """StreamTrainer's validation (RecBole's evaluate) hides unseen items as well."""
    from recbole.model.abstract_recommender import GeneralRecommender
    from recbole.utils import InputType

    from recbole_ccd.trainer import StreamTrainer

    config, dataset, stages = stream
    stage = stages[0]
    masked, positives = _history(stage, "valid")
    unseen = set(range(stage.n_items, dataset.item_num))
    scores = _adversarial_scores(dataset.user_num, dataset.item_num, masked,
                                 {u: unseen for u in range(dataset.user_num)}, positives)

    class FixedScores(GeneralRecommender):
        input_type = InputType.POINTWISE

        def __init__(self, config, dataset):
            super().__init__(config, dataset)
            self.register_buffer("table", torch.as_tensor(scores, dtype=torch.float32))
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def full_sort_predict(self, interaction):
            return self.table[interaction[self.USER_ID]].reshape(-1)

    trainer = StreamTrainer(config, FixedScores(config, stage.train), stage.n_items,
                            str(tmp_path / "tensorboard"))
    result = trainer.evaluate(stage.valid_loader, load_best_model=False, show_progress=False)
    trainer.tensorboard.close()

    for k in TOPK:
        expected = _reference(scores, positives, masked, stage.n_items, k)
        for metric, value in expected.items():
            assert float(result[metric]) == pytest.approx(value, abs=1e-9)


# -- negative sampling ---------------------------------------------------------------------------


def _check_negatives(users, negatives, train, n_items_seen):
    assert negatives.min() >= 1 and negatives.max() < n_items_seen
    for u, i in zip(users.tolist(), negatives.tolist()):
        assert i not in train[u]


def test_sampler_draws_only_seen_items_outside_the_user_train_items(stream):
    _, _, stages = stream
    stage = stages[0]
    train = _pairs(stage.train)
    sampler = stage.sampler.set_phase("train")
    users = np.repeat(np.array(sorted(train)), 50)
    negatives = sampler.sample_by_user_ids(users, None, 1).numpy()
    _check_negatives(users, negatives, train, stage.n_items)
    # With 50 draws per user, most of the allowed items of a user come up at least once.
    assert len(set(negatives.tolist())) > 0.8 * (stage.n_items - 1)


@pytest.mark.parametrize("combined", [False, True])
def test_train_loader_negatives(stream, combined):
    """Per stage and for the train splits of all stages so far (the retrain strategy)."""
    from recbole.data.interaction import cat_interactions

    config, _, stages = stream
    for stage in stages:
        if combined:
            upto = stages[: stage.index + 1]
            train = stage.train.copy(cat_interactions([s.train.inter_feat for s in upto]))
        else:
            train = stage.train
        history = _pairs(train)
        loader = stage.train_loader(config, train)
        for _ in range(3):
            for batch in loader:
                _check_negatives(batch["user_id"], batch["neg_item_id"], history, stage.n_items)
