"""Model lookup: the plugin's models first, then RecBole's."""

from __future__ import annotations

from recbole_ccd import compat  # noqa: F401

import importlib

from recbole_ccd.errors import StreamConfigError


def get_model(model_name: str) -> type:
    """Return the model class called ``model_name``: the plugin's own, else RecBole's."""
    plugin_models = importlib.import_module("recbole_ccd.model")
    if hasattr(plugin_models, model_name):
        return getattr(plugin_models, model_name)
    import torch
    from recbole.utils import get_model as recbole_get_model

    # Looking a name up may import RecBole model modules; one of them (SINE) switches on
    # autograd anomaly detection for the whole process when imported.
    anomaly = torch.is_anomaly_enabled()
    try:
        return recbole_get_model(model_name)
    except (ValueError, AttributeError, ImportError):
        # ImportError: an unknown name reaches RecBole's last model package, whose import
        # needs xgboost and lightgbm.
        raise StreamConfigError(
            f"unknown model '{model_name}': use CCD, MF, LightGCN, or a RecBole general "
            "model name such as BPR (names are case-sensitive)."
        ) from None
    finally:
        torch.set_anomaly_enabled(anomaly)
