"""Tests of the continual-update building blocks on tiny hand-built graphs."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recbole_ccd.model.continual import (
    StructureDistiller,
    contrastive_kd_loss,
    ema_table,
    init_new_embeddings,
    neighbour_lists,
)

# Old tables shared by the initialisation tests: 4 old users, 3 old items, d = 2.
OLD_USERS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 3.0]], dtype=torch.float64)
OLD_ITEMS = torch.tensor([[1.0, 1.0], [0.0, 2.0], [4.0, 0.0]], dtype=torch.float64)


def _matrix(pairs, n_users, n_items):
    rows, cols = zip(*pairs)
    data = np.ones(len(pairs))
    return sp.csr_matrix((data, (rows, cols)), shape=(n_users, n_items))


def _init(matrix, tau=2, mode="multi_hop", **kwargs):
    n_users, n_items = matrix.shape
    return init_new_embeddings(
        matrix, OLD_USERS, OLD_ITEMS, 4, 3, n_users, n_items, tau=tau, mode=mode, **kwargs
    )


def _expect(tensor, values):
    torch.testing.assert_close(tensor, torch.tensor(values, dtype=torch.float64))


# Graph with new user 4 and new item 3. Activities: u0=1, u1=2, u2=3, u3=1.
# Popularity: i0=3 (u0, u1, u4), i1=2, i2=2, i3=2.
MORE_THAN_TAU = _matrix(
    [(0, 0), (1, 0), (1, 1), (2, 1), (2, 2), (2, 3), (3, 2), (4, 0), (4, 3)], 5, 4
)
# New user 4 and new item 3 only meet each other: no old neighbour on either side.
NO_NEIGHBOURS = _matrix(
    [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 2), (4, 3)], 5, 4
)
# New user 4 shares item 2 with exactly u0 and u3; no new item.
EXACTLY_TAU = _matrix([(0, 0), (0, 1), (0, 2), (1, 0), (2, 1), (3, 2), (4, 2)], 5, 3)
# New user 4 shares new item 3 with u3 only; u3 is the most active old user, u2 the next.
LESS_THAN_TAU = _matrix(
    [(0, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2), (3, 3), (4, 3)], 5, 4
)


def test_init_more_than_tau_keeps_most_active_neighbours():
    users, items = _init(MORE_THAN_TAU)
    # h1(u4) = I0 = [1, 1]; A(u4) = {u0, u1, u2}, top-2 by activity = u2, u1 -> [1, 1.5].
    _expect(users, [[1.0, 1.25]])
    # h1(i3) = U2 = [2, 2]; A(i3) = {i0, i1, i2}, top-2 = i0 (3), i1 (2, lower id than i2).
    _expect(items, [[1.25, 1.75]])


def test_init_without_neighbours_uses_prominent_trends():
    users, items = _init(NO_NEIGHBOURS)
    # h1 = 0; h2 = mean of the 2 most active old users (u2: 3, u1: 2) = [1, 1.5]; halved.
    _expect(users, [[0.5, 0.75]])
    # h1 = 0; h2 = mean of the 2 most popular old items (i0: 3, i1: 2) = [0.5, 1.5]; halved.
    _expect(items, [[0.25, 0.75]])


def test_init_with_fewer_old_entities_than_tau_uses_all():
    users, items = _init(NO_NEIGHBOURS, tau=20)
    _expect(users, [[0.25, 0.75]])  # mean of all 4 old users = [0.5, 1.5]
    _expect(items, [[5.0 / 6.0, 0.5]])  # mean of all 3 old items = [5/3, 1]


def test_init_exactly_tau_averages_over_neighbours_only():
    users, items = _init(EXACTLY_TAU)
    # h1 = I2 = [4, 0]; h2 = mean(U0, U3) = [0, 1.5]. Averaging over all old users would
    # give [0.5, 1.5] instead.
    _expect(users, [[2.0, 0.75]])
    assert items.shape == (0, 2)


def test_init_less_than_tau_fills_with_most_active_outside_neighbourhood():
    users, items = _init(LESS_THAN_TAU)
    # h1 = 0 (only a new item); A = {u3}; fill with u2 (u3 is skipped) -> mean(U3, U2).
    _expect(users, [[0.25, 1.25]])
    # h1(i3) = U3 (u4 is new); A(i3) = {i0, i1, i2}; top-2 = i0, i1 -> [0.5, 1.5].
    _expect(items, [[-0.25, 2.25]])


@pytest.mark.parametrize("matrix", [MORE_THAN_TAU, NO_NEIGHBOURS, EXACTLY_TAU, LESS_THAN_TAU])
def test_init_items_mirror_users(matrix):
    n_users, n_items = matrix.shape
    users, items = _init(matrix)
    items_t, users_t = init_new_embeddings(
        matrix.T.tocsr(), OLD_ITEMS, OLD_USERS, 3, 4, n_items, n_users, tau=2
    )
    torch.testing.assert_close(users, users_t)
    torch.testing.assert_close(items, items_t)
    chunked = _init(matrix, chunk_size=1)
    torch.testing.assert_close(users, chunked[0])
    torch.testing.assert_close(items, chunked[1])


def test_init_one_hop():
    users, items = _init(MORE_THAN_TAU, mode="one_hop")
    _expect(users, [[1.0, 1.0]])
    _expect(items, [[2.0, 2.0]])
    users, items = _init(NO_NEIGHBOURS, mode="one_hop")
    _expect(users, [[0.0, 0.0]])
    _expect(items, [[0.0, 0.0]])


def test_init_random():
    matrix = sp.csr_matrix((2004, 1503))
    generator = torch.Generator().manual_seed(0)
    users, items = _init(matrix, mode="random", generator=generator, std=0.01)
    assert users.shape == (2000, 2) and items.shape == (1500, 2)
    assert users.dtype == torch.float64
    assert abs(users.std().item() - 0.01) < 0.001
    assert abs(items.mean().item()) < 0.001


def test_init_rejects_bad_arguments():
    with pytest.raises(ValueError):
        _init(MORE_THAN_TAU, mode="two_hop")
    with pytest.raises(ValueError):
        init_new_embeddings(MORE_THAN_TAU, OLD_USERS, OLD_ITEMS, 4, 3, 6, 4)


def test_ema_table():
    previous = torch.tensor([[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]])
    current = torch.tensor([[5.0, 6.0], [7.0, 8.0], [0.5, 0.5], [1.0, 1.0]])
    mixed = ema_table(previous, current, 0.9, 2)
    expected = torch.tensor([[1.4, 2.4], [3.4, 4.4], [0.5, 0.5], [1.0, 1.0]])
    torch.testing.assert_close(mixed, expected)
    assert mixed.data_ptr() != current.data_ptr()
    torch.testing.assert_close(ema_table(previous, current, 0.0, 2), current)
    torch.testing.assert_close(ema_table(previous, current, 1.0, 2)[:2], previous[:2])


def test_neighbour_lists_match_dense_cosine():
    rng = np.random.default_rng(0)
    dense = (rng.random((40, 25)) < 0.12).astype(np.float64)
    dense[3] = 0.0
    k = 5
    result = neighbour_lists(sp.csr_matrix(dense), k=k, chunk_size=7).numpy()
    assert result.shape == (40, k)
    assert (result[3] == -1).all()

    norms = np.sqrt(dense.sum(axis=1))
    for row in range(40):
        sims = np.array(
            [
                (dense[row] @ dense[other]) / (norms[row] * norms[other])
                if other != row and dense[row] @ dense[other] > 0
                else 0.0
                for other in range(40)
            ]
        )
        candidates = np.flatnonzero(sims > 0)
        ranked = candidates[np.lexsort((candidates, -sims[candidates]))][:k]
        expected = np.full(k, -1)
        expected[: len(ranked)] = ranked
        np.testing.assert_array_equal(result[row], expected)
    np.testing.assert_array_equal(result, neighbour_lists(sp.csr_matrix(dense), k=k).numpy())


def test_contrastive_kd_loss_matches_formula():
    generator = torch.Generator().manual_seed(1)
    anchors = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    candidates = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    positives = torch.tensor([[0, 3, -1], [-1, -1, -1], [4, 4, 1]])
    loss = contrastive_kd_loss(anchors, candidates, positives, temperature=2.0)

    expected = []
    for a in range(3):
        logits = [float(anchors[a] @ candidates[v]) / 2.0 for v in range(5)]
        log_norm = math.log(sum(math.exp(z) for z in logits))
        valid = [int(p) for p in positives[a] if p >= 0]
        terms = [-(logits[p] - log_norm) for p in valid]
        expected.append(sum(terms) / len(terms) if terms else 0.0)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


# Previous stage: row 0 / column 0 are padding (no interaction), so V_U = V_I = {1, 2, 3} and
# positions in V differ from raw ids. u1: i1, i2; u2: i2; u3: i3.
PREVIOUS = _matrix([(1, 1), (1, 2), (2, 2), (3, 3)], 4, 4)


def _log_softmax_at(anchor, candidates, target, temperature):
    logits = {v: float(anchor @ emb) / temperature for v, emb in candidates.items()}
    log_norm = math.log(sum(math.exp(z) for z in logits.values()))
    return logits[target] - log_norm


def _hand_distillation(old_u, old_i, now_u, now_i, temperature):
    cand_users = {v: now_u[v] for v in (1, 2, 3)}
    cand_items = {v: now_i[v] for v in (1, 2, 3)}

    def term(anchor, candidates, targets):
        if not targets:
            return 0.0
        return -sum(_log_softmax_at(anchor, candidates, t, temperature) for t in targets) / len(
            targets
        )

    # Cosine neighbours: u1 ~ u2 (share i2), u3 alone; i1 ~ i2 (share u1), i3 alone.
    user_terms = [
        term(old_u[1], cand_items, [1, 2]) + term(old_u[1], cand_users, [2]),
        term(old_u[3], cand_items, [3]) + term(old_u[3], cand_users, []),
    ]
    item_terms = [
        term(old_i[2], cand_users, [1, 2]) + term(old_i[2], cand_items, [1]),
        term(old_i[3], cand_users, [3]) + term(old_i[3], cand_items, []),
    ]
    return sum(user_terms) / 2 + sum(item_terms) / 2


def _tables(seed, n_users=6, n_items=5):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n_users, 3, generator=generator, dtype=torch.float64),
        torch.randn(n_items, 3, generator=generator, dtype=torch.float64),
    )


def test_structure_distiller_matches_hand_computation():
    old_u, old_i = _tables(0, 4, 4)
    now_u, now_i = _tables(1)
    now_u.requires_grad_(True)
    now_i.requires_grad_(True)
    distiller = StructureDistiller(old_u, old_i, PREVIOUS, k=10, temperature=5.0)
    old_u.add_(100.0)  # the distiller keeps its own frozen copy

    # Padding user 0 and new user 5 / new item 4 contribute nothing.
    batch_users = torch.tensor([1, 3, 0, 5])
    batch_items = torch.tensor([2, 3, 0, 4])
    loss = distiller.loss(now_u, now_i, batch_users, batch_items)
    old_u.sub_(100.0)
    expected = _hand_distillation(old_u, old_i, now_u.detach(), now_i.detach(), 5.0)
    assert loss.item() > 0
    assert loss.item() == pytest.approx(expected, rel=1e-10)

    loss.backward()
    assert torch.isfinite(now_u.grad).all() and torch.isfinite(now_i.grad).all()
    assert now_u.grad[0].abs().sum() == 0 and now_u.grad[5].abs().sum() == 0
    assert now_i.grad[4].abs().sum() == 0


def test_structure_distiller_zero_for_entities_absent_from_previous_stage():
    old_u, old_i = _tables(0, 4, 4)
    now_u, now_i = _tables(1)
    now_u.requires_grad_(True)
    now_i.requires_grad_(True)
    distiller = StructureDistiller(old_u, old_i, PREVIOUS)
    loss = distiller.loss(now_u, now_i, torch.tensor([0, 4, 5]), torch.tensor([0, 4]))
    assert loss.item() == 0.0
    loss.backward()
    assert (now_u.grad == 0).all() and (now_i.grad == 0).all()

    empty = torch.tensor([], dtype=torch.long)
    assert distiller.loss(now_u, now_i, empty, empty).item() == 0.0


def _two_community_graph(n_per_side=30, items_per_user=4, seed=0):
    rng = np.random.default_rng(seed)
    pairs = []
    for user in range(2 * n_per_side):
        offset = 0 if user < n_per_side else n_per_side
        for item in rng.choice(n_per_side, items_per_user, replace=False):
            pairs.append((user, offset + int(item)))
    matrix = _matrix(pairs, 2 * n_per_side, 2 * n_per_side)
    side = torch.tensor([[4.0, 0.0]] * n_per_side + [[0.0, 4.0]] * n_per_side)
    noise = torch.randn(2 * n_per_side, 2, generator=torch.Generator().manual_seed(seed))
    return matrix, side + 0.3 * noise, side + 0.3 * noise.flip(0)


def test_structure_distiller_prefers_preserved_embeddings():
    matrix, old_u, old_i = _two_community_graph()
    distiller = StructureDistiller(old_u, old_i, matrix, k=5)
    batch = torch.arange(60)
    preserved = distiller.loss(old_u, old_i, batch, batch)
    generator = torch.Generator().manual_seed(3)
    scrambled = distiller.loss(
        torch.randn(60, 2, generator=generator) * 4, torch.randn(60, 2, generator=generator) * 4,
        batch, batch,
    )
    assert preserved.item() < scrambled.item()


def test_structure_distiller_sampled_candidates_include_positives():
    matrix, old_u, old_i = _two_community_graph()
    distiller = StructureDistiller(old_u, old_i, matrix, k=5, max_candidates=8)
    required = torch.tensor([3, 17, -1, 40, 3])
    mapping = distiller._sample_candidates(60, required)
    assert (mapping >= 0).sum() == 8
    assert (mapping[torch.tensor([3, 17, 40])] >= 0).all()
    many = distiller._sample_candidates(60, torch.arange(20))
    assert (many >= 0).sum() == 20

    loss = distiller.loss(old_u, old_i, torch.arange(10), torch.arange(50, 60))
    assert torch.isfinite(loss) and loss.item() > 0


def test_structure_distiller_caps_positive_lists():
    pairs = [(1, item) for item in range(100)] + [(2, 0)]
    matrix = _matrix(pairs, 3, 100)
    old_u, old_i = torch.randn(3, 2), torch.randn(100, 2)
    distiller = StructureDistiller(old_u, old_i, matrix, max_positives=50)
    listed = distiller.ui_pos[distiller.user_pos[1]]
    assert listed.shape == (50,)
    assert (listed >= 0).all() and len(set(listed.tolist())) == 50
    item_zero = distiller.iu_pos[distiller.item_pos[0]]
    assert sorted(distiller.users[item_zero[item_zero >= 0]].tolist()) == [1, 2]
