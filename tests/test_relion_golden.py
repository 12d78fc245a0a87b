"""Our numerics against RELION 3.1.3's own output (../shared/data/golden; tolerances from its README)."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile
from conftest import need_golden, to_np

from gerelion_dask import conventions as cv
from gerelion_dask.ops.backprojector import empty_backprojection, enforce_hermitian, insert_slices
from gerelion_dask.ops.ctf import CtfParams, ctf_2d, ctf_rfft
from gerelion_dask.ops.fourier import PaddedGrid
from gerelion_dask.ops.fsc import fsc
from gerelion_dask.ops.projector import make_reference, project
from gerelion_dask.ops.reconstruct import reconstruct

CTF_SETS = [(5000, 5000, 0), (15000, 14000, 30), (25000, 23000, 117)]


@pytest.mark.parametrize("name,apix,n", [("box64_3A", 3.0, 64), ("box64_1A", 1.0, 64), ("box65_3A", 3.0, 65)])
def test_ctf_equals_relion_ctf_toolbox(xp, name, apix, n):
    # oracle: relion_ctf_toolbox --simulate images (centred, zero frequency at pixel N//2), tolerance 1e-5
    g = need_golden()
    ref = mrcfile.read(g / f"ctf_toolbox_{name}.mrcs")
    j = xp.arange(n) - n // 2
    for k, (u, v, ang) in enumerate(CTF_SETS):
        c = ctf_2d(CtfParams(u, v, ang), j[None, :], j[:, None], apix, n, xp=xp)
        assert np.abs(to_np(c) - ref[k]).max() < 1e-5


@pytest.mark.parametrize("name,apix,n", [("box64_3A", 3.0, 64), ("box64_1A", 1.0, 64), ("box65_3A", 3.0, 65)])
def test_ctf_equals_relion_project_of_delta(xp, name, apix, n):
    # oracle: relion_project --ctf of a delta map; its FFT about the origin pixel is the CTF (B envelope included)
    g = need_golden()
    imgs = mrcfile.read(g / f"ctf_delta_{name}.mrcs").astype(np.float64)
    p = starfile.read(g / f"ctf_delta_{name}.star", always_dict=True)["particles"]
    b = p["rlnCtfBfactor"].to_numpy() if "rlnCtfBfactor" in p else np.zeros(len(p))
    params = CtfParams(xp.asarray(p.rlnDefocusU.to_numpy()), xp.asarray(p.rlnDefocusV.to_numpy()),
                       xp.asarray(p.rlnDefocusAngle.to_numpy()), bfactor_angst2=xp.asarray(b))
    ctf = to_np(ctf_rfft(params, n, apix, n, xp=xp))
    F = to_np(cv.centred_rfft2(xp.asarray(imgs))) * n * n  # the delta projects to a unit impulse
    ky, kx = cv.freq_indices_2d(n)
    inside = kx**2 + ky**2 <= (n // 2) ** 2
    assert np.abs(F.real[:, inside] - ctf[:, inside]).max() < 1e-5
    assert np.abs(F[:, ~inside]).max() < 1e-5


def _golden_projection_inputs(n):
    g = need_golden()
    vol = mrcfile.read(g / f"map_6msm_box{n}.mrc").astype(np.float64)
    p = starfile.read(g / f"proj_box{n}_noctf.star", always_dict=True)["particles"]
    noctf = mrcfile.read(g / f"proj_box{n}_noctf.mrcs").astype(np.float64)
    withctf = mrcfile.read(g / f"proj_box{n}_ctf.mrcs").astype(np.float64)
    return vol, p, noctf, withctf


@pytest.mark.parametrize("n", [64, 65])
def test_projection_matches_relion_project(xp, n):
    # oracle: relion_project images of the golden map at 12 poses/shifts (with and without CTF): corr > 0.999 per
    # row (we reach > 0.99999 and max relative error < 1e-3).  Box 65 reproduces RELION 3.1's odd-box origin 33.
    vol, p, noctf, withctf = _golden_projection_inputs(n)
    ref = make_reference(xp.asarray(vol))
    A = cv.euler_to_matrix(xp.asarray(p.rlnAngleRot.to_numpy()), xp.asarray(p.rlnAngleTilt.to_numpy()),
                           xp.asarray(p.rlnAnglePsi.to_numpy()))
    F = project(ref, A, n)
    # the pixels= form (the E-step's likelihood pixels) gives the same values at the mask's pixels
    mask = np.zeros(F.shape[1:], bool)
    mask[::3, 1::2] = True
    assert np.array_equal(to_np(project(ref, A, n, pixels=xp.asarray(mask))), to_np(F)[:, mask])
    shifts = np.stack([p.rlnOriginXAngst.to_numpy(), p.rlnOriginYAngst.to_numpy()], -1) / 3.0
    F = F * cv.shift_phase_2d(n, n, xp.asarray(-shifts))
    b = p["rlnCtfBfactor"].to_numpy() if "rlnCtfBfactor" in p else np.zeros(len(p))
    ctf = ctf_rfft(CtfParams(xp.asarray(p.rlnDefocusU.to_numpy()), xp.asarray(p.rlnDefocusV.to_numpy()),
                             xp.asarray(p.rlnDefocusAngle.to_numpy()), bfactor_angst2=xp.asarray(b)), n, 3.0, n, xp=xp)
    ours = to_np(cv.centred_irfft2(F, n))
    ours_ctf = to_np(cv.centred_irfft2(F * ctf, n))
    for k in range(len(p)):
        for a, b_ in ((ours[k], noctf[k]), (ours_ctf[k], withctf[k])):
            assert np.corrcoef(a.ravel(), b_.ravel())[0, 1] > 0.999
            assert np.abs(a - b_).max() / np.abs(b_).max() < 2e-3
    # tilt-0 gimbal: rows 4 and 5 are the same image
    assert np.abs(ours[3] - ours[4]).max() < 1e-5 * np.abs(ours[3]).max()


def _recon32_backprojection(xp, dtype=np.complex128):
    g = need_golden()
    n, apix = 32, 6.0
    p = starfile.read(g / "recon_box32_ctf_proj.star", always_dict=True)["particles"]
    imgs = xp.asarray(mrcfile.read(g / "recon_box32_ctf_proj.mrcs").astype(np.float64))
    A = cv.euler_to_matrix(xp.asarray(p.rlnAngleRot.to_numpy()), xp.asarray(p.rlnAngleTilt.to_numpy()),
                           xp.asarray(p.rlnAnglePsi.to_numpy()))
    shifts = np.stack([p.rlnOriginXAngst.to_numpy(), p.rlnOriginYAngst.to_numpy()], -1) / apix
    X = cv.centred_rfft2(imgs) * cv.shift_phase_2d(n, n, xp.asarray(shifts))
    ctf = ctf_rfft(CtfParams(xp.asarray(p.rlnDefocusU.to_numpy()), xp.asarray(p.rlnDefocusV.to_numpy()),
                             xp.asarray(p.rlnDefocusAngle.to_numpy())), n, apix, n, xp=xp)
    bp = empty_backprojection(PaddedGrid.create(n), xp, dtype=dtype)
    bp = insert_slices(bp, A, X * ctf, ctf * ctf)
    return enforce_hermitian(bp), g


def test_reconstruction_matches_relion_reconstruct(xp):
    # oracle: relion_reconstruct --ctf of the shipped 2000 box-32 projections (recon_box32_ctf.mrc).
    # Checks: no translation, FSC >= 0.99 with RELION's map and with the input map at every shell below Nyquist,
    # and the same least-squares scale against the input map (after removing the mean, see reconstruct.py).
    bp, g = _recon32_backprojection(xp)
    ours = to_np(reconstruct(bp, gridding_iterations=10))
    relion = mrcfile.read(g / "recon_box32_ctf.mrc").astype(np.float64)
    truth = mrcfile.read(g / "map_6msm_box32.mrc").astype(np.float64)
    # no translation: the cross-correlation peak is at zero shift
    cc = np.fft.ifftn(np.fft.fftn(ours) * np.conj(np.fft.fftn(relion))).real
    assert np.unravel_index(np.argmax(cc), cc.shape) == (0, 0, 0)
    assert fsc(ours, relion)[1:16].min() >= 0.99
    assert fsc(ours, truth)[1:16].min() >= 0.99
    t0 = truth - truth.mean()

    def ls(x):
        x0 = x - x.mean()
        return float((x0 * t0).sum() / (t0 * t0).sum())

    assert abs(ls(ours) / ls(relion) - 1.0) < 0.02


def test_simple_division_close_to_gridding(xp):
    # oracle: RELION 4+ default (simple division) gives nearly the same map as iterative gridding here
    bp, _ = _recon32_backprojection(xp)
    a = to_np(reconstruct(bp, gridding_iterations=0))
    b = to_np(reconstruct(bp, gridding_iterations=10))
    assert fsc(a, b)[1:16].min() > 0.99
