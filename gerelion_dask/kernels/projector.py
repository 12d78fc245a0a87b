"""CuPy twin of :func:`gerelion_dask.ops.projector.project` (imported only for CuPy references).

One thread per pixel of the output slices: it forms the pixel's 3D coordinate from the slice's rotation (in
float64, as NumPy does), applies the same tests (inside ``min(n/2, r_max)``, ``|q| <= r_pad``), Friedel-folds it and
sums the 8 trilinear neighbours of the reference in the same order.  NumPy's formula materialises the coordinates,
corner indices, fractions and eight gathered arrays of every pixel (~200 bytes a half-plane pixel,
``fine.project_row_bytes``); here only the slices are written.
"""

from __future__ import annotations

from functools import cache

import cupy
import numpy as np

_SRC = r"""
template <typename T>
__global__ void gerelion_project(const T* data, const double* A, long long R, int n, int nh, int r, double pad,
                                 double lim2, int r_pad, int P, int px, T* out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= R * n * nh) return;
    const int kx = (int)(i % nh);
    const long long rest = i / nh;
    const int iy = (int)(rest % n);
    const long long s = rest / n;
    const int ky = iy <= n / 2 ? iy : iy - n;
    double vr = 0.0, vi = 0.0;
    if (kx * kx + ky * ky <= r * r) {
        const double* a = A + 9 * s;
        const double fkx = (double)kx, fky = (double)ky;
        double qx = pad * (a[0] * fkx + a[3] * fky);
        double qy = pad * (a[1] * fkx + a[4] * fky);
        double qz = pad * (a[2] * fkx + a[5] * fky);
        if (qx * qx + qy * qy + qz * qz <= lim2) {
            const bool conj = qx < 0.0;
            if (conj) { qx = -qx; qy = -qy; qz = -qz; }
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
                        const double w = wz * wy * (dx ? fx : 1.0 - fx);
                        const long long idx = base + (long long)dz * P * px + (long long)dy * px + dx;
                        vr += w * (double)data[2 * idx];
                        vi += w * (double)data[2 * idx + 1];
                    }
                }
            }
            if (conj) vi = -vi;
        }
    }
    out[2 * i] = (T)vr;
    out[2 * i + 1] = (T)vi;
}
"""

_THREADS = 256


@cache
def _module():
    return cupy.RawModule(code=_SRC, options=("-std=c++14",),
                          name_expressions=("gerelion_project<double>", "gerelion_project<float>"))


def project(ref, rotations, n: int):
    """CuPy twin of :func:`gerelion_dask.ops.projector.project` (``n`` given): slices ``(B, n, n//2+1)``."""
    from ..ops.fourier import layout_shape

    real = np.float64 if ref.data.dtype == np.complex128 else np.float32
    A = cupy.ascontiguousarray(cupy.asarray(rotations, dtype=np.float64))
    if A.ndim == 2:
        A = A[None]
    R, nh = int(A.shape[0]), n // 2 + 1
    out = cupy.empty((R, n, nh), np.complex128 if real == np.float64 else np.complex64)
    if R == 0:
        return out
    data = cupy.ascontiguousarray(ref.data)
    P, _, px = layout_shape(ref.grid.r_pad)
    total = R * n * nh
    kern = _module().get_function(f"gerelion_project<{'double' if real == np.float64 else 'float'}>")
    kern(((total + _THREADS - 1) // _THREADS,), (_THREADS,),
         (data.view(real), A, np.int64(R), np.int32(n), np.int32(nh), np.int32(min(n // 2, ref.grid.r_max)),
          np.float64(ref.grid.padding), np.float64(ref.grid.r_pad**2 + 1e-6), np.int32(ref.grid.r_pad), np.int32(P),
          np.int32(px), out.view(real)))
    return out
