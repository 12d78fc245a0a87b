"""The padded half-complex volume layout shared by the projector, back-projector and symmetrisation.

RELION keeps a 3D transform oversampled by the padding factor p and cut to the sphere ``|q| <= r_pad`` with
``r_pad = round(p * r_max)`` (r_max in original Fourier pixels, ``current_size/2`` at most ``N/2``), stored in a
centred half-complex array of side ``P = 2 (r_pad + 1) + 1`` (RELION ``Projector::computeFourierTransformMap``):

* shape ``(P, P, r_pad + 2)``, indexed ``[z, y, x]``;
* x index = ``kx`` (0 .. r_pad + 1), y index = ``ky + r_pad + 1``, z index = ``kz + r_pad + 1``;
* voxels outside the sphere are 0, so trilinear interpolation inside the sphere never leaves the array.

Frequencies ``q`` are in padded-grid units: the 2D frequency k of an N-pixel image sits at ``q = p * A^T (kx, ky, 0)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PaddedGrid", "padded_size", "layout_shape", "layout_coordinates", "sinc2_correction", "shells_2d",
           "likelihood_pixels", "npix_per_shell"]


def padded_size(ori_size: int, padding: float) -> int:
    """``p * N`` rounded up to an even number (RELION ``Projector`` pad size rule)."""
    pn = int(np.ceil(padding * ori_size))
    return pn + (pn % 2)


@dataclass(frozen=True)
class PaddedGrid:
    """Geometry of one padded Fourier volume.

    Attributes
    ----------
    ori_size : N, the original box.
    padding : p, recomputed as ``padded_size / N`` (RELION does the same).
    r_max : Fourier radius in original pixels (``current_size // 2``, at most ``N // 2``).
    """

    ori_size: int
    padding: float
    r_max: int

    @staticmethod
    def create(ori_size: int, r_max: int | None = None, padding: float = 2.0) -> PaddedGrid:
        rm = ori_size // 2 if r_max is None else min(int(r_max), ori_size // 2)
        return PaddedGrid(ori_size, padded_size(ori_size, padding) / ori_size, rm)

    @property
    def pad_n(self) -> int:
        return int(round(self.padding * self.ori_size))

    @property
    def r_pad(self) -> int:
        return int(round(self.padding * self.r_max))

    @property
    def shape(self) -> tuple[int, int, int]:
        return layout_shape(self.r_pad)


def layout_shape(r_pad: int) -> tuple[int, int, int]:
    """Shape ``(P, P, r_pad + 2)`` of the padded half-complex layout."""
    p = 2 * (r_pad + 1) + 1
    return (p, p, r_pad + 2)


def layout_coordinates(r_pad: int, xp=np):
    """Integer frequency coordinates ``(kz, ky, kx)`` of every voxel of the layout, broadcastable arrays."""
    P, _, px = layout_shape(r_pad)
    c = r_pad + 1
    kz = (xp.arange(P) - c)[:, None, None]
    ky = (xp.arange(P) - c)[None, :, None]
    kx = xp.arange(px)[None, None, :]
    return kz, ky, kx


def sinc2_correction(n: int, pad_n: int, xp=np, ndim: int = 3, dtype=np.float64):
    """``sinc^2(|r| / pad_n)`` on an ``n``-cube centred at ``n//2`` (trilinear kernel transform; np.sinc convention).

    RELION divides maps by this before projection (``Projector::computeFourierTransformMap``) and after
    reconstruction (``BackProjector::griddingCorrect``, trilinear case).
    """
    c = xp.arange(n, dtype=dtype) - n // 2
    if ndim == 3:
        r = xp.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    else:
        r = xp.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    return xp.sinc(r / pad_n) ** 2


def shells_2d(n: int, xp=np):
    """Shell index ``floor(|k| + 0.5)`` (RELION's ROUND) of every pixel of the ``[n][n/2+1]`` window."""
    from ..conventions import freq_indices_2d

    ky, kx = freq_indices_2d(n, xp)
    return xp.floor(xp.sqrt((kx * kx + ky * ky).astype(np.float64)) + 0.5).astype(np.int64)


def likelihood_pixels(n: int, xp=np, include_dc: bool = False):
    """Boolean mask of the window pixels that enter likelihood sums (ALGORITHM.md §4.2).

    Shell ``1 <= nu <= n/2`` (``0 <= nu`` with ``include_dc``, as in the weighted sums of §4.6), and not one of the
    redundant half-plane pixels ``kx = 0, ky < 0``.
    """
    from ..conventions import freq_indices_2d

    ky, kx = freq_indices_2d(n, xp)
    sh = shells_2d(n, xp)
    lo = 0 if include_dc else 1
    return (sh >= lo) & (sh <= n // 2) & ~((kx == 0) & (ky < 0))


def cc_pixel_weights(n: int, xp=np):
    """Weight of every pixel of the ``[n][n/2+1]`` window in the cross-correlation sums of ``--firstiter_cc``.

    RELION (``getAllSquaredDifferences``, ALGORITHM.md §4.7) sums the cross term and the reference's power over every
    stored entry of the half-complex window that its projector fills, ``kx^2 + ky^2 <= (n/2)^2``, the DC term
    included, and the ``kx = 0`` column with both signs of ``ky``.  On the non-redundant pixels of
    :func:`likelihood_pixels` (``include_dc=True``) that is weight 2 for ``kx = 0, 0 < ky < n/2`` (the stored
    ``-ky`` twin adds the same), 1 for the other pixels of that circle and 0 outside it.
    """
    from ..conventions import freq_indices_2d

    ky, kx = freq_indices_2d(n, xp)
    inside = (kx * kx + ky * ky) <= (n // 2) ** 2
    twin = (kx == 0) & (ky > 0) & (ky < n // 2)
    return xp.where(inside & ~((kx == 0) & (ky < 0)), xp.where(twin, 2.0, 1.0), 0.0)


def cc_image_norm(F, n: int):
    """``sqrt`` of the image power over every stored entry of its ``[n][n/2+1]`` window (RELION's ``sqrtXi2`` of
    ``--firstiter_cc``: the whole half-complex array, corners, DC and the ``kx = 0, ky < 0`` twins included) for
    images ``F (..., N, N/2+1)``; ``(...,)`` float64."""
    from ..conventions import window_rfft2

    W = window_rfft2(F, n)
    return ((W.real.astype(np.float64) ** 2 + W.imag.astype(np.float64) ** 2).sum(axis=(-2, -1))) ** 0.5


def npix_per_shell(n: int) -> np.ndarray:
    """Number of non-redundant half-plane pixels of an ``n x n`` transform per shell 0..n/2 (RELION ``Npix``)."""
    sh = shells_2d(n)
    m = likelihood_pixels(n, include_dc=True)
    return np.bincount(sh[m], minlength=n // 2 + 1)[: n // 2 + 1]
