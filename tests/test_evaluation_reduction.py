"""Top-k metrics on reduced score rows equal those on the full rows."""

from __future__ import annotations

import recbole_ccd  # noqa: F401

import pytest
import torch
from recbole.config import Config
from recbole.evaluator import Collector, Evaluator

from recbole_ccd.evaluation import reduce_to_candidates, topk_only

CONFIG = {
    "metrics": ["Recall", "NDCG", "Hit", "MRR", "Precision"],
    "topk": [3, 5],
    "eval_args": {"mode": {"valid": "full", "test": "full"}},
    "device": torch.device("cpu"),
    "metric_decimal_place": 10,
}


def _metrics(batches, reduce: bool) -> dict:
    # RecBole's metrics read numpy aliases that its Config restores; no Config is built here.
    Config.compatibility_settings(None)
    collector = Collector(CONFIG)
    for scores, positive_u, positive_i in batches:
        scores = scores.clone()
        if reduce:
            scores, positive_i = reduce_to_candidates(scores, positive_u, positive_i, 5)
        collector.eval_batch_collect(scores, None, positive_u, positive_i)
    return Evaluator(CONFIG).evaluate(collector.get_data_struct())


def test_hand_checked_rows():
    # Row 0: top 2 are items 4 (0.9) and 1 (0.8); positives 1 (in the top) and 3 (0.1).
    # Row 1: top 2 are items 0 and 2; its one positive, item 5, scores 0.3.
    scores = torch.tensor([[0.0, 0.8, 0.2, 0.1, 0.9, 0.05],
                           [0.7, 0.1, 0.6, 0.0, 0.2, 0.3]])
    reduced, column = reduce_to_candidates(scores, torch.tensor([0, 0, 1]),
                                           torch.tensor([1, 3, 5]), 2)
    inf = float("-inf")
    # The top 2 become the stand-ins 2 > 1; positives outside the top stay -inf.
    assert reduced.tolist() == [[2.0, 1.0, inf, inf], [2.0, 1.0, inf, inf]]
    # Item 1 is column 1 (inside the top); item 3 is row 0's second positive (column 2 + 1);
    # item 5 is row 1's first positive (column 2 + 0).
    assert column.tolist() == [1, 3, 2]


def test_same_metrics_as_full_rows():
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        scores = torch.rand(7, 40, generator=generator)
        scores[torch.rand(7, 40, generator=generator) < 0.2] = -torch.inf  # masked history
        pairs = torch.rand(7, 40, generator=generator) < 0.15
        pairs &= torch.isfinite(scores)
        pairs[:, 1] |= ~pairs.any(dim=1)  # every user has a positive
        scores[:, 1] = torch.where(pairs[:, 1], scores[:, 1].clamp(min=0), scores[:, 1])
        positive_u, positive_i = pairs.nonzero(as_tuple=True)
        # Shuffle the pairs: the reduction must not rely on their order.
        order = torch.randperm(len(positive_u), generator=generator)
        batches.append((scores, positive_u[order], positive_i[order]))
    full, reduced = _metrics(batches, False), _metrics(batches, True)
    assert full.keys() == reduced.keys()
    for key in full:
        assert reduced[key] == pytest.approx(full[key], abs=1e-9), key
    assert full["hit@5"] > 0  # the case is not trivially empty


def test_only_topk_metrics_are_reduced():
    assert topk_only(Collector(CONFIG))
    assert not topk_only(Collector({**CONFIG, "metrics": ["Recall", "ItemCoverage"]}))
    assert not topk_only(Collector({**CONFIG, "metrics": ["GAUC"]}))


def test_tied_scores_give_the_full_rows_metrics():
    """Ties at the k-th place: a positive outside the full row's top k must not enter the
    reduced row's top k (a model with constant scores must not look perfect)."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for values in (3, 1):  # scores in {0, 1, 2}, then all scores equal
        scores = torch.randint(0, values, (6, 30), generator=generator).float()
        pairs = torch.rand(6, 30, generator=generator) < 0.3
        pairs[:, 2] |= ~pairs.any(dim=1)
        positive_u, positive_i = pairs.nonzero(as_tuple=True)
        batches.append((scores, positive_u, positive_i))
    for batch in batches:
        full, reduced = _metrics([batch], False), _metrics([batch], True)
        for key in full:
            assert reduced[key] == pytest.approx(full[key], abs=1e-9), key
