"""Tests for the Gowalla atomic file and its converter ``dataset/prepare_gowalla.py``."""

from __future__ import annotations

import collections
import importlib.util
import pickle
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "dataset" / "prepare_gowalla.py"
INTER = REPO_ROOT / "dataset" / "gowalla" / "gowalla.inter"
SOURCE = REPO_ROOT.parent / "shared" / "data" / "ccd-gowalla"

HEADER = "user_id:token\titem_id:token\ttimestamp:float"
BOUNDARIES = [1_000_000, 2_000_000, 3_000_000, 4_000_000, 5_000_000]
PUBLISHED_COUNTS = [512_784, 49_748, 101_914, 112_797, 116_268, 77_684]


def _load_script() -> ModuleType:
    """Import ``dataset/prepare_gowalla.py`` from its file path."""
    spec = importlib.util.spec_from_file_location("prepare_gowalla", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prep() -> ModuleType:
    """The converter module."""
    return _load_script()


@pytest.fixture(scope="module")
def inter() -> pd.DataFrame:
    """The committed atomic file."""
    return pd.read_csv(INTER, sep="\t")


def test_header() -> None:
    with INTER.open(encoding="utf-8") as handle:
        assert handle.readline().rstrip("\n") == HEADER


def test_block_counts_match_published(inter: pd.DataFrame) -> None:
    stamps = inter["timestamp:float"].to_numpy()
    stage = np.searchsorted(BOUNDARIES, stamps, side="right")
    counts = np.bincount(stage, minlength=len(PUBLISHED_COUNTS)).tolist()
    assert counts == PUBLISHED_COUNTS
    assert len(inter) == 971_195


def test_users_items_and_no_duplicates(inter: pd.DataFrame) -> None:
    assert inter["user_id:token"].nunique() == 29_858
    assert inter["item_id:token"].nunique() == 40_988
    assert not inter.duplicated(["user_id:token", "item_id:token"]).any()
    assert inter["timestamp:float"].is_unique


class _Evil:
    """Pickles to a call of ``os.system``; must never be unpickled for real."""

    def __reduce__(self) -> tuple:
        import os

        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_os_system(prep: ModuleType, tmp_path: Path) -> None:
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"evil_{protocol}.pickle"
        path.write_bytes(pickle.dumps({"train_dict": _Evil()}, protocol=protocol))
        with pytest.raises(pickle.UnpicklingError, match="system"):
            prep.load_block(path)
    # hand-built GLOBAL opcode payload: os.system('true')
    path = tmp_path / "evil_raw.pickle"
    path.write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        prep.load_block(path)


def test_restricted_unpickler_accepts_containers(prep: ModuleType, tmp_path: Path) -> None:
    train = collections.defaultdict(list, {0: [1, 2], 1: [3]})
    block = {
        "train_dict": train,
        "valid_dict": collections.defaultdict(list, {0: [4]}),
        "test_dict": {1: [5]},
        "item_list": [1, 2, 3],
    }
    path = tmp_path / "TASK_0.pickle"
    path.write_bytes(pickle.dumps(block, protocol=pickle.HIGHEST_PROTOCOL))
    loaded = prep.load_block(path)
    assert loaded == block
    assert isinstance(loaded["train_dict"], collections.defaultdict)


def test_malformed_block_is_named(prep: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "TASK_3.pickle"
    path.write_bytes(pickle.dumps({"train_dict": {0: [1]}, "valid_dict": {}, "test_dict": {}}))
    with pytest.raises(ValueError, match=r"TASK_3\.pickle.*item_list"):
        prep.load_block(path)


@pytest.mark.skipif(not SOURCE.is_dir(), reason=f"source folder {SOURCE} not present")
def test_conversion_reproduces_committed_file(prep: ModuleType, tmp_path: Path) -> None:
    output = tmp_path / "gowalla.inter"
    counts = prep.convert(SOURCE, output)
    assert counts == PUBLISHED_COUNTS
    assert output.read_bytes() == INTER.read_bytes()
