"""CuPy twin of :func:`gerelion_dask.ops.likelihood.children_diff2` (imported only when CuPy arrays are passed there).

One thread block per significant sample: its threads stride over the likelihood pixels, each keeping the 32 cross
terms (8 fine orientations x 4 fine translations) and the 8 model terms (|P|^2 made from the projection itself) of
its pixels in registers, so a sample reads its particle's image, its 4 phase rows and its 8 projection rows once and
writes its 32 diff2 values; nothing is
evaluated for children of other particles (the dense products over a chunk's union of orientations and translations
that this replaces did 160-540x the particles' own work, ``benchmarks/RESULTS.md``, tenth session).  The block sums
its threads' values in a fixed order (warp shuffles, then the warps in turn): the result does not depend on timing.
"""

from __future__ import annotations

from functools import cache

import cupy
import numpy as np

_THREADS = 128

_SRC = r"""
#define NT 128
extern "C" __global__ void __launch_bounds__(NT)
gerelion_children_diff2(const double* Z, const double* V, const double* a, const double* ph, const double* P,
                        const long long* jrow, const long long* prow, const long long* trow,
                        long long R, long long M, int cc, double* d) {
    const long long r = blockIdx.x;
    if (r >= R) return;
    const long long j = jrow[r];
    const double* z = Z + 2 * j * M;
    const double* v = V + j * M;
    const double* s0 = ph + 2 * trow[r] * M;
    long long pf[8];
    for (int f = 0; f < 8; ++f) pf[f] = prow[8 * r + f] * M;
    double g[32], pp[8];
    for (int i = 0; i < 32; ++i) g[i] = 0.0;
    for (int f = 0; f < 8; ++f) pp[f] = 0.0;
    for (long long m = threadIdx.x; m < M; m += NT) {
        const double zr = z[2 * m], zi = z[2 * m + 1], vm = v[m];
        double yr[4], yi[4];
        for (int t = 0; t < 4; ++t) {
            const double sr = s0[2 * (t * M + m)], si = s0[2 * (t * M + m) + 1];
            yr[t] = zr * sr - zi * si;
            yi[t] = zr * si + zi * sr;
        }
        for (int f = 0; f < 8; ++f) {
            const double pr = P[2 * (pf[f] + m)], pi = P[2 * (pf[f] + m) + 1];
            pp[f] += vm * (pr * pr + pi * pi);
            for (int t = 0; t < 4; ++t) g[4 * f + t] += yr[t] * pr + yi[t] * pi;
        }
    }
    __shared__ double part[NT / 32][40];
    __shared__ double tot[40];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    for (int i = 0; i < 40; ++i) {
        double x = i < 32 ? g[i] : pp[i - 32];
        for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
        if (lane == 0) part[wid][i] = x;
    }
    __syncthreads();
    if (threadIdx.x < 40) {
        double x = 0.0;
        for (int w = 0; w < NT / 32; ++w) x += part[w][threadIdx.x];
        tot[threadIdx.x] = x;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        const int f = threadIdx.x >> 2;
        const double gv = tot[threadIdx.x], pv = tot[32 + f];
        d[32 * r + threadIdx.x] = cc ? -gv / (sqrt(pv) * a[j] + 1e-300) : (a[j] + pv) - 2.0 * gv;
    }
}
"""


@cache
def _kernel():
    return cupy.RawKernel(_SRC, "gerelion_children_diff2")


def children_diff2(Z, V, a, ph, P, j, prow, trow, cc: bool = False):
    """CuPy twin of :func:`gerelion_dask.ops.likelihood.children_diff2` (same arguments but ``max_elems``: the
    kernel keeps no temporaries)."""
    f64, i64 = np.float64, np.int64
    R = int(len(j))
    out = cupy.empty((R, 32), f64)
    if R == 0:
        return out
    M = int(Z.shape[1])
    Z = cupy.ascontiguousarray(Z, dtype=np.complex128)
    ph = cupy.ascontiguousarray(ph, dtype=np.complex128)
    P = cupy.ascontiguousarray(P, dtype=np.complex128)
    V, a = (cupy.ascontiguousarray(x, dtype=f64) for x in (V, a))
    j, prow, trow = (cupy.ascontiguousarray(cupy.asarray(x), dtype=i64) for x in (j, prow, trow))
    _kernel()((R,), (_THREADS,), (Z, V, a, ph, P, j, prow, trow, np.int64(R), np.int64(M), np.int32(cc), out))
    return out
