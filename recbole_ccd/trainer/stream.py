"""Run a learner through the stages of a stream, evaluating and checkpointing each stage."""

from __future__ import annotations

import glob
import json
import os
import random
import re
import time
from logging import getLogger

from recbole_ccd import compat  # noqa: F401

import numpy as np
import torch
from recbole.config import Config
from recbole.data.interaction import cat_interactions
from recbole.utils import set_color

from recbole_ccd.compat import load_checkpoint, save_atomic, write_text_atomic
from recbole_ccd.data.stream import Stage
from recbole_ccd.evaluation import StreamResults, Scorer, evaluate_scorer, format_row, \
    model_scorer
from recbole_ccd.model.backbones import StreamRecommender
from recbole_ccd.trainer.trainer import StreamTrainer
from recbole_ccd.utils import get_model


class StreamLearner:
    """What the runner drives: one or more models that learn stage after stage.

    Subclasses set ``roles`` (the names under which models are evaluated) and implement
    :meth:`learn_stage`, :meth:`scorer`, :meth:`state_dict` and :meth:`load_state_dict`.
    """

    roles: tuple[str, ...] = ("model",)

    def __init__(self, config: Config, stages: list[Stage], output_dir: str):
        self.config = config
        self.stages = stages
        self.output_dir = output_dir
        self.logger = getLogger()
        self.device = config["device"]

    def learn_stage(self, k: int) -> dict[str, float]:
        """Learn stage ``k``; return seconds per step."""
        raise NotImplementedError

    def scorer(self, role: str) -> Scorer:
        raise NotImplementedError

    def eval_mode(self) -> None:
        """Put every model in evaluation mode before the stage's evaluation."""

    def parameter_counts(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class SingleModelLearner(StreamLearner):
    """One RecBole model through the stream, by ``stream_strategy``.

    * ``finetune``: continue from the previous stage's weights and train on the new stage's
      train split only; new users and items start from fresh rows.
    * ``retrain``: a fresh model on the train splits of all stages so far.

    Each stage trains with RecBole's ``fit``, early-stopped on the stage's valid split; the
    best epoch's weights are the ones evaluated.
    """

    def __init__(self, config, stages, output_dir):
        super().__init__(config, stages, output_dir)
        self.model_class = get_model(config["model"])
        self.model = self._new_model()

    def _new_model(self, train=None) -> torch.nn.Module:
        train = self.stages[0].train if train is None else train
        return self.model_class(self.config, train).to(self.device)

    def learn_stage(self, k):
        stage = self.stages[k]
        start = time.time()
        retrain = self.config["stream_strategy"] == "retrain"
        train = stage.train
        if retrain:
            train = self.stages[0].train.copy(
                cat_interactions([s.train.inter_feat for s in self.stages[: k + 1]]))
        if isinstance(self.model, StreamRecommender):
            if retrain:
                self.model = self._new_model()
            self.model.set_stage(stage.n_users, stage.n_items, _csr(train))
        else:
            # A RecBole model reads its dataset-derived structures (histories, graphs) when
            # it is built, so it is rebuilt on this stage's data; with finetune the previous
            # stage's weights are carried over.
            previous = None if retrain or k == 0 else self.model.state_dict()
            self.model = self._new_model(train)
            if previous is not None:
                self.model.load_state_dict(previous)

        trainer = StreamTrainer(self.config, self.model, stage.n_items,
                                os.path.join(self.output_dir, "tensorboard", f"stage_{k}"))
        trainer.fit(stage.train_loader(self.config, train), stage.valid_loader, verbose=False,
                    saved=True, show_progress=self.config["show_progress"])
        trainer.restore_best()
        return {"train": time.time() - start}

    def eval_mode(self):
        self.model.eval()

    def scorer(self, role):
        return model_scorer(self.model)

    def parameter_counts(self):
        stage = self.stages[self._stage_index()]
        if isinstance(self.model, StreamRecommender):
            return {"model": self.model.parameter_count()}
        size = self.config["embedding_size"] or 0
        return {"model": (stage.n_users + stage.n_items) * size}

    def _stage_index(self) -> int:
        return getattr(self, "_current", 0)

    def state_dict(self):
        return {"model": self.model.state_dict(),
                "seen": [getattr(self.model, "n_users_seen", 0),
                         getattr(self.model, "n_items_seen", 0)]}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        if isinstance(self.model, StreamRecommender):
            # The restored rows count as seen: the next stage initialises only its new rows.
            self.model.set_stage(*state["seen"], init_new_rows=False)


def _csr(dataset):
    matrix = dataset.inter_matrix(form="csr").astype(np.float32)
    matrix.data[:] = 1.0
    return matrix


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]),
                     python_state["gauss"]))


class StreamRunner:
    """Drives a :class:`StreamLearner` through every stage.

    Per stage k: the learner learns stage k; every role is evaluated on the test split of
    each stage j <= k (and on the users new in stage k); then ``results.json`` and
    ``checkpoints/stage_k.pt`` are written atomically, so a crash loses at most the stage in
    flight and ``resume`` continues after the last completed stage.
    """

    def __init__(self, config: Config, learner: StreamLearner, stages: list[Stage],
                 output_dir: str):
        self.config = config
        self.learner = learner
        self.stages = stages
        self.output_dir = output_dir
        self.checkpoint_dir = os.path.join(output_dir, "checkpoints")
        self.results_path = os.path.join(output_dir, "results.json")
        self.logger = getLogger()
        self.results = StreamResults()
        self.timing: dict[str, dict[str, float]] = {}
        self.metrics = [f"{m.lower()}@{k}" for m in config["metrics"] for k in config["topk"]]

    # -- resume --------------------------------------------------------------------------
    def last_completed_stage(self) -> int:
        paths = glob.glob(os.path.join(self.checkpoint_dir, "stage_*.pt"))
        done = [int(re.search(r"stage_(\d+)\.pt$", p).group(1)) for p in paths]
        return max(done, default=-1)

    def restore(self) -> int:
        """Load the last completed stage's checkpoint; return the next stage to run."""
        last = self.last_completed_stage()
        if last < 0:
            return 0
        state = load_checkpoint(os.path.join(self.checkpoint_dir, f"stage_{last}.pt"))
        self.learner.load_state_dict(state["learner"])
        self.results = StreamResults.from_dict(json.loads(state["results"]))
        self.timing = json.loads(state["timing"])
        self.learner._current = last
        _set_rng_state(state["rng"])
        self.logger.info(set_color(f"Resuming after completed stage {last}", "yellow"))
        return last + 1

    # -- the loop ------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        start = self.restore() if resume else 0
        last = len(self.stages)
        if self.config["stages_to_run"]:
            last = min(last, int(self.config["stages_to_run"]))
        for k in range(start, last):
            stage = self.stages[k]
            self.logger.info(set_color(
                f"Stage {k}/{len(self.stages) - 1}: {len(stage.train)} train interactions, "
                f"{stage.n_users - stage.n_users_before} new users, "
                f"{stage.n_items - stage.n_items_before} new items", "green"))
            self.learner._current = k
            timing = self.learner.learn_stage(k)
            eval_start = time.time()
            self.evaluate_stage(k)
            timing["evaluate"] = time.time() - eval_start
            self.timing[f"stage_{k}"] = {key: round(v, 3) for key, v in timing.items()}
            self.save(k)
        summary = self.to_dict(last - 1)
        self.log_summary(summary)
        return summary

    def evaluate_stage(self, k: int) -> None:
        self.learner.eval_mode()
        stage = self.stages[k]
        for role in self.learner.roles:
            scorer = self.learner.scorer(role)
            row = [evaluate_scorer(scorer, self.stages[j].test_loader, self.config, stage.n_items)
                   for j in range(k + 1)]
            new = (evaluate_scorer(scorer, stage.test_new_loader, self.config, stage.n_items)
                   if k > 0 and stage.test_new_loader is not None else None)
            self.results.add_row(role, k, row, new)
            self.logger.info(format_row(role, k, row, self.metrics))
            if new is not None:
                self.logger.info(f"{'':>8}   new users of stage {k}: " + "  ".join(
                    f"{m}={new[m]:.4f}" for m in self.metrics))

    def to_dict(self, completed: int) -> dict:
        counts = self.learner.parameter_counts()
        return {
            "model": self.config["model"],
            "dataset": self.config["dataset"],
            "n_stages": len(self.stages),
            "completed_stages": completed + 1,
            "stages": [
                {"train": len(s.train), "valid": len(s.valid), "test": len(s.test),
                 "users_seen": s.n_users - 1, "items_seen": s.n_items - 1,
                 "new_users": s.n_users - s.n_users_before,
                 "new_items": s.n_items - s.n_items_before}
                for s in self.stages
            ],
            "results": self.results.to_dict(),
            "parameters": counts,
            "timing": self.timing,
        }

    def save(self, k: int) -> None:
        summary = self.to_dict(k)
        write_text_atomic(json.dumps(summary, indent=2), self.results_path)
        save_atomic({"stage": k, "learner": self.learner.state_dict(),
                     "results": json.dumps(self.results.to_dict()),
                     "timing": json.dumps(self.timing), "rng": _rng_state()},
                    os.path.join(self.checkpoint_dir, f"stage_{k}.pt"))

    def log_summary(self, summary: dict) -> None:
        headline = [m for m in self.metrics if m.endswith(f"@{self.config['topk'][0]}")]
        for role, body in summary["results"].items():
            if body["LA"] and next(iter(body["LA"].values())) is not None:
                line = "  ".join(
                    f"{m}: LA={body['LA'][m]:.4f} RA={body['RA'][m]:.4f} "
                    f"H={body['H-mean'][m]:.4f}" for m in headline)
                self.logger.info(set_color(f"{role} over the stream: ", "blue") + line)
        self.logger.info(set_color("results written to ", "blue") + self.results_path)
