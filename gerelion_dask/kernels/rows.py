"""CuPy twin of the fine pass's scatter-add of rows (``expectation/fine.py::_add_rows``).

``add_rows(target, rows, values)`` adds ``values[i]`` to ``target[rows[i]]``: the rows are sorted on the device and one
thread block per run of equal rows sums its values column by column in a fixed order, then adds the sum once.  No
atomics: CuPy's ``add.at`` serialises the adds of many rows into one target row (the noise sums of a particle take
one row per orientation it keeps weight on), and its sums depend on the order the adds land in.
"""

from __future__ import annotations

from functools import cache

import cupy
import numpy as np

_SRC = r"""
extern "C" __global__ void gerelion_add_row_runs(const double* v, const long long* order, const long long* start,
                                                 const long long* row, long long n_runs, long long width,
                                                 double* target) {
    long long s = blockIdx.x;
    long long col = (long long)blockIdx.y * blockDim.x + threadIdx.x;
    if (s >= n_runs || col >= width) return;
    double acc = 0.0;
    for (long long k = start[s]; k < start[s + 1]; ++k) acc += v[order[k] * width + col];
    target[row[s] * width + col] += acc;
}
"""

_THREADS = 256


@cache
def _kernel():
    return cupy.RawKernel(_SRC, "gerelion_add_row_runs")


def add_rows(target, rows, values) -> None:
    """``target[rows[i]] += values[i]`` for float64 ``target (R, W)`` and ``values (n, W)`` (C-contiguous) and int
    ``rows (n,)`` on the device."""
    n = int(rows.size)
    if n == 0:
        return
    if not (target.flags.c_contiguous and target.dtype == np.float64):
        raise ValueError("add_rows needs a C-contiguous float64 target")
    values = cupy.ascontiguousarray(values, dtype=np.float64)
    rows = cupy.asarray(rows, dtype=np.int64)
    order = cupy.argsort(rows)
    srt = rows[order]
    start = cupy.concatenate([cupy.zeros(1, np.int64), cupy.flatnonzero(srt[1:] != srt[:-1]).astype(np.int64) + 1,
                              cupy.full(1, n, np.int64)])
    n_runs = int(start.size) - 1
    width = int(values.shape[1])
    grid = (n_runs, (width + _THREADS - 1) // _THREADS)
    _kernel()(grid, (_THREADS,), (values, order, start, srt[start[:-1]], np.int64(n_runs), np.int64(width), target))
