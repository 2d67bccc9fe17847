"""Drop-in check: with one stage, the plugin evaluates exactly like RecBole itself.

The stage-0 train/valid/test split is written as RecBole benchmark files and loaded by
RecBole's own pipeline (``create_dataset`` / ``data_preparation``, ``Trainer.evaluate``).
A scorer that depends only on the original user and item tokens (so not on how either
pipeline numbers them) must get the same Recall and NDCG in both.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import recbole_ccd  # noqa: F401  (before any recbole import: numpy compatibility)
from conftest import HEADER, random_rows, write_inter
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.utils import InputType

pytestmark = pytest.mark.usefixtures("isolated")

ITEM_TOKENS = [f"i{i}" for i in range(80)]
EVAL_SETTINGS = {
    "metrics": ["Recall", "NDCG"],
    "topk": [20, 50],
    "valid_metric": "Recall@20",
    "metric_decimal_place": 12,
}


def token_scores(user_token: str) -> dict[str, float]:
    """A fixed pseudo-random order of all item tokens for one user: scores 1..80, no ties."""
    rng = np.random.default_rng(zlib.crc32(user_token.encode()))
    return dict(zip(ITEM_TOKENS, (rng.permutation(len(ITEM_TOKENS)) + 1).tolist()))


class TokenScorer(GeneralRecommender):
    """Scores from :func:`token_scores`, looked up through the dataset's own token tables."""

    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        user_tokens = dataset.field2id_token[dataset.uid_field]
        item_tokens = dataset.field2id_token[dataset.iid_field]
        table = np.zeros((len(user_tokens), len(item_tokens)))
        for uid, user in enumerate(user_tokens):
            if uid == 0:
                continue
            scores = token_scores(str(user))
            table[uid] = [scores.get(str(item), 0.0) for item in item_tokens]
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32))
        self.unused = torch.nn.Parameter(torch.zeros(1))  # RecBole's optimiser needs one

    def calculate_loss(self, interaction):
        return self.unused.sum()

    def predict(self, interaction):
        return self.table[interaction[self.USER_ID], interaction[self.ITEM_ID]]

    def full_sort_predict(self, interaction):
        return self.table[interaction[self.USER_ID]].reshape(-1)


def _tokens(dataset, part):
    feat = part.inter_feat
    return list(zip(dataset.id2token("user_id", feat["user_id"].numpy()).tolist(),
                    dataset.id2token("item_id", feat["item_id"].numpy()).tolist(),
                    feat["timestamp"].numpy().tolist()))


def test_single_stage_matches_recbole(tmp_path, make_config):
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer

    from recbole_ccd.config import validate_stream_config
    from recbole_ccd.data import build_stages, create_stream_dataset
    from recbole_ccd.evaluation import evaluate_scorer, model_scorer

    rows = random_rows(60, 80, 1500, seed=11, min_per_user=12)
    write_inter(tmp_path, "drop", rows)

    # The plugin: one stage holding everything.
    config = make_config("drop", model=TokenScorer, stage_incremental=0, stage_base_ratio=1.0,
                         **EVAL_SETTINGS)
    validate_stream_config(config)
    dataset = create_stream_dataset(config)
    (stage,) = build_stages(config, dataset)
    parts = {name: _tokens(dataset, getattr(stage, name)) for name in ("train", "valid", "test")}
    # Both pipelines rank the same items only if every item keeps an interaction in the split.
    assert {i for name in parts for _, i, _ in parts[name]} == set(ITEM_TOKENS)

    ours = evaluate_scorer(model_scorer(TokenScorer(config, stage.train).eval()),
                           stage.test_loader, config, stage.n_items)

    # RecBole: the same split as benchmark files.
    for name, part in parts.items():
        path = tmp_path / "bench" / f"bench.{name}.inter"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join([HEADER] + [f"{u}\t{i}\t{t}" for u, i, t in part]) + "\n")
    recbole_config = Config(model=TokenScorer, dataset="bench", config_dict={
        "data_path": str(tmp_path), "benchmark_filename": ["train", "valid", "test"],
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "use_gpu": False, "show_progress": False, **EVAL_SETTINGS,
    })
    recbole_dataset = create_dataset(recbole_config)
    _, _, test_data = data_preparation(recbole_config, recbole_dataset)
    assert len(test_data._dataset) == len(parts["test"])
    model = TokenScorer(recbole_config, test_data._dataset)
    theirs = Trainer(recbole_config, model).evaluate(test_data, load_best_model=False,
                                                     show_progress=False)

    assert set(ours) == {"recall@20", "recall@50", "ndcg@20", "ndcg@50"} == set(theirs)
    for metric in ours:
        assert ours[metric] == pytest.approx(float(theirs[metric]), abs=1e-9), metric
    # Not a trivial agreement: the scorer is neither perfect nor useless here.
    assert 0 < ours["recall@20"] < 1
