"""The plugin's RecBole model classes, found by name before RecBole's own."""

from recbole_ccd.model.backbones import MF, LightGCN

__all__ = ["MF", "LightGCN"]
