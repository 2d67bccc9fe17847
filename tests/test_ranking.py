"""Tests of recbole_ccd.model.ranking against hand-computed values and naive dense / loop code."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recbole_ccd.model.ranking import (
    ensemble_scores,
    mask_scores,
    merge_replay,
    rank_transform,
    ranks_of_items,
    relaxed_ranking_loss,
    replay_weight,
    sample_replay,
    sample_uninteresting,
    topk_columns,
    topk_rows,
)


def _random_mask(n_rows, n_cols, density, seed):
    rng = np.random.default_rng(seed)
    dense = rng.random((n_rows, n_cols)) < density
    return sp.csr_matrix(dense.astype(np.float32)), torch.from_numpy(dense)


def _matrix_fn(mat):
    """Score function returning rows of ``mat`` (a view for a single slice, like a cache)."""
    return lambda users: mat[users]


# ------------------------------------------------------------------------------------------
# mask_scores
# ------------------------------------------------------------------------------------------
def test_mask_scores_3x4_by_hand():
    scores = torch.arange(12, dtype=torch.float32).view(3, 4)
    # mask over 3 users x 4 items; user 5 is outside the mask (not forbidden)
    mask = sp.csr_matrix(
        np.array([[0, 1, 0, 0],
                  [0, 0, 0, 0],
                  [1, 0, 0, 1]], dtype=np.float32)
    )
    users = torch.tensor([2, 0, 5])
    out = mask_scores(scores, users, mask)
    inf = float("-inf")
    expected = torch.tensor([[inf, 1.0, 2.0, inf],
                             [4.0, inf, 6.0, 7.0],
                             [8.0, 9.0, 10.0, 11.0]])
    assert torch.equal(out, expected)
    assert out is scores  # in place
    again = mask_scores(torch.zeros(2, 4), torch.tensor([0, 1]), mask, value=-7.0)
    assert torch.equal(again, torch.tensor([[0.0, -7.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(mask_scores(torch.ones(1, 4), torch.tensor([2]), None), torch.ones(1, 4))


# ------------------------------------------------------------------------------------------
# rank transform / ensemble
# ------------------------------------------------------------------------------------------
def test_rank_transform_by_hand():
    out = rank_transform(torch.tensor([[3.0, 1.0, 2.0]]))
    expected = torch.tensor([[1.0, 3.0 ** -0.05, 2.0 ** -0.05]])
    assert torch.allclose(out, expected)
    # ties: the earlier column gets the better rank
    tie = rank_transform(torch.tensor([[1.0, 1.0, 0.0]]), exponent=1.0)
    assert torch.allclose(tie, torch.tensor([[1.0, 0.5, 1.0 / 3.0]]))


def test_ensemble_two_models_by_hand():
    m1 = torch.tensor([[3.0, 1.0, 2.0]])  # ranks 0, 2, 1
    m2 = torch.tensor([[0.0, 5.0, 4.0]])  # ranks 2, 0, 1
    users = torch.tensor([0])
    out = ensemble_scores([_matrix_fn(m1), _matrix_fn(m2)], users)
    w2, w3 = 2.0 ** -0.05, 3.0 ** -0.05
    assert torch.allclose(out, torch.tensor([[(1 + w3) / 2, (w3 + 1) / 2, w2]]))
    # only the first two columns: m1 -> ranks 0, 1 ; m2 -> ranks 1, 0
    cut = ensemble_scores([_matrix_fn(m1), _matrix_fn(m2)], users, n_items=2)
    assert cut.shape == (1, 2)
    assert torch.allclose(cut, torch.tensor([[(1 + w2) / 2, (1 + w2) / 2]]))


# ------------------------------------------------------------------------------------------
# top-k per row / per column
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_items", [None, 25])
def test_topk_rows_matches_dense(n_items):
    gen = torch.Generator().manual_seed(0)
    mat = torch.rand(50, 30, generator=gen)
    keep_copy = mat.clone()
    mask, dense_mask = _random_mask(50, 30, 0.2, seed=1)
    users = torch.randperm(50, generator=gen)[:43]
    vals, idx = topk_rows(_matrix_fn(mat), users, 5, mask=mask, chunk_size=7, n_items=n_items)
    n = 30 if n_items is None else n_items
    ref = mat.masked_fill(dense_mask, float("-inf"))[users][:, :n]
    ref_v, ref_i = torch.topk(ref, 5, dim=1)
    assert idx.dtype == torch.int64 and idx.shape == (43, 5)
    assert torch.equal(idx, ref_i)
    assert torch.equal(vals, ref_v)
    assert torch.equal(mat, keep_copy)  # the score function's tensor is not modified
    # k larger than the candidate columns is clamped
    v_all, i_all = topk_rows(_matrix_fn(mat), users, 100, chunk_size=7, n_items=n_items)
    assert v_all.shape == (43, n)
    assert torch.equal(torch.sort(i_all, dim=1).values, torch.arange(n).expand(43, n))


@pytest.mark.parametrize("n_items", [None, 25])
def test_topk_columns_matches_dense(n_items):
    gen = torch.Generator().manual_seed(2)
    mat = torch.rand(50, 30, generator=gen)
    mask, dense_mask = _random_mask(50, 30, 0.2, seed=3)
    users = torch.randperm(50, generator=gen)[:41]
    vals, uids = topk_columns(_matrix_fn(mat), users, 6, mask=mask, chunk_size=7,
                              n_items=n_items)
    n = 30 if n_items is None else n_items
    sub = mat.masked_fill(dense_mask, float("-inf"))[users][:, :n]  # [41, n]
    ref_v, ref_pos = torch.topk(sub.t(), 6, dim=1)
    assert uids.shape == (n, 6)
    assert torch.equal(vals, ref_v)
    assert torch.equal(uids, users[ref_pos])  # actual user ids, not positions
    # fewer users than k: clamped
    v_small, u_small = topk_columns(_matrix_fn(mat), users[:4], 10, chunk_size=3)
    assert v_small.shape == (30, 4)
    assert set(u_small[0].tolist()) == set(users[:4].tolist())


# ------------------------------------------------------------------------------------------
# relaxed ranking loss
# ------------------------------------------------------------------------------------------
def _naive_rrd(inter, unint, clip, valid=None):
    total = 0.0
    for r in range(len(inter)):
        s = [min(x, clip) for x in inter[r]]
        neg = [min(x, clip) for j, x in enumerate(unint[r]) if valid is None or valid[r][j]]
        for t in range(len(s)):
            denom = sum(math.exp(v) for v in s[t:]) + sum(math.exp(v) for v in neg)
            total -= s[t] - math.log(denom)
    return total


def test_relaxed_ranking_loss_matches_loop():
    inter = [[2.0, 12.0, -1.0], [0.5, 0.1, 11.0]]  # 12 and 11 are clipped at 10
    unint = [[1.0, -2.0, 30.0, 0.0], [3.0, 0.2, -0.3, 1.5]]
    valid = [[True, True, False, True], [True, False, True, True]]
    got = relaxed_ranking_loss(torch.tensor(inter), torch.tensor(unint), clip=10.0)
    assert got.dim() == 0
    assert got.item() == pytest.approx(_naive_rrd(inter, unint, 10.0), rel=1e-5)
    got_v = relaxed_ranking_loss(torch.tensor(inter), torch.tensor(unint), clip=10.0,
                                 valid=torch.tensor(valid))
    assert got_v.item() == pytest.approx(_naive_rrd(inter, unint, 10.0, valid), rel=1e-5)
    # a different clip changes the value accordingly
    got_c = relaxed_ranking_loss(torch.tensor(inter), torch.tensor(unint), clip=1.0)
    assert got_c.item() == pytest.approx(_naive_rrd(inter, unint, 1.0), rel=1e-5)


def test_relaxed_ranking_loss_interesting_padding():
    inter = torch.tensor([[2.0, 1.0, 0.0], [0.5, -9.0, -9.0]])
    unint = torch.tensor([[1.0, -2.0], [3.0, 0.2]])
    keep = torch.tensor([[True, True, True], [True, False, False]])
    got = relaxed_ranking_loss(inter, unint, interesting_valid=keep)
    expected = _naive_rrd([[2.0, 1.0, 0.0], [0.5]], unint.tolist(), 10.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # padded interesting entries and a row without valid negatives: finite gradients
    inter.requires_grad_(True)
    loss = relaxed_ranking_loss(inter, unint, valid=torch.tensor([[True, True], [False, False]]),
                                interesting_valid=keep)
    loss.backward()
    assert torch.isfinite(inter.grad).all() and bool((inter.grad[1, 1:] == 0).all())


def test_relaxed_ranking_loss_gradients_finite_with_empty_rows():
    inter = torch.tensor([[1.0, 0.0], [2.0, -1.0]], requires_grad=True)
    unint = torch.tensor([[0.5, 0.3], [0.1, 0.2]], requires_grad=True)
    valid = torch.tensor([[False, False], [True, False]])
    loss = relaxed_ranking_loss(inter, unint, valid=valid)
    loss.backward()
    assert torch.isfinite(inter.grad).all() and torch.isfinite(unint.grad).all()
    assert unint.grad[0].abs().sum() == 0 and unint.grad[1, 1] == 0
    # a row without negatives reduces to the Plackett-Luce likelihood of the list
    expected = _naive_rrd([[1.0, 0.0], [2.0, -1.0]], [[], [0.1]], 10.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------
# uninteresting sampling
# ------------------------------------------------------------------------------------------
def _check_samples(ids, valid, forbidden_dense, start, n_candidates, n_samples):
    n_rows = ids.shape[0]
    assert ids.shape == valid.shape == (n_rows, n_samples)
    for r in range(n_rows):
        eligible = {c for c in range(start, n_candidates) if not forbidden_dense[r, c]}
        got = ids[r][valid[r]].tolist()
        want = min(n_samples, len(eligible))
        assert len(got) == want
        assert bool(valid[r, :want].all())  # left-aligned
        assert len(set(got)) == len(got)  # distinct
        assert set(got) <= eligible  # never forbidden, never out of range


@pytest.mark.parametrize("max_rounds", [3, 0])  # 0 forces the exact path for every row
def test_sample_uninteresting_rejection_and_exact(max_rounds):
    n_rows, n_cand = 300, 60
    forb, dense = _random_mask(n_rows, n_cand, 0.15, seed=4)
    gen = torch.Generator().manual_seed(5)
    ids, valid = sample_uninteresting(n_rows, n_cand, 5, forb, gen, start=1,
                                      max_rounds=max_rounds, chunk_elems=500)
    _check_samples(ids, valid, dense.numpy(), 1, n_cand, 5)
    assert bool(valid.all())
    # the full range [1, n_cand) is used, and the padding id 0 never is
    assert set(ids[valid].tolist()) == set(range(1, n_cand))


def test_sample_uninteresting_cap_dense_rows_and_padding():
    n_cand = 10
    dense = np.zeros((4, n_cand), dtype=bool)
    dense[0, 1:8] = True  # 2 eligible: 8, 9
    dense[1, :] = True  # nothing eligible
    dense[2, 3] = True  # 8 eligible
    forb = sp.csr_matrix(dense.astype(np.float32))
    gen = torch.Generator().manual_seed(6)
    ids, valid = sample_uninteresting(5, n_cand, 4, forb, gen, start=1, pad=-1)
    _check_samples(ids, valid, np.vstack([dense, np.zeros((1, n_cand), bool)]), 1, n_cand, 4)
    assert valid.sum(dim=1).tolist() == [2, 0, 4, 4, 4]
    assert set(ids[0, :2].tolist()) == {8, 9}
    assert ids[0, 2:].tolist() == [-1, -1] and ids[1].tolist() == [-1] * 4
    # n_samples beyond the range: everything eligible, once
    ids_all, valid_all = sample_uninteresting(1, n_cand, 20, None, gen, start=1)
    assert sorted(ids_all[valid_all].tolist()) == list(range(1, n_cand))


@pytest.mark.parametrize("n_samples", [3, 15])  # rejection path, exact path
def test_sample_uninteresting_is_uniform(n_samples):
    n_rows, n_cand = 4000, 21
    dense = np.zeros((n_rows, n_cand), dtype=bool)
    dense[:, [2, 7]] = True  # 18 eligible ids in [1, 21)
    forb = sp.csr_matrix(dense.astype(np.float32))
    gen = torch.Generator().manual_seed(7)
    ids, valid = sample_uninteresting(n_rows, n_cand, n_samples, forb, gen)
    assert bool(valid.all())
    counts = np.bincount(ids.flatten().numpy(), minlength=n_cand)
    eligible = [c for c in range(1, n_cand) if c not in (2, 7)]
    assert counts[0] == counts[2] == counts[7] == 0
    expected = n_rows * n_samples / len(eligible)
    assert np.all(np.abs(counts[eligible] - expected) < 6 * math.sqrt(expected))


def test_sample_uninteresting_retry_rounds(monkeypatch):
    """With a first round of exactly n_samples draws most rows fail and go to later rounds."""
    import recbole_ccd.model.ranking as ranking

    original = ranking._draw_count
    calls = []

    def tight(expected, n_samples, factor):
        calls.append(factor)
        return n_samples if factor == 1.0 else original(expected, n_samples, factor)

    monkeypatch.setattr(ranking, "_draw_count", tight)
    n_rows, n_cand = 500, 40
    forb, dense = _random_mask(n_rows, n_cand, 0.3, seed=14)
    ids, valid = sample_uninteresting(n_rows, n_cand, 4, forb, torch.Generator().manual_seed(15))
    assert 2.0 in calls  # a second round happened
    _check_samples(ids, valid, dense.numpy(), 1, n_cand, 4)
    assert bool(valid.all())


def test_sample_uninteresting_medium_scale_smoke():
    n_rows, n_cand, n = 2000, 5000, 100
    rng = np.random.default_rng(8)
    rows = np.repeat(np.arange(n_rows), 20)
    cols = rng.integers(1, n_cand, rows.size)
    forb = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n_rows, n_cand))
    ids, valid = sample_uninteresting(n_rows, n_cand, n, forb, torch.Generator().manual_seed(9))
    assert bool(valid.all())
    srt = torch.sort(ids, dim=1).values
    assert not bool((srt[:, 1:] == srt[:, :-1]).any())
    keys = (torch.arange(n_rows).unsqueeze(1) * n_cand + ids).flatten().numpy()
    assert not np.isin(keys, rows * n_cand + cols).any()
    assert int(ids.min()) >= 1 and int(ids.max()) < n_cand


# ------------------------------------------------------------------------------------------
# replay sampling
# ------------------------------------------------------------------------------------------
def test_sample_replay_validity_counts_and_labels():
    gen = torch.Generator().manual_seed(10)
    n_users, a, n_items = 40, 8, 100
    items = torch.stack([torch.randperm(n_items - 1, generator=gen)[:a] + 1
                         for _ in range(n_users)])
    n_pad = torch.randint(0, a + 1, (n_users,), generator=gen)
    for r in range(n_users):
        if n_pad[r]:
            items[r, a - n_pad[r]:] = -1
    scores = torch.randn(n_users, a, generator=gen)
    ref_table = torch.randint(0, n_items, (n_users, n_items), generator=gen)
    users = torch.arange(100, 100 + n_users)

    def ref_rank_fn(u, it):
        assert bool((it >= 0).all())
        return ref_table[u - 100].gather(1, it)

    out_u, out_i, out_y = sample_replay(ref_rank_fn, items, scores, users, 3, eps=1e-2,
                                        generator=gen)
    assert out_u.shape == out_i.shape == out_y.shape
    for r in range(n_users):
        sel = out_u == users[r]
        got = out_i[sel].tolist()
        cand = [x for x in items[r].tolist() if x >= 0]
        assert len(got) == min(3, len(cand)) == len(set(got))
        assert set(got) <= set(cand)
        for item, y in zip(got, out_y[sel].tolist()):
            col = items[r].tolist().index(item)
            assert y == pytest.approx(torch.sigmoid(scores[r, col]).item(), rel=1e-6)


def test_sample_replay_prefers_largest_rank_gap():
    n_rows, a = 20000, 4
    items = torch.tensor([[11, 12, 13, -1]]).repeat(n_rows, 1)
    scores = torch.zeros(n_rows, a)
    # gap = ref_rank - proxy_rank : item 11 -> 3-0=3, item 12 -> 10-1=9, item 13 -> 4-2=2
    ref = torch.tensor([3, 10, 4, 0])

    def ref_rank_fn(u, it):
        return ref.expand(u.numel(), a)

    gen = torch.Generator().manual_seed(11)
    eps = 0.5
    _, out_i, _ = sample_replay(ref_rank_fn, items, scores, torch.arange(n_rows), 1, eps=eps,
                                generator=gen)
    assert out_i.numel() == n_rows
    freq = torch.stack([(out_i == c).float().mean() for c in (11, 12, 13)])
    w = torch.exp(eps * torch.tensor([3.0, 9.0, 2.0]))
    assert torch.allclose(freq, w / w.sum(), atol=0.015)
    assert int(freq.argmax()) == 1 and freq[1] > 0.9
    # huge eps (weights underflow in exp) still draws valid, distinct candidates
    _, big_i, _ = sample_replay(ref_rank_fn, items[:50], scores[:50], torch.arange(50), 2,
                                eps=1e4, generator=gen)
    assert big_i.numel() == 100 and bool((big_i > 0).all())


def test_merge_replay_keeps_max_label():
    p1 = (torch.tensor([0, 0, 1]), torch.tensor([5, 6, 5]), torch.tensor([0.2, 0.9, 0.4]))
    p2 = (torch.tensor([0, 2, 1]), torch.tensor([5, 7, 5]), torch.tensor([0.7, 0.3, 0.1]))
    u, i, y = merge_replay([p1, p2])
    got = {(a, b): c for a, b, c in zip(u.tolist(), i.tolist(), y.tolist())}
    want = {(0, 5): 0.7, (0, 6): 0.9, (1, 5): 0.4, (2, 7): 0.3}
    assert got.keys() == want.keys() and len(u) == 4
    for key, val in want.items():
        assert got[key] == pytest.approx(val)


# ------------------------------------------------------------------------------------------
# ranks of items / replay weight
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_mask", [False, True])
def test_ranks_of_items_matches_dense(use_mask):
    gen = torch.Generator().manual_seed(12)
    mat = torch.rand(50, 30, generator=gen)
    mask, dense_mask = _random_mask(50, 30, 0.2, seed=13)
    users = torch.randperm(50, generator=gen)[:37]
    items = torch.randint(0, 30, (37, 6), generator=gen)
    items[::5, -1] = -1
    got = ranks_of_items(_matrix_fn(mat), users, items, chunk_size=7,
                         mask=mask if use_mask else None)
    counted = mat.masked_fill(dense_mask, float("-inf")) if use_mask else mat
    order = torch.argsort(counted[users], dim=1, descending=True)
    for r in range(37):
        for c in range(6):
            it = int(items[r, c])
            if it < 0:
                assert got[r, c] == -1
                continue
            if use_mask and dense_mask[users[r], it]:
                want = int((counted[users[r]] > mat[users[r], it]).sum())
            else:
                want = int((order[r] == it).nonzero())  # dense argsort position
            assert got[r, c] == want


def test_replay_weight_values():
    assert replay_weight(0) == pytest.approx(0.5)
    assert replay_weight(10) == pytest.approx(0.5 / math.e)
    assert replay_weight(5, initial=1.0, period=5.0) == pytest.approx(math.exp(-1))


def test_estimated_ranks_are_exact_in_the_top_and_close_below():
    from recbole_ccd.model.ranking import estimated_ranks, ranks_of_items

    generator = torch.Generator().manual_seed(5)
    rows = torch.randn(20, 3000, generator=generator)
    true = (rows[:, None, :] > rows[:, :, None]).sum(-1)  # [20, 3000] strictly-greater counts
    top_values = torch.topk(rows, 50, dim=1).values
    est = estimated_ranks(rows, rows, top_values)
    in_top = rows >= top_values[:, -1:]
    assert torch.equal(est[in_top].long(), true[in_top])
    # Gaussian rows: the logistic CDF is within 0.0095 of the normal one, and a row of 3,000
    # samples strays from its CDF by about 1/sqrt(3000) = 0.018: within 3% of the catalogue.
    assert (est[~in_top] - true[~in_top]).abs().max() <= 0.03 * 3000
    assert torch.all(est[~in_top] >= 50)

    items = torch.randint(0, 3000, (20, 7), generator=generator)
    exact = ranks_of_items(lambda u: rows[u], torch.arange(20), items)
    approx = ranks_of_items(lambda u: rows[u], torch.arange(20), items, exact_top=50)
    assert torch.equal(exact, true.gather(1, items))
    assert (approx - exact).abs().max() <= 0.03 * 3000


def test_row_mean_var_matches_a_float64_reference_and_flags_minus_inf():
    from recbole_ccd.model.ranking import row_mean_var

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 3000, generator=g) * 2.0 + 3.0
    mean, var = row_mean_var(rows)
    reference = rows.double()
    assert torch.allclose(mean.double(), reference.mean(1, keepdim=True), rtol=1e-5)
    assert torch.allclose(var.double(), reference.var(1, correction=0, keepdim=True), rtol=1e-4)
    # hand-checked: [1, 2, 3, 6] has mean 3 and population variance (4 + 1 + 0 + 9) / 4 = 3.5
    mean, var = row_mean_var(torch.tensor([[1.0, 2.0, 3.0, 6.0]]))
    assert mean.item() == pytest.approx(3.0) and var.item() == pytest.approx(3.5)
    rows[2, 7] = -torch.inf
    _, var = row_mean_var(rows)
    assert torch.isfinite(var[[0, 1, 3, 4]]).all() and not torch.isfinite(var[2]).any()
