"""gerelion-dask: GPU-first, Dask-distributed RELION-style 3D auto-refinement and 3D classification.

Importing this package has no side effects: no CUDA context, no logging handlers (a NullHandler only), no files.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"
__all__ = ["__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
