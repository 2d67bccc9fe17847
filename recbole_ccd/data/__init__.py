"""Stream data: time-ordered stages cut from one RecBole atomic file."""

from recbole_ccd.data.dataset import StreamDataset, check_atomic_file, create_stream_dataset
from recbole_ccd.data.stream import Stage, StageSampler, build_stages

__all__ = [
    "Stage",
    "StageSampler",
    "StreamDataset",
    "build_stages",
    "check_atomic_file",
    "create_stream_dataset",
]
