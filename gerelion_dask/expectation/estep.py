"""The expectation step of one pool of particles (RELION ``expectationOneParticle``, ALGORITHM.md §4).

Pass 1 (coarse) is written as matrix products (DESIGN.md §4): with ``w = 1/(2 sigma^2)``, CTF c and translation
phases s_t on the particle side,

    diff2(i, o, t) = sum_k w |X|^2 + sum_k w c^2 |P_o|^2 - 2 Re sum_k (w c X s_t) conj(P_o)

so all particles of a pool share one set of projections and the cross term is one real GEMM over stacked real and
imaginary parts.  Pass 2 evaluates the 32 children (8 orientations x 4 translations) of each significant coarse
sample at the current image size, per particle as a small GEMM over the children of its significant orientations
and translations (pairs whose coarse parent was not significant are excluded).  The weighted sums of §4.6 are
formed with the same algebra, and the back-projection sums of all particles are merged per fine orientation before
one 3D insertion each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import get_xp, to_host
from ..conventions import matrix_to_euler, shift_phase_2d, window_rfft2
from ..ops.backprojector import BackProjection, insert_slices
from ..ops.fourier import likelihood_pixels, shells_2d
from ..ops.projector import FourierReference, project
from .grid import OrientationGrid
from .partials import Partials, PoolResult, empty_partials
from .preprocess import PoolParticles, PreprocessSettings, preprocess_pool
from .weights import posterior_weights, significance_threshold

__all__ = ["EStepModel", "EStepSettings", "expectation_pool"]


@dataclass(frozen=True)
class EStepModel:
    """The parts of the current model that one half set's E-step reads."""

    refs: list  # FourierReference per class (None for an empty class)
    pdf_class: np.ndarray  # (K,)
    pdf_direction: np.ndarray  # (K, n_dir)
    sigma2_noise: np.ndarray  # (n_optics, N/2+1)
    data_vs_prior: np.ndarray  # (K, N/2+1)
    sigma_offset_angst: float
    scales: np.ndarray  # (n_groups,) intensity scale per group
    avg_norm: float = 1.0


@dataclass(frozen=True)
class EStepSettings:
    preprocess: PreprocessSettings
    grid: OrientationGrid
    coarse_size: int
    adaptive_fraction: float = 0.999
    maxsig: int = -1
    do_cc: bool = False  # --firstiter_cc in iteration 1 (or --always_cc)
    do_scale: bool = False
    ctf_on_reference: bool = True  # False in iteration 1 when the reference is not CTF-corrected
    local_sigma_rot: float = 0.0  # > 0: Gaussian local searches (degrees)
    local_sigma_psi: float = 0.0
    symmetry_operators: np.ndarray | None = None  # (G, 3, 3) for local-search distances
    n_optics: int = 1
    n_groups: int = 1
    batch: int = 16  # particles per coarse GEMM block


def _gather(a, mask):
    """Window pixels of ``a (..., n, n/2+1)`` selected by a boolean mask -> ``(..., M)``."""
    return a[..., mask]


def _offset_log_prior(u_px, prior_px, pixel_size, sigma_offset_angst, xp=np):
    """log of exp(-|u - mu|^2 a^2 / (2 s^2)) / (2 pi s^2), normalised by its mean over the translations (§4.4)."""
    s2 = max(sigma_offset_angst, 1e-6) ** 2
    d2 = (((u_px - prior_px[:, None, :]) * pixel_size) ** 2).sum(-1)
    lp = -d2 / (2 * s2) - np.log(2 * np.pi * s2)
    m = lp.max(axis=1, keepdims=True)
    return lp - (m + np.log(np.mean(np.exp(lp - m), axis=1, keepdims=True)))


def _local_log_prior(particles: PoolParticles, grid: OrientationGrid, settings: EStepSettings):
    """Gaussian direction and psi priors around each particle's previous angles (§3.5): ``(B, n_dir, n_psi)`` logs.

    One implementation for the whole package: :func:`gerelion_dask.ops.sampling.local_search_priors`.
    """
    from ..ops.sampling import local_search_priors

    rot, tilt = grid.dir_angles
    a = particles.angles
    s = settings.local_sigma_rot
    dp, pp = local_search_priors(a[:, 0], a[:, 1], a[:, 2], s, s, settings.local_sigma_psi, rot, tilt, grid.psi,
                                 settings.symmetry_operators)
    with np.errstate(divide="ignore"):
        return np.log(dp)[:, :, None] + np.log(pp)[:, None, :]


def _orientation_log_prior(particles, model: EStepModel, settings: EStepSettings):
    """``(B, K, n_dir, n_psi)`` log priors of the coarse orientations (-inf = not searched)."""
    grid = settings.grid
    K = len(model.refs)
    B = len(particles.index)
    active = np.array([r is not None and p > 0 for r, p in zip(model.refs, model.pdf_class, strict=True)])
    if settings.local_sigma_rot > 0:
        loc = _local_log_prior(particles, grid, settings)  # class fractions not applied (RELION, all versions)
        lp = np.broadcast_to(loc[:, None], (B, K, grid.n_dir, grid.n_psi)).copy()
    else:
        with np.errstate(divide="ignore"):
            pd = np.log(np.asarray(model.pdf_direction, dtype=np.float64))
        lp = np.broadcast_to(pd[None, :, :, None], (B, K, grid.n_dir, grid.n_psi)).copy()
    lp[:, ~active] = -np.inf
    if particles.seed_class is not None:
        keep = np.zeros((B, K), bool)
        keep[np.arange(B), particles.seed_class] = True
        lp[~keep] = -np.inf
    # [3.0+] divide by the mean over the sampled orientations (changes only the log-likelihood values)
    fin = np.isfinite(lp)
    for b in range(B):
        v = lp[b][fin[b]]
        if v.size:
            m = v.max()
            lp[b][fin[b]] -= m + np.log(np.mean(np.exp(v - m)))
    return lp


def _diff2_block(xp, X, C, W, phase, P, cc: bool, ctf_on_ref: bool):
    """diff2 ``(B, T, O)`` for particles ``X (B, M)`` against projections ``P (O, M)``."""
    Cr = C if ctf_on_ref else xp.ones_like(C)
    if cc:
        Y = (Cr * X)[:, None, :] * phase[None]
        g = xp.einsum("btm,om->bto", Y.real, P.real, optimize=True) + xp.einsum("btm,om->bto", Y.imag, P.imag,
                                                                                  optimize=True)
        normp = xp.sqrt((Cr * Cr) @ (xp.abs(P) ** 2).T)  # (B, O)
        normx = xp.sqrt((xp.abs(X) ** 2).sum(axis=1))  # (B,)
        den = normp[:, None, :] * normx[:, None, None]
        return -g / xp.where(den > 0, den, 1.0)
    a = (W * xp.abs(X) ** 2).sum(axis=1)
    b = (W * Cr * Cr) @ (xp.abs(P) ** 2).T  # (B, O)
    Y = (W * Cr * X)[:, None, :] * phase[None]  # (B, T, M)
    Bn, T, M = Y.shape
    g = Y.real.reshape(Bn * T, M) @ P.real.T + Y.imag.reshape(Bn * T, M) @ P.imag.T
    return a[:, None, None] + b[:, None, :] - 2.0 * g.reshape(Bn, T, -1)


def expectation_pool(images, particles: PoolParticles, model: EStepModel, settings: EStepSettings):
    """E-step of one pool of one half set: returns ``(Partials, PoolResult)``."""
    xp = get_xp(images)
    ps = settings.preprocess
    N, nc = ps.ori_size, settings.coarse_size
    grid = settings.grid
    K = len(model.refs)
    pre = preprocess_pool(images, particles, ps, model.sigma2_noise)
    B = len(particles.index)
    scale = np.asarray(model.scales)[particles.group]
    sig2 = np.asarray(model.sigma2_noise, dtype=np.float64)

    # ---- pass 1: coarse -------------------------------------------------------------------------------
    mc = likelihood_pixels(nc)
    shc = shells_2d(nc)[mc]
    Xc = _gather(window_rfft2(pre.fimg, nc), xp.asarray(mc))
    Cc = _gather(window_rfft2(pre.ctf, nc), xp.asarray(mc)) * xp.asarray(scale)[:, None]
    Wc = xp.asarray(1.0 / (2.0 * sig2[particles.optics_group][:, shc]))
    phase_c = _gather(shift_phase_2d(nc, N, xp.asarray(grid.translations)), xp.asarray(mc))  # (T, Mc)
    T = len(grid.translations)
    O = grid.n_dir * grid.n_psi
    lp_or = _orientation_log_prior(particles, model, settings)  # (B, K, n_dir, n_psi)
    u = np.rint(particles.offset_px)[:, None, :] + grid.translations[None]
    lp_off = _offset_log_prior(u, particles.offset_prior_px, ps.pixel_size, model.sigma_offset_angst)  # (B, T)
    coarse_lp = lp_or.reshape(B, K, O)[:, :, :, None] + lp_off[:, None, None, :]  # (B, K, O, T)
    diff2 = np.full((B, K, O, T), np.inf)
    A_all = grid.coarse_matrices() if settings.local_sigma_rot <= 0 else None
    for c in range(K):
        if model.refs[c] is None or not np.isfinite(coarse_lp[:, c]).any():
            continue
        if A_all is not None:
            P = _gather(project(model.refs[c], xp.asarray(A_all), nc), xp.asarray(mc))
            for s in range(0, B, settings.batch):
                e = min(B, s + settings.batch)
                d = _diff2_block(xp, Xc[s:e], Cc[s:e], Wc[s:e], phase_c, P, settings.do_cc,
                                 settings.ctf_on_reference)
                diff2[s:e, c] = to_host(d).transpose(0, 2, 1)
        else:
            fin = np.isfinite(lp_or[:, c].reshape(B, O))
            union = np.nonzero(fin.any(axis=0))[0]
            A = grid.coarse_matrices(union // grid.n_psi, union % grid.n_psi)
            Pu = xp.concatenate([_gather(project(model.refs[c], xp.asarray(A[s : s + 4096]), nc), xp.asarray(mc))
                                 for s in range(0, len(union), 4096)])
            where = np.full(O, -1)
            where[union] = np.arange(len(union))
            for b in range(B):
                allowed = np.nonzero(fin[b])[0]
                if allowed.size == 0:
                    continue
                P = Pu[xp.asarray(where[allowed])]
                d = _diff2_block(xp, Xc[b : b + 1], Cc[b : b + 1], Wc[b : b + 1], phase_c, P, settings.do_cc,
                                 settings.ctf_on_reference)
                diff2[b, c, allowed] = to_host(d)[0].T
    diff2 += (to_host(pre.highres_xi2) / 2.0)[:, None, None, None] if not settings.do_cc else 0.0
    flat_d = diff2.reshape(B, -1)
    flat_lp = np.where(np.isfinite(flat_d), coarse_lp.reshape(B, -1), -np.inf)
    if settings.do_cc:
        best = np.argmin(np.where(np.isfinite(flat_lp), flat_d, np.inf), axis=1)
        sig = np.zeros_like(flat_d, dtype=bool)
        sig[np.arange(B), best] = True
    else:
        w1, _, _, _ = posterior_weights(flat_d, flat_lp)
        thr = significance_threshold(w1, settings.adaptive_fraction, settings.maxsig)
        sig = (w1 >= thr[:, None]) & (w1 > 0)
    n_sig = sig.sum(axis=1)
    return _fine_pass(xp, pre, particles, model, settings, sig.reshape(B, K, O, T), coarse_lp, n_sig)


def _fine_pass(xp, pre, particles, model, settings, sig, coarse_lp, n_sig):
    ps = settings.preprocess
    N, n = ps.ori_size, ps.current_size
    grid = settings.grid
    K = len(model.refs)
    B = len(particles.index)
    scale = np.asarray(model.scales)[particles.group]
    sig2 = np.asarray(model.sigma2_noise, dtype=np.float64)
    mb = likelihood_pixels(n, include_dc=True)
    shb = shells_2d(n)[mb]
    nsh = N // 2 + 1
    mb_x = xp.asarray(mb)
    X_all = _gather(pre.fimg, mb_x)
    Xnm_all = _gather(pre.fimg_nomask, mb_x)
    C_all = _gather(pre.ctf, mb_x) * xp.asarray(scale)[:, None]
    lik = xp.asarray(shb >= 1)
    partials = empty_partials(particles.half, _grid_of(model), K, grid.n_dir, settings.n_optics, settings.n_groups,
                              N, np)
    acc = {f: np.array(getattr(partials, f), dtype=np.float64, copy=True) for f in
           ("wsum_sigma2", "sumw_optics", "wsum_pdf_class", "wsum_pdf_direction", "wsum_scale_xa", "wsum_scale_aa",
            "group_counts")}
    scal = {"off": 0.0, "norm": 0.0, "ll": 0.0, "pmax": 0.0, "zero": 0}
    bp_rows = {c: ([], [], []) for c in range(K)}
    out = {k: np.zeros(B) for k in ("rot", "tilt", "psi", "ox", "oy", "cls", "pmax", "ll", "norm")}
    int_off = pre.int_offset_px
    highres = to_host(pre.power_highres)
    cache = _FineProjections(model, grid, sig, n, mb_x, xp)
    for b in range(B):
        g = int(particles.optics_group[b])
        s_b = sig[b]  # (K, O, T)
        cs, os_, ts = np.nonzero(s_b)
        co = np.unique(cs * (grid.n_dir * grid.n_psi) + os_)
        ut = np.unique(ts)
        t_fine = grid.fine_translations(ut).reshape(-1, 2)  # (4|UT|, 2)
        ph = _gather(shift_phase_2d(n, N, xp.asarray(t_fine)), mb_x)  # (Tf, M)
        Wd = xp.asarray(np.where(shb >= 1, 1.0 / (2.0 * sig2[g][shb]), 0.0))
        Wbp = xp.asarray(1.0 / sig2[g][shb])
        X, Xnm, C = X_all[b], Xnm_all[b], C_all[b]
        Cr = C if settings.ctf_on_reference else xp.ones_like(C)
        Xt = X[None] * ph
        Xnm_t = Xnm[None] * ph
        a = float((Wd * xp.abs(X) ** 2).sum())
        diffs, lps, meta = [], [], []
        for c in np.unique(co // (grid.n_dir * grid.n_psi)):
            oc = co[co // (grid.n_dir * grid.n_psi) == c] % (grid.n_dir * grid.n_psi)
            A, gid, _ = grid.fine_orientations(oc)
            P = cache.get(c, gid.reshape(-1))  # (8|oc|, M)
            if settings.do_cc:
                g_ = (Xt * Cr[None]).real @ (P * lik).real.T + (Xt * Cr[None]).imag @ (P * lik).imag.T
                normp = xp.sqrt((Cr * Cr * lik) @ (xp.abs(P) ** 2).T)
                normx = float(xp.sqrt((xp.abs(X) ** 2 * lik).sum()))
                d = -g_ / (normp[None, :] * normx + 1e-300)
            else:
                bb = (Wd * Cr * Cr) @ (xp.abs(P) ** 2).T
                Y = Wd * Cr * Xt
                d = a + bb[None, :] - 2.0 * (Y.real @ P.real.T + Y.imag @ P.imag.T) + float(pre.highres_xi2[b]) / 2
            d = to_host(d).T  # (8|oc|, Tf)
            shp = (len(oc), 8, len(ut), 4)
            allowed = s_b[c][oc][:, ut][:, None, :, None]  # parent (coarse orientation, translation) significant
            lp = coarse_lp[b, c][oc][:, ut][:, None, :, None]  # children inherit their parent's prior
            diffs.append(np.where(allowed, d.reshape(shp), np.inf).reshape(d.shape))
            lps.append(np.broadcast_to(np.where(allowed, lp, -np.inf), shp).reshape(d.shape))
            meta.append((c, oc, A.reshape(-1, 3, 3), gid.reshape(-1), P))
        D = np.concatenate([x.ravel() for x in diffs])[None]
        LP = np.concatenate([x.ravel() for x in lps])[None]
        if settings.do_cc:
            w = np.zeros_like(D)
            w[0, np.argmin(D[0])] = 1.0
            dmin, sumw, bad = np.array([D.min()]), np.array([1.0]), np.array([False])
        else:
            w, dmin, sumw, bad = posterior_weights(D, LP)
            thr = significance_threshold(w, settings.adaptive_fraction, settings.maxsig)
            w = np.where(w >= thr[:, None], w, 0.0)
        scal["zero"] += int(bad[0])
        wn = (w / sumw[:, None])[0]
        ibest = int(np.argmax(wn))
        # split the flat weights back per class block
        pos = 0
        resid_pix = xp.zeros(len(shb), dtype=np.float64)
        wsum_total = 0.0
        for (c, oc, A, gid, P), d in zip(meta, diffs, strict=True):
            m = d.size
            Wm = wn[pos : pos + m].reshape(d.shape)  # (8|oc|, Tf)
            if pos <= ibest < pos + m:
                r_, c_ = np.unravel_index(ibest - pos, d.shape)
                rr, tt, pp = matrix_to_euler(A[r_])
                out["rot"][b], out["tilt"][b], out["psi"][b] = float(rr), float(tt), float(pp)
                off = int_off[b] + t_fine[c_]
                out["ox"][b], out["oy"][b] = off * ps.pixel_size
                out["cls"][b] = c + 1
            pos += m
            rows = np.nonzero(Wm.sum(axis=1) > 0)[0]
            if rows.size == 0:
                continue
            Wr = xp.asarray(Wm[rows])
            Pr = P[xp.asarray(rows)]
            wo = Wr.sum(axis=1)  # (R,)
            S_nm = Wr @ Xnm_t  # (R, M)
            S_m = Wr @ Xt
            bp_rows[c][0].append(gid[rows])
            # back-projection always carries the CTF (RELION: Fimg = CTF X / sigma2, Fweight = CTF^2 / sigma2), also
            # in iteration 1 when the reference is not CTF-corrected (that only changes the likelihood)
            bp_rows[c][1].append(to_host(S_nm * (C * Wbp)[None]))
            bp_rows[c][2].append(to_host(wo[:, None] * (C * C * Wbp)[None]))
            ws = float(wo.sum())
            wsum_total += ws
            resid_pix += (Cr * Cr) * ((wo[:, None] * xp.abs(Pr) ** 2).sum(axis=0)) \
                - 2.0 * Cr * (xp.conj(Pr) * S_m).real.sum(axis=0) + xp.abs(X) ** 2 * ws
            acc["wsum_pdf_class"][c] += ws
            np.add.at(acc["wsum_pdf_direction"][c], oc // grid.n_psi, to_host(Wm.reshape(len(oc), 8, -1).sum((1, 2))))
            if settings.do_scale:
                good = xp.asarray(np.asarray(model.data_vs_prior)[c][shb] > 3)
                acc["wsum_scale_xa"][particles.group[b]] += float(((xp.conj(S_m) * Cr[None] * Pr).real * good).sum())
                acc["wsum_scale_aa"][particles.group[b]] += float(
                    (wo[:, None] * (Cr * Cr)[None] * xp.abs(Pr) ** 2 * good).sum())
            u_f = int_off[b][None, :] + t_fine
            d2o = (((particles.offset_prior_px[b][None] - u_f) * ps.pixel_size) ** 2).sum(-1)
            scal["off"] += float((Wm.sum(axis=0) * d2o).sum())
        rp = to_host(resid_pix)
        acc["wsum_sigma2"][g] += np.bincount(shb, weights=rp, minlength=nsh)[:nsh] + highres[b]
        acc["sumw_optics"][g] += wsum_total
        acc["group_counts"][particles.group[b]] += 1.0
        acc_norm = float(rp.sum() + highres[b].sum())
        newnorm = (particles.norm[b] / model.avg_norm) * np.sqrt(2.0 * acc_norm) if ps.do_norm else particles.norm[b]
        out["norm"][b] = newnorm
        scal["norm"] += newnorm
        out["pmax"][b] = wn.max()
        scal["pmax"] += wn.max()
        if settings.do_cc:
            out["ll"][b] = -float(dmin[0])
        else:
            logsig = np.log(2 * np.pi * sig2[g][shb[shb >= 1]]).sum()
            out["ll"][b] = float(np.log(sumw[0]) - dmin[0] - logsig)
        scal["ll"] += out["ll"][b]
    bp_data = xp.zeros(partials.bp_data.shape, np.complex128)
    bp_weight = xp.zeros(partials.bp_weight.shape, np.float64)
    for c in range(K):
        gids, fis, fws = bp_rows[c]
        if not gids:
            continue
        gid = np.concatenate(gids)
        uniq, inv = np.unique(gid, return_inverse=True)
        Fi = np.zeros((len(uniq), len(shb)), np.complex128)
        Fw = np.zeros((len(uniq), len(shb)), np.float64)
        np.add.at(Fi, inv, np.concatenate(fis))
        np.add.at(Fw, inv, np.concatenate(fws))
        slices = xp.zeros((len(uniq), n, n // 2 + 1), np.complex128)
        weights = xp.zeros((len(uniq), n, n // 2 + 1), np.float64)
        slices[:, mb_x] = xp.asarray(Fi)
        weights[:, mb_x] = xp.asarray(Fw)
        A = grid.fine_matrices_from_ids(uniq)
        bp = BackProjection(bp_data[c], bp_weight[c], _grid_of(model))
        insert_slices(bp, A, slices, weights)
    part = Partials(particles.half, _grid_of(model), bp_data, bp_weight, acc["wsum_sigma2"], acc["sumw_optics"],
                    acc["wsum_pdf_class"], acc["wsum_pdf_direction"], scal["off"], scal["norm"],
                    acc["wsum_scale_xa"], acc["wsum_scale_aa"], acc["group_counts"], scal["ll"], scal["pmax"], B,
                    scal["zero"])
    res = PoolResult(particles.index, out["rot"], out["tilt"], out["psi"], out["ox"], out["oy"],
                     out["cls"].astype(np.int64), out["pmax"], n_sig.astype(np.int64), out["ll"], out["norm"])
    return part, res


class _FineProjections:
    """Projections of every fine orientation any particle of the pool needs, computed once per class.

    The fine grid (with its perturbation) is shared by all particles of an iteration, so a pool projects the union
    of the children of its significant coarse orientations once instead of once per particle.
    """

    def __init__(self, model, grid: OrientationGrid, sig, n: int, mask, xp, chunk: int = 4096):
        self.rows = {}
        self.data = {}
        K = sig.shape[1]
        for c in range(K):
            o = np.nonzero(sig[:, c].any(axis=(0, 2)))[0]
            if o.size == 0:
                continue
            A, gid, _ = grid.fine_orientations(o)
            A, gid = A.reshape(-1, 3, 3), gid.reshape(-1)
            out = []
            for s in range(0, len(gid), chunk):
                out.append(_gather(project(model.refs[c], xp.asarray(A[s : s + chunk]), n), mask))
            self.data[c] = xp.concatenate(out)
            self.rows[c] = (np.argsort(gid, kind="stable"), np.sort(gid))

    def get(self, c: int, gid):
        order, sorted_gid = self.rows[c]
        pos = order[np.searchsorted(sorted_gid, gid)]
        return self.data[c][get_xp(self.data[c]).asarray(pos)]


def _grid_of(model: EStepModel):
    for r in model.refs:
        if r is not None:
            return r.grid
    raise ValueError("no non-empty class in the model")


_ = FourierReference
