"""CuPy twins of :mod:`gerelion_dask.ops.likelihood` (imported only when CuPy arrays are passed there).

``coarse_diff2`` and ``coarse_weights`` are one element-wise kernel each over the coarse-pass block, with the inputs
broadcast by CuPy exactly as the NumPy formula broadcasts them; ``coarse_select`` is four passes of one thread block
over slices of each particle's samples.  All use the NumPy functions' operation order in float64 (``tests/test_ops.py`` compares them on the
GPU).
"""

from __future__ import annotations

from functools import cache

import cupy
import numpy as np


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


_SELECT_SRC = r"""
#define GD_INF __longlong_as_double(0x7ff0000000000000LL)
#define GD_BIG 0x7fffffffffffffffLL

// (v, i) pairs: keep the smaller v (sign = 1) or the larger v (sign = -1); ties go to the smaller index
__device__ __forceinline__ void pick(double& v, long long& i, double v2, long long i2, int sign) {
    bool better = sign > 0 ? (v2 < v) : (v2 > v);
    if (better || (v2 == v && i2 < i)) { v = v2; i = i2; }
}

__device__ void block_pick(double& v, long long& i, int sign, double* sv, long long* si) {
    for (int o = 16; o > 0; o >>= 1)
        pick(v, i, __shfl_down_sync(0xffffffffu, v, o), __shfl_down_sync(0xffffffffu, i, o), sign);
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) { sv[wid] = v; si[wid] = i; }
    __syncthreads();
    if (wid == 0) {
        v = lane < nw ? sv[lane] : (sign > 0 ? GD_INF : -GD_INF);
        i = lane < nw ? si[lane] : GD_BIG;
        for (int o = 16; o > 0; o >>= 1)
            pick(v, i, __shfl_down_sync(0xffffffffu, v, o), __shfl_down_sync(0xffffffffu, i, o), sign);
    }
}

__device__ double block_sum(double v, double* sv) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) sv[wid] = v;
    __syncthreads();
    if (wid == 0) {
        v = lane < nw ? sv[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    }
    return v;
}

// Block (slice s = blockIdx.x, particle j = blockIdx.y) walks the lines (k, t) of its slice; the threads of the block
// stride over the U orientations of a line, so each thread meets its samples in increasing column order
// (column = (k * T + t) * U + u).  SAMPLE sets d (diff2, +inf if not searched) and lp (log prior) for (k, t, u).
#define ARGS const G_T* g, const double* ah, const double* p, const double* dl, const double* pl, \
             const double* off, int b, int K, int T, int U, int nd, int npsi, int lines_per_slice
#define WALK_BEGIN \
    const long long j = blockIdx.y; \
    const int line0 = blockIdx.x * lines_per_slice; \
    const int line1 = min(line0 + lines_per_slice, K * T); \
    for (int line = line0; line < line1; ++line) { \
        const int k = line / T, t = line - k * T; \
        const double of = off[j * T + t]; \
        const G_T* gl = g + (((long long)k * b + j) * T + t) * U; \
        const double* pk = p + ((long long)k * b + j) * U; \
        const double* dk = dl + (j * K + k) * nd; \
        for (int u = threadIdx.x; u < U; u += blockDim.x) { \
            const long long col = (long long)line * U + u; \
            const int id = u / npsi; \
            const double lpo = dk[id] + pl[j * npsi + (u - id * npsi)]; \
            const double lp = lpo + of; \
            const double d = (isfinite(lpo) && isfinite(of)) ? (ah[j] + pk[u]) - 2.0 * (double)gl[u] : GD_INF;
#define WALK_END }}

__device__ __forceinline__ double weight(double d, double dmin, double lp) {
    double x = d - dmin;
    return (x <= 700.0) ? exp(-x + lp) : 0.0;
}

// pass 1: per slice, the smallest diff2 and its first column
template <typename G_T>
__global__ void coarse_min(ARGS, double* vmin, long long* imin) {
    __shared__ double sv[32];
    __shared__ long long si[32];
    double v = GD_INF;
    long long i = GD_BIG;
    WALK_BEGIN
        pick(v, i, d, col, 1);
    WALK_END
    block_pick(v, i, 1, sv, si);
    if (threadIdx.x == 0) { vmin[j * gridDim.x + blockIdx.x] = v; imin[j * gridDim.x + blockIdx.x] = i; }
}

// pass 2: per slice, the sum of the weights and the first column of the largest one
template <typename G_T>
__global__ void coarse_sum(ARGS, const double* dmin, double* vsum, double* vmax, long long* imax) {
    __shared__ double sv[32];
    __shared__ long long si[32];
    double acc = 0.0, v = -1.0;
    long long i = GD_BIG;
    const double dm = dmin[blockIdx.y];
    WALK_BEGIN
        const double w = weight(d, dm, lp);
        acc += w;
        pick(v, i, w, col, -1);
    WALK_END
    acc = block_sum(acc, sv);
    if (threadIdx.x == 0) vsum[j * gridDim.x + blockIdx.x] = acc;
    block_pick(v, i, -1, sv, si);
    if (threadIdx.x == 0) { vmax[j * gridDim.x + blockIdx.x] = v; imax[j * gridDim.x + blockIdx.x] = i; }
}

// passes 3 and 4: the candidates of the significance threshold (w >= eps and w > 0), counted, then written to each
// particle's segment [start, start + count) of the flat output in any order
template <typename G_T>
__global__ void coarse_candidates(ARGS, const double* dmin, const double* eps, int write, int* count,
                                  const long long* start, double* vals, long long* cols) {
    const double dm = dmin[blockIdx.y], e = eps[blockIdx.y];
    WALK_BEGIN
        const double w = weight(d, dm, lp);
        if (w >= e && w > 0.0) {
            const int slot = atomicAdd(count + j, 1);
            if (write) { vals[start[j] + slot] = w; cols[start[j] + slot] = col; }
        }
    WALK_END
}
"""

_SELECT_NAMES = [f"{k}<{t}>" for k in ("coarse_min", "coarse_sum", "coarse_candidates") for t in ("float", "double")]


@cache
def _select_module():
    return cupy.RawModule(code=_SELECT_SRC, options=("-std=c++14",), name_expressions=_SELECT_NAMES)


def coarse_select(g, a, hr, p, dl, pl, off, adaptive_fraction: float = 0.999, maxsig: int = -1):
    """CuPy twin of :func:`gerelion_dask.ops.likelihood.coarse_select`: thread blocks (a slice of a particle's
    ``(K, T, U)`` samples each) walk the samples four times (smallest diff2; sum and largest weight; candidates
    counted; candidates written), recomputing diff2 and the weight from ``g`` each time, so the float64 block is never
    stored; the slices' minima, sums and maxima are combined per particle (first column on ties).  The candidates (the
    weights above ``(1 - fraction) / 2`` of the mean, a superset of the significant ones: ``weights.py``) are then
    sorted per particle as :func:`~gerelion_dask.expectation.weights.significance_threshold` does.
    """
    f64 = np.float64
    K, b, T, U = g.shape
    nd, n_psi = dl.shape[2], pl.shape[1]
    N = K * T * U
    if b == 0:
        z = cupy.zeros(0, np.int64)
        return z, z, z
    if b > 65535:  # the particles are the grid's y dimension: at most 65,535 per launch
        parts = [coarse_select(g[:, s : s + 65535], a[s : s + 65535], hr[s : s + 65535], p[:, s : s + 65535],
                               dl[s : s + 65535], pl[s : s + 65535], off[s : s + 65535], adaptive_fraction, maxsig)
                 for s in range(0, b, 65535)]
        return (cupy.concatenate([r + s for (r, _, _), s in zip(parts, range(0, b, 65535), strict=True)]),
                cupy.concatenate([c for _, c, _ in parts]), cupy.concatenate([x for _, _, x in parts]))
    tname = "float" if g.dtype == np.float32 else "double"
    g = cupy.ascontiguousarray(g) if g.dtype in (np.float32, np.float64) else cupy.ascontiguousarray(g, f64)
    ah = cupy.ascontiguousarray(cupy.asarray(a, f64) + cupy.asarray(hr, f64))
    p, dl, pl, off = (cupy.ascontiguousarray(x, dtype=f64) for x in (p, dl, pl, off))
    mod = _select_module()
    # slices of (k, t) lines per particle, so that ~2,000 blocks share the work however few the particles
    n_lines = K * T
    n_slices = int(min(n_lines, max(1, -(-2048 // b))))
    per = -(-n_lines // n_slices)
    n_slices = -(-n_lines // per)
    args = (g, ah, p, dl, pl, off, np.int32(b), np.int32(K), np.int32(T), np.int32(U), np.int32(nd), np.int32(n_psi),
            np.int32(per))
    grid, block = (n_slices, b), (256,)
    big = np.iinfo(np.int64).max
    vmin, imin = cupy.empty((b, n_slices), f64), cupy.empty((b, n_slices), np.int64)
    mod.get_function(f"coarse_min<{tname}>")(grid, block, args + (vmin, imin))
    dmin = vmin.min(axis=1)
    amin = cupy.where(vmin == dmin[:, None], imin, big).min(axis=1)  # the first column of the smallest value
    vsum, vmax, imax = cupy.empty((b, n_slices), f64), cupy.empty((b, n_slices), f64), cupy.empty((b, n_slices), np.int64)
    mod.get_function(f"coarse_sum<{tname}>")(grid, block, args + (dmin, vsum, vmax, imax))
    total = vsum.sum(axis=1)
    amax = cupy.where(vmax == vmax.max(axis=1)[:, None], imax, big).min(axis=1)
    eps = (0.5 * max(0.0, 1.0 - adaptive_fraction) / max(N, 1)) * total
    count = cupy.zeros(b, np.int32)
    cand = mod.get_function(f"coarse_candidates<{tname}>")
    none_f, none_i = cupy.zeros(1, f64), cupy.zeros(1, np.int64)
    cand(grid, block, args + (dmin, eps, np.int32(0), count, none_i, none_f, none_i))
    bad = ~(total > 0)  # every weight underflowed: the smallest diff2 alone, with weight 1 (count 0 there)
    count = cupy.where(bad, 1, count).astype(np.int64)
    start = cupy.cumsum(count) - count
    n_cand, cmax = (int(v) for v in cupy.stack([count.sum(), count.max()]).get())
    vals, cols = cupy.empty(n_cand, f64), cupy.empty(n_cand, np.int64)
    fill = cupy.zeros(b, np.int32)
    cand(grid, block, args + (dmin, eps, np.int32(1), fill, start, vals, cols))
    ib = cupy.nonzero(bad)[0]
    if ib.size:
        vals[start[ib]] = 1.0
        cols[start[ib]] = amin[ib]
        total = cupy.where(bad, 1.0, total)
    best = cupy.where(bad, amin, amax)
    # each particle's candidates, zero-padded to (b, cmax), sorted in descending order of weight
    rows = cupy.searchsorted(cupy.cumsum(count), cupy.arange(n_cand), side="right")  # each candidate's particle
    pos = cupy.arange(n_cand) - start[rows]
    V = cupy.zeros((b, cmax), f64)
    Ci = cupy.full((b, cmax), -1, np.int64)
    V[rows, pos] = vals
    Ci[rows, pos] = cols
    order = cupy.argsort(-V, axis=1)
    srt = cupy.take_along_axis(V, order, axis=1)
    cs = cupy.cumsum(srt, axis=1)
    last = cupy.maximum(count - 1, 0)
    if adaptive_fraction >= 1.0:
        k = last
    else:
        k = cupy.minimum((cs < adaptive_fraction * total[:, None]).sum(axis=1), last)
    if maxsig > 0:
        k = cupy.minimum(k, maxsig - 1)
    thr = srt[cupy.arange(b), k]
    thr = cupy.where(thr > 0, thr, np.finfo(f64).tiny)
    r, q = cupy.nonzero((V >= thr[:, None]) & (Ci >= 0))
    c = Ci[r, q]
    o = cupy.argsort(r * N + c)
    return r[o], c[o], best
