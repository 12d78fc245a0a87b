"""CuPy twin of :func:`gerelion_dask.ops.likelihood.pair_sums` (imported only when CuPy arrays are passed there).

Two kernels, neither of which writes a per-pair array (the NumPy formula gathers ~10 ``(pairs, M)`` arrays: the
fine pass's weighted sums cost more than its diff2 before this, ``benchmarks/RESULTS.md``, eleventh session):

- to the orientations: the pairs are sorted (stably) by their back-projection row, and one thread per (run of equal
  rows, pixel) makes each pair's ``Q = sum_i w_i ph_i`` at its pixel, adds ``XCW Q`` and ``wo CCW`` over the run in
  order, and adds the two sums to the row once;
- to the particles: the pairs sorted (stably) by particle and each particle's pairs cut into segments of at most
  ``segment_pairs`` pairs; one thread block per segment strides over the pixels, makes ``Q`` again and writes the
  segment's noise terms as one row and its scale terms (reduced in a fixed order: warp shuffles, then the warps in
  turn); a second kernel adds each particle's segment rows to its ``resid`` row in order.  One block per particle
  left a flat pool's group (a few particles with ~10,000 pairs each, early classification) with a few busy SMs.

Every target element is written by one thread of one launch, so the sums do not depend on timing (no atomics).
"""

from __future__ import annotations

from functools import cache

import cupy
import numpy as np

_THREADS = 128

_SRC = r"""
#define NT 128

__device__ __forceinline__ void pair_q(const double* ph, const long long* cstart, const long long* tp,
                                       const double* wv, long long p, long long M, long long m,
                                       double& qr, double& qi, double& wo) {
    qr = 0.0; qi = 0.0; wo = 0.0;
    for (long long c = cstart[p]; c < cstart[p + 1]; ++c) {
        const double w = wv[c];
        const double* s = ph + 2 * (tp[c] * M + m);
        qr += w * s[0];
        qi += w * s[1];
        wo += w;
    }
}

extern "C" __global__ void __launch_bounds__(NT)
gerelion_pairs_to_rows(const double* XCW, const double* CCW, const double* ph, const long long* pj,
                       const long long* cstart, const long long* tp, const double* wv, const long long* order,
                       const long long* rstart, const long long* rrow, long long n_runs, long long M,
                       double* bp_i, double* bp_w) {
    const long long run = blockIdx.x;
    const long long m = (long long)blockIdx.y * NT + threadIdx.x;
    if (run >= n_runs || m >= M) return;
    double ar = 0.0, ai = 0.0, aw = 0.0;
    for (long long k = rstart[run]; k < rstart[run + 1]; ++k) {
        const long long p = order[k], j = pj[p];
        double qr, qi, wo;
        pair_q(ph, cstart, tp, wv, p, M, m, qr, qi, wo);
        const double xr = XCW[2 * (j * M + m)], xi = XCW[2 * (j * M + m) + 1];
        ar += xr * qr - xi * qi;
        ai += xr * qi + xi * qr;
        aw += wo * CCW[j * M + m];
    }
    const long long o = rrow[run] * M + m;
    bp_i[2 * o] += ar;
    bp_i[2 * o + 1] += ai;
    bp_w[o] += aw;
}

extern "C" __global__ void __launch_bounds__(NT)
gerelion_pairs_to_segments(const double* X, const double* Cr, const double* gf, const double* ph, const double* P,
                           const long long* pj, const long long* prow, const long long* cstart, const long long* tp,
                           const double* wv, const long long* order, const long long* sstart, const long long* send,
                           long long n_seg, long long M, double* part, double* pxa, double* paa) {
    const long long s = blockIdx.x;
    if (s >= n_seg) return;
    const long long j = pj[order[sstart[s]]];
    double sx = 0.0, sa = 0.0;
    for (long long m = threadIdx.x; m < M; m += NT) {
        const double xr = X[2 * (j * M + m)], xi = X[2 * (j * M + m) + 1], cr = Cr[j * M + m], g = gf[m];
        double rs = 0.0;
        for (long long k = sstart[s]; k < send[s]; ++k) {
            const long long p = order[k];
            double qr, qi, wo;
            pair_q(ph, cstart, tp, wv, p, M, m, qr, qi, wo);
            const double pr = P[2 * (prow[p] * M + m)], pi = P[2 * (prow[p] * M + m) + 1];
            const double ur = xr * pr + xi * pi, ui = xi * pr - xr * pi;  // X conj(P)
            const double x = cr * (ur * qr - ui * qi);                   // Cr Re(X conj(P) Q)
            const double mo = cr * cr * (pr * pr + pi * pi);             // Cr^2 |P|^2
            rs += wo * mo - 2.0 * x;
            sx += x * g;
            sa += wo * mo * g;
        }
        part[s * M + m] = rs;
    }
    __shared__ double red[NT / 32][2];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        sx += __shfl_down_sync(0xffffffffu, sx, o);
        sa += __shfl_down_sync(0xffffffffu, sa, o);
    }
    if (lane == 0) {
        red[wid][0] = sx;
        red[wid][1] = sa;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double tx = 0.0, ta = 0.0;
        for (int w = 0; w < NT / 32; ++w) {
            tx += red[w][0];
            ta += red[w][1];
        }
        pxa[s] = tx;
        paa[s] = ta;
    }
}

extern "C" __global__ void __launch_bounds__(NT)
gerelion_segments_to_particles(const double* part, const double* pxa, const double* paa, const long long* pj,
                               const long long* order, const long long* sstart, const long long* sfirst,
                               long long n_runs, long long M, double* resid, double* xa, double* aa) {
    const long long run = blockIdx.x;
    const long long m = (long long)blockIdx.y * NT + threadIdx.x;
    if (run >= n_runs) return;
    const long long s0 = sfirst[run], s1 = sfirst[run + 1];
    const long long j = pj[order[sstart[s0]]];
    if (m < M) {
        double rs = 0.0;
        for (long long s = s0; s < s1; ++s) rs += part[s * M + m];
        resid[j * M + m] += rs;
    }
    if (blockIdx.y == 0 && threadIdx.x == 0) {
        double tx = 0.0, ta = 0.0;
        for (long long s = s0; s < s1; ++s) {
            tx += pxa[s];
            ta += paa[s];
        }
        xa[j] += tx;
        aa[j] += ta;
    }
}
"""


@cache
def _module():
    return cupy.RawModule(code=_SRC, options=("-std=c++14",))


def _runs(key, ordered: bool = False):
    """A stable order of ``key`` (``ordered``: it is sorted already) and the starts of its runs of equal values (with
    the end appended)."""
    if ordered:
        order, srt = cupy.arange(key.size, dtype=np.int64), key
    else:
        order = cupy.argsort(key)  # CuPy's argsort is stable (radix sort)
        srt = key[order]
    start = cupy.concatenate([cupy.zeros(1, np.int64), cupy.flatnonzero(srt[1:] != srt[:-1]).astype(np.int64) + 1,
                              cupy.full(1, key.size, np.int64)])
    return order, start, srt[start[:-1]]


# a particle's pairs go to thread blocks in segments of SEGMENT_PAIRS pairs, more where the segments' noise rows
# would pass SEGMENT_BYTES (the rows are summed per particle in a second kernel)
SEGMENT_PAIRS = 32
SEGMENT_BYTES = 256 << 20


def segment_pairs(n_pairs: int, M: int) -> int:
    """Pairs per segment: ``SEGMENT_PAIRS``, or more so that the segments' ``(n_seg, M)`` float64 rows (at most one
    per particle plus ``n_pairs / length``) stay within ``SEGMENT_BYTES`` beyond the particles' own rows."""
    room = max(1, SEGMENT_BYTES // (8 * max(M, 1)))
    return max(SEGMENT_PAIRS, -(-n_pairs // room))


def _segments(start, length: int):
    """Cut runs of pairs (``start``: the runs' starts with the end appended, on the device) into segments of at most
    ``length`` pairs; returns each segment's start and end and each run's first segment (with the total
    appended)."""
    n = cupy.diff(start)
    count = (n + length - 1) // length
    sfirst = cupy.concatenate([cupy.zeros(1, np.int64), cupy.cumsum(count)])
    total = int(sfirst[-1])
    k = cupy.arange(total, dtype=np.int64)
    run = cupy.searchsorted(sfirst, k, side="right") - 1
    sstart = start[run] + (k - sfirst[run]) * length
    send = cupy.minimum(sstart + length, start[run + 1])
    return sstart, send, sfirst


def _target(a, dtype, name):
    if not (isinstance(a, cupy.ndarray) and a.dtype == dtype and a.flags.c_contiguous):
        raise ValueError(f"pair_sums needs a C-contiguous {np.dtype(dtype).name} {name} on the device")
    return a


def pair_sums(XCW, CCW, X, Cr, gf, ph, P, pj, prow, brow, cstart, tp, wv, bp_i, bp_w, resid, xa, aa,
              rows_sorted: bool = False) -> None:
    """CuPy twin of :func:`gerelion_dask.ops.likelihood.pair_sums` (same arguments but ``max_elems``: the kernels
    keep no temporaries beyond two sort orders of the pairs)."""
    f64, c128, i64 = np.float64, np.complex128, np.int64
    n_p = int(len(pj))
    if n_p == 0:
        return
    bp_i, bp_w = _target(bp_i, c128, "bp_i"), _target(bp_w, f64, "bp_w")
    resid, xa, aa = _target(resid, f64, "resid"), _target(xa, f64, "xa"), _target(aa, f64, "aa")
    M = int(X.shape[1])
    XCW, X, ph, P = (cupy.ascontiguousarray(a, dtype=c128) for a in (XCW, X, ph, P))
    CCW, Cr, gf, wv = (cupy.ascontiguousarray(cupy.asarray(a), dtype=f64) for a in (CCW, Cr, gf, wv))
    pj, prow, brow, cstart, tp = (cupy.ascontiguousarray(cupy.asarray(a), dtype=i64)
                                  for a in (pj, prow, brow, cstart, tp))
    mod = _module()
    order, start, row = _runs(brow, rows_sorted)
    n_runs = int(row.size)
    mod.get_function("gerelion_pairs_to_rows")(
        (n_runs, (M + _THREADS - 1) // _THREADS), (_THREADS,),
        (XCW, CCW, ph, pj, cstart, tp, wv, order, start, row, np.int64(n_runs), np.int64(M), bp_i, bp_w))
    order, start, _ = _runs(pj)
    sstart, send, sfirst = _segments(start, segment_pairs(n_p, M))
    n_seg, n_runs = int(sstart.size), int(start.size) - 1
    part = cupy.empty((n_seg, M), f64)
    pxa, paa = cupy.empty(n_seg, f64), cupy.empty(n_seg, f64)
    mod.get_function("gerelion_pairs_to_segments")(
        (n_seg,), (_THREADS,),
        (X, Cr, gf, ph, P, pj, prow, cstart, tp, wv, order, sstart, send, np.int64(n_seg), np.int64(M), part, pxa,
         paa))
    mod.get_function("gerelion_segments_to_particles")(
        (n_runs, (M + _THREADS - 1) // _THREADS), (_THREADS,),
        (part, pxa, paa, pj, order, sstart, sfirst, np.int64(n_runs), np.int64(M), resid, xa, aa))
