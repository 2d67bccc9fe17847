#!/usr/bin/env python
"""Turn the CCD authors' Gowalla stage files into one RecBole atomic ``.inter`` file.

The authors of "Continual Collaborative Distillation for Recommender System" (KDD 2024)
published Gowalla as six pickles, ``TASK_0.pickle`` ... ``TASK_5.pickle`` (block D0 and
the incremental blocks D1 ... D5, in time order). Each is a dict with ``train_dict``,
``valid_dict``, ``test_dict`` (user id -> list of item ids) and ``item_list``.

The output holds every (user, item) pair of every block's train + valid + test split, with
a synthetic timestamp: block ``k``'s rows get ``k * 1_000_000 + j`` where ``j`` counts the
block's rows after sorting them by (user id, item id). The authors did not publish real
check-in times, so the timestamp only encodes block order (plus a deterministic order
inside a block). ``properties/dataset/gowalla.yaml`` splits the stages at multiples of
1,000,000, which gives back exactly the six published blocks.

Pickles can run code when loaded, so they are read with an unpickler that only allows the
builtin containers and ``collections.defaultdict`` / ``OrderedDict``.

Usage::

    python dataset/prepare_gowalla.py [--source DIR] [--output FILE]
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "ccd-gowalla"
DEFAULT_OUTPUT = REPO_ROOT / "dataset" / "gowalla" / "gowalla.inter"

NUM_BLOCKS = 6
BLOCK_STRIDE = 1_000_000
SPLIT_KEYS = ("train_dict", "valid_dict", "test_dict")
REQUIRED_KEYS = (*SPLIT_KEYS, "item_list")
HEADER = ["user_id:token", "item_id:token", "timestamp:float"]

ALLOWED_GLOBALS = frozenset(
    {
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "int"),
        ("builtins", "set"),
        ("builtins", "tuple"),
        ("collections", "defaultdict"),
        ("collections", "OrderedDict"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves a fixed allow-list of harmless container globals."""

    def find_class(self, module: str, name: str) -> Any:
        """Return the allowed global ``module.name``; refuse anything else."""
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name!s}: only builtin containers "
            "(dict, list, int, set, tuple) and collections.defaultdict/OrderedDict are allowed"
        )


def _is_int(value: Any) -> bool:
    """True for a plain integer id (bool is rejected)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(block: Any, path: Path) -> None:
    """Raise ``ValueError`` naming the file and key if ``block`` is not a stage dict."""
    if not isinstance(block, dict):
        raise ValueError(f"{path}: expected a dict at top level, got {type(block).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in block]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    for key in SPLIT_KEYS:
        split = block[key]
        if not isinstance(split, dict):
            raise ValueError(f"{path}: {key} must be a dict, got {type(split).__name__}")
        for user, items in split.items():
            if not _is_int(user):
                raise ValueError(f"{path}: {key} has a non-integer user id {user!r}")
            if not isinstance(items, list):
                raise ValueError(
                    f"{path}: {key}[{user}] must be a list, got {type(items).__name__}"
                )
            if not all(_is_int(item) for item in items):
                raise ValueError(f"{path}: {key}[{user}] holds a non-integer item id")
    item_list = block["item_list"]
    if not isinstance(item_list, (list, set, tuple)):
        raise ValueError(
            f"{path}: item_list must be a list, got {type(item_list).__name__}"
        )
    if not all(_is_int(item) for item in item_list):
        raise ValueError(f"{path}: item_list holds a non-integer item id")


def load_block(path: str | os.PathLike[str]) -> dict:
    """Load and validate one ``TASK_k.pickle`` with the restricted unpickler.

    Raises ``pickle.UnpicklingError`` if the pickle references a disallowed global and
    ``ValueError`` if its structure is not the expected stage dict.
    """
    path = Path(path)
    with path.open("rb") as handle:
        try:
            block = RestrictedUnpickler(handle).load()
        except pickle.UnpicklingError as exc:
            raise pickle.UnpicklingError(f"{path}: {exc}") from exc
    _validate(block, path)
    return block


def block_frame(block: dict, index: int) -> pd.DataFrame:
    """Rows of one block sorted by (user, item), with timestamps ``index * 1e6 + j``."""
    users: list[int] = []
    items: list[int] = []
    for key in SPLIT_KEYS:
        for user, user_items in block[key].items():
            users.extend([user] * len(user_items))
            items.extend(user_items)
    if len(users) >= BLOCK_STRIDE:
        raise ValueError(f"block {index} has {len(users)} rows, more than {BLOCK_STRIDE - 1}")
    frame = pd.DataFrame({"user_id": users, "item_id": items}, dtype="int64")
    frame = frame.sort_values(["user_id", "item_id"], kind="stable", ignore_index=True)
    frame["timestamp"] = index * BLOCK_STRIDE + pd.RangeIndex(len(frame)).to_numpy()
    return frame


def convert(
    source_dir: str | os.PathLike[str], output_path: str | os.PathLike[str]
) -> list[int]:
    """Convert ``TASK_0..5.pickle`` in ``source_dir`` into ``output_path``.

    Returns the number of rows written for each block. The file is written atomically
    (temp file in the same folder, then ``os.replace``).
    """
    source_dir = Path(source_dir)
    output_path = Path(output_path)
    frames = [
        block_frame(load_block(source_dir / f"TASK_{k}.pickle"), k) for k in range(NUM_BLOCKS)
    ]
    counts = [len(frame) for frame in frames]
    table = pd.concat(frames, ignore_index=True)
    duplicated = int(table.duplicated(["user_id", "item_id"]).sum())
    if duplicated:
        raise ValueError(f"{duplicated} (user, item) pairs occur more than once")

    output_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{output_path.name}.", suffix=".tmp", dir=output_path.parent
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            table.to_csv(handle, sep="\t", header=HEADER, index=False, lineterminator="\n")
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, output_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return counts


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE,
        help=f"folder with TASK_0..5.pickle (default: {DEFAULT_SOURCE})",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT,
        help=f"atomic .inter file to write (default: {DEFAULT_OUTPUT})",
    )
    args = parser.parse_args(argv)
    counts = convert(args.source, args.output)
    for k, count in enumerate(counts):
        print(f"block {k} (TASK_{k}): {count:>9,} rows")
    print(f"total: {sum(counts):,} rows -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
