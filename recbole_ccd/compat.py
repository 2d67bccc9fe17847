"""Make RecBole 1.2.1 usable on the current scientific Python stack.

Import this module before anything from ``recbole`` (``recbole_ccd/__init__.py`` does). It
repairs, without editing RecBole:

* numpy >= 2 removed ``np.float_``, ``np.complex_`` and ``np.unicode_``, which
  ``recbole.config.Config.compatibility_settings`` reads; the aliases are restored only when
  missing.
* torch >= 2.6 loads checkpoints with ``weights_only=True``; :func:`load_checkpoint` reads the
  plugin's own files, which hold only tensors and plain Python values, in that safe mode.

Known breakages that are avoided rather than patched: ``recbole.quick_start`` (imports ray,
which fails on numpy 2) is never imported, and RecBole's ``LightGCN`` (built on
``scipy.sparse.dok_matrix`` internals removed in scipy 1.13) is replaced by the plugin's own.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import torch

_NUMPY_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}

for _name, _target in _NUMPY_ALIASES.items():
    if not hasattr(np, _name):
        setattr(np, _name, _target)


def load_checkpoint(path: str, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by :func:`save_atomic` (tensors and plain values only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _usual_mode(path: str) -> None:
    """Give a temporary file (created 0600) the permissions a plain ``open`` would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``.

    A crash while writing leaves the previous file (or none) in place, never a torn one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        _usual_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(text: str, path: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        _usual_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
