"""Trilinear insertion of 2D slices into padded 3D data and weight arrays (RELION ``BackProjector``).

For every 2D pixel k of a slice (half plane: the redundant pixels ``kx = 0, ky < 0`` are skipped, ALGORITHM.md
§4.6.1) with ``|q| <= r_pad``, ``q = p A^T (kx, ky, 0)``; if ``q_x < 0`` the point and the value are Friedel-folded
(``-q``, ``conj``); the value is distributed to the 8 neighbours with trilinear weights:
``D[v] += w_v Fimg(k)``, ``W[v] += w_v Fw(k)``.  Pixels with ``Fw <= 0`` are skipped.

The sums are order-independent up to float rounding; on NumPy they are done with ``bincount`` (deterministic), on CuPy
by one kernel with atomic adds (:mod:`gerelion_dask.kernels.backproject`). ``enforce_hermitian`` is RELION's
``enforceHermitianSymmetry`` of the kx = 0 plane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import get_xp, scatter_add
from .fourier import PaddedGrid, layout_shape
from .projector import _corner_indices, slice_coordinates

__all__ = ["BackProjection", "empty_backprojection", "insert_slices", "enforce_hermitian"]


@dataclass(frozen=True)
class BackProjection:
    """Accumulated data (complex) and weight (real) arrays in the padded layout, with their geometry."""

    data: object
    weight: object
    grid: PaddedGrid

    def __add__(self, other: BackProjection) -> BackProjection:
        if self.grid != other.grid:
            raise ValueError(f"cannot add back-projections on different grids: {self.grid} vs {other.grid}")
        return BackProjection(self.data + other.data, self.weight + other.weight, self.grid)


def empty_backprojection(grid: PaddedGrid, xp=np, dtype=np.complex128) -> BackProjection:
    """Zero data/weight arrays for ``grid`` (float64/complex128 by default: sums over many particles)."""
    shape = layout_shape(grid.r_pad)
    real = np.float64 if np.dtype(dtype) == np.complex128 else np.float32
    return BackProjection(xp.zeros(shape, dtype=dtype), xp.zeros(shape, dtype=real), grid)


def insert_slices(bp: BackProjection, rotations, fimg, fweight) -> BackProjection:
    """Insert slices ``fimg (B, n, n//2+1)`` (complex) with weights ``fweight`` (real, same shape).

    Returns a new :class:`BackProjection` (the input arrays are updated in place and returned, for speed).
    Frequencies of the slices are in units of the original box (windowed layout of ``window_rfft2``).
    """
    xp = get_xp(bp.data, fimg)
    if xp is not np:
        from ..kernels.backproject import insert_slices as twin

        return twin(bp, rotations, fimg, fweight)
    n = fimg.shape[-2]
    A = xp.asarray(rotations, dtype=np.float64)  # coordinates in float64 whatever the volumes' precision
    if A.ndim == 2:
        A = A[None]
    q, valid = slice_coordinates(A, n, bp.grid, xp=xp, half_plane=True)
    valid = valid & (fweight > 0)
    qv = q[valid]
    vals = xp.asarray(fimg)[valid].astype(bp.data.dtype)
    wts = xp.asarray(fweight)[valid].astype(bp.weight.dtype)
    base, (fx, fy, fz), conj, (sz, sy, sx) = _corner_indices(qv, bp.grid.r_pad, xp)
    vals = xp.where(conj, xp.conj(vals), vals)
    for dz, wz in ((0, 1 - fz), (1, fz)):
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                idx = base + dz * sz + dy * sy + dx * sx
                tw = wz * wy * wx
                scatter_add(bp.data, idx, vals * tw)
                scatter_add(bp.weight, idx, wts * tw)
    return bp


def enforce_hermitian(bp: BackProjection) -> BackProjection:
    """Make the kx = 0 plane Hermitian: ``D(kz,ky,0)`` and ``D(-kz,-ky,0)`` both become their conjugate sum.

    RELION ``BackProjector::enforceHermitianSymmetry`` (sum, not average; the weights likewise).
    """
    xp = get_xp(bp.data)
    d0 = bp.data[:, :, 0]
    w0 = bp.weight[:, :, 0]
    flipped_d = d0[::-1, ::-1]
    flipped_w = w0[::-1, ::-1]
    data = bp.data.copy()
    weight = bp.weight.copy()
    data[:, :, 0] = d0 + xp.conj(flipped_d)
    weight[:, :, 0] = w0 + flipped_w
    # the centre voxel (0,0,0) pairs with itself: RELION leaves it as is
    c = bp.grid.r_pad + 1
    data[c, c, 0] = d0[c, c]
    weight[c, c, 0] = w0[c, c]
    return BackProjection(data, weight, bp.grid)
