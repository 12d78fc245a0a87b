"""Central-slice extraction from a padded 3D Fourier transform (RELION ``Projector``).

``make_reference`` builds the padded transform of a map (ALGORITHM.md §1.2): divide by the trilinear kernel
transform ``sinc^2(|r| / (pN))``, zero-pad to ``pN``, centred forward FFT scaled by ``1/N^2`` (so a central slice
is the ``1/N^2``-normalised 2D transform of a projection), keep ``|q| <= round(p r_max)``.

``project`` extracts slices for a batch of rotations by trilinear interpolation with the Friedel rule (§1.5),
filling only ``kx^2 + ky^2 <= r^2`` with ``r = min(n/2, r_max)``.  Checked against ``relion_project`` images
(``tests/test_relion_golden.py``: max relative error ~1e-6 on all 12 golden rows at box 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import get_xp
from ..conventions import freq_indices_2d
from .fourier import PaddedGrid, layout_shape, sinc2_correction

__all__ = ["FourierReference", "ReferenceSpec", "make_reference", "project", "slice_pixels", "slice_points",
           "trilinear_gather", "reference_power_spectrum"]


@dataclass(frozen=True)
class FourierReference:
    """A padded, sphere-cut 3D Fourier transform in the layout of :mod:`gerelion_dask.ops.fourier`."""

    data: object  # (P, P, r_pad + 2) complex
    grid: PaddedGrid


@dataclass(frozen=True, eq=False)
class ReferenceSpec:
    """A reference transform still to be made: the real-space map and :func:`make_reference`'s parameters.

    What an iteration sends to its workers instead of the transform, which each builds on its own device
    (:meth:`build`): the map is ``N^3`` real values, the padded transform ``~(2pr)^2 (pr)`` complex ones (8x the bytes
    at ``p = 2`` and full size: 1 GiB at box 256), and a GPU makes it in milliseconds where the driver's NumPy took
    seconds.
    """

    volume: object  # (N, N, N) real map, origin at voxel N//2
    r_max: int | None = None
    padding: float = 2.0
    min_ires: int = 0  # --strict_lowres_exp: shells up to this one are zeroed (make_reference)

    def build(self, xp=None) -> FourierReference:
        """The transform on ``xp`` (default: the map's own array module)."""
        v = self.volume if xp is None else xp.asarray(self.volume)
        return make_reference(v, r_max=self.r_max, padding=self.padding, min_ires=self.min_ires)

    def __sizeof__(self) -> int:
        return 64 + int(getattr(self.volume, "nbytes", 0))


def make_reference(volume, r_max: int | None = None, padding: float = 2.0, *, dtype=None,
                   min_ires: int = 0) -> FourierReference:
    """Padded 3D transform of a real map ``(N, N, N)`` (origin at voxel N//2), cut to ``r_max`` shells.

    ``dtype`` defaults to complex128 for float64 input and complex64 otherwise.  ``min_ires`` > 0
    (``--strict_lowres_exp``): the padded transform is zero where ``|q|^2 <= ROUND(min_ires p)^2``, as RELION's
    ``computeFourierTransformMap`` high-passes the E-step's references (after their power spectrum, which
    :func:`reference_power_spectrum` callers take from a reference without it).
    """
    xp = get_xp(volume)
    n = volume.shape[-1]
    if volume.shape != (n, n, n):
        raise ValueError(f"reference map must be a cube, got shape {volume.shape}")
    grid = PaddedGrid.create(n, r_max, padding)
    pad_n = grid.pad_n
    if dtype is None:
        dtype = xp.complex128 if volume.dtype == np.float64 else xp.complex64
    real_dtype = np.float64 if np.dtype(dtype) == np.complex128 else np.float32
    v = volume.astype(real_dtype) / sinc2_correction(n, pad_n, xp, dtype=real_dtype)
    F = _padded_transform(v, pad_n, grid.r_pad, xp)
    del v
    F /= n * n
    min_r2 = int(np.floor(min_ires * padding + 0.5)) ** 2 if min_ires > 0 else -1
    return FourierReference(_to_layout(F.astype(dtype, copy=False), grid.r_pad, min_r2), grid)


def _padded_transform(v, pad_n: int, r_pad: int, xp):
    """The part of ``rfftn`` of the zero-padded map (origin rolled to voxel 0) that the layout keeps: planes and rows
    ``k % pad_n`` for ``|k| <= r_pad + 1`` and columns ``kx <= min(r_pad + 1, pad_n // 2)``.

    ``rfftn`` transforms along x, then y, then z; here each of those 1D transforms runs only on the lines that hold
    data (the map occupies ``n`` of ``pad_n`` rows along each axis, everything else is zero) and only the outputs
    the next step or the layout uses are kept.  Every kept value is the full transform's: each line goes through
    the same 1D transform with the same input (bit-identical on NumPy, ``tests/test_ops.py``), at about a fifth of
    the work of the full transform for small ``r_pad``.
    """
    n = v.shape[0]
    rows = xp.asarray((np.arange(n) - n // 2) % pad_n)  # where the map's rows land once the origin is at voxel 0
    c = r_pad + 1
    keep = xp.asarray(np.arange(-c, c + 1) % pad_n)
    nkx = min(c, pad_n // 2) + 1
    # each intermediate is dropped as soon as the next holds its values: at box 256 they are 0.3-1.1 GB each, and a
    # GPU worker makes its references beside a pool's E-step
    line = xp.zeros(v.shape[:2] + (pad_n,), dtype=v.dtype)
    line[..., rows] = v
    a = xp.fft.rfft(line, axis=2)[..., :nkx]  # (n, n, nkx): x, on the n^2 lines with data
    del line
    plane = xp.zeros((n, pad_n, nkx), dtype=a.dtype)
    plane[:, rows, :] = a
    del a
    b = xp.fft.fft(plane, axis=1)[:, keep, :]  # y, on the n planes with data
    del plane
    vol = xp.zeros((pad_n,) + b.shape[1:], dtype=b.dtype)
    vol[rows] = b
    del b
    vol = xp.fft.fft(vol, axis=0)  # z
    return vol[keep]  # (2c+1, 2c+1, nkx)


def _to_layout(F, r_pad: int, min_r2: int = -1):
    """The centred layout of the sphere ``|q| <= r_pad`` from :func:`_padded_transform`'s output, zero where
    ``|q|^2 <= min_r2`` (``--strict_lowres_exp``)."""
    xp = get_xp(F)
    c = r_pad + 1
    _, _, px = layout_shape(r_pad)
    out = F  # F holds columns kx <= min(c, pad_n // 2); only at full size is that one short of the layout's c
    if F.shape[2] < px:  # and the missing column kx = c lies outside the sphere anyway: zeros
        out = xp.zeros(F.shape[:2] + (px,), dtype=F.dtype)
        out[:, :, : F.shape[2]] = F
    k = xp.arange(-c, c + 1, dtype=xp.int32)
    kx = xp.arange(px, dtype=xp.int32)
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2
    out[(r2 > r_pad * r_pad) | (r2 <= min_r2)] = 0  # in place
    return out


def slice_pixels(n: int, r_max: int, pixels=None, half_plane: bool = False):
    """The pixels of an ``n``-px half-complex slice that a projection fills: ``(cols, ky, kx, size)``, ``cols``
    their positions among the ``size`` pixels of the mask ``pixels`` (default: the whole ``(n, n//2+1)`` slice) in C
    order and ``ky``, ``kx`` their frequencies (float64), those with ``kx^2 + ky^2 <= min(n/2, r_max)^2``; with
    ``half_plane`` also without the redundant pixels ``kx = 0, ky < 0`` (back-projection and likelihood sums)."""
    ky, kx = freq_indices_2d(n, np)
    ky, kx = ky.reshape(-1), kx.reshape(-1)
    if pixels is not None:
        flat = np.asarray(pixels).reshape(-1)
        ky, kx = ky[flat], kx[flat]
    r = min(n // 2, r_max)
    keep = kx * kx + ky * ky <= r * r
    if half_plane:
        keep &= ~((kx == 0) & (ky < 0))
    cols = np.flatnonzero(keep)
    return cols, ky[cols].astype(np.float64), kx[cols].astype(np.float64), ky.size


def slice_points(A, ky, kx, grid: PaddedGrid):
    """3D padded-grid coordinates ``q = p A^T (kx, ky, 0)`` of the pixels ``(ky, kx)`` of :func:`slice_pixels` for
    rotations ``A (B, 3, 3)``: ``(qx, qy, qz, valid)``, each ``(B, len(kx))``, ``valid`` where ``|q| <= r_pad``."""
    p = grid.padding
    qx = p * (A[:, 0, 0, None] * kx + A[:, 1, 0, None] * ky)
    qy = p * (A[:, 0, 1, None] * kx + A[:, 1, 1, None] * ky)
    qz = p * (A[:, 0, 2, None] * kx + A[:, 1, 2, None] * ky)
    return qx, qy, qz, (qx * qx + qy * qy + qz * qz) <= grid.r_pad**2 + 1e-6


def _corner_indices(qx, qy, qz, r_pad: int, xp):
    """Friedel-folded trilinear corners of the points ``(qx, qy, qz)``: (flat base index, fractions fx fy fz, conj
    flag, strides)."""
    P, _, px = layout_shape(r_pad)
    conj = qx < 0
    s = xp.where(conj, -1.0, 1.0).astype(qx.dtype)
    c = r_pad + 1
    x, y, z = qx * s, qy * s + c, qz * s + c
    x0, y0, z0 = xp.floor(x), xp.floor(y), xp.floor(z)
    fx, fy, fz = x - x0, y - y0, z - z0
    x0 = xp.clip(x0.astype(xp.int64), 0, px - 2)
    y0 = xp.clip(y0.astype(xp.int64), 0, P - 2)
    z0 = xp.clip(z0.astype(xp.int64), 0, P - 2)
    base = (z0 * P + y0) * px + x0
    return base, (fx, fy, fz), conj, (P * px, px, 1)


def trilinear_gather(data, qx, qy, qz, valid):
    """Trilinear interpolation of a layout array at the points ``(qx, qy, qz)`` (arrays of one shape); 0 where not
    ``valid``."""
    xp = get_xp(data, qx)
    r_pad = data.shape[-1] - 2
    base, (fx, fy, fz), conj, (sz, sy, sx) = _corner_indices(qx, qy, qz, r_pad, xp)
    flat = data.reshape(-1)
    out = xp.zeros(qx.shape, dtype=data.dtype)
    for dz, wz in ((0, 1 - fz), (1, fz)):
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                out += (wz * wy * wx) * flat[base + dz * sz + dy * sy + dx * sx]
    out = xp.where(conj, xp.conj(out), out)
    return xp.where(valid, out, 0)


def project(ref: FourierReference, rotations, n: int | None = None, pixels=None):
    """Central slices ``(B, n, n//2+1)`` of ``ref`` for rotation matrices ``(B, 3, 3)`` (RELION
    ``get2DFourierTransform``); with ``pixels``, a boolean ``(n, n//2+1)`` mask, only those pixels: ``(B, M)``.

    ``n`` defaults to ``2 * r_max``.  The result is in the windowed half-complex layout of
    :func:`gerelion_dask.conventions.window_rfft2`; frequencies are in units of the original box.  On CuPy one
    kernel (:mod:`gerelion_dask.kernels.projector`).
    """
    xp = get_xp(ref.data)
    n = 2 * ref.grid.r_max if n is None else n
    if xp is not np:
        from ..kernels.projector import project as twin

        return twin(ref, rotations, n, pixels)
    A = np.asarray(rotations, dtype=np.float64)  # coordinates in float64 whatever the reference's precision
    if A.ndim == 2:
        A = A[None]
    cols, ky, kx, size = slice_pixels(n, ref.grid.r_max, pixels)
    qx, qy, qz, valid = slice_points(A, ky, kx, ref.grid)
    values = trilinear_gather(ref.data, qx, qy, qz, valid)
    if cols.size == size:
        out = values
    else:  # pixels beyond the projector's circle are 0
        out = np.zeros((len(A), size), values.dtype)
        out[:, cols] = values
    return out.reshape(len(A), n, n // 2 + 1) if pixels is None else out


def reference_power_spectrum(ref: FourierReference):
    """tau^2 of a reference: per original shell, mean of ``|V(q)|^2 / 2`` over stored voxels with
    ``round(|q| / p) = shell`` (RELION records it while building the projector).  Returns ``(r_max + 1,)`` float64.
    """
    xp = get_xp(ref.data)
    from .fourier import layout_coordinates

    kz, ky, kx = layout_coordinates(ref.grid.r_pad, xp)
    r = xp.sqrt((kz * kz + ky * ky + kx * kx).astype(np.float64))
    inside = r <= ref.grid.r_pad
    shell = xp.floor(r / ref.grid.padding + 0.5).astype(np.int64)
    nsh = ref.grid.r_max + 1
    sel = inside & (shell < nsh)
    p2 = (xp.abs(ref.data) ** 2 / 2).astype(np.float64)
    sums = xp.bincount(shell[sel], weights=p2[sel], minlength=nsh)[:nsh]
    cnt = xp.bincount(shell[sel], minlength=nsh)[:nsh]
    return sums / xp.maximum(cnt, 1)
