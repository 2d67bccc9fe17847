"""A RecBole :class:`Dataset` whose ids follow first appearance in time."""

from __future__ import annotations

import os

from recbole_ccd import compat  # noqa: F401

import numpy as np
import pandas as pd
from recbole.config import Config
from recbole.data.dataset import Dataset

from recbole_ccd.errors import StreamConfigError


def _header_fields(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\r\n")
    fields = {}
    for column in header.split("\t"):
        name, _, kind = column.partition(":")
        fields[name] = kind
    return fields


def check_atomic_file(config: Config) -> str:
    """Validate ``<data_path>/<dataset>.inter`` before RecBole reads it.

    Checks that the file exists, that its header declares the user, item and time fields,
    and that no row has an empty id or a missing or non-numeric timestamp.

    Returns:
        The path of the checked file.
    """
    dataset = config["dataset"]
    folder = config["data_path"]
    path = os.path.join(folder, f"{dataset}.inter")
    if not os.path.isdir(folder):
        raise StreamConfigError(
            f"dataset folder '{folder}' does not exist: put {dataset}.inter there or set "
            "--data_path to the folder that holds <dataset>/<dataset>.inter."
        )
    if not os.path.isfile(path):
        raise StreamConfigError(f"'{path}' does not exist: the stream needs a .inter file.")

    if os.path.getsize(path) == 0:
        raise StreamConfigError(
            f"'{path}' is empty: it needs a header line (e.g. "
            "'user_id:token<TAB>item_id:token<TAB>timestamp:float') and one line per "
            "interaction.")
    fields = _header_fields(path)
    uid, iid, time = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"], config["TIME_FIELD"]
    for name, role in ((uid, "USER_ID_FIELD"), (iid, "ITEM_ID_FIELD"), (time, "TIME_FIELD")):
        if name not in fields:
            raise StreamConfigError(
                f"'{path}' has no column '{name}' ({role}); its header declares "
                f"{list(fields)}. Rename the column or set {role}."
            )
    if fields[time] != "float":
        raise StreamConfigError(
            f"'{path}': the time field '{time}' must be declared as '{time}:float', "
            f"found '{time}:{fields[time]}'."
        )

    # Default NA handling, as RecBole reads the file: 'nan', 'NA', 'null', ... become missing.
    table = pd.read_csv(
        path, sep="\t", usecols=[f"{uid}:{fields[uid]}", f"{iid}:{fields[iid]}",
                                 f"{time}:float"],
        dtype=str, engine="c",
    )
    table.columns = [col.split(":")[0] for col in table.columns]
    if len(table) == 0:
        raise StreamConfigError(f"'{path}' holds no interactions.")
    for name in (uid, iid):
        empty = np.flatnonzero((table[name].fillna("").str.strip() == "").to_numpy())
        if len(empty):
            raise StreamConfigError(
                f"'{path}': field '{name}' is empty or NaN in {len(empty)} rows "
                f"(first at line {empty[0] + 2} of the file); RecBole reads empty cells and "
                "tokens such as 'nan', 'NA' or 'null' as missing."
            )
    times = pd.to_numeric(table[time], errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(times))
    if len(bad):
        first = table[time].iloc[bad[0]]
        shown = repr(first) if isinstance(first, str) else "empty or NA"
        raise StreamConfigError(
            f"'{path}': field '{time}' is missing or not a number in {len(bad)} rows "
            f"(first at line {bad[0] + 2} of the file: {shown})."
        )
    return path


class StreamDataset(Dataset):
    """RecBole dataset sorted by time before ids are assigned.

    Users and items then get ids in order of first appearance, so the entities first seen
    in stage k occupy one contiguous id range, and embedding tables grow by appending rows.
    ``timestamps`` keeps the raw, sorted time of every interaction (before any
    normalisation RecBole may apply).
    """

    def _remap_ID_all(self):
        order = np.argsort(self.inter_feat[self.time_field].to_numpy(), kind="stable")
        self.inter_feat = self.inter_feat.iloc[order].reset_index(drop=True)
        self.timestamps = self.inter_feat[self.time_field].to_numpy(dtype=np.float64).copy()
        super()._remap_ID_all()


def create_stream_dataset(config: Config) -> StreamDataset:
    """Check the atomic file, load it with RecBole and return the time-ordered dataset."""
    check_atomic_file(config)
    return StreamDataset(config)
