"""Array-backend selection from the inputs (NumPy or CuPy), never a process-wide switch.

Every numerical function in :mod:`gerelion_dask.ops` calls :func:`get_xp` on its array arguments and uses the
returned module (``numpy`` or ``cupy``).  CuPy is imported only when a CuPy array is actually passed in, so
``import gerelion_dask`` has no side effects and works on machines without CUDA.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["get_xp", "is_cupy", "to_host", "to_device_like", "gpu_count"]


def is_cupy(a: Any) -> bool:
    """True if ``a`` is a CuPy array (checked without importing CuPy)."""
    return type(a).__module__.split(".")[0] == "cupy"


def get_xp(*arrays: Any):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy`` (like ``cupy.get_array_module``)."""
    for a in arrays:
        if is_cupy(a):
            return sys.modules["cupy"]
    return np


def to_host(a: Any) -> np.ndarray:
    """Copy a CuPy array to host memory; NumPy arrays and scalars pass through."""
    if is_cupy(a):
        return a.get()
    return np.asarray(a)


def to_device_like(a: Any, like: Any):
    """Put ``a`` on the same backend as ``like``."""
    xp = get_xp(like)
    return xp.asarray(a)


def gpu_count() -> int:
    """Number of CUDA devices visible, 0 when CuPy or a driver is missing (creates no context on failure)."""
    try:
        import cupy
    except Exception:  # ImportError, or a broken CUDA install
        return 0
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0
