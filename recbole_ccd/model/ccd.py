"""CCD as a RecBole model class: a teacher system of several backbones and a compact student.

The model holds the pieces; :class:`recbole_ccd.trainer.ccd.CCDLearner` runs them along the
stream. ``full_sort_predict`` serves the student, the model that would answer users;
:meth:`CCD.teacher_scores` serves the teacher system's ensemble.
"""

from __future__ import annotations

from typing import Any

from recbole_ccd import compat  # noqa: F401

import torch
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.utils import InputType
from torch import nn

from recbole_ccd.config import check_positive_ints
from recbole_ccd.errors import StreamConfigError
from recbole_ccd.model.backbones import LightGCN, MF, StreamRecommender
from recbole_ccd.model.ranking import estimated_ranks, rank_transform, row_mean_var

# TODO: Mult-VAE teachers (the paper's Gowalla system has two) need a user-side table for
# growth, initialisation and structure distillation; an adapter exposing the encoder's
# item weights and a per-user latent table would let them join.
BACKBONES: dict[str, type[StreamRecommender]] = {"MF": MF, "LightGCN": LightGCN}


class ConfigView:
    """Read-only view of a RecBole config with some keys overridden (one backbone's spec)."""

    def __init__(self, config: Any, overrides: dict[str, Any]):
        self._config = config
        self._overrides = overrides

    def __getitem__(self, key: str) -> Any:
        if key in self._overrides:
            return self._overrides[key]
        return self._config[key]

    def __contains__(self, key: str) -> bool:
        return key in self._overrides or key in self._config


def check_spec(spec: Any, where: str) -> dict[str, Any]:
    """Validate one backbone spec ``{model, embedding_size, n_layers, seed}``."""
    if not isinstance(spec, dict) or spec.get("model") not in BACKBONES:
        raise StreamConfigError(
            f"{where}: each backbone needs 'model' in {sorted(BACKBONES)}, got {spec!r}.")
    size = spec.get("embedding_size")
    if not isinstance(size, int) or size <= 0:
        raise StreamConfigError(f"{where}: embedding_size must be a positive integer: {spec!r}.")
    return {"n_layers": 2, "seed": 0, **spec}


CCD_MODES = ("ccd", "distil_once")
INIT_KINDS = ("random", "one_hop", "multi_hop")
GRAPH_SCOPES = ("stage", "history")


def validate_ccd_config(config: Any) -> None:
    """Check CCD's own settings before any data is read; raise with what to fix."""
    if config["ccd_mode"] not in CCD_MODES:
        raise StreamConfigError(
            f"ccd_mode must be one of {CCD_MODES}, got {config['ccd_mode']!r}.")
    if config["ccd_graph"] not in GRAPH_SCOPES:
        raise StreamConfigError(
            f"ccd_graph must be one of {GRAPH_SCOPES}, got {config['ccd_graph']!r}.")
    if config["init_kind"] not in INIT_KINDS:
        raise StreamConfigError(
            f"init_kind must be one of {INIT_KINDS}, got {config['init_kind']!r}.")
    check_positive_ints(config, ("teacher_epochs", "distill_epochs", "update_epochs",
                                 "teacher_batch_size", "distill_batch_size",
                                 "update_batch_size", "ccd_chunk_size"))
    teachers = config["teachers"]
    if not isinstance(teachers, list) or not teachers:
        raise StreamConfigError("teachers must be a non-empty list of backbone specs.")
    for spec in teachers:
        check_spec(spec, "teachers")
    check_spec(config["student"], "student")


def build_backbone(config: Any, dataset: Any, spec: dict[str, Any]) -> StreamRecommender:
    """A backbone from a spec; its seed fixes the initial weights."""
    spec = check_spec(spec, "backbone")
    devices = [torch.device(config["device"])] if torch.device(config["device"]).type == "cuda" \
        else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec["seed"])
        view = ConfigView(config, {"embedding_size": spec["embedding_size"],
                                   "n_layers": spec["n_layers"], "reg_weight": 0.0})
        return BACKBONES[spec["model"]](view, dataset)


def approximate_rank_transform(
    scores: torch.Tensor, exact_top: int, exponent: float = 0.05, *,
    row_scores: torch.Tensor | None = None, top_values: torch.Tensor | None = None,
    n: int | None = None,
) -> torch.Tensor:
    """(rank + 1)^-exponent with exact ranks for each row's top ``exact_top`` items only.

    A full sort of every row costs about 1.3 s per 256 users x 41k items on 2 CPU cores,
    which dominates a large catalogue. Below the top ``exact_top`` the weight is nearly flat
    ((201)^-0.05 = 0.77, (40001)^-0.05 = 0.59), so there the rank is estimated from the
    score's z-value within the row under a normal approximation, rank ~ n * (1 - Phi(z)),
    with a logistic approximation of Phi, clamped to at least ``exact_top``. The order
    inside the exact top is never changed.

    Args:
        scores: ``[B, m]`` scores to transform, -inf for items that must rank last.
        row_scores: the whole rows ``[B, n]`` when ``scores`` holds only some of their
            items (then ``top_values``, the rows' ``exact_top`` best scores, descending, and
            ``n`` are given too); by default ``scores`` are the whole rows.
    """
    if row_scores is not None:
        return (estimated_ranks(scores, row_scores, top_values, n) + 1).pow(-exponent)
    rows = scores
    n = rows.shape[1]
    top = min(exact_top, n)
    mean, var = row_mean_var(rows)
    # An infinite score makes its row's statistics non-finite: a free check for -inf.
    all_finite = bool(torch.isfinite(var).all())
    if not all_finite:
        finite = torch.isfinite(rows)
        safe = torch.where(finite, rows, torch.zeros_like(rows))
        count = finite.sum(1, keepdim=True).clamp(min=1)
        mean = safe.sum(1, keepdim=True) / count
        var = ((safe - mean) ** 2 * finite).sum(1, keepdim=True) / count
    # 1 - Phi(z) ~ sigmoid(-1.702 z) (logistic approximation, error < 0.01), far cheaper
    # than the exact normal tail on a CPU.
    scale = 1.702 / var.sqrt().clamp(min=1e-12)
    # In place after one allocation: these rows are the largest tensors of the ensemble.
    ranks = (scores - mean).mul_(-scale).sigmoid_().mul_(n).clamp_(min=top, max=n - 1)
    if not all_finite:
        ranks = torch.where(torch.isfinite(scores), ranks, torch.full_like(ranks, n - 1))
    _, top_index = torch.topk(scores, top, dim=1)
    exact = torch.arange(top, dtype=ranks.dtype, device=ranks.device)
    ranks.scatter_(1, top_index, exact.expand(len(scores), -1))
    return ranks.add_(1).pow_(-exponent)


class CCD(GeneralRecommender):
    r"""Continual Collaborative Distillation: teacher system + student.

    Settings (``properties/model/CCD.yaml``): ``teachers`` (list of backbone specs),
    ``student`` (one spec), and the distillation, update and replay settings read by
    :class:`~recbole_ccd.trainer.ccd.CCDLearner`.
    """

    input_type = InputType.PAIRWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        validate_ccd_config(config)
        self.teacher_specs = [check_spec(s, "teachers") for s in config["teachers"]]
        self.student_spec = check_spec(config["student"], "student")
        self.rank_exponent = config["ensemble_rank_exponent"]
        self.exact_rank_items = config["ensemble_exact_rank_items"]
        self.exact_top = config["ensemble_exact_top"]
        self.teachers = nn.ModuleList(build_backbone(config, dataset, s)
                                      for s in self.teacher_specs)
        self.student = build_backbone(config, dataset, self.student_spec)

    @torch.no_grad()
    def teacher_scores(self, users: torch.Tensor, n_items_seen: int,
                       full: bool = True) -> torch.Tensor:
        """Ensemble scores ``[len(users), n_items]``: mean over teachers of (rank + 1)^-0.05.

        Ranks are taken over the items seen so far (the padding item 0 ranks last); unseen
        items score 0. Up to ``ensemble_exact_rank_items`` items every rank is exact; above,
        see :func:`approximate_rank_transform`. With ``full=False`` only the items some
        teacher ranks in its top ``ensemble_exact_top`` are scored and every other item gets
        the bound (exact_top + 1)^-0.05, which no such item can exceed. Those items then tie,
        and can outrank listed items that some teachers rank low, so the shortcut is not
        used for evaluation (it changed top-50 metrics by up to 0.03 on Gowalla).
        """
        out = torch.zeros(len(users), self.n_items, device=users.device)
        scores = [t.score_users(users)[:, 1:n_items_seen] for t in self.teachers]
        n = n_items_seen - 1
        if n <= self.exact_rank_items or full:
            total = out[:, 1:n_items_seen]
            for teacher_scores in scores:
                if n <= self.exact_rank_items:
                    total += rank_transform(teacher_scores, self.rank_exponent)
                else:
                    total += approximate_rank_transform(teacher_scores, self.exact_top,
                                                        self.rank_exponent)
            total /= len(self.teachers)
        else:
            top = min(self.exact_top, n)
            tops = [torch.topk(s, top, dim=1) for s in scores]
            candidates = torch.cat([index for _, index in tops], dim=1)
            total = torch.zeros(candidates.shape, device=users.device)
            for teacher_scores, (top_values, _) in zip(scores, tops):
                values = teacher_scores.gather(1, candidates)
                total += approximate_rank_transform(values, top, self.rank_exponent,
                                                    row_scores=teacher_scores,
                                                    top_values=top_values, n=n)
            total /= len(self.teachers)
            out[:, 1:n_items_seen] = float(top + 1) ** -self.rank_exponent
            out[:, 1:n_items_seen].scatter_(1, candidates, total)
        out[:, 0] = float(n_items_seen) ** -self.rank_exponent
        return out

    def parameter_counts(self) -> dict[str, int]:
        teacher = sum(t.parameter_count() for t in self.teachers)
        student = self.student.parameter_count()
        return {"teacher_system": teacher, "student": student,
                "compression_ratio": round(teacher / max(student, 1), 2)}

    def calculate_loss(self, interaction):
        return self.student.calculate_loss(interaction)

    def predict(self, interaction):
        return self.student.predict(interaction)

    def full_sort_predict(self, interaction):
        return self.student.full_sort_predict(interaction)
