"""StreamResults: LA, RA and H-mean on a hand-computed three-stage matrix."""

from __future__ import annotations

import json

import pytest

from recbole_ccd.evaluation import StreamResults, harmonic_mean

# r[k][j]: after learning stage k, on the test split of stage j.
RECALL = [[0.5], [0.3, 0.6], [0.2, 0.4, 0.9]]
NDCG = [[0.4], [0.1, 0.5], [0.0, 0.2, 0.3]]


def _results():
    results = StreamResults()
    for k in range(3):
        row = [{"recall@20": RECALL[k][j], "ndcg@20": NDCG[k][j]} for j in range(k + 1)]
        new = None if k == 0 else {"recall@20": 0.1 * k, "ndcg@20": 0.05 * k}
        results.add_row("model", k, row, new)
    return results


def test_matrix_is_lower_triangular_as_added():
    body = _results().to_dict()["model"]
    assert body["matrix"]["recall@20"] == RECALL
    assert body["matrix"]["ndcg@20"] == NDCG
    assert body["new_users"]["recall@20"] == [None, 0.1, 0.2]


def test_per_stage_and_stream_summary():
    summary = _results().summary("model")
    recall = summary["per_stage"]["recall@20"]
    # Stage 1: LA = 0.6, RA = 0.3, H = 2 * 0.6 * 0.3 / 0.9 = 0.4.
    # Stage 2: LA = 0.9, RA = (0.2 + 0.4) / 2 = 0.3, H = 2 * 0.9 * 0.3 / 1.2 = 0.45.
    assert recall["LA"] == pytest.approx([0.6, 0.9])
    assert recall["RA"] == pytest.approx([0.3, 0.3])
    assert recall["H-mean"] == pytest.approx([0.4, 0.45])
    # Stream: LA = 0.75, RA = 0.3, H = 2 * 0.75 * 0.3 / 1.05 = 3 / 7 (the harmonic mean of
    # the two means, not the mean of the per-stage harmonic means, which is 0.425).
    assert summary["LA"]["recall@20"] == pytest.approx(0.75)
    assert summary["RA"]["recall@20"] == pytest.approx(0.3)
    assert summary["H-mean"]["recall@20"] == pytest.approx(3 / 7)

    ndcg = summary["per_stage"]["ndcg@20"]
    # Stage 1: LA 0.5, RA 0.1, H = 0.1 / 0.6 = 1/6. Stage 2: LA 0.3, RA 0.1, H = 0.06 / 0.4.
    assert ndcg["LA"] == pytest.approx([0.5, 0.3])
    assert ndcg["RA"] == pytest.approx([0.1, 0.1])
    assert ndcg["H-mean"] == pytest.approx([1 / 6, 0.15])
    # Stream: LA 0.4, RA 0.1, H = 0.08 / 0.5 = 0.16.
    assert summary["LA"]["ndcg@20"] == pytest.approx(0.4)
    assert summary["RA"]["ndcg@20"] == pytest.approx(0.1)
    assert summary["H-mean"]["ndcg@20"] == pytest.approx(0.16)


def test_single_stage_has_no_incremental_summary():
    results = StreamResults()
    results.add_row("model", 0, [{"recall@20": 0.5}], None)
    summary = results.summary("model")
    assert summary["LA"]["recall@20"] is None and summary["H-mean"]["recall@20"] is None
    assert summary["per_stage"]["recall@20"] == {"LA": [], "RA": [], "H-mean": []}


def test_harmonic_mean_of_zeros():
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(None, 0.5) is None


def test_rewriting_a_stage_replaces_its_row():
    """A resumed run evaluates the stage again: the row is replaced, not appended."""
    results = _results()
    results.add_row("model", 2, [{"recall@20": 0.1, "ndcg@20": 0.1}] * 3,
                    {"recall@20": 0.7, "ndcg@20": 0.7})
    body = results.to_dict()["model"]
    assert body["matrix"]["recall@20"] == RECALL[:2] + [[0.1, 0.1, 0.1]]
    assert body["new_users"]["recall@20"] == [None, 0.1, 0.7]


def test_round_trip_through_json():
    results = _results()
    again = StreamResults.from_dict(json.loads(json.dumps(results.to_dict())))
    assert again.to_dict() == results.to_dict()
