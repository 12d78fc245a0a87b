"""The Python client API: a handle that returns at once, history per iteration, cancel and result.

A tiny auto-refine (box 24, 70 particles, HEALPix order 1) in process and on a Dask LocalCluster; oracles: the files
on disc (RELION's names), the progress lines, and the maps returned against the maps written."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

import gerelion_dask as gd
from gerelion_dask.errors import InputError
from gerelion_dask.io.mrc import read_map
from gerelion_dask.simulate import SimulationSpec, phantom_map, simulate_dataset

BOX, APIX = 24, 5.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    spec = SimulationSpec(n_particles=70, box=BOX, apix=APIX, snr=2.0, seed=3, ini_lowpass_angst=25.0, boxpad=1)
    return simulate_dataset([phantom_map(BOX, APIX, "blobs")], spec, out)


FLAGS = dict(ini_high=25, ctf=True, ctf_corrected_ref=True, firstiter_cc=True, particle_diameter=0.8 * BOX * APIX,
             zero_mask=True, flatten_solvent=True, healpix_order=1, offset_range=3, offset_step=1.5, random_seed=5,
             pool=35)


def test_import_has_no_side_effects():
    code = ("import sys, gerelion_dask; mods = [m for m in sys.modules if m.split('.')[0] in "
            "('matplotlib', 'distributed', 'cupy', 'dask') or m.startswith('gerelion_dask.')]; print(mods)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_refine3d_in_process_handle_history_result(data, tmp_path):
    root = tmp_path / "Refine3D" / "run"
    t0 = time.time()
    job = gd.refine3d(data.particles_star, data.initial_reference, root, device="cpu", auto_iter_max=3, **FLAGS)
    assert time.time() - t0 < 2.0  # returns at once
    assert job.status() in ("pending", "running")
    res = job.result(timeout=120)
    assert job.status() == "finished" and job.done()
    assert job.iteration == len(job.history) == 3
    h = job.history
    assert [x["iteration"] for x in h] == [1, 2, 3]
    for x in h:
        assert x["resolution_angst"] > 0 and set(x["seconds"]) >= {"estep", "mstep", "total"}
        assert x["class_fractions"] == [pytest.approx(1.0)] and x["memory"]["peak_rss_mib"] > 0
    lines = [json.loads(s) for s in (tmp_path / "Refine3D" / "run_progress.jsonl").read_text().splitlines()]
    assert [ln["resolution_angst"] for ln in lines] == [x["resolution_angst"] for x in h]
    # the maps returned are the final files
    assert res.files["maps"] == [[str(root) + "_class001.mrc"]]
    on_disc, _ = read_map(res.files["maps"][0][0])
    assert np.allclose(res.maps[0], on_disc, atol=1e-5 * np.abs(on_disc).max())
    assert len(res.half_maps) == 2 and res.half_maps[0].shape == (BOX,) * 3
    assert res.resolution_angst == h[-1]["resolution_angst"]
    # a second start on the same root is refused at once (no overwrite)
    with pytest.raises(InputError):
        gd.refine3d(data.particles_star, data.initial_reference, root, device="cpu", **FLAGS)
    with pytest.raises(InputError):
        gd.refine3d(data.particles_star, data.initial_reference, tmp_path / "x" / "run", healpix_ordr=2)


@pytest.mark.slow
def test_cancel_keeps_last_complete_iteration(data, tmp_path):
    root = tmp_path / "Class3D" / "run"
    job = gd.classify3d(data.particles_star, data.initial_reference, root, device="cpu", K=2, iter=25,
                        tau2_fudge=4, **FLAGS)
    deadline = time.time() + 120
    while job.iteration < 1 and time.time() < deadline and not job.done():
        time.sleep(0.05)
    assert job.iteration >= 1, job.status()
    job.cancel()
    with pytest.raises(gd.JobCancelled):
        job.result(timeout=120)
    assert job.status() == "cancelled"
    last = job.iteration
    assert 1 <= last < 25
    folder = root.parent
    # every written iteration is complete (optimiser STAR last), nothing of a later one, no final files
    assert (folder / f"run_it{last:03d}_optimiser.star").is_file()
    assert (folder / f"run_it{last:03d}_class002.mrc").is_file()
    assert not list(folder.glob(f"run_it{last + 1:03d}_*"))
    assert not (folder / "run_data.star").exists()
    assert len((folder / "run_progress.jsonl").read_text().splitlines()) == last


def test_failed_job_reraises(tmp_path):
    job = gd.refine3d(tmp_path / "missing.star", tmp_path / "missing.mrc", tmp_path / "o" / "run", device="cpu")
    with pytest.raises(InputError):
        job.result(timeout=60)
    assert job.status() == "failed"


@pytest.mark.slow
def test_refine3d_on_a_running_dask_cluster(data, tmp_path):
    from gerelion_dask.distributed.cluster import close_client, make_client

    # a cluster as `gerelion cluster start` makes it (workers declare the task resources), here in this process
    client, cluster = make_client(n_workers=1, dashboard_address=None, in_process=True, gpus=False)
    try:
        root = tmp_path / "R" / "run"
        job = gd.refine3d(data.particles_star, data.initial_reference, root, client=client, device="cpu",
                          auto_iter_max=2, **FLAGS)
        res = job.result(timeout=180)
        assert job.status() == "finished" and job.iteration == 2
        assert "estep" in client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
        assert res.files["data"].endswith("run_data.star")
    finally:
        close_client(client, cluster)
