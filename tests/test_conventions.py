"""Conventions: Euler matrices, centring, windowing and shifts.  Oracles named in each test."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import to_np

from gerelion_dask import conventions as cv


def test_euler_matches_scipy_transposed():
    # oracle: ALGORITHM.md §1.3 -- A = Rotation.from_euler('ZYZ', [rot, tilt, psi]).as_matrix().T
    Rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    rng = np.random.default_rng(1)
    ang = rng.uniform(-180, 180, (500, 3))
    A = cv.euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    B = Rotation.from_euler("ZYZ", ang, degrees=True).as_matrix().transpose(0, 2, 1)
    assert np.abs(A - B).max() < 1e-12


def test_euler_composition_and_orthogonality():
    # oracle: analytic -- Rz(psi) Ry(tilt) Rz(rot) is orthonormal with det +1, and two rotations about z add up
    A = cv.euler_to_matrix(30.0, 0.0, 0.0)
    B = cv.euler_to_matrix(0.0, 0.0, 30.0)
    assert np.allclose(A, B)
    C = cv.euler_to_matrix(10.0, 0.0, 0.0) @ cv.euler_to_matrix(20.0, 0.0, 0.0)
    assert np.allclose(C, cv.euler_to_matrix(30.0, 0.0, 0.0))
    rng = np.random.default_rng(2)
    ang = rng.uniform(-180, 180, (100, 3))
    M = cv.euler_to_matrix(*ang.T)
    assert np.allclose(M @ M.transpose(0, 2, 1), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(M), 1.0)
    # third row is the viewing direction (sin t cos r, sin t sin r, cos t)
    r, t = np.deg2rad(ang[:, 0]), np.deg2rad(ang[:, 1])
    d = np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], -1)
    assert np.allclose(M[:, 2], d)


@pytest.mark.parametrize("tilt", [0.0, 180.0, 37.0, 90.0])
def test_matrix_to_euler_round_trip(tilt):
    # oracle: analytic -- angles -> matrix -> angles -> matrix is the identity map on matrices
    rng = np.random.default_rng(3)
    rot = rng.uniform(-180, 180, 50)
    psi = rng.uniform(-180, 180, 50)
    A = cv.euler_to_matrix(rot, np.full(50, tilt), psi)
    back = cv.euler_to_matrix(*cv.matrix_to_euler(A))
    assert np.abs(back - A).max() < 1e-9


def test_centred_fft_round_trip_and_origin(xp):
    # oracle: analytic -- a delta at the origin pixel has a flat transform 1/N^2; inverse restores the image
    for n in (32, 33):
        img = xp.zeros((n, n))
        o = cv.image_origin(n)
        img[o, o] = 1.0
        F = cv.centred_rfft2(img)
        assert np.allclose(to_np(F), 1.0 / n**2)
        rng = np.random.default_rng(4)
        x = xp.asarray(rng.normal(size=(3, n, n)))
        assert np.allclose(to_np(cv.centred_irfft2(cv.centred_rfft2(x), n)), to_np(x))


def test_shift_theorem(xp):
    # oracle: analytic (Fourier shift theorem) -- multiplying by exp(-2 pi i k.s/N) moves the image by +s pixels
    rng = np.random.default_rng(5)
    n = 32
    img = xp.asarray(rng.normal(size=(n, n)))
    F = cv.centred_rfft2(img)
    shifted = cv.centred_irfft2(F * cv.shift_phase_2d(n, n, xp.asarray([[3.0, -2.0]]))[0], n)
    expect = xp.roll(img, (-2, 3), axis=(0, 1))  # +3 px in x (columns), -2 px in y (rows)
    assert np.allclose(to_np(shifted), to_np(expect), atol=1e-10)


def test_window_and_pad_are_inverse(xp):
    # oracle: analytic -- cropping keeps kx in [0, n/2], ky in [-n/2+1, n/2]; padding puts them back
    N, n = 32, 16
    rng = np.random.default_rng(6)
    F = xp.asarray(rng.normal(size=(N, N // 2 + 1)) + 1j * rng.normal(size=(N, N // 2 + 1)))
    W = cv.window_rfft2(F, n)
    assert W.shape == (n, n // 2 + 1)
    ky, kx = cv.freq_indices_2d(n)
    KY, KX = cv.freq_indices_2d(N)
    for i in range(n):
        for j in range(n // 2 + 1):
            r = np.nonzero((to_np(KY)[:, 0] == ky[i, 0]))[0][0]
            assert to_np(W)[i, j] == to_np(F)[r, kx[0, j]]
    P = cv.pad_rfft2(W, N)
    assert np.allclose(to_np(cv.window_rfft2(P, n)), to_np(W))
    assert ky[n // 2, 0] == n // 2  # Nyquist row is +n/2 (RELION)
