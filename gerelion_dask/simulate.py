"""Synthetic single-particle data with known ground truth (maps from atoms or phantoms; RELION-style particles).

Follows the recipe of ``../shared/data/README.md`` ("How the particles were simulated"), with this package's own
projector and CTF (both verified against ``relion_project``) instead of RELION:

1. **Maps** (:func:`density_from_atoms`, :func:`phantom_map`): sums of Gaussian atoms (integral = Z; atomic B
   plus a voxel "sampling blur"), computed analytically in Fourier space (or on a 2x grid, then Fourier-cropped) and
   band-limited to the Nyquist cube, in Z per Å^3, ``[z, y, x]``, origin at voxel ``N//2`` (by default the
   Z-weighted centroid).
2. **Particles** (:func:`simulate_dataset`): numpy ``default_rng(seed)``; class labels with exact fractions,
   shuffled; uniform orientations (rot, psi ~ U(-180, 180), tilt = arccos U(-1, 1)); origin offsets ~ N(0, sigma)
   px per axis, redrawn while ``|o| > shift_max``; per-micrograph defocus ~ U(1, 3) um with astigmatism
   ~ U(0, astig_max) at an angle ~ U(0, 180) plus a per-particle jitter ~ N(0, 100 Å).
3. **Image formation** (:func:`form_images`): the map, zero-padded to ``boxpad * N``, is projected (Fourier slice),
   translated by ``-o``, multiplied by the CTF *and* an envelope ``exp(-B u^2/4)`` (``ctf_bfactor``; written to
   ``truth.star`` as rlnCtfBfactor, **not** to ``particles.star``) on the padded grid, and windowed to the central
   ``N`` pixels, so CTF-delocalised signal leaves the box as on a micrograph.
4. **Noise**: white Gaussian with ``sigma^2 = <variance of the clean N x N image> / snr`` (mean over all particles,
   whole box); images are divided by sigma, so the background is N(0, 1).  ``snr = inf`` writes the clean images
   unscaled (for convention tests).

Everything is reproducible from the seed, and independent of ``batch_size``: pose/CTF/class draws come from one
child of ``SeedSequence(seed)``, the noise (drawn sequentially, batch by batch) from a second one.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .conventions import centred_irfft2, centred_irfftn, centred_rfftn, euler_to_matrix, shift_phase_2d
from .ops.ctf import CtfParams, ctf_rfft
from .ops.projector import FourierReference, make_reference, project

__all__ = [
    "ELEMENT_Z",
    "default_model_path",
    "read_pdb_atoms",
    "density_from_atoms",
    "default_sampling_bfactor",
    "phantom_map",
    "PHANTOM_KINDS",
    "hinge_perturb",
    "lowpass_map",
    "SimulationSpec",
    "SimulationPaths",
    "simulation_references",
    "form_images",
    "draw_particle_parameters",
    "simulate_dataset",
    "write_map",
    "write_star",
]

# --------------------------------------------------------------------------------------------------------------------
# atomic models
# --------------------------------------------------------------------------------------------------------------------

ELEMENT_Z: dict[str, int] = {
    "H": 1, "D": 1, "HE": 2, "LI": 3, "BE": 4, "B": 5, "C": 6, "N": 7, "O": 8, "F": 9, "NE": 10, "NA": 11, "MG": 12,
    "AL": 13, "SI": 14, "P": 15, "S": 16, "CL": 17, "AR": 18, "K": 19, "CA": 20, "SC": 21, "TI": 22, "V": 23,
    "CR": 24, "MN": 25, "FE": 26, "CO": 27, "NI": 28, "CU": 29, "ZN": 30, "GA": 31, "GE": 32, "AS": 33, "SE": 34,
    "BR": 35, "KR": 36, "RB": 37, "SR": 38, "Y": 39, "ZR": 40, "MO": 42, "RU": 44, "RH": 45, "PD": 46, "AG": 47,
    "CD": 48, "IN": 49, "SN": 50, "SB": 51, "TE": 52, "I": 53, "XE": 54, "CS": 55, "BA": 56, "LA": 57, "GD": 64,
    "YB": 70, "LU": 71, "HF": 72, "TA": 73, "W": 74, "RE": 75, "OS": 76, "IR": 77, "PT": 78, "AU": 79, "HG": 80,
    "TL": 81, "PB": 82, "BI": 83, "U": 92,
}

_WATER_NAMES = frozenset({"HOH", "WAT", "H2O", "DOD", "D2O", "TIP", "TIP3", "TIP4", "TIP5", "SPC", "SOL", "T3P", "T4P"})


def default_model_path() -> Path:
    """Path of the shipped atomic model: PDB 1AKE (E. coli adenylate kinase, closed), gzipped (``data/README.md``)."""
    return Path(__file__).resolve().parent / "data" / "1ake.pdb.gz"


def _element_of(line: str) -> str:
    """Element symbol of an ATOM/HETATM record: columns 77-78, else guessed from the atom name."""
    el = line[76:78].strip().upper() if len(line) >= 77 else ""
    el = "".join(c for c in el if c.isalpha())
    if el:
        return el
    name = line[12:16].strip().upper()
    resname = line[17:21].strip().upper()
    # ions such as ZN/ZN, MG/MG, CA/CA (HETATM): the name is the two-letter element
    if line.startswith("HETATM") and name == resname and name in ELEMENT_Z:
        return name
    name = name.lstrip("0123456789")
    return name[:1]


def read_pdb_atoms(path) -> tuple[np.ndarray, np.ndarray]:
    """Heavy-atom coordinates and atomic numbers of a PDB file (plain or ``.gz``).

    Reads ATOM/HETATM records of the first model (stops at the first ENDMDL), keeps alternate location ' ' or 'A',
    skips hydrogens (element H/D) and waters (HOH, WAT, TIP3, SOL, ...).  The element comes from columns 77-78,
    else from the atom name (first letter after leading digits; a HETATM whose name equals its residue name and is
    an element, e.g. ZN, is that ion).  Unknown elements warn and count as carbon.

    Returns ``(coords (M, 3) float64 in Å [x, y, z], atomic_numbers (M,) float64)``.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    coords: list[tuple[float, float, float]] = []
    zs: list[int] = []
    unknown: set[str] = set()
    with opener(path, "rt") as fh:
        for line in fh:
            if line.startswith("ENDMDL"):
                break
            if not (line.startswith("ATOM") or line.startswith("HETATM")):
                continue
            if line[16] not in (" ", "A"):
                continue
            if line[17:21].strip().upper() in _WATER_NAMES:
                continue
            el = _element_of(line)
            if el in ("H", "D"):
                continue
            z = ELEMENT_Z.get(el)
            if z is None:
                unknown.add(el)
                z = 6
            coords.append((float(line[30:38]), float(line[38:46]), float(line[46:54])))
            zs.append(z)
    if unknown:
        warnings.warn(f"{path.name}: unknown elements {sorted(unknown)} counted as carbon", stacklevel=2)
    if not coords:
        raise ValueError(f"no heavy atoms found in {path}")
    return np.asarray(coords, dtype=np.float64), np.asarray(zs, dtype=np.float64)


# --------------------------------------------------------------------------------------------------------------------
# maps from Gaussian atoms
# --------------------------------------------------------------------------------------------------------------------


def default_sampling_bfactor(apix: float) -> float:
    """The "sampling blur" added to every atom: ``B = 8 pi^2 apix^2 / 12`` (Å^2).

    That is the variance ``apix^2 / 12`` per axis of a voxel-wide box filter, as a Gaussian: it models averaging over
    a voxel and damps the cube-edge (Gibbs) ringing of the band limit.  1.5 Å/px -> 14.8 Å^2, 3 Å/px -> 59.2 Å^2.
    """
    return 8.0 * math.pi**2 * apix**2 / 12.0


def _fft_freqs(n: int) -> np.ndarray:
    """Integer frequencies of a full FFT axis in this package's order (even n: index n/2 is +n/2)."""
    i = np.arange(n)
    return np.where(i <= n // 2, i, i - n)


def _axis_factors(x, k, L, b, nyquist: int | None):
    """Per-atom 1D Fourier factors ``exp(-b k^2 / 4L^2) exp(-2 pi i k x / L)``; at the Nyquist index ``cos``.

    The cosine is the average of the +N/2 and -N/2 aliases, which keeps the band-limited map exactly real.
    """
    kk = k[None, :].astype(np.float64)
    env = np.exp(-b[:, None] * kk * kk / (4.0 * L * L))
    arg = (2.0 * np.pi / L) * x[:, None] * kk
    f = env * np.exp(-1j * arg)
    if nyquist is not None:
        j = int(np.nonzero(k == nyquist)[0][0])
        f[:, j] = env[:, j] * np.cos(arg[:, j])
    return f


def _density_fourier(rel, weights, b, n, apix, chunk_bytes=64 * 2**20):
    L = n * apix
    kfull = _fft_freqs(n)
    khalf = np.arange(n // 2 + 1)
    nyq = n // 2 if n % 2 == 0 else None
    F = np.zeros((n * n, n // 2 + 1), dtype=np.complex128)
    m = rel.shape[0]
    step = max(1, int(chunk_bytes // (16 * n * n)))
    for s in range(0, m, step):
        sl = slice(s, min(m, s + step))
        ez = _axis_factors(rel[sl, 2], kfull, L, b[sl], nyq) * weights[sl, None]
        ey = _axis_factors(rel[sl, 1], kfull, L, b[sl], nyq)
        ex = _axis_factors(rel[sl, 0], khalf, L, b[sl], nyq)
        t = (ez[:, :, None] * ey[:, None, :]).reshape(ez.shape[0], n * n)
        F += t.T @ ex
    F = F.reshape(n, n, n // 2 + 1) / L**3
    return centred_irfftn(F, n)


def _crop_axis(A, axis: int, n: int):
    """Take the ``n`` frequencies of a full FFT axis of length ``m`` (package order); even n: average +-n/2."""
    m = A.shape[axis]
    out = np.take(A, _fft_freqs(n) % m, axis=axis)
    if n % 2 == 0:
        j = n // 2
        idx = [slice(None)] * A.ndim
        idx[axis] = j
        out[tuple(idx)] = 0.5 * (np.take(A, j, axis=axis) + np.take(A, m - j, axis=axis))
    return out


def _fold_crop(F2, n):
    """Crop a centred rfftn array of an ``m = 2n`` grid to ``n``, averaging the +-n/2 aliases at Nyquist (even n)."""
    m = F2.shape[0]
    h = n // 2
    out = F2[:, :, : h + 1].copy()
    if n % 2 == 0:  # x (half) axis: the -n/2 column is conj(F2[-kz, -ky, n/2])
        col = F2[:, :, h]
        neg = (-np.arange(m)) % m
        out[:, :, h] = 0.5 * (col + np.conj(col[neg][:, neg]))
    return _crop_axis(_crop_axis(out, 0, n), 1, n)


def _density_grid(rel, weights, b, n, apix, chunk_entries=4_000_000):
    """Sum the Gaussians on a 2x finer grid (same field of view), Fourier-crop to ``n`` (Nyquist aliases folded)."""
    m2 = 2 * n
    h = apix / 2.0
    sig = np.sqrt(b / (8.0 * np.pi**2)) / h  # grid units
    R = int(np.ceil(5.0 * sig.max()))
    u = rel[:, ::-1] / h + m2 // 2  # (z, y, x) grid coordinates
    base = np.floor(u).astype(np.int64)
    frac = u - base
    offs = np.arange(-R, R + 1)
    # separable normalised 1D weights: (M, 3, 2R+1)
    d = offs[None, None, :] - frac[:, :, None]
    g = np.exp(-0.5 * d * d / (sig[:, None, None] ** 2)) / (np.sqrt(2.0 * np.pi) * sig[:, None, None])
    g[:, 0, :] *= weights[:, None]
    idx = (base[:, :, None] + offs[None, None, :]) % m2  # periodic, as the Fourier method
    grid = np.zeros(m2**3, dtype=np.float64)
    K = offs.size
    step = max(1, chunk_entries // (K * K * K))
    for s in range(0, rel.shape[0], step):
        sl = slice(s, min(rel.shape[0], s + step))
        w = g[sl, 0, :, None, None] * g[sl, 1, None, :, None] * g[sl, 2, None, None, :]
        flat = (idx[sl, 0, :, None, None] * m2 + idx[sl, 1, None, :, None]) * m2 + idx[sl, 2, None, None, :]
        grid += np.bincount(flat.ravel(), weights=w.ravel(), minlength=m2**3)
    grid = grid.reshape(m2, m2, m2) / h**3
    F2 = centred_rfftn(grid)  # = rho_hat(k/L) / L^3, as in the Fourier method
    return centred_irfftn(_fold_crop(F2, n), n)


def density_from_atoms(coords_angst, atomic_numbers, box: int, apix: float, bfactor=50.0, centre=None, *,
                       sampling_bfactor: float | None = None, method: str = "auto") -> np.ndarray:
    """Band-limited map of Gaussian atoms, ``(box, box, box)`` float64 ``[z, y, x]``, values in Z per Å^3.

    Parameters
    ----------
    coords_angst : (M, 3) atom positions [x, y, z] in Å.
    atomic_numbers : (M,) weights; each atom integrates to its value (``map.sum() * apix**3 == sum(Z)``).
    bfactor : B (Å^2) of every atom, scalar or (M,): Fourier amplitude ``exp(-B s^2 / 4)``, i.e. a Gaussian with
        ``sigma^2 = B / (8 pi^2)`` per axis.
    centre : model point (Å) that lands on voxel ``box//2``; default the Z-weighted centroid.  Pass a common centre
        to put several models in one frame.
    sampling_bfactor : extra B added to every atom; default :func:`default_sampling_bfactor` (``2 pi^2 apix^2 / 3``).
        ``0`` reproduces the maps of ``../shared/data`` (B = 50 only).
    method : ``"fourier"`` (exact: the sum of the atoms' transforms on the Nyquist cube, as separable per-axis
        factors), ``"grid"`` (Gaussians summed on a 2x finer grid, then Fourier-cropped; faster for big boxes), or
        ``"auto"`` (fourier unless ``M * box^3 / 2 > 2.5e8``).

    The map is periodic in the box (atoms beyond the half box wrap around; a warning is issued).  At Nyquist the
    +-N/2 aliases are averaged, so the result is exactly real and band-limited.
    """
    xyz = np.asarray(coords_angst, dtype=np.float64).reshape(-1, 3)
    w = np.asarray(atomic_numbers, dtype=np.float64).reshape(-1)
    if w.shape[0] != xyz.shape[0]:
        raise ValueError(f"{xyz.shape[0]} coordinates but {w.shape[0]} atomic numbers")
    n = int(box)
    if n < 2:
        raise ValueError(f"box must be >= 2, got {box}")
    if centre is None:
        centre = (xyz * w[:, None]).sum(0) / w.sum()
    rel = xyz - np.asarray(centre, dtype=np.float64).reshape(1, 3)
    sb = default_sampling_bfactor(apix) if sampling_bfactor is None else float(sampling_bfactor)
    b = np.broadcast_to(np.asarray(bfactor, dtype=np.float64), w.shape) + sb
    if np.any(b <= 0):
        raise ValueError("total B-factor (bfactor + sampling_bfactor) must be > 0")
    rmax = float(np.sqrt((rel**2).sum(1)).max())
    if rmax > 0.5 * n * apix:
        warnings.warn(f"farthest atom is {rmax:.1f} Å from the centre, beyond the half box "
                      f"{0.5 * n * apix:.1f} Å: the map wraps around", stacklevel=2)
    if method == "auto":
        method = "fourier" if xyz.shape[0] * n**3 / 2 <= 2.5e8 else "grid"
    if method == "fourier":
        return _density_fourier(rel, w, b, n, apix)
    if method == "grid":
        return _density_grid(rel, w, b, n, apix)
    raise ValueError(f"method must be 'auto', 'fourier' or 'grid', got {method!r}")


# --------------------------------------------------------------------------------------------------------------------
# phantoms and perturbed models
# --------------------------------------------------------------------------------------------------------------------

# blobs: (x, y, z) and sigma in units of the half box R = box * apix / 2; weight = integral (arbitrary units)
_BLOBS_A = np.array([
    # x      y      z     sigma  weight
    [0.00, 0.00, 0.00, 0.15, 1000.0],   # core
    [0.30, 0.05, -0.05, 0.10, 450.0],   # large arm along +x
    [-0.10, 0.32, 0.08, 0.08, 300.0],   # medium, +y
    [-0.22, -0.15, 0.26, 0.07, 220.0],  # small, -x -y +z
    [0.08, -0.28, -0.20, 0.06, 140.0],  # smallest, -y -z
    [-0.28, 0.04, -0.22, 0.11, 260.0],  # diffuse, -x -z
])
# blobs2: same core and two same blobs; the large arm swung from +x to +z, the medium one moved, a new lobe
_BLOBS_B = np.array([
    [0.00, 0.00, 0.00, 0.15, 1000.0],
    [0.04, 0.08, 0.31, 0.10, 450.0],    # large arm now along +z
    [0.18, 0.27, -0.12, 0.08, 300.0],   # medium moved
    [-0.22, -0.15, 0.26, 0.07, 220.0],
    [0.08, -0.28, -0.20, 0.06, 140.0],
    [0.32, -0.12, 0.10, 0.09, 260.0],   # new lobe at +x -y (replaces the diffuse -x -z one)
])
PHANTOM_KINDS = ("blobs", "blobs2", "random")


def phantom_map(box: int, apix: float = 1.0, kind: str = "blobs", seed: int = 0) -> np.ndarray:
    """Asymmetric Gaussian-blob phantom ``(box,)*3`` float64, scaled to the field of view, origin at voxel box//2.

    ``kind``:
      * ``"blobs"``: six blobs of different sizes and weights at non-symmetric (chiral) positions.
      * ``"blobs2"``: a second, distinct phantom in the *same frame*: same core and two shared blobs, the large arm
        swung from +x to +z, one blob moved and one replaced (for 2-class tests).
      * ``"random"``: 5-8 random blobs drawn from ``seed`` (``seed`` is ignored by the two fixed kinds).

    Blob positions lie within 0.45 of the half box, so a mask of 0.9 x box diameter holds the phantom.  Blobs are
    Gaussian "atoms" (:func:`density_from_atoms`, with the default sampling blur) centred at the origin (not at their
    centroid), so different kinds share one frame.
    """
    R = 0.5 * box * apix
    if kind == "blobs":
        tab = _BLOBS_A
    elif kind == "blobs2":
        tab = _BLOBS_B
    elif kind == "random":
        rng = np.random.default_rng(seed)
        k = int(rng.integers(5, 9))
        d = rng.normal(size=(k, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        pos = d * rng.uniform(0.0, 0.3, size=(k, 1))
        pos[0] = 0.0
        sig = rng.uniform(0.06, 0.14, size=(k, 1))
        wt = rng.uniform(100.0, 600.0, size=(k, 1))
        wt[0] = 1000.0
        tab = np.hstack([pos, sig, wt])
    else:
        raise ValueError(f"kind must be one of {PHANTOM_KINDS}, got {kind!r}")
    xyz = tab[:, :3] * R
    b = 8.0 * np.pi**2 * (tab[:, 3] * R) ** 2
    return density_from_atoms(xyz, tab[:, 4], box, apix, bfactor=b, centre=(0.0, 0.0, 0.0), method="fourier")


def hinge_perturb(coords_angst, angle_deg: float, fraction: float = 0.3, weights=None) -> np.ndarray:
    """A rigid "domain" motion: rotate the atoms of the outer ``fraction`` of the model along its longest principal
    axis by ``angle_deg`` about its second principal axis, through the hinge point on the longest axis.

    Deterministic; the rest of the model stays put, so maps made with one common ``centre`` share a frame.
    """
    xyz = np.asarray(coords_angst, dtype=np.float64)
    w = np.ones(len(xyz)) if weights is None else np.asarray(weights, dtype=np.float64)
    c = (xyz * w[:, None]).sum(0) / w.sum()
    rel = xyz - c
    evals, evecs = np.linalg.eigh((rel * w[:, None]).T @ rel)
    major, second = evecs[:, 2], evecs[:, 1]
    t = rel @ major
    cut = np.quantile(t, 1.0 - fraction)
    moving = t > cut
    pivot = c + cut * major
    a = np.deg2rad(angle_deg)
    K = np.array([[0, -second[2], second[1]], [second[2], 0, -second[0]], [-second[1], second[0], 0]])
    Rm = np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K
    out = xyz.copy()
    out[moving] = (xyz[moving] - pivot) @ Rm.T + pivot
    return out


def lowpass_map(vol, apix: float, resolution_angst: float, edge_px: float = 2.0, *,
                round_shell: bool = False) -> np.ndarray:
    """Low-pass filter a map at ``resolution_angst`` with a raised-cosine edge ``edge_px`` Fourier pixels wide.

    The edge is centred on shell ``N apix / res`` (the initial references of ``../shared/data``: ``ini_lp40.mrc``
    is reproduced to float precision); ``round_shell=True`` rounds that shell first, as RELION's
    ``lowPassFilterMap`` does.  Gain ``1`` below ``centre - edge/2``, ``0`` beyond ``centre + edge/2``.
    """
    vol = np.asarray(vol, dtype=np.float64)
    n = vol.shape[-1]
    F = centred_rfftn(vol)
    kz = _fft_freqs(n)[:, None, None]
    ky = _fft_freqs(n)[None, :, None]
    kx = np.arange(n // 2 + 1)[None, None, :]
    r = np.sqrt(kz * kz + ky * ky + kx * kx)
    ires = n * apix / resolution_angst
    if round_shell:
        ires = math.floor(ires + 0.5)  # RELION ROUND (half away from zero)
    lo = max(0.0, ires - edge_px / 2.0)
    hi = ires + edge_px / 2.0
    if hi > lo:
        filt = np.where(r < lo, 1.0, np.where(r > hi, 0.0, 0.5 + 0.5 * np.cos(np.pi * (r - lo) / (hi - lo))))
    else:
        filt = (r <= lo).astype(np.float64)
    return centred_irfftn(F * filt, n)


# --------------------------------------------------------------------------------------------------------------------
# particles
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulationSpec:
    """Parameters of a simulated data set (defaults: the ``../shared/data`` recipe; 1.5 Å/px, 64 px, SNR 0.1).

    ``snr`` is the whole-box SNR (``inf``: no noise, clean images unscaled).  ``n_classes`` defaults to the number
    of maps; ``class_fractions`` (normalised) default to equal.  ``boxpad``: images are formed in a field of view
    ``boxpad`` times the box, then windowed (1 = no padding); ``projector_padding`` is the Fourier padding of that
    padded map in the projector (2: 4x oversampling of the map support with boxpad 2, most accurate; 1 with
    boxpad 2 is RELION's usual 2x, ~8x less memory and time, images differ by ~0.6 %).  ``ctf_bfactor`` is the
    envelope applied in the simulation (truth.star only).  ``ini_lowpass_angst = None`` writes no initial
    reference.  Memory: the projector holds ``(2 * boxpad * box)^3`` complex128 values per class while it is built
    (box 64: ~1 GB peak; box 128: ~8 GB; use ``projector_padding = 1`` or ``boxpad = 1`` for big boxes).
    """

    n_particles: int = 1000
    box: int = 64
    apix: float = 1.5
    snr: float = 0.1
    seed: int = 0
    defocus_min_um: float = 1.0
    defocus_max_um: float = 3.0
    astig_max_angst: float = 500.0
    defocus_jitter_angst: float = 100.0
    shift_sigma_px: float = 1.5
    shift_max_px: float = 4.0
    particles_per_micrograph: int = 50
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    ctf_bfactor: float = 100.0
    n_classes: int | None = None
    class_fractions: tuple[float, ...] | None = None
    ini_lowpass_angst: float | None = 40.0
    ini_edge_px: float = 2.0
    boxpad: float = 2.0
    projector_padding: float = 2.0
    batch_size: int = 256

    def __post_init__(self):
        if int(self.box) != self.box or self.box < 8:
            raise ValueError(f"box must be an integer >= 8, got {self.box}")
        if self.box % 2:
            raise ValueError(f"box must be even, got {self.box}: RELION 3.1 cannot reconstruct odd boxes and "
                             "this package refuses them (see conventions.py)")
        if self.n_particles < 1:
            raise ValueError("n_particles must be >= 1")
        if not self.apix > 0:
            raise ValueError("apix must be > 0")
        if not self.snr > 0:
            raise ValueError("snr must be > 0 (inf for noise-free images)")
        if not 0 < self.defocus_min_um <= self.defocus_max_um:
            raise ValueError("need 0 < defocus_min_um <= defocus_max_um")
        if self.astig_max_angst < 0 or self.defocus_jitter_angst < 0 or self.shift_sigma_px < 0:
            raise ValueError("astig_max_angst, defocus_jitter_angst and shift_sigma_px must be >= 0")
        if self.shift_max_px <= 0:
            raise ValueError("shift_max_px must be > 0")
        if self.particles_per_micrograph < 1 or self.batch_size < 1:
            raise ValueError("particles_per_micrograph and batch_size must be >= 1")
        if self.boxpad < 1:
            raise ValueError("boxpad must be >= 1")
        if self.projector_padding < 1:
            raise ValueError("projector_padding must be >= 1")
        if not 0 <= self.amplitude_contrast < 1:
            raise ValueError("amplitude_contrast must be in [0, 1)")
        if self.class_fractions is not None:
            f = tuple(float(x) for x in self.class_fractions)
            if any(x <= 0 for x in f):
                raise ValueError("class_fractions must be > 0")
            if self.n_classes is not None and len(f) != self.n_classes:
                raise ValueError(f"{len(f)} class_fractions for n_classes={self.n_classes}")
            object.__setattr__(self, "class_fractions", f)
        if self.n_classes is not None and self.n_classes < 1:
            raise ValueError("n_classes must be >= 1")

    @property
    def padded_box(self) -> int:
        """Side of the simulation field of view (even, >= box)."""
        p = int(math.ceil(self.boxpad * self.box - 1e-9))
        return p + (p % 2)

    def fractions(self, n_classes: int) -> np.ndarray:
        f = np.ones(n_classes) if self.class_fractions is None else np.asarray(self.class_fractions, float)
        if len(f) != n_classes:
            raise ValueError(f"{len(f)} class fractions for {n_classes} maps")
        return f / f.sum()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["class_fractions"] = list(d["class_fractions"]) if d["class_fractions"] is not None else None
        d["snr"] = "inf" if math.isinf(self.snr) else self.snr
        return d


@dataclass(frozen=True)
class SimulationPaths:
    """Files written by :func:`simulate_dataset`."""

    out_dir: Path
    particles_star: Path
    particles_mrcs: Path
    truth_star: Path
    truth_maps: tuple[Path, ...]
    initial_reference: Path | None
    params_json: Path

    def all(self) -> list[Path]:
        out = [self.particles_star, self.particles_mrcs, self.truth_star, *self.truth_maps]
        if self.initial_reference is not None:
            out.append(self.initial_reference)
        return out + [self.params_json]


def simulation_references(maps, boxpad: float = 2.0, padding: float = 2.0) -> list[FourierReference]:
    """Fourier references (projector ``padding``) of the maps zero-padded to the simulation field of view
    (``boxpad * N``, rounded up to even)."""
    out = []
    for m in maps:
        m = np.asarray(m, dtype=np.float64)
        n = m.shape[-1]
        p = int(math.ceil(boxpad * n - 1e-9))
        p += p % 2
        if p != n:
            big = np.zeros((p, p, p))
            o = p // 2 - n // 2
            big[o:o + n, o:o + n, o:o + n] = m
            m = big
        out.append(make_reference(m, padding=padding))
    return out


def form_images(refs, class_index, rotations, origin_px, ctf: CtfParams | None, box: int, apix: float) -> np.ndarray:
    """Clean particle images ``(B, box, box)`` float64.

    ``refs`` from :func:`simulation_references` (field of view P >= box); ``class_index`` (B,) 0-based;
    ``rotations`` (B, 3, 3); ``origin_px`` (B, 2) RELION origin offsets in pixels (the image is the centred
    projection translated by ``-o``); ``ctf`` with arrays of length B (its ``bfactor_angst2`` is the envelope),
    or None.  CTF and shift are applied on the P-pixel grid, then the central ``box`` pixels are kept.
    """
    class_index = np.asarray(class_index)
    A = np.asarray(rotations, dtype=np.float64)
    o = np.asarray(origin_px, dtype=np.float64)
    P = refs[0].grid.ori_size
    B = A.shape[0]
    F = np.zeros((B, P, P // 2 + 1), dtype=np.complex128)
    for c in np.unique(class_index):
        sel = np.nonzero(class_index == c)[0]
        F[sel] = project(refs[int(c)], A[sel], n=P)
    F *= shift_phase_2d(P, P, -o)
    if ctf is not None:
        F *= ctf_rfft(ctf, P, apix, P)
    img = centred_irfft2(F, P)
    c0 = P // 2 - box // 2
    return img[:, c0:c0 + box, c0:c0 + box]


def _exact_counts(fractions: np.ndarray, n: int) -> np.ndarray:
    raw = fractions * n
    counts = np.floor(raw).astype(np.int64)
    rest = n - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


def draw_particle_parameters(spec: SimulationSpec, n_classes: int, rng: np.random.Generator) -> dict:
    """All per-particle draws (fixed order), rounded as written to the STAR files.

    Returns arrays of length n: class (1-based), rot, tilt, psi (deg), origin_x/y_px, micrograph (1-based),
    defocus_u/v (Å), defocus_angle (deg).
    """
    n = spec.n_particles
    counts = _exact_counts(spec.fractions(n_classes), n)
    classes = rng.permutation(np.repeat(np.arange(1, n_classes + 1), counts))
    rot = rng.uniform(-180.0, 180.0, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, n)))
    psi = rng.uniform(-180.0, 180.0, n)
    o = rng.normal(0.0, spec.shift_sigma_px, (n, 2))
    while True:
        bad = np.hypot(o[:, 0], o[:, 1]) > spec.shift_max_px
        if not bad.any():
            break
        o[bad] = rng.normal(0.0, spec.shift_sigma_px, (int(bad.sum()), 2))
    n_mic = -(-n // spec.particles_per_micrograph)
    mic_def = rng.uniform(spec.defocus_min_um * 1e4, spec.defocus_max_um * 1e4, n_mic)
    mic_ast = rng.uniform(0.0, spec.astig_max_angst, n_mic)
    mic_ang = rng.uniform(0.0, 180.0, n_mic)
    jitter = rng.normal(0.0, spec.defocus_jitter_angst, n)
    mic = np.arange(n) // spec.particles_per_micrograph
    mean = mic_def[mic] + jitter
    apix = spec.apix
    # values as written (6 decimals; offsets in Å), so the STAR files reproduce the images exactly
    ox = np.round(o[:, 0] * apix, 6)
    oy = np.round(o[:, 1] * apix, 6)
    return {
        "class": classes,
        "rot": np.round(rot, 6),
        "tilt": np.round(tilt, 6),
        "psi": np.round(psi, 6),
        "origin_x_angst": ox,
        "origin_y_angst": oy,
        "origin_x_px": ox / apix,
        "origin_y_px": oy / apix,
        "micrograph": mic + 1,
        "defocus_u": np.round(mean + 0.5 * mic_ast[mic], 2),
        "defocus_v": np.round(mean - 0.5 * mic_ast[mic], 2),
        "defocus_angle": np.round(mic_ang[mic], 3),
    }


def write_map(path, vol, apix: float) -> Path:
    """Write a float32 MRC with the voxel size in the header (origin 0, no labels: byte-reproducible)."""
    import mrcfile

    path = Path(path)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.ascontiguousarray(vol, dtype=np.float32))
        m.voxel_size = apix
        _clear_labels(m)
    return path


def _clear_labels(m) -> None:
    """Drop mrcfile's time-stamped "Created by" label, so that files are byte-reproducible."""
    m.header.nlabl = 0
    m.header.label[:] = b""


def write_star(path, blocks: dict) -> Path:
    """``starfile.write`` followed by RELION 3.1 headers: ``# version 30001`` before each block, no time stamp."""
    import starfile

    path = Path(path)
    starfile.write(blocks, path)
    lines = path.read_text().splitlines(keepends=True)
    out = []
    for ln in lines:
        if ln.startswith("# Created by the starfile"):
            continue
        if ln.startswith("data_"):
            out.append("# version 30001\n\n")
        out.append(ln)
    text = "".join(out).lstrip("\n")
    path.write_text(text)
    return path


def _tables(spec: SimulationSpec, prm: dict, stack_name: str):
    import pandas as pd

    n = spec.n_particles
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnOpticsGroup": [1],
        "rlnVoltage": [float(spec.voltage_kv)],
        "rlnSphericalAberration": [float(spec.cs_mm)],
        "rlnAmplitudeContrast": [float(spec.amplitude_contrast)],
        "rlnImagePixelSize": [float(spec.apix)],
        "rlnImageSize": [int(spec.box)],
        "rlnImageDimensionality": [2],
    })
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(n)],
        "rlnMicrographName": [f"Micrographs/mic{m:04d}.mrc" for m in prm["micrograph"]],
        "rlnDefocusU": prm["defocus_u"],
        "rlnDefocusV": prm["defocus_v"],
        "rlnDefocusAngle": prm["defocus_angle"],
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
    })
    truth = parts.copy()
    truth["rlnAngleRot"] = prm["rot"]
    truth["rlnAngleTilt"] = prm["tilt"]
    truth["rlnAnglePsi"] = prm["psi"]
    truth["rlnOriginXAngst"] = prm["origin_x_angst"]
    truth["rlnOriginYAngst"] = prm["origin_y_angst"]
    truth["rlnClassNumber"] = prm["class"].astype(np.int64)
    truth["rlnCtfBfactor"] = np.full(n, float(spec.ctf_bfactor))
    return optics, parts, truth


def simulate_dataset(maps, spec: SimulationSpec, out_dir) -> SimulationPaths:
    """Simulate ``spec.n_particles`` particles of the given class maps and write a RELION 3.1 data set.

    ``maps``: list of ``(box, box, box)`` arrays (one per class, one common frame, origin at voxel box//2; values in
    any unit: the noise is set by the SNR).  Writes into ``out_dir`` (created):

    * ``particles.mrcs`` float32 stack (voxel size in the header) and ``particles.star`` (``data_optics`` +
      ``data_particles``: rlnImageName ``000001@particles.mrcs``, rlnMicrographName, rlnDefocusU/V/Angle,
      rlnOpticsGroup; no poses);
    * ``truth.star``: the same plus rlnAngleRot/Tilt/Psi, rlnOriginXAngst/YAngst, rlnClassNumber (1-based) and
      rlnCtfBfactor (the simulated envelope);
    * ``truth_class001.mrc`` ...: the input maps (float32); ``initial_lp<res>.mrc``: the fraction-weighted average
      of the maps, low-pass filtered at ``spec.ini_lowpass_angst`` (raised cosine, ``spec.ini_edge_px`` wide);
    * ``params.json``: the spec, noise sigma, measured SNRs, md5 of the image data, timings.

    Memory stays bounded: images are formed ``spec.batch_size`` at a time, written clean to the memory-mapped stack
    (pass 1, which also accumulates the signal variance), then noise is added in place (pass 2).
    """
    import mrcfile

    t0 = time.perf_counter()
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    if not maps:
        raise ValueError("need at least one map")
    N = spec.box
    for i, m in enumerate(maps):
        if m.shape != (N, N, N):
            raise ValueError(f"map {i + 1} has shape {m.shape}, expected ({N}, {N}, {N}) for box {N}")
    K = len(maps)
    if spec.n_classes is not None and spec.n_classes != K:
        raise ValueError(f"spec.n_classes = {spec.n_classes} but {K} maps were given")
    fractions = spec.fractions(K)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    ss_params, ss_noise = np.random.SeedSequence(spec.seed).spawn(2)
    prm = draw_particle_parameters(spec, K, np.random.default_rng(ss_params))
    noise_rng = np.random.default_rng(ss_noise)

    refs = simulation_references(maps, spec.boxpad, spec.projector_padding)
    n = spec.n_particles
    stack_path = out / "particles.mrcs"
    rr = np.hypot(*np.meshgrid(np.arange(N) - N // 2, np.arange(N) - N // 2, indexing="ij"))
    circle = rr <= 0.45 * N
    var_box = 0.0
    var_circle = 0.0
    t1 = time.perf_counter()
    with mrcfile.new_mmap(stack_path, shape=(n, N, N), mrc_mode=2, overwrite=True) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = spec.apix
        _clear_labels(mrc)
        data = mrc.data
        for s in range(0, n, spec.batch_size):
            sl = slice(s, min(n, s + spec.batch_size))
            rots = euler_to_matrix(prm["rot"][sl], prm["tilt"][sl], prm["psi"][sl])
            ctf = CtfParams(prm["defocus_u"][sl], prm["defocus_v"][sl], prm["defocus_angle"][sl],
                            spec.voltage_kv, spec.cs_mm, spec.amplitude_contrast, 0.0, spec.ctf_bfactor, 1.0)
            o = np.stack([prm["origin_x_px"][sl], prm["origin_y_px"][sl]], axis=1)
            img = form_images(refs, prm["class"][sl] - 1, rots, o, ctf, N, spec.apix)
            var_box += float(img.var(axis=(1, 2)).sum())
            var_circle += float(img[:, circle].var(axis=1).sum())
            data[sl] = img.astype(np.float32)
        t2 = time.perf_counter()
        mean_var = var_box / n
        if math.isinf(spec.snr):
            sigma = 1.0
        else:
            sigma = math.sqrt(mean_var / spec.snr)
        md5 = hashlib.md5()
        dmin, dmax, dsum, dsq = np.inf, -np.inf, 0.0, 0.0
        for s in range(0, n, spec.batch_size):
            sl = slice(s, min(n, s + spec.batch_size))
            img = data[sl].astype(np.float64)
            if not math.isinf(spec.snr):
                img = (img + noise_rng.normal(0.0, sigma, img.shape)) / sigma
            img32 = img.astype(np.float32)
            data[sl] = img32
            md5.update(np.ascontiguousarray(img32).tobytes())
            dmin, dmax = min(dmin, float(img32.min())), max(dmax, float(img32.max()))
            dsum += float(img32.sum(dtype=np.float64))
            dsq += float((img32.astype(np.float64) ** 2).sum())
        npx = n * N * N
        mean = dsum / npx
        mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = dmin, dmax, mean
        mrc.header.rms = math.sqrt(max(dsq / npx - mean * mean, 0.0))
    t3 = time.perf_counter()

    optics, parts, truth = _tables(spec, prm, stack_path.name)
    pstar = write_star(out / "particles.star", {"optics": optics, "particles": parts})
    tstar = write_star(out / "truth.star", {"optics": optics, "particles": truth})
    tmaps = tuple(write_map(out / f"truth_class{k + 1:03d}.mrc", m, spec.apix) for k, m in enumerate(maps))
    ini = None
    if spec.ini_lowpass_angst is not None:
        avg = sum(f * m for f, m in zip(fractions, maps))
        res = spec.ini_lowpass_angst
        tag = f"{int(res)}" if float(res).is_integer() else f"{res:g}"
        ini = write_map(out / f"initial_lp{tag}.mrc", lowpass_map(avg, spec.apix, res, spec.ini_edge_px), spec.apix)

    params = spec.to_dict()
    params.update({
        "n_classes": K,
        "class_counts": [int((prm["class"] == k + 1).sum()) for k in range(K)],
        "padded_box": spec.padded_box,
        "n_micrographs": int(prm["micrograph"].max()),
        "noise_sigma_before_normalisation": sigma,
        "signal_variance_box_mean": mean_var,
        "snr_box_mean": (mean_var / sigma**2) if not math.isinf(spec.snr) else "inf",
        "snr_particle_circle_mean": ((var_circle / n) / sigma**2) if not math.isinf(spec.snr) else "inf",
        "particle_circle_diameter_px": 0.9 * N,
        "particles_data_md5": md5.hexdigest(),
        "numpy": np.__version__,
        "seconds_setup": round(t1 - t0, 3),
        "seconds_projection": round(t2 - t1, 3),
        "seconds_noise": round(t3 - t2, 3),
    })
    pjson = out / "params.json"
    pjson.write_text(json.dumps(params, indent=1) + "\n")
    return SimulationPaths(out, pstar, stack_path, tstar, tmaps, ini, pjson)


def synthetic_pool(n: int, box: int, apix: float, noise: float, seed: int = 0, maps=None, classes=None):
    """An in-memory pool of particles for tests and benchmarks: uniform random poses, Gaussian offsets (sd 1 px),
    astigmatic CTFs, and white noise of ``noise`` times the clean images' s.d.

    Returns ``(images (n, box, box), PoolParticles, rotations (n, 3, 3), offsets_px (n, 2), sigma2 (1, box/2+1),
    maps)``; ``sigma2`` is the noise spectrum per Fourier component of the 1/N^2-normalised transform.
    """
    from .conventions import centred_irfft2, euler_to_matrix, shift_phase_2d
    from .expectation.preprocess import PoolParticles
    from .ops.ctf import CtfParams, ctf_rfft
    from .ops.projector import make_reference, project

    rng = np.random.default_rng(seed)
    maps = maps or [phantom_map(box, apix, "blobs")]
    rot, psi = rng.uniform(-180, 180, n), rng.uniform(-180, 180, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, n)))
    A = euler_to_matrix(rot, tilt, psi)
    off = rng.normal(0, 1.0, (n, 2))
    du = rng.uniform(10000, 20000, n)
    ctfp = CtfParams(du, du - 300, rng.uniform(0, 180, n))
    cls = np.zeros(n, int) if classes is None else np.asarray(classes)
    F = np.zeros((n, box, box // 2 + 1), complex)
    for c, m in enumerate(maps):
        sel = cls == c
        F[sel] = project(make_reference(m), A[sel], box)
    img = centred_irfft2(F * shift_phase_2d(box, box, -off) * ctf_rfft(ctfp, box, apix, box), box)
    sigma = noise * img.std()
    img = img + rng.normal(0, sigma, img.shape)
    s2 = np.full((1, box // 2 + 1), sigma**2 / (2 * box * box))
    parts = PoolParticles(np.arange(n), np.zeros(n, int), np.zeros(n, int), 1, ctfp, np.zeros((n, 2)),
                          np.zeros((n, 3)), np.zeros(n, int), np.ones(n), np.zeros((n, 2)))
    return img, parts, A, off, s2, maps
