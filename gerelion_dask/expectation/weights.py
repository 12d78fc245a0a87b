"""Posterior weights and significance (RELION ``convertAllSquaredDifferencesToWeights``, ALGORITHM.md §4.4).

``weight = prior * exp(-(diff2 - min diff2))`` (0 where the exponent is below -700, as RELION's double path),
``sum_w`` over all samples, and the significance threshold: the smallest weight of the set of largest weights whose
running sum first exceeds ``adaptive_fraction * sum_w`` (optionally capped at ``maxsig`` samples).  All of it is
batched over particles (rows); a row whose weights all underflow keeps its best sample with weight 1 (RELION stops
with "all-zero weights"; we never do, and count it).
"""

from __future__ import annotations

import numpy as np

from ..backend import get_xp

__all__ = ["posterior_weights", "significance_threshold", "significance_threshold_by_bisection", "significant_set"]


def posterior_weights(diff2, log_prior):
    """Rows of ``diff2`` and ``log_prior`` (same shape, ``-inf`` prior = excluded) -> (weights, min diff2, sum).

    Returns un-normalised weights ``w`` (max 1 at the best sample times its prior), ``dmin`` per row (over samples
    with a finite prior) and ``sum_w`` per row, plus a boolean per row telling whether it underflowed.
    """
    xp = get_xp(diff2)
    allowed = xp.isfinite(log_prior)
    d = xp.where(allowed, diff2, xp.inf)
    dmin = d.min(axis=1)
    with np.errstate(invalid="ignore"):  # inf - inf in rows with no sample allowed (their weights are 0: bad)
        expo = -(d - dmin[:, None]) + xp.where(allowed, log_prior, 0.0)
        expo = xp.where(allowed & (d - dmin[:, None] <= 700.0), expo, -xp.inf)
    w = xp.exp(expo)
    s = w.sum(axis=1)
    bad = ~(s > 0)
    if bool(bad.any()):
        best = xp.argmin(d, axis=1)
        fix = xp.zeros_like(w)
        fix[xp.arange(w.shape[0]), best] = 1.0
        w = xp.where(bad[:, None], fix, w)
        s = xp.where(bad, 1.0, s)
    return w, dmin, s, bad


def significance_threshold(w, adaptive_fraction: float = 0.999, maxsig: int = -1, total=None):
    """Per row of ``w (b, N)`` (weights >= 0, each row with a positive sum), the weight ``w*`` such that the samples
    with ``w >= w*`` are the significant ones.  ``total``: the rows' sums when the caller has them already.

    RELION sorts a row's weights in descending order and keeps the largest ones until their running sum first
    reaches ``adaptive_fraction`` of the row's sum (at most ``maxsig`` of them); the threshold ``w*`` is the weight of
    the last one kept, and every sample with ``w >= w*`` is significant.  Sorting the whole row is rarely needed: if
    the kept samples are the first k+1 in that order, the rest (at most N samples, each <= w*) carry more than
    ``(1 - adaptive_fraction)`` of the sum, so ``w* > (1 - adaptive_fraction) * sum / N``.  Only the samples above
    half that bound are candidates; they are exactly the head of the full sorted row, and only they are sorted
    (whole rows are, when more than a quarter of a row are candidates: flat posteriors, where that is cheaper).
    With ``maxsig`` only the ``maxsig`` largest weights can decide, and NumPy selects those before it sorts.
    """
    xp = get_xp(w)
    b, N = w.shape
    s = w.sum(axis=1) if total is None else total
    eps = (0.5 * max(0.0, 1.0 - adaptive_fraction) / max(N, 1)) * s
    cand = (w >= eps[:, None]) & (w > 0)
    counts = cand.sum(axis=1)
    cmax = int(counts.max()) if b else 0
    if cmax > N // 4:
        src = w
    else:
        rows, cols = xp.nonzero(cand)
        pos = xp.arange(rows.size) - (xp.cumsum(counts) - counts)[rows]
        src = xp.zeros((b, max(cmax, 1)), w.dtype)  # each row's candidates, zero-padded
        src[rows, pos] = w[rows, cols]
        del rows, cols, pos
    del cand
    width = src.shape[1]
    if xp is np and 0 < maxsig < width:
        # at most maxsig samples are kept, so only the maxsig largest weights of a row can decide the threshold:
        # select them (linear time) and sort those alone (NumPy; CuPy sorts these widths fast enough whole)
        srt = -np.sort(-np.partition(src, width - maxsig, axis=1)[:, width - maxsig :], axis=1)
    else:
        srt = -xp.sort(-src, axis=1)
    del src
    cs = xp.cumsum(srt, axis=1)
    last = xp.maximum(counts - 1, 0)  # the candidates are the head of the sorted row
    if adaptive_fraction >= 1.0:  # every positive weight (not left to the rounding of the two sums)
        k = last
    else:  # the first sample whose running sum reaches the fraction
        k = xp.minimum((cs < adaptive_fraction * s[:, None]).sum(axis=1), last)
    if maxsig > 0:
        k = xp.minimum(k, maxsig - 1)
    thr = srt[xp.arange(b), k]
    return xp.where(thr > 0, thr, xp.asarray(np.finfo(np.float64).tiny))


def significant_set(w, adaptive_fraction: float = 0.999, maxsig: int = -1, total=None):
    """The significant samples of each row of ``w`` (:func:`significance_threshold`).

    Returns ``(rows, cols, thr, best)``: the significant samples as (row, column) pairs in row-major order, the
    threshold per row, and per row the column of its largest weight (the first one in column order on ties).
    """
    xp = get_xp(w)
    thr = significance_threshold(w, adaptive_fraction, maxsig, total)
    rows, cols = xp.nonzero(w >= thr[:, None])
    return rows, cols, thr, xp.argmax(w, axis=1)


def significance_threshold_by_bisection(w, adaptive_fraction: float = 0.999, maxsig: int = -1, total=None):
    """:func:`significance_threshold` without sorting (for rows of millions of weights on a GPU, where a segmented
    sort of the whole block costs more than the rest of a flat group; ``fine._flat_group``).

    With ``S(v) = sum of the row's weights >= v``, non-increasing in ``v``, RELION's threshold ``w*`` (the weight of
    the last of the largest weights kept until their running sum reaches ``adaptive_fraction * sum``) is the largest
    ``v`` with ``S(v) >= adaptive_fraction * sum``: every larger ``v`` leaves out ``w*`` and so falls short, and
    ``S`` changes only at the row's weights, so that largest ``v`` is one of them.  Non-negative float64 values
    order as their bit patterns, so 64 halvings of an integer interval find it exactly (each one pass over the
    block); ``maxsig`` likewise bounds it below by the ``maxsig``-th largest weight (the largest ``v`` with at least
    ``maxsig`` weights ``>= v``).  Sums run in another order than the sort's running sum: a weight whose running
    sum lands within rounding of the fraction may fall on the other side."""
    xp = get_xp(w)
    b = w.shape[0]
    s = w.sum(axis=1) if total is None else total
    big = w.max(axis=1)

    def largest(enough):
        lo = xp.zeros(b, np.int64)  # bits of 0.0: always enough
        hi = big.view(np.int64) + 1  # above the largest weight: never enough
        for _ in range(64):
            mid = lo + (hi - lo) // 2
            ok = enough(mid.view(np.float64))
            lo, hi = xp.where(ok, mid, lo), xp.where(ok, hi, mid)
        return lo.view(np.float64)

    if adaptive_fraction >= 1.0:  # every positive weight
        thr = xp.where(w > 0, w, xp.inf).min(axis=1)
    else:
        target = adaptive_fraction * s
        thr = largest(lambda v: xp.where(w >= v[:, None], w, 0.0).sum(axis=1) >= target)
    if maxsig > 0:
        thr = xp.maximum(thr, largest(lambda v: (w >= v[:, None]).sum(axis=1) >= maxsig))
    return xp.where(thr > 0, thr, xp.asarray(np.finfo(np.float64).tiny))
