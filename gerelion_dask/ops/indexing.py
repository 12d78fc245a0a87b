"""Index bookkeeping on the host: runs of consecutive integers laid end to end."""

from __future__ import annotations

import numpy as np

__all__ = ["concat_ranges"]


def concat_ranges(start, length) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(start, length)])`` as int64, without a Python loop
    (``start`` may be a scalar; lengths must be >= 0)."""
    n = np.asarray(length, np.int64)
    first = np.cumsum(n) - n  # each run's first position in the result
    return np.arange(int(n.sum()), dtype=np.int64) + np.repeat(np.asarray(start, np.int64) - first, n)
