"""Job set-up: read and check the inputs, derive per-particle arrays, the initial noise spectra and model.

Everything here runs once per job on the driver; bad input raises :class:`~gerelion_dask.errors.InputError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from .config import JobConfig
from .conventions import centred_rfft2
from .errors import InputError
from .io.mrc import read_map
from .io.particles import ParticleSet
from .ops.ctf import CtfParams
from .ops.fourier import likelihood_pixels, shells_2d
from .ops.masks import soft_mask_outside

__all__ = ["JobInputs", "load_inputs", "particle_state", "initial_sigma2", "PowerSettings", "PowerSums", "power_sums",
           "pool_power_sums", "sigma2_from_power_sums", "ParticleState", "drop_non_finite",
           "optics_index", "ctf_params"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobInputs:
    particles: ParticleSet
    reference: list  # K maps (N, N, N) float64
    box: int
    pixel_size: float
    diameter: float  # Å
    group_index: np.ndarray  # (n,) 0-based scale group
    group_names: list
    optics_index: np.ndarray  # (n,) 0-based optics group
    ctf: CtfParams | None
    solvent_mask: np.ndarray | None = None  # (N, N, N) float32 in [0, 1] (--solvent_mask), or None
    solvent_mask2: np.ndarray | None = None  # (N, N, N) float32 in [0, 1] (--solvent_mask2), or None
    lowpass_mask: np.ndarray | None = None  # (N, N, N) float32 in [0, 1] (--lowpass_mask), or None
    band_shells: tuple = ()  # per optics row: the last shell of data (ParticleSet.band_shells; N: all); (): all


@dataclass(frozen=True)
class ParticleState:
    """Per-particle hidden-variable estimates between iterations (host arrays of length n)."""

    angles: np.ndarray  # (n, 3)
    offsets_px: np.ndarray  # (n, 2)
    class_index: np.ndarray  # (n,) 0-based
    norm: np.ndarray
    half: np.ndarray  # (n,) 1/2, or 0 without halves
    pmax: np.ndarray
    n_significant: np.ndarray
    loglik: np.ndarray


def _col(df: pd.DataFrame, name: str, default) -> np.ndarray:
    return df[name].to_numpy(dtype=np.float64) if name in df else np.full(len(df), default, dtype=np.float64)


def coarser_groups_warning(ps: ParticleSet) -> str:
    """The warning (or "") for optics groups coarser than the model's grid: their images, resampled onto it, hold
    nothing beyond their own Nyquist frequency, where the finer groups' particles alone make the map (as RELION)."""
    N, a = ps.box_size, ps.pixel_size
    band = ps.band_shells()
    if not band:
        return ""
    grids = ps.resampled_groups()
    groups = ", ".join(f"optics group {g} ({grids[g][0]} px at {grids[g][1]:g} Å; shells <= {s}, {N * a / s:.3g} Å)"
                       for g, s in band.items())
    one = len(band) == 1
    return (f"{groups} {'is' if one else 'are'} coarser than the model's grid ({N} px at {a:g} Å, the "
            f"lowest-numbered group's): beyond {'its' if one else 'their'} Nyquist frequency only the other groups' "
            "particles refine the map (as in RELION)")


def band_shells_per_row(ps: ParticleSet) -> tuple:
    """:meth:`~gerelion_dask.io.particles.ParticleSet.band_shells` per row of the optics table (N, beyond every
    shell of the window, corners included, for groups with data to the model's Nyquist), or () when every group
    has."""
    band = ps.band_shells()
    if not band:
        return ()
    return tuple(int(band.get(int(g), ps.box_size)) for g in ps.optics["rlnOpticsGroup"].to_numpy())


def load_inputs(cfg: JobConfig) -> JobInputs:
    ps = ParticleSet.from_star(cfg.i, require_ctf=cfg.ctf)
    if ps.n == 0:
        raise InputError(cfg.i, "the STAR file holds no particles")
    box = ps.box_size
    apix = ps.pixel_size
    resampled = ps.resampled_groups()
    coarser = coarser_groups_warning(ps)
    if coarser:
        log.warning("%s: %s", ps.star_path, coarser)
    for g, (n, a) in resampled.items():
        log.info("%s: optics group %d (%d px at %g Å) is resampled onto the model's grid (%d px at %g Å) as its "
                 "images are read", ps.star_path, g, n, a, box, apix)
    if box % 2:
        raise InputError(cfg.i, f"odd box size {box}: refinement needs even boxes (as RELION)",
                         "re-extract the particles with an even box")
    grid_note = (f"; the model's grid is optics group {ps.model_group()}'s ({box} px at {apix:g} Å), onto which "
                 "the other groups are resampled") if resampled else ""
    try:
        refs = _read_references(cfg, box, apix)
    except InputError as e:  # a map that matches another optics group than the model's: say which grid counts
        raise InputError(e.path, e.problem + grid_note, e.hint) from None
    diameter = cfg.particle_diameter if cfg.particle_diameter > 0 else box * apix
    if diameter > box * apix * (1 + 1e-6):
        raise InputError(None, f"--particle_diameter {cfg.particle_diameter} Å is larger than the box "
                         f"({box} px x {apix:.4g} Å = {box * apix:.4g} Å)",
                         f"use at most {box * apix:.4g} Å, or re-extract the particles in a larger box")
    for g, (n, a) in resampled.items():
        if diameter > n * a * (1 + 1e-6):
            log.warning("%s: optics group %d's box (%d px x %g Å = %.4g Å) is smaller than the particle diameter "
                        "(%.4g Å): its images are 0 beyond their box's edge, inside the mask", ps.star_path, g, n, a,
                        n * a, diameter)
    md = ps.metadata
    gname = "rlnGroupName" if "rlnGroupName" in md else ("rlnMicrographName" if "rlnMicrographName" in md else None)
    if gname is None:
        names = ["group_1"]
        gidx = np.zeros(ps.n, dtype=np.int64)
    else:
        codes, uniq = pd.factorize(md[gname].astype(str), sort=False)
        gidx, names = codes.astype(np.int64), list(uniq)
    oidx = optics_index(ps)
    ctf = ctf_params(ps, oidx) if cfg.ctf else None
    try:
        mask = _read_solvent_mask(cfg, box, apix)
        mask2 = _read_solvent_mask(cfg, box, apix, which="--solvent_mask2")
        lowpass = _read_solvent_mask(cfg, box, apix, which="--lowpass_mask")
    except InputError as e:
        raise InputError(e.path, e.problem + grid_note, e.hint) from None
    lacking = [c for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi") if c not in md]
    if (cfg.skip_align or cfg.skip_rotate) and lacking:
        flag = "--skip_align" if cfg.skip_align else "--skip_rotate"
        raise InputError(cfg.i, f"{flag} keeps every particle's angles, but the particles have no "
                         f"{', '.join(lacking)}", "classify the particles of an earlier refinement (its run_data.star)")
    if cfg.solvent_correct_fsc and (mask is None or not cfg.auto_refine):
        log.warning("--solvent_correct_fsc has no effect %s (as in RELION)",
                    "without --solvent_mask" if mask is None else "in a classification")
    return JobInputs(ps, refs, box, apix, diameter, gidx, names, oidx, ctf, mask, mask2, lowpass,
                     band_shells_per_row(ps))


def _read_references(cfg: JobConfig, box: int, apix: float) -> list:
    path = cfg.ref
    if path.endswith(".star"):
        from .io.star import read_star

        blocks = read_star(path)
        tab = next(iter(blocks.values()))
        if "rlnReferenceImage" not in tab:
            raise InputError(path, "a STAR file of references needs a rlnReferenceImage column")
        from pathlib import Path

        # a relative name as a stack's: the STAR file's folder first, then the current (RELION project) directory
        paths = [p if Path(p).is_absolute() or not (Path(path).parent / p).is_file() and Path(p).is_file()
                 else str(Path(path).parent / p) for p in tab["rlnReferenceImage"].astype(str)]
        if len(paths) != cfg.K:
            raise InputError(path, f"holds {len(paths)} references but --K is {cfg.K}")
    else:
        paths = [path]
    maps = []
    for p in paths:
        try:
            vol, vs = read_map(p)
        except InputError as e:
            raise InputError(e.path, e.problem, e.hint or "check the map named by --ref") from None
        if cfg.ref_angpix > 0:  # RELION's --ref_angpix: the header's voxel size is not read
            vs = cfg.ref_angpix
        named = "reference (--ref_angpix)" if cfg.ref_angpix > 0 else "reference"
        _check_map(p, vol, vs, box, apix, "reference map", named,
                   ("resample the reference to the particle box",
                    f"rescale the reference to {apix:.4g} Å/px and box {box} (relion_image_handler --rescale_angpix "
                    "--new_box), or give --trust_ref_size if only its header is wrong", "use another --ref map"),
                   "--trust_ref_size" if cfg.trust_ref_size else None)
        maps.append(vol.astype(np.float64))
    return maps if len(maps) == cfg.K else [maps[0].copy() for _ in range(cfg.K)]


def _check_map(p, vol, vs: float, box: int, apix: float, what: str, size_what: str, hints: tuple,
               trusted: str | None = None) -> None:
    """InputError naming map ``p`` (``what``: "reference map", "solvent mask") unless it is one ``box``-sized volume
    of the particles' pixel size (within 1 %; a header of 0 says nothing) without NaN or infinite values;
    ``hints``: what to do about the box, the voxel size and the values.  ``trusted`` (the flag that said so): a
    differing voxel size is a warning instead."""
    if vol.ndim != 3 or vol.shape != (box, box, box):
        raise InputError(p, f"{what} has shape {vol.shape} but the particles are {box} x {box} pixels", hints[0])
    if vs > 0 and abs(vs - apix) > 0.01 * apix:
        if trusted:
            log.warning("%s: %s voxel size %.4g Å differs from the particle pixel size %.4g Å; used as it is (%s)",
                        p, size_what, vs, apix, trusted)
        else:
            raise InputError(p, f"{size_what} voxel size {vs:.4g} Å differs from the particle pixel size "
                             f"{apix:.4g} Å by more than 1%", hints[1])
    if not np.all(np.isfinite(vol)):
        raise InputError(p, f"{what} contains NaN or infinite values", hints[2])


# how far a --solvent_mask may stray outside [0, 1] (resampling in other programs) before it is refused; values
# within it are clipped (RELION refuses any value outside)
MASK_TOLERANCE = 1e-3


# each mask flag's JobConfig field and its name in messages
_MASKS = {"--solvent_mask": ("solvent_mask", "solvent mask"),
          "--solvent_mask2": ("solvent_mask2", "second solvent mask"),
          "--lowpass_mask": ("lowpass_mask", "low-pass mask")}


def _read_solvent_mask(cfg: JobConfig, box: int, apix: float, which: str = "--solvent_mask") -> np.ndarray | None:
    """The mask of flag ``which`` (``--solvent_mask``, ``--solvent_mask2``, ``--lowpass_mask``) checked against the
    particles (box, pixel size within 1 %, finite, values in [0, 1]; a second mask must cover something, its
    region's average is taken; a low-pass mask needs ``--lowpass``), or None without one.  They only act with
    ``--flatten_solvent`` (as in RELION; the solvent mask also with ``--solvent_correct_fsc``)."""
    field, what = _MASKS[which]
    p, second = getattr(cfg, field), which == "--solvent_mask2"
    if not p or p == "None":
        return None
    if which == "--lowpass_mask" and not cfg.lowpass > 0:
        raise InputError(p, f"--lowpass_mask needs --lowpass (the filter's resolution in Å), got {cfg.lowpass:g}",
                         "add e.g. --lowpass 15")
    vol, vs = read_map(p)
    _check_map(p, vol, vs, box, apix, what, what,
               ("resample the mask to the particle box (relion_image_handler --new_box)",
                f"rescale the mask to {apix:.4g} Å/px", "make the mask again (relion_mask_create)"))
    lo, hi = float(vol.min()), float(vol.max())
    if lo < -MASK_TOLERANCE or hi > 1 + MASK_TOLERANCE:
        raise InputError(p, f"{what} values run from {lo:.4g} to {hi:.4g}; a mask holds values in [0, 1]",
                         "make the mask with relion_mask_create")
    if second and hi <= 0:
        raise InputError(p, "second solvent mask is zero everywhere: it has no region to set to its average",
                         "make the mask with relion_mask_create (1 inside the region)")
    if which != "--solvent_mask" and not cfg.flatten_solvent:
        log.warning("%s %s has no effect without --flatten_solvent, as in RELION", which, p)
    elif which == "--solvent_mask" and not cfg.flatten_solvent and not (cfg.solvent_correct_fsc and cfg.auto_refine):
        log.warning("%s %s has no effect without --flatten_solvent (or --solvent_correct_fsc in "
                    "auto-refine), as in RELION", which, p)
    return np.clip(vol, 0.0, 1.0).astype(np.float32)


def optics_index(ps: ParticleSet) -> np.ndarray:
    """0-based row of each particle's optics group in ``ps.optics``."""
    md = ps.metadata
    og = md["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in md else np.ones(ps.n, dtype=np.int64)
    optics_ids = list(ps.optics["rlnOpticsGroup"].to_numpy())
    return np.array([optics_ids.index(g) for g in og], dtype=np.int64)


def ctf_params(ps: ParticleSet, oidx: np.ndarray) -> CtfParams:
    """Every particle's CTF parameters: per-particle columns, optics-group values, RELION's defaults otherwise."""
    md, opt = ps.metadata, ps.optics

    def optics_col(name, default):
        v = opt[name].to_numpy(dtype=np.float64) if name in opt else np.full(len(opt), default)
        return v[oidx]

    return CtfParams(_col(md, "rlnDefocusU", 0.0), _col(md, "rlnDefocusV", 0.0), _col(md, "rlnDefocusAngle", 0.0),
                     _col(md, "rlnVoltage", np.nan) if "rlnVoltage" in md else optics_col("rlnVoltage", 300.0),
                     optics_col("rlnSphericalAberration", 2.7), optics_col("rlnAmplitudeContrast", 0.1),
                     _col(md, "rlnPhaseShift", 0.0), _col(md, "rlnCtfBfactor", 0.0),
                     _col(md, "rlnCtfScalefactor", 1.0))


def background_stats(img: np.ndarray, radius_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each image's pixels farther than ``radius_px`` from its centre ``(n/2, n/2)``
    (RELION's ``calculateBackgroundAvgStddev`` for single particles: ``r > radius``, corners included)."""
    n = img.shape[-1]
    c = np.arange(n) - n // 2
    x = np.asarray(img).reshape(len(img), n * n)
    if x.dtype.kind != "f":  # (stacks are read as float32; integers would overflow their squares)
        x = x.astype(np.float32)
    w = ((c[:, None] ** 2 + c[None, :] ** 2) > radius_px**2).ravel().astype(x.dtype)
    # sums as two matrix-vector products (6x a gather of the background's pixels: ~40 s less per 100,000 images at
    # 256 px); in the images' precision, ~1e-7 of the values, plenty for a test at 0.5 and 2
    cnt = float(w.sum())
    mean = (x @ w).astype(np.float64) / cnt
    var = ((x * x) @ w).astype(np.float64) / cnt - mean * mean
    return mean, np.sqrt(np.maximum(var, 0.0))


def badly_normalised(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """RELION's test of an image's background (warned unless ``--dont_check_norm``): mean beyond +/-0.5 of the
    standard deviation, or a standard deviation outside [0.5, 2]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.abs(mean / std) > 0.5) | (std < 0.5) | (std > 2.0)


def drop_non_finite(inp: JobInputs, chunk: int = 512, check_norm: bool = True) -> JobInputs:
    """Drop particles whose image holds NaN or infinite pixels, with one warning that counts them.

    RELION stops on such images; we keep the run going without them (they are absent from the output STAR files).
    With ``check_norm`` (no ``--dont_check_norm``) the same pass warns once, as RELION, about the first image whose
    background outside the particle diameter is not normalised (mean 0, standard deviation 1: :func:`badly_normalised`).
    """
    ps = inp.particles
    bad = []
    radius = int(np.floor(inp.diameter / (2.0 * inp.pixel_size) + 0.5))
    resampled = ps.resampled_groups()
    og = ps.metadata["rlnOpticsGroup"].to_numpy() if resampled else None
    for s in range(0, ps.n, chunk):
        rows = np.arange(s, min(s + chunk, ps.n))
        # a resampled group's images as they are in their stacks, at its own pixel size (RELION's background test;
        # a NaN or infinite pixel makes the whole resampled image NaN, so the finite test is the same either way)
        parts = [(rows, radius, False)] if og is None else \
            [(rows[~np.isin(og[rows], list(resampled))], radius, False)] + \
            [(rows[og[rows] == g], int(np.floor(inp.diameter / (2.0 * a_g) + 0.5)), True)
             for g, (_, a_g) in resampled.items()]
        for r, rad, native in parts:
            if not len(r):
                continue
            img = ps.read_images(r, native=native)
            finite = np.isfinite(img).all(axis=(1, 2))
            bad.extend(r[~finite].tolist())
            if check_norm and finite.any():
                mean, std = background_stats(img[finite], rad)
                off = np.nonzero(badly_normalised(mean, std))[0]
                if off.size:
                    log.warning("%s: %s: background mean %.4g, standard deviation %.4g outside a %d-px radius: the "
                                "images seem not normalised to mean 0 and standard deviation 1 (relion_preprocess "
                                "--norm; --dont_check_norm silences this)", ps.star_path,
                                ps.metadata["rlnImageName"].iloc[r[finite][off[0]]], mean[off[0]], std[off[0]], rad)
                    check_norm = False  # once, as RELION
    bad.sort()
    if not bad:
        return inp
    if len(bad) == ps.n:
        raise InputError(ps.star_path, "every particle image holds NaN or infinite pixels",
                         "check the stacks it names (re-extract the particles)")
    log.warning("%s: dropped %d of %d particles whose images hold NaN or infinite pixels (first: row %d, %s)",
                ps.star_path, len(bad), ps.n, bad[0], ps.metadata["rlnImageName"].iloc[bad[0]])
    keep = np.setdiff1d(np.arange(ps.n), np.asarray(bad))
    sub = ParticleSet(ps.metadata.iloc[keep].reset_index(drop=True), ps.optics, ps.star_path)
    if (sub.box_size, sub.pixel_size) != (inp.box, inp.pixel_size):
        raise InputError(ps.star_path, f"every particle of optics group {ps.model_group()}, whose grid ({inp.box} "
                         f"px at {inp.pixel_size:g} Å) the model takes, holds NaN or infinite pixels",
                         "check the stacks it names (re-extract the particles), or leave that group out")
    ctf = None if inp.ctf is None else inp.ctf.take(keep)
    return replace(inp, particles=sub, group_index=inp.group_index[keep], optics_index=inp.optics_index[keep],
                   ctf=ctf)


def input_classes(md) -> np.ndarray:
    """The STAR file's classes, 0-based (``rlnClassNumber - 1``; -1 where the column is missing, as RELION reads a
    missing class as 0): what iteration 1's class changes are measured from."""
    return (_col(md, "rlnClassNumber", 0.0) - 1).astype(np.int64)


def particle_state(inp: JobInputs, cfg: JobConfig, seed: int) -> ParticleState:
    md = inp.particles.metadata
    n = inp.particles.n
    apix = inp.pixel_size
    angles = np.stack([_col(md, "rlnAngleRot", 0.0), _col(md, "rlnAngleTilt", 0.0), _col(md, "rlnAnglePsi", 0.0)], 1)
    offs = np.stack([_col(md, "rlnOriginXAngst", 0.0), _col(md, "rlnOriginYAngst", 0.0)], 1) / apix
    cls = np.zeros(n, dtype=np.int64)
    if cfg.split_random_halves:
        if "rlnRandomSubset" in md and set(np.unique(md["rlnRandomSubset"])) <= {1, 2}:
            half = md["rlnRandomSubset"].to_numpy().astype(np.int64)
        else:
            half = np.random.default_rng(seed).integers(1, 3, n)
    else:
        half = np.zeros(n, dtype=np.int64)
    norm = _col(md, "rlnNormCorrection", 1.0)
    z = np.zeros(n)
    return ParticleState(angles, offs, cls, norm, half, z, z.astype(np.int64), z)


@dataclass(frozen=True)
class PowerSettings:
    """What the noise spectra before iteration 1 need to know of the job (:func:`power_sums`)."""

    box: int
    n_optics: int
    radius_px: float  # particle radius (--particle_diameter / 2) in pixels
    zero_mask: bool
    maskedge: float


@dataclass(frozen=True)
class PowerSums:
    """Per optics group, over a set of particles: the sum of their shell-averaged power spectra ``(G, N/2+1)``, the
    sum of their images ``(G, N, N)`` and their count ``(G,)`` (float64, host).  Two add up to the sums of the
    union: a job computes them pool by pool where its images are (a Dask worker's device) and adds them in pool
    order."""

    power: np.ndarray
    image_sum: np.ndarray
    count: np.ndarray

    def __add__(self, other: PowerSums) -> PowerSums:
        return PowerSums(self.power + other.power, self.image_sum + other.image_sum, self.count + other.count)


def power_sums(images, optics_index, ps: PowerSettings) -> PowerSums:
    """:class:`PowerSums` of one pool: ``images`` ``(B, N, N)`` (NumPy or CuPy: computed there, float64) and each
    particle's optics group index ``(B,)`` (host)."""
    from .backend import get_xp, to_host

    xp = get_xp(images)
    N = ps.box
    nsh = N // 2 + 1
    sh = shells_2d(N, xp)
    m = likelihood_pixels(N, xp, include_dc=True)
    shm = sh[m]
    cnt = xp.maximum(xp.bincount(shm, minlength=nsh)[:nsh], 1)
    img = images.astype(np.float64)
    if ps.zero_mask:
        img = soft_mask_outside(img, radius=ps.radius_px, width=ps.maskedge, batch_2d=True)
    p = xp.abs(centred_rfft2(img)[:, m]) ** 2
    o = np.asarray(optics_index)
    power, image_sum, count = np.zeros((ps.n_optics, nsh)), np.zeros((ps.n_optics, N, N)), np.zeros(ps.n_optics)
    for g in np.unique(o):
        sel = xp.asarray(o == g)
        power[g] = to_host(xp.bincount(shm, weights=p[sel].sum(axis=0), minlength=nsh)[:nsh] / cnt)
        image_sum[g] = to_host(img[sel].sum(axis=0))
        count[g] = int((o == g).sum())
    return PowerSums(power, image_sum, count)


def pool_power_sums(read_images, pool_rows, optics_index, ps: PowerSettings, xp=np) -> list:
    """:func:`power_sums` of each pool of ``pool_rows`` in this process, on ``xp``'s device."""
    return [power_sums(xp.asarray(read_images(rows)), optics_index[rows], ps) for rows in pool_rows]


def sigma2_from_power_sums(total: PowerSums, ps: PowerSettings, images: PowerSums | None = None) -> np.ndarray:
    """Noise spectra before iteration 1 (§5.4), per optics group ``(G, N/2+1)``: half the mean power of the images
    of ``total`` minus half the power of the mean image of ``images`` (default ``total``; RELION 3.1 takes each half
    set's power and the mean image of all particles); shells without a positive value take the previous shell's."""
    images = total if images is None else images
    N = ps.box
    nsh = N // 2 + 1
    sh = shells_2d(N)
    m = likelihood_pixels(N, include_dc=True)
    cnt = np.bincount(sh[m], minlength=nsh)[:nsh]
    out = np.zeros((ps.n_optics, nsh))
    for g in range(ps.n_optics):
        if total.count[g] == 0:
            continue
        Fa = np.abs(centred_rfft2(images.image_sum[g] / images.count[g])[m]) ** 2
        psa = np.bincount(sh[m], weights=Fa, minlength=nsh)[:nsh] / np.maximum(cnt, 1)
        s = total.power[g] / total.count[g] / 2.0 - psa / 2.0
        for k in range(nsh):
            if s[k] <= 0:
                pos = s[s > 0]
                s[k] = s[k - 1] if k > 0 and s[k - 1] > 0 else (pos[0] if pos.size else 1.0)
        out[g] = s
    return out


def power_settings(inp: JobInputs, cfg: JobConfig) -> PowerSettings:
    return PowerSettings(inp.box, len(inp.particles.optics), inp.diameter / (2 * inp.pixel_size), cfg.zero_mask,
                         cfg.maskedge)


def initial_sigma2(inp: JobInputs, cfg: JobConfig, pools: list, runner=None) -> np.ndarray:
    """Noise spectra before iteration 1 from the image power spectra (§5.4), per half set and optics group
    ``(H, G, N/2+1)`` (halves in the order of their labels in ``pools``): the :class:`PowerSums` of each pool of
    ``pools`` (``[(half, rows), ...]``; by ``runner.power_sums`` where the runner has it: on its workers' devices;
    else here, on NumPy), added in pool order per half set; the mean image is every particle's (RELION 3.1 adds the
    power spectra within each half set and the images over all)."""
    ps = power_settings(inp, cfg)
    pool_rows = [rows for _, rows in pools]
    if runner is not None and hasattr(runner, "power_sums"):
        sums = runner.power_sums(pool_rows, inp.optics_index, ps, inp.particles.read_images)
    else:
        sums = pool_power_sums(inp.particles.read_images, pool_rows, inp.optics_index, ps)
    per_half: dict = {}
    for (h, _), one in zip(pools, sums, strict=True):
        per_half[h] = one if h not in per_half else per_half[h] + one
    everything = sums[0]
    for one in sums[1:]:
        everything = everything + one
    out = np.stack([sigma2_from_power_sums(per_half[h], ps, everything) for h in sorted(per_half)])
    for g, last in enumerate(inp.band_shells):  # beyond a coarser group's band (no data): its band edge's value, as
        out[:, g, last + 1:] = out[:, g, last:last + 1]  # the M-step keeps for shells without noise
    return out
