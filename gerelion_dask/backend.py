"""Array-backend selection from the inputs (NumPy or CuPy), never a process-wide switch.

Every numerical function in :mod:`gerelion_dask.ops` calls :func:`get_xp` on its array arguments and uses the
returned module (``numpy`` or ``cupy``).  CuPy is imported only when a CuPy array is actually passed in, so
``import gerelion_dask`` has no side effects and works on machines without CUDA.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["get_xp", "is_cupy", "to_host", "to_device_like", "scatter_add", "gpu_count", "deep_nbytes",
           "SizedByArrays"]


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


def scatter_add(target, idx, values) -> None:
    """``target.flat[idx] += values`` in place, repeated indices summed (``target`` contiguous, real or complex).

    NumPy: ``bincount`` (a fixed order: deterministic). CuPy: ``cupyx.scatter_add`` (atomic adds, so the last bits
    depend on the order threads run in) and no host synchronisation: CuPy's own ``bincount`` checks its indices and
    their maximum on the host, two waits for the device per call.
    """
    if not target.flags.c_contiguous:
        raise ValueError("scatter_add needs a C-contiguous target (a flat view of it is updated in place)")
    flat = target.reshape(-1)
    if is_cupy(target):
        import cupyx

        if flat.dtype.kind == "c":  # atomics on the real and imaginary parts
            view = flat.view(flat.real.dtype).reshape(-1, 2)
            cupyx.scatter_add(view[:, 0], idx, values.real)
            cupyx.scatter_add(view[:, 1], idx, values.imag)
        else:
            cupyx.scatter_add(flat, idx, values)
    elif flat.dtype.kind == "c":
        flat.real[:] += np.bincount(idx, weights=np.real(values), minlength=flat.size)
        flat.imag[:] += np.bincount(idx, weights=np.imag(values), minlength=flat.size)
    else:
        flat += np.bincount(idx, weights=values, minlength=flat.size)


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


def deep_nbytes(obj: Any) -> int:
    """Bytes held by the arrays inside ``obj`` (dataclasses, lists, tuples and dicts are walked; NumPy and CuPy arrays
    count their ``nbytes``; anything else counts ``sys.getsizeof``).

    The E-step's results and models get ``__sizeof__`` from it (:class:`SizedByArrays`), so Dask's ``sizeof`` (which
    falls back to ``sys.getsizeof``) sees their real size: the scheduler's placement and the workers' transfer logs
    depend on it.
    """
    import dataclasses

    if hasattr(obj, "nbytes") and hasattr(obj, "dtype"):
        return int(obj.nbytes)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return 64 + sum(deep_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return 56 + sum(deep_nbytes(x) for x in obj)
    if isinstance(obj, dict):
        return 64 + sum(deep_nbytes(k) + deep_nbytes(v) for k, v in obj.items())
    return sys.getsizeof(obj)


class SizedByArrays:
    """Base of the dataclasses that travel between Dask processes: ``sys.getsizeof`` (and so Dask's ``sizeof``)
    reports the bytes of the arrays inside (:func:`deep_nbytes`), not the object header."""

    __slots__ = ()

    def __sizeof__(self) -> int:
        return deep_nbytes(self)
