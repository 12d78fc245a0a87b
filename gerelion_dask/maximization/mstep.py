"""Maximisation: reconstructions, spectra and the other model parameters (ALGORITHM.md §5, §6.2).

Order per iteration (auto-refine, §6.2 steps 5-11): Hermitian fix-up and point-group symmetrisation of the summed
arrays of each half; low-resolution join of the halves; gold-standard FSC from the arrays; (final iteration:
halves combined); tau^2 from the FSC (refine) or from the reference power (classification); regularised
reconstruction; solvent flattening (not in the final iteration).  Then class fractions, direction priors, the offset
prior, noise spectra, norm and scale corrections (§5.4) and the current resolution (§5.6).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..backend import get_xp, to_host
from ..ops.backprojector import BackProjection, enforce_hermitian
from ..ops.fourier import npix_per_shell
from ..ops.fsc import fsc_from_backprojections, solvent_corrected_fsc
from ..ops.masks import average_region, soft_sphere
from ..ops.projector import ReferenceSpec, reference_power_spectrum
from ..ops.reconstruct import reconstruct, shell_index
from ..ops.symmetry import symmetrise_fourier
from .model import Model, replace

log = logging.getLogger(__name__)

__all__ = ["MStepSettings", "maximization", "reference_tau2", "symmetrised", "ssnr_spectra", "lowpass_map",
           "update_resolution", "ini_high_resolution", "ini_high_taper"]


@dataclass(frozen=True)
class MStepSettings:
    auto_refine: bool
    final: bool = False
    cc_iteration: bool = False  # iteration run with --firstiter_cc: no noise/scale update, maps low-passed
    ini_high_angst: float = 0.0
    tau2_fudge: float = 1.0
    low_resol_join_halves: float = 0.0  # Å, 0 = off
    flatten_solvent: bool = False
    particle_diameter_angst: float = 0.0
    width_mask_edge: float = 5.0
    symmetry_operators: np.ndarray | None = None
    minres_map: int = 5
    gridding_iterations: int = 0
    fix_sigma_noise: bool = False
    fix_sigma_offset: bool = False
    do_norm: bool = False
    do_scale: bool = False
    min_sigma2_offset: float = 0.0  # Å^2 floor (RELION 5: 2); 0 keeps RELION 3.1 behaviour
    reference_r_max: int | None = None  # how the E-step's references were made (classification's tau2 prior):
    padding: float = 2.0  # ReferenceSpec(map, reference_r_max, padding)
    solvent_mask: np.ndarray | None = None  # --solvent_mask (N, N, N) in [0, 1]; None: the soft sphere
    solvent_mask2: np.ndarray | None = None  # --solvent_mask2 (N, N, N) in [0, 1]: a region set to its own average
    lowpass_mask: np.ndarray | None = None  # --lowpass_mask (N, N, N) in [0, 1]: a region kept low-pass filtered
    lowpass_angst: float = 0.0  # --lowpass: that filter's resolution
    solvent_correct_fsc: bool = False  # --solvent_correct_fsc: the FSC of masked unregularised half maps, corrected
    fsc_seed: int = 0  # seed of its phase randomisation (the driver's: random seed and iteration)


def symmetrised(data, weight, grid, ops) -> BackProjection:
    bp = enforce_hermitian(BackProjection(data, weight, grid))
    if ops is not None and len(ops) > 1:
        d, w = symmetrise_fourier(bp.data, bp.weight, ops, grid.r_pad)
        bp = BackProjection(d, w, grid)
    return bp


def _join_low_resolution(bp1: BackProjection, bp2: BackProjection, r_join: int):
    xp = get_xp(bp1.data)
    _, _, r = shell_index(bp1.grid, xp)
    sel = r <= round(bp1.grid.padding * r_join)
    d = (bp1.data + bp2.data) / 2
    w = (bp1.weight + bp2.weight) / 2
    return (BackProjection(xp.where(sel, d, bp1.data), xp.where(sel, w, bp1.weight), bp1.grid),
            BackProjection(xp.where(sel, d, bp2.data), xp.where(sel, w, bp2.weight), bp2.grid))


def ssnr_spectra(bp: BackProjection, nsh: int, tau2_fudge: float, tau2=None, fsc=None):
    """sigma2_recon, tau2, data_vs_prior and Fourier coverage per shell (§5.2), from the weights of ``bp``.

    With ``fsc`` (gold standard): ``SSNR = T FSC/(1-FSC)``, ``tau2 = SSNR sigma2_recon``.  Otherwise ``tau2`` is
    the reference power spectrum and ``data_vs_prior = mean_shell(p^3 W T tau2)``.  Each voxel's evidence-to-prior
    ratio is ``p^3 W T tau2(shell)`` (``0.001 W^2`` where tau2 is 0: RELION's ``updateSSNRarrays`` puts a small tau2
    there); the coverage of a shell is the fraction of its voxels whose ratio is at least 1 (RELION's
    ``fourier_coverage``, model.star's ``rlnFourierCompleteness``).
    """
    xp = get_xp(bp.weight)
    shell, inside, r = shell_index(bp.grid, xp)
    sel = inside & (r * r < bp.grid.r_pad**2) & (shell < nsh)
    w = to_host(bp.weight[sel])  # one transfer; p^3 W in the weights' own precision, as it was made on the device
    pw, w = (bp.grid.padding**3) * w, w.astype(np.float64)
    s = to_host(shell[sel])
    cnt = np.bincount(s, minlength=nsh)[:nsh]
    mean_pw = np.bincount(s, weights=pw, minlength=nsh)[:nsh] / np.maximum(cnt, 1)
    sigma2_recon = np.where(mean_pw > 0, 1.0 / np.where(mean_pw > 0, mean_pw, 1.0), 0.0)
    r_max = bp.grid.r_max
    if fsc is not None:
        f = np.clip(np.asarray(fsc, dtype=np.float64), 0.001, 0.999)
        ssnr = tau2_fudge * f / (1.0 - f)
        tau2_out = ssnr * sigma2_recon
        dvp = ssnr.copy()
    else:
        tau2_out = np.asarray(tau2, dtype=np.float64)[:nsh].copy()
    t = tau2_out[s]
    ratio = np.where(t > 0, pw * tau2_fudge * t, 0.001 * w * w)
    if fsc is None:
        num = np.bincount(s, weights=ratio, minlength=nsh)[:nsh]
        dvp = np.where(cnt > 0, num / np.maximum(cnt, 1), 999.0)
    coverage = np.bincount(s, weights=(ratio >= 1.0).astype(np.float64), minlength=nsh)[:nsh] / np.maximum(cnt, 1)
    beyond = np.arange(nsh) > r_max
    dvp[beyond] = 0.0
    tau2_out[beyond] = 0.0
    return sigma2_recon, tau2_out, dvp, coverage


def lowpass_map(vol, resolution_angst: float, pixel_size: float, edge_shells: float = 2.0,
                round_shell: bool = False):
    """Raised-cosine low-pass at ``resolution_angst`` (edge ``edge_shells`` wide, centred on the shell ``N a /
    resolution``): RELION's ``initialLowPassFilterReferences`` (--ini_high); with ``round_shell`` its
    ``lowPassFilterMap`` (--lowpass_mask), which centres the edge on the rounded shell and starts it at 0 at most."""
    xp = get_xp(vol)
    n = vol.shape[-1]
    F = xp.fft.rfftn(vol)
    c = xp.fft.fftfreq(n) * n
    r = xp.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + (xp.arange(n // 2 + 1)[None, None, :]) ** 2)
    shell = n * pixel_size / resolution_angst
    if round_shell:
        shell = float(np.floor(shell + 0.5))
    lo, hi = shell - edge_shells / 2, shell + edge_shells / 2
    width = edge_shells
    if round_shell and lo < 0:  # (RELION's edge starts at frequency 0 at the lowest)
        lo, width = 0.0, hi
    filt = xp.where(r < lo, 1.0, xp.where(r > hi, 0.0, 0.5 + 0.5 * xp.cos(np.pi * (r - lo) / width)))
    return xp.fft.irfftn(F * filt, s=vol.shape, axes=(0, 1, 2))


def update_resolution(dvp_half1: np.ndarray, ori_size: int, pixel_size: float, auto_refine: bool,
                      minres_map: int = 5) -> float:
    """Current resolution (1/Å) from data_vs_prior (max over classes), §5.6."""
    d = np.max(np.atleast_2d(dvp_half1), axis=0)
    below = np.nonzero(d[1:] < 1.0)[0]
    nu = (below[0] + 1 - 1) if below.size else len(d) - 1
    if auto_refine:
        above = np.nonzero(d[1:] > 1.0)[0]
        if above.size and above[-1] + 1 > nu + 3:
            nu = above[-1] + 1
    nu = max(nu, minres_map)
    return nu / (ori_size * pixel_size)


def ini_high_resolution(ori_size: int, pixel_size: float, ini_high_angst: float) -> float:
    """The current resolution (1/Å) that ``--ini_high`` sets: shell ROUND(N a / ini_high) (RELION 3.1
    ``updateCurrentResolution``: before iteration 1, and again after a ``--firstiter_cc`` iteration, whatever
    data_vs_prior says then; no ``minres_map`` floor)."""
    return float(np.floor(ori_size * pixel_size / ini_high_angst + 0.5)) / (ori_size * pixel_size)


def ini_high_taper(nsh: int, ori_size: int, pixel_size: float, ini_high_angst: float) -> np.ndarray:
    """Per shell, the squared raised cosine that RELION 3.1 applies to tau^2 and data_vs_prior after a
    ``--firstiter_cc`` iteration (``maximizationOtherParameters``): 1 below ``N a / ini_high - 1``, 0 beyond
    ``N a / ini_high + 1``, ``(0.5 - 0.5 cos(pi (r_p - r) / 2))^2`` between (r_p the outer edge).  The maps were
    low-passed there, so the spectra follow them; data_vs_prior > 3 picks the scale correction's shells next."""
    radius = ori_size * pixel_size / ini_high_angst - 1.0  # edge of width 2 shells centred on the ini_high shell
    outer = radius + 2.0
    r = np.arange(nsh, dtype=np.float64)
    edge = (0.5 - 0.5 * np.cos(np.pi * (outer - r) / 2.0)) ** 2
    return np.where(r < radius, 1.0, np.where(r > outer, 0.0, edge))


def reference_tau2(volume, ms: MStepSettings, nsh: int, xp) -> np.ndarray:
    """Classification's tau^2 prior for one class: the power spectrum of the reference transform the E-step used
    (``ReferenceSpec(volume, ms.reference_r_max, ms.padding)``, made here on ``xp``'s device), zero beyond its
    ``r_max``; ``(nsh,)`` float64 on the host."""
    spec = to_host(reference_power_spectrum(ReferenceSpec(volume, ms.reference_r_max, ms.padding).build(xp)))
    out = np.zeros(nsh)
    out[: min(len(spec), nsh)] = spec[:nsh]
    return out


def check_finite(partials: dict) -> None:
    """Raise :class:`~gerelion_dask.errors.RunFailedError` when a half set's E-step sums hold NaN or infinite values:
    something the input checks let through (an image or CTF value that overflows) would otherwise reach the maps as
    NaN or, after the reconstruction's divisions, as zeros, without a word."""
    from ..errors import RunFailedError

    for h, p in sorted(partials.items()):
        xp = get_xp(p.bp_data)
        bad = [name for name, v in (("back-projected images", p.bp_data), ("back-projection weights", p.bp_weight))
               if not bool(xp.isfinite(xp.sum(v)))]
        bad += [name for name, v in (("noise spectra", p.wsum_sigma2), ("scale corrections", p.wsum_scale_xa),
                                     ("scale corrections", p.wsum_scale_aa), ("norm corrections", p.wsum_avg_norm),
                                     ("class weights", p.wsum_pdf_class)) if not np.all(np.isfinite(v))]
        if bad:
            which = f"half set {h}" if h else "the particles"
            raise RunFailedError(f"the E-step sums of {which} hold NaN or infinite values "
                                 f"({', '.join(dict.fromkeys(bad))})",
                                 "look for NaN or extreme values in the particles' images and STAR columns")


def maximization(partials: dict, model: Model, ms: MStepSettings):
    """New model from the summed partials of each half (``{1: P1, 2: P2}`` or ``{0: P}``) and the ``model`` of the
    E-step that made them (classification takes its tau^2 prior from that model's maps, :func:`reference_tau2`).

    Returns ``(model, unfiltered)``: ``unfiltered`` holds the unregularised half maps in the final iteration.
    """
    check_finite(partials)
    N, a = model.ori_size, model.pixel_size
    nsh = N // 2 + 1
    halves = sorted(partials)
    K = model.n_classes
    grid = partials[halves[0]].grid
    bps = {h: [symmetrised(partials[h].bp_data[c], partials[h].bp_weight[c], grid, ms.symmetry_operators)
               for c in range(K)] for h in halves}
    fsc = np.zeros((K, nsh))
    unfil = None
    if ms.auto_refine and len(halves) == 2:
        h1, h2 = halves
        for c in range(K):
            if ms.low_resol_join_halves > 0:
                r_join = int(np.ceil(N * a / max(ms.low_resol_join_halves, model.resolution_angst())))
                bps[h1][c], bps[h2][c] = _join_low_resolution(bps[h1][c], bps[h2][c], r_join)
            f = to_host(fsc_from_backprojections(bps[h1][c], bps[h2][c]))
            fsc[c, : len(f)] = f
        corrected = ms.solvent_correct_fsc and ms.solvent_mask is not None
        if ms.final or corrected:
            unreg = [[reconstruct(bps[h][c], tau2=None, minres_map=ms.minres_map,
                                  gridding_iterations=ms.gridding_iterations) for c in range(K)] for h in halves]
        if corrected:
            rng = np.random.default_rng(ms.fsc_seed)
            for c in range(K):
                f, at, *_ = solvent_corrected_fsc(unreg[0][c], unreg[1][c], ms.solvent_mask, rng)
                if at < 0:
                    log.info("the FSC of the unmasked half maps never falls below 0.8: the unmasked FSC is used "
                             "(RELION does the same; expected in the first iterations)")
                f = f.copy()
                f[grid.r_max + 1:] = 0.0  # nothing beyond the current size, as RELION
                fsc[c] = f[:nsh]
        if ms.final:
            unfil = [[to_host(u) for u in row] for row in unreg]
            joined = [BackProjection(bps[h1][c].data + bps[h2][c].data, bps[h1][c].weight + bps[h2][c].weight, grid)
                      for c in range(K)]
            bps = {h1: joined, h2: joined}
    H = len(halves)
    maps = [[None] * K for _ in range(H)]
    tau2 = np.zeros((H, K, nsh))
    dvp = np.zeros((H, K, nsh))
    s2r = np.zeros((H, K, nsh))
    cov = np.zeros((H, K, nsh))
    for hi, h in enumerate(halves):
        for c in range(K):
            if partials[h].wsum_pdf_class[c] <= 0 and K > 1:
                continue  # empty class: no map, skipped in later E-steps
            bp = bps[h][c]
            if ms.auto_refine:
                f = fsc[c].copy()
                if ms.final:
                    f = np.sqrt(2 * np.clip(f, 0, None) / (1 + np.clip(f, 0, None)))
                s2r[hi, c], tau2[hi, c], dvp[hi, c], cov[hi, c] = ssnr_spectra(bp, nsh, ms.tau2_fudge, fsc=f)
            else:
                prior = np.zeros(nsh) if model.maps[hi][c] is None or model.pdf_class[hi][c] <= 0 else \
                    reference_tau2(model.maps[hi][c], ms, nsh, get_xp(bp.data))
                s2r[hi, c], tau2[hi, c], dvp[hi, c], cov[hi, c] = ssnr_spectra(bp, nsh, ms.tau2_fudge, tau2=prior)
            vol = reconstruct(bp, tau2=tau2[hi, c], tau2_fudge=ms.tau2_fudge, minres_map=ms.minres_map,
                              gridding_iterations=ms.gridding_iterations)
            if ms.cc_iteration and ms.ini_high_angst > 0:
                vol = lowpass_map(vol, ms.ini_high_angst, a)
            if ms.flatten_solvent and not ms.final:
                xp = get_xp(vol)
                mask = soft_sphere(N, ms.particle_diameter_angst / (2 * a), ms.width_mask_edge, 3, xp) \
                    if ms.solvent_mask is None else xp.asarray(ms.solvent_mask)
                region = None  # RELION: the low-pass mask's region, low-pass filtered, added to the masked map
                if ms.lowpass_mask is not None:
                    region = lowpass_map(vol * xp.asarray(ms.lowpass_mask, dtype=vol.dtype), ms.lowpass_angst, a,
                                         round_shell=True)
                vol = vol * mask
                if region is not None:
                    vol += region
                if ms.solvent_mask2 is not None:
                    vol = average_region(vol, xp.asarray(ms.solvent_mask2, dtype=vol.dtype))  # (sums in float64)
            maps[hi][c] = to_host(vol)
    if ms.cc_iteration and ms.ini_high_angst > 0:
        taper = ini_high_taper(nsh, N, a, ms.ini_high_angst)
        tau2, dvp = tau2 * taper, dvp * taper
    if ms.auto_refine and H == 2:
        dvp[1] = dvp[0]  # RELION broadcasts half 1's data_vs_prior to half 2: one resolution and image size for both
    return replace(_other_parameters(partials, model, ms, maps, tau2, dvp, s2r, fsc), fourier_coverage=cov), unfil


_SUMMED = ("wsum_sigma2", "sumw_optics", "wsum_pdf_class", "wsum_pdf_direction", "wsum_sigma2_offset", "wsum_avg_norm",
           "wsum_scale_xa", "wsum_scale_aa", "group_counts", "sum_ll", "sum_pmax", "n_particles")


def half_sums(partials: dict, final: bool) -> list:
    """The sums each half set's other parameters come from, in half order: its own (gold standard: RELION 3.1's MPI
    followers add the weighted sums of their own half set only), or every half's together in the final iteration
    (RELION joins the two halves' weighted sums on convergence)."""
    halves = sorted(partials)
    own = [partials[h] for h in halves]
    if not final or len(own) == 1:
        return own
    tot = own[0]
    for p in own[1:]:
        tot = replace(tot, **{k: getattr(tot, k) + getattr(p, k) for k in _SUMMED})
    return [tot] * len(own)


def _other_parameters(partials, model: Model, ms: MStepSettings, maps, tau2, dvp, s2r, fsc):
    sums = half_sums(partials, ms.final)
    N = model.ori_size
    new = [_half_other_parameters(tot, hi, model, ms) for hi, tot in enumerate(sums)]
    stacked = {k: np.stack([np.asarray(n[k], dtype=np.float64) for n in new]) for k in new[0]}
    if ms.cc_iteration and ms.ini_high_angst > 0:
        res = ini_high_resolution(N, model.pixel_size, ms.ini_high_angst)
    else:
        res = update_resolution(dvp[0], N, model.pixel_size, ms.auto_refine, ms.minres_map)
    ave_pmax = float(sums[0].sum_pmax / max(sums[0].n_particles, 1))  # half 1's (RELION broadcasts it)
    return replace(model, maps=maps, tau2=tau2, data_vs_prior=dvp, fsc=fsc, sigma2_recon=s2r, current_resolution=res,
                   ave_pmax=ave_pmax, **stacked)


def _half_other_parameters(tot, hi: int, model: Model, ms: MStepSettings) -> dict:
    """Class fractions, direction priors, offset prior, average norm, noise spectra, scales and log-likelihood of
    half set ``hi`` from the sums ``tot`` (§5.4, §6.2 step 10); what ``ms`` fixes keeps ``model``'s value."""
    N = model.ori_size
    S = float(tot.wsum_pdf_class.sum()) or 1.0
    pdf_class = tot.wsum_pdf_class / S
    pdf_class = pdf_class / pdf_class.sum() if pdf_class.sum() > 0 else pdf_class
    pdf_dir = tot.wsum_pdf_direction / S
    sigma_off = float(model.sigma_offset_angst[hi])
    if not ms.fix_sigma_offset:
        s2 = tot.wsum_sigma2_offset / (2.0 * S)
        sigma_off = float(np.sqrt(max(s2, ms.min_sigma2_offset, 1e-6)))
    sigma2 = np.array(model.sigma2_noise[hi], dtype=np.float64)
    avg_norm = float(model.avg_norm[hi])
    scales = np.array(model.scales[hi], dtype=np.float64)
    if ms.do_norm:  # in every iteration, the cross-correlation one too (RELION 3.1 maximizationOtherParameters)
        avg_norm = float(tot.wsum_avg_norm / max(tot.n_particles, 1))
    if not ms.cc_iteration:  # noise spectra and scales: not from a cross-correlation iteration
        if not ms.fix_sigma_noise:
            npix = npix_per_shell(N).astype(np.float64)
            for g in range(sigma2.shape[0]):
                if tot.sumw_optics[g] <= 0:
                    continue
                new = tot.wsum_sigma2[g] / (2.0 * tot.sumw_optics[g] * np.maximum(npix, 1))
                for s in range(1, len(new)):
                    if new[s] < 1e-14:
                        new[s] = new[s - 1]
                sigma2[g] = new
        if ms.do_scale and len(scales) > 1:
            xa = tot.wsum_scale_xa / np.where(scales > 0, scales, 1.0)
            aa = tot.wsum_scale_aa / np.where(scales > 0, scales, 1.0) ** 2
            new = np.where(aa > 0, xa / np.where(aa > 0, aa, 1.0), 1.0)
            med = np.median(new)
            new = np.clip(new, med / 5, med * 5)
            cnt = tot.group_counts
            mean = (new * cnt).sum() / max(cnt.sum(), 1)
            scales = new / mean if mean > 0 else np.ones_like(new)
    loglik = float(tot.sum_ll / S if ms.cc_iteration else tot.sum_ll)  # CC iteration: the mean CC
    return {"pdf_class": pdf_class, "pdf_direction": pdf_dir, "sigma2_noise": sigma2, "sigma_offset_angst": sigma_off,
            "avg_norm": avg_norm, "scales": scales, "loglik": loglik}
