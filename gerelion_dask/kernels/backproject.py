"""CuPy twin of :func:`gerelion_dask.ops.backprojector.insert_slices` (imported only for CuPy arrays).

One thread per slice pixel (whole slices, or rows of a pixel mask's pixels: ``pixels=``): it forms the pixel's 3D
coordinate from the slice's rotation (in float64, as NumPy does, whatever the volumes' precision; the geometry is
:mod:`gerelion_dask.kernels.trilinear`'s), applies the same tests (inside ``min(n/2, r_max)``, half plane, ``|q| <=
r_pad``, weight > 0), Friedel-folds it, and adds its value and weight to the 8 trilinear neighbours with atomic adds.
The NumPy formula materialises the coordinates, corners, fractions and scattered values of its pixels (~150 bytes a
pixel; NumPy takes a few MiB of pixels at a time) and CuPy's ``add.at`` ran 16 scatters over all of them; here
nothing but the volumes is written.  Sums are equal up to float rounding and the order the atomics land in (as the
``add.at`` path's were).
"""

from __future__ import annotations

from functools import cache

import cupy
import numpy as np

from . import trilinear

_SRC = r"""
template <typename T>
__global__ void gerelion_insert_slices(const double* A, const T* img, const T* wgt, const int* cols, long long R, int m,
                                       int n, int nh, int r, double pad, double lim2, int r_pad, int P, int px,
                                       T* data, T* weight) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= R * m) return;
    long long s;
    int ky, kx;
    slice_pixel(i, cols, m, n, nh, s, ky, kx);
    if (kx * kx + ky * ky > r * r || (kx == 0 && ky < 0)) return;
    const T w = wgt[i];
    if (!(w > (T)0)) return;
    double qx, qy, qz, fx, fy, fz;
    if (!slice_point(A, s, kx, ky, pad, lim2, qx, qy, qz)) return;
    long long base;
    const bool conj = trilinear_corners(qx, qy, qz, r_pad, P, px, base, fx, fy, fz);
    const T vr = img[2 * i], vi = conj ? -img[2 * i + 1] : img[2 * i + 1];
    for (int k = 0; k < 8; ++k) {
        double tw_;
        const long long idx = trilinear_corner(k, base, P, px, fx, fy, fz, tw_);
        const T tw = (T)tw_;
        atomicAdd(data + 2 * idx, vr * tw);
        atomicAdd(data + 2 * idx + 1, vi * tw);
        atomicAdd(weight + idx, w * tw);
    }
}
"""

_THREADS = 256


@cache
def _module():
    return cupy.RawModule(code=trilinear.SRC + _SRC, options=("-std=c++14",),
                          name_expressions=("gerelion_insert_slices<double>", "gerelion_insert_slices<float>"))


def insert_slices(bp, rotations, fimg, fweight, pixels=None):
    """CuPy twin of :func:`gerelion_dask.ops.backprojector.insert_slices`: whole slices ``(B, n, n//2+1)``, or with a
    boolean ``(n, n//2+1)`` mask ``pixels`` (host or device) rows ``(B, M)`` of its pixels; the same result, the
    arrays of ``bp`` updated in place."""
    real = np.float64 if bp.data.dtype == np.complex128 else np.float32
    cplx = np.complex128 if real == np.float64 else np.complex64
    A = cupy.ascontiguousarray(cupy.asarray(rotations, dtype=np.float64))
    if A.ndim == 2:
        A = A[None]
    n = int(fimg.shape[-2]) if pixels is None else int(pixels.shape[0])
    nh = n // 2 + 1
    cols = trilinear.pixel_columns(pixels, n)
    m = int(cols.size)
    R = int(A.shape[0])
    if tuple(fimg.shape) != ((R, n, nh) if pixels is None else (R, m)) or tuple(fweight.shape) != tuple(fimg.shape):
        raise ValueError(f"insert_slices: {R} rotations for slices of shape {tuple(fimg.shape)} and weights of shape "
                         f"{tuple(fweight.shape)} ({m} pixels a slice expected)")
    if R == 0 or m == 0:
        return bp
    img = cupy.ascontiguousarray(cupy.asarray(fimg, dtype=cplx))
    wgt = cupy.ascontiguousarray(cupy.asarray(fweight, dtype=real))
    data, weight = bp.data, bp.weight
    d = data if data.flags.c_contiguous else cupy.ascontiguousarray(data)
    w = weight if weight.flags.c_contiguous else cupy.ascontiguousarray(weight)
    total = R * m
    tname = "double" if real == np.float64 else "float"
    kern = _module().get_function(f"gerelion_insert_slices<{tname}>")
    kern(((total + _THREADS - 1) // _THREADS,), (_THREADS,),
         (A, img.view(real), wgt, cols, np.int64(R), np.int32(m), np.int32(n), np.int32(nh),
          *trilinear.grid_args(bp.grid, n), d.view(real), w))
    if d is not data:
        data[...] = d
    if w is not weight:
        weight[...] = w
    return bp
