"""Shared helpers for the stream tests: tiny atomic files and plugin configs built in tmp_path.

RecBole's ``Config`` parses every ``--key=value`` it finds in ``sys.argv``, so the
``isolated`` fixture replaces ``sys.argv`` (and moves into ``tmp_path``, so that nothing is
written inside the repository) before a test builds a config.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

import recbole_ccd  # noqa: F401  (numpy compatibility before any recbole import)

import numpy as np
import pytest

HEADER = "user_id:token\titem_id:token\ttimestamp:float"

# Small settings for every test config: CPU, one quick epoch, no progress bars.
TEST_SETTINGS = {
    "show_progress": False,
    "epochs": 1,
    "use_gpu": False,
    "embedding_size": 8,
    "train_batch_size": 256,
    "metrics": ["Recall", "NDCG"],
    "topk": [5, 10],
    "valid_metric": "Recall@5",
}


def write_inter(folder: Path, name: str, rows: Iterable[tuple], header: str = HEADER) -> Path:
    """Write ``folder/name/name.inter`` with ``header`` and one tab-separated line per row."""
    path = Path(folder) / name / f"{name}.inter"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header] + ["\t".join(str(value) for value in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def random_rows(n_users: int, n_items: int, n: int, seed: int, t0: int = 1000,
                min_per_user: int = 0) -> list[tuple[str, str, int]]:
    """``n`` interactions (user token, item token, timestamp) with distinct increasing times.

    The first ``min_per_user * n_users`` rows give every user at least ``min_per_user``
    interactions; their order in time is shuffled with the rest.
    """
    rng = np.random.default_rng(seed)
    users = np.concatenate([np.repeat(np.arange(n_users), min_per_user),
                            rng.integers(0, n_users, n - min_per_user * n_users)])
    items = rng.integers(0, n_items, n)
    rng.shuffle(users)
    return [(f"u{u}", f"i{i}", t0 + t) for t, (u, i) in enumerate(zip(users, items))]


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Run inside ``tmp_path`` with a bare ``sys.argv``; drop the plugin's log handlers after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    yield tmp_path
    from recbole_ccd.quick_start import remove_log_handlers

    remove_log_handlers()


@pytest.fixture
def make_config(isolated):
    """Build a :class:`CCDConfig` for a dataset under ``tmp_path`` with test settings.

    ``make_config(name, model="MF", **overrides)``; ``overrides`` win over the test settings.
    """
    from recbole_ccd.config import CCDConfig

    def build(name: str, model: str = "MF", **overrides):
        settings = {"data_path": str(isolated), **TEST_SETTINGS, **overrides}
        return CCDConfig(model=model, dataset=name, config_dict=settings)

    return build


@pytest.fixture
def build_stream(make_config):
    """``build_stream(name, model="MF", **overrides) -> (config, dataset, stages)``."""
    from recbole_ccd.config import validate_stream_config
    from recbole_ccd.data import build_stages, create_stream_dataset

    def build(name: str, model: str = "MF", **overrides):
        config = make_config(name, model, **overrides)
        validate_stream_config(config)
        dataset = create_stream_dataset(config)
        return config, dataset, build_stages(config, dataset)

    return build
