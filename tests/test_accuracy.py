"""Estimated accuracies of the orientations and offsets (ALGORITHM.md §5.7; RELION calculateExpectedAngularErrors)."""

from __future__ import annotations

import numpy as np
import pytest

from gerelion_dask.conventions import euler_to_matrix
from gerelion_dask.maximization.accuracy import error_steps, estimate_accuracies
from gerelion_dask.ops.ctf import CtfParams, ctf_rfft
from gerelion_dask.ops.fourier import shells_2d
from gerelion_dask.ops.projector import make_reference, project
from gerelion_dask.simulate import phantom_map


def test_error_steps_follow_relions_schedule():
    # oracle: RELION's step rule written out -- each error is the last plus a step that depends on the last (angles:
    # 0.05 below 0.2, 0.1 below 1, 0.2 below 2, 0.5 below 5, 1 below 10, 2 below 20, else 5; shifts: 0.1 below 1, 0.2
    # below 2, 0.5 below 5, 1 below 10, else 2), and the last error is the first one past the limit (30 deg, 10 px)
    for kind, rule, limit in (("angle", [(0.2, 0.05), (1, 0.1), (2, 0.2), (5, 0.5), (10, 1), (20, 2), (1e9, 5)], 30),
                              ("shift", [(1, 0.1), (2, 0.2), (5, 0.5), (10, 1), (1e9, 2)], 10)):
        e = error_steps(kind)
        prev = np.r_[0.0, e[:-1]]
        want = np.array([next(st for below, st in rule if p < below) for p in prev])
        assert np.allclose(np.diff(np.r_[0.0, e]), want, atol=1e-12), kind
        assert e[-1] > limit and np.all(e[:-1] <= limit), kind
    assert np.allclose(error_steps("angle")[:6], [0.05, 0.1, 0.15, 0.2, 0.3, 0.4])


def test_accuracies_match_the_definition_particle_by_particle():
    # oracle: the definition as a float64 loop per particle -- from its pose, add RELION's errors in turn to the
    # one angle (rot, tilt or psi; then a shift along x or y) that one uniform draw picks, until
    # sum over the window's pixels but DC of |CTF (P(A) - P(A'))|^2 / (2 sigma^2) > ln 100; the shift's difference is
    # written out as |P|^2 (2 - 2 cos(2 pi k.s / N)); average the first errors over the particles (shift in A)
    rng = np.random.default_rng(4)
    N, n, apix = 32, 24, 2.0
    ref = make_reference(phantom_map(N, apix), r_max=n // 2)
    angles = np.column_stack([rng.uniform(-180, 180, 5), rng.uniform(0, 180, 5), rng.uniform(-180, 180, 5)])
    ctf = CtfParams(rng.uniform(8000, 20000, 5), rng.uniform(8000, 20000, 5), rng.uniform(0, 180, 5))
    sigma2 = np.linspace(2.0, 0.2, N // 2 + 1) * 1e-3 * np.abs(project(ref, euler_to_matrix(0, 0, 0)[None], n)).max()
    got_r, got_t = estimate_accuracies(ref, angles, ctf, sigma2, n, N, apix, np.random.default_rng(9))

    draws = np.random.default_rng(9).uniform(size=5)  # the function's draws, in order (no subset: 5 < 100)
    sh = shells_2d(n)
    m = (sh >= 1) & (sh <= n // 2)
    ky, kx = np.meshgrid(np.fft.fftfreq(n, 1 / n), np.arange(n // 2 + 1), indexing="ij")
    want_r, want_t = [], []
    for i in range(5):
        c = ctf_rfft(ctf.take([i]), n, apix, N)[0]
        w = np.zeros_like(c)
        w[m] = c[m] ** 2 / (2.0 * sigma2[sh[m]])
        axis = 0 if draws[i] < 1 / 3 else 1 if draws[i] < 2 / 3 else 2
        P0 = project(ref, euler_to_matrix(*angles[i])[None], n)[0]
        for e in error_steps("angle"):
            a = angles[i].copy()
            a[axis] += e
            P1 = project(ref, euler_to_matrix(*a)[None], n)[0]
            if (w * np.abs(P1 - P0) ** 2)[m].sum() > np.log(100.0) or e == error_steps("angle")[-1]:
                want_r.append(e)
                break
        for s in error_steps("shift"):
            k = kx if draws[i] < 0.5 else ky
            if (w * np.abs(P0) ** 2 * (2 - 2 * np.cos(2 * np.pi * k * s / N)))[m].sum() > np.log(100.0) or \
                    s == error_steps("shift")[-1]:
                want_t.append(s * apix)
                break
    assert got_r == pytest.approx(np.mean(want_r), rel=1e-12)
    assert got_t == pytest.approx(np.mean(want_t), rel=1e-12)
    assert 0.05 <= got_r < 30 and 0.1 * apix <= got_t < 10 * apix  # the test set reaches the threshold
    # one particle per chunk of projections: the same numbers
    assert estimate_accuracies(ref, angles, ctf, sigma2, n, N, apix, np.random.default_rng(9), chunk_bytes=1) == \
        (got_r, got_t)

    # more noise, worse accuracy (never better), up to the limits
    r4, t4 = estimate_accuracies(ref, angles, ctf, 16 * sigma2, n, N, apix, np.random.default_rng(9))
    assert r4 > got_r and t4 > got_t
    r_inf, t_inf = estimate_accuracies(ref, angles, ctf, 1e12 * sigma2, n, N, apix, np.random.default_rng(9))
    assert r_inf == pytest.approx(error_steps("angle")[-1]) and t_inf == pytest.approx(error_steps("shift")[-1] * apix)


def test_accuracies_from_a_reference_on_the_device_match_numpy(xp):
    # oracle: the NumPy path -- a reference on CuPy gives the same estimates (same particles and draws; the sums are
    # compared with ln 100 only, so equal numbers unless a sum sits on the threshold)
    from gerelion_dask.maximization.accuracy import class_accuracies
    from gerelion_dask.ops.projector import ReferenceSpec

    rng = np.random.default_rng(2)
    N, n, apix = 32, 24, 2.0
    vol = phantom_map(N, apix)
    angles = np.column_stack([rng.uniform(-180, 180, 150), rng.uniform(0, 180, 150), rng.uniform(-180, 180, 150)])
    ctf = CtfParams(rng.uniform(8000, 20000, 150), rng.uniform(8000, 20000, 150), rng.uniform(0, 180, 150))
    sigma2 = np.linspace(2.0, 0.2, N // 2 + 1) * 1e-4
    specs = [ReferenceSpec(vol, r_max=n // 2), None]
    want = class_accuracies(specs, angles, ctf, sigma2, n, N, apix, [[1, 2, 0], [1, 2, 1]], np)
    got = class_accuracies(specs, angles, ctf, sigma2, n, N, apix, [[1, 2, 0], [1, 2, 1]], xp)
    assert got == want and want[1] == (999.0, 999.0)
    assert 0.05 < want[0][0] < 30
