"""The plugin's RecBole model classes, found by name before RecBole's own."""

from recbole_ccd.model.backbones import MF, LightGCN
from recbole_ccd.model.ccd import CCD

__all__ = ["CCD", "MF", "LightGCN"]
