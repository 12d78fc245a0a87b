"""A particle whose posterior weights all underflow (RELION stops with "all-zero weights") is kept: its best sample
wins, it is counted, the count is logged once per iteration and written to the progress lines, and the run goes on.

The particle is made for real, in the E-step's own code path (expectation/weights.py in the coarse and the fine
pass): it shares an optics group only with a near copy of itself, so that group's noise spectrum, estimated from
its images before iteration 1 as RELION does, is ~1e-6 of the signal and diff2 differs between poses by ~1e9; and its
offset prior (rlnOriginX/YPriorAngst) lies 10^5 Å away with a fixed 10 Å sigma, so only the translation nearest
the prior has a prior above exp(-745).  Its true offset is the one farthest from that corner: every sample either
lies far more than 745 above the best diff2 or has a prior below exp(-745), and every weight is 0.0 in float64.
Oracles: the truth (the kept offset is the true one, not the one the prior pulls to), float64's underflow, and the
two runners agreeing.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from gerelion_dask.config import JobConfig
from gerelion_dask.io.star import read_star

BOX, APIX, N = 24, 4.0, 24
FAR = 1e5  # Å: the offset prior of the one bad particle


@pytest.fixture(scope="module")
def bad_particle_set(tmp_path_factory):
    """Noiseless particles; the bad one shares a second optics group with a near copy of itself (1e-3 noise), so
    that group's noise spectrum (estimated from its images as RELION does) is ~1e-6 of the signal: diff2 between
    poses differs by far more than 745 for it.  Its offset prior lies 10^5 Å away."""
    import mrcfile

    from gerelion_dask.io.particles import ParticleSet
    from gerelion_dask.simulate import SimulationSpec, phantom_map, simulate_dataset, write_star

    out = tmp_path_factory.mktemp("zero_w")
    spec = SimulationSpec(n_particles=N, box=BOX, apix=APIX, snr=float("inf"), seed=11, ini_lowpass_angst=30.0,
                          boxpad=1, projector_padding=1, shift_max_px=2.0)
    paths = simulate_dataset([phantom_map(BOX, APIX)], spec, out)
    truth = read_star(paths.truth_star)["particles"]
    tx = truth["rlnOriginXAngst"].to_numpy(float) / APIX
    ty = truth["rlnOriginYAngst"].to_numpy(float) / APIX
    bad = int(np.argmin(tx + ty))  # farthest from the (+2, +2) px corner the prior pulls to
    img = ParticleSet.from_star(paths.particles_star).read_images([bad])[0].astype(np.float64)
    twin = img + 1e-3 * img.std() * np.random.default_rng(0).standard_normal(img.shape)
    with mrcfile.new(out / "twin.mrcs", overwrite=True) as m:
        m.set_data(twin[None].astype(np.float32))
        m.voxel_size = APIX
    blocks = read_star(paths.particles_star)
    optics = blocks["optics"]
    optics2 = optics.copy()
    optics2["rlnOpticsGroup"], optics2["rlnOpticsGroupName"] = 2, "opticsGroup2"
    parts = blocks["particles"].copy()
    parts["rlnOriginXPriorAngst"] = 0.0
    parts["rlnOriginYPriorAngst"] = 0.0
    parts.loc[parts.index[bad], ["rlnOriginXPriorAngst", "rlnOriginYPriorAngst"]] = FAR
    parts.loc[parts.index[bad], "rlnOpticsGroup"] = 2
    extra = parts.iloc[[bad]].copy()
    extra["rlnImageName"] = "000001@twin.mrcs"
    extra[["rlnOriginXPriorAngst", "rlnOriginYPriorAngst"]] = 0.0
    parts = pd.concat([parts, extra], ignore_index=True)
    star = out / "particles_prior.star"
    write_star(star, {"optics": pd.concat([optics, optics2], ignore_index=True), "particles": parts})
    return paths.initial_reference, star, bad, np.array([tx[bad], ty[bad]])


def _config(ref, star, out) -> JobConfig:
    return JobConfig(i=str(star), o=str(out / "run"), ref=str(ref), K=1, iter=2,
                     healpix_order=1, offset_range=2.0, offset_step=1.0, offset=10.0, fix_sigma_offset=True,
                     ini_high=8.0, ctf=True, random_seed=3, pool=12, maxsig=10, overwrite=True)


def _check(result, bad, true_px, out):
    # iteration 1: the bad particle underflows; iteration 2: its optics group's noise spectrum, now estimated from
    # the residuals, is no longer tiny, and nothing underflows
    assert [r.n_zero_weight for r in result.iterations] == [1, 0]
    lines = [json.loads(x) for x in (out / "run_progress.jsonl").read_text().splitlines()]
    assert [x["n_zero_weight"] for x in lines] == [1, 0]
    p = read_star(out / "run_it001_data.star")["particles"].iloc[bad]
    pose = p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    assert np.all(np.isfinite(pose))
    assert float(p["rlnMaxValueProbDistribution"]) == 1.0  # its best sample with weight 1, alone
    # the best sample, not the prior: the prior pulls to (+2, +2) px, the kept offset is the particle's true one
    assert np.all(np.abs(pose[3:] / APIX - true_px) <= 1.0), (pose[3:] / APIX, true_px)
    assert np.all(np.isfinite(result.state.angles[bad])) and np.all(np.isfinite(result.state.offsets_px[bad]))


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "all-zero weights" in
            r.getMessage()]


@pytest.mark.slow
def test_all_zero_weights_particle_is_kept_counted_and_logged(bad_particle_set, tmp_path, caplog):
    from gerelion_dask.distributed.cluster import close_client, make_client
    from gerelion_dask.distributed.runner import DaskRunner
    from gerelion_dask.driver import InProcessRunner, run_job
    from gerelion_dask.job_files import make_writer

    ref, star, bad, true_px = bad_particle_set
    assert true_px.sum() < 2.0  # really away from the corner the prior pulls to
    caplog.set_level(logging.WARNING)
    out = tmp_path / "inproc"
    cfg = _config(ref, star, out)
    result = run_job(cfg, runner=InProcessRunner("cpu"), writer=make_writer(cfg.o, plots=False))
    _check(result, bad, true_px, out)
    assert _warnings(caplog) == ["iteration 1: 1 particle(s) with all-zero weights (every posterior weight "
                                 "underflowed); each keeps its best sample"]
    # the same count through Dask tasks (reduced on the workers, gathered with the per-particle results)
    caplog.clear()
    client, cluster = make_client(n_workers=1, dashboard_address=None, in_process=True, gpus=False)
    try:
        out = tmp_path / "dask"
        cfg = _config(ref, star, out)
        again = run_job(cfg, runner=DaskRunner(client, "cpu", use_zarr=False), writer=make_writer(cfg.o, plots=False))
    finally:
        close_client(client, cluster)
    _check(again, bad, true_px, out)
    assert len(_warnings(caplog)) == 1
    assert np.array_equal(again.state.angles, result.state.angles)  # the same run


def test_posterior_weights_underflow_keeps_the_best_sample():
    # oracle: float64 -- exp(-746) is 0.0; the row keeps its smallest-diff2 sample, the other row is untouched
    from gerelion_dask.expectation.weights import posterior_weights

    d = np.array([[5.0, 3.0, 900.0], [1.0, 2.0, 3.0]])
    lp = np.array([[-800.0, -760.0, 0.0], [0.0, 0.0, 0.0]])
    assert np.exp(-760.0) == 0.0
    w, dmin, s, bad = posterior_weights(d, lp)
    assert bad.tolist() == [True, False]
    assert w[0].tolist() == [0.0, 1.0, 0.0] and s[0] == 1.0 and dmin[0] == 3.0
    assert np.allclose(w[1], np.exp(-(d[1] - 1.0))) and not bad[1]
