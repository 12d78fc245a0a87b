"""The central-slice geometry shared by the projection and insertion kernels (CUDA source and launch arguments).

The CUDA twin of ``ops.projector.slice_pixels``, ``slice_points`` and ``_corner_indices``: a thread's pixel of a
stack of slices, its 3D coordinate in the padded grid (float64 whatever the volume's precision), the Friedel fold and
the 8 trilinear corners with their weights, in NumPy's order (``dz``, ``dy``, ``dx``; weight ``wz * wy * wx``).
:mod:`gerelion_dask.kernels.projector` gathers from the corners, :mod:`gerelion_dask.kernels.backproject` adds to them.
"""

from __future__ import annotations

import numpy as np

SRC = r"""
// thread i's pixel of an (R, m) stack of rows: slice s and logical frequencies (ky, kx), RELION's Nyquist +n/2.
// A row holds the pixels cols[0..m) of the (n, nh) half plane (flat C-order indices)
__device__ __forceinline__ void slice_pixel(long long i, const int* cols, int m, int n, int nh, long long& s, int& ky,
                                            int& kx) {
    s = i / m;
    const int f = cols[i - s * m];
    kx = f % nh;
    const int iy = f / nh;
    ky = iy <= n / 2 ? iy : iy - n;
}

// q = pad A^T (kx, ky, 0) of slice s's rotation A (row-major 3x3); false beyond |q|^2 <= lim2 (r_pad^2 + 1e-6)
__device__ __forceinline__ bool slice_point(const double* A, long long s, int kx, int ky, double pad, double lim2,
                                            double& qx, double& qy, double& qz) {
    const double* a = A + 9 * s;
    const double fkx = (double)kx, fky = (double)ky;
    qx = pad * (a[0] * fkx + a[3] * fky);
    qy = pad * (a[1] * fkx + a[4] * fky);
    qz = pad * (a[2] * fkx + a[5] * fky);
    return qx * qx + qy * qy + qz * qz <= lim2;
}

// Friedel-folded trilinear corners of q in the (P, P, px) layout: the first corner's flat index and the fractions;
// returns whether q was folded (the value is then conjugated)
__device__ __forceinline__ bool trilinear_corners(double qx, double qy, double qz, int r_pad, int P, int px,
                                                  long long& base, double& fx, double& fy, double& fz) {
    const bool conj = qx < 0.0;
    if (conj) { qx = -qx; qy = -qy; qz = -qz; }
    const double c = (double)(r_pad + 1);
    const double x = qx, y = qy + c, z = qz + c;
    const double x0f = floor(x), y0f = floor(y), z0f = floor(z);
    fx = x - x0f; fy = y - y0f; fz = z - z0f;
    const long long x0 = min(max((long long)x0f, 0LL), (long long)(px - 2));
    const long long y0 = min(max((long long)y0f, 0LL), (long long)(P - 2));
    const long long z0 = min(max((long long)z0f, 0LL), (long long)(P - 2));
    base = (z0 * P + y0) * px + x0;
    return conj;
}

// corner k = 4 dz + 2 dy + dx: its flat index, and its weight wz * wy * wx in w
__device__ __forceinline__ long long trilinear_corner(int k, long long base, int P, int px, double fx, double fy,
                                                      double fz, double& w) {
    const int dz = k >> 2, dy = (k >> 1) & 1, dx = k & 1;
    w = (dz ? fz : 1.0 - fz) * (dy ? fy : 1.0 - fy) * (dx ? fx : 1.0 - fx);
    return base + (long long)dz * P * px + (long long)dy * px + dx;
}
"""


def grid_args(grid, n: int) -> tuple:
    """The kernels' geometry arguments for ``n``-px slices on the padded grid ``grid``: ``(r, pad, lim2, r_pad, P,
    px)`` (``r = min(n/2, r_max)``, as ``ops.projector.slice_pixels``)."""
    from ..ops.fourier import layout_shape

    P, _, px = layout_shape(grid.r_pad)
    return (np.int32(min(n // 2, grid.r_max)), np.float64(grid.padding), np.float64(grid.r_pad**2 + 1e-6),
            np.int32(grid.r_pad), np.int32(P), np.int32(px))


def pixel_columns(pixels, n: int):
    """The kernels' ``cols``: the flat C-order indices (int32, on the device) of the pixels of a boolean ``(n,
    n//2+1)`` mask ``pixels``, or of every pixel for whole slices (``None``).  A mask on the host is indexed there (no
    device synchronisation); one on the device costs one, as boolean indexing does."""
    import cupy

    if pixels is None:
        return cupy.arange(n * (n // 2 + 1), dtype=np.int32)
    if tuple(pixels.shape) != (n, n // 2 + 1):
        raise ValueError(f"pixel mask of shape {tuple(pixels.shape)} for {n}-px slices (expected {(n, n // 2 + 1)})")
    if isinstance(pixels, np.ndarray):
        return cupy.asarray(np.flatnonzero(pixels).astype(np.int32))
    return cupy.flatnonzero(pixels).astype(np.int32)
