"""CuPy twin of the fine pass's posterior weights and significance (``expectation/fine.py::_child_posteriors``).

One thread block per particle, over the 32 children of each of its significant samples (``d (R, 32)``, a particle's
samples consecutive): the smallest diff2 among the children its prior allows, the weights
``exp(-(d - dmin) + lp)`` (0 beyond 700, as :func:`~gerelion_dask.expectation.weights.posterior_weights`), their sum
(the best child alone with weight 1 when all of them underflow), the significance threshold of
:func:`~gerelion_dask.expectation.weights.significance_threshold` (the weights sorted in shared memory, bitonic; one
warp walks their running sum to the first that reaches ``adaptive_fraction`` of the total; at most ``maxsig``), and
the normalised weights that reach it, with each particle's largest one and its position.  The NumPy path pads every
particle's children to the group's widest row and runs those steps as ~40 array operations over the padded block.
Particles with more than ``CHILD_CAP`` children take that path (``fits``).  Sums are reduced in a fixed order.
"""

from __future__ import annotations

from functools import cache

import cupy
import numpy as np

CHILD_CAP = 4096  # children per particle sorted in shared memory (32 KiB of float64)
_THREADS = 256

_SRC = r"""
#define NT 256
#define CAP 4096
#define GINF __longlong_as_double(0x7ff0000000000000LL)

__device__ __forceinline__ bool better_min(double v, long long i, double bv, long long bi) {
    return v < bv || (v == bv && i < bi);
}
__device__ __forceinline__ bool better_max(double v, long long i, double bv, long long bi) {
    return v > bv || (v == bv && i < bi);
}

// block-wide reductions in a fixed order: warp shuffles, then warp 0 over the warps' results
__device__ double block_sum(double x, double* red) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
    __syncthreads();
    if (lane == 0) red[wid] = x;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < NT / 32; ++w) t += red[w];
        red[NT / 32] = t;
    }
    __syncthreads();
    return red[NT / 32];
}

template <bool MIN>
__device__ void block_arg(double& v, long long& i, double* redv, long long* redi) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        const double ov = __shfl_down_sync(0xffffffffu, v, o);
        const long long oi = __shfl_down_sync(0xffffffffu, i, o);
        if (MIN ? better_min(ov, oi, v, i) : better_max(ov, oi, v, i)) { v = ov; i = oi; }
    }
    __syncthreads();
    if (lane == 0) { redv[wid] = v; redi[wid] = i; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < NT / 32; ++w)
            if (MIN ? better_min(redv[w], redi[w], redv[0], redi[0]) : better_max(redv[w], redi[w], redv[0], redi[0])) {
                redv[0] = redv[w]; redi[0] = redi[w];
            }
    }
    __syncthreads();
    v = redv[0]; i = redi[0];
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(NT)
gerelion_child_posteriors(const double* d, const double* lp, const long long* first, const long long* cnt,
                          long long b, double frac, int maxsig, double* w_out, double* dmin_out, double* sum_out,
                          int* bad_out, long long* best_out, double* pmax_out) {
    __shared__ double srt[CAP];
    __shared__ double redv[NT / 32 + 1];
    __shared__ long long redi[NT / 32];
    __shared__ long long k_sh;
    const long long j = blockIdx.x;
    if (j >= b) return;
    const long long n = 32 * cnt[j], base = 32 * first[j];
    const double* dj = d + base;
    const double* lj = lp + first[j];
    // smallest allowed diff2 (first on ties)
    double dm = GINF;
    long long im = 0;
    for (long long i = threadIdx.x; i < n; i += NT) {
        const double x = isfinite(lj[i >> 5]) ? dj[i] : GINF;
        if (better_min(x, i, dm, im)) { dm = x; im = i; }
    }
    block_arg<true>(dm, im, redv, redi);
    // weights, their sum and how many are positive
    double s = 0.0, npos = 0.0;
    for (long long i = threadIdx.x; i < n; i += NT) {
        const double l = lj[i >> 5], x = dj[i];
        const double w = (isfinite(l) && x - dm <= 700.0) ? exp(-(x - dm) + l) : 0.0;
        s += w;
        npos += w > 0.0 ? 1.0 : 0.0;
    }
    s = block_sum(s, redv);
    npos = block_sum(npos, redv);
    const bool bad = !(s > 0.0);
    if (bad) { s = 1.0; npos = 1.0; }
    // the weights sorted in descending order (padded with -1 to a power of two)
    long long S = 1;
    while (S < n) S <<= 1;
    for (long long i = threadIdx.x; i < S; i += NT) {
        double w = -1.0;
        if (i < n) {
            const double l = lj[i >> 5], x = dj[i];
            w = bad ? (i == im ? 1.0 : 0.0) : ((isfinite(l) && x - dm <= 700.0) ? exp(-(x - dm) + l) : 0.0);
        }
        srt[i] = w;
    }
    __syncthreads();
    for (long long k = 2; k <= S; k <<= 1) {
        for (long long h = k >> 1; h > 0; h >>= 1) {
            for (long long i = threadIdx.x; i < S; i += NT) {
                const long long o = i ^ h;
                if (o > i) {
                    const double a = srt[i], c = srt[o];
                    if (((i & k) == 0) ? (a < c) : (a > c)) { srt[i] = c; srt[o] = a; }
                }
            }
            __syncthreads();
        }
    }
    // the first sample whose running sum reaches frac * s (one warp, 32 at a time)
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        const double target = frac * s;
        long long kk = n;
        double carry = 0.0;
        for (long long at = 0; at < n; at += 32) {
            const long long i = at + lane;
            double v = i < n ? srt[i] : 0.0;
            for (int o = 1; o < 32; o <<= 1) {
                const double t = __shfl_up_sync(0xffffffffu, v, o);
                if (lane >= o) v += t;
            }
            v += carry;
            const unsigned m = __ballot_sync(0xffffffffu, i < n && !(v < target));
            if (m) { kk = at + __ffs(m) - 1; break; }
            carry = __shfl_sync(0xffffffffu, v, 31);
        }
        if (lane == 0) {
            const long long last = (long long)npos - 1;
            long long k = frac >= 1.0 ? last : (kk < last ? kk : last);
            if (maxsig > 0 && k > maxsig - 1) k = maxsig - 1;
            if (k < 0) k = 0;
            k_sh = k;
        }
    }
    __syncthreads();
    double thr = srt[k_sh];
    if (!(thr > 0.0)) thr = 2.2250738585072014e-308;
    // the normalised weights that reach the threshold, and the largest (first on ties)
    double bv = -1.0;
    long long bi = 0;
    for (long long i = threadIdx.x; i < n; i += NT) {
        const double l = lj[i >> 5], x = dj[i];
        const double w = bad ? (i == im ? 1.0 : 0.0) : ((isfinite(l) && x - dm <= 700.0) ? exp(-(x - dm) + l) : 0.0);
        const double wo = w >= thr ? w / s : 0.0;
        w_out[base + i] = wo;
        if (better_max(wo, i, bv, bi)) { bv = wo; bi = i; }
    }
    block_arg<false>(bv, bi, redv, redi);
    if (threadIdx.x == 0) {
        dmin_out[j] = dm;
        sum_out[j] = s;
        bad_out[j] = bad ? 1 : 0;
        best_out[j] = bi;
        pmax_out[j] = bv;
    }
}
"""


@cache
def _module():
    return cupy.RawModule(code=_SRC, options=("-std=c++14",))


def fits(cnt) -> bool:
    """Whether every particle's children (32 per significant sample, ``cnt`` samples) fit the kernel's sort."""
    return len(cnt) == 0 or 32 * int(np.max(cnt)) <= CHILD_CAP


def child_posteriors(d, lp, first, cnt, adaptive_fraction: float, maxsig: int):
    """Posterior weights of the children ``d (R, 32)`` of the significant samples of ``b`` particles (particle j's
    samples are rows ``first[j] .. first[j] + cnt[j] - 1``, each with log prior ``lp[r]``; host ``first``/``cnt``,
    :func:`fits`): ``(w (R, 32), dmin, sumw, bad, best, pmax)``, ``w`` normalised and zero below the significance
    threshold, ``best`` the position of each particle's largest weight among its children (``32 q + child``); all
    on the device."""
    f64, i64 = np.float64, np.int64
    b = int(len(cnt))
    R = int(d.shape[0])
    w = cupy.empty((R, 32), f64)
    dmin, sumw, pmax = (cupy.empty(b, f64) for _ in range(3))
    bad = cupy.empty(b, np.int32)
    best = cupy.empty(b, i64)
    if b == 0:
        return w, dmin, sumw, bad.astype(bool), best, pmax
    d = cupy.ascontiguousarray(d, dtype=f64)
    lp = cupy.ascontiguousarray(cupy.asarray(lp), dtype=f64)
    first, cnt = (cupy.asarray(np.ascontiguousarray(x, dtype=i64)) for x in (first, cnt))
    _module().get_function("gerelion_child_posteriors")(
        (b,), (_THREADS,), (d, lp, first, cnt, np.int64(b), f64(adaptive_fraction), np.int32(maxsig), w, dmin, sumw,
                            bad, best, pmax))
    return w, dmin, sumw, bad.astype(bool), best, pmax
