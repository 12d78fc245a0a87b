"""gerelion-dask: GPU-first, Dask-distributed RELION-style 3D auto-refinement and 3D classification.

Importing this package has no side effects: no CUDA context, no logging handlers (a NullHandler only), no files.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"
__all__ = ["__version__", "refine3d", "classify3d", "Job", "JobCancelled", "plan_memory"]

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {"refine3d": "api", "classify3d": "api", "Job": "api", "JobCancelled": "api", "plan_memory": "plan"}


def __getattr__(name):  # the client API is imported on first use (PEP 562): importing the package stays cheap
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
