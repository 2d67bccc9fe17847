"""Backbones usable as teachers, students and stream baselines: MF and LightGCN.

Both keep tables for every user and item id of the dataset, but only the rows seen so far
are trained, scored and counted as parameters: ids follow first appearance in time, so
"seen up to stage k" is a prefix ``[0, n_users_seen)`` of the table. A model moves to a new
stage with :meth:`StreamRecommender.set_stage`, which also initialises the new rows.
"""

from __future__ import annotations

import warnings

from recbole_ccd import compat  # noqa: F401

import numpy as np
import scipy.sparse as sp
import torch
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.model.loss import BPRLoss, EmbLoss
from recbole.utils import InputType
from torch import nn


class StreamRecommender(GeneralRecommender):
    r"""Base class of the plugin's backbones: embeddings, stage bookkeeping and scoring.

    Subclasses implement :meth:`propagate`, which maps the layer-0 tables to the final user
    and item representations ``([user_num, d], [item_num, d])``; scores are inner products.
    """

    input_type = InputType.PAIRWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.embedding_size = config["embedding_size"]
        self.reg_weight = config["reg_weight"] or 0.0
        self.init_std = config["init_std"] or 0.01

        self.user_embedding = nn.Embedding(self.n_users, self.embedding_size)
        self.item_embedding = nn.Embedding(self.n_items, self.embedding_size)
        nn.init.normal_(self.user_embedding.weight, std=self.init_std)
        nn.init.normal_(self.item_embedding.weight, std=self.init_std)
        self.loss = BPRLoss()
        self.reg_loss = EmbLoss()

        self.n_users_seen = self.n_users
        self.n_items_seen = self.n_items
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- stage bookkeeping -------------------------------------------------------------
    def set_stage(self, n_users_seen: int, n_items_seen: int,
                  train_matrix: sp.csr_matrix | None = None, init_new_rows: bool = True) -> None:
        """Move to a stage: rows in ``[old seen, new seen)`` get a fresh N(0, init_std²) draw.

        ``train_matrix`` is the binary [user_num, item_num] matrix of the interactions the
        model trains on in this stage (the LightGCN graph).
        """
        if init_new_rows:
            with torch.no_grad():
                for table, old, new in ((self.user_embedding, self._seen_before(True),
                                         n_users_seen),
                                        (self.item_embedding, self._seen_before(False),
                                         n_items_seen)):
                    if new > old:
                        table.weight[old:new].normal_(std=self.init_std)
        self.n_users_seen, self.n_items_seen = n_users_seen, n_items_seen
        self._stage_started = True
        self._cache = None

    def _seen_before(self, users: bool) -> int:
        if not getattr(self, "_stage_started", False):
            return 0
        return self.n_users_seen if users else self.n_items_seen

    def parameter_count(self) -> int:
        """Parameters in use: (users seen + items seen) x embedding size.

        RecBole's padding id 0 is not counted.
        """
        return (self.n_users_seen - 1 + self.n_items_seen - 1) * self.embedding_size

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    # -- representations ---------------------------------------------------------------
    def propagate(self, user_emb: torch.Tensor, item_emb: torch.Tensor):
        raise NotImplementedError

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final ``(user [user_num, d], item [item_num, d])`` representations.

        In evaluation mode they are computed once without gradients and cached until the
        weights may change (``train()``, ``set_stage``, ``load_state_dict``).
        """
        if not self.training and self._cache is not None:
            return self._cache
        if self.training:
            return self.propagate(self.user_embedding.weight, self.item_embedding.weight)
        with torch.no_grad():
            user_all, item_all = self.propagate(self.user_embedding.weight,
                                                self.item_embedding.weight)
        self._cache = (user_all, item_all)
        return self._cache

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """Scores ``[len(users), item_num]`` of every item for ``users``."""
        user_all, item_all = self.forward()
        return user_all[users] @ item_all.T

    # -- RecBole interface ---------------------------------------------------------------
    def calculate_loss(self, interaction):
        user = interaction[self.USER_ID]
        pos_item = interaction[self.ITEM_ID]
        neg_item = interaction[self.NEG_ITEM_ID]
        user_all, item_all = self.forward()
        u, pos, neg = user_all[user], item_all[pos_item], item_all[neg_item]
        loss = self.loss((u * pos).sum(-1), (u * neg).sum(-1))
        if self.reg_weight:
            loss = loss + self.reg_weight * self.reg_loss(
                self.user_embedding(user), self.item_embedding(pos_item),
                self.item_embedding(neg_item))
        return loss

    def predict(self, interaction):
        user_all, item_all = self.forward()
        return (user_all[interaction[self.USER_ID]] * item_all[interaction[self.ITEM_ID]]).sum(-1)

    def full_sort_predict(self, interaction):
        return self.score_users(interaction[self.USER_ID]).view(-1)


class MF(StreamRecommender):
    r"""Matrix factorisation trained with BPR: score = e_u · e_i."""

    def propagate(self, user_emb, item_emb):
        return user_emb, item_emb


def normalized_adjacency(matrix: sp.csr_matrix) -> torch.Tensor:
    r"""Symmetrically normalised bipartite adjacency D^-1/2 [[0, R], [R^T, 0]] D^-1/2.

    Args:
        matrix: binary [n_users, n_items] interactions.

    Returns:
        A sparse csr tensor ``[n_users + n_items, n_users + n_items]``.
    """
    n_users, n_items = matrix.shape
    coo = matrix.tocoo()
    rows = np.concatenate([coo.row, coo.col + n_users])
    cols = np.concatenate([coo.col + n_users, coo.row])
    degree = np.bincount(rows, minlength=n_users + n_items).astype(np.float64)
    inv_sqrt = np.zeros_like(degree)
    inv_sqrt[degree > 0] = degree[degree > 0] ** -0.5
    values = (inv_sqrt[rows] * inv_sqrt[cols]).astype(np.float32)
    adjacency = sp.csr_matrix((values, (rows, cols)), shape=(n_users + n_items,) * 2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(
            torch.from_numpy(adjacency.indptr.astype(np.int64)),
            torch.from_numpy(adjacency.indices.astype(np.int64)),
            torch.from_numpy(adjacency.data),
            size=adjacency.shape,
        )


class _SymmetricSparseMM(torch.autograd.Function):
    """``A @ x`` for a symmetric sparse ``A``; the backward pass reuses ``A`` (= A^T).

    Saves the transposition torch would otherwise do for a sparse csr backward.
    """

    @staticmethod
    def forward(ctx, adjacency, dense):
        ctx.adjacency = adjacency
        return adjacency @ dense

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.adjacency @ grad


class _Shared:
    """A value that deep copies share: the graph is replaced, never changed in place, and
    sparse csr tensors cannot be deep-copied."""

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


class LightGCN(StreamRecommender):
    r"""LightGCN over the graph of the interactions of the current stage only.

    The final representation is the mean of layers 0..L of
    e^{(l+1)} = D^-1/2 A D^-1/2 e^{(l)}. A user absent from the stage's graph propagates to
    zero, so its representation is e^{(0)} / (L + 1). Built with ``scipy.sparse.coo/csr``
    (RecBole's own LightGCN needs ``dok_matrix`` internals that scipy >= 1.13 removed).
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.n_layers = config["n_layers"]
        self._graph = _Shared(None)
        self.set_graph(dataset.inter_matrix(form="csr").astype(np.float32))

    def set_graph(self, matrix: sp.csr_matrix) -> None:
        """Use ``matrix`` (binary [user_num, item_num]) as the propagation graph."""
        binary = matrix.copy().tocsr()
        binary.data[:] = 1.0
        self._graph = _Shared(normalized_adjacency(binary).to(self.device))
        self._graph_source = _Shared(matrix)
        self._cache = None

    @property
    def graph_matrix(self) -> sp.csr_matrix:
        """The matrix last given to :meth:`set_graph` (that object itself, not a copy), so a
        checkpoint can name the stage whose training pairs form the graph."""
        return self._graph_source.value

    @property
    def adjacency(self) -> torch.Tensor:
        """Normalised adjacency of the current graph, sparse csr [user_num + item_num]^2."""
        return self._graph.value

    def set_stage(self, n_users_seen, n_items_seen, train_matrix=None, init_new_rows=True):
        super().set_stage(n_users_seen, n_items_seen, train_matrix, init_new_rows)
        if train_matrix is not None:
            self.set_graph(train_matrix)

    def propagate(self, user_emb, item_emb):
        layer = torch.cat([user_emb, item_emb])
        total = layer
        for _ in range(self.n_layers):
            layer = _SymmetricSparseMM.apply(self.adjacency, layer)
            total = total + layer
        final = total / (self.n_layers + 1)
        return final[: self.n_users], final[self.n_users:]

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        if getattr(self, "_graph", None) is not None and self._graph.value is not None:
            self._graph = _Shared(fn(self._graph.value))
        return result
