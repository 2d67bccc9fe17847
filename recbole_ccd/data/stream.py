"""Cut a time-ordered dataset into stages, split each stage, and build RecBole loaders.

A *stage* is one time-ordered slice of the stream: stage 0 is the base stage, stages
1..N the incremental ones (the paper calls them data blocks D_0..D_N). Each stage is split
on its own, per user, into train/valid/test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from recbole_ccd import compat  # noqa: F401

import numpy as np
import scipy.sparse as sp
import torch
from recbole.config import Config
from recbole.data.dataloader import FullSortEvalDataLoader, TrainDataLoader
from recbole.data.dataset import Dataset
from recbole.sampler import Sampler

from recbole_ccd.errors import StreamConfigError

TRAIN, VALID, TEST, DROPPED = 0, 1, 2, -1


class StageSampler(Sampler):
    """RecBole sampler whose negatives come only from items seen up to the stage.

    Item ids are ordered by first appearance, so "seen up to stage k" is the id range
    ``[1, n_items_seen)`` (id 0 is RecBole's padding item).
    """

    def __init__(self, phases, datasets, n_items_seen: int, distribution="uniform", alpha=1.0):
        self.n_items_seen = n_items_seen
        super().__init__(phases, datasets, distribution=distribution, alpha=alpha)
        largest = max((len(s) for s in self.used_ids[self.phases[-1]]), default=0)
        if largest + 1 >= n_items_seen:
            raise StreamConfigError(
                "a user has interacted with every item seen so far, so no negative item can "
                "be sampled; filter such users (user_inter_num_interval) or use more data."
            )

    def _uni_sampling(self, sample_num):
        return np.random.randint(1, self.n_items_seen, sample_num)


def assign_stages(timestamps: np.ndarray, config: Config) -> np.ndarray:
    """Stage index of every interaction; ``timestamps`` must be sorted ascending.

    With ``stage_boundaries`` [b_1..b_N], stage k holds b_k <= t < b_{k+1}. Otherwise stage 0
    holds the first ``stage_base_ratio`` of the interactions and the rest is cut into
    ``stage_incremental`` stages of equal size.
    """
    n = len(timestamps)
    boundaries = config["stage_boundaries"]
    if boundaries is not None:
        stages = np.searchsorted(np.asarray(boundaries, dtype=np.float64), timestamps, "right")
        n_stages = len(boundaries) + 1
    else:
        n_incremental = config["stage_incremental"]
        n_stages = n_incremental + 1
        distinct = len(np.unique(timestamps))
        if distinct < n_stages:
            raise StreamConfigError(
                f"{distinct} distinct timestamps cannot make {n_stages} stages: lower "
                "stage_incremental or give stage_boundaries."
            )
        base_end = int(round(config["stage_base_ratio"] * n))
        cuts = [base_end + round(j * (n - base_end) / max(n_incremental, 1))
                for j in range(n_incremental + 1)]
        stages = np.zeros(n, dtype=np.int64)
        for k in range(1, n_stages):
            stages[cuts[k - 1]:] = k
    counts = np.bincount(stages, minlength=n_stages)
    for k, count in enumerate(counts):
        if count == 0:
            raise StreamConfigError(
                f"stage {k} holds no interactions ({n} in all): adjust stage_boundaries, "
                "stage_base_ratio or stage_incremental."
            )
    return stages


def split_stage(
    users: np.ndarray, items: np.ndarray, ratios: list[float], rng: np.random.Generator
) -> np.ndarray:
    """Per-user train/valid/test split of one stage.

    Per user: shuffle the user's distinct items of the stage; the first
    ``max(int(test_ratio * n), 1)`` go to test, the next ``max(int(valid_ratio * n), 1)``
    to valid, the rest to train. Valid and test items that have
    no training interaction in the stage are removed, and a user left with an empty valid
    or test list is dropped from both (but keeps its training items). Repeated (user, item)
    pairs inside a stage are kept once.

    Returns:
        An int array with TRAIN, VALID, TEST or DROPPED per row.
    """
    n = len(users)
    labels = np.full(n, DROPPED, dtype=np.int64)
    if n == 0:
        return labels
    _, first = np.unique(np.stack([users, items], axis=1), axis=0, return_index=True)
    keep = np.sort(first)

    order = keep[np.lexsort((rng.random(len(keep)), users[keep]))]
    sorted_users = users[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_users)) + 1]
    sizes = np.diff(np.r_[starts, len(order)])
    position = np.arange(len(order)) - np.repeat(starts, sizes)
    size = np.repeat(sizes, sizes)
    n_test = np.maximum((ratios[2] * size).astype(np.int64), 1)
    n_valid = np.maximum((ratios[1] * size).astype(np.int64), 1)
    split = np.where(position < n_test, TEST,
                     np.where(position < n_test + n_valid, VALID, TRAIN))
    labels[order] = split

    train_items = np.unique(items[labels == TRAIN])
    held_out = (labels == VALID) | (labels == TEST)
    labels[held_out & ~np.isin(items, train_items)] = DROPPED
    complete = np.intersect1d(users[labels == TEST], users[labels == VALID])
    labels[held_out & (labels != DROPPED) & ~np.isin(users, complete)] = DROPPED
    return labels


@dataclass
class Stage:
    """One stage of the stream with its RecBole datasets and loaders.

    Ids below ``n_users``/``n_items`` have been seen up to and including this stage; ids in
    ``[n_users_before, n_users)`` are the users new in it (likewise for items).
    """

    index: int
    train: Dataset
    valid: Dataset
    test: Dataset
    test_new_users: Dataset
    n_users: int
    n_items: int
    n_users_before: int
    n_items_before: int
    sampler: StageSampler
    valid_loader: FullSortEvalDataLoader
    test_loader: FullSortEvalDataLoader
    test_new_loader: FullSortEvalDataLoader | None
    _train_matrix: sp.csr_matrix | None = field(default=None, repr=False)

    @property
    def uid_field(self) -> str:
        return self.train.uid_field

    @property
    def iid_field(self) -> str:
        return self.train.iid_field

    def train_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users, items) of the stage's training interactions, as int64 tensors."""
        feat = self.train.inter_feat
        return feat[self.uid_field].long(), feat[self.iid_field].long()

    def train_matrix(self) -> sp.csr_matrix:
        """Binary csr matrix [user_num, item_num] of this stage's training pairs (global ids)."""
        if self._train_matrix is None:
            users, items = self.train_pairs()
            shape = (self.train.user_num, self.train.item_num)
            data = np.ones(len(users), dtype=np.float32)
            matrix = sp.csr_matrix((data, (users.numpy(), items.numpy())), shape=shape)
            matrix.data[:] = 1.0
            self._train_matrix = matrix
        return self._train_matrix

    def train_loader(self, config: Config, train: Dataset | None = None) -> TrainDataLoader:
        """RecBole training loader over ``train`` (default: this stage's train split).

        Negatives come from the items seen so far, never from the user's ``train`` items.
        """
        train = self.train if train is None else train
        sampler = StageSampler(["train"], [train], self.n_items) if train is not self.train \
            else self.sampler
        return TrainDataLoader(config, train, sampler.set_phase("train"), shuffle=True)


def _seen_counts(ids: np.ndarray, stages: np.ndarray, n_stages: int) -> np.ndarray:
    """Number of ids (padding included) seen up to and including each stage."""
    counts = np.ones(n_stages, dtype=np.int64)
    for k in range(n_stages):
        in_stage = ids[stages == k]
        counts[k] = max(int(in_stage.max()) + 1 if len(in_stage) else 1,
                        counts[k - 1] if k else 1)
    return counts


def build_stages(config: Config, dataset: Dataset) -> list[Stage]:
    """Cut ``dataset`` (a :class:`StreamDataset`) into stages with splits and loaders."""
    dataset._change_feat_format()
    uid_field, iid_field = dataset.uid_field, dataset.iid_field
    users = dataset.inter_feat[uid_field].numpy()
    items = dataset.inter_feat[iid_field].numpy()
    stages = assign_stages(dataset.timestamps, config)
    n_items_total = dataset.item_num - 1
    if max(config["topk"]) > n_items_total:
        raise StreamConfigError(
            f"topk {config['topk']} asks for more items than dataset '{config['dataset']}' "
            f"holds ({n_items_total}): lower topk and valid_metric."
        )
    n_stages = int(stages.max()) + 1
    user_seen = _seen_counts(users, stages, n_stages)
    item_seen = _seen_counts(items, stages, n_stages)
    rng = np.random.default_rng(config["seed"])
    ratios = config["stage_split_ratios"]

    result = []
    for k in range(n_stages):
        rows = np.flatnonzero(stages == k)
        labels = split_stage(users[rows], items[rows], ratios, rng)
        parts = {part: rows[labels == part] for part in (TRAIN, VALID, TEST)}
        if len(parts[TRAIN]) == 0:
            raise StreamConfigError(
                f"stage {k} has no training interactions after the per-user split: give it "
                "more interactions (stage_boundaries / stage_base_ratio) or raise the train "
                "ratio in stage_split_ratios."
            )
        if len(parts[TEST]) == 0 or len(parts[VALID]) == 0:
            raise StreamConfigError(
                f"stage {k} has no valid or test interactions after the split: its users have "
                "too few interactions in it. Use fewer, larger stages."
            )
        train, valid, test = (dataset.copy(dataset.inter_feat[parts[p]])
                              for p in (TRAIN, VALID, TEST))
        n_users_before = int(user_seen[k - 1]) if k else 1
        n_items_before = int(item_seen[k - 1]) if k else 1
        new_rows = parts[TEST][users[parts[TEST]] >= n_users_before] if k else parts[TEST][:0]
        test_new = dataset.copy(dataset.inter_feat[new_rows])

        sampler = StageSampler(["train", "valid", "test"], [train, valid, test],
                               int(item_seen[k]))
        valid_loader = FullSortEvalDataLoader(config, valid, sampler.set_phase("valid"))
        test_loader = FullSortEvalDataLoader(config, test, sampler.set_phase("test"))
        test_new_loader = (FullSortEvalDataLoader(config, test_new, sampler.set_phase("test"))
                           if len(new_rows) else None)
        result.append(Stage(
            index=k, train=train, valid=valid, test=test, test_new_users=test_new,
            n_users=int(user_seen[k]), n_items=int(item_seen[k]),
            n_users_before=n_users_before, n_items_before=n_items_before,
            sampler=sampler, valid_loader=valid_loader, test_loader=test_loader,
            test_new_loader=test_new_loader,
        ))
    return result
