"""RELION's geometric conventions, in one place.

Checked against RELION 3.1.3 output in ``tests/test_conventions.py`` and ``tests/test_relion_golden.py``
(../shared/data/golden, made by ``relion_project``):

* Euler angles are ZYZ (rot, tilt, psi, degrees); ``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` with
  ``Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]`` and ``Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]``.
  ``A`` maps map coordinates to image coordinates; a projection is ``P(x, y) = sum_z V(A^T (x, y, z))``.
* Maps are ``[z, y, x]`` (x fastest) with their origin at voxel ``N//2``.  Even 2D images have their origin at
  pixel ``N//2``.  RELION 3.1 puts the origin of an odd 2D image at ``N//2 + 1`` (its CenterFFT is fftshift before
  forward transforms); :func:`image_origin` reproduces that.  Reconstruction and refinement refuse odd boxes
  (RELION's ``relion_reconstruct`` cannot reconstruct them either, golden/README.md).
* Origin offsets ``rlnOriginX/YAngst`` = o (Å; pixels = o / pixel size): the particle centre sits at
  ``origin - o``; shifting the image by ``+o`` centres it.  In Fourier space a shift of an image by ``s`` pixels is
  ``X(k) * exp(-2 pi i k.s / N)`` (N = original box).
* Forward transforms are normalised by the number of real-space samples of the *image* (``1/N^2``) and taken about
  the origin ("centred"); the half-complex layout is NumPy's ``rfftn`` layout ``[N][N/2+1]`` with logical
  frequency ``ky = i`` for ``i <= N/2`` else ``i - N`` (so the Nyquist row is ``+N/2``, as in RELION).
* Windowing to a current size ``n`` keeps ``kx in [0, n/2]`` and ``ky in [-n/2+1, n/2]``; frequencies stay in units
  of the original box.
"""

from __future__ import annotations

import numpy as np

from .backend import get_xp

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "image_origin",
    "centred_rfft2",
    "centred_irfft2",
    "centred_rfftn",
    "centred_irfftn",
    "freq_indices_2d",
    "window_rfft2",
    "pad_rfft2",
    "shift_phase",
    "shift_phase_2d",
    "angst_to_px",
    "px_to_angst",
]


def euler_to_matrix(rot, tilt, psi):
    """RELION ZYZ Euler angles (degrees, scalars or arrays of one shape) -> rotation matrices ``(..., 3, 3)``.

    The backend follows the inputs; float64 unless the inputs are float32 arrays.
    """
    xp = get_xp(rot, tilt, psi)
    rot, tilt, psi = (xp.deg2rad(xp.asarray(a, dtype=xp.float64)) for a in (rot, tilt, psi))
    ca, sa = xp.cos(rot), xp.sin(rot)
    cb, sb = xp.cos(tilt), xp.sin(tilt)
    cg, sg = xp.cos(psi), xp.sin(psi)
    cc, cs = cb * ca, cb * sa
    sc, ss = sb * ca, sb * sa
    rows = [
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ]
    return xp.stack([xp.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_euler(A):
    """Rotation matrices ``(..., 3, 3)`` -> RELION (rot, tilt, psi) in degrees, each in [-180, 180].

    Follows RELION's ``Euler_matrix2angles``: tilt from ``atan2(sqrt(A02^2 + A12^2), A22)`` (tilt in [0, 180]);
    at the gimbal poles (``sin(tilt) ~ 0``) rot is set to 0 and the in-plane angle goes to psi.
    """
    xp = get_xp(A)
    A = xp.asarray(A, dtype=xp.float64)
    abs_sb = xp.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    tilt = xp.arctan2(abs_sb, A[..., 2, 2])
    regular = abs_sb > 16 * np.finfo(np.float32).eps
    rot = xp.where(regular, xp.arctan2(A[..., 2, 1], A[..., 2, 0]), 0.0)
    psi_reg = xp.arctan2(A[..., 1, 2], -A[..., 0, 2])
    # poles (rot := 0): tilt 0 -> A = Rz(psi); tilt 180 -> A = Rz(psi) @ Ry(180), so A00 = -cos psi, A01 = sin psi
    north = A[..., 2, 2] >= 0
    psi_pole = xp.where(north, xp.arctan2(A[..., 0, 1], A[..., 0, 0]), xp.arctan2(A[..., 0, 1], -A[..., 0, 0]))
    psi = xp.where(regular, psi_reg, psi_pole)
    tilt = xp.where(regular, tilt, xp.where(north, 0.0, np.pi))
    return xp.rad2deg(rot), xp.rad2deg(tilt), xp.rad2deg(psi)


def image_origin(n: int) -> int:
    """Origin pixel of an ``n x n`` RELION 3.1 image: ``n//2`` for even n, ``n//2 + 1`` for odd n (RELION quirk)."""
    return n // 2 if n % 2 == 0 else n // 2 + 1


def centred_rfft2(img, origin: int | None = None):
    """Centred, ``1/N^2``-normalised rfft of images ``(..., N, N)`` -> ``(..., N, N//2+1)`` complex."""
    xp = get_xp(img)
    n = img.shape[-1]
    o = image_origin(n) if origin is None else origin
    out = xp.fft.rfft2(xp.roll(img, (-o, -o), axis=(-2, -1)))  # the rolled copy is freed here
    out /= n * n  # in place: a pool's transforms are ~0.25 GiB at 256 px
    return out


def centred_irfft2(F, n: int, origin: int | None = None):
    """Inverse of :func:`centred_rfft2` for images of size ``n``."""
    xp = get_xp(F)
    o = image_origin(n) if origin is None else origin
    img = xp.fft.irfft2(F, s=(n, n)) * (n * n)
    return xp.roll(img, (o, o), axis=(-2, -1))


def centred_rfftn(vol):
    """Centred rfftn of a cube ``(N, N, N)`` about voxel ``N//2``, normalised by ``1/N^3``."""
    xp = get_xp(vol)
    n = vol.shape[-1]
    o = n // 2
    return xp.fft.rfftn(xp.roll(vol, (-o, -o, -o), axis=(-3, -2, -1)), axes=(-3, -2, -1)) / n**3


def centred_irfftn(F, n: int):
    """Inverse of :func:`centred_rfftn`."""
    xp = get_xp(F)
    o = n // 2
    v = xp.fft.irfftn(F, s=(n, n, n), axes=(-3, -2, -1)) * n**3
    return xp.roll(v, (o, o, o), axis=(-3, -2, -1))


def freq_indices_2d(n: int, xp=np):
    """Integer logical frequencies ``(ky, kx)`` of the ``[n][n/2+1]`` half-complex layout (RELION's Nyquist +n/2)."""
    i = xp.arange(n)
    ky = xp.where(i <= n // 2, i, i - n)
    kx = xp.arange(n // 2 + 1)
    return ky[:, None] * xp.ones((1, n // 2 + 1), dtype=ky.dtype), xp.ones((n, 1), dtype=kx.dtype) * kx[None, :]


def window_rfft2(F, n: int):
    """Crop a half-complex array ``(..., N, N/2+1)`` to the window of size ``n <= N`` (even n)."""
    N = F.shape[-2]
    if n == N:
        return F
    if n > N:
        return pad_rfft2(F, n)
    xp = get_xp(F)
    h = n // 2
    top = F[..., : h + 1, : h + 1]
    bottom = F[..., N - h + 1 :, : h + 1]
    return xp.concatenate([top, bottom], axis=-2)


def pad_rfft2(F, N: int):
    """Put a window ``(..., n, n/2+1)`` into a zero array ``(..., N, N/2+1)`` (inverse of :func:`window_rfft2`)."""
    n = F.shape[-2]
    if n == N:
        return F
    xp = get_xp(F)
    out = xp.zeros(F.shape[:-2] + (N, N // 2 + 1), dtype=F.dtype)
    h = n // 2
    out[..., : h + 1, : h + 1] = F[..., : h + 1, :]
    out[..., N - h + 1 :, : h + 1] = F[..., h + 1 :, :]
    return out


def shift_phase_2d(shape_n: int, ori_size: int, shifts_px, xp=None):
    """Phase factors ``exp(-2 pi i (kx sx + ky sy) / N)`` that shift images by ``s`` pixels.

    Parameters
    ----------
    shape_n : window size n of the half-complex array ``[n][n/2+1]``.
    ori_size : original box N (frequencies are k/N whatever the window).
    shifts_px : ``(..., 2)`` shifts (sx, sy) in pixels.

    Returns ``(..., n, n/2+1)`` complex array.  To *centre* a particle with origin offset o, shift by ``+o``.
    """
    xp = xp or get_xp(shifts_px)
    ky, kx = freq_indices_2d(shape_n, xp)
    return shift_phase(kx, ky, ori_size, shifts_px, xp)


def shift_phase(kx, ky, ori_size: int, shifts_px, xp=None):
    """:func:`shift_phase_2d` at chosen pixels only: the integer frequencies ``kx``, ``ky`` (equal shapes, e.g. the
    ``(M,)`` pixels of a mask, in the backend of the result) -> ``(..., *kx.shape)`` for shifts ``(..., 2)``; the
    same values as the whole window's at those pixels."""
    xp = xp or get_xp(shifts_px)
    s = xp.asarray(shifts_px, dtype=xp.float64)
    tail = (1,) * kx.ndim
    sx, sy = s[..., 0].reshape(s.shape[:-1] + tail), s[..., 1].reshape(s.shape[:-1] + tail)
    return xp.exp(1j * ((kx * sx + ky * sy) * (-2.0 * np.pi / ori_size)))


def angst_to_px(value_angst, pixel_size: float):
    """Origin offset Å -> pixels."""
    return value_angst / pixel_size


def px_to_angst(value_px, pixel_size: float):
    """Origin offset pixels -> Å."""
    return value_px * pixel_size
