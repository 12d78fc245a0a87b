"""Band-limited resampling of particle images onto another pixel size and box (optics groups of different grids).

RELION 3.1 refines optics groups of different pixel and box sizes together by scaling each group's projection
matrices (``ObservationModel::applyScaleDifference``): a group's Fourier pixel ``k`` of its ``N_g``-pixel images at
``a_g`` Å sits at frequency ``k / (N_g a_g)``.  Here the images of such a group are instead resampled once, as they
are read, onto the model's grid (``N_m`` pixels at ``a_m``): the group's image is taken as the trigonometric
polynomial through its pixels (its DFT, the Nyquist term halved) and that function is sampled at the model's pixel
positions, keeping only frequencies the model's grid holds (``|f| <= 1 / (2 a_m)``; a frequency exactly at the
model's Nyquist at half weight).  The 2D interpolant is separable, so one ``(N_m, N_g)`` matrix ``M`` per group does
it: ``out = M img M^T``.

Positions are measured from each box's centre pixel ``N/2`` (RELION's origin), so the physical position of every
pixel, and so every particle's offset in Å, is kept.  Model pixels outside the group's box (a smaller physical box;
beyond half a pixel past its edge pixels) are 0: there is no data there.  The particle's mask should lie inside
every group's box (``setup_job`` warns otherwise).

Values are kept in real space (a pixel of the same density keeps its value).  RELION's scaled Fourier sampling
keeps instead each group's own FFT normalisation, ``1 / N_g^2``, so a group whose physical box ``N_g a_g`` differs
from the model's enters RELION's sums at ``(N_m a_m / N_g a_g)^2`` times our amplitude; per-group intensity scales
(``--scale``) absorb such a constant in a refinement.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_xp

__all__ = ["resample_matrix", "resample_images"]


def resample_matrix(n_from: int, a_from: float, n_to: int, a_to: float) -> np.ndarray:
    """``(n_to, n_from)`` float64: row ``j`` interpolates the ``n_from`` samples (spacing ``a_from`` Å, centre pixel
    ``n_from // 2``) at the position ``(j - n_to // 2) a_to`` Å, band-limited to ``1 / (2 a_to)``.

    The interpolant is ``sum_k w_k c_k exp(2 pi i k t / n)`` over the source's DFT coefficients ``c_k``, ``|k| <=
    n/2``, with ``w = 1/2`` at the source's Nyquist (even ``n``) and at a frequency exactly at the target's Nyquist,
    0 beyond the target's Nyquist.  Same grids give the identity.  Rows whose position lies more than half a source
    pixel beyond the source's edge pixels are 0."""
    if n_from < 1 or n_to < 1 or not (a_from > 0 and a_to > 0):
        raise ValueError(f"resample_matrix needs positive sizes and pixel sizes, got {n_from}, {a_from}, {n_to}, "
                         f"{a_to}")
    # target positions in source pixels, relative to the source's centre pixel
    t = (np.arange(n_to) - n_to // 2) * (a_to / a_from)
    src = np.arange(n_from) - n_from // 2
    # frequencies k = 0 .. n_from/2 in cycles per source box; the target keeps |k| / (n_from a_from) <= 1 / (2 a_to)
    k = np.arange(n_from // 2 + 1, dtype=np.float64)
    k_to = n_from * a_from / (2.0 * a_to)
    w = np.where(k < k_to - 1e-9, 1.0, np.where(np.abs(k - k_to) <= 1e-9, 0.5, 0.0))
    if n_from % 2 == 0:
        w[-1] = min(w[-1], 0.5)  # the source's Nyquist: cos only (the real interpolant)
    w[1:] *= 2.0  # the +k and -k terms together
    # cos(2 pi k (t - s) / n) = cos(.t) cos(.s) + sin(.t) sin(.s): two (n_to, K) x (K, n_from) products
    at, as_ = 2.0 * np.pi * t[:, None] * k / n_from, 2.0 * np.pi * src[:, None] * k / n_from
    m = ((np.cos(at) * w) @ np.cos(as_).T + (np.sin(at) * w) @ np.sin(as_).T) / n_from
    lo, hi = src[0] - 0.5, src[-1] + 0.5
    m[(t < lo - 1e-9) | (t > hi + 1e-9)] = 0.0
    return m


def resample_images(images, m):
    """``images (B, n_from, n_from)`` -> ``(B, n_to, n_to)`` = ``m @ img @ m^T`` per image, in the images' array
    module and precision (``m`` from :func:`resample_matrix`, cast to it)."""
    xp = get_xp(images)
    mm = xp.asarray(m, dtype=images.dtype)
    return xp.matmul(xp.matmul(mm, images), mm.T)
