"""Orientation and translation sampling: HEALPix directions, psi and translation grids, oversampling, perturbation,
local searches and the asymmetric unit (ALGORITHM.md §3.1-3.5).

Small host-side bookkeeping in NumPy.  Each piece reproduces, in our own code, a RELION function:

=========================================  =====================================================================
here                                       RELION (``healpix_sampling.cpp`` unless noted)
=========================================  =====================================================================
:func:`healpix_pix2ang_nest`               ``Healpix_Base::pix2ang_z_phi`` (bundled HEALPix 2.15a), NESTED scheme
:func:`healpix_nest2xyf` / ``xyf2nest``    ``Healpix_Base::nest2xyf`` / ``xyf2nest``
:func:`max_pixrad`                         ``Healpix_Base::max_pixrad``
:func:`healpix_directions`                 ``HealpixSampling::getDirectionFromHealPix`` + ``checkDirection``
:func:`angular_step`, :func:`psi_angles`   ``HealpixSampling::getAngularSampling``, ``setOrientations`` (psi part)
:func:`translation_grid`                   ``HealpixSampling::setTranslations`` (2D, non-helical)
:func:`oversampled_direction_pixels`,      ``HealpixSampling::getOrientations`` (oversampled HEALPix children),
:func:`oversampled_psi`,                   ``pushbackOversampledPsiAngles``,
:func:`oversampled_translations`           ``getTranslationsInPixel``
:func:`next_perturbation`,                 ``resetRandomlyPerturbedSampling``, the perturbation parts of
:func:`perturb_orientations`,              ``getOrientations`` and ``getTranslationsInPixel``
:func:`perturb_translations`
:func:`local_search_sparse`                ``selectOrientationsWithNonZeroPriorProbability`` (rot+tilt prior,
                                           psi prior; no helical/bimodal/multi-body options)
:func:`asymmetric_unit_directions`         ``setOrientations`` -> ``removeSymmetryEquivalentPoints`` (+``Geometric``)
=========================================  =====================================================================

Angles are degrees unless a name says otherwise; translations are pixels ``(x, y)``.  Directions are unit vectors
``d = (cos rot sin tilt, sin rot sin tilt, cos tilt)``, the third row of the Euler matrix (conventions.py).
The HEALPix and asymmetric-unit code follows RELION's floating-point path step by step (degrees <-> radians via
``x * 180 / pi`` and ``x * pi / 180``), so that directions lying exactly on an asymmetric-unit border are kept or
dropped as RELION does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..conventions import euler_to_matrix
from ..errors import InputError
from .indexing import concat_ranges, distinct
from .symmetry import direction_operators, parse_symmetry_name

__all__ = [
    "healpix_npix",
    "healpix_nest2xyf",
    "healpix_xyf2nest",
    "healpix_pix2ang_nest",
    "healpix_directions",
    "max_pixrad",
    "angular_step",
    "psi_angles",
    "translation_grid",
    "direction_vectors",
    "oversampled_direction_pixels",
    "oversampled_directions",
    "oversampled_psi",
    "oversampled_translations",
    "oversampled_orientations",
    "next_perturbation",
    "perturb_orientations",
    "perturb_translations",
    "LocalSearch",
    "LocalPriors",
    "local_search_sparse",
    "Directions",
    "asymmetric_unit_directions",
]

_JRLL = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4], dtype=np.int64)  # ring number of each face's corner / nside
_JPLL = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7], dtype=np.int64)  # its longitude in units of pi/4
_SEAM_LIMIT = 4000  # RELION cleans the asymmetric-unit seams only below this many directions
_SEAM_BLOCK = 1024  # rows per block when testing direction pairs against each other


# --------------------------------------------------------------------------------------------------------------
# HEALPix, NESTED scheme
# --------------------------------------------------------------------------------------------------------------


def healpix_npix(order: int) -> int:
    """Number of HEALPix pixels ``12 * 4**order``."""
    return 12 * 4 ** int(order)


def _compact_bits(v: np.ndarray) -> np.ndarray:
    """Gather the even-position bits of ``v`` into a dense integer (de-interleave)."""
    v = v & 0x5555555555555555
    v = (v | (v >> 1)) & 0x3333333333333333
    v = (v | (v >> 2)) & 0x0F0F0F0F0F0F0F0F
    v = (v | (v >> 4)) & 0x00FF00FF00FF00FF
    v = (v | (v >> 8)) & 0x0000FFFF0000FFFF
    return (v | (v >> 16)) & 0x00000000FFFFFFFF


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_compact_bits`: put the bits of ``v`` on the even positions."""
    v = v & 0x00000000FFFFFFFF
    v = (v | (v << 16)) & 0x0000FFFF0000FFFF
    v = (v | (v << 8)) & 0x00FF00FF00FF00FF
    v = (v | (v << 4)) & 0x0F0F0F0F0F0F0F0F
    v = (v | (v << 2)) & 0x3333333333333333
    return (v | (v << 1)) & 0x5555555555555555


def healpix_nest2xyf(pix, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NESTED pixel index -> ``(ix, iy, face)`` (x from the even bits, y from the odd bits of the in-face index)."""
    pix = np.asarray(pix, dtype=np.int64)
    face = pix >> (2 * order)
    p = pix & ((1 << (2 * order)) - 1)
    return _compact_bits(p), _compact_bits(p >> 1), face


def healpix_xyf2nest(ix, iy, face, order: int) -> np.ndarray:
    """``(ix, iy, face)`` -> NESTED pixel index (inverse of :func:`healpix_nest2xyf`)."""
    ix, iy, face = (np.asarray(a, dtype=np.int64) for a in (ix, iy, face))
    return (face << (2 * order)) + _spread_bits(ix) + (_spread_bits(iy) << 1)


def _pix2zphi_nest(order: int, pix) -> tuple[np.ndarray, np.ndarray]:
    """HEALPix pixel centres as (z = cos theta, phi in [0, 2 pi)), evaluated in the same order of operations as
    HEALPix 2.15a ``pix2ang_z_phi`` so that results agree to the last bit."""
    nside = 1 << order
    nl4 = 4 * nside
    fact2 = 4.0 / healpix_npix(order)
    fact1 = (nside << 1) * fact2
    ix, iy, face = healpix_nest2xyf(pix, order)
    jr = (_JRLL[face] << order) - ix - iy - 1
    north, south = jr < nside, jr > 3 * nside
    nr = np.where(north, jr, np.where(south, nl4 - jr, nside))
    z = np.where(
        north, 1 - (nr * nr) * fact2, np.where(south, (nr * nr) * fact2 - 1, (2 * nside - jr) * fact1)
    )
    kshift = np.where(north | south, 0, (jr - nside) & 1)
    num = _JPLL[face] * nr + ix - iy + 1 + kshift
    jp = np.sign(num) * (np.abs(num) // 2)  # C integer division (truncation towards zero)
    jp = np.where(jp > nl4, jp - nl4, jp)
    jp = np.where(jp < 1, jp + nl4, jp)
    phi = (jp - (kshift + 1) * 0.5) * ((np.pi / 2) / nr)
    return z.astype(np.float64), phi.astype(np.float64)


def _all_pix(order: int, pix):
    return np.arange(healpix_npix(order), dtype=np.int64) if pix is None else np.asarray(pix, dtype=np.int64)


def healpix_pix2ang_nest(order: int, pix=None) -> tuple[np.ndarray, np.ndarray]:
    """Centres of NESTED HEALPix pixels as ``(theta, phi)`` in radians (like ``healpy.pix2ang(nest=True)``).

    Parameters
    ----------
    order : int
        HEALPix order, ``nside = 2**order``.
    pix : array of int, optional
        Pixel indices; all ``12 * 4**order`` pixels when omitted.
    """
    z, phi = _pix2zphi_nest(order, _all_pix(order, pix))
    return np.arccos(z), phi


def max_pixrad(order: int) -> float:
    """Maximum angular radius (radians) of any HEALPix pixel at ``order`` (HEALPix ``max_pixrad``).

    Degrees: 48.19, 27.58, 14.57, 7.47, 3.78, 1.90 for orders 0..5 (ALGORITHM.md §3.1).
    """
    nside = 1 << order
    t1 = (1.0 - 1.0 / nside) ** 2
    za, pa = 2.0 / 3.0, math.pi / (4 * nside)
    zb = 1.0 - t1 / 3.0
    sa, sb = math.sqrt((1 - za) * (1 + za)), math.sqrt((1 - zb) * (1 + zb))
    va = np.array([sa * math.cos(pa), sa * math.sin(pa), za])
    vb = np.array([sb, 0.0, zb])
    return float(math.atan2(np.linalg.norm(np.cross(va, vb)), float(va @ vb)))


def _rad2deg(x):
    return (x * 180.0) / np.pi  # RELION RAD2DEG: x * 180 / PI


def _deg2rad(x):
    return (x * np.pi) / 180.0  # RELION DEG2RAD: x * PI / 180


def healpix_directions(order: int, pix=None) -> tuple[np.ndarray, np.ndarray]:
    """RELION (rot, tilt) in degrees of NESTED HEALPix pixel centres: rot = phi wrapped to (-180, 180],
    tilt = acos(z) in [0, 180].
    """
    z, phi = _pix2zphi_nest(order, _all_pix(order, pix))
    rot = _rad2deg(phi)
    rot = np.where(rot > 180.0, rot - 360.0, rot)
    tilt = _rad2deg(np.arccos(z))
    return rot, tilt


def direction_vectors(rot, tilt) -> np.ndarray:
    """Unit projection directions ``(..., 3)`` = third row of the Euler matrix (RELION ``Euler_angles2direction``)."""
    a, b = _deg2rad(np.asarray(rot, dtype=np.float64)), _deg2rad(np.asarray(tilt, dtype=np.float64))
    sb = np.sin(b)
    return np.stack([sb * np.cos(a), sb * np.sin(a), np.cos(b)], axis=-1)


# --------------------------------------------------------------------------------------------------------------
# Coarse grids
# --------------------------------------------------------------------------------------------------------------


def angular_step(order: int) -> float:
    """HEALPix angular sampling in degrees, ``360 / (6 * 2**order)`` (order 2 -> 15, order 3 -> 7.5)."""
    return 360.0 / (6 * 2 ** int(order))


def psi_angles(order: int, psi_step: float | None = None) -> np.ndarray:
    """In-plane angles ``j * step``, ``j = 0 .. ceil(360 / psi_step) - 1``, step rounded to ``360 / n_psi``.

    ``psi_step`` defaults to :func:`angular_step` (RELION's 3D default), giving ``6 * 2**order`` angles.  The step
    actually used is ``360 / len(result)``.
    """
    step = angular_step(order) if psi_step is None else float(psi_step)
    n_psi = math.ceil(360.0 / step)
    return np.arange(n_psi) * (360.0 / n_psi)


def translation_grid(offset_range: float, offset_step: float, pixel_size: float = 1.0) -> np.ndarray:
    """Coarse 2D translations ``(T, 2)`` (x, y) in pixels: a square grid of step S inside the disc of radius R.

    Parameters
    ----------
    offset_range, offset_step : float
        ``--offset_range`` R and ``--offset_step`` S in pixels.
    pixel_size : float
        RELION 3.1+ keeps offsets in Å and tests ``x^2 + y^2 < R^2 + 0.001`` in Å^2; give the pixel size to
        reproduce that rounding margin exactly (the default 1 applies the margin in pixels^2).

    Returns
    -------
    ``(T, 2)`` float64, x-major order (x = i S outer loop, y = j S inner), ``|i|, |j| <= ceil(R / S)``.
    R = 5, S = 2 gives 21 translations; R = 6, S = 2 gives 29; R = 5, S = 1 gives 81.
    """
    step, rng = offset_step * pixel_size, offset_range * pixel_size
    if not step > 0 or rng < 0:
        raise ValueError(f"offset_step must be > 0 and offset_range >= 0, got {offset_step}, {offset_range}")
    m = math.ceil(rng / step)
    i = np.arange(-m, m + 1, dtype=np.float64) * step
    x, y = np.meshgrid(i, i, indexing="ij")
    keep = (x * x + y * y) < rng * rng + 0.001
    return np.stack([x[keep], y[keep]], axis=-1) / pixel_size


# --------------------------------------------------------------------------------------------------------------
# Oversampling (pass 2)
# --------------------------------------------------------------------------------------------------------------


def oversampled_direction_pixels(pix, order: int, oversampling: int) -> np.ndarray:
    """NESTED indices at order ``order + oversampling`` of the ``4**oversampling`` children of coarse pixels.

    Returns ``(..., 4**o)``.  The children of pixel p are ``4**o p ... 4**o p + 4**o - 1``, listed in RELION's loop
    order (in-face y outer, x inner).  For o <= 1 this is ascending order (4p, 4p+1, 4p+2, 4p+3); for o >= 2 it is
    a permutation of that range.
    """
    pix = np.asarray(pix, dtype=np.int64)
    ix, iy, face = healpix_nest2xyf(pix, order)
    f = 1 << oversampling
    sub = np.arange(f)
    jy, jx = np.meshgrid(sub, sub, indexing="ij")  # y outer, x inner
    cx = ix[..., None] * f + jx.reshape(-1)
    cy = iy[..., None] * f + jy.reshape(-1)
    return healpix_xyf2nest(cx, cy, face[..., None], order + oversampling)


def oversampled_directions(pix, order: int, oversampling: int) -> tuple[np.ndarray, np.ndarray]:
    """(rot, tilt) of the children of coarse pixels, each ``(..., 4**o)`` (see :func:`oversampled_direction_pixels`)."""
    children = oversampled_direction_pixels(pix, order, oversampling)
    rot, tilt = healpix_directions(order + oversampling, children.reshape(-1))
    return rot.reshape(children.shape), tilt.reshape(children.shape)


def oversampled_psi(psi, psi_step: float, oversampling: int) -> np.ndarray:
    """Psi sub-samples ``psi - step/2 + (1/2 + m) step / 2**o``, m = 0..2**o-1 -> ``(..., 2**o)``.

    For o = 1: ``psi -+ step/4`` (the coarse value itself is not re-sampled); o = 0 returns ``psi[..., None]``.
    """
    n = 1 << oversampling
    m = np.arange(n)
    psi = np.asarray(psi, dtype=np.float64)[..., None]
    if oversampling == 0:
        return psi
    return psi - 0.5 * psi_step + (0.5 + m) * psi_step / n


def oversampled_translations(translations, offset_step: float, oversampling: int) -> np.ndarray:
    """Translation sub-samples ``(..., 4**o, 2)`` of coarse translations ``(..., 2)`` (pixels).

    Each coordinate takes ``t - S/2 + (1/2 + m) S / 2**o``; sub-sample index ``i_over_trans = x_sub * 2**o + y_sub``.
    """
    t = np.asarray(translations, dtype=np.float64)
    if oversampling == 0:
        return t[..., None, :]
    n = 1 << oversampling
    off = -0.5 * offset_step + (0.5 + np.arange(n)) * offset_step / n
    ox, oy = np.meshgrid(off, off, indexing="ij")  # x_sub outer, y_sub inner
    return t[..., None, :] + np.stack([ox.reshape(-1), oy.reshape(-1)], axis=-1)


def oversampled_orientations(
    pix, psi, order: int, oversampling: int, psi_step: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fine orientations of coarse (direction pixel, psi) pairs.

    Parameters
    ----------
    pix, psi : arrays of one shape ``(...)``
        Coarse HEALPix pixel (at ``order``) and coarse psi (degrees) of each sample.
    order, oversampling : int
    psi_step : float, optional
        Coarse psi step (default :func:`angular_step` ``(order)``).

    Returns
    -------
    rot, tilt, psi : ``(..., 8**o)`` each, indexed by ``i_over_rot = child_direction * 2**o + psi_sub``
        (ALGORITHM.md §4.3); o = 1 gives 8 fine orientations per coarse one.
    """
    step = angular_step(order) if psi_step is None else psi_step
    rot, tilt = oversampled_directions(pix, order, oversampling)  # (..., 4**o)
    sub_psi = oversampled_psi(psi, step, oversampling)  # (..., 2**o)
    n_dir, n_psi = rot.shape[-1], sub_psi.shape[-1]
    shape = rot.shape[:-1] + (n_dir, n_psi)
    out_rot = np.broadcast_to(rot[..., :, None], shape)
    out_tilt = np.broadcast_to(tilt[..., :, None], shape)
    out_psi = np.broadcast_to(sub_psi[..., None, :], shape)
    flat = rot.shape[:-1] + (n_dir * n_psi,)
    return out_rot.reshape(flat), out_tilt.reshape(flat), out_psi.reshape(flat)


# --------------------------------------------------------------------------------------------------------------
# Random perturbation (§3.4)
# --------------------------------------------------------------------------------------------------------------


def next_perturbation(r: float, factor: float, rng: np.random.Generator) -> float:
    """Next iteration's perturbation: ``wrap(r + U(factor/2, factor), [-factor, factor))`` (``--perturb`` factor)."""
    if factor <= 0:
        return 0.0
    r = r + rng.uniform(0.5 * factor, factor)
    width = 2.0 * factor
    return float(r - width * math.floor((r + factor) / width))


def perturb_orientations(matrices, r: float, step: float) -> np.ndarray:
    """``A @ E(delta, delta, delta)`` with ``delta = r * step`` (step = coarse angular step, degrees).

    ``matrices`` is ``(..., 3, 3)``; convert back with :func:`gerelion_dask.conventions.matrix_to_euler`.
    """
    delta = r * step
    return np.asarray(matrices, dtype=np.float64) @ euler_to_matrix(delta, delta, delta)


def perturb_translations(translations, r: float, offset_step: float) -> np.ndarray:
    """Add ``r * offset_step`` pixels to x and y of translations ``(..., 2)`` (coarse and fine alike)."""
    return np.asarray(translations, dtype=np.float64) + r * offset_step


# --------------------------------------------------------------------------------------------------------------
# Local searches (§3.5)
# --------------------------------------------------------------------------------------------------------------


class LocalSearch(NamedTuple):
    """Directions and psi angles kept for one particle, with their normalised Gaussian prior weights."""

    dir_indices: np.ndarray
    dir_prior: np.ndarray
    psi_indices: np.ndarray
    psi_prior: np.ndarray


def _psi_distance(psi: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``|psi - p|`` folded at 180 degrees (elementwise; broadcasting)."""
    d = np.abs(psi - p)
    return np.where(d > 180.0, np.abs(d - 360.0), d)


def _psi_prior(psi: np.ndarray, p_psi: np.ndarray, s_psi: np.ndarray, cutoff: float) -> np.ndarray:
    """``(P, N_psi)`` psi priors: uniform where ``s_psi <= 0``; else Gaussian weights of the folded distance
    :func:`_psi_distance` within ``cutoff * sigma`` (the nearest sample alone where none is), normalised per row,
    with the distances measured only near each prior (the exponential at the kept samples only).  A window of
    half-width ``R = cutoff * sigma`` below 180 degrees holds only samples with ``psi - p`` within ``R`` of -360, 0 or
    360 (the fold), found by binary search in the sorted list (with a margin; the exact test follows); wider ones and
    particles with nothing in range (nearest sample) are measured whole."""
    psi = np.asarray(psi, dtype=np.float64)
    n = len(psi)
    out = np.zeros((len(p_psi), n))
    out[s_psi <= 0] = 1.0 / n
    on = np.flatnonzero(s_psi > 0)
    if not on.size:
        return out
    p, sig = p_psi[on], s_psi[on]
    R = cutoff * sig
    order = np.argsort(psi, kind="stable")
    srt = psi[order]
    narrow = np.flatnonzero(R < 180.0)
    centre = (p[narrow][:, None] + np.array([-360.0, 0.0, 360.0])[None, :]).ravel()
    half = np.repeat(R[narrow], 3) + 1e-6
    lo = np.searchsorted(srt, centre - half, side="left")
    length = np.searchsorted(srt, centre + half, side="right") - lo
    rows = np.repeat(np.repeat(narrow, 3), length)
    cols = order[concat_ranges(lo, length)]
    wide = np.flatnonzero(R >= 180.0)
    if wide.size:
        rows = np.concatenate([rows, np.repeat(wide, n)])
        cols = np.concatenate([cols, np.tile(np.arange(n), wide.size)])
    d = _psi_distance(psi[cols], p[rows])
    keep = d < R[rows]
    rows, cols, d = rows[keep], cols[keep], d[keep]
    g = on[rows]  # the particles' rows of out
    out[g, cols] = np.exp(-0.5 * (d / sig[rows]) ** 2)
    empty = np.flatnonzero(np.bincount(rows, minlength=on.size) == 0)
    if empty.size:
        out[on[empty], np.argmin(_psi_distance(psi[None, :], p[empty][:, None]), axis=1)] = 1.0
    out[g, cols] /= out.sum(axis=1)[g]  # (a particle with nothing in range holds one 1.0, its sum)
    return out


class LocalPriors(NamedTuple):
    """Local-search priors of ``P`` particles: the kept directions as compressed rows (particle ``p``'s are
    ``dir_index[dir_ptr[p]:dir_ptr[p + 1]]``, ascending, with normalised weights ``dir_prior`` at the same places)
    and the psi priors as a dense ``(P, N_psi)`` array (psi lists are short)."""

    dir_ptr: np.ndarray
    dir_index: np.ndarray
    dir_prior: np.ndarray
    psi_prior: np.ndarray

    def row(self, p: int) -> LocalSearch:
        """Particle ``p``'s kept direction and psi indices with their weights."""
        sl = slice(int(self.dir_ptr[p]), int(self.dir_ptr[p + 1]))
        pi = np.flatnonzero(self.psi_prior[p] > 0)
        return LocalSearch(self.dir_index[sl], self.dir_prior[sl], pi, self.psi_prior[p, pi])

    def dense_directions(self, n_dir: int) -> np.ndarray:
        """The direction priors as a dense ``(P, n_dir)`` array (0 where not searched)."""
        P = len(self.dir_ptr) - 1
        out = np.zeros((P, n_dir))
        out[np.repeat(np.arange(P), np.diff(self.dir_ptr)), self.dir_index] = self.dir_prior
        return out


_QUERY_MARGIN = 1e-6  # radians added to every cap (arccos near the poles loses ~1e-8 rad): candidates are a superset


class _DirectionBands(NamedTuple):
    """Directions binned into polar-angle bands of width ``h`` and sorted by azimuth in each: ``keys`` (ascending,
    ``band * 8 + azimuth``; azimuths are < 2 pi < 8) and the direction of each key, ``order``."""

    keys: np.ndarray
    order: np.ndarray
    h: float
    n_bands: int


def _direction_bands(dirs: np.ndarray, h: float) -> _DirectionBands:
    theta_d = np.arccos(np.clip(dirs[:, 2], -1.0, 1.0))
    phi_d = np.mod(np.arctan2(dirs[:, 1], dirs[:, 0]), 2 * np.pi)
    h = float(np.clip(h, np.pi / 4096, np.pi))
    nb = int(math.ceil(np.pi / h))
    keys = np.minimum((theta_d / h).astype(np.int64), nb - 1) * 8.0 + phi_d
    order = np.argsort(keys, kind="stable")
    return _DirectionBands(keys[order], order, h, nb)


def _candidate_pairs(q: np.ndarray, qrow: np.ndarray, radius: np.ndarray, bands: _DirectionBands) -> tuple:
    """Pairs (row, direction) where unit vector ``q[i]`` (of particle ``qrow[i]``) may lie within ``radius[i]``
    radians of a direction of ``bands`` (:func:`_direction_bands`): a superset, found without testing every
    direction.  A cap covers a few bands and, in each, one azimuth interval (two where it wraps past 0, the whole
    band near a pole)."""
    if not len(q):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    keys, h, nb = bands.keys, bands.h, bands.n_bands
    r = radius + _QUERY_MARGIN
    theta_q = np.arccos(np.clip(q[:, 2], -1.0, 1.0))
    phi_q = np.mod(np.arctan2(q[:, 1], q[:, 0]), 2 * np.pi)
    b_lo = (np.maximum(theta_q - r, 0.0) / h).astype(np.int64)
    b_hi = np.minimum((np.minimum(theta_q + r, np.pi) / h).astype(np.int64), nb - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sin(np.minimum(r, np.pi / 2)) / np.sin(theta_q)
    # a cap over a pole (sin r >= sin theta) or past a hemisphere spans every azimuth; otherwise its azimuth
    # half-width is asin(sin r / sin theta)
    full = ~(ratio < 1.0) | (r >= np.pi / 2)
    half = np.where(full, np.pi, np.arcsin(np.where(full, 0.0, ratio)) + _QUERY_MARGIN)
    full |= half >= np.pi
    lo, hi = phi_q - half, phi_q + half
    # up to two azimuth intervals per (cap, band): the main one and its wrapped part
    a1 = np.where(full, 0.0, np.maximum(lo, 0.0))
    e1 = np.where(full, 7.0, np.minimum(hi, 2 * np.pi))
    a2 = np.where(lo < 0, lo + 2 * np.pi, 0.0)
    e2 = np.where(lo < 0, 2 * np.pi, np.where(hi > 2 * np.pi, hi - 2 * np.pi, -1.0))
    e2 = np.where(full, -1.0, e2)
    n_band = b_hi - b_lo + 1
    qi = np.repeat(np.arange(len(q)), n_band)
    band = concat_ranges(b_lo, n_band)
    qi2 = np.concatenate([qi, qi])
    base = np.concatenate([band, band]) * 8.0
    start = np.searchsorted(keys, base + np.concatenate([a1[qi], a2[qi]]), side="left")
    stop = np.searchsorted(keys, base + np.concatenate([e1[qi], e2[qi]]), side="right")
    length = np.maximum(stop - start, 0)
    pos = concat_ranges(start, length)
    return qrow[np.repeat(qi2, length)], bands.order[pos]


_CANDIDATE_PAIRS = 1 << 22  # a block of local-search particles tests at most this many (particle, direction) pairs
_WIDE_CAPS = 1.0 / 64  # local-search caps covering more of the sphere than this test every direction (order 5,
# 1,000 particles, this VM: 0.34 / 0.32 / 1.9 s at sigma 5 / 10 / 40 deg against 0.45 / 2.5 / 16.7 s by the query)


_DENSE_ELEMS = 1 << 24  # (particle, direction) cosines of one block of the dense search (128 MiB in float64)


def _dense_directions(xp, pdir, sig_dir, images, cutoff: float) -> tuple:
    """Every direction of ``images (G, N, 3)`` tested against the priors ``pdir (P, 3)`` with widths ``sig_dir
    (P,)`` (degrees) on the backend ``xp``, in blocks of particles: ``(rows, cols, dist)`` on the host, the pairs
    within ``cutoff x sig_dir`` sorted by particle then direction, ``dist`` their angle in degrees (the closest
    symmetry image).  NumPy's cosines are element by element (the same bits in any block); a GPU's come from its
    GEMM (within a few ulps)."""
    from ..backend import to_host

    N = images.shape[1]
    step = max(1, _DENSE_ELEMS // max(N, 1))
    img = xp.asarray(images)
    out = []
    for s in range(0, len(pdir), step):
        p = xp.asarray(pdir[s : s + step])
        cos = xp.einsum("pj,nj->pn", p, img[0])
        for g in img[1:]:
            xp.maximum(cos, xp.einsum("pj,nj->pn", p, g), out=cos)
        d = xp.rad2deg(xp.arccos(xp.clip(cos, -1.0, 1.0)))
        del cos
        r, c = xp.nonzero(d < cutoff * xp.asarray(sig_dir[s : s + step])[:, None])
        # one copy to the host: rows (offset by the block's start), columns and the distances' bits
        out.append(to_host(xp.stack([r.astype(np.int64) + s, c.astype(np.int64),
                                     d[r, c].astype(np.float64).view(np.int64)])))
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    rcd = np.concatenate(out, axis=1)
    return rcd[0], rcd[1], rcd[2].view(np.float64)


def _kept_directions(pdir, sig_dir, bands, images, ops, cutoff: float, xp=np) -> tuple:
    """Local-search directions of particles with prior directions ``pdir (P, 3)`` and widths ``sig_dir (P,)``
    (degrees) among the directions of ``bands`` (their symmetry images ``images (G, N, 3)`` under ``ops``):
    ``(rows, cols, w)`` sorted by particle then direction, ``w`` the unnormalised Gaussian weights.  A particle with
    no direction in range keeps its nearest one (weight 1; the whole list tested for these particles only), one with
    ``sig_dir <= 0`` every direction (weight 1).  On a GPU (``xp`` CuPy) every particle takes the dense search
    (:func:`_dense_directions`: a few kernels, where NumPy's neighbourhood query is ~5 ms of host work a
    1,000-particle pool); ``bands`` is then unused."""
    n_part, N = len(pdir), images.shape[1]
    r = np.deg2rad(cutoff * sig_dir)
    # wide caps (their images cover over _WIDE_CAPS of the sphere), and every cap on a GPU: every direction tested,
    # per symmetry image; narrow ones on a CPU: the candidates of the neighbourhood query only
    wide = (sig_dir > 0) & ((xp is not np) | (len(ops) * 0.5 * (1.0 - np.cos(np.minimum(r, np.pi))) > _WIDE_CAPS))
    narrow = np.flatnonzero((sig_dir > 0) & ~wide)
    # angle(p, g d) = angle(g^T p, d): the caps sit around every symmetry image of the prior direction
    q = np.einsum("gji,pj->gpi", ops, pdir[narrow]).reshape(-1, 3)
    qrow = np.tile(narrow, len(ops))
    rows, cols = _candidate_pairs(q, qrow, r[qrow], bands) if narrow.size else (np.zeros(0, np.int64),) * 2
    rows, cols = np.divmod(distinct(rows * N + cols), N)  # ascending: by particle, then direction
    best = np.einsum("ij,ij->i", pdir[rows], images[0][cols])
    for img in images[1:]:
        np.maximum(best, np.einsum("ij,ij->i", pdir[rows], img[cols]), out=best)
    dist = np.rad2deg(np.arccos(np.clip(best, -1.0, 1.0)))
    keep = dist < cutoff * sig_dir[rows]
    rows, cols, dist = rows[keep], cols[keep], dist[keep]
    wi = np.flatnonzero(wide)
    if wi.size:
        rw, cw, d_w = _dense_directions(xp, pdir[wi], sig_dir[wi], images, cutoff)
        rows, cols, dist = (np.concatenate([rows, wi[rw]]), np.concatenate([cols, cw]), np.concatenate([dist, d_w]))
        if narrow.size:
            o = np.lexsort((cols, rows))
            rows, cols, dist = rows[o], cols[o], dist[o]
    on = np.flatnonzero(sig_dir > 0)
    w = np.exp(-0.5 * (dist / sig_dir[rows]) ** 2)
    lonely = on[np.bincount(rows, minlength=n_part)[on] == 0]
    if lonely.size:
        cos = np.max(np.einsum("gni,pi->gpn", images, pdir[lonely]), axis=0)
        rows = np.concatenate([rows, lonely])
        cols = np.concatenate([cols, np.argmax(cos, axis=1)])
        w = np.concatenate([w, np.ones(lonely.size)])
    flat = np.flatnonzero(sig_dir <= 0)
    if flat.size:
        rows = np.concatenate([rows, np.repeat(flat, N)])
        cols = np.concatenate([cols, np.tile(np.arange(N), flat.size)])
        w = np.concatenate([w, np.ones(flat.size * N)])
    if lonely.size or flat.size:
        o = np.lexsort((cols, rows))
        rows, cols, w = rows[o], cols[o], w[o]
    return rows, cols, w


def local_search_sparse(
    prior_rot,
    prior_tilt,
    prior_psi,
    sigma_rot,
    sigma_tilt,
    sigma_psi,
    rot,
    tilt,
    psi,
    dir_operators=None,
    sigma_cutoff: float = 3.0,
    xp=np,
) -> LocalPriors:
    """Gaussian local-search priors (RELION ``selectOrientationsWithNonZeroPriorProbability``), kept samples only.

    Parameters
    ----------
    prior_rot, prior_tilt, prior_psi : ``(P,)`` or scalars
        Each particle's current angles (the prior centres), degrees.
    sigma_rot, sigma_tilt, sigma_psi : scalars or ``(P,)``
        Prior widths, degrees.  Directions use ``max(sigma_rot, sigma_tilt)``; if both are <= 0 every direction
        gets the same weight, likewise psi when ``sigma_psi <= 0``.
    rot, tilt : ``(N_dir,)``
        The coarse direction list (e.g. from :func:`asymmetric_unit_directions`).
    psi : ``(N_psi,)``
        The coarse psi list (:func:`psi_angles`).
    dir_operators : ``(G, 3, 3)``, optional
        :func:`gerelion_dask.ops.symmetry.direction_operators` of the symmetry group (identity when omitted).
    sigma_cutoff : float
        Keep samples whose distance is ``< sigma_cutoff * sigma`` (RELION: 3).
    xp : module
        Where the directions are tested: NumPy (a neighbourhood query of the narrow caps) or CuPy (every direction,
        on the device: :func:`_dense_directions`); the result is on the host either way.

    Returns
    -------
    :class:`LocalPriors`: each particle's weights sum to 1 and are kept only inside the search range.  Direction
    distance = angle between the prior direction and the closest symmetry image of the sampled direction
    (``arccos`` of the largest dot product); psi distance = ``|psi - prior_psi|`` wrapped to [0, 180].  A particle
    with no sample in range keeps only its nearest sample (weight 1).  Only directions near a prior are tested
    (:func:`_candidate_pairs`), so the cost follows the kept samples, not the sphere.

    Raises
    ------
    NotImplementedError
        When exactly one of sigma_rot, sigma_tilt is positive (RELION's helical-only branches).
    """
    p_rot, p_tilt, p_psi = (np.atleast_1d(np.asarray(a, np.float64)) for a in (prior_rot, prior_tilt, prior_psi))
    n_part = max(p_rot.size, p_tilt.size, p_psi.size)
    p_rot, p_tilt, p_psi = (np.broadcast_to(a, (n_part,)) for a in (p_rot, p_tilt, p_psi))
    sigmas = (sigma_rot, sigma_tilt, sigma_psi)
    s_rot, s_tilt, s_psi = (np.broadcast_to(np.asarray(a, np.float64), (n_part,)) for a in sigmas)
    if np.any((s_rot > 0) != (s_tilt > 0)):
        raise NotImplementedError("local searches with only one of sigma_rot, sigma_tilt > 0 are not implemented")
    dirs = direction_vectors(rot, tilt)  # (N, 3)
    N = len(dirs)
    ops = np.eye(3)[None] if dir_operators is None else np.asarray(dir_operators, dtype=np.float64)
    pdir = direction_vectors(p_rot, p_tilt)  # (P, 3)
    sig_dir = np.maximum(s_rot, s_tilt)
    images = np.einsum("gij,nj->gni", ops, dirs)  # (G, N, 3)
    radius = np.deg2rad(sigma_cutoff * sig_dir)
    bands = (_direction_bands(dirs, float(np.median(radius[sig_dir > 0])) if np.any(sig_dir > 0) else np.pi)
             if xp is np else None)  # (a GPU tests every direction)
    # particles in blocks whose candidate pairs stay bounded: ~4x the widest cap's share of the sphere, per image
    r_max = float(np.max(radius, initial=0.0))
    per = len(ops) * N * min(1.0, 2.0 * (1.0 - math.cos(min(r_max, np.pi))) + 8.0 / max(N, 1))
    step = max(1, int(_CANDIDATE_PAIRS // max(per, 1.0))) if xp is np else max(1, n_part)  # (dense: own blocks)
    starts = range(0, max(n_part, 1), step)
    found = [_kept_directions(pdir[s : s + step], sig_dir[s : s + step], bands, images, ops, sigma_cutoff, xp)
             for s in starts]
    rows = np.concatenate([f[0] + s for f, s in zip(found, starts, strict=True)])
    cols = np.concatenate([f[1] for f in found])
    w = np.concatenate([f[2] for f in found])
    count = np.bincount(rows, minlength=n_part)
    w = w / np.bincount(rows, weights=w, minlength=n_part)[rows]
    ptr = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    return LocalPriors(ptr, cols.astype(np.int64), w, _psi_prior(psi, p_psi, s_psi, sigma_cutoff))


# --------------------------------------------------------------------------------------------------------------
# Asymmetric unit (§3.1)
# --------------------------------------------------------------------------------------------------------------


class Directions(NamedTuple):
    """A coarse direction list: HEALPix NESTED pixel indices and their RELION (rot, tilt) in degrees."""

    pix: np.ndarray
    rot: np.ndarray
    tilt: np.ndarray


# Border planes of the asymmetric unit: a direction d is kept when sign * (d . normal) >= 0 for every plane.
_T_PLANES = ((-0.942809, 0.0, 0.0), (0.471405, 0.272165, 0.7698), (0.471404, 0.816497, 0.0))
_TD_PLANES = ((-0.942809, 0.0, 0.0), (0.471405, 0.272165, 0.7698), (0.0, 0.471405, -0.666667))
_TH_PLANES = ((-0.816496, 0.0, 0.0), (0.707107, 0.408248, -0.57735), (-0.408248, -0.707107, 0.0))
_O_PLANES = ((0.0, -1.0, 1.0), (1.0, 1.0, 0.0), (-1.0, 1.0, 0.0))
_I2_PLANES = (  # the great circles through two 5-fold axes and through a 5-fold and a 3-fold axis of setting I2
    (0.0, 1.0, 0.0),
    (-0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
    (0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
)
_I4_PLANES = (
    (0.0, 0.0, 1.0),
    (0.187592467856686, -0.303530987314591, -0.491123477863004),
    (0.187592467856686, 0.303530987314591, -0.491123477863004),
)
_I_TILT = 31.7174745559  # tilt (deg) that takes the I2 setting's 5-fold axis onto z


def _planes_mask(d: np.ndarray, planes, rotate_tilt: float | None = None, sign: float = 1.0) -> np.ndarray:
    keep = np.ones(len(d), dtype=bool)
    A = None if rotate_tilt is None else np.asarray(euler_to_matrix(0.0, rotate_tilt, 0.0))
    for p in planes:
        n = np.asarray(p, dtype=np.float64)
        n = n if A is None else A @ n
        n = n / math.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2])
        dot = d[:, 0] * n[0] + d[:, 1] * n[1] + d[:, 2] * n[2]
        keep &= sign * dot >= 0
    return keep


def _icosahedral_mask(kind: str, d: np.ndarray) -> np.ndarray:
    setting, mirror = kind[:2], kind.endswith("H")
    tilt = {"I1": 90.0, "I2": None, "I3": _I_TILT, "I4": -_I_TILT}[setting]
    if not mirror:
        if setting == "I4":
            return _planes_mask(d, _I4_PLANES, tilt, sign=-1.0)
        return _planes_mask(d, _I2_PLANES, tilt)
    if setting in ("I1", "I2"):  # two of the I2 planes and the mirror plane x = 0 (rotated for I1)
        return _planes_mask(d, _I2_PLANES[:2] + ((1.0, 0.0, 0.0),), tilt)
    half = _planes_mask(d, _I4_PLANES, -_I_TILT if setting == "I4" else _I_TILT, sign=-1.0 if setting == "I4" else 1.0)
    return half & _planes_mask(d, ((0.0, 1.0, 0.0),))


def _geometric_mask(kind: str, n: int, rot: np.ndarray, tilt: np.ndarray, d: np.ndarray) -> np.ndarray:
    """RELION's first, geometric cut of the direction list to (a superset of) one asymmetric unit."""
    upper = tilt <= 90.0
    if kind == "CN":
        return (rot >= -180.0 / n) & (rot <= 180.0 / n)
    if kind in ("CI", "CS"):
        return upper
    if kind == "CNV":
        return (rot >= 0.0) & (rot <= 180.0 / n)
    if kind == "CNH":
        return (rot >= -180.0 / n) & (rot <= 180.0 / n) & upper
    if kind == "SN":
        return (rot >= -360.0 / n) & (rot <= 360.0 / n) & upper
    if kind == "DN":
        return upper if n == 1 else (rot >= -180.0 / n + 90.0) & (rot <= 180.0 / n + 90.0) & upper
    if kind in ("DNV", "DNH"):
        return (rot >= 90.0) & (rot <= 180.0 / n + 90.0) & upper
    if kind == "T":
        return (((rot >= 90.0) & (rot <= 150.0)) | (rot == 0.0)) & _planes_mask(d, _T_PLANES)
    if kind == "TD":
        return _planes_mask(d, _TD_PLANES)
    if kind == "TH":
        return _planes_mask(d, _TH_PLANES)
    if kind == "O":
        return (((rot >= 45.0) & (rot <= 135.0) & upper) | (rot == 0.0)) & _planes_mask(d, _O_PLANES)
    if kind == "OH":
        return (rot >= 90.0) & (rot <= 135.0) & upper & _planes_mask(d, _O_PLANES)
    return _icosahedral_mask(kind, d)


def _remove_seam_duplicates(d: np.ndarray, ops: np.ndarray, cos_max: float) -> np.ndarray:
    """Greedy pass in list order: drop a direction if a symmetry image of an already kept one is closer than the
    threshold (``dot > cos_max``).  Returns the keep mask."""
    n = len(d)
    conflict = np.zeros((n, n), dtype=bool)  # conflict[j, i]: some image of direction j is too close to direction i
    for m in ops:
        img = d @ m.T
        for s in range(0, n, _SEAM_BLOCK):
            conflict[s : s + _SEAM_BLOCK] |= (img[s : s + _SEAM_BLOCK] @ d.T) > cos_max
    keep = np.zeros(n, dtype=bool)
    for i in range(n):
        keep[i] = not np.any(conflict[:i, i] & keep[:i])
    return keep


def limit_tilt_mask(tilt, limit: float) -> np.ndarray:
    """RELION's ``--limit_tilt`` (``removePointsOutsideLimitedTiltAngles``): with the tilt folded into [-90, 90]
    (above 90 minus 180), a positive limit keeps |tilt| >= limit (side views), a negative one |tilt| <= |limit| (top
    views); |limit| >= 90 keeps everything."""
    t = np.asarray(tilt, dtype=np.float64)
    t = np.where(t > 90.0, t - 180.0, t)
    if abs(limit) >= 90.0:
        return np.ones(t.shape, bool)
    return np.abs(t) >= abs(limit) if limit > 0 else np.abs(t) <= abs(limit)


def asymmetric_unit_directions(order: int, symmetry: str = "C1", limit_tilt: float = -91.0) -> Directions:
    """The coarse direction list of a refinement: HEALPix directions reduced to one asymmetric unit.

    Parameters
    ----------
    order : int
        HEALPix order (``--healpix_order``).
    symmetry : str
        RELION point-group name (``--sym``), case-insensitive.
    limit_tilt : float
        ``--limit_tilt`` (:func:`limit_tilt_mask`, applied after the symmetry reduction); the default -91 keeps all.

    Returns
    -------
    Directions
        ``pix`` (NESTED indices at ``order``, ascending), ``rot``, ``tilt`` (degrees).

    Raises
    ------
    InputError
        For an unknown symmetry name, or when no direction is left (I, I2, I3, Ih at order 1; RELION 3.1.3
        silently continues with zero orientations there; or a ``limit_tilt`` that keeps none).

    Notes
    -----
    As RELION ``removeSymmetryEquivalentPoints``: (i) a geometric cut per group kind (rot/tilt ranges, border
    planes); (ii) if fewer than 4000 directions remain, a seam clean-up that walks the list in order and drops a
    direction if any symmetry image (:func:`~gerelion_dask.ops.symmetry.direction_operators`) of an already kept one
    lies within ``0.5 * max_pixrad``.  Counts (checked against relion_refine 3.1.3): C1 48/192/768/3072 and
    C4 12/48/192/768 at orders 1-4.
    """
    kind, n = parse_symmetry_name(symmetry)
    pix = np.arange(healpix_npix(order), dtype=np.int64)
    rot, tilt = healpix_directions(order)
    d = direction_vectors(rot, tilt)
    keep = _geometric_mask(kind, n, rot, tilt, d)
    pix, rot, tilt, d = pix[keep], rot[keep], tilt[keep], d[keep]
    if len(pix) < _SEAM_LIMIT:
        cos_max = math.cos(_deg2rad(0.5 * _rad2deg(max_pixrad(order))))
        keep = _remove_seam_duplicates(d, direction_operators(symmetry), cos_max)
        pix, rot, tilt = pix[keep], rot[keep], tilt[keep]
    if len(pix) == 0:  # e.g. I at order 1: RELION goes on with zero orientations
        raise InputError(
            None,
            f"no HEALPix order-{order} direction lies in the asymmetric unit of symmetry '{symmetry}'",
            "use a finer --healpix_order",
        )
    keep = limit_tilt_mask(tilt, limit_tilt)  # after the symmetry reduction, as RELION
    if not keep.any():
        raise InputError(None, f"--limit_tilt {limit_tilt:g} keeps none of the {len(pix)} HEALPix order-{order} "
                         f"directions of symmetry '{symmetry}'", "use a limit closer to 0 or a finer --healpix_order")
    return Directions(pix[keep], rot[keep], tilt[keep])
