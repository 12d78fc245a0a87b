"""CuPy twins of :mod:`gerelion_dask.ops.likelihood` (imported only when CuPy arrays are passed there).

Each is one element-wise kernel over the coarse-pass block, with the inputs broadcast by CuPy exactly as the NumPy
formula broadcasts them, and the same operation order in float64 (``tests/test_ops.py`` compares them on the GPU).
"""

from __future__ import annotations

from functools import cache

import cupy


@cache
def coarse_diff2_kernel():
    """``(g, a_plus_hr, p, lpo, off, out)``: ``out = isfinite(lpo) && isfinite(off) ? (ah + p) - 2 g : +inf``."""
    return cupy.ElementwiseKernel(
        "G g, float64 ah, float64 p, float64 lpo, float64 off",
        "float64 d",
        "d = (isfinite(lpo) && isfinite(off)) ? (ah + p) - 2.0 * (double)g"
        " : __longlong_as_double(0x7ff0000000000000LL);",
        "gerelion_coarse_diff2",
    )


@cache
def coarse_weights_kernel():
    """``(d, dmin, lpo, off)``: ``w = d - dmin <= 700 ? exp(-(d - dmin) + (lpo + off)) : 0``."""
    return cupy.ElementwiseKernel(
        "float64 d, float64 dmin, float64 lpo, float64 off",
        "float64 w",
        "double x = d - dmin; w = (x <= 700.0) ? exp(-x + (lpo + off)) : 0.0;",
        "gerelion_coarse_weights",
    )
