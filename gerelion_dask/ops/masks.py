"""Soft masks with RELION's raised-cosine edge (RELION ``softMaskOutsideMap`` and the solvent sphere).

Radii are in pixels from the origin (``N//2`` per axis).  The edge lies *outside* the radius: ``r <= R`` keeps the
value, ``r >= R + W`` takes the background, in between the weight of the background is
``h = 1/2 - 1/2 cos(pi (r - R) / W)`` (0 at R, 1 at R + W).
"""

from __future__ import annotations

import numpy as np

from ..backend import get_xp

__all__ = ["average_region", "radius_grid", "soft_edge", "soft_sphere", "soft_mask_outside", "noise_fill_background"]


def radius_grid(n: int, ndim: int, xp=np, dtype=np.float64, origin: int | None = None):
    """Distance of every pixel/voxel of an ``n``-box from ``origin`` (default ``n//2``)."""
    o = n // 2 if origin is None else origin
    c = xp.arange(n, dtype=dtype) - o
    if ndim == 2:
        return xp.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    return xp.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)


def soft_edge(r, radius: float, width: float):
    """Background weight ``h(r)``: 0 inside ``radius``, raised cosine to 1 at ``radius + width``."""
    xp = get_xp(r)
    if width <= 0:
        return (r > radius).astype(r.dtype)
    h = 0.5 - 0.5 * xp.cos(np.pi * (r - radius) / width)
    return xp.where(r <= radius, 0.0, xp.where(r >= radius + width, 1.0, h))


def soft_sphere(n: int, radius: float, width: float = 5.0, ndim: int = 3, xp=np, dtype=np.float64):
    """Solvent mask: 1 inside ``radius``, raised cosine to 0 over ``width`` pixels (``--flatten_solvent``)."""
    return 1.0 - soft_edge(radius_grid(n, ndim, xp, dtype), radius, width)


def soft_mask_outside(x, radius: float | None = None, width: float = 3.0, origin: int | None = None,
                      batch_2d: bool = False):
    """Replace everything outside ``radius`` by the mean background, blending over ``width`` pixels.

    Works on one image/map or a batch ``(B, ...)``; the background of each item is the h-weighted mean of its
    pixels at ``r > radius`` (``--zero_mask`` on particles; corner masking of reconstructions with the default
    radius ``N/2`` and width 3, as RELION's ``softMaskOutsideMap``).  A ``(n, n, n)`` array is taken as one map
    unless ``batch_2d`` says it is a stack of n images.
    """
    xp = get_xp(x)
    n = x.shape[-1]
    ndim = 3 if (x.ndim == 4 or (x.ndim == 3 and x.shape == (n, n, n) and not batch_2d)) else 2
    R = n / 2.0 if radius is None else float(radius)
    real = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    h = soft_edge(radius_grid(n, ndim, xp, real, origin), R, width)
    return average_region(x, h, ndim)


def average_region(x, h, ndim: int | None = None):
    """``(1 - h) x + h <x>_h``: the region of the soft mask ``h`` (1 inside, values in [0, 1]) set to the
    ``h``-weighted mean of ``x`` there, blended over its edge, per item of a batch over the last ``ndim`` axes (default
    ``h.ndim``).  RELION's ``softMaskOutsideMap`` (``h`` the outside of a sphere: the background; with
    ``--solvent_mask2``, that mask's region of each reference)."""
    nd = h.ndim if ndim is None else ndim
    axes = tuple(range(-nd, 0))
    bg = (x * h).sum(axis=axes, keepdims=True) / h.sum()
    out = x * (1.0 - h)  # one image-sized temporary besides the result (a pool of images at a time)
    out += bg * h
    return out


def noise_fill_background(x, noise, radius: float, width: float, origin: int | None = None):
    """Blend images ``x`` into ``noise`` (same shape) outside ``radius`` (RELION's mask without --zero_mask)."""
    xp = get_xp(x)
    n = x.shape[-1]
    h = soft_edge(radius_grid(n, 2, xp, x.dtype, origin), radius, width)
    out = x * (1.0 - h)  # one image-sized temporary besides the result
    out += noise * h
    return out
