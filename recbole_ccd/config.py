"""Configuration: RecBole's :class:`Config` with the plugin's yaml layered beneath the user's.

Priority, highest first: command line ``--key=value``, ``config_dict``, ``--config_files``,
then the plugin's ``properties/dataset/<dataset>.yaml``, ``properties/model/<Model>.yaml``,
``properties/overall.yaml``, then RecBole's own defaults.
"""

from __future__ import annotations

import math
import os
from numbers import Number
from typing import Any

from recbole_ccd import compat  # noqa: F401

from recbole.config import Config
from recbole.utils import ModelType

from recbole_ccd.errors import StreamConfigError
from recbole_ccd.utils import get_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
PROPERTIES_DIR = os.path.join(REPO_ROOT, "properties")
DATASET_DIR = os.path.join(REPO_ROOT, "dataset")

STREAM_STRATEGIES = ("finetune", "retrain")


class CCDConfig(Config):
    """RecBole config that knows the plugin's models and default yaml files."""

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise StreamConfigError("no model given: pass --model=NAME (e.g. CCD, BPR).")
        if isinstance(model, str):
            model_name, model_class = model, get_model(model)
        else:
            model_name, model_class = model.__name__, model
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise StreamConfigError("no dataset given: pass --dataset=NAME (e.g. ml-100k).")
        return model_name, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        self.internal_config_dict["data_path"] = DATASET_DIR
        for path in (
            os.path.join(PROPERTIES_DIR, "overall.yaml"),
            os.path.join(PROPERTIES_DIR, "model", f"{model}.yaml"),
            os.path.join(PROPERTIES_DIR, "dataset", f"{dataset}.yaml"),
        ):
            if os.path.isfile(path):
                added = self._update_internal_config_dict(path)
                if path.endswith(os.path.join("dataset", f"{dataset}.yaml")):
                    self.parameters["Dataset"] += [
                        key for key in added if key not in self.parameters["Dataset"]
                    ]


def _is_number(value: Any) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool) and math.isfinite(value)


def check_positive_ints(config: Any, keys: tuple[str, ...]) -> None:
    """Each of ``keys`` must be set to a positive integer."""
    for key in keys:
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise StreamConfigError(f"{key} must be a positive integer, got {value!r}.")


def validate_stream_config(config: Config) -> None:
    """Check the stream settings before any data is read; raise with what to fix."""
    if config["MODEL_TYPE"] != ModelType.GENERAL:
        raise StreamConfigError(
            f"model {config['model']} is not a general (user-item) recommender; the stream "
            "supports RecBole general models such as BPR, LightGCN, MF and CCD."
        )
    time_field = config["TIME_FIELD"]
    load_col = config["load_col"]
    if not time_field:
        raise StreamConfigError("TIME_FIELD is not set: the stream is ordered by time.")
    if isinstance(load_col, dict) and time_field not in load_col.get("inter", []):
        raise StreamConfigError(
            f"load_col.inter must include the time field '{time_field}' "
            f"(got {load_col.get('inter')})."
        )

    ratios = config["stage_split_ratios"]
    if (
        not isinstance(ratios, (list, tuple))
        or len(ratios) != 3
        or not all(_is_number(r) and r >= 0 for r in ratios)
    ):
        raise StreamConfigError(
            f"stage_split_ratios must be three non-negative numbers [train, valid, test], "
            f"got {ratios!r}."
        )
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise StreamConfigError(
            f"stage_split_ratios must add up to 1, got {ratios} = {sum(ratios):g}.")
    if min(ratios) <= 0:
        raise StreamConfigError(
            f"stage_split_ratios needs train, valid and test all > 0, got {ratios}."
        )

    boundaries = config["stage_boundaries"]
    if boundaries is not None:
        if not isinstance(boundaries, (list, tuple)) or not all(_is_number(b) for b in boundaries):
            raise StreamConfigError(
                f"stage_boundaries must be a list of timestamps, got {boundaries!r}."
            )
        if any(b >= c for b, c in zip(boundaries, boundaries[1:])):
            raise StreamConfigError(f"stage_boundaries must increase strictly, got {boundaries}.")
    else:
        base = config["stage_base_ratio"]
        n_incremental = config["stage_incremental"]
        if (not isinstance(n_incremental, int) or isinstance(n_incremental, bool)
                or n_incremental < 0):
            raise StreamConfigError(
                f"stage_incremental must be a non-negative integer, got {n_incremental!r}."
            )
        upper_ok = base <= 1 if n_incremental == 0 else base < 1
        if not _is_number(base) or base <= 0 or not upper_ok:
            raise StreamConfigError(
                "stage_base_ratio must be in (0, 1) (or exactly 1 with stage_incremental=0), "
                f"got {base!r}."
            )

    strategy = config["stream_strategy"]
    if strategy not in STREAM_STRATEGIES:
        raise StreamConfigError(
            f"stream_strategy must be one of {STREAM_STRATEGIES}, got {strategy!r}."
        )
    computed = [f"{metric.lower()}@{k}" for metric in config["metrics"] for k in config["topk"]]
    if str(config["valid_metric"]).lower() not in computed:
        raise StreamConfigError(
            f"valid_metric {config['valid_metric']!r} is not computed: it must be one of "
            f"metrics x topk ({', '.join(computed)})."
        )
    if config["model"] == "CCD":
        from recbole_ccd.model.ccd import validate_ccd_config

        validate_ccd_config(config)
    check_positive_ints(config, ("epochs", "train_batch_size", "eval_batch_size"))
