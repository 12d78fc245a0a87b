"""CuPy twin of :func:`gerelion_dask.ops.backprojector.insert_slices` (imported only for CuPy arrays).

One thread per slice pixel: it forms the pixel's 3D coordinate from the slice's rotation (in float64, as NumPy does,
whatever the volumes' precision), applies the same tests
(inside ``min(n/2, r_max)``, half plane, ``|q| <= r_pad``, weight > 0), Friedel-folds it, and adds its value and
weight to the 8 trilinear neighbours with atomic adds.  The NumPy formula materialises the coordinates, corners,
fractions and 16 scattered value arrays of every pixel (~150 bytes a pixel, the fine pass's largest working set at
256 px) and CuPy's ``add.at`` ran 16 scatters over them; here nothing but the volumes is written.  Sums are equal up
to float rounding and the order the atomics land in (as the ``add.at`` path's were).
"""

from __future__ import annotations

from functools import cache

import cupy
import numpy as np

_SRC = r"""
template <typename T>
__global__ void gerelion_insert_slices(const double* A, const T* img, const T* wgt, long long R, int n, int nh,
                                       int r, double pad, double lim2, int r_pad, int P, int px, T* data, T* weight) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= R * n * nh) return;
    const int kx = (int)(i % nh);
    const long long rest = i / nh;
    const int iy = (int)(rest % n);
    const long long s = rest / n;
    const int ky = iy <= n / 2 ? iy : iy - n;
    if (kx * kx + ky * ky > r * r || (kx == 0 && ky < 0)) return;
    const T w = wgt[i];
    if (!(w > (T)0)) return;
    const double* a = A + 9 * s;
    const double fkx = (double)kx, fky = (double)ky;
    double qx = pad * (a[0] * fkx + a[3] * fky);
    double qy = pad * (a[1] * fkx + a[4] * fky);
    double qz = pad * (a[2] * fkx + a[5] * fky);
    if (!(qx * qx + qy * qy + qz * qz <= lim2)) return;
    T vr = img[2 * i], vi = img[2 * i + 1];
    if (qx < 0.0) { qx = -qx; qy = -qy; qz = -qz; vi = -vi; }
    const double c = (double)(r_pad + 1);
    const double x = qx, y = qy + c, z = qz + c;
    const double x0f = floor(x), y0f = floor(y), z0f = floor(z);
    const double fx = x - x0f, fy = y - y0f, fz = z - z0f;
    const long long x0 = min(max((long long)x0f, 0LL), (long long)(px - 2));
    const long long y0 = min(max((long long)y0f, 0LL), (long long)(P - 2));
    const long long z0 = min(max((long long)z0f, 0LL), (long long)(P - 2));
    const long long base = (z0 * P + y0) * px + x0;
    for (int dz = 0; dz < 2; ++dz) {
        const double wz = dz ? fz : 1.0 - fz;
        for (int dy = 0; dy < 2; ++dy) {
            const double wy = dy ? fy : 1.0 - fy;
            for (int dx = 0; dx < 2; ++dx) {
                const double wx = dx ? fx : 1.0 - fx;
                const T tw = (T)(wz * wy * wx);
                const long long idx = base + (long long)dz * P * px + (long long)dy * px + dx;
                atomicAdd(data + 2 * idx, vr * tw);
                atomicAdd(data + 2 * idx + 1, vi * tw);
                atomicAdd(weight + idx, w * tw);
            }
        }
    }
}
"""

_THREADS = 256


@cache
def _module():
    return cupy.RawModule(code=_SRC, options=("-std=c++14",),
                          name_expressions=("gerelion_insert_slices<double>", "gerelion_insert_slices<float>"))


def insert_slices(bp, rotations, fimg, fweight):
    """CuPy twin of :func:`gerelion_dask.ops.backprojector.insert_slices` (same arguments and result; the arrays of
    ``bp`` are updated in place)."""
    from ..ops.fourier import layout_shape

    real = np.float64 if bp.data.dtype == np.complex128 else np.float32
    cplx = np.complex128 if real == np.float64 else np.complex64
    A = cupy.ascontiguousarray(cupy.asarray(rotations, dtype=np.float64))
    if A.ndim == 2:
        A = A[None]
    n, nh = int(fimg.shape[-2]), int(fimg.shape[-1])
    img = cupy.ascontiguousarray(cupy.asarray(fimg, dtype=cplx)).reshape(-1, n, nh)
    wgt = cupy.ascontiguousarray(cupy.asarray(fweight, dtype=real)).reshape(-1, n, nh)
    R = int(img.shape[0])
    if R == 0:
        return bp
    if A.shape[0] != R or wgt.shape[0] != R:
        raise ValueError(f"insert_slices: {A.shape[0]} rotations for {R} slices and {wgt.shape[0]} weights")
    P, _, px = layout_shape(bp.grid.r_pad)
    data, weight = bp.data, bp.weight
    d = data if data.flags.c_contiguous else cupy.ascontiguousarray(data)
    w = weight if weight.flags.c_contiguous else cupy.ascontiguousarray(weight)
    total = R * n * nh
    tname = "double" if real == np.float64 else "float"
    kern = _module().get_function(f"gerelion_insert_slices<{tname}>")
    r = min(n // 2, bp.grid.r_max)
    kern(((total + _THREADS - 1) // _THREADS,), (_THREADS,),
         (A, img.view(real), wgt, np.int64(R), np.int32(n), np.int32(nh), np.int32(r), np.float64(bp.grid.padding),
          np.float64(bp.grid.r_pad**2 + 1e-6), np.int32(bp.grid.r_pad), np.int32(P), np.int32(px), d.view(real), w))
    if d is not data:
        data[...] = d
    if w is not weight:
        weight[...] = w
    return bp
