"""``--skip_align`` and ``--skip_rotate``: the E-step of a pool whose particles keep their orientations (RELION's
classification without alignment, or with translational searches only).

As RELION 3.1 (``MlOptimiser``'s ``do_skip_align``): each particle has one orientation, its own angles (off the
sampling grid, not perturbed), and one translation, the fractional part of its offset (the integer part is the
pre-shift every pool gets); the only hidden variable left is the class, whose prior is ``pdf_class`` normalised by
its mean over the classes searched (the offset prior of a single translation normalises to 1).  Weights,
significance, the back-projection and the noise, scale, norm and offset sums then follow the fine pass
(:func:`~gerelion_dask.expectation.weights.posterior_weights`, :func:`~gerelion_dask.ops.likelihood.pair_sums`,
:func:`~gerelion_dask.expectation.fine.pool_pixels`), with the projections made at the particles' own matrices and
inserted there.  The learned direction distribution means nothing here (RELION keeps one direction): each class's
weight is spread evenly over the grid's directions.

``--skip_rotate`` (``do_skip_rotate``) keeps the orientation alone: each particle's translations are those of the
unperturbed coarse grid around its integer pre-shift, in one pass at the current image size with no oversampling
(RELION sets ``adaptive_oversampling = 0``), under the usual Gaussian offset prior normalised by its mean over the
translations (:func:`~gerelion_dask.expectation.estep._offset_log_prior`).  The cross terms of every translation
come from one product per class, ``Re((Z conj P) ph^T)`` with the translations' phases ``ph (T, M)``, and the sums
take each (particle, class) pair's kept translations as its children.
"""

from __future__ import annotations

import numpy as np

from ..backend import to_host
from ..conventions import euler_to_matrix, shift_phase
from ..ops.backprojector import BackProjection, insert_slices
from ..ops.likelihood import diff2_from_terms, pair_sums
from .estep import _offset_log_prior, searched_classes
from .fine import _pool_output, _sums_to_host, _to_host_together, fine_limits, grid_of, pass_start, project_gathered
from .weights import best_sample_weights, kept_weights, posterior_weights

__all__ = ["fixed_pose_pass", "fixed_pose_log_prior"]


def fixed_pose_log_prior(pdf_class, search: np.ndarray) -> np.ndarray:
    """``(B, K)`` log prior of each particle's classes: ``log pdf_class`` minus the log of its mean over the classes
    the particle may take (``search``: :func:`~gerelion_dask.expectation.estep.searched_classes`), ``-inf``
    elsewhere."""
    pdf = np.asarray(pdf_class, dtype=np.float64)
    n = search.sum(axis=1, keepdims=True)
    mean = np.where(search, pdf[None, :], 0.0).sum(axis=1, keepdims=True) / np.maximum(n, 1)
    with np.errstate(divide="ignore"):
        return np.where(search, np.log(pdf)[None, :] - np.log(np.where(mean > 0, mean, 1.0)), -np.inf)


def fixed_pose_pass(xp, pre, particles, model, settings, cache=None):
    """``(Partials, PoolResult)`` of one preprocessed pool (``pre``) whose particles keep their angles, and their
    offsets too unless ``settings.search_translations`` (``--skip_rotate``)."""
    ps = settings.preprocess
    N, n = ps.ori_size, ps.current_size
    grid = settings.grid
    K = len(model.refs)
    B = len(particles.index)
    max_elems = settings.fine_max_elems or fine_limits(xp)["max_elems"]
    og = np.asarray(particles.optics_group)
    pix, px, X2, logsig, goodf, highres, partials, acc = pass_start(xp, pre, particles, model, settings, cache)
    mb = pix.mask
    M = len(pix.shells)
    int_off = np.asarray(pre.int_offset_px, dtype=np.float64)
    if settings.search_translations:  # the grid's translations (pixels from the pre-shift), shared phase rows
        u = np.asarray(grid.translations, dtype=np.float64)  # (T, 2)
        ph = shift_phase(pix.kx, pix.ky, N, xp.asarray(u), xp)  # (T, M)
        offsets = int_off[:, None, :] + u[None]  # (B, T, 2) pixels
        off_lp = _offset_log_prior(offsets, np.asarray(particles.offset_prior_px), ps.pixel_size,
                                   model.sigma_offset_angst)  # (B, T)
    else:  # --skip_align: the one translation, the fractional part of the offset (the prior normalises to 1)
        frac = np.asarray(particles.offset_px, dtype=np.float64) - int_off
        ph = shift_phase(pix.kx, pix.ky, N, xp.asarray(frac), xp)  # (B, M): a phase row per particle
        off_lp = np.zeros((B, 1))
        offsets = np.asarray(particles.offset_px, dtype=np.float64)[:, None, :]  # (B, 1, 2)
    T = off_lp.shape[1]
    A = euler_to_matrix(*np.asarray(particles.angles, dtype=np.float64).T)  # (B, 3, 3), host
    search = searched_classes(model, particles)
    LP = xp.asarray(fixed_pose_log_prior(model.pdf_class, search)[:, :, None] + off_lp[:, None, :]).reshape(B, K * T)

    # diff2 (or -CC) of every particle against every class at its orientation, for each of its translations
    Z, V, a = px.diff2_terms(slice(None), settings.do_cc)
    D = xp.full((B, K, T), xp.inf)
    for c in np.nonzero(search.any(axis=0))[0]:
        P = project_gathered(model.refs[c], A, n, mb, xp)
        Y = Z * xp.conj(P)
        g = (Y @ ph.T).real if settings.search_translations else (Y * ph).real.sum(axis=1)[:, None]
        p = (V * (P.real**2 + P.imag**2)).sum(axis=1)
        D[:, c, :] = diff2_from_terms(a[:, None], p[:, None], g, settings.do_cc)
        del P, Y, g, p
    del Z, V
    D = D.reshape(B, K * T)
    if settings.do_cc:  # the best sample alone takes the particle (RELION's maximum cross-correlation)
        W, dmin, sumw, bad = best_sample_weights(D, LP)
    else:
        W, dmin, sumw, bad = posterior_weights(D, LP)
        W = kept_weights(W, sumw, settings.adaptive_fraction, settings.maxsig)
    del D, LP
    best, pmax, nsig, dmin, sumw, bad = _to_host_together(
        xp, [xp.argmax(W, axis=1), W.max(axis=1), (W > 0).sum(axis=1), dmin, sumw, bad])
    W = W.reshape(B, K, T)

    # the weighted sums: each (particle, class) pair that kept weight, its kept translations as its children
    XCW, CCW = px.backprojection_terms()
    resid = xp.zeros((B, M), np.float64)
    xa = xp.zeros(B, np.float64)
    aa = xp.zeros(B, np.float64)
    ws = W.sum(axis=(1, 2))
    pdf_class_x = W.sum(axis=(0, 2))
    pdf_dir_x = xp.broadcast_to(pdf_class_x[:, None] / grid.n_dir, (K, grid.n_dir)).copy()
    e = (np.asarray(particles.offset_prior_px)[:, None, :] - offsets) * ps.pixel_size  # (B, T, 2)
    off_x = (W.sum(axis=1) * xp.asarray((e * e).sum(axis=2))).sum()[None]
    bp_data = xp.zeros(partials.bp_data.shape, np.complex128)
    bp_weight = xp.zeros(partials.bp_weight.shape, np.float64)
    kept = to_host(W > 0)  # (B, K, T)
    for c in np.nonzero(kept.any(axis=(0, 2)))[0]:
        rows = np.nonzero(kept[:, c].any(axis=1))[0]
        r_i, t_i = np.nonzero(kept[rows, c])  # children in pair order (pair i: particle rows[i])
        cstart = np.concatenate([[0], np.cumsum(np.bincount(r_i, minlength=len(rows)))])
        rx, tx = xp.asarray(rows), xp.asarray(t_i)
        tp = tx if settings.search_translations else rx  # phase row: a translation, or the particle's
        wv = W[rx[xp.asarray(r_i)], c, tx]
        P = project_gathered(model.refs[c], A[rows], n, mb, xp)
        bp_i = xp.zeros((len(rows), M), np.complex128)
        bp_w = xp.zeros((len(rows), M), np.float64)
        own = xp.arange(len(rows))  # pair i: particle rows[i], its projection and back-projection row i
        pair_sums(XCW, CCW, px.X, px.Cr, goodf[c], ph, P, rx, own, own, xp.asarray(cstart), tp, wv,
                  bp_i, bp_w, resid, xa, aa, max_elems, rows_sorted=True)
        del P
        insert_slices(BackProjection(bp_data[c], bp_weight[c], grid_of(model)), A[rows], bp_i, bp_w, pixels=mb)
        del bp_i, bp_w
    del XCW, CCW, W
    cls, t_best = np.divmod(best, T)
    o_b = offsets[np.arange(B), t_best] * ps.pixel_size
    out = {"rot": particles.angles[:, 0].astype(np.float64), "tilt": particles.angles[:, 1].astype(np.float64),
           "psi": particles.angles[:, 2].astype(np.float64), "ox": o_b[:, 0], "oy": o_b[:, 1],
           "cls": cls + 1, "pmax": pmax, "ll": -dmin if settings.do_cc else np.log(sumw) - dmin - logsig[og]}
    off_sum, out["norm"], _ = _sums_to_host(xp, particles, model, settings, acc, resid, X2, ws, xa, aa, pdf_class_x,
                                            pdf_dir_x, off_x, pix.shell_1hot, highres)
    return _pool_output(particles, model, acc, bp_data, bp_weight, off_sum, out, nsig, int(np.sum(bad)))
