"""Point-group symmetry: operator lists and symmetrisation of back-projected Fourier arrays.

Reproduces, in our own code:

* RELION ``SymList::isSymmetryGroup`` (names, case-insensitive) -> :func:`parse_symmetry_name`;
* RELION ``SymList::fill_symmetry_class`` + ``read_sym_file`` + ``compute_subgroup`` (generators, then closure
  under multiplication) -> :func:`symmetry_operators`;
* the direction images RELION's ``HealpixSampling`` uses (``L_g R_g^T d``, with RELION's extra z-flip matrix L for
  elements that contain an inversion) -> :func:`direction_operators`;
* RELION ``BackProjector::applyPointGroupSymmetry`` -> :func:`symmetrise_fourier` (the Hermitian fix-up of the
  kx = 0 plane, ``enforceHermitianSymmetry``, is *not* done here).

The asymmetric-unit direction list (``HealpixSampling::removeSymmetryEquivalentPoints``) lives in
:mod:`gerelion_dask.ops.sampling`.  This module imports nothing from the pipeline stages.

Notes
-----
Generators (ALGORITHM.md §3.6): "rot_axis n u" contributes the rotations by 360 j / n about u (j = 1..n-1),
"inversion" is -I, "mirror_plane u" is the reflection ``I - 2 u u^T``.  Axes and planes are those of RELION's
``symmetries.cpp``, written as the exact algebraic numbers (square roots, golden ratio) that RELION's decimals round;
for I1-I4 the 3-fold generator is implied by the 2-fold and 5-fold ones and is not used.  RELION has no I5 / I5H
(it stops with "not implemented"); neither do we.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from ..backend import get_xp, to_host
from ..errors import InputError

__all__ = [
    "parse_symmetry_name",
    "symmetry_operators",
    "direction_operators",
    "rotation_about_axis",
    "symmetrise_fourier",
]

_PHI = (1.0 + np.sqrt(5.0)) / 2.0
_UNKNOWN_HINT = "use C1, C4, D2, T, O, I, ..."
_CLOSE_TOL = 1e-6  # two group elements are the same if no entry differs by more than this
_MAX_ORDER = 1000  # a closure that grows beyond this means inconsistent generators (a bug, not user input)

# Icosahedral settings (RELION symmetries.cpp): exact 2-fold and 5-fold generator axes.  RELION also lists a 3-fold
# generator; it is the product of these two and is implied (RELION's decimals for it agree with ours to ~1e-8, which
# tests/test_symmetry.py checks), so it is left out of the closure to keep the group exact to rounding.
_ICOSAHEDRAL_AXES = {
    "I1": ((1.0, 0.0, 0.0), (_PHI, 0.0, -1.0)),
    "I2": ((0.0, 0.0, 1.0), (1.0, 0.0, _PHI)),
    "I3": ((-1.0, 0.0, _PHI), (0.0, 0.0, 1.0)),
    "I4": ((1.0, 0.0, _PHI), (2.0, 0.0, 1.0)),
}
# Mirror-plane normals added for the "H" icosahedral groups.
_ICOSAHEDRAL_MIRRORS = {
    "I1": (0.0, 0.0, -1.0),
    "I2": (1.0, 0.0, 0.0),
    "I3": (1.0, 0.0, 1.0 / _PHI),
    "I4": (1.0, 0.0, -1.0 / _PHI),
}

# name pattern -> group kind; "n" is the order of the principal axis where the kind has one
_NAME_PATTERNS = (
    (r"C(\d{1,2})", "CN"),
    (r"CI", "CI"),
    (r"CS", "CS"),
    (r"C(\d{1,2})V", "CNV"),
    (r"C(\d{1,2})H", "CNH"),
    (r"S(\d{1,2})", "SN"),
    (r"D(\d{1,2})", "DN"),
    (r"D(\d{1,2})V", "DNV"),
    (r"D(\d{1,2})H", "DNH"),
    (r"T", "T"),
    (r"TD", "TD"),
    (r"TH", "TH"),
    (r"O", "O"),
    (r"OH", "OH"),
    (r"I([1-5]?)", "I"),
    (r"I([1-5]?)H", "IH"),
)


def parse_symmetry_name(name: str) -> tuple[str, int]:
    """Parse a RELION point-group name (case-insensitive) into ``(kind, n)``.

    Parameters
    ----------
    name : str
        For example ``"C1"``, ``"c4"``, ``"D7"``, ``"C3v"``, ``"S4"``, ``"T"``, ``"Oh"``, ``"I"``, ``"I3h"``.

    Returns
    -------
    kind : str
        One of ``CN CI CS CNV CNH SN DN DNV DNH T TD TH O OH I1 I2 I3 I4 I1H I2H I3H I4H`` (``I`` is ``I2``,
        ``IH`` is ``I2H``, as in RELION).
    n : int
        Order of the principal axis for the C/S/D families, 0 otherwise.

    Raises
    ------
    InputError
        For names RELION does not know, for n < 1, for odd n in Sn, and for I5/I5H (not implemented in RELION).
    """
    text = str(name).strip().upper()
    for pattern, kind in _NAME_PATTERNS:
        m = re.fullmatch(pattern, text)
        if m is None:
            continue
        if kind in ("I", "IH"):
            setting = m.group(1) or "2"
            if setting == "5":
                raise InputError(None, f"symmetry group '{name}' is not implemented in RELION", _UNKNOWN_HINT)
            return ("I" + setting + ("H" if kind == "IH" else ""), 0)
        n = int(m.group(1)) if m.groups() else 0
        if m.groups() and n < 1:
            raise InputError(None, f"unknown symmetry group '{name}'", _UNKNOWN_HINT)
        if kind == "SN" and n % 2:
            raise InputError(None, f"symmetry group '{name}': the order of Sn must be even", _UNKNOWN_HINT)
        return (kind, n)
    raise InputError(None, f"unknown symmetry group '{name}'", _UNKNOWN_HINT)


def rotation_about_axis(axis, angle_deg: float) -> np.ndarray:
    """Right-handed rotation matrix by ``angle_deg`` about ``axis`` (normalised here), Rodrigues' formula."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    a = np.deg2rad(angle_deg)
    k = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return np.eye(3) + np.sin(a) * k + (1.0 - np.cos(a)) * (k @ k)


def _mirror(normal) -> np.ndarray:
    u = np.asarray(normal, dtype=np.float64)
    u = u / np.linalg.norm(u)
    return np.eye(3) - 2.0 * np.outer(u, u)


def _generators(kind: str, n: int) -> list[tuple[str, object, int]]:
    """RELION's generator list for a group: ("rot", axis, fold) / ("inv", None, 0) / ("mirror", normal, 0)."""
    z, x = (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)
    principal = [("rot", z, n)] if n > 1 else []
    if kind == "CN":
        return principal
    if kind == "CI":
        return [("inv", None, 0)]
    if kind == "CS":
        return [("mirror", z, 0)]
    if kind == "CNV":
        return principal + [("mirror", (0.0, 1.0, 0.0), 0)]
    if kind == "CNH":
        return principal + [("mirror", z, 0)]
    if kind == "SN":
        return ([("rot", z, n // 2)] if n > 2 else []) + [("inv", None, 0)]
    if kind in ("DN", "DNV", "DNH"):
        extra = {"DN": [], "DNV": [("mirror", x, 0)], "DNH": [("mirror", z, 0)]}[kind]
        return principal + [("rot", x, 2)] + extra
    if kind in ("T", "TD", "TH"):
        two = (0.0, np.sqrt(2.0 / 3.0), np.sqrt(1.0 / 3.0))
        extra = {"T": [], "TD": [("mirror", (1.0, np.sqrt(3.0), 0.0), 0)], "TH": [("inv", None, 0)]}[kind]
        return [("rot", z, 3), ("rot", two, 2)] + extra
    if kind in ("O", "OH"):
        extra = [("mirror", (0.0, 1.0, 1.0), 0)] if kind == "OH" else []
        return [("rot", (1.0, 1.0, 1.0), 3), ("rot", z, 4)] + extra
    setting = kind[:2]
    two, five = _ICOSAHEDRAL_AXES[setting]
    gens = [("rot", two, 2), ("rot", five, 5)]
    if kind.endswith("H"):
        gens.append(("mirror", _ICOSAHEDRAL_MIRRORS[setting], 0))
    return gens


def _find(mats: np.ndarray, m: np.ndarray) -> bool:
    return bool(len(mats)) and bool((np.abs(mats - m).reshape(len(mats), -1).max(axis=1) < _CLOSE_TOL).any())


def _snap(m: np.ndarray) -> np.ndarray:
    """Make entries that are within 1e-12 of 0, +-1/2 or +-1 exact (RELION's setSmallValuesToZero, extended)."""
    out = m.copy()
    for v in (0.0, 0.5, -0.5, 1.0, -1.0):
        out[np.abs(out - v) < 1e-12] = v
    return out


@functools.lru_cache(maxsize=64)
def _group(kind: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Closed group for (kind, n): matrices R (G, 3, 3), identity first, and RELION's inversion flags (G,)."""
    mats, flips, prims = [np.eye(3)], [False], []
    for what, vec, fold in _generators(kind, n):
        if what == "rot":
            powers = [rotation_about_axis(vec, 360.0 * j / fold) for j in range(1, fold)]
            prims.append((powers[0], False))
            cand = [(p, False) for p in powers]
        elif what == "inv":
            prims.append((-np.eye(3), True))
            cand = [prims[-1]]
        else:
            prims.append((_mirror(vec), False))
            cand = [prims[-1]]
        for m, f in cand:
            if not _find(np.array(mats), m):
                mats.append(m)
                flips.append(f)
    frontier = list(range(len(mats)))
    while frontier:  # breadth-first closure: right-multiply every new element by every primitive generator
        new = []
        for i in frontier:
            for g, fg in prims:
                m = mats[i] @ g
                if not _find(np.array(mats), m):
                    mats.append(m)
                    flips.append(flips[i] != fg)
                    new.append(len(mats) - 1)
        if len(mats) > _MAX_ORDER:
            raise RuntimeError(f"point group {kind}{n or ''} does not close (generator axes inconsistent)")
        frontier = new
    R = _snap(np.array(mats))
    R.setflags(write=False)
    F = np.array(flips, dtype=bool)
    F.setflags(write=False)
    return R, F


def symmetry_operators(name: str) -> np.ndarray:
    """Operators of a RELION point group as ``(G, 3, 3)`` float64 matrices, identity first.

    Parameters
    ----------
    name : str
        RELION symmetry name, case-insensitive (see :func:`parse_symmetry_name`).

    Returns
    -------
    numpy.ndarray
        ``(G, 3, 3)``; the set is closed under multiplication and transposition, so ``R_g`` and ``R_g^T`` lists
        describe the same group.  Orders: Cn n, Dn 2n, T 12, O 24, I 60; Ci/Cs 2, Cnv/Cnh 2n, Sn n, Dnv/Dnh 4n,
        Td/Th 24, Oh 48, Ih 120.  Proper groups have determinant +1 throughout.

    Raises
    ------
    InputError
        ``unknown symmetry group 'X'`` for names RELION does not know.
    """
    R, _ = _group(*parse_symmetry_name(name))
    return R.copy()


def direction_operators(name: str) -> np.ndarray:
    """Matrices ``M_g`` (G, 3, 3), identity first, that map a projection direction d to its symmetry images ``M_g d``.

    ``M_g = L_g R_g^T`` exactly as RELION's HEALPix sampling uses them (``L_repository[j] * R_repository[j]^T``):
    ``L_g = diag(1, 1, -1)`` for group elements that contain RELION's "inversion" generator, identity otherwise.  For
    proper groups (C, D, T, O, I) this is simply ``R_g^T`` (the same set as ``R_g``).
    """
    R, flips = _group(*parse_symmetry_name(name))
    M = np.swapaxes(R, -1, -2).copy()
    M[flips, 2, :] *= -1.0
    return M


# --------------------------------------------------------------------------------------------------------------
# Symmetrisation of the back-projected arrays (BackProjector::applyPointGroupSymmetry)
# --------------------------------------------------------------------------------------------------------------

_CHUNK = 1 << 20  # voxels per vectorised block (bounds temporary memory to ~ 0.5 GB at complex128)


def _non_identity(operators) -> np.ndarray:
    ops = np.asarray(to_host(operators), dtype=np.float64).reshape(-1, 3, 3)
    is_id = np.abs(ops - np.eye(3)).reshape(len(ops), -1).max(axis=1) < 1e-9
    return ops[~is_id]


def _trilinear(xp, flat_d, flat_w, shape, pos):
    """Trilinear interpolation of the half-complex layout at logical positions ``pos`` (M, 3) = (x, y, z), x >= 0."""
    nz, ny, nx = shape
    c = (ny - 1) // 2
    f0 = xp.floor(pos)
    frac = pos - f0
    i0 = f0.astype(xp.int64)
    x0 = xp.clip(i0[:, 0], 0, nx - 2)
    y0 = xp.clip(i0[:, 1] + c, 0, ny - 2)
    z0 = xp.clip(i0[:, 2] + c, 0, nz - 2)
    fx, fy, fz = frac[:, 0], frac[:, 1], frac[:, 2]
    base = (z0 * ny + y0) * nx + x0
    d = xp.zeros(len(pos), dtype=flat_d.dtype)
    w = xp.zeros(len(pos), dtype=flat_w.dtype)
    for dz, wz in ((0, 1.0 - fz), (1, fz)):
        for dy, wy in ((0, 1.0 - fy), (1, fy)):
            for dx, wx in ((0, 1.0 - fx), (1, fx)):
                k = base + (dz * ny + dy) * nx + dx
                wt = wz * wy * wx
                d += wt * flat_d[k]
                w += wt * flat_w[k]
    return d, w


def symmetrise_fourier(data, weight, operators, r_pad: int) -> tuple:
    """Point-group symmetrisation of back-projected Fourier arrays (RELION ``applyPointGroupSymmetry``).

    For every voxel q with ``|q|^2 <= r_pad^2``::

        D_sym(q) = D(q) + sum_{g != identity} D(R_g q),      W_sym(q) = W(q) + sum_{g != identity} W(R_g q)

    with trilinear interpolation; a source point with x < 0 is read at ``-R_g q`` and complex-conjugated (Friedel).
    Voxels outside the radius are copied unchanged.  Sums, not averages (as RELION).

    Parameters
    ----------
    data : complex array ``(2(r_pad+1)+1, 2(r_pad+1)+1, r_pad+2)``
        Padded half-complex volume ``[z, y, x]``: x index = kx (0..r_pad+1), y index = ky + r_pad + 1,
        z index = kz + r_pad + 1.  NumPy or CuPy.
    weight : real array, same shape and backend as ``data``.
    operators : ``(G, 3, 3)`` rotation matrices, e.g. :func:`symmetry_operators`; identities are skipped.
    r_pad : int
        Radius (padded-grid voxels) of the sphere that is symmetrised, ``round(padding * r_max)``.

    Returns
    -------
    (data_sym, weight_sym) : new arrays on the input backend (inputs are not modified).

    Notes
    -----
    *R_g or R_g^T?*  If a real map is replaced by the sum of its rotated copies, ``V_sym(r) = sum_g V(R_g r)``, then
    ``V_sym^(q) = sum_g V^(R_g q)`` (substitute r' = R_g r in the Fourier integral; R_g orthogonal).  So "R_g q" is
    the transform of ``sum_g V(R_g r)``.  Because a point group contains the inverse ``R_g^T`` of each of its
    elements, ``sum_g V(R_g r) = sum_g V(R_g^T r)``: over a whole group both choices give the identical sum, and the
    result equals the transform of the map summed over its symmetry mates either way (tested against a real-space
    oracle in ``tests/test_symmetry.py``).  The choice only matters for an operator list that is not a group.
    """
    xp = get_xp(data, weight)
    shape = tuple(data.shape)
    n_yz = 2 * (r_pad + 1) + 1
    if shape != (n_yz, n_yz, r_pad + 2) or tuple(weight.shape) != shape:
        raise ValueError(f"data/weight must have shape {(n_yz, n_yz, r_pad + 2)} for r_pad={r_pad}, got {shape}")
    ops = _non_identity(operators)
    out_d = xp.array(data, copy=True, order="C")
    out_w = xp.array(weight, copy=True, order="C")
    if len(ops) == 0:
        return out_d, out_w
    flat_d = xp.ascontiguousarray(data).reshape(-1)
    flat_w = xp.ascontiguousarray(weight).reshape(-1)
    c = r_pad + 1
    k = xp.arange(n_yz) - c
    r2 = (k[:, None, None] ** 2 + k[None, :, None] ** 2 + xp.arange(r_pad + 2)[None, None, :] ** 2)
    inside = xp.flatnonzero((r2 <= r_pad * r_pad).reshape(-1))
    ops_xp = xp.asarray(ops)
    od, ow = out_d.reshape(-1), out_w.reshape(-1)
    for start in range(0, int(inside.size), _CHUNK):
        idx = inside[start : start + _CHUNK]
        q = xp.stack([idx % (r_pad + 2), (idx // (r_pad + 2)) % n_yz - c, idx // ((r_pad + 2) * n_yz) - c], axis=1)
        q = q.astype(xp.float64)
        acc_d = xp.zeros(idx.size, dtype=od.dtype)
        acc_w = xp.zeros(idx.size, dtype=ow.dtype)
        for g in range(len(ops)):
            pos = q @ ops_xp[g].T  # R_g q for every voxel
            neg = pos[:, 0] < 0
            pos = xp.where(neg[:, None], -pos, pos)
            d, w = _trilinear(xp, flat_d, flat_w, shape, pos)
            acc_d += xp.where(neg, xp.conj(d), d)
            acc_w += w
        od[idx] += acc_d
        ow[idx] += acc_w
    return out_d, out_w
