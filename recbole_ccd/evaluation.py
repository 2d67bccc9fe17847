"""Evaluation along the stream: RecBole's collector and metrics over per-stage loaders.

After learning stage k a model is evaluated on the test split of every stage j <= k, which
fills the lower-triangular matrix r[k][j]. Per incremental stage k >= 1:

* LA_k (learning average) = r[k][k], how well stage k itself was learned (plasticity);
* RA_k (retained average) = mean over j < k of r[k][j], what is kept of earlier stages
  (stability);
* H-mean_k = 2 * LA_k * RA_k / (LA_k + RA_k).

The stream summary is LA = mean_k LA_k, RA = mean_k RA_k over k >= 1, and their harmonic
mean.
"""

from __future__ import annotations

from typing import Callable

from recbole_ccd import compat  # noqa: F401

import torch
from recbole.config import Config
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.data.interaction import Interaction
from recbole.evaluator import Collector, Evaluator

Scorer = Callable[[Interaction], torch.Tensor]
"""Maps a batch of users to scores ``[n_users_in_batch, item_num]`` over all item ids.

The returned tensor must be fresh: evaluation masks it in place."""


def mask_scores(
    scores: torch.Tensor, history_index: tuple[torch.Tensor, torch.Tensor] | None,
    n_items_seen: int,
) -> torch.Tensor:
    """Set padding, not-yet-seen items and the users' masked history to -inf, in place."""
    scores[:, 0] = -torch.inf
    scores[:, n_items_seen:] = -torch.inf
    if history_index is not None:
        scores[history_index] = -torch.inf
    return scores


# What RecBole's collector may be asked for when only top-k metrics (Recall, NDCG, Hit,
# MRR, MAP, Precision) are computed; with anything else the scores are passed on whole.
_FULL_ROW_RESOURCES = ("rec.items", "rec.meanrank", "rec.score", "data.label")


def topk_only(collector: Collector) -> bool:
    """Whether ``collector`` reads nothing of a score row beyond its top items and positives."""
    return not any(collector.register.need(key) for key in _FULL_ROW_RESOURCES)


def reduce_to_candidates(
    scores: torch.Tensor, positive_u: torch.Tensor, positive_i: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink a score batch to what top-``k`` metrics read: each row's top ``k`` items, then
    its positive items (only the order of the scores survives, not their values).

    RecBole's collector builds a dense int matrix of the batch's positives and sums it per
    row; on a catalogue of 41k items that costs more than scoring. On the reduced rows the
    collector finds the same top ``k`` (the columns ``< k``, in the order of
    ``torch.topk(scores, k)``, which is what it computes on a full row) and the same positives,
    so every top-k metric is unchanged. A positive outside the top ``k`` keeps its
    column but scores -inf: with its own score it could tie with the ``k``-th item and
    displace it, which the full row's top ``k`` did not do.

    Args:
        scores: ``[B, n_items]`` masked scores.
        positive_u, positive_i: row and item of every positive pair ``[P]``.

    Returns:
        ``(reduced [B, k + max positives per row], positive column [P])``: a positive inside
        its row's top ``k`` points at that column, any other at its own column after the top
        ``k``; every column after the top ``k`` is -inf.
    """
    n_rows = scores.shape[0]
    _, top_index = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    k = top_index.shape[1]
    positive_u, positive_i = positive_u.to(scores.device), positive_i.to(scores.device)
    order = torch.argsort(positive_u, stable=True)
    rows, items = positive_u[order], positive_i[order]
    counts = torch.bincount(rows, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows), device=scores.device) - starts[rows]
    width = int(counts.max()) if len(rows) else 0

    reduced = torch.full((n_rows, k + width), -torch.inf, device=scores.device,
                         dtype=scores.dtype)
    # Strictly decreasing stand-ins keep the top k's order where scores tie (the collector's
    # own top k of a row with ties could list them in another order).
    reduced[:, :k] = torch.arange(k, 0, -1, device=scores.device, dtype=scores.dtype)
    in_top = top_index[rows] == items[:, None]          # [P, k]
    hit = in_top.any(dim=1)
    column = torch.where(hit, in_top.float().argmax(dim=1), k + slot)
    positive_column = torch.empty_like(column)
    positive_column[order] = column
    return reduced, positive_column


@torch.no_grad()
def evaluate_scorer(
    scorer: Scorer, loader: FullSortEvalDataLoader, config: Config, n_items_seen: int
) -> dict[str, float]:
    """Full-sort evaluation of ``scorer`` on one loader with RecBole's metrics.

    Items with id >= ``n_items_seen`` (not yet seen by the model) are never ranked; the
    loader supplies the history to mask (the stage's train items, plus its valid items for a
    test loader).
    """
    collector = Collector(config)
    evaluator = Evaluator(config)
    device = config["device"]
    reduce = topk_only(collector)
    for interaction, history_index, positive_u, positive_i in loader:
        scores = scorer(interaction.to(device)).view(len(interaction), -1).float()
        scores = mask_scores(scores, history_index, n_items_seen)
        if reduce:
            scores, positive_i = reduce_to_candidates(scores, positive_u, positive_i,
                                                      max(config["topk"]))
        collector.eval_batch_collect(scores, interaction, positive_u, positive_i)
    result = evaluator.evaluate(collector.get_data_struct())
    return {key: float(value) for key, value in result.items()}


def model_scorer(model: torch.nn.Module) -> Scorer:
    """Scorer of a RecBole model through its ``full_sort_predict``.

    Models without one are scored with ``predict`` on every (user, item) pair, as RecBole's
    trainer does.
    """

    def score(interaction: Interaction) -> torch.Tensor:
        try:
            return model.full_sort_predict(interaction).view(len(interaction), -1)
        except NotImplementedError:
            users = interaction[model.USER_ID]
            items = torch.arange(model.n_items, device=users.device)
            pairs = Interaction({model.USER_ID: users.repeat_interleave(model.n_items),
                                 model.ITEM_ID: items.repeat(len(users))})
            return model.predict(pairs).view(len(users), -1)

    return score


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class StreamResults:
    """The r[k][j] matrices per role (``model``, ``student``, ``teacher``) and metric."""

    def __init__(self) -> None:
        self.matrix: dict[str, dict[str, list[list[float]]]] = {}
        self.new_users: dict[str, dict[str, list[float | None]]] = {}

    def add_row(self, role: str, stage: int, row: list[dict[str, float]],
                new_users: dict[str, float] | None) -> None:
        """Store the evaluation after ``stage`` on the test split of stages 0..stage."""
        matrices = self.matrix.setdefault(role, {})
        for metric in row[0]:
            rows = matrices.setdefault(metric, [])
            del rows[stage:]
            rows.append([r[metric] for r in row])
        new = self.new_users.setdefault(role, {})
        for metric in row[0]:
            values = new.setdefault(metric, [])
            del values[stage:]
            values.extend([None] * (stage - len(values)))
            values.append(None if new_users is None else new_users[metric])

    def summary(self, role: str) -> dict:
        """LA, RA and H-mean per incremental stage and over the stream, per metric."""
        out: dict = {"LA": {}, "RA": {}, "H-mean": {}, "per_stage": {}}
        for metric, rows in self.matrix[role].items():
            la = [rows[k][k] for k in range(1, len(rows))]
            ra = [_mean(rows[k][:k]) for k in range(1, len(rows))]
            out["per_stage"][metric] = {
                "LA": la, "RA": ra, "H-mean": [harmonic_mean(a, b) for a, b in zip(la, ra)],
            }
            out["LA"][metric] = _mean(la)
            out["RA"][metric] = _mean(ra)
            out["H-mean"][metric] = harmonic_mean(out["LA"][metric], out["RA"][metric])
        return out

    def to_dict(self) -> dict:
        return {
            role: {"matrix": self.matrix[role], "new_users": self.new_users[role],
                   **self.summary(role)}
            for role in self.matrix
        }

    @classmethod
    def from_dict(cls, data: dict) -> "StreamResults":
        results = cls()
        for role, body in data.items():
            results.matrix[role] = {m: [list(r) for r in rows]
                                    for m, rows in body["matrix"].items()}
            results.new_users[role] = {m: list(v) for m, v in body["new_users"].items()}
        return results


def format_row(role: str, stage: int, row: list[dict[str, float]], metrics: list[str]) -> str:
    """One readable line block: the stage's results on every earlier stage."""
    header = f"{role:>8} after stage {stage}: " + "  ".join(
        f"{m}" for m in metrics)
    lines = [header]
    for j, result in enumerate(row):
        values = "  ".join(f"{result[m]:.4f}".rjust(len(m)) for m in metrics)
        lines.append(f"{'':>8}   on stage {j}: {values}")
    return "\n".join(lines)
