"""RecBole's :class:`Trainer`, adjusted for one stage of a stream."""

from __future__ import annotations

import os
from unittest import mock

from recbole_ccd import compat  # noqa: F401

import torch
import recbole.trainer.trainer as recbole_trainer
from recbole.trainer import Trainer
from torch.utils.tensorboard import SummaryWriter

from recbole_ccd.evaluation import reduce_to_candidates, topk_only


class StreamTrainer(Trainer):
    """Trains one model on one stage with RecBole's ``fit`` and early stopping.

    Differences to RecBole's trainer, each a narrow override:

    * items not seen up to the stage (id >= ``n_items_seen``) are never ranked in validation;
    * with top-k metrics only, each batch reaches the collector as its rows' top items and
      positives (:func:`~recbole_ccd.evaluation.reduce_to_candidates`), the same metrics at a
      fraction of the cost on a large catalogue;
    * the best weights are kept in memory (``best_state``), not pickled with the config;
    * TensorBoard files go to ``tensorboard_dir`` instead of ``./log_tensorboard``.
    """

    def __init__(self, config, model, n_items_seen: int, tensorboard_dir: str):
        os.makedirs(tensorboard_dir, exist_ok=True)
        with mock.patch.object(recbole_trainer, "get_tensorboard",
                               lambda logger: SummaryWriter(tensorboard_dir)):
            super().__init__(config, model)
        self.n_items_seen = n_items_seen
        self.best_state: dict[str, torch.Tensor] | None = None

    def _full_sort_batch_eval(self, batched_data):
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
        scores[:, self.n_items_seen:] = -torch.inf
        if topk_only(self.eval_collector):
            scores, positive_i = reduce_to_candidates(scores, positive_u, positive_i,
                                                      max(self.config["topk"]))
        return interaction, scores, positive_u, positive_i

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore_best(self) -> None:
        """Load the weights of the best validation epoch into the model."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.tensorboard.close()
