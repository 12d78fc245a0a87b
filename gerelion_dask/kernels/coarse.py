"""CuPy twins of :mod:`gerelion_dask.ops.likelihood` (imported only when CuPy arrays are passed there).

``coarse_diff2`` and ``coarse_weights`` are one element-wise kernel each over the coarse-pass block, with the inputs
broadcast by CuPy exactly as the NumPy formula broadcasts them; ``coarse_select`` is three passes of thread blocks
over slices of each particle's samples and a sort per particle.  All use the NumPy functions' operation order in
float64 (``tests/test_ops.py`` compares them on the GPU).
"""

from __future__ import annotations

from functools import cache

import cupy
import numpy as np

from ..ops import likelihood
from ..ops.likelihood import candidate_segment, coarse_select_dense


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

// the particle's smallest diff2 and its first column from the slices of pass 1 (thread 0's values)
__device__ __forceinline__ void combine_min(const double* vmin, const long long* imin, long long j, int S,
                                            double& v, long long& i) {
    v = GD_INF; i = GD_BIG;
    for (int q = 0; q < S; ++q) pick(v, i, vmin[j * S + q], imin[j * S + q], 1);
}

// pass 2: per slice, the sum of the weights and the first column of the largest one
template <typename G_T>
__global__ void coarse_sum(ARGS, const double* vmin, const long long* imin, double* vsum, double* vmax,
                           long long* imax) {
    __shared__ double sv[32];
    __shared__ long long si[32];
    __shared__ double s_dmin;
    if (threadIdx.x == 0) { long long i0; combine_min(vmin, imin, blockIdx.y, gridDim.x, s_dmin, i0); }
    __syncthreads();
    const double dm = s_dmin;
    double acc = 0.0, v = -1.0;
    long long i = GD_BIG;
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

// pass 3: the candidates of the significance threshold (w >= eps = eps_per_sum * sum and w > 0) of each particle,
// written in any order to its segment of `cap` slots (count may exceed cap: that particle is redone by the caller).
// Slice 0 of each particle also writes its sum (1 where every weight underflowed), best column and, for such a
// particle, its smallest diff2 as the only candidate (weight 1).
template <typename G_T>
__global__ void coarse_candidates(ARGS, const double* vmin, const long long* imin, const double* vsum,
                                  const double* vmax, const long long* imax, double eps_per_sum, int cap,
                                  int* count, double* vals, long long* cols, double* total, long long* best) {
    __shared__ double s_dmin, s_eps;
    if (threadIdx.x == 0) {
        const long long jj = blockIdx.y;
        const int S = gridDim.x;
        double dm; long long im;
        combine_min(vmin, imin, jj, S, dm, im);
        double sum = 0.0, vm = -1.0;
        long long ix = GD_BIG;
        for (int q = 0; q < S; ++q) { sum += vsum[jj * S + q]; pick(vm, ix, vmax[jj * S + q], imax[jj * S + q], -1); }
        const bool bad = !(sum > 0.0);
        s_dmin = dm;
        s_eps = eps_per_sum * sum;
        if (blockIdx.x == 0) {
            total[jj] = bad ? 1.0 : sum;
            best[jj] = bad ? im : ix;
            if (bad) { count[jj] = 1; vals[jj * cap] = 1.0; cols[jj * cap] = im; }
        }
    }
    __syncthreads();
    const double dm = s_dmin, e = s_eps;
    WALK_BEGIN
        const double w = weight(d, dm, lp);
        if (w >= e && w > 0.0) {
            const int slot = atomicAdd(count + j, 1);
            if (slot < cap) { vals[j * cap + slot] = w; cols[j * cap + slot] = col; }
        }
    WALK_END
}

// pass 4 (one block per particle, cap a power of two, cap doubles of dynamic shared memory): sort the particle's
// candidates in descending order in shared memory, take the weight where the running sum first reaches
// fraction * sum (at most maxsig samples; every candidate for fraction >= 1) as the threshold, and flag the
// candidates at or above it
__global__ void coarse_threshold(const int* count, const double* vals, const double* total, double fraction,
                                 int maxsig, int cap, double* thr, unsigned char* keep) {
    extern __shared__ double sd[];
    const long long j = blockIdx.x;
    const int n = count[j];
    if (n == 0 || n > cap) return;  // more than fit: redone by the caller
    int n2 = 1;
    while (n2 < n) n2 <<= 1;
    for (int i = threadIdx.x; i < n2; i += blockDim.x) sd[i] = i < n ? vals[j * cap + i] : -1.0;
    __syncthreads();
    for (int size = 2; size <= n2; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < n2; i += blockDim.x) {
                const int partner = i ^ stride;
                if (partner > i) {
                    const bool desc = (i & size) == 0;
                    const double x = sd[i], y = sd[partner];
                    if (desc ? (x < y) : (x > y)) { sd[i] = y; sd[partner] = x; }
                }
            }
            __syncthreads();
        }
    }
    __shared__ double s_thr;
    if (threadIdx.x == 0) {
        int k = n - 1;
        if (fraction < 1.0) {
            const double target = fraction * total[j];
            double cs = 0.0;
            for (int i = 0; i < n; ++i) { cs += sd[i]; if (!(cs < target)) { k = i; break; } }
        }
        if (maxsig > 0 && k > maxsig - 1) k = maxsig - 1;
        double t = sd[k];
        s_thr = t > 0.0 ? t : 2.2250738585072014e-308;
        thr[j] = s_thr;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) keep[j * cap + i] = vals[j * cap + i] >= s_thr;
}
"""

_SELECT_NAMES = [f"{k}<{t}>" for k in ("coarse_min", "coarse_sum", "coarse_candidates") for t in ("float", "double")]
_SELECT_NAMES.append("coarse_threshold")


@cache
def _select_module():
    return cupy.RawModule(code=_SELECT_SRC, options=("-std=c++14",), name_expressions=_SELECT_NAMES)


def coarse_select(g, a, hr, p, dl, pl, off, adaptive_fraction: float = 0.999, maxsig: int = -1):
    """CuPy twin of :func:`gerelion_dask.ops.likelihood.coarse_select`: thread blocks (a slice of a particle's
    ``(K, T, U)`` samples each) walk the samples three times (smallest diff2; sum and largest weight; candidates),
    recomputing diff2 and the weight from ``g`` each time, so the float64 block is never stored; the slices' minima,
    sums and maxima are combined per particle in a fixed order (first column on ties).  The candidates (the weights
    above ``(1 - fraction) / 2`` of the mean, a superset of the significant ones: ``weights.py``) are sorted per
    particle in shared memory and the threshold taken as
    :func:`~gerelion_dask.expectation.weights.significance_threshold` takes it (running sum in sorted order); a
    particle with more than ``ops.likelihood.CANDIDATE_CAP`` candidates (a flat posterior) is redone from its full
    weight row (:func:`~gerelion_dask.ops.likelihood.coarse_select_dense`).
    The work is a handful of kernel launches per chunk, whatever the number of particles.
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
    cap = candidate_segment(N)
    vmin, imin = cupy.empty((b, n_slices), f64), cupy.empty((b, n_slices), np.int64)
    mod.get_function(f"coarse_min<{tname}>")(grid, block, args + (vmin, imin))
    vsum, vmax = cupy.empty((b, n_slices), f64), cupy.empty((b, n_slices), f64)
    imax = cupy.empty((b, n_slices), np.int64)
    mod.get_function(f"coarse_sum<{tname}>")(grid, block, args + (vmin, imin, vsum, vmax, imax))
    count = cupy.zeros(b, np.int32)
    vals, cols = cupy.empty((b, cap), f64), cupy.empty((b, cap), np.int64)
    total, best = cupy.empty(b, f64), cupy.empty(b, np.int64)
    eps_per_sum = 0.5 * max(0.0, 1.0 - adaptive_fraction) / max(N, 1)
    mod.get_function(f"coarse_candidates<{tname}>")(
        grid, block, args + (vmin, imin, vsum, vmax, imax, f64(eps_per_sum), np.int32(cap), count, vals, cols, total,
                             best))
    thr = cupy.empty(b, f64)
    keep = cupy.zeros((b, cap), np.uint8)
    sort = mod.get_function("coarse_threshold")
    shared = 8 * cap
    if shared > 48 * 1024:  # beyond the default limit of a block's dynamic shared memory (sm_70 and newer allow it)
        sort.max_dynamic_shared_size_bytes = shared
    sort((b,), (512,), (count, vals, total, f64(adaptive_fraction), np.int32(maxsig), np.int32(cap), thr, keep),
         shared_mem=shared)
    r, q = cupy.nonzero(keep)
    c = cols[r, q]
    over = cupy.nonzero(count > cap)[0]
    if over.size:  # more candidates than fit the shared-memory sort: these particles' weights in full, a few at a
        # time (their float64 diff2 and weights: 16 bytes a sample, at most REDO_SAMPLES samples at once)
        step = max(1, likelihood.REDO_SAMPLES // N)
        rs, cs = [r], [c]
        for s in range(0, int(over.size), step):
            ov = over[s : s + step]
            r2, c2, _ = coarse_select_dense(g[:, ov], a[ov], hr[ov], p[:, ov], dl[ov], pl[ov], off[ov],
                                            adaptive_fraction, maxsig, total[ov])
            rs.append(ov[r2])
            cs.append(c2)
        r, c = cupy.concatenate(rs), cupy.concatenate(cs)
    o = cupy.argsort(r * N + c)
    return r[o], c[o], best
