"""Stages cut from one time-ordered atomic file: sizes, time order, id ranges, per-user splits."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from conftest import random_rows, write_inter
from recbole_ccd.data.stream import DROPPED, TEST, TRAIN, VALID, assign_stages, split_stage

pytestmark = pytest.mark.usefixtures("isolated")


def _shuffled(rows, seed=0):
    """The same rows in a random file order (the dataset must sort them by time itself)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def _stage_counts(make_config, tmp_path, name, rows, **overrides):
    from recbole_ccd.data import create_stream_dataset

    write_inter(tmp_path, name, rows)
    config = make_config(name, **overrides)
    dataset = create_stream_dataset(config)
    return np.bincount(assign_stages(dataset.timestamps, config)).tolist()


# -- stage sizes -------------------------------------------------------------------------------


def test_default_ratios_give_half_then_five_equal_stages(make_config, tmp_path):
    # 40 interactions, defaults stage_base_ratio=0.5, stage_incremental=5:
    # stage 0 = first 20, then 20 / 5 = 4 per incremental stage.
    rows = _shuffled([(f"u{t % 7}", f"i{t % 11}", 100 + 3 * t) for t in range(40)])
    assert _stage_counts(make_config, tmp_path, "d", rows) == [20, 4, 4, 4, 4, 4]


def test_base_ratio_and_incremental_count(make_config, tmp_path):
    # 60 interactions, base 0.6 -> 36, then 24 / 3 = 8 per stage.
    rows = _shuffled([(f"u{t % 7}", f"i{t % 11}", 5 * t) for t in range(60)])
    counts = _stage_counts(make_config, tmp_path, "d", rows, stage_base_ratio=0.6,
                           stage_incremental=3)
    assert counts == [36, 8, 8, 8]


def test_stage_boundaries(make_config, tmp_path):
    # Times 1..40, boundaries [11, 25, 30]: t < 11 -> 10 rows, 11 <= t < 25 -> 14,
    # 25 <= t < 30 -> 5, t >= 30 -> 11.
    rows = _shuffled([(f"u{t % 5}", f"i{t % 9}", t) for t in range(1, 41)])
    counts = _stage_counts(make_config, tmp_path, "d", rows, stage_boundaries=[11, 25, 30])
    assert counts == [10, 14, 5, 11]


def test_boundary_ties_go_to_the_later_stage(make_config, tmp_path):
    # Three rows at t=5, two at t=10 (= the boundary), one at t=20.
    rows = [("a", "x", 10), ("b", "y", 5), ("c", "z", 20), ("a", "y", 5), ("b", "x", 10),
            ("c", "x", 5)]
    counts = _stage_counts(make_config, tmp_path, "d", rows, stage_boundaries=[10])
    assert counts == [3, 3]


# -- a full stream: time order and ids -----------------------------------------------------------

N_USERS, N_ITEMS, N_ROWS = 60, 80, 1500


@pytest.fixture
def stream(tmp_path, build_stream):
    """60 users, 80 items, 1,500 interactions written in random order; 3 stages (50/25/25 %)."""
    rows = random_rows(N_USERS, N_ITEMS, N_ROWS, seed=3, min_per_user=10)
    write_inter(tmp_path, "s", _shuffled(rows, seed=1))
    config, dataset, stages = build_stream("s", stage_incremental=2)
    return rows, dataset, stages


def _split_times(stage):
    return np.concatenate([part.inter_feat["timestamp"].numpy()
                           for part in (stage.train, stage.valid, stage.test)])


def test_stage_rows_come_from_their_time_window(stream):
    rows, _, stages = stream
    times = np.sort([t for _, _, t in rows]).astype(float)
    # 1,500 rows in time order: stage 0 = positions [0, 750), stage 1 = [750, 1125),
    # stage 2 = [1125, 1500).
    windows = [(0, 750), (750, 1125), (1125, 1500)]
    assert len(stages) == 3
    for stage, (lo, hi) in zip(stages, windows):
        split = _split_times(stage)
        assert split.min() >= times[lo] and split.max() <= times[hi - 1]


def test_no_future_leakage(stream):
    _, _, stages = stream
    for earlier, later in zip(stages, stages[1:]):
        assert _split_times(earlier).max() <= _split_times(later).min()
        assert later.train.inter_feat["timestamp"].min() > earlier.test.inter_feat[
            "timestamp"].max()


@pytest.mark.parametrize("field, column", [("user_id", 0), ("item_id", 1)])
def test_ids_follow_first_appearance_and_new_ids_are_contiguous(stream, field, column):
    rows, dataset, stages = stream
    in_time = sorted(rows, key=lambda row: row[2])
    stage_of_position = np.repeat([0, 1, 2], [750, 375, 375])

    first_stage: dict[str, int] = {}
    order: list[str] = []
    for position, row in enumerate(in_time):
        token = row[column]
        if token not in first_stage:
            first_stage[token] = int(stage_of_position[position])
            order.append(token)

    token2id = dataset.field2token_id[field]
    # Ids 1, 2, 3, ... in order of first appearance (0 is RecBole's padding).
    assert [token2id[token] for token in order] == list(range(1, len(order) + 1))

    before = 1
    for k, stage in enumerate(stages):
        seen, seen_before = ((stage.n_users, stage.n_users_before) if field == "user_id"
                             else (stage.n_items, stage.n_items_before))
        new_ids = {token2id[t] for t, s in first_stage.items() if s == k}
        assert seen_before == before
        assert new_ids == set(range(seen_before, seen))
        before = seen


def test_new_users_test_split_holds_exactly_the_stage_new_users(stream):
    rows, dataset, stages = stream
    in_time = sorted(rows, key=lambda row: row[2])
    first_position = {}
    for position, (user, _, _) in enumerate(in_time):
        first_position.setdefault(user, position)
    for k, stage in ((1, stages[1]), (2, stages[2])):
        start = 750 if k == 1 else 1125
        users = dataset.id2token("user_id", stage.test.inter_feat["user_id"].numpy())
        expected = sum(first_position[u] >= start for u in users)
        assert len(stage.test_new_users) == expected


def _split_table(stages):
    return [tuple(np.stack([part.inter_feat[f].numpy() for f in ("user_id", "item_id",
                                                                  "timestamp")]).tobytes()
                  for part in (s.train, s.valid, s.test)) for s in stages]


def test_seeded_splits_are_reproducible(tmp_path, build_stream):
    write_inter(tmp_path, "s", random_rows(N_USERS, N_ITEMS, N_ROWS, seed=3, min_per_user=10))
    first = _split_table(build_stream("s", stage_incremental=2, seed=7)[2])
    again = _split_table(build_stream("s", stage_incremental=2, seed=7)[2])
    other = _split_table(build_stream("s", stage_incremental=2, seed=8)[2])
    assert first == again
    assert first != other


# -- split_stage on a hand case -----------------------------------------------------------------


class AscendingKeys:
    """Stands in for the generator: key j for the j-th kept row, so each user's rows keep
    their file order and the first ones go to test, the next to valid."""

    def random(self, n):
        return np.arange(n, dtype=float)


# Per user, in file order. ratios [0.8, 0.1, 0.1]: n_test = n_valid = max(int(0.1 n), 1).
HAND_CASE = {
    1: [3, 4, 5, 6, 7, 8, 9, 10, 11, 12],  # n=10: test 3, valid 4, train 5..12
    2: [3, 4, 13],                         # n=3: test 3, valid 4, train 13
    3: [14, 5, 6],                         # test 14 has no train anywhere -> held-out dropped
    4: [7, 7, 8, 9, 15],                   # duplicate 7 kept once; n=4: test 7, valid 8
    5: [5],                                # n=1: test 5, no valid -> dropped
    6: [3, 60, 5, 6, 4, 9, 10, 11, 13, *range(21, 32)],  # n=20: test 3, 60; valid 5, 6
    7: [3, 50, 51],                        # valid 50 has no train -> test 3 dropped too
    8: [40, 41, 3, 4],                     # test 40, valid 41 have no train; train 3, 4
}
EXPECTED = {
    TRAIN: {(1, i) for i in range(5, 13)} | {(2, 13), (3, 6), (4, 9), (4, 15), (7, 51),
                                             (8, 3), (8, 4)}
    | {(6, i) for i in [4, 9, 10, 11, 13, *range(21, 32)]},
    VALID: {(1, 4), (2, 4), (4, 8), (6, 5), (6, 6)},
    TEST: {(1, 3), (2, 3), (4, 7), (6, 3)},
}


def _interleaved(case):
    """Rows of all users, round robin, each user's items in their listed order."""
    rows, queues = [], {u: list(items) for u, items in case.items()}
    while any(queues.values()):
        for user, queue in queues.items():
            if queue:
                rows.append((user, queue.pop(0)))
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


def test_split_stage_hand_case():
    users, items = _interleaved(HAND_CASE)
    labels = split_stage(users, items, [0.8, 0.1, 0.1], AscendingKeys())
    for part in (TRAIN, VALID, TEST):
        got = list(zip(users[labels == part].tolist(), items[labels == part].tolist()))
        assert len(got) == len(set(got)), "a pair appears twice"
        assert set(got) == EXPECTED[part]
    n_labelled = sum(len(pairs) for pairs in EXPECTED.values())
    # Everything else is dropped: 49 rows in all, 9 of them dropped.
    assert len(users) == 49 and n_labelled == 40 and np.sum(labels == DROPPED) == 9


class RecordingRng:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.draws = []

    def random(self, n):
        draw = self.rng.random(n)
        self.draws.append(draw)
        return draw


def _reference_split(users, items, ratios, keys):
    """The documented rule, written as plain loops. ``keys`` orders each user's first
    occurrences (one key per first occurrence of a (user, item) pair, in row order)."""
    first = {}
    for row, pair in enumerate(zip(users.tolist(), items.tolist())):
        first.setdefault(pair, row)
    key_of = dict(zip(sorted(first.values()), keys))
    labels = [DROPPED] * len(users)
    by_user = defaultdict(list)
    for row in sorted(first.values()):
        by_user[users[row]].append(row)
    for rows in by_user.values():
        rows.sort(key=key_of.get)
        n_test = max(int(ratios[2] * len(rows)), 1)
        n_valid = max(int(ratios[1] * len(rows)), 1)
        for position, row in enumerate(rows):
            labels[row] = (TEST if position < n_test else
                           VALID if position < n_test + n_valid else TRAIN)
    train_items = {items[r] for r in range(len(users)) if labels[r] == TRAIN}
    for r in range(len(users)):
        if labels[r] in (VALID, TEST) and items[r] not in train_items:
            labels[r] = DROPPED
    for rows in by_user.values():
        held = [labels[r] for r in rows]
        if TEST not in held or VALID not in held:
            for r in rows:
                if labels[r] in (VALID, TEST):
                    labels[r] = DROPPED
    return np.array(labels)


@pytest.mark.parametrize("seed, ratios", [(0, [0.8, 0.1, 0.1]), (1, [0.6, 0.2, 0.2]),
                                          (2, [0.5, 0.25, 0.25])])
def test_split_stage_matches_reference(seed, ratios):
    rng = np.random.default_rng(100 + seed)
    users = rng.integers(0, 25, 600)
    items = rng.integers(0, 40, 600)
    recording = RecordingRng(seed)
    labels = split_stage(users, items, ratios, recording)
    assert len(recording.draws) == 1
    expected = _reference_split(users, items, ratios, recording.draws[0])
    np.testing.assert_array_equal(labels, expected)
    # The same seed gives the same split.
    np.testing.assert_array_equal(
        split_stage(users, items, ratios, np.random.default_rng(seed)), labels)
