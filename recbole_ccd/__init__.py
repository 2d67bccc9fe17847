"""recbole-ccd: Continual Collaborative Distillation as a RecBole 1.2.1 plugin."""

from recbole_ccd import compat  # noqa: F401  (must run before any recbole import)

__version__ = "0.1.0"
