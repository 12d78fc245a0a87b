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

__all__ = ["posterior_weights", "significance_threshold"]


def posterior_weights(diff2, log_prior):
    """Rows of ``diff2`` and ``log_prior`` (same shape, ``-inf`` prior = excluded) -> (weights, min diff2, sum).

    Returns un-normalised weights ``w`` (max 1 at the best sample times its prior), ``dmin`` per row (over samples
    with a finite prior) and ``sum_w`` per row, plus a boolean per row telling whether it underflowed.
    """
    xp = get_xp(diff2)
    allowed = xp.isfinite(log_prior)
    d = xp.where(allowed, diff2, xp.inf)
    dmin = d.min(axis=1)
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


def significance_threshold(w, adaptive_fraction: float = 0.999, maxsig: int = -1):
    """Per row, the weight ``w*`` such that samples with ``w >= w*`` carry ``adaptive_fraction`` of the sum."""
    xp = get_xp(w)
    srt = -xp.sort(-w, axis=1)
    cs = xp.cumsum(srt, axis=1)
    total = cs[:, -1:]
    k = (cs < adaptive_fraction * total).sum(axis=1)  # index of the first sample reaching the fraction
    k = xp.minimum(k, w.shape[1] - 1)
    if maxsig > 0:
        k = xp.minimum(k, maxsig - 1)
    thr = srt[xp.arange(w.shape[0]), k]
    return xp.where(thr > 0, thr, xp.asarray(np.finfo(np.float64).tiny))
