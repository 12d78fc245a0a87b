"""Analytic and self-consistency oracles for the numerical ops (each test names its oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import to_np

from gerelion_dask import conventions as cv
from gerelion_dask.ops.backprojector import empty_backprojection, enforce_hermitian, insert_slices
from gerelion_dask.ops.ctf import CtfParams, ctf_2d, ctf_rfft, electron_wavelength
from gerelion_dask.ops.fourier import PaddedGrid, likelihood_pixels
from gerelion_dask.ops.fsc import fsc, fsc_from_backprojections, resolution_at
from gerelion_dask.ops.masks import soft_mask_outside, soft_sphere
from gerelion_dask.ops.projector import make_reference, project, reference_power_spectrum
from gerelion_dask.ops.reconstruct import kaiser_bessel_ft, reconstruct


def _phantom(n, seed=0):
    """Smooth asymmetric test map: a few Gaussian blobs inside radius n/4."""
    rng = np.random.default_rng(seed)
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    v = np.zeros((n, n, n))
    for _ in range(6):
        p = rng.uniform(-n / 5, n / 5, 3)
        s = rng.uniform(1.5, 3.0)
        v += rng.uniform(0.5, 1.5) * np.exp(-((z - p[0]) ** 2 + (y - p[1]) ** 2 + (x - p[2]) ** 2) / (2 * s * s))
    return v


def _uniform_rotations(k, seed=0):
    rng = np.random.default_rng(seed)
    rot = rng.uniform(-180, 180, k)
    psi = rng.uniform(-180, 180, k)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, k)))
    return cv.euler_to_matrix(rot, tilt, psi)


def test_scatter_add_sums_repeated_indices(xp):
    # oracle: np.add.at (unbuffered, float64) on the host; real and complex targets of two dimensions, indices
    # repeated and out of order, added onto non-zero contents; a non-contiguous target is refused
    from gerelion_dask.backend import scatter_add

    rng = np.random.default_rng(3)
    idx = rng.integers(0, 12, 200)
    for vals in (rng.normal(size=200), rng.normal(size=200) + 1j * rng.normal(size=200)):
        start = (rng.normal(size=(3, 4)) + (1j * rng.normal(size=(3, 4)) if np.iscomplexobj(vals) else 0)).astype(
            vals.dtype)
        want = start.copy()
        np.add.at(want.reshape(-1), idx, vals)
        got = xp.asarray(start)
        scatter_add(got, xp.asarray(idx), xp.asarray(vals))
        assert np.allclose(to_np(got), want, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="C-contiguous"):
        scatter_add(xp.zeros((4, 3)).T, xp.asarray(idx[:5] % 12), xp.ones(5))


def test_wavelength_300kv():
    # oracle: literature value, lambda(300 kV) = 0.019687 Å (relativistic; golden/README.md)
    assert abs(electron_wavelength(300.0) - 0.019687) < 1e-6


def test_ctf_at_zero_frequency_is_q0(xp):
    # oracle: analytic -- gamma(0) = -atan(Q0/sqrt(1-Q0^2)) so CTF(0) = -sin(gamma) = Q0 without phase shift
    for q0 in (0.07, 0.1, 0.2):
        c = ctf_2d(CtfParams(20000, 18000, 33, amplitude_contrast=q0), xp.zeros(1), xp.zeros(1), 1.0, 64, xp=xp)
        assert abs(float(to_np(c)[0]) - q0) < 1e-12
    # a 90 degree phase shift makes CTF(0) = sqrt(1 - Q0^2)
    c = ctf_2d(CtfParams(20000, 18000, 33, phase_shift_deg=90.0), xp.zeros(1), xp.zeros(1), 1.0, 64, xp=xp)
    assert abs(float(to_np(c)[0]) - np.sqrt(1 - 0.01)) < 1e-12


def test_ctf_options(xp):
    # oracle: analytic -- B-factor envelope exp(-B u^2/4), scale, sign flipping, absolute value, intact first peak
    kx = xp.arange(33.0)[None, :]
    ky = xp.zeros((1, 1))
    base = to_np(ctf_2d(CtfParams(15000, 15000, 0), kx, ky, 2.0, 64, xp=xp))
    env = to_np(ctf_2d(CtfParams(15000, 15000, 0, bfactor_angst2=100.0, scale=0.5), kx, ky, 2.0, 64, xp=xp))
    u2 = (np.arange(33.0) / 128.0) ** 2
    assert np.allclose(env, base * np.exp(-100.0 * u2 / 4) * 0.5, atol=1e-12)
    flip = to_np(ctf_2d(CtfParams(15000, 15000, 0), kx, ky, 2.0, 64, xp=xp, phase_flip=True))
    assert set(np.unique(flip)) <= {-1.0, 1.0}
    ab = to_np(ctf_2d(CtfParams(15000, 15000, 0), kx, ky, 2.0, 64, xp=xp, abs_ctf=True))
    assert np.allclose(ab, np.abs(base))
    first = to_np(ctf_2d(CtfParams(15000, 15000, 0), kx, ky, 2.0, 64, xp=xp, intact_first_peak=True))
    assert first[0, 0] == 1.0 and np.allclose(first[0, -1], base[0, -1])
    # astigmatism: defocus U acts along the angle direction, V perpendicular to it
    along = to_np(ctf_2d(CtfParams(20000, 10000, 0), xp.asarray([10.0]), xp.asarray([0.0]), 2.0, 64, xp=xp))
    iso_u = to_np(ctf_2d(CtfParams(20000, 20000, 0), xp.asarray([10.0]), xp.asarray([0.0]), 2.0, 64, xp=xp))
    assert np.allclose(along, iso_u)


def test_ctf_batch_shape(xp):
    # oracle: a batch of parameters gives one CTF per particle, each equal to the scalar computation
    p = CtfParams(xp.asarray([10000.0, 20000.0]), xp.asarray([9000.0, 19000.0]), xp.asarray([10.0, 80.0]))
    c = to_np(ctf_rfft(p, 32, 2.0, 64, xp=xp))
    assert c.shape == (2, 32, 17)
    c1 = to_np(ctf_rfft(CtfParams(20000.0, 19000.0, 80.0), 32, 2.0, 64, xp=xp))
    assert np.allclose(c[1], c1)


def test_projection_friedel_and_real_images(xp):
    # oracle: analytic -- the projection of a real map is real: its kx = 0 column is Hermitian (F(-ky) = conj F(ky))
    n = 32
    ref = make_reference(xp.asarray(_phantom(n)))
    F = to_np(project(ref, xp.asarray(_uniform_rotations(5)), n))
    for k in range(1, n // 2):
        assert np.allclose(F[:, k, 0], np.conj(F[:, n - k, 0]), atol=1e-10)
    # the centred inverse FFT of the slice equals the projection computed with the rotation's opposite view
    # (A -> Rz(180) A flips x and y of the image): F_flip(k) = conj(F(k)) for a real projection rotated by 180
    Rz180 = np.diag([-1.0, -1.0, 1.0])
    G = to_np(project(ref, xp.asarray(Rz180 @ _uniform_rotations(5)), n))
    assert np.allclose(G, np.conj(F), atol=1e-10)


def test_projection_sums_along_z(xp):
    # oracle: analytic projection-slice theorem on the grid -- the identity view equals the band-limited transform
    # of sum_z (V / sinc^2) (golden/README: RELION's on-grid rows follow this formula to 5e-8)
    n = 32
    v = _phantom(n, 1)
    ref = make_reference(xp.asarray(v))
    F = to_np(project(ref, xp.asarray(np.eye(3)[None]), n))[0]
    from gerelion_dask.ops.fourier import sinc2_correction

    expect = to_np(cv.centred_rfft2((v / sinc2_correction(n, 2 * n)).sum(axis=0)))
    ky, kx = cv.freq_indices_2d(n)
    inside = kx**2 + ky**2 <= (n // 2) ** 2
    assert np.abs(F[inside] - expect[inside]).max() < 1e-9 * np.abs(expect).max()
    assert np.abs(F[~inside]).max() == 0.0


def test_power_spectrum_matches_direct(xp):
    # oracle: float64 reference -- tau^2 at shell 0 is |V(0)|^2/2 with V(0) = sum(v / sinc^2) / N^2 (DC voxel alone)
    from gerelion_dask.ops.fourier import sinc2_correction

    n = 24
    v = _phantom(n, 2)
    ref = make_reference(xp.asarray(v))
    t2 = to_np(reference_power_spectrum(ref))
    dc = (v / sinc2_correction(n, 2 * n)).sum() / n**2
    assert t2.shape == (n // 2 + 1,)
    assert t2[0] == pytest.approx(dc * dc / 2, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("n", [64])
def test_project_backproject_cycle(xp, n):
    # oracle: self-consistency -- 1500 uniform noise-free views, inserted and reconstructed, give the map back:
    # FSC > 0.99 up to 0.9 x Nyquist (issue 2 acceptance)
    # a map with power at every frequency (white noise in a soft sphere), so high shells are really tested
    v = np.random.default_rng(3).normal(size=(n, n, n)) * to_np(soft_sphere(n, n / 4, 4.0))
    ref = make_reference(xp.asarray(v))
    A = xp.asarray(_uniform_rotations(1500, 4))
    bp = empty_backprojection(PaddedGrid.create(n), xp)
    for s in range(0, 1500, 250):
        F = project(ref, A[s : s + 250], n)
        bp = insert_slices(bp, A[s : s + 250], F, xp.ones(F.shape))
    rec = to_np(reconstruct(enforce_hermitian(bp), gridding_iterations=0))
    f = fsc(rec, v)
    assert f[1 : int(0.9 * n / 2) + 1].min() > 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.complex128, np.complex64])
def test_project_kernel_matches_numpy(dtype):
    # oracle: the NumPy projection (trilinear_gather at slice_points): the CuPy kernel gives the same slices to
    # float rounding; a window smaller and one larger than the reference's r_max, repeated and identity rotations
    cupy = pytest.importorskip("cupy")
    v = _phantom(24, 4)
    A = _uniform_rotations(30, 9)
    A[5], A[6] = A[2], np.eye(3)
    for r_max in (12, 7):
        ref = make_reference(v, r_max=r_max, dtype=dtype)
        ref_d = make_reference(cupy.asarray(v), r_max=r_max, dtype=dtype)
        for n in (24, 10):
            want = project(ref, A, n)
            got = project(ref_d, cupy.asarray(A), n)
            assert got.dtype == want.dtype and got.shape == want.shape
            tol = (1e-12 if dtype == np.complex128 else 1e-5) * np.abs(want).max()
            assert np.abs(to_np(got) - want).max() <= tol
            # rows of a pixel mask (host or device): the kernel computes only those, the same values as whole slices
            mask = likelihood_pixels(n, include_dc=True)
            for m in (mask, cupy.asarray(mask)):
                rows = project(ref_d, cupy.asarray(A), n, pixels=m)
                assert rows.shape == (len(A), int(mask.sum())) and cupy.array_equal(rows, got[:, cupy.asarray(mask)])
            assert np.abs(to_np(rows) - project(ref, A, n, pixels=mask)).max() <= tol


def _insert_pixel_by_pixel(grid, A, F, W):
    """RELION's BackProjector::backrotate2D written out pixel by pixel in float64 (the oracle of insert_slices)."""
    P = 2 * (grid.r_pad + 1) + 1
    data, weight = np.zeros((P, P, grid.r_pad + 2), complex), np.zeros((P, P, grid.r_pad + 2))
    n = F.shape[1]
    r = min(n // 2, grid.r_max)
    for s in range(len(A)):
        for iy in range(n):
            ky = iy if iy <= n // 2 else iy - n
            for kx in range(n // 2 + 1):
                w = W[s, iy, kx]
                if kx * kx + ky * ky > r * r or (kx == 0 and ky < 0) or not w > 0:
                    continue
                q = grid.padding * (A[s].T @ np.array([kx, ky, 0.0]))
                if q @ q > grid.r_pad**2 + 1e-6:
                    continue
                v = complex(F[s, iy, kx])
                if q[0] < 0:
                    q, v = -q, np.conj(v)
                x, y, z = q[0], q[1] + grid.r_pad + 1, q[2] + grid.r_pad + 1
                x0, y0, z0 = int(np.floor(x)), int(np.floor(y)), int(np.floor(z))
                for dz in (0, 1):
                    for dy in (0, 1):
                        for dx in (0, 1):
                            t = ((z - z0) if dz else 1 - (z - z0)) * ((y - y0) if dy else 1 - (y - y0)) * (
                                (x - x0) if dx else 1 - (x - x0))
                            data[z0 + dz, y0 + dy, x0 + dx] += t * v
                            weight[z0 + dz, y0 + dy, x0 + dx] += t * w
    return data, weight


def test_insert_slices_equals_a_pixel_by_pixel_insertion():
    # oracle: RELION's trilinear back-rotation written out pixel by pixel in float64 (_insert_pixel_by_pixel);
    # slices larger than the grid's r_max and smaller ones, zero, negative and NaN weights, a repeated rotation,
    # whole slices and rows of a pixel mask, and a chunk of one slice at a time
    from gerelion_dask.ops import backprojector

    rng = np.random.default_rng(5)
    for n, r_max in ((12, 4), (8, 6)):
        g = PaddedGrid.create(12, r_max=r_max)
        A = _uniform_rotations(7, 3)
        A[4] = A[1]
        F = rng.normal(size=(7, n, n // 2 + 1)) + 1j * rng.normal(size=(7, n, n // 2 + 1))
        W = rng.uniform(-0.2, 1.0, size=F.shape)
        W[0, 2, 3] = np.nan
        want_d, want_w = _insert_pixel_by_pixel(g, A, F, W)
        got = insert_slices(empty_backprojection(g), A, F, W)
        assert np.abs(got.data - want_d).max() <= 1e-13 * np.abs(want_d).max()
        assert np.abs(got.weight - want_w).max() <= 1e-13 * np.abs(want_w).max()
        mask = likelihood_pixels(n, include_dc=True)
        Fm, Wm = np.where(mask, F, 0), np.where(mask, W, 0)
        want_d, want_w = _insert_pixel_by_pixel(g, A, Fm, Wm)
        old = backprojector.NUMPY_CHUNK_BYTES
        try:
            for chunk in (old, 1):  # 1 byte: one slice a chunk
                backprojector.NUMPY_CHUNK_BYTES = chunk
                got = insert_slices(empty_backprojection(g), A, F[:, mask], W[:, mask], pixels=mask)
                assert np.abs(got.data - want_d).max() <= 1e-13 * np.abs(want_d).max()
                assert np.abs(got.weight - want_w).max() <= 1e-13 * np.abs(want_w).max()
        finally:
            backprojector.NUMPY_CHUNK_BYTES = old
    with pytest.raises(ValueError, match="pixels a slice expected"):  # rows that do not match the mask
        insert_slices(empty_backprojection(g), A, F[:, mask][:, 1:], W[:, mask][:, 1:], pixels=mask)
    with pytest.raises(ValueError, match="rotations for slices"):
        insert_slices(empty_backprojection(g), A[:3], F, W)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.complex128, np.complex64])
def test_insert_slices_kernel_matches_numpy(dtype):
    # oracle: the NumPy insertion (bincount of the trilinear corner weights): the CuPy kernel's atomic adds give the
    # same volumes to float rounding; slices larger than the grid's r_max (pixels beyond it skipped), slices of a
    # smaller window, zero, negative and NaN weights, repeated rotations, a non-contiguous target
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(11)
    tol = 1e-11 if dtype == np.complex128 else 2e-4
    for n, r_max in ((24, 9), (16, 12)):
        g = PaddedGrid.create(24, r_max=r_max)
        A = _uniform_rotations(40, 5)
        A[7] = A[3]
        F = (rng.normal(size=(40, n, n // 2 + 1)) + 1j * rng.normal(size=(40, n, n // 2 + 1))).astype(dtype)
        W = rng.uniform(-0.2, 1.0, size=F.shape).astype(F.real.dtype)
        W[0, 2, 3] = np.nan
        want = insert_slices(empty_backprojection(g, np, dtype), A, F, W)
        got = insert_slices(empty_backprojection(g, cupy, dtype), cupy.asarray(A), cupy.asarray(F), cupy.asarray(W))
        scale = np.abs(want.data).max()
        assert np.abs(to_np(got.data) - want.data).max() <= tol * scale
        assert np.abs(to_np(got.weight) - want.weight).max() <= tol * np.abs(want.weight).max()
        mask = np.abs(rng.normal(size=F.shape[1:])) > 0.5  # rows of a pixel mask
        want = insert_slices(empty_backprojection(g, np, dtype), A, F[:, mask], W[:, mask], pixels=mask)
        for m in (mask, cupy.asarray(mask)):  # the kernel reads the rows as they are, the mask on host or device
            got = insert_slices(empty_backprojection(g, cupy, dtype), cupy.asarray(A), cupy.asarray(F[:, mask]),
                                cupy.asarray(W[:, mask]), pixels=m)
            assert np.abs(to_np(got.data) - want.data).max() <= tol * np.abs(want.data).max()
            assert np.abs(to_np(got.weight) - want.weight).max() <= tol * np.abs(want.weight).max()
    with pytest.raises(ValueError, match="pixels a slice expected"):  # rows that do not match the mask
        insert_slices(empty_backprojection(g, cupy, dtype), cupy.asarray(A), cupy.asarray(F[:, mask][:, 1:]),
                      cupy.asarray(W[:, mask][:, 1:]), pixels=mask)
    with pytest.raises(ValueError, match="rotations for slices"):
        insert_slices(empty_backprojection(g, cupy, dtype), cupy.asarray(A[:3]), cupy.asarray(F), cupy.asarray(W))
    want = insert_slices(empty_backprojection(g, np, dtype), A, F, W)  # whole slices (the loop's last want: rows)
    shape = want.data.shape
    pair = cupy.zeros(shape[:-1] + (2 * shape[-1],), dtype)  # every other voxel: a strided target
    strided = type(want)(pair[..., ::2], cupy.zeros(shape, W.dtype), g)
    assert not strided.data.flags.c_contiguous
    insert_slices(strided, cupy.asarray(A), cupy.asarray(F), cupy.asarray(W))
    assert np.abs(to_np(pair[..., ::2]) - want.data).max() <= tol * np.abs(want.data).max()
    assert not pair[..., 1::2].any()


def test_gold_standard_fsc_from_arrays(xp):
    # oracle: identical half sets give FSC = 1; independent noise gives FSC near 0 at high frequency
    n = 24
    v = _phantom(n, 5)
    ref = make_reference(xp.asarray(v))
    A = xp.asarray(_uniform_rotations(300, 6))
    F = project(ref, A, n)
    g = PaddedGrid.create(n)
    b1 = insert_slices(empty_backprojection(g, xp), A, F, xp.ones(F.shape))
    b2 = insert_slices(empty_backprojection(g, xp), A, F, xp.ones(F.shape))
    assert np.allclose(to_np(fsc_from_backprojections(b1, b2)), 1.0)
    rng = np.random.default_rng(7)
    noise = xp.asarray(rng.normal(size=F.shape) + 1j * rng.normal(size=F.shape))
    b3 = insert_slices(empty_backprojection(g, xp), A, noise, xp.ones(F.shape))
    f = to_np(fsc_from_backprojections(b1, b3))
    assert abs(f[n // 2 - 1]) < 0.2


def test_fsc_and_resolution():
    # oracle: analytic -- FSC of a map with itself is 1; resolution_at picks the last shell above the threshold
    v = _phantom(32, 8)
    assert np.allclose(fsc(v, v), 1.0)
    curve = np.array([1, 0.99, 0.9, 0.6, 0.4, 0.1, 0.0])
    assert resolution_at(curve, 0.5, 64, 2.0) == pytest.approx(64 * 2.0 / 3)
    assert resolution_at(curve, 0.143, 64, 2.0) == pytest.approx(64 * 2.0 / 4)
    assert resolution_at(np.ones(7), 0.143, 12, 2.0) == pytest.approx(12 * 2.0 / 6)


def test_soft_masks(xp):
    # oracle: analytic raised cosine -- 1 inside R, 0.5 at R + W/2, 0 beyond R + W; background = outside mean
    m = to_np(soft_sphere(32, 8.0, 4.0, ndim=3, xp=xp))
    assert m[16, 16, 16] == 1.0 and m[16, 16, 16 + 10] == pytest.approx(0.5) and m[16, 16, 30] == 0.0
    img = xp.ones((2, 32, 32)) * 3.0
    img[:, 16, 16] = 10.0
    out = to_np(soft_mask_outside(img, radius=5, width=3, batch_2d=True))
    assert out[0, 16, 16] == 10.0 and np.allclose(out[:, 0, 0], 3.0)


def test_kaiser_bessel_ft_normalised():
    # oracle: analytic -- normalised to 1 at 0, smooth through the I -> J branch change (2 pi a w = alpha)
    w = np.linspace(0, 0.2, 2001)
    f = kaiser_bessel_ft(w)
    assert f[0] == pytest.approx(1.0)
    assert np.all(np.isfinite(f)) and np.abs(np.diff(f)).max() < 0.01


@pytest.mark.parametrize("n, r_max, padding, dtype", [(32, 6, 2.0, np.float64), (32, None, 2.0, np.float64),
                                                      (33, 10, 2.0, np.float64), (24, 12, 1.0, np.float64),
                                                      (20, 5, 3.0, np.float32), (16, None, 1.5, np.float64)])
def test_reference_transform_equals_the_full_padded_fft(n, r_max, padding, dtype):
    # oracle: the full float64 rfftn of the zero-padded, origin-rolled map, cut to the sphere -- the pruned
    # transform of make_reference keeps exactly these values (bit for bit on NumPy)
    from gerelion_dask.ops.fourier import PaddedGrid, layout_shape, sinc2_correction

    vol = np.random.default_rng(n).normal(size=(n, n, n)).astype(dtype)
    ref = make_reference(vol, r_max=r_max, padding=padding)
    grid = PaddedGrid.create(n, r_max, padding)
    pad_n, r_pad = grid.pad_n, grid.r_pad
    v = vol / sinc2_correction(n, pad_n, np, dtype=dtype)
    padded = np.zeros((pad_n,) * 3, dtype=dtype)
    o = pad_n // 2 - n // 2
    padded[o : o + n, o : o + n, o : o + n] = v
    F = (np.fft.rfftn(np.roll(padded, (-(pad_n // 2),) * 3, axis=(0, 1, 2))) / (n * n)).astype(ref.data.dtype)
    c = r_pad + 1
    k = np.arange(-c, c + 1)
    kx = np.arange(layout_shape(r_pad)[2])
    want = F[(k % pad_n)[:, None, None], (k % pad_n)[None, :, None], np.minimum(kx, pad_n // 2)[None, None, :]]
    want = np.where(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2 <= r_pad * r_pad, want, 0)
    assert ref.data.shape == want.shape and ref.data.dtype == want.dtype
    assert np.array_equal(ref.data, want)


@pytest.mark.parametrize("min_ires, padding", [(2, 2.0), (3, 1.5)])
def test_strict_lowres_exp_zeroes_the_reference_up_to_relions_radius(min_ires, padding, xp):
    # oracle: RELION 3.1's computeFourierTransformMap with min_ires -- every padded voxel with
    # kx^2 + ky^2 + kz^2 <= ROUND(min_ires p)^2 is zero, every other one is the plain transform's (bit for bit;
    # on NumPy and on CuPy)
    from gerelion_dask.ops.projector import ReferenceSpec

    vol = xp.asarray(np.random.default_rng(3).normal(size=(24, 24, 24)))
    plain = make_reference(vol, r_max=10, padding=padding)
    cut = ReferenceSpec(vol, r_max=10, padding=padding, min_ires=min_ires).build()
    p_data, c_data = to_np(plain.data), to_np(cut.data)
    c = plain.grid.r_pad + 1
    k = np.arange(-c, c + 1)
    kx = np.arange(p_data.shape[2])
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2
    inner = r2 <= int(np.floor(min_ires * padding + 0.5)) ** 2
    assert inner.sum() > 1 and np.abs(p_data[inner]).max() > 0
    assert np.all(c_data[inner] == 0) and np.array_equal(c_data[~inner], p_data[~inner])


def _coarse_block(rng, b=5, K=2, T=7, O=33):
    g = rng.normal(size=(b, T, O)) * 40
    a, hr = rng.uniform(500, 900, b), rng.uniform(0, 20, b)
    p = rng.uniform(50, 200, (b, O))
    lpo = rng.normal(size=(b, K, O))
    lpo[rng.uniform(size=lpo.shape) < 0.3] = -np.inf  # directions outside a local search
    off = rng.normal(size=(b, T))
    off[:, 0] = -np.inf
    return g, a, p, hr, lpo, off


def test_coarse_diff2_and_weights(xp):
    # oracle: the formulas evaluated one sample at a time in float64 (ALGORITHM.md §4.3-4.4); on CuPy the fused kernels
    # must give the NumPy values (same operation order: equal to rounding)
    from gerelion_dask.ops.likelihood import coarse_diff2, coarse_weights

    rng = np.random.default_rng(3)
    g, a, p, hr, lpo, off = _coarse_block(rng)
    b, T, O = g.shape
    K = lpo.shape[1]
    D = xp.empty((b, K, T, O))
    for k in range(K):
        out = coarse_diff2(xp.asarray(g.astype(np.float32)), xp.asarray(a), xp.asarray(p), xp.asarray(hr),
                           xp.asarray(lpo[:, k]), xp.asarray(off), out=D[:, k])
        assert out.shape == (b, T, O)
    dmin = D.reshape(b, -1).min(axis=1)
    w = to_np(coarse_weights(D, dmin, xp.asarray(lpo), xp.asarray(off)))
    D, dmin = to_np(D), to_np(dmin)
    g32 = g.astype(np.float32).astype(np.float64)
    for i, k, t, o in np.ndindex(b, K, T, O):
        ok = np.isfinite(lpo[i, k, o]) and np.isfinite(off[i, t])
        want = (a[i] + hr[i] + p[i, o]) - 2 * g32[i, t, o] if ok else np.inf
        assert D[i, k, t, o] == pytest.approx(want, rel=1e-15, abs=1e-12)
        x = D[i, k, t, o] - dmin[i]
        ww = np.exp(-x + (lpo[i, k, o] + off[i, t])) if ok and x <= 700 else 0.0
        assert w[i, k, t, o] == pytest.approx(ww, rel=1e-13, abs=1e-300)
    assert (w > 0).any() and (w == 0).any()


def test_coarse_weights_cut_at_700(xp):
    # oracle: RELION's double path -- weights of samples more than 700 above the row's minimum are exactly zero
    from gerelion_dask.ops.likelihood import coarse_weights

    d = xp.asarray(np.array([0.0, 699.0, 700.0, 700.5, np.inf]).reshape(1, 1, 1, 5))
    w = to_np(coarse_weights(d, xp.zeros(1), xp.zeros((1, 1, 5)), xp.zeros((1, 1))))
    assert np.allclose(w.ravel()[:3], np.exp(-np.array([0.0, 699.0, 700.0])), rtol=1e-14)
    assert (w.ravel()[3:] == 0).all()


@pytest.mark.parametrize("fraction, maxsig", [(0.999, -1), (0.5, -1), (1.0, -1), (0.999, 3), (0.9, 1)])
def test_coarse_select_matches_the_definitions(xp, fraction, maxsig):
    # oracle: the formulas one sample at a time in float64 (diff2, prior, weight with the 700 cut) and RELION's
    # significance by a full sort of each particle's weights; a particle whose weights all underflow keeps its
    # smallest diff2.  On CuPy the four-pass kernels must return exactly what the NumPy path returns.
    from gerelion_dask.ops.likelihood import coarse_select

    rng = np.random.default_rng(5)
    K, b, T, nd, npsi = 2, 6, 5, 7, 4
    U = nd * npsi
    g = (rng.normal(size=(K, b, T, U)) * rng.choice([0.3, 3.0, 30.0], size=(1, b, 1, 1))).astype(np.float32)
    a, hr = rng.uniform(500, 900, b), rng.uniform(0, 20, b)
    p = rng.uniform(50, 200, (K, b, U))
    dl = rng.normal(size=(b, K, nd))
    dl[rng.uniform(size=dl.shape) < 0.25] = -np.inf  # directions outside a local search
    dl[4] -= 800.0  # every weight of particle 4 underflows
    pl = rng.normal(size=(b, npsi))
    pl[:, 1] = -np.inf
    off = rng.normal(size=(b, T))
    off[2, :2] = -np.inf
    rows, cols, best = (to_np(v) for v in coarse_select(*(xp.asarray(v) for v in (g, a, hr, p, dl, pl, off)),
                                                        fraction, maxsig))
    got = np.zeros((b, K * T * U), bool)
    got[rows, cols] = True
    assert np.all(np.diff(rows * K * T * U + cols) > 0)  # row-major order
    for i in range(b):
        d = np.full((K, T, U), np.inf)
        lp = np.full((K, T, U), -np.inf)
        for k, t, u in np.ndindex(K, T, U):
            lo = dl[i, k, u // npsi] + pl[i, u % npsi]
            if np.isfinite(lo) and np.isfinite(off[i, t]):
                d[k, t, u] = (a[i] + hr[i] + p[k, i, u]) - 2 * float(g[k, i, t, u])
                lp[k, t, u] = lo + off[i, t]
        d, lp = d.ravel(), lp.ravel()
        x = d - d.min()
        w = np.where(x <= 700, np.exp(-x + lp), 0.0)
        if w.sum() == 0:
            assert i == 4 and best[i] == np.argmin(d) and np.flatnonzero(got[i]).tolist() == [np.argmin(d)]
            continue
        srt = np.sort(w)[::-1]
        cs = np.cumsum(srt)
        k = min(int(np.sum(cs < fraction * w.sum())), w.size - 1) if fraction < 1 else int(np.sum(w > 0)) - 1
        if maxsig > 0:
            k = min(k, maxsig - 1)
        want = (w >= srt[k] * (1 - 1e-12)) & (w > 0)  # the threshold's own rounding may differ by an ulp
        sure = (w >= srt[k] * (1 + 1e-12)) & (w > 0)
        assert np.all(got[i] <= want) and np.all(sure <= got[i]), i
        assert w[best[i]] >= w.max() * (1 - 1e-12)
    if xp is not np:  # the twin against the NumPy path on the same inputs
        r0, c0, b0 = coarse_select(g, a, hr, p, dl, pl, off, fraction, maxsig)
        assert np.array_equal(rows, r0) and np.array_equal(cols, c0) and np.array_equal(best, b0)


@pytest.mark.parametrize("fraction, maxsig", [(0.999, -1), (0.9, 100)])
def test_coarse_select_flat_posteriors(xp, fraction, maxsig):
    # oracle: RELION's full-sort significance on each particle's whole weight row (the NumPy path); with nearly flat
    # posteriors a particle has more candidates than the GPU kernels sort in shared memory, and those particles must
    # come out the same through the dense fallback
    from gerelion_dask.expectation.weights import significant_set
    from gerelion_dask.ops.likelihood import coarse_diff2, coarse_select, coarse_weights

    rng = np.random.default_rng(8)
    K, b, T, nd, npsi = 1, 4, 5, 1000, 4  # 20,000 samples per particle
    U = nd * npsi
    # particles 0 and 3 flat (all 20,000 are candidates, more than the GPU sorts per particle), 1 broad (~9,000
    # candidates), 2 peaked
    scale = np.array([1e-3, 2.0, 5.0, 1e-3])[None, :, None, None]
    g = (rng.normal(size=(K, b, T, U)) * scale).astype(np.float32)
    a, hr, p = np.full(b, 700.0), np.zeros(b), np.full((K, b, U), 100.0)
    dl, pl, off = np.zeros((b, K, nd)), np.zeros((b, npsi)), np.zeros((b, T))
    rows, cols, best = (to_np(v) for v in coarse_select(*(xp.asarray(v) for v in (g, a, hr, p, dl, pl, off)),
                                                        fraction, maxsig))
    D = np.empty((b, K, T, U))
    lpo = np.zeros((b, K, U))
    coarse_diff2(g[0], a, p[0], hr, lpo[:, 0], off, out=D[:, 0])
    w = coarse_weights(D, D.reshape(b, -1).min(axis=1), lpo, off).reshape(b, -1)
    r0, c0, _, b0 = significant_set(w, fraction, maxsig)
    assert np.bincount(r0, minlength=b)[[0, 3]].min() >= 100  # flat rows keep many samples
    assert np.array_equal(rows, r0) and np.array_equal(cols, c0) and np.array_equal(best, b0)
    if xp is not np:  # the GPU redoes flat particles a bounded batch at a time: one particle per batch, same result
        from gerelion_dask.ops import likelihood

        keep, likelihood.REDO_SAMPLES = likelihood.REDO_SAMPLES, 1
        try:
            got = [to_np(v) for v in coarse_select(*(xp.asarray(v) for v in (g, a, hr, p, dl, pl, off)), fraction,
                                                    maxsig)]
        finally:
            likelihood.REDO_SAMPLES = keep
        assert all(np.array_equal(x, y) for x, y in zip(got, (r0, c0, b0), strict=True))


@pytest.mark.parametrize("fraction, maxsig", [(0.999, -1), (0.5, -1), (1.0, -1), (0.999, 3), (0.9, 1)])
def test_significant_set_matches_full_sort(xp, fraction, maxsig):
    # oracle: RELION's definition, one row at a time in float64 -- sort the whole row in descending order, keep
    # samples until the running sum reaches the fraction (all positive ones for fraction 1; at most maxsig); the
    # candidate-only selection must keep exactly those samples (ties included) and report the first largest weight
    from gerelion_dask.expectation.weights import significant_set

    rng = np.random.default_rng(11)
    rows = [np.exp(-rng.exponential(s, 400)) for s in (0.2, 3.0, 40.0)]  # flat, medium, peaked posteriors
    rows.append(np.round(rng.uniform(0, 1, 400), 1))  # ties and exact zeros
    rows.append(np.ones(400))  # all equal
    w = np.stack(rows)
    r, c, thr, best = (to_np(v) for v in significant_set(xp.asarray(w), fraction, maxsig))
    got = np.zeros(w.shape, bool)
    got[r, c] = True
    for i, row in enumerate(w):
        srt = np.sort(row)[::-1]
        cs = np.cumsum(srt)
        k = min(int(np.sum(cs < fraction * row.sum())), row.size - 1) if fraction < 1 else row.size - 1
        if maxsig > 0:
            k = min(k, maxsig - 1)
        want = (row >= srt[k]) & (row > 0)
        assert np.array_equal(got[i], want), i
        # a zero k-th weight (fraction 1) is reported as a threshold at or below the smallest positive one
        assert thr[i] == srt[k] if srt[k] > 0 else 0 < thr[i] <= row[row > 0].min()
        assert best[i] == np.argmax(row)
    assert np.all(np.diff(r) >= 0)


def test_concat_ranges_equals_a_loop_of_aranges():
    # oracle: np.concatenate of np.arange per run (empty runs, a scalar start, negative starts)
    from gerelion_dask.ops.indexing import concat_ranges

    rng = np.random.default_rng(2)
    start, n = rng.integers(-50, 50, 40), rng.integers(0, 6, 40)
    want = np.concatenate([np.arange(a, a + k) for a, k in zip(start, n, strict=True)])
    np.testing.assert_array_equal(concat_ranges(start, n), want)
    np.testing.assert_array_equal(concat_ranges(7, [0, 2, 3]), [7, 8, 7, 8, 9])
    assert concat_ranges(np.zeros(0, int), np.zeros(0, int)).shape == (0,)


def test_randomize_phases_beyond_keeps_amplitudes_and_the_shells_below():
    # oracle: RELION's randomizePhasesBeyond -- every Fourier component at |k|^2 >= shell^2 keeps its amplitude and
    # gets a new phase; components below stay as they were (checked off the kx = 0 and Nyquist planes, whose
    # Hermitian twins the real inverse transform averages)
    from gerelion_dask.ops.fsc import randomize_phases_beyond

    n, shell = 16, 5
    v = np.random.default_rng(2).normal(size=(n, n, n))
    out = randomize_phases_beyond(v, shell, np.random.default_rng(3))
    F, G = np.fft.rfftn(v)[..., 1 : n // 2], np.fft.rfftn(out)[..., 1 : n // 2]
    c = np.fft.fftfreq(n) * n
    k2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + (np.arange(1, n // 2) ** 2)[None, None]
    hi = k2 >= shell * shell
    np.testing.assert_allclose(np.abs(G), np.abs(F), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(G[~hi], F[~hi], rtol=1e-9, atol=1e-9)
    dphi = np.angle(G[hi] / F[hi])
    assert np.abs(dphi).mean() > 1.2  # uniform phases: mean |dphi| = pi/2


@pytest.mark.parametrize("grids", [((40, 1.6), (36, 2.0)), ((26, 7.5), (32, 6.0)), ((20, 3.0), (16, 3.0)),
                                   ((32, 6.0), (32, 6.0))])
def test_resampling_reproduces_a_band_limited_image_exactly(xp, grids):
    # oracle: analytic -- an image that is a trigonometric polynomial of the source box (period n a) with frequencies
    # below both grids' Nyquist is the same function sampled on the target grid, where the target grid lies within
    # the source box (positions from each box's centre pixel n/2), and 0 beyond half a source pixel past its edge;
    # a component beyond the target's Nyquist is removed; equal grids give the identity
    from gerelion_dask.ops.resample import resample_images, resample_matrix

    (n1, a1), (n2, a2) = grids
    L = n1 * a1
    kmax = min(n1 * a1 / (2 * a1), L / (2 * a2))  # in cycles per source box

    def f(x, y, high=False):
        v = (np.cos(2 * np.pi * 3 * x / L + 0.3) * np.sin(2 * np.pi * 2 * y / L + 1.1)
             + 0.5 * np.cos(2 * np.pi * ((int(kmax) - 1) * x + y) / L) + 0.2)
        return v + (np.cos(2 * np.pi * k_high * x / L) if high else 0.0)

    p1 = (np.arange(n1) - n1 // 2) * a1
    p2 = (np.arange(n2) - n2 // 2) * a2
    k_high = int(np.floor(L / (2 * a2))) + 1  # beyond the target's Nyquist, where the source holds it
    img = np.stack([f(p1[None, :], p1[:, None], high=k_high < n1 / 2)])
    out = to_np(resample_images(xp.asarray(img), resample_matrix(n1, a1, n2, a2)))[0]
    inside = np.abs(p2 / a1 + 0.5) <= n1 / 2 + 1e-9
    want = np.where(inside[:, None] & inside[None, :], f(p2[None, :], p2[:, None]), 0.0)
    np.testing.assert_allclose(out, want, atol=1e-10)
    if grids[0] == grids[1]:
        np.testing.assert_allclose(resample_matrix(n1, a1, n2, a2), np.eye(n1), atol=1e-12)
