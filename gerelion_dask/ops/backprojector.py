"""Trilinear insertion of 2D slices into padded 3D data and weight arrays (RELION ``BackProjector``).

For every 2D pixel k of a slice (half plane: the redundant pixels ``kx = 0, ky < 0`` are skipped, ALGORITHM.md
§4.6.1) with ``|q| <= r_pad``, ``q = p A^T (kx, ky, 0)``; if ``q_x < 0`` the point and the value are Friedel-folded
(``-q``, ``conj``); the value is distributed to the 8 neighbours with trilinear weights:
``D[v] += w_v Fimg(k)``, ``W[v] += w_v Fw(k)``.  Pixels with ``Fw <= 0`` are skipped.

The sums are order-independent up to float rounding; on NumPy they are added pixel by pixel in a fixed order
(``np.add.at``, deterministic), on CuPy by one kernel with atomic adds (:mod:`gerelion_dask.kernels.backproject`).
``enforce_hermitian`` is RELION's ``enforceHermitianSymmetry`` of the kx = 0 plane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import get_xp
from .fourier import PaddedGrid, layout_shape
from .projector import _corner_indices, slice_pixels, slice_points

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


# NumPy inserts a chunk of pixels at a time whose temporaries (coordinates, corners, weighted values: ~150 bytes a
# pixel) stay in the CPU's caches: 1,000 slices into a 128-px grid on the 2-core VM, 48 / 96 / 128 px: ~5,300-5,900 /
# 1,130 / 680 slices/s at 1-2 MiB against 3,000 / 660 / 300 for whole slices at once (benchmarks/insertion.py;
# RESULTS.md, eighteenth session).
NUMPY_CHUNK_BYTES = 2 << 20


def insert_slices(bp: BackProjection, rotations, fimg, fweight, pixels=None) -> BackProjection:
    """Insert slices ``fimg (B, n, n//2+1)`` (complex) with weights ``fweight`` (real, same shape); with ``pixels``,
    a boolean ``(n, n//2+1)`` mask of the slices' pixels, ``fimg`` and ``fweight`` are ``(B, M)`` rows of the
    mask's pixels (in C order) and the other pixels are zero (the fine pass's back-projection sums).

    Returns a new :class:`BackProjection` (the input arrays are updated in place and returned, for speed).
    Frequencies of the slices are in units of the original box (windowed layout of ``window_rfft2``).
    """
    xp = get_xp(bp.data, fimg)
    if xp is not np:
        from ..kernels.backproject import insert_slices as twin

        return twin(bp, rotations, fimg, fweight, pixels)
    A = np.asarray(rotations, dtype=np.float64)  # coordinates in float64 whatever the volumes' precision
    if A.ndim == 2:
        A = A[None]
    n = int(fimg.shape[-2]) if pixels is None else int(np.shape(pixels)[0])
    # the pixels a projection fills, less the redundant half line kx = 0, ky < 0 (ALGORITHM.md §4.6.1)
    cols, ky, kx, size = slice_pixels(n, bp.grid.r_max, pixels, half_plane=True)
    if np.shape(fimg)[:1] != (len(A),) or np.size(fimg) != len(A) * size or np.shape(fweight) != np.shape(fimg):
        raise ValueError(f"insert_slices: {len(A)} rotations for slices of shape {np.shape(fimg)} and weights of "
                         f"shape {np.shape(fweight)} ({size} pixels a slice expected)")
    vals = np.asarray(fimg).reshape(len(A), size)
    wts = np.asarray(fweight).reshape(len(A), size)
    if not (bp.data.flags.c_contiguous and bp.weight.flags.c_contiguous):
        raise ValueError("insert_slices needs C-contiguous data and weight arrays (they are updated in place)")
    data, weight = bp.data.reshape(-1), bp.weight.reshape(-1)
    step = max(1, NUMPY_CHUNK_BYTES // (150 * max(1, cols.size)))
    for s in range(0, len(A), step):
        qx, qy, qz, ok = slice_points(A[s : s + step], ky, kx, bp.grid)
        w = wts[s : s + step, cols]
        ok &= w > 0  # NaN weights are skipped too
        w, v = w[ok].astype(bp.weight.dtype), vals[s : s + step, cols][ok].astype(bp.data.dtype)
        base, (fx, fy, fz), conj, (sz, sy, sx) = _corner_indices(qx[ok], qy[ok], qz[ok], bp.grid.r_pad, np)
        v = np.where(conj, np.conj(v), v)  # Friedel fold: -q and the conjugate value
        for dz, wz in ((0, 1 - fz), (1, fz)):
            for dy, wy in ((0, 1 - fy), (1, fy)):
                wzy = wz * wy
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    idx = base + (dz * sz + dy * sy + dx * sx)
                    tw = wzy * wx
                    np.add.at(data, idx, v * tw)  # in the order of the pixels: deterministic
                    np.add.at(weight, idx, w * tw)
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
