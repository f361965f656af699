"""Helpers for the training tests (the labelled store fixture is in tests/conftest.py)."""

from __future__ import annotations

import numpy as np


def ids(n):
    return np.array([f"t{i}" for i in range(n)], dtype=object)


__all__ = ["ids"]
