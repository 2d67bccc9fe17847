"""CCD along the stream: the teacher system and the student learn from each other.

Per stage, :class:`CCDLearner` runs::

    stage 0:   train every teacher on stage 0
               ensemble  -> teacher system E_0
               distil    -> student D_1 from E_0 on stage 0 (this is the stage-0 student)
               proxies   -> stability proxy SP = plasticity proxy PP = D_1
    stage k>0: 1. update the student (on stage k)
                  - proxies: SP, PP <- EMA of themselves and D_k (k >= 2)
                  - S_k = D_k grown to the new users/items (multi-hop initialisation)
                  - per epoch: a BPR pass (negatives avoid the top items of E_{k-1}, D_k,
                    SP, PP), then a replay pass on items sampled from SP and PP
               2. update every teacher (on stage k)
                  - grown with the same initialisation, trained with BPR + structure
                    distillation from its own previous embeddings + replay from SP, PP, S_k
               3. ensemble  -> E_k; S_k and E_k are what the stage is evaluated on
               4. distil    -> D_{k+1} from E_k on stage k, for the next stage

Distillation (steps "distil") trains a fresh student with BPR plus the two relaxed ranking
distillation terms: per user, the teacher system's top items must outrank sampled
uninteresting items; per item, likewise over users.

With ``ccd_mode: distil_once`` the reference pipeline "distil once, then fine-tune the
student" runs instead: the stage-0 steps, then for k > 0 only the student is fine-tuned with
BPR (no proxies, no replay), and the teacher system stays as trained on stage 0.
"""

from __future__ import annotations

import copy
import time
from typing import Callable

from recbole_ccd import compat  # noqa: F401

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from recbole.utils import set_color
from tqdm import tqdm

from recbole_ccd.evaluation import evaluate_scorer, model_scorer
from recbole_ccd.model.backbones import StreamRecommender
from recbole_ccd.model.ccd import CCD, build_backbone, validate_ccd_config
from recbole_ccd.model.continual import StructureDistiller, ema_table, init_new_embeddings
from recbole_ccd.model.ranking import (
    mask_scores, merge_replay, ranks_of_items, relaxed_ranking_loss, replay_weight, sample_replay,
    sample_uninteresting, topk_rows,
)
from recbole_ccd.trainer.stream import StreamLearner

# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def pairs_to_csr(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> sp.csr_matrix:
    """Binary csr matrix with ones at (rows[i], cols[i]); entries < 0 are ignored."""
    rows, cols = rows.reshape(-1).cpu().numpy(), cols.reshape(-1).cpu().numpy()
    keep = (rows >= 0) & (cols >= 0)
    matrix = sp.csr_matrix((np.ones(keep.sum(), dtype=np.float32), (rows[keep], cols[keep])),
                           shape=shape)
    matrix.data[:] = 1.0
    return matrix


def union(*matrices: sp.csr_matrix | None) -> sp.csr_matrix:
    """Binary union of same-shaped csr matrices (None entries are skipped)."""
    present = [m for m in matrices if m is not None]
    total = present[0].copy()
    for matrix in present[1:]:
        total = total + matrix
    total = total.tocsr()
    total.data[:] = 1.0
    return total


def padding_mask(users: torch.Tensor | np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """csr that forbids RecBole's padding item 0 to each of ``users``."""
    users = np.asarray(users)
    return sp.csr_matrix((np.ones(len(users), dtype=np.float32), (users, np.zeros(len(users)))),
                         shape=shape)


def topk_to_csr(users: torch.Tensor, items: torch.Tensor, shape) -> sp.csr_matrix:
    """csr of the pairs (users[r], items[r, c]) of a top-k table."""
    return pairs_to_csr(users[:, None].expand_as(items), items, shape)


def sample_negatives(users: np.ndarray, forbidden: sp.csr_matrix, n_items_seen: int,
                     max_rounds: int = 50) -> np.ndarray:
    """One uniform negative in ``[1, n_items_seen)`` per user, outside ``forbidden``.

    Rejection sampling against the sorted keys ``user * n_cols + item`` of the forbidden
    pairs; uses numpy's global generator (seeded by RecBole's ``init_seed``).
    """
    n_cols = forbidden.shape[1]
    coo = forbidden.tocoo()
    keys = np.sort(coo.row.astype(np.int64) * n_cols + coo.col)
    negatives = np.random.randint(1, n_items_seen, len(users))
    todo = np.arange(len(users))
    for _ in range(max_rounds):
        query = users[todo].astype(np.int64) * n_cols + negatives[todo]
        position = np.minimum(np.searchsorted(keys, query), max(len(keys) - 1, 0))
        bad = keys[position] == query if len(keys) else np.zeros(len(query), bool)
        todo = todo[bad]
        if len(todo) == 0:
            break
        negatives[todo] = np.random.randint(1, n_items_seen, len(todo))
    return negatives


def bpr_sum(user: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of -log sigmoid(u.pos - u.neg)."""
    return -F.logsigmoid((user * pos).sum(-1) - (user * neg).sum(-1)).sum()


def per_stage(value, k: int):
    """A setting that may be one value or a list with one value per stage."""
    if isinstance(value, (list, tuple)):
        return value[min(k, len(value) - 1)]
    return value


# ---------------------------------------------------------------------------------------------
# the learner
# ---------------------------------------------------------------------------------------------
class CCDLearner(StreamLearner):
    """Runs CCD stage by stage (the loop is drawn in this module's docstring)."""

    roles = ("student", "teacher")

    def __init__(self, config, stages, output_dir):
        super().__init__(config, stages, output_dir)
        validate_ccd_config(config)
        self.mode = config["ccd_mode"]
        self.init_kind = config["init_kind"]
        self.valid_metric = config["valid_metric"].lower()
        self.ccd = CCD(config, stages[0].train).to(self.device)
        self.student = self.ccd.student          # S_k: the student that serves (evaluated)
        self.distilled: StreamRecommender | None = None   # D_{k+1}: distilled after stage k
        self.stability: StreamRecommender | None = None   # SP
        self.plasticity: StreamRecommender | None = None  # PP
        self.generator = torch.Generator().manual_seed(config["seed"])
        self.current = 0
        # The teacher system's top items per user (rows = user ids, -1 = none), from the last
        # distillation scan: the "top items of E_{k-1}" that stage k's negatives avoid.
        self.teacher_top: torch.Tensor | None = None
        # Top-k tables of models that stay fixed during a stage (keyed by what they were
        # computed from) and masks; emptied at the start of every stage.
        self._cache: dict = {}
        # LightGCN graphs per stage (``ccd_graph``), one object each: checkpoints record a
        # model's graph by the stage it belongs to.
        self._graphs: dict[int, sp.csr_matrix] = {}

    # -- what the runner reads -------------------------------------------------------------
    def scorer(self, role):
        if role == "student":
            return model_scorer(self.student)
        n_items = self.stages[self.current].n_items
        uid = self.stages[0].uid_field
        # Every item scored (full=True): the top-only shortcut gives the items outside every
        # teacher's top list one shared upper-bound score, which ties them and lets them
        # outrank listed items, so top-50 metrics moved by up to 0.03 on Gowalla.
        return lambda interaction: self.ccd.teacher_scores(interaction[uid], n_items)

    def eval_mode(self):
        self.ccd.eval()
        self.student.eval()

    def parameter_counts(self):
        return self.ccd.parameter_counts()

    # -- the stage ---------------------------------------------------------------------------
    def learn_stage(self, k):
        self.current = k
        self._cache.clear()
        timing: dict[str, float] = {}
        stage = self.stages[k]

        def timed(name: str, step: Callable[[], None]) -> None:
            self.logger.info(set_color(f"[stage {k}] {name}", "cyan"))
            start = time.time()
            step()
            timing[name] = time.time() - start

        if k == 0:
            timed("teachers", self._train_base_teachers)
            timed("distil", lambda: self._distil(0))
            # A copy: distil_once fine-tunes the student in place, and D_1 must stay D_1
            # (and the checkpoint's two models must be two models, as after a resume).
            self.student = copy.deepcopy(self.distilled)
            self.stability = copy.deepcopy(self.distilled)
            self.plasticity = copy.deepcopy(self.distilled)
        elif self.mode == "distil_once":
            timed("student_update", lambda: self._finetune_student(k))
        else:
            timed("student_update", lambda: self._update_student(k))
            timed("teacher_update", lambda: self._update_teachers(k))
            if k + 1 < len(self.stages):
                timed("distil", lambda: self._distil(k))
        self.ccd.student = self.student
        for model in (self.student, *self.ccd.teachers):
            model.set_stage(stage.n_users, stage.n_items, None, init_new_rows=False)
        return timing

    def _graph(self, k: int) -> sp.csr_matrix:
        """The LightGCN graph of models trained on stage k.

        ``ccd_graph: stage`` (the authors' protocol): stage k's train split alone, so users
        without pairs in stage k propagate nothing and item representations follow the
        stage's users. ``history``: the train splits of stages 0..k, so old users and items
        keep their neighbourhoods from stage to stage.
        """
        if self.config["ccd_graph"] == "stage" or k == 0:
            return self.stages[k].train_matrix()
        if k not in self._graphs:
            self._graphs[k] = union(self._graph(k - 1), self.stages[k].train_matrix())
        return self._graphs[k]

    # -- a generic training loop ---------------------------------------------------------------
    def _fit(self, model: StreamRecommender, k: int, *, prefix: str,
             forbidden: sp.csr_matrix,
             batch_loss: Callable | None = None,
             after_epoch: Callable | None = None) -> None:
        """BPR training on stage ``k``'s train split with early stopping on its valid split.

        ``batch_loss(user_all, item_all, users, pos, neg)`` adds to each BPR step's loss;
        ``after_epoch(model, optimizer, epoch)`` runs extra passes (replay, item-side
        distillation) with their own steps of the same optimiser.
        """
        stage = self.stages[k]
        epochs = self.config[f"{prefix}_epochs"]
        batch_size = self.config[f"{prefix}_batch_size"]
        # The fused kernel: every step updates the whole embedding tables (the weight decay
        # reaches every row), and on a CPU the fused step is about five times faster than
        # the default one on Gowalla-sized tables.
        optimizer = torch.optim.Adam(model.parameters(),
                                     lr=self.config[f"{prefix}_learning_rate"],
                                     weight_decay=self.config["ccd_weight_decay"], fused=True)
        users, items = stage.train_pairs()
        users_np = users.numpy()
        best, best_state, patience = -np.inf, None, 0
        for epoch in range(epochs):
            model.train()
            negatives = torch.from_numpy(sample_negatives(users_np, forbidden, stage.n_items))
            order = torch.randperm(len(users))
            batches = range(0, len(order), batch_size)
            if self.config["show_progress"]:
                batches = tqdm(batches, desc=f"{prefix} epoch {epoch}", leave=False)
            for start in batches:
                idx = order[start:start + batch_size]
                u = users[idx].to(self.device)
                p = items[idx].to(self.device)
                n = negatives[idx].to(self.device)
                user_all, item_all = model()
                loss = bpr_sum(user_all[u], item_all[p], item_all[n])
                if batch_loss is not None:
                    loss = loss + batch_loss(user_all, item_all, u, p, n)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if after_epoch is not None:
                after_epoch(model, optimizer, epoch)
            model.eval()
            score = evaluate_scorer(model_scorer(model), stage.valid_loader, self.config,
                                    stage.n_items)[self.valid_metric]
            self.logger.info(f"  {prefix} epoch {epoch}: valid {self.valid_metric}={score:.4f}")
            if score > best:
                best, patience = score, 0
                best_state = {key: v.detach().clone() for key, v in model.state_dict().items()}
            else:
                patience += 1
                if patience >= self.config["stopping_step"]:
                    break
        model.load_state_dict(best_state)
        model.eval()

    # -- stage 0: base teachers ----------------------------------------------------------------
    def _train_base_teachers(self) -> None:
        stage = self.stages[0]
        for index, teacher in enumerate(self.ccd.teachers):
            self.logger.info(f"  teacher {index}: {self.ccd.teacher_specs[index]}")
            teacher.set_stage(stage.n_users, stage.n_items, self._graph(0))
            self._fit(teacher, 0, prefix="teacher", forbidden=stage.train_matrix())

    # -- top-k helpers -------------------------------------------------------------------------
    def _score_fn(self, model: StreamRecommender) -> Callable[[torch.Tensor], torch.Tensor]:
        model.eval()

        @torch.no_grad()
        def score(users: torch.Tensor) -> torch.Tensor:
            return model.score_users(users.to(self.device)).cpu()

        return score

    def _ensemble_fn(self, n_items: int, full: bool = False
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The teacher system's scores; ``full=False`` is exact only near the top."""
        self.ccd.eval()
        return lambda users: self.ccd.teacher_scores(users.to(self.device), n_items,
                                                     full=full).cpu()

    def _model_top(self, model: StreamRecommender, users: torch.Tensor, k: int,
                   mask: sp.csr_matrix | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, items) of each user's top-``k`` items of ``model`` outside ``mask`` and
        the padding item; ``-1`` where a user has fewer allowed items.

        Only for models that do not change during the current stage (proxies, the distilled
        and the updated student): the result is cached until the next stage, and reused by
        the negative exclusion, the student's replay and every teacher's replay.
        """
        key = (id(model), users[0].item() if len(users) else 0, len(users), k, id(mask))
        if key not in self._cache:
            shape = self.stages[0].train_matrix().shape
            values, top = topk_rows(self._score_fn(model), users, k,
                                    mask=union(mask, padding_mask(users, shape)),
                                    chunk_size=self.config["ccd_chunk_size"],
                                    n_items=model.n_items_seen)
            top = torch.where(torch.isfinite(values), top, torch.full_like(top, -1))
            # ``model`` and ``mask`` are kept so their ids cannot be reused within the stage.
            self._cache[key] = (values, top, model, mask)
        values, top, _, _ = self._cache[key]
        return values, top

    def _exclusion_csr(self, model: StreamRecommender, users: torch.Tensor,
                       mask: sp.csr_matrix) -> sp.csr_matrix:
        """csr of each user's top ``exclusion_topk`` items of ``model`` outside ``mask``."""
        _, top = self._model_top(model, users, self.config["exclusion_topk"], mask)
        return topk_to_csr(users, top, self.stages[0].train_matrix().shape)

    # -- stage "distil": student generation by relaxed ranking distillation --------------------
    def _distil(self, k: int) -> None:
        """Train a fresh student D_{k+1} from the teacher system E_k on stage k."""
        stage = self.stages[k]
        shape = stage.train_matrix().shape
        train = stage.train_matrix()
        n_interesting = self.config["distill_interesting"]
        chunk = self.config["ccd_chunk_size"]
        teacher_fn = self._ensemble_fn(stage.n_items, full=True)

        # Interesting items per user and interesting users per item: the teacher system's
        # top lists with the stage's training pairs (and the padding item) masked out. Both
        # come from one scan over user chunks (topk_rows + topk_columns would score the
        # whole ensemble twice, the costliest step on a large catalogue).
        # The same scan gives the teacher system's top items for negative exclusion, here
        # and in the next stage's updates (kept in ``self.teacher_top``).
        active = torch.from_numpy(np.flatnonzero(np.diff(train.indptr) > 0))
        all_users = torch.arange(1, stage.n_users)
        blocked = union(train, padding_mask(np.arange(shape[0]), shape))
        n_top = max(n_interesting, self.config["exclusion_topk"])
        user_top = torch.full((shape[0], n_top), -1, dtype=torch.long)
        best_users = torch.full((stage.n_items, n_interesting), -1, dtype=torch.long)
        best_values = torch.full((stage.n_items, n_interesting), -torch.inf)
        for start in range(0, len(all_users), chunk):
            users = all_users[start:start + chunk]
            scores = mask_scores(teacher_fn(users)[:, :stage.n_items].clone(), users, blocked)
            values, top = torch.topk(scores, min(n_top, stage.n_items - 1), dim=1)
            top[~torch.isfinite(values)] = -1
            user_top[users, : top.shape[1]] = top
            merged_values = torch.cat([best_values, scores.T], dim=1)
            merged_users = torch.cat([best_users, users.expand(stage.n_items, -1)], dim=1)
            keep = torch.topk(merged_values, n_interesting, dim=1).indices
            best_values = merged_values.gather(1, keep)
            best_users = merged_users.gather(1, keep)
        best_users[~torch.isfinite(best_values)] = -1
        best_users[0] = -1
        is_active = torch.zeros(shape[0], dtype=torch.bool)
        is_active[active] = True
        interesting_items = user_top[:, :n_interesting].clone()
        # Users seen before but without training pairs in this stage never appear in a BPR
        # batch; the authors' code gives them no user-side term (only the item side reaches
        # them). With distill_inactive_users they get it in a pass of their own.
        inactive = torch.from_numpy(np.setdiff1d(np.arange(1, stage.n_users), active.numpy()))
        if self.config["distill_inactive_users"]:
            inactive = inactive[interesting_items[inactive, 0] >= 0]
        else:
            interesting_items[~is_active] = -1
            inactive = inactive[:0]
        self.teacher_top = user_top[:, : self.config["exclusion_topk"]].clone()

        # Items never to sample as negatives: the stage's positives and the top lists of the
        # teacher system and of the student side (stability/plasticity proxies and the
        # updated student, k >= 1).
        exclusion = [topk_to_csr(torch.arange(shape[0]), self.teacher_top, shape)]
        if k >= 1:
            for source in self._student_sources(k, include_student=True):
                exclusion.append(self._exclusion_csr(source, all_users, train))
        interesting_csr = topk_to_csr(torch.arange(shape[0]), interesting_items, shape)
        interesting_users_csr = pairs_to_csr(best_users,
                                             torch.arange(stage.n_items)[:, None]
                                             .expand_as(best_users), shape)
        negatives_forbidden = union(train, interesting_csr, *exclusion)
        uninteresting_forbidden = union(negatives_forbidden, interesting_users_csr)

        student = build_backbone(self.config, stage.train, self.ccd.student_spec).to(self.device)
        student.set_stage(stage.n_users, stage.n_items, self._graph(k))
        user_weight = self.config["distill_user_weight"]
        item_weight = self.config["distill_item_weight"]
        resample = max(1, self.config["distill_resample_every"])
        samples: dict[str, torch.Tensor] = {}

        def draw() -> None:
            samples["items"], samples["items_valid"] = sample_uninteresting(
                shape[0], stage.n_items, self.config["distill_uninteresting_items"],
                uninteresting_forbidden, generator=self.generator)
            samples["users"], samples["users_valid"] = sample_uninteresting(
                stage.n_items, stage.n_users, self.config["distill_uninteresting_users"],
                uninteresting_forbidden.T.tocsr()[: stage.n_items], generator=self.generator)

        # The ranking terms score the student's final (propagated) representations; the
        # authors' code used layer-0 embeddings for a LightGCN student.
        def list_loss(anchors, table, top, uninteresting, uninteresting_valid, batch):
            """Relaxed ranking loss of anchors [B, d] (users or items) over rows of ``table``:
            their teacher-ordered ``top`` [B, K] ids against their sampled uninteresting ids."""
            rows = batch.cpu()
            negatives = uninteresting[rows].to(self.device)
            top_scores = torch.einsum("bd,bkd->bk", anchors, table[top.clamp(min=0)])
            neg_scores = torch.einsum("bd,bkd->bk", anchors, table[negatives])
            return relaxed_ranking_loss(top_scores, neg_scores,
                                        valid=uninteresting_valid[rows].to(self.device),
                                        interesting_valid=top >= 0)

        interesting_items_d = interesting_items.to(self.device)
        best_users_d = best_users.to(self.device)

        def batch_loss(user_all, item_all, users, pos, neg):
            if user_weight == 0:
                return 0.0
            if "items" not in samples:
                draw()
            batch = torch.unique(users)
            batch = batch[interesting_items_d[batch, 0] >= 0]
            if len(batch) == 0:
                return 0.0
            return user_weight * list_loss(user_all[batch], item_all, interesting_items_d[batch],
                                           samples["items"], samples["items_valid"], batch)

        def list_pass(model, optimizer, ids: torch.Tensor, side: str) -> None:
            """Steps of the list-wise term alone over ``ids`` (users or items)."""
            ids = ids[torch.randperm(len(ids))]
            for start in range(0, len(ids), self.config["distill_batch_size"]):
                batch = ids[start:start + self.config["distill_batch_size"]].to(self.device)
                user_all, item_all = model()
                if side == "user":
                    loss = user_weight * list_loss(user_all[batch], item_all,
                                                   interesting_items_d[batch], samples["items"],
                                                   samples["items_valid"], batch)
                else:
                    loss = item_weight * list_loss(item_all[batch], user_all,
                                                   best_users_d[batch], samples["users"],
                                                   samples["users_valid"], batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        def after_epoch(model, optimizer, epoch):
            if (epoch + 1) % resample == 0:
                draw()
            if user_weight != 0 and len(inactive):
                list_pass(model, optimizer, inactive, "user")
            if item_weight != 0:
                items = torch.arange(1, stage.n_items)
                list_pass(model, optimizer, items[best_users[items, 0] >= 0], "item")

        draw()
        self._fit(student, k, prefix="distill", forbidden=negatives_forbidden,
                  batch_loss=batch_loss, after_epoch=after_epoch)
        self.distilled = student

    # -- stage k: the student update -----------------------------------------------------------
    def _student_sources(self, k: int, include_student: bool = False) -> list[StreamRecommender]:
        """The student-side models whose top items are excluded from negatives."""
        sources = []
        if self.config["use_stability_proxy"]:
            sources.append(self.stability)
        if self.config["use_plasticity_proxy"] and k >= 2:
            sources.append(self.plasticity)
        if include_student:
            sources.append(self.student)
        return sources

    def _grow(self, model: StreamRecommender, k: int) -> None:
        """Grow ``model`` to stage k's users and items with the configured initialisation."""
        stage = self.stages[k]
        if self.init_kind != "random":
            with torch.no_grad():
                new_users, new_items = init_new_embeddings(
                    stage.train_matrix()[: stage.n_users, : stage.n_items],
                    model.user_embedding.weight[: stage.n_users_before],
                    model.item_embedding.weight[: stage.n_items_before],
                    stage.n_users_before, stage.n_items_before, stage.n_users, stage.n_items,
                    tau=self.config["init_tau"], mode=self.init_kind)
                model.user_embedding.weight[stage.n_users_before: stage.n_users] = new_users
                model.item_embedding.weight[stage.n_items_before: stage.n_items] = new_items
        model.set_stage(stage.n_users, stage.n_items, self._graph(k),
                        init_new_rows=self.init_kind == "random")

    def _update_proxies(self, k: int) -> None:
        """EMA of the proxies' layer-0 tables with the newly distilled student's (k >= 2)."""
        distilled = self.distilled
        for name, weights in (("stability", self.config["stability_weights"]),
                              ("plasticity", self.config["plasticity_weights"])):
            beta = float(per_stage(weights, k))
            old = getattr(self, name)
            proxy = copy.deepcopy(distilled)
            with torch.no_grad():
                for table in ("user_embedding", "item_embedding"):
                    previous = getattr(old, table).weight
                    rows = old.n_users_seen if table == "user_embedding" else old.n_items_seen
                    getattr(proxy, table).weight.copy_(
                        ema_table(previous, getattr(distilled, table).weight, beta, rows))
            proxy.eval()
            setattr(self, name, proxy)

    def _replay_sources(self, k: int, with_student: bool) -> list[tuple]:
        """(model, samples per user, mask training pairs?) of each enabled replay source.

        The proxies' candidates have this and the previous stage's training pairs masked; the
        updated student's (a source for the teachers only) are not.
        """
        if not self.config["replay"]:
            return []

        def samples(name: str) -> int:
            # the teachers' own count when set (the authors' T_update has its own flags)
            own = self.config[f"teacher_{name}"] if with_student else None
            return self.config[name] if own is None else own

        sources = []
        if self.config["use_stability_proxy"]:
            sources.append((self.stability, samples("replay_stability_samples"), True))
        if self.config["use_plasticity_proxy"] and k >= 2:
            sources.append((self.plasticity, samples("replay_plasticity_samples"), True))
        if with_student:
            sources.append((self.student, self.config["replay_student_samples"], False))
        return sources

    def _replay_set(self, k: int, sources: list[tuple[StreamRecommender, int, bool]],
                    reference: StreamRecommender) -> tuple[torch.Tensor, ...]:
        """Proxy-guided replay samples for every old user of stage k.

        ``sources`` holds (model, samples per user, mask the training pairs?). Candidates are
        each source's top-``replay_top_a`` items; items ranked much higher by the source than
        by ``reference`` are favoured; labels are sigmoid of the source's score. The
        reference ranks of every source's candidates come from one scan of ``reference``.
        """
        stage = self.stages[k]
        old_users = torch.arange(1, stage.n_users_before)
        n_ref_items = reference.n_items_seen
        sources = [source for source in sources if source[1] > 0]
        if not sources:
            return ()
        if "replay mask" not in self._cache:
            self._cache["replay mask"] = union(self.stages[k - 1].train_matrix(),
                                               stage.train_matrix())
        tops = []
        for source, _, masked in sources:
            values, top = self._model_top(source, old_users, self.config["replay_top_a"],
                                          self._cache["replay mask"] if masked else None)
            # Only items the reference knows can be replayed against it.
            top = torch.where(top < n_ref_items, top, torch.full_like(top, -1))
            tops.append((values, top))

        exact_top = (self.config["ensemble_exact_top"]
                     if n_ref_items > self.config["ensemble_exact_rank_items"] else None)
        ranks = ranks_of_items(self._score_fn(reference), old_users,
                               torch.cat([top for _, top in tops], dim=1),
                               n_items=n_ref_items, chunk_size=self.config["ccd_chunk_size"],
                               exact_top=exact_top)
        parts = []
        width = self.config["replay_top_a"]
        for index, ((_, n_samples, _), (values, top)) in enumerate(zip(sources, tops)):
            columns = ranks[:, index * width: index * width + top.shape[1]]

            def reference_ranks(users, items, columns=columns):
                # sample_replay asks for the rows it samples from, by user id.
                return columns[torch.searchsorted(old_users, users)]

            parts.append(sample_replay(reference_ranks, top, values, old_users, n_samples,
                                       eps=self.config["replay_eps"], generator=self.generator))
        return merge_replay(parts)

    def _replay_pass(self, model, optimizer, replay, weight: float) -> None:
        users, items, labels = replay
        if weight == 0 or len(users) == 0:
            return
        order = torch.randperm(len(users))
        size = self.config["update_batch_size"]
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            user_all, item_all = model()
            u, i = users[idx].to(self.device), items[idx].to(self.device)
            logits = (user_all[u] * item_all[i]).sum(-1)
            loss = weight * F.binary_cross_entropy_with_logits(
                logits, labels[idx].to(self.device), reduction="sum")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def _negative_exclusion(self, k: int, sources: list[StreamRecommender]) -> sp.csr_matrix:
        """Stage k's positives plus the top items of the previous teacher system and sources."""
        stage = self.stages[k]
        old_users = torch.arange(1, stage.n_users_before)
        shape = stage.train_matrix().shape
        if self.teacher_top is None:
            # A checkpoint written before the top lists were kept: scan the ensemble again.
            previous = self.stages[k - 1]
            users = torch.arange(1, previous.n_users)
            values, top = topk_rows(self._ensemble_fn(previous.n_items, full=True), users,
                               self.config["exclusion_topk"],
                               mask=union(previous.train_matrix(), padding_mask(users, shape)),
                               chunk_size=self.config["ccd_chunk_size"], n_items=previous.n_items)
            self.teacher_top = torch.full((shape[0], top.shape[1]), -1, dtype=torch.long)
            self.teacher_top[users] = torch.where(torch.isfinite(values), top, -1)
        parts = [stage.train_matrix(), topk_to_csr(torch.arange(len(self.teacher_top)),
                                                   self.teacher_top, shape)]
        for source in sources:
            parts.append(self._exclusion_csr(source, old_users, stage.train_matrix()))
        return union(*parts)

    def _update_student(self, k: int) -> None:
        """Stage-k update of the student: proxies, growth, BPR + proxy-guided replay."""
        if k >= 2:
            self._update_proxies(k)
        for model in (self.stability, self.plasticity, self.distilled):
            model.eval()
        forbidden = self._negative_exclusion(k, [self.distilled, *self._student_sources(k)])
        student = copy.deepcopy(self.distilled)
        self._grow(student, k)

        sources = self._replay_sources(k, with_student=False)
        state: dict[str, tuple] = {}
        resample = max(1, self.config["replay_resample_every"])

        def after_epoch(model, optimizer, epoch):
            if not sources:
                return
            if "replay" not in state or epoch % resample == 0 and epoch > 0:
                # The reference is the distilled student, fixed during the stage.
                state["replay"] = self._replay_set(k, sources, self.distilled)
            weight = replay_weight(epoch, self.config["replay_initial_weight"],
                                   self.config["replay_period_student"])
            self._replay_pass(model, optimizer, state["replay"], weight)

        self._fit(student, k, prefix="update", forbidden=forbidden, after_epoch=after_epoch)
        self.student = student

    def _finetune_student(self, k: int) -> None:
        """``distil_once``: plain BPR fine-tuning of the student on stage k."""
        student = self.student
        self._grow(student, k)
        self._fit(student, k, prefix="update", forbidden=self.stages[k].train_matrix())

    # -- stage k: the teacher update -----------------------------------------------------------
    def _update_teachers(self, k: int) -> None:
        """Each teacher: growth, BPR + structure distillation + cross-knowledge replay."""
        stage, previous = self.stages[k], self.stages[k - 1]
        use_student = self.config["teacher_use_student_knowledge"]
        student_side = self._student_sources(k) + [self.student] if use_student else []
        forbidden = self._negative_exclusion(k, student_side)
        for index, teacher in enumerate(self.ccd.teachers):
            self.logger.info(f"  teacher {index}: {self.ccd.teacher_specs[index]}")
            teacher.eval()
            distiller = None
            # TODO: personalised imitation weights and the clustering loss of the authors'
            # teacher regulariser are left out; every user imitates with weight 1.
            if self.config["teacher_structure_weight"] > 0:
                distiller = StructureDistiller(
                    teacher.user_embedding.weight[: stage.n_users_before].detach().cpu(),
                    teacher.item_embedding.weight[: stage.n_items_before].detach().cpu(),
                    previous.train_matrix(), k=self.config["teacher_structure_neighbours"],
                    temperature=self.config["teacher_structure_temperature"],
                    max_positives=10, max_candidates=2048, seed=self.config["seed"],
                ).to(self.device)
            self._grow(teacher, k)
            anchors = self.config["teacher_structure_anchors"]
            weight = self.config["teacher_structure_weight"]

            def batch_loss(user_all, item_all, users, pos, neg, teacher=teacher,
                           distiller=distiller):
                if distiller is None:
                    return 0.0
                batch_users = torch.unique(users)
                batch_items = torch.unique(pos)
                batch_users = batch_users[torch.randperm(len(batch_users))[:anchors]]
                batch_items = batch_items[torch.randperm(len(batch_items))[:anchors]]
                return weight * distiller.loss(teacher.user_embedding.weight,
                                               teacher.item_embedding.weight,
                                               batch_users, batch_items)

            sources = self._replay_sources(k, with_student=True) if use_student else []
            state: dict[str, tuple] = {}
            resample = max(1, self.config["replay_resample_every"])

            def after_epoch(model, optimizer, epoch, sources=sources, state=state):
                if not sources:
                    return
                if "replay" not in state or epoch % resample == 0 and epoch > 0:
                    # Adaptive: the reference is the teacher as it is now.
                    model.eval()
                    state["replay"] = self._replay_set(k, sources, model)
                    model.train()
                weight = replay_weight(epoch, self.config["replay_initial_weight"],
                                       self.config["replay_period_teacher"])
                self._replay_pass(model, optimizer, state["replay"], weight)

            self._fit(teacher, k, prefix="teacher", forbidden=forbidden, batch_loss=batch_loss,
                      after_epoch=after_epoch)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self):
        def graph_stage(model):
            # The LightGCN graph is always some stage's _graph() (one object per stage); which
            # stage differs by model and mode (the proxies keep the graph of the student they
            # were mixed from, distil_once's teachers keep stage 0's), so it is recorded
            # rather than guessed on load. -1: no graph (MF).
            source = getattr(model, "graph_matrix", None)
            if source is None:
                return -1
            return next((j for j in range(len(self.stages)) if self._graph(j) is source), -1)

        def module_state(model):
            if model is None:
                return None
            return {"weights": model.state_dict(),
                    "seen": [model.n_users_seen, model.n_items_seen],
                    "graph_stage": graph_stage(model)}

        return {
            "teachers": [module_state(t) for t in self.ccd.teachers],
            "student": module_state(self.student),
            "distilled": module_state(self.distilled),
            "stability": module_state(self.stability),
            "plasticity": module_state(self.plasticity),
            "teacher_top": self.teacher_top,
            "generator": self.generator.get_state(),
            "current": self.current,
        }

    def load_state_dict(self, state):
        k = state["current"]
        self.current = k

        def restore(model_state, template=None):
            if model_state is None:
                return None
            model = template or build_backbone(self.config, self.stages[0].train,
                                               self.ccd.student_spec).to(self.device)
            model.load_state_dict(model_state["weights"])
            graph_stage = model_state["graph_stage"]
            graph = self._graph(graph_stage) if graph_stage >= 0 else None
            model.set_stage(*model_state["seen"], graph, init_new_rows=False)
            model.eval()
            return model

        for teacher, teacher_state in zip(self.ccd.teachers, state["teachers"]):
            restore(teacher_state, teacher)
        self.student = restore(state["student"])
        self.distilled = restore(state["distilled"])
        self.stability = restore(state["stability"])
        self.plasticity = restore(state["plasticity"])
        self.ccd.student = self.student
        self.teacher_top = state.get("teacher_top")
        self.generator.set_state(state["generator"])
