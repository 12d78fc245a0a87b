"""Checkpoints and ``--continue``: a run killed with SIGKILL in the middle of an iteration and continued from its last
complete iteration ends bit-identical to a run that was never stopped (CPU, one BLAS thread, same seed).

Oracle: the uninterrupted run with the same seed, started at the same time in another process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import child_env

from gerelion_dask.checkpoint import Checkpoint, checkpoint_for_optimiser, load_checkpoint, save_checkpoint
from gerelion_dask.errors import InputError
from gerelion_dask.io.star import read_particles
from gerelion_dask.maximization.schedule import ScheduleState
from gerelion_dask.simulate import SimulationSpec, phantom_map, simulate_dataset

BOX, APIX = 24, 5.0
POSE_COLUMNS = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber",
                "rlnNormCorrection", "rlnMaxValueProbDistribution", "rlnLogLikeliContribution"]


@pytest.fixture(scope="module")
def sim60(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim60")
    maps = [phantom_map(BOX, APIX, "blobs"), phantom_map(BOX, APIX, "blobs2")]
    spec = SimulationSpec(n_particles=60, box=BOX, apix=APIX, snr=2.0, seed=3, ini_lowpass_angst=25.0,
                          class_fractions=None, n_classes=2, boxpad=1)
    return simulate_dataset(maps, spec, out)


def _env():
    return child_env(one_blas_thread=True)


def _cli(*args):
    return [sys.executable, "-m", "gerelion_dask.cli", *map(str, args)]


def _job(paths, kind, root):
    common = ["--i", paths.particles_star, "--o", root, "--ref", paths.initial_reference, "--ctf",
              "--ctf_corrected_ref", "--particle_diameter", 0.8 * BOX * APIX, "--zero_mask", "--ini_high", 25,
              "--random_seed", 5, "--pool", 16, "--device", "cpu", "--in-process"]
    if kind == "refine":  # iterations 1-5 (current size 24, 24, 24, 18, then 24 in the final one with joined halves)
        extra = ["--healpix_order", 0, "--offset_range", 2, "--offset_step", 2, "--flatten_solvent", "--norm",
                 "--low_resol_join_halves", 40, "--auto_iter_max", 5]
    else:  # iteration 1 seeds the classes at random
        extra = ["--healpix_order", 0, "--offset_range", 1, "--offset_step", 1, "--K", 2, "--iter", 3,
                 "--tau2_fudge", 4]
    return _cli(kind, *common, *extra)


def _kill_during(proc, root: Path, iteration: int, log: Path, timeout=240.0):
    """SIGKILL ``proc`` as soon as iteration ``iteration - 1`` is complete (its progress line is written)."""
    progress = Path(f"{root}_progress.jsonl")
    t_end = time.time() + timeout
    while time.time() < t_end:
        if progress.is_file():
            lines = progress.read_text().splitlines()
            if any(json.loads(x)["iteration"] == iteration - 1 for x in lines if x.endswith("}")):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
        assert proc.poll() is None, "the run to be killed ended on its own: " + log.read_text()[-2000:]
        time.sleep(0.01)
    proc.kill()
    pytest.fail("the run to be killed never completed an iteration")


def _maps(folder: Path, names):
    return {n: mrcfile.read(folder / n) for n in names}


@pytest.mark.slow
@pytest.mark.parametrize("kind, killed", [("refine", 3), ("classify", 2)])
def test_continue_after_sigkill_is_bit_identical(sim60, tmp_path, kind, killed):
    ref_root, cut_root = tmp_path / "A" / "run", tmp_path / "B" / "run"
    env = _env()
    ref_log, cut_log = tmp_path / "A.log", tmp_path / "B.log"
    with open(ref_log, "w") as fa, open(cut_log, "w") as fb:
        ref = subprocess.Popen(_job(sim60, kind, ref_root), env=env, cwd=tmp_path, stdout=fa, stderr=fa)
        cut = subprocess.Popen(_job(sim60, kind, cut_root), env=env, cwd=tmp_path, stdout=fb, stderr=fb)
        try:
            _kill_during(cut, cut_root, killed, cut_log)
        finally:
            ref.wait(timeout=600)
    assert ref.returncode == 0, ref_log.read_text()[-3000:]
    assert cut.returncode == -signal.SIGKILL
    folder = cut_root.parent
    assert not (folder / f"run_it{killed:03d}_optimiser.star").exists(), "the kill came after the iteration"
    last = sorted(folder.glob("run_it*_optimiser.star"))[-1]
    assert last.name == f"run_it{killed - 1:03d}_optimiser.star"

    # an output folder holding a run is refused without --continue (or --overwrite)
    again = subprocess.run(_job(sim60, kind, cut_root), env=env, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 2 and "--continue" in again.stderr and "Traceback" not in again.stderr

    # --continue without --o: the run's own root
    r = subprocess.run(_cli(kind, "--continue", last.relative_to(tmp_path), "--in-process", "--device", "cpu"),
                       env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    if kind == "refine":
        maps = ["run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc",
                "run_it004_half1_class001.mrc", "run_it004_half2_class001.mrc"]
        stars = ["run_data.star", "run_it003_data.star", "run_it005_data.star"]
    else:
        maps = ["run_it003_class001.mrc", "run_it003_class002.mrc", "run_it002_class001.mrc"]
        stars = ["run_it003_data.star", "run_it002_data.star"]
    a, b = _maps(ref_root.parent, maps), _maps(folder, maps)
    for n in maps:
        assert np.array_equal(a[n], b[n]), n
        assert np.isfinite(a[n]).all() and np.abs(a[n]).max() > 0
    for n in stars:
        _, pa, _ = read_particles(ref_root.parent / n)
        _, pb, _ = read_particles(folder / n)
        for c in POSE_COLUMNS:
            assert np.array_equal(pa[c].to_numpy(), pb[c].to_numpy()), (n, c)
        assert (ref_root.parent / n).read_bytes() == (folder / n).read_bytes(), n
    # the progress file tells the same story (timings aside)
    strip = [{k: v for k, v in json.loads(x).items() if k not in ("seconds", "memory")}
             for x in (ref_root.parent / "run_progress.jsonl").read_text().splitlines()]
    assert strip == [{k: v for k, v in json.loads(x).items() if k not in ("seconds", "memory")}
                     for x in (folder / "run_progress.jsonl").read_text().splitlines()]


def test_checkpoint_round_trip_keeps_values_and_types(tmp_path):
    # oracle: the saved values themselves (exact floats, NumPy scalar types, None, nested lists)
    s = ScheduleState(2, 3.0, 1.5, perturb=0.123456789012345678, best_resolution=1 / 17.0)
    model = {"maps": [[np.random.default_rng(0).normal(size=(4, 4, 4)), None]], "f32": np.float32(0.1),
             "f64": np.float64(1 / 3), "py": 1 / 7, "inf": float("inf")}
    ck = Checkpoint(4, None, model, None, s, s, [], True, [[np.arange(3.0)]])
    save_checkpoint(tmp_path / "c.npz", ck)
    back = load_checkpoint(tmp_path / "c.npz")
    assert back.schedule == s and back.iteration == 4 and back.final is True
    m = back.model
    assert np.array_equal(m["maps"][0][0], model["maps"][0][0]) and m["maps"][0][1] is None
    assert type(m["f32"]) is np.float32 and m["f32"] == model["f32"]
    assert type(m["f64"]) is np.float64 and type(m["py"]) is float and m["py"] == 1 / 7 and m["inf"] == np.inf
    assert [x.tolist() for x in back.unfil[0]] == [[0.0, 1.0, 2.0]]
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_a_version_1_checkpoint_continues_with_its_parameters_in_both_halves(tmp_path, monkeypatch):
    # oracle: the version-1 layout (gerelion before the per-half models kept one copy of the other parameters for
    # both halves) -- loaded now, each of those values is repeated for every half set, everything else as saved
    from gerelion_dask import checkpoint as ckmod
    from gerelion_dask.maximization.model import Model

    rng = np.random.default_rng(1)
    nsh = 5
    v1 = Model(8, 2.0, [[rng.normal(size=(8, 8, 8))], [rng.normal(size=(8, 8, 8))]], np.array([1.0]),
               rng.uniform(size=(1, 12)), rng.uniform(size=(2, nsh)), np.ones((2, 1, nsh)), np.ones((2, 1, nsh)),
               np.zeros((1, nsh)), np.ones((2, 1, nsh)), 4.5, 0.93, np.array([1.0, 0.98]), 0.05, loglik=-12.5,
               ave_pmax=0.3)
    monkeypatch.setattr(ckmod, "VERSION", 1)
    save_checkpoint(tmp_path / "v1.npz", Checkpoint(3, None, v1, None, None, None, [], False))
    monkeypatch.undo()
    m = load_checkpoint(tmp_path / "v1.npz").model
    assert m.pdf_class.shape == (2, 1) and np.all(m.pdf_class == 1.0)
    assert np.array_equal(m.pdf_direction, np.stack([v1.pdf_direction] * 2))
    assert np.array_equal(m.sigma2_noise, np.stack([v1.sigma2_noise] * 2))
    assert m.sigma_offset_angst.tolist() == [4.5, 4.5] and m.avg_norm.tolist() == [0.93, 0.93]
    assert np.array_equal(m.scales, [[1.0, 0.98]] * 2) and m.loglik.tolist() == [-12.5, -12.5]
    assert m.ave_pmax == 0.3 and np.array_equal(m.maps[1][0], v1.maps[1][0]) and m.n_halves == 2
    monkeypatch.setattr(ckmod, "VERSION", 7)
    save_checkpoint(tmp_path / "v7.npz", Checkpoint(3, None, v1, None, None, None, [], False))
    monkeypatch.undo()
    with pytest.raises(InputError, match="format version 7"):
        load_checkpoint(tmp_path / "v7.npz")


def test_continue_errors_name_the_file(tmp_path):
    # oracle: the rule -- a missing or garbled optimiser/checkpoint is one InputError naming the file
    with pytest.raises(InputError, match="missing_it002_optimiser.star: file not found"):
        checkpoint_for_optimiser(tmp_path / "missing_it002_optimiser.star")
    garbled = tmp_path / "g_it001_optimiser.star"
    garbled.write_text("data_optimiser_general\n_rlnCurrentIteration 1\n"
                       "_rlnGerelionCheckpoint g_it001_checkpoint.npz\n")
    (tmp_path / "g_it001_checkpoint.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InputError, match="g_it001_checkpoint.npz: checkpoint is unreadable"):
        checkpoint_for_optimiser(garbled)
    (tmp_path / "g_it001_checkpoint.npz").unlink()
    with pytest.raises(InputError, match="g_it001_checkpoint.npz: checkpoint not found"):
        checkpoint_for_optimiser(garbled)
    relion = tmp_path / "r_it001_optimiser.star"
    relion.write_text("data_optimiser_general\n_rlnCurrentIteration 1\n_rlnOutputRootName r\n")
    with pytest.raises(InputError, match="has no rlnGerelionCheckpoint"):
        checkpoint_for_optimiser(relion)
