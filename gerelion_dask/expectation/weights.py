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

__all__ = ["best_sample_weights", "kept_weights", "posterior_weights", "significance_threshold", "significant_set"]


def _per_row(x, reduce):
    """``reduce`` (a method name: "min", "sum", ...) of each row ``x[i]`` of any number of axes, the last axis
    first: a GPU's reduction kernel gives each output a block, so a few rows of millions of values (a flat group's
    block, ``(b, rows, columns)``) reduce far faster as many short rows than as a few long ones."""
    while x.ndim > 1:
        x = getattr(x, reduce)(axis=-1)
    return x


def posterior_weights(diff2, log_prior):
    """Rows of ``diff2`` and ``log_prior`` (same shape, ``-inf`` prior = excluded; a row is ``diff2[i]``, of one
    or more axes) -> (weights, min diff2, sum).

    Returns un-normalised weights ``w`` (max 1 at the best sample times its prior), ``dmin`` per row (over samples
    with a finite prior) and ``sum_w`` per row, plus a boolean per row telling whether it underflowed.
    """
    xp = get_xp(diff2)
    b = diff2.shape[0]
    allowed = xp.isfinite(log_prior)
    d = xp.where(allowed, diff2, xp.inf)
    dmin = _per_row(d, "min")
    dm = dmin.reshape((b,) + (1,) * (d.ndim - 1))
    with np.errstate(invalid="ignore"):  # inf - inf in rows with no sample allowed (their weights are 0: bad)
        expo = -(d - dm) + xp.where(allowed, log_prior, 0.0)
        expo = xp.where(allowed & (d - dm <= 700.0), expo, -xp.inf)
    w = xp.exp(expo)
    s = _per_row(w, "sum")
    bad = ~(s > 0)
    if bool(bad.any()):
        best = xp.argmin(d.reshape(b, -1), axis=1)
        fix = xp.zeros((b, w[0].size), w.dtype)
        fix[xp.arange(b), best] = 1.0
        w = xp.where(bad.reshape(dm.shape), fix.reshape(w.shape), w)
        s = xp.where(bad, 1.0, s)
    return w, dmin, s, bad


def significance_threshold(w, adaptive_fraction: float = 0.999, maxsig: int = -1, total=None):
    """Per row of ``w (b, N)`` (weights >= 0, each row with a positive sum; or ``(b, ...)``, a row of several axes),
    the weight ``w*`` such that the samples with ``w >= w*`` are the significant ones.  ``total``: the rows' sums
    when the caller has them already.

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
    shape = w.shape  # rows of one or more axes (their reductions staged: _per_row)
    b, N = w.shape[0], w[0].size if len(w) else 0
    s = _per_row(w, "sum") if total is None else total
    eps = (0.5 * max(0.0, 1.0 - adaptive_fraction) / max(N, 1)) * s
    cand = (w >= eps.reshape((b,) + (1,) * (w.ndim - 1))) & (w > 0)
    counts = _per_row(cand, "sum")
    cmax = int(counts.max()) if b else 0
    w = w.reshape(b, N)
    cand = cand.reshape(b, N)
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
        below = cs < adaptive_fraction * s[:, None]
        k = xp.minimum(_per_row(below.reshape(shape) if below.shape[1] == N else below, "sum"), last)
    if maxsig > 0:
        k = xp.minimum(k, maxsig - 1)
    thr = srt[xp.arange(b), k]
    return xp.where(thr > 0, thr, xp.asarray(np.finfo(np.float64).tiny))


def kept_weights(w, total, adaptive_fraction: float = 0.999, maxsig: int = -1):
    """RELION's weights of the weighted sums: per row of ``w`` (a row of one or more axes, its sum ``total``), the
    weights at or above the row's :func:`significance_threshold`, divided by the row's sum; 0 elsewhere."""
    xp = get_xp(w)
    thr = significance_threshold(w, adaptive_fraction, maxsig, total)
    col = (len(w),) + (1,) * (w.ndim - 1)
    return xp.where(w >= thr.reshape(col), w, 0.0) / total.reshape(col)


def best_sample_weights(D, LP):
    """``--firstiter_cc``'s weights: per row of ``D (b, N)`` (-CC) the sample of smallest ``D`` among those with a
    finite log prior ``LP`` takes weight 1 (RELION's maximum cross-correlation).  Returns ``(w, dmin, sumw, bad)``
    as :func:`posterior_weights` (sums 1, nothing underflowed)."""
    xp = get_xp(D)
    b = len(D)
    best = xp.argmin(xp.where(xp.isfinite(LP), D, xp.inf), axis=1)
    w = xp.zeros_like(D)
    w[xp.arange(b), best] = 1.0
    return w, D[xp.arange(b), best], xp.ones(b), xp.zeros(b, bool)


def significant_set(w, adaptive_fraction: float = 0.999, maxsig: int = -1, total=None):
    """The significant samples of each row of ``w`` (:func:`significance_threshold`).

    Returns ``(rows, cols, thr, best)``: the significant samples as (row, column) pairs in row-major order, the
    threshold per row, and per row the column of its largest weight (the first one in column order on ties).
    """
    xp = get_xp(w)
    thr = significance_threshold(w, adaptive_fraction, maxsig, total)
    rows, cols = xp.nonzero(w >= thr[:, None])
    return rows, cols, thr, xp.argmax(w, axis=1)

