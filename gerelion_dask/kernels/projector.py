"""CuPy twin of :func:`gerelion_dask.ops.projector.project` (imported only for CuPy references).

One thread per pixel of the output slices (or of the rows of a pixel mask's pixels, ``pixels=``): it forms the
pixel's 3D coordinate from the slice's rotation (in float64, as NumPy does; the geometry is
:mod:`gerelion_dask.kernels.trilinear`'s), applies the same tests (inside ``min(n/2, r_max)``, ``|q| <= r_pad``),
Friedel-folds it and sums the 8 trilinear neighbours of the reference in the same order.
NumPy's formula materialises the coordinates, corner indices, fractions and eight gathered arrays of every pixel (~200
bytes a half-plane pixel, ``fine.project_row_bytes``); here only the slices (or the mask's pixels) are written.
"""

from __future__ import annotations

from functools import cache

import cupy
import numpy as np

from . import trilinear

_SRC = r"""
template <typename T>
__global__ void gerelion_project(const T* data, const double* A, const int* cols, long long R, int m, int n, int nh,
                                 int r, double pad, double lim2, int r_pad, int P, int px, T* out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= R * m) return;
    long long s;
    int ky, kx;
    slice_pixel(i, cols, m, n, nh, s, ky, kx);
    double vr = 0.0, vi = 0.0, qx, qy, qz;
    if (kx * kx + ky * ky <= r * r && slice_point(A, s, kx, ky, pad, lim2, qx, qy, qz)) {
        long long base;
        double fx, fy, fz;
        const bool conj = trilinear_corners(qx, qy, qz, r_pad, P, px, base, fx, fy, fz);
        for (int k = 0; k < 8; ++k) {
            double w;
            const long long idx = trilinear_corner(k, base, P, px, fx, fy, fz, w);
            vr += w * (double)data[2 * idx];
            vi += w * (double)data[2 * idx + 1];
        }
        if (conj) vi = -vi;
    }
    out[2 * i] = (T)vr;
    out[2 * i + 1] = (T)vi;
}
"""

_THREADS = 256


@cache
def _module():
    return cupy.RawModule(code=trilinear.SRC + _SRC, options=("-std=c++14",),
                          name_expressions=("gerelion_project<double>", "gerelion_project<float>"))


def project(ref, rotations, n: int, pixels=None):
    """CuPy twin of :func:`gerelion_dask.ops.projector.project` (``n`` given): slices ``(B, n, n//2+1)``, or with a
    boolean ``(n, n//2+1)`` mask ``pixels`` (host or device) the rows ``(B, M)`` of its pixels."""
    real = np.float64 if ref.data.dtype == np.complex128 else np.float32
    A = cupy.ascontiguousarray(cupy.asarray(rotations, dtype=np.float64))
    if A.ndim == 2:
        A = A[None]
    R, nh = int(A.shape[0]), n // 2 + 1
    cols = trilinear.pixel_columns(pixels, n)
    m = int(cols.size)
    cplx = np.complex128 if real == np.float64 else np.complex64
    out = cupy.empty((R, n, nh) if pixels is None else (R, m), cplx)
    if R == 0 or m == 0:
        return out
    data = cupy.ascontiguousarray(ref.data)
    total = R * m
    kern = _module().get_function(f"gerelion_project<{'double' if real == np.float64 else 'float'}>")
    kern(((total + _THREADS - 1) // _THREADS,), (_THREADS,),
         (data.view(real), A, cols, np.int64(R), np.int32(m), np.int32(n), np.int32(nh),
          *trilinear.grid_args(ref.grid, n), out.view(real)))
    return out
