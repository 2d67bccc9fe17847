r"""Building blocks for continual updates of students and teachers across stages.

Ids are global and contiguous by first appearance, so the users (items) that are new in a
stage are exactly the rows ``[n_old, n_new)`` of the embedding tables. Row 0 may be a padding
row; it is treated like any other old row.

This module provides three independent pieces, all in plain torch + ``scipy.sparse``:

* :func:`init_new_embeddings`: initial embeddings for the new rows of a grown table
  ("prominent trends + multi-hop" initialisation).
* :func:`ema_table`: the exponential moving average of embedding tables used by the
  stability and plasticity proxies.
* :func:`neighbour_lists`, :func:`contrastive_kd_loss` and :class:`StructureDistiller`: the
  structure-preserving contrastive distillation regulariser that a model applies against its
  own frozen embeddings of the previous stage.

No dense ``n_users x n_items`` matrix is ever built: interactions are ``scipy.sparse`` CSR
matrices and every co-occurrence or similarity is computed with sparse products.
"""

from typing import Optional, Tuple

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

__all__ = [
    "init_new_embeddings",
    "ema_table",
    "neighbour_lists",
    "contrastive_kd_loss",
    "StructureDistiller",
]

_INIT_MODES = ("random", "one_hop", "multi_hop")


# ---------------------------------------------------------------------------------------------
# Sparse helpers
# ---------------------------------------------------------------------------------------------


def _binary_csr(matrix: sp.spmatrix) -> sp.csr_matrix:
    r"""Return a binary float64 CSR copy of ``matrix`` (duplicates merged, zeros dropped)."""
    out = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
    out.sum_duplicates()
    out.eliminate_zeros()
    out.data[:] = 1.0
    return out


def _sparse_matmul(weights: sp.spmatrix, table: Tensor) -> Tensor:
    r"""Multiply a scipy sparse matrix by a dense tensor, keeping the tensor's device and dtype.

    Args:
        weights: sparse matrix ``[n, m]``.
        table: dense tensor ``[m, d]``.

    Returns:
        Tensor ``[n, d]``.
    """
    coo = weights.tocoo()
    indices = np.vstack([coo.row, coo.col]).astype(np.int64)
    sparse = torch.sparse_coo_tensor(
        torch.from_numpy(indices).to(table.device),
        torch.from_numpy(coo.data).to(device=table.device, dtype=table.dtype),
        size=coo.shape,
        check_invariants=False,  # indices come from a valid scipy matrix
    )
    return torch.sparse.mm(sparse, table)


def _row_normalised(matrix: sp.csr_matrix) -> sp.csr_matrix:
    r"""Divide every row by its sum; rows that sum to zero stay zero."""
    sums = np.asarray(matrix.sum(axis=1)).ravel()
    inv = np.zeros_like(sums)
    np.divide(1.0, sums, out=inv, where=sums > 0)
    return sp.diags(inv) @ matrix


# ---------------------------------------------------------------------------------------------
# 1. Initialisation of new users and items
# ---------------------------------------------------------------------------------------------


def _two_hop_selection(
    rows: sp.csr_matrix, n_old: int, tau: int, chunk_size: int
) -> sp.csr_matrix:
    r"""Averaging weights of the two-hop part for the new rows of ``rows``.

    Args:
        rows: binary interactions of the current stage ``[n_self, n_other]`` where the "self"
            side is the one being initialised (users, or items via the transpose).
        n_old: number of old entities on the self side; rows ``>= n_old`` are new.
        tau: size of the averaged set.
        chunk_size: number of new rows whose co-occurrences are computed at once.

    Returns:
        CSR ``[n_self - n_old, n_old]`` whose row ``r`` holds ``1 / |S|`` on the selected old
        entities ``S`` of new entity ``n_old + r``.
    """
    n_self = rows.shape[0]
    n_new = n_self - n_old
    if n_new == 0:
        return sp.csr_matrix((0, n_old), dtype=np.float64)
    activity = np.diff(rows.indptr)[:n_old]
    # Global activity order of the old entities: most active first, ties by lower id.
    order = np.lexsort((np.arange(n_old), -activity))
    size = min(tau, n_old)
    prominent = order[:size]
    old_transposed = rows[:n_old].T.tocsr()  # [n_other, n_old]

    sel_rows, sel_cols, sel_vals = [], [], []
    for start in range(n_old, n_self, chunk_size):
        stop = min(n_self, start + chunk_size)
        # Co-occurrence with old entities: entry (r, v) > 0 iff new entity and v share an
        # interaction of this stage. Old and new ids never coincide, so v != self holds.
        cooc = (rows[start:stop] @ old_transposed).tocsr()
        for local in range(stop - start):
            neighbours = cooc.indices[cooc.indptr[local]:cooc.indptr[local + 1]]
            n_neighbours = len(neighbours)
            if n_neighbours == 0:
                chosen = prominent
            elif n_neighbours < size:
                # Fill with the most active old entities outside the neighbourhood. At most
                # n_neighbours of the first `size` entries of `order` are neighbours, so the
                # fill is always found within them.
                head = order[:size]
                fill = head[~np.isin(head, neighbours)][: size - n_neighbours]
                chosen = np.concatenate([neighbours, fill])
            else:
                # |A| >= tau: the tau most active neighbours (all of them when |A| == tau).
                # Note: computing the fill as a slice `[-(tau - |A|):]` of a list would give
                # `[-0:]`, i.e. every remaining entity, when |A| == tau; that case must
                # average over A alone, which this branch does.
                rank = np.lexsort((neighbours, -activity[neighbours]))
                chosen = neighbours[rank[:size]]
            row = start + local - n_old
            sel_rows.append(np.full(len(chosen), row, dtype=np.int64))
            sel_cols.append(chosen.astype(np.int64))
            sel_vals.append(np.full(len(chosen), 1.0 / len(chosen)))

    return sp.csr_matrix(
        (np.concatenate(sel_vals), (np.concatenate(sel_rows), np.concatenate(sel_cols))),
        shape=(n_new, n_old),
    )


def _init_side(
    rows: sp.csr_matrix,
    old_self_emb: Tensor,
    old_other_emb: Tensor,
    n_old_self: int,
    n_old_other: int,
    tau: int,
    mode: str,
    chunk_size: int,
) -> Tensor:
    r"""Initial embeddings of the new rows of one side (users, or items via the transpose).

    Args:
        rows: binary interactions ``[n_self, n_other]`` of the current stage.
        old_self_emb: old embeddings of the side being initialised ``[n_old_self, d]``.
        old_other_emb: old embeddings of the other side ``[n_old_other, d]``.

    Returns:
        Tensor ``[n_self - n_old_self, d]``.
    """
    one_hop_weights = _row_normalised(rows[n_old_self:, :n_old_other])
    one_hop = _sparse_matmul(one_hop_weights, old_other_emb)
    if mode == "one_hop":
        return one_hop
    two_hop_weights = _two_hop_selection(rows, n_old_self, tau, chunk_size)
    two_hop = _sparse_matmul(two_hop_weights, old_self_emb)
    # A new entity with no old one-hop neighbour keeps h2 / 2 (h1 is the zero vector).
    return (one_hop + two_hop) / 2


def init_new_embeddings(
    interactions: sp.spmatrix,
    old_user_emb: Tensor,
    old_item_emb: Tensor,
    n_old_users: int,
    n_old_items: int,
    n_users: int,
    n_items: int,
    tau: int = 20,
    mode: str = "multi_hop",
    generator: Optional[torch.Generator] = None,
    std: float = 0.01,
    chunk_size: int = 4096,
) -> Tuple[Tensor, Tensor]:
    r"""Initial layer-0 embeddings for the users and items that are new in the current stage.

    For a new user ``u`` (new items are symmetric, on the transposed matrix):

    * one-hop part ``h1(u)``: the mean of the old item embeddings over the *old* items that
      ``u`` interacted with in this stage; the zero vector if there are none.
    * two-hop part ``h2(u)``: let ``A(u)`` be the old users sharing at least one item of this
      stage with ``u`` (old or new item) and ``f(v)`` the number of interactions of ``v`` in
      this stage. With ``t = min(tau, n_old_users)``:

      - ``|A(u)| = 0``: mean over the ``t`` most active old users (the "prominent trends",
        the same set for every such user);
      - ``0 < |A(u)| < t``: mean over ``A(u)`` plus the ``t - |A(u)|`` most active old users
        outside ``A(u)``;
      - ``|A(u)| >= t``: mean over the ``t`` most active members of ``A(u)`` (exactly
        ``A(u)`` when ``|A(u)| = t``).

      Ties in activity are broken by the lower id. For items, activity is the item's
      popularity in this stage and ``A(i)`` the old items co-consumed with ``i``.

    Modes: ``"multi_hop"`` returns ``(h1 + h2) / 2`` (so ``h2 / 2`` when ``h1 = 0``),
    ``"one_hop"`` returns ``h1`` and ``"random"`` draws from ``N(0, std^2)``.

    Args:
        interactions: binary training pairs of the current stage, CSR ``[n_users, n_items]``.
        old_user_emb: layer-0 user embeddings ``[>= n_old_users, d]``; rows beyond
            ``n_old_users`` are ignored.
        old_item_emb: layer-0 item embeddings ``[>= n_old_items, d]``; likewise.
        n_old_users: number of old users (``>= 1``); new users are ``[n_old_users, n_users)``.
        n_old_items: number of old items (``>= 1``); new items are ``[n_old_items, n_items)``.
        n_users: number of users in the current stage.
        n_items: number of items in the current stage.
        tau: size of the two-hop averaging set.
        mode: ``"multi_hop"``, ``"one_hop"`` or ``"random"``.
        generator: random generator for ``"random"`` (on the CPU).
        std: standard deviation for ``"random"``.
        chunk_size: number of new rows whose sparse co-occurrences are computed at once.

    Returns:
        ``(new_user_rows [n_users - n_old_users, d], new_item_rows [n_items - n_old_items, d])``
        with the dtype and device of ``old_user_emb``; no autograd history.
    """
    if mode not in _INIT_MODES:
        raise ValueError(f"mode must be one of {_INIT_MODES}, got {mode!r}")
    if not 1 <= n_old_users <= n_users or not 1 <= n_old_items <= n_items:
        raise ValueError("need 1 <= n_old_users <= n_users and 1 <= n_old_items <= n_items")
    if tau < 1:
        raise ValueError(f"tau must be >= 1, got {tau}")
    if interactions.shape != (n_users, n_items):
        raise ValueError(
            f"interactions has shape {interactions.shape}, expected {(n_users, n_items)}"
        )
    if old_user_emb.shape[0] < n_old_users or old_item_emb.shape[0] < n_old_items:
        raise ValueError("old embedding tables have fewer rows than n_old_users / n_old_items")

    dim = old_user_emb.shape[1]
    dtype, device = old_user_emb.dtype, old_user_emb.device
    n_new_users, n_new_items = n_users - n_old_users, n_items - n_old_items
    if mode == "random":
        new_users = torch.randn(n_new_users, dim, generator=generator, dtype=dtype) * std
        new_items = torch.randn(n_new_items, dim, generator=generator, dtype=dtype) * std
        return new_users.to(device), new_items.to(device)

    with torch.no_grad():
        user_table = old_user_emb[:n_old_users].detach()
        item_table = old_item_emb[:n_old_items].detach().to(dtype)
        by_user = _binary_csr(interactions)
        by_item = by_user.T.tocsr()
        new_users = _init_side(
            by_user, user_table, item_table, n_old_users, n_old_items, tau, mode, chunk_size
        )
        new_items = _init_side(
            by_item, item_table, user_table, n_old_items, n_old_users, tau, mode, chunk_size
        )
    return new_users, new_items


# ---------------------------------------------------------------------------------------------
# 2. Exponential moving average of embedding tables
# ---------------------------------------------------------------------------------------------


def ema_table(previous: Tensor, current: Tensor, beta: float, n_previous_rows: int) -> Tensor:
    r"""Mix an older embedding table into a newer one, row by row.

    Rows ``< n_previous_rows`` become ``beta * previous + (1 - beta) * current``; the other rows
    (entities that did not exist in the older table) are copied from ``current``.

    Args:
        previous: older table ``[>= n_previous_rows, d]``; only its first ``n_previous_rows``
            rows are used.
        current: newer table ``[n_rows, d]`` with ``n_rows >= n_previous_rows``.
        beta: weight of the older table.
        n_previous_rows: number of rows shared by both tables.

    Returns:
        A new tensor ``[n_rows, d]``; neither input is modified.
    """
    if n_previous_rows > previous.shape[0] or n_previous_rows > current.shape[0]:
        raise ValueError("n_previous_rows exceeds the number of rows of a table")
    if previous.shape[1:] != current.shape[1:]:
        raise ValueError(f"shape mismatch: {tuple(previous.shape)} vs {tuple(current.shape)}")
    old = previous[:n_previous_rows].to(current)
    mixed = beta * old + (1.0 - beta) * current[:n_previous_rows]
    return torch.cat([mixed, current[n_previous_rows:].clone()], dim=0)


# ---------------------------------------------------------------------------------------------
# 3. Structure distillation (contrastive KD from a model's own previous embeddings)
# ---------------------------------------------------------------------------------------------


def neighbour_lists(matrix: sp.spmatrix, k: int = 10, chunk_size: int = 2048) -> Tensor:
    r"""The ``k`` most cosine-similar other rows of a binary interaction matrix.

    Similarity is the cosine between binary rows, ``|N(a) & N(b)| / sqrt(|N(a)| |N(b)|)``.
    Only neighbours with similarity ``> 0`` are kept, the row itself is excluded, and ties
    are broken by the lower id. Rows are processed in chunks of ``chunk_size`` with sparse
    products, so no dense ``n_rows x n_rows`` matrix is built (a chunk's product is
    ``[chunk_size, n_rows]`` sparse and can be large for very popular columns; lower
    ``chunk_size`` to bound memory).

    A fixed ``k`` replaces a threshold on the similarity searched so that the average degree
    is about 10: every row gets (up to) ``k`` neighbours instead of an average of ``k``.

    Args:
        matrix: sparse ``[n_rows, n_cols]``; any non-zero counts as an interaction.
        k: number of neighbours per row.
        chunk_size: number of rows handled per sparse product.

    Returns:
        LongTensor ``[n_rows, k]`` of row ids, most similar first, padded with ``-1``. Rows
        without interactions get only ``-1``.
    """
    binary = _binary_csr(matrix)
    n_rows = binary.shape[0]
    out = np.full((n_rows, k), -1, dtype=np.int64)
    if k <= 0 or n_rows == 0:
        return torch.from_numpy(out)
    norms = np.sqrt(np.diff(binary.indptr).astype(np.float64))
    transposed = binary.T.tocsr()

    for start in range(0, n_rows, chunk_size):
        stop = min(n_rows, start + chunk_size)
        overlap = (binary[start:stop] @ transposed).tocsr()  # shared-column counts
        lengths = np.diff(overlap.indptr)
        rows = np.repeat(np.arange(stop - start, dtype=np.int64), lengths)
        cols = overlap.indices.astype(np.int64)
        sims = overlap.data / (norms[rows + start] * norms[cols])
        sims[cols == rows + start] = 0.0  # the row itself is not a neighbour
        keep = sims > 0

        # Cheap pre-selection: in rows with more than k entries, drop everything below the
        # k-th largest similarity (ties at that value survive and are resolved below).
        for row in np.flatnonzero(lengths > k):
            segment = slice(overlap.indptr[row], overlap.indptr[row + 1])
            values = sims[segment]
            keep[segment] &= values >= np.partition(values, len(values) - k)[len(values) - k]
        rows, cols, sims = rows[keep], cols[keep], sims[keep]

        # Sort by row, then similarity (descending), then id; keep the first k of each row.
        order = np.lexsort((cols, -sims, rows))
        rows, cols = rows[order], cols[order]
        rank = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
        top = rank < k
        out[rows[top] + start, rank[top]] = cols[top]
    return torch.from_numpy(out)


def contrastive_kd_loss(
    anchor_old: Tensor, candidates_now: Tensor, positives: Tensor, temperature: float = 5.0
) -> Tensor:
    r"""Contrastive distillation loss of frozen anchors against current candidates.

    For anchor ``a`` the logits over the candidates are
    ``z_v = anchor_old[a] . candidates_now[v] / temperature`` and the loss is the mean over
    the valid positives ``p`` of ``-log softmax(z)_p``.

    Args:
        anchor_old: frozen anchor embeddings ``[B, d]``.
        candidates_now: current candidate embeddings ``[V, d]``.
        positives: indices into the candidates ``[B, P]``, ``-1`` for padding.
        temperature: softmax temperature.

    Returns:
        Tensor ``[B]``; ``0`` for anchors without a valid positive.
    """
    logits = anchor_old @ candidates_now.T / temperature  # [B, V]
    log_probs = torch.log_softmax(logits, dim=1)
    valid = positives >= 0
    picked = torch.gather(log_probs, 1, positives.clamp(min=0))  # [B, P]
    picked = torch.where(valid, picked, torch.zeros_like(picked))
    n_valid = valid.sum(dim=1).clamp(min=1).to(picked.dtype)
    return -picked.sum(dim=1) / n_valid


def _capped_lists(
    matrix: sp.csr_matrix,
    rows: np.ndarray,
    col_positions: np.ndarray,
    cap: int,
    rng: np.random.Generator,
) -> np.ndarray:
    r"""Per-row column lists, randomly capped at ``cap`` entries and padded with ``-1``.

    Args:
        matrix: binary CSR ``[n_rows, n_cols]``.
        rows: the rows to list ``[R]``.
        col_positions: map from column id to the value stored in the list ``[n_cols]``.
        cap: maximum list length; longer rows keep a uniform random subset.
        rng: numpy generator used for the subsets.

    Returns:
        Array ``[R, P]`` with ``P = max(1, min(cap, longest row))``.
    """
    sub = matrix[rows]
    lengths = np.diff(sub.indptr)
    width = max(1, min(cap, int(lengths.max(initial=0))))
    out = np.full((len(rows), width), -1, dtype=np.int64)
    indices = sub.indices.astype(np.int64)
    for row in np.flatnonzero(lengths > cap):
        segment = slice(sub.indptr[row], sub.indptr[row + 1])
        indices[segment] = rng.permutation(indices[segment])
    row_of = np.repeat(np.arange(len(rows)), lengths)
    rank = np.arange(len(indices)) - sub.indptr[row_of]
    keep = rank < cap
    out[row_of[keep], rank[keep]] = col_positions[indices[keep]]
    return out


def _remap(positions: Tensor, mapping: Optional[Tensor]) -> Tensor:
    r"""Map candidate positions through ``mapping`` (``None`` = identity), keeping ``-1``."""
    if mapping is None:
        return positions
    mapped = mapping[positions.clamp(min=0)]
    return torch.where(positions >= 0, mapped, torch.full_like(mapped, -1))


class StructureDistiller:
    r"""Structure-preserving contrastive distillation from a model's previous-stage embeddings.

    Built once per stage from the frozen embeddings the model had at the end of the previous
    stage and that stage's training interactions. For a mini-batch, every batch user ``u``
    that had interactions in the previous stage contributes ``L_UI(u) + L_UU(u)`` and every
    such batch item ``i`` contributes ``L_IU(i) + L_II(i)``, each term a
    :func:`contrastive_kd_loss` with the frozen old embedding as anchor:

    ========  ================================  =======================================
    term      candidates (current embeddings)   positives
    ========  ================================  =======================================
    ``L_UI``  old items ``V_I``                 the user's previous-stage items
    ``L_UU``  old users ``V_U``                 the user's user-user neighbours
    ``L_IU``  old users ``V_U``                 the item's previous-stage users
    ``L_II``  old items ``V_I``                 the item's item-item neighbours
    ========  ================================  =======================================

    ``V_U`` / ``V_I`` are the users / items with at least one previous-stage interaction.
    The loss is the batch mean of the user terms plus the batch mean of the item terms
    (duplicates in the batch count as often as they appear). Users and items absent from
    the previous stage (new ones, padding) contribute nothing. Anchors are looked up by raw
    global id; positions in ``V_U`` / ``V_I`` are only used for the candidate sets.

    Approximations and omissions:

    * Neighbour graphs keep the top-``k`` cosine neighbours (:func:`neighbour_lists`).
    * Positive lists are capped at ``max_positives`` entries, chosen at random once.
    * Sampled softmax: when ``|V| > max_candidates`` the softmax runs over a random subset
      of ``max_candidates`` candidates that always contains every positive of the batch
      (more if the batch needs more), without correction for the sampling. The loss is
      then a lower estimate of the full-softmax loss; it is exact when
      ``|V| <= max_candidates``.
    * Personalised imitation weights (a learned per-user weight on ``L_UI`` / ``L_UU``)
      and the clustering loss on item embeddings are left out: every user has weight 1.

    For a LightGCN model, build one distiller per propagation layer that should be
    preserved (with that layer's frozen embeddings) and average their losses.

    Args:
        old_user_emb: previous-stage user embeddings ``[n_users_old, d]`` (copied, frozen).
        old_item_emb: previous-stage item embeddings ``[n_items_old, d]`` (copied, frozen).
        previous_interactions: previous stage's training pairs, sparse with global ids; its
            non-zeros must lie within ``[n_users_old, n_items_old]``.
        k: neighbours per user / item in the similarity graphs.
        temperature: softmax temperature.
        max_positives: cap on each user's item list and each item's user list.
        max_candidates: largest candidate set used without sampling.
        seed: seed of the positive capping and the candidate sampling.
        chunk_size: rows per sparse product when building the neighbour graphs.
    """

    def __init__(
        self,
        old_user_emb: Tensor,
        old_item_emb: Tensor,
        previous_interactions: sp.spmatrix,
        k: int = 10,
        temperature: float = 5.0,
        max_positives: int = 50,
        max_candidates: int = 4096,
        seed: int = 0,
        chunk_size: int = 2048,
    ) -> None:
        self.device = old_user_emb.device
        self.old_user_emb = old_user_emb.detach().clone()
        self.old_item_emb = old_item_emb.detach().clone().to(self.device)
        self.n_users_old, self.n_items_old = old_user_emb.shape[0], old_item_emb.shape[0]
        self.temperature = temperature
        self.max_candidates = max_candidates
        self._generator = torch.Generator().manual_seed(seed)

        matrix = self._fit_to_old_tables(previous_interactions)
        by_item = matrix.T.tocsr()
        users = np.flatnonzero(np.diff(matrix.indptr) > 0)
        items = np.flatnonzero(np.diff(by_item.indptr) > 0)
        user_pos = np.full(self.n_users_old, -1, dtype=np.int64)
        user_pos[users] = np.arange(len(users))
        item_pos = np.full(self.n_items_old, -1, dtype=np.int64)
        item_pos[items] = np.arange(len(items))

        rng = np.random.default_rng(seed)
        ui = _capped_lists(matrix, users, item_pos, max_positives, rng)
        iu = _capped_lists(by_item, items, user_pos, max_positives, rng)

        # Neighbours have similarity > 0, hence at least one interaction: they lie in V.
        uu = neighbour_lists(matrix, k, chunk_size).numpy()[users]
        ii = neighbour_lists(by_item, k, chunk_size).numpy()[items]
        uu = np.where(uu >= 0, user_pos[np.maximum(uu, 0)], -1)
        ii = np.where(ii >= 0, item_pos[np.maximum(ii, 0)], -1)

        def to_tensor(array: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

        self.users, self.items = to_tensor(users), to_tensor(items)  # V_U [|V_U|], V_I [|V_I|]
        self.user_pos, self.item_pos = to_tensor(user_pos), to_tensor(item_pos)  # global -> pos
        self.ui_pos, self.iu_pos = to_tensor(ui), to_tensor(iu)  # [|V_U|, P], [|V_I|, P]
        self.uu_pos, self.ii_pos = to_tensor(uu), to_tensor(ii)  # [|V_U|, k], [|V_I|, k]

    def _fit_to_old_tables(self, interactions: sp.spmatrix) -> sp.csr_matrix:
        r"""Binary CSR ``[n_users_old, n_items_old]`` with the non-zeros of ``interactions``."""
        coo = _binary_csr(interactions).tocoo()
        if coo.nnz and (coo.row.max() >= self.n_users_old or coo.col.max() >= self.n_items_old):
            raise ValueError("previous interactions reference ids beyond the old tables")
        return sp.csr_matrix(
            (coo.data, (coo.row, coo.col)), shape=(self.n_users_old, self.n_items_old)
        )

    def to(self, device: torch.device) -> "StructureDistiller":
        r"""Move every stored tensor to ``device`` and return ``self``."""
        self.device = torch.device(device)
        for name in (
            "old_user_emb", "old_item_emb", "users", "items", "user_pos", "item_pos",
            "ui_pos", "iu_pos", "uu_pos", "ii_pos",
        ):
            setattr(self, name, getattr(self, name).to(self.device))
        return self

    def _positions(self, ids: Tensor, table: Tensor) -> Tensor:
        r"""Positions in ``V`` of the batch ids that belong to ``V`` (others dropped)."""
        ids = ids.reshape(-1).to(device=self.device, dtype=torch.long)
        ids = ids[(ids >= 0) & (ids < table.shape[0])]
        positions = table[ids]
        return positions[positions >= 0]

    def _sample_candidates(self, size: int, required: Tensor) -> Optional[Tensor]:
        r"""Candidate subset for a set ``V`` of ``size`` entries.

        Args:
            size: ``|V|``.
            required: positions in ``V`` that must be candidates (``-1`` entries ignored).

        Returns:
            ``None`` when all of ``V`` is used, else a map ``[size]`` from position in ``V``
            to position in the subset (``-1`` if not sampled); the subset is the set of
            positions whose map is non-negative, in the map's order.
        """
        if size <= self.max_candidates:
            return None
        keys = torch.rand(size, generator=self._generator).to(self.device)
        required = required[required >= 0]
        keys[required] = 2.0  # above every uniform key: always kept
        n_keep = max(self.max_candidates, int((keys > 1.0).sum()))
        chosen = torch.topk(keys, n_keep).indices.sort().values
        mapping = torch.full((size,), -1, dtype=torch.long, device=self.device)
        mapping[chosen] = torch.arange(n_keep, device=self.device)
        return mapping

    def _candidates(self, emb_now: Tensor, ids: Tensor, mapping: Optional[Tensor]) -> Tensor:
        r"""Current embeddings ``[V', d]`` of the candidate subset of ``ids`` (``V`` ids)."""
        if mapping is None:
            return emb_now[ids]
        return emb_now[ids[mapping >= 0]]

    def loss(
        self,
        user_emb_now: Tensor,
        item_emb_now: Tensor,
        batch_users: Tensor,
        batch_items: Tensor,
    ) -> Tensor:
        r"""Structure distillation loss of a mini-batch.

        Args:
            user_emb_now: current user embeddings ``[n_users, d]``, ``n_users >= n_users_old``.
            item_emb_now: current item embeddings ``[n_items, d]``, ``n_items >= n_items_old``.
            batch_users: global user ids of the batch ``[B_u]`` (any ids; new ones ignored).
            batch_items: global item ids of the batch ``[B_i]``.

        Returns:
            Scalar tensor. It is an exact zero connected to both embedding tables when no
            batch entity existed in the previous stage, so ``backward`` always works.
        """
        loss = user_emb_now[:0].sum() + item_emb_now[:0].sum()
        users = self._positions(batch_users, self.user_pos)  # positions in V_U [B_u']
        items = self._positions(batch_items, self.item_pos)  # positions in V_I [B_i']
        if users.numel() == 0 and items.numel() == 0:
            return loss

        ui, uu = self.ui_pos[users], self.uu_pos[users]
        iu, ii = self.iu_pos[items], self.ii_pos[items]
        item_map = self._sample_candidates(len(self.items), torch.cat([ui.ravel(), ii.ravel()]))
        user_map = self._sample_candidates(len(self.users), torch.cat([uu.ravel(), iu.ravel()]))
        item_candidates = self._candidates(item_emb_now, self.items, item_map)
        user_candidates = self._candidates(user_emb_now, self.users, user_map)

        if users.numel() > 0:
            anchor = self.old_user_emb[self.users[users]].to(user_emb_now.dtype)
            l_ui = contrastive_kd_loss(
                anchor, item_candidates, _remap(ui, item_map), self.temperature
            )
            l_uu = contrastive_kd_loss(
                anchor, user_candidates, _remap(uu, user_map), self.temperature
            )
            loss = loss + (l_ui + l_uu).mean()
        if items.numel() > 0:
            anchor = self.old_item_emb[self.items[items]].to(item_emb_now.dtype)
            l_iu = contrastive_kd_loss(
                anchor, user_candidates, _remap(iu, user_map), self.temperature
            )
            l_ii = contrastive_kd_loss(
                anchor, item_candidates, _remap(ii, item_map), self.temperature
            )
            loss = loss + (l_iu + l_ii).mean()
        return loss
