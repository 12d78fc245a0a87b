"""End to end: a small auto-refine and a small classification write RELION's files, and RELION's own tools read
them (Debian relion 3.1.3; skipped where its binaries are missing).  Oracles: the simulated truth, RELION's tools."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from gerelion_dask.cli import main as cli_main
from gerelion_dask.io.mrc import read_map, write_map
from gerelion_dask.io.star import read_particles, read_star
from gerelion_dask.ops.fsc import fsc
from gerelion_dask.ops.masks import soft_sphere
from gerelion_dask.simulate import SimulationSpec, phantom_map, simulate_dataset

BOX, APIX = 24, 5.0


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    maps = [phantom_map(BOX, APIX, "blobs"), phantom_map(BOX, APIX, "blobs2")]
    spec = SimulationSpec(n_particles=120, box=BOX, apix=APIX, snr=2.0, seed=3, ini_lowpass_angst=25.0,
                          class_fractions=None, n_classes=2, boxpad=1)
    return simulate_dataset(maps, spec, out), maps


def _flags(paths, out, extra):
    return ["--i", str(paths.particles_star), "--o", str(out / "run"), "--ref", str(paths.initial_reference),
            "--ctf", "--ctf_corrected_ref", "--particle_diameter", str(0.8 * BOX * APIX), "--zero_mask",
            "--flatten_solvent", "--healpix_order", "1", "--offset_range", "3", "--offset_step", "1.5",
            "--random_seed", "5", "--pool", "37", "--device", "cpu", *extra]


@pytest.mark.slow
def test_auto_refine_end_to_end_and_relion_reads_it(small_set, tmp_path):
    paths, maps = small_set
    out = tmp_path / "Refine3D"
    rc = cli_main(["refine", *_flags(paths, out, ["--ini_high", "25", "--auto_iter_max", "3", "--norm",
                                                  "--low_resol_join_halves", "40"])])
    assert rc == 0
    for name in ("run_it000_data.star", "run_it001_half1_model.star", "run_it001_half2_class001.mrc",
                 "run_it001_optimiser.star", "run_it001_sampling.star", "run_data.star", "run_model.star",
                 "run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc",
                 "run_progress.jsonl"):
        assert (out / name).is_file(), name
    _, parts, _ = read_particles(out / "run_data.star")
    assert set(np.unique(parts["rlnRandomSubset"])) == {1, 2}
    # refusing to overwrite an earlier run without --overwrite (exit code 2)
    assert cli_main(["refine", *_flags(paths, out, ["--auto_iter_max", "1"])]) == 2
    if shutil.which("relion_star_handler") is None:
        pytest.skip("Debian relion not installed: RELION interoperability not checked")
    r = subprocess.run(["relion_star_handler", "--i", str(out / "run_data.star"), "--o", str(tmp_path / "sh.star")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _, again, _ = read_particles(tmp_path / "sh.star")
    assert len(again) == len(parts)
    mask = tmp_path / "mask.mrc"
    write_map(mask, soft_sphere(BOX, 0.4 * BOX, 3.0).astype(np.float32), APIX)
    pp = tmp_path / "PostProcess"
    pp.mkdir()
    r = subprocess.run(["relion_postprocess", "--i", str(out / "run_half1_class001_unfil.mrc"),
                        "--i2", str(out / "run_half2_class001_unfil.mrc"), "--mask", str(mask),
                        "--o", str(pp / "postprocess"), "--angpix", str(APIX), "--adhoc_bfac", "0"],
                       capture_output=True, text=True)
    assert (pp / "postprocess.star").is_file(), r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.slow
def test_classification_two_classes_end_to_end(small_set, tmp_path):
    paths, maps = small_set
    out = tmp_path / "Class3D"
    rc = cli_main(["classify", *_flags(paths, out, ["--K", "2", "--iter", "3", "--tau2_fudge", "4",
                                                    "--ini_high", "25", "--firstiter_cc"])])
    assert rc == 0
    # after the cross-correlation iteration (RELION 3.1.3, maximizationOtherParameters / updateCurrentResolution):
    # class 1's spectra copied to class 2 for the seed iteration, tapered at ini_high, and ini_high's resolution
    m = read_star(out / "run_it001_model.star")
    assert float(m["model_general"]["rlnCurrentResolution"].iloc[0]) == pytest.approx(BOX * APIX / 5)  # 4.8 -> 5
    d1, d2 = (m[f"model_class_{c}"]["rlnSsnrMap"].to_numpy() for c in (1, 2))
    assert np.array_equal(d1, d2) and d1[1] > 0 and np.all(d1[6:] == 0)
    for name in ("run_it003_class001.mrc", "run_it003_class002.mrc", "run_it003_model.star", "run_it003_data.star"):
        assert (out / name).is_file(), name
    _, parts, _ = read_particles(out / "run_it003_data.star")
    _, truth, _ = read_particles(paths.truth_star)
    est = parts["rlnClassNumber"].to_numpy()
    lab = truth["rlnClassNumber"].to_numpy()
    acc = max(np.mean(est == lab), np.mean(est == 3 - lab))
    assert acc > 0.5  # both classes populated and better than chance against the true labels
    m1 = read_map(out / "run_it003_class001.mrc")[0].astype(np.float64)
    assert np.isfinite(m1).all() and fsc(m1, m1)[1] == pytest.approx(1.0)
    # RELION's accuracies: per class in every non-CC iteration (999 for a class below 1 %), overall = the minimum
    m3 = read_star(out / "run_it003_model.star")["model_classes"]
    dist, acc_r = m3["rlnClassDistribution"].to_numpy(), m3["rlnAccuracyRotations"].to_numpy()
    acc_t = m3["rlnAccuracyTranslationsAngst"].to_numpy()
    assert np.all((acc_r > 0) & (acc_r < 31) | (dist < 0.01) & (acc_r == 999))
    assert np.all((acc_t > 0) & (acc_t < 10.2 * APIX) | (dist < 0.01) & (acc_t == 999))
    opt = read_star(out / "run_it003_optimiser.star")["optimiser_general"]
    assert float(opt["rlnOverallAccuracyRotations"].iloc[0]) == pytest.approx(acc_r.min())
    assert float(opt["rlnOverallAccuracyTranslationsAngst"].iloc[0]) == pytest.approx(acc_t.min())


def test_coarse_precision_flag_sets_the_coarse_products(small_set, tmp_path, monkeypatch):
    # oracle: the backend defaults it overrides -- the E-step's coarse pass receives the flag's precision; on a CPU,
    # --coarse_precision float64 is the default (auto) run to the bit, and float32 is the run whose CPU default
    # were float32 (that of GPUs with slow double precision)
    from gerelion_dask.config import JobConfig
    from gerelion_dask.errors import InputError
    from gerelion_dask.expectation import estep, fine

    paths, _ = small_set
    seen = []
    original = estep.coarse_pass

    def spy(xp, pre, particles, model, settings, *a, **k):
        seen.append(settings.coarse_dtype)
        return original(xp, pre, particles, model, settings, *a, **k)

    monkeypatch.setattr(estep, "coarse_pass", spy)

    def run(name, extra):
        seen.clear()
        out = tmp_path / name
        assert cli_main(["classify", *_flags(paths, out, ["--iter", "1", "--ini_high", "25", "--in-process",
                                                          *extra])]) == 0
        _, parts, _ = read_particles(out / "run_it001_data.star")
        return set(seen), parts[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                                 "rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples"]].to_numpy()

    (s_auto, auto), (s64, f64) = run("a", []), run("b", ["--coarse_precision", "float64"])
    s32, f32 = run("c", ["--coarse_precision", "float32"])
    assert (s_auto, s64, s32) == ({"auto"}, {"float64"}, {"float32"})
    assert np.array_equal(auto, f64)
    monkeypatch.setitem(fine.FINE_LIMITS["cpu"], "coarse_dtype", "float32")
    assert np.array_equal(run("d", [])[1], f32)
    with pytest.raises(InputError, match="coarse_precision"):
        JobConfig(i="p.star", o="out/run", ref="ref.mrc", coarse_precision="float16").validate()


def test_gpu_tasks_hold_at_least_gpu_min_pool_particles(small_set, tmp_path, monkeypatch, caplog):
    # oracle: the rule written out -- when the plan says the tasks run on GPUs, a RELION-style --pool (particles per
    # CPU thread: its GUI passes 3) below GPU_MIN_POOL is raised to it with one warning; on a CPU --pool is kept
    import logging

    from gerelion_dask import driver, plan

    paths, _ = small_set
    sizes = []
    original = driver.expectation_pool

    def spy(images, pp, *a, **k):
        sizes.append(len(pp.index))
        return original(images, pp, *a, **k)

    monkeypatch.setattr(driver, "expectation_pool", spy)

    def run(name, pool, device):
        sizes.clear()
        flags = _flags(paths, tmp_path / name, ["--iter", "1", "--ini_high", "25", "--in-process"])
        flags[flags.index("--pool") + 1] = str(pool)
        flags[flags.index("--device") + 1] = device
        assert cli_main(["classify", *flags]) == 0
        return list(sizes)

    assert run("cpu", 40, "cpu") == [40] * 3
    monkeypatch.setattr(plan, "worker_backend", lambda device: "gpu")  # the plan of a GPU run (the E-step stays on
    monkeypatch.setattr(plan, "worker_gpu_memory", lambda device: 80 << 30)  # this machine's NumPy)
    with caplog.at_level(logging.WARNING, logger="gerelion_dask.driver"):
        assert run("gpu", 3, "auto") == [120]  # GPU_MIN_POOL (128) > the 120 particles: one task
    assert sum("--pool 3: here --pool counts the particles of one E-step task" in r.getMessage()
               for r in caplog.records) >= 1
    # --pool not given: one GPU task takes up to GPU_AUTO_POOL particles (all 120 here), a CPU task 64
    for name, device, want in (("gpu_auto", "auto", [120]), ("cpu_auto", "cpu", [64, 56])):
        sizes.clear()
        flags = _flags(paths, tmp_path / name, ["--iter", "1", "--ini_high", "25", "--in-process"])
        i = flags.index("--pool")
        del flags[i : i + 2]
        flags[flags.index("--device") + 1] = device
        with caplog.at_level(logging.INFO, logger="gerelion_dask.driver"):
            assert cli_main(["classify", *flags]) == 0
        assert sizes == want, name


def test_iterations_take_the_pool_of_their_search(small_set, tmp_path, monkeypatch):
    # oracle: the driver's rule written out -- an iteration with local searches cuts its tasks at the pool of local
    # searches (pool_for_inputs(local=True), also the default of a job that has any), a global one at
    # pool_for_inputs(local=False); here the rule's two pools are given as 50 and 30
    from gerelion_dask import driver, plan

    paths, _ = small_set
    seen = []
    original = driver.expectation_pool

    def spy(images, pp, model, settings, *a, **k):
        seen.append((settings.local_sigma_rot > 0, len(pp.index)))
        return original(images, pp, model, settings, *a, **k)

    monkeypatch.setattr(driver, "expectation_pool", spy)
    monkeypatch.setattr(plan, "pool_for_inputs", lambda cfg, inp, target, local=None: 50 if local is False else 30)
    for name, extra, want in (("global", [], [(False, 50), (False, 50), (False, 20)]),
                              ("local", ["--sigma_ang", "5"], [(True, 30)] * 4)):
        seen.clear()
        assert cli_main(["classify", *_flags(paths, tmp_path / name, ["--iter", "1", "--ini_high", "25",
                                                                      "--in-process", *extra])]) == 0
        assert seen == want, name


def test_pool_size_rules():
    # oracle: the rules of plan.task_pool_size written out -- a given --pool is kept (at least GPU_MIN_POOL on
    # GPUs); none given: CPU_AUTO_POOL on CPUs, GPU_AUTO_POOL on a GPU, at most two tasks' share per Dask worker
    # (not below GPU_MIN_POOL), halved while the plan's GPU bytes exceed those of GPU_MIN_POOL by more than
    # GPU_POOL_SHARE of the GPU
    from gerelion_dask.plan import CPU_AUTO_POOL, GPU_AUTO_POOL, GPU_MIN_POOL, GPU_POOL_SHARE, task_pool_size

    assert (CPU_AUTO_POOL, GPU_AUTO_POOL, GPU_MIN_POOL, GPU_POOL_SHARE) == (64, 4000, 128, 0.25)
    assert task_pool_size(3, "gpu") == 128 and task_pool_size(700, "gpu") == 700 and task_pool_size(3, "cpu") == 3
    assert task_pool_size(0, "cpu", 10**6, 8) == 64
    assert task_pool_size(0, "gpu") == 4000 and task_pool_size(0, "gpu", 50_000, 1) == 4000
    assert task_pool_size(0, "gpu", 2000, 4) == 250  # ceil(2000 / 8)
    assert task_pool_size(0, "gpu", 200, 4) == 128
    assert task_pool_size(0, "gpu", 10**6, 16) == 4000 and task_pool_size(0, "gpu", 40_000, 8) == 2500

    def gpu_bytes(B):  # 1 GB fixed, 10 MB a particle
        return 1e9 + 1e7 * B

    # over the base (2.28 GB at 128): 38.7 GB at 4000, 18.7 at 2000, 8.7 at 1000, 3.7 at 500, 1.2 at 250
    assert task_pool_size(0, "gpu", 10**5, 0, gpu_bytes, 160e9) == 4000  # within 40 GB
    assert task_pool_size(0, "gpu", 10**5, 0, gpu_bytes, 80e9) == 2000  # 38.7 > 20 GB; 18.7 fits
    assert task_pool_size(0, "gpu", 10**5, 0, gpu_bytes, 24e9) == 500  # within 6 GB
    assert task_pool_size(0, "gpu", 10**5, 0, gpu_bytes, 4e9) == 128  # never below GPU_MIN_POOL
    assert task_pool_size(300, "gpu", 10**5, 0, gpu_bytes, 4e9) == 300  # a given --pool is the user's


def test_bad_inputs_exit_2(small_set, tmp_path, capsys):
    # oracle: the rule -- one clear line naming the file or flag, exit code 2, no traceback
    paths, _ = small_set
    base = _flags(paths, tmp_path / "x", [])
    assert cli_main(["classify", *base, "--K", "0"]) == 2
    assert "--K 0" in capsys.readouterr().err
    assert cli_main(["refine", *base, "--sym", "Q7"]) == 2
    assert "unknown symmetry" in capsys.readouterr().err
    bad = [*base]
    bad[bad.index("--ref") + 1] = str(tmp_path / "missing.mrc")
    assert cli_main(["refine", *bad]) == 2
    assert "missing.mrc" in capsys.readouterr().err
    big = [*base]
    big[big.index("--particle_diameter") + 1] = str(10 * BOX * APIX)
    assert cli_main(["refine", *big]) == 2
    assert "larger than the box" in capsys.readouterr().err


def test_nan_particles_are_dropped_with_a_warning(small_set, tmp_path, caplog):
    # oracle: the rule for NaN/inf pixels -- the particles are dropped, counted in one warning, the run goes on
    import mrcfile

    paths, _ = small_set
    data = tmp_path / "data"
    shutil.copytree(paths.out_dir, data)
    with mrcfile.open(data / "particles.mrcs", mode="r+") as m:
        m.data[3, 5, 5] = np.nan
        m.data[10, 0, 0] = np.inf
    out = tmp_path / "Class3D"
    args = ["--i", str(data / "particles.star"), "--o", str(out / "run"), "--ref", str(data / paths.initial_reference.name),
            "--ctf", "--ctf_corrected_ref", "--particle_diameter", str(0.8 * BOX * APIX), "--healpix_order", "0",
            "--offset_range", "2", "--offset_step", "2", "--iter", "1", "--random_seed", "1", "--in-process",
            "--device", "cpu"]
    with caplog.at_level("WARNING"):
        assert cli_main(["classify", *args]) == 0
    assert any("dropped 2 of 120 particles" in r.getMessage() for r in caplog.records)
    _, parts, _ = read_particles(out / "run_it001_data.star")
    assert len(parts) == 118


def test_default_gpu_pool_leaves_room_for_local_searches():
    # oracle: the rule written out for a 256-px job on an 80 GB GPU -- auto-refine ends in local searches whose fine
    # rows grow with the pool: 40 bytes x 8 fine orientations x 8 significant samples x 25,934 likelihood pixels
    # = 66 MB a particle, so of 4000 / 2000 / 1000 / 500 / 250 particles only 250 stay within a quarter of the GPU
    # (with the plan's own growth); a classification (global searches) keeps 4000
    from types import SimpleNamespace as NS

    from gerelion_dask.config import JobConfig
    from gerelion_dask.plan import ExecutionTarget, _likelihood_pixels, plan_for_inputs, pool_for_inputs

    assert _likelihood_pixels(256) == 25934
    inp = NS(box=256, particles=NS(n=100_000), pixel_size=1.0, diameter=0.0)
    gpu = ExecutionTarget(0, "gpu", 80e9)
    refine = JobConfig(i="p.star", o="out/run", ref="r.mrc", auto_refine=True, split_random_halves=True)
    local = plan_for_inputs(refine, inp, None, target=gpu, pool=1000, local=True)
    assert local.sizes["fine_orientations"] == 8 * 8 * 1000
    assert local.parts["fine pass (per task)"] >= 40.0 * 8 * 8 * 1000 * 25934
    classify = JobConfig(i="p.star", o="out/run", ref="r.mrc", K=3)
    assert pool_for_inputs(refine, inp, gpu) == 250
    assert pool_for_inputs(classify, inp, gpu) == 4000
    # auto-refine's global iterations (before its local searches) take the classification's pool
    assert pool_for_inputs(refine, inp, gpu, local=False) == 4000
    assert pool_for_inputs(refine, inp, gpu, local=True) == 250
    assert pool_for_inputs(refine, inp, ExecutionTarget(0, "cpu", None)) == 64


def test_solvent_mask_flattens_the_references_and_is_named_in_the_optimiser(small_set, tmp_path, caplog):
    # oracle: RELION's --solvent_mask (ALGORITHM.md §5.5) -- with --flatten_solvent the iteration's map is zero where
    # the mask is zero (an off-centre slab here, so the soft sphere would leave it non-zero) and the optimiser file
    # names the mask; without --flatten_solvent the mask has no effect and a warning says so
    paths, _ = small_set
    z = np.arange(BOX)[:, None, None] * np.ones((1, BOX, BOX))
    mask = np.clip((z - BOX / 2 + 3) / 4, 0, 1).astype(np.float32)  # 0 for z < 9, 1 from z >= 13
    write_map(tmp_path / "mask.mrc", mask, APIX)
    common = ["--i", str(paths.particles_star), "--ref", str(paths.initial_reference), "--ctf", "--ctf_corrected_ref",
              "--particle_diameter", str(0.8 * BOX * APIX), "--healpix_order", "0", "--offset_range", "2",
              "--offset_step", "2", "--iter", "1", "--random_seed", "1", "--in-process", "--device", "cpu",
              "--solvent_mask", str(tmp_path / "mask.mrc")]
    assert cli_main(["classify", "--o", str(tmp_path / "a" / "run"), "--flatten_solvent", *common]) == 0
    vol, _ = read_map(tmp_path / "a" / "run_it001_class001.mrc")
    assert np.abs(vol[mask == 0]).max() == 0 and np.abs(vol[mask == 1]).max() > 0
    opt = read_star(tmp_path / "a" / "run_it001_optimiser.star")
    assert str(next(iter(opt.values()))["rlnSolventMaskName"].iloc[0]) == str(tmp_path / "mask.mrc")
    with caplog.at_level("WARNING"):
        assert cli_main(["classify", "--o", str(tmp_path / "b" / "run"), *common]) == 0
    assert any("has no effect without --flatten_solvent" in r.getMessage() for r in caplog.records)
    vol, _ = read_map(tmp_path / "b" / "run_it001_class001.mrc")
    assert np.abs(vol[mask == 0]).max() > 0
    # --solvent_mask2 (RELION's secondary mask): its region of the flattened map holds one value, its own average
    # (a slab inside the first mask's 1s here), and the optimiser file names it
    m2 = ((z >= 15) & (z < 18)).astype(np.float32)
    write_map(tmp_path / "mask2.mrc", m2, APIX)
    assert cli_main(["classify", "--o", str(tmp_path / "c" / "run"), "--flatten_solvent", *common,
                     "--solvent_mask2", str(tmp_path / "mask2.mrc")]) == 0
    vol, _ = read_map(tmp_path / "c" / "run_it001_class001.mrc")
    flat, _ = read_map(tmp_path / "a" / "run_it001_class001.mrc")
    assert np.ptp(vol[m2 == 1]) <= 1e-6 * np.abs(vol).max() < np.ptp(flat[m2 == 1])
    assert np.isclose(vol[m2 == 1][0], flat[m2 == 1].astype(np.float64).mean(), rtol=1e-4)
    assert np.array_equal(vol[m2 == 0], flat[m2 == 0])
    opt = read_star(tmp_path / "c" / "run_it001_optimiser.star")
    assert str(next(iter(opt.values()))["rlnSolventMask2Name"].iloc[0]) == str(tmp_path / "mask2.mrc")
    if shutil.which("relion_refine") is None:
        pytest.skip("Debian relion not installed: RELION's reading of the two masks not compared")
    # RELION 3.1.3 with the same masks: its map is zero where the solvent mask is, and one value in the region of
    # the second mask (1 = the region, as ours), not elsewhere
    (tmp_path / "rel").mkdir()
    r = subprocess.run(["relion_refine", "--i", paths.particles_star.name, "--ref", paths.initial_reference.name,
                        "--o", str(tmp_path / "rel" / "run"), "--iter", "1", "--K", "1", "--flatten_solvent",
                        "--solvent_mask", str(tmp_path / "mask.mrc"), "--solvent_mask2", str(tmp_path / "mask2.mrc"),
                        "--particle_diameter", str(0.8 * BOX * APIX), "--healpix_order", "0", "--offset_range", "2",
                        "--offset_step", "2", "--ctf", "--ctf_corrected_ref", "--random_seed", "1", "--j", "1"],
                       cwd=paths.out_dir, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    theirs, _ = read_map(tmp_path / "rel" / "run_it001_class001.mrc")
    assert np.abs(theirs[mask == 0]).max() == 0
    assert np.ptp(theirs[m2 == 1]) <= 1e-6 * np.abs(theirs).max() < np.ptp(theirs[(m2 == 0) & (mask == 1)])


def test_lowpass_mask_filters_its_region_at_relions_rounded_shell(small_set, tmp_path):
    # oracle: RELION 3.1.3's --lowpass_mask / --lowpass (lowPassFilterMap: the edge from one shell below to one above
    # ROUND(N a / lowpass)) -- with a solvent mask of zeros and a low-pass mask of ones the iteration's map is the
    # low-pass filtered reconstruction: at a shell of 4.4 nothing is left beyond radius 5 (RELION rounds to 4; an
    # unrounded edge would keep ~5 % of the amplitude at 5.1), in ours and, where installed, in relion_refine's
    # (measured: 1.9e-9 and 1.7e-9 of the low-frequency amplitude; 0.032 and 0.015 between radii 3.5 and 4.5)
    paths, _ = small_set
    write_map(tmp_path / "zero.mrc", np.zeros((BOX,) * 3, np.float32), APIX)
    write_map(tmp_path / "ones.mrc", np.ones((BOX,) * 3, np.float32), APIX)
    flags = ["--iter", "1", "--K", "1", "--flatten_solvent", "--solvent_mask", str(tmp_path / "zero.mrc"),
             "--lowpass_mask", str(tmp_path / "ones.mrc"), "--lowpass", str(BOX * APIX / 4.4), "--particle_diameter",
             str(0.8 * BOX * APIX), "--healpix_order", "0", "--offset_range", "2", "--offset_step", "2", "--ctf",
             "--ctf_corrected_ref", "--random_seed", "1"]
    k = np.fft.fftfreq(BOX) * BOX
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(BOX // 2 + 1)[None, None, :] ** 2)

    def beyond(path):  # amplitude at 5 < r <= 5.4 against that below radius 3
        F = np.abs(np.fft.rfftn(read_map(path)[0].astype(np.float64)))
        return F[(r > 5.01) & (r <= 5.4)].max() / F[r < 3].max()

    assert cli_main(["classify", "--i", str(paths.particles_star), "--o", str(tmp_path / "a" / "run"), "--ref",
                     str(paths.initial_reference), *flags, "--in-process", "--device", "cpu"]) == 0
    assert beyond(tmp_path / "a" / "run_it001_class001.mrc") < 1e-5
    assert cli_main(["classify", "--i", str(paths.particles_star), "--o", str(tmp_path / "b" / "run"),
                     "--ref", str(paths.initial_reference), "--lowpass_mask", str(tmp_path / "ones.mrc"),
                     "--flatten_solvent", "--in-process", "--device", "cpu"]) == 2  # no --lowpass: one line
    if shutil.which("relion_refine") is None:
        pytest.skip("Debian relion not installed: RELION's low-pass mask not compared")
    (tmp_path / "rel").mkdir()
    run = subprocess.run(["relion_refine", "--i", paths.particles_star.name, "--o", str(tmp_path / "rel" / "run"),
                          "--ref", paths.initial_reference.name, *flags, "--j", "1"], cwd=paths.out_dir,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert beyond(tmp_path / "rel" / "run_it001_class001.mrc") < 1e-5


def test_trust_ref_size_takes_a_reference_whose_header_voxel_size_is_wrong(small_set, tmp_path, caplog):
    # oracle: relion_refine's --trust_ref_size -- a reference whose header voxel size differs from the particles'
    # is an error (exit 2) without the flag and is used as it is, with a warning, with it
    paths, _ = small_set
    vol, _ = read_map(paths.initial_reference)
    write_map(tmp_path / "ref.mrc", vol, APIX * 1.2)
    args = ["--i", str(paths.particles_star), "--ref", str(tmp_path / "ref.mrc"), "--ctf", "--particle_diameter",
            str(0.8 * BOX * APIX), "--healpix_order", "0", "--offset_range", "2", "--offset_step", "2", "--iter", "1",
            "--random_seed", "1", "--in-process", "--device", "cpu"]
    assert cli_main(["classify", "--o", str(tmp_path / "a" / "run"), *args]) == 2
    with caplog.at_level("WARNING"):
        assert cli_main(["classify", "--o", str(tmp_path / "b" / "run"), "--trust_ref_size", *args]) == 0
    assert any("--trust_ref_size" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "b" / "run_it001_class001.mrc").is_file()


def test_ref_angpix_replaces_a_wrong_header_and_verb_0_is_quiet(small_set, tmp_path, caplog, capsys):
    # oracle: relion_refine's --ref_angpix and --verb -- a reference whose header says 1.2x the particles' pixel size
    # runs with --ref_angpix set to the particles' (its header is not read), and --verb 0 prints no progress: no
    # INFO records and no closing line, while the files are written as usual
    paths, _ = small_set
    vol, _ = read_map(paths.initial_reference)
    write_map(tmp_path / "ref.mrc", vol, APIX * 1.2)
    args = ["--i", str(paths.particles_star), "--ref", str(tmp_path / "ref.mrc"), "--ctf", "--particle_diameter",
            str(0.8 * BOX * APIX), "--healpix_order", "0", "--offset_range", "2", "--offset_step", "2", "--iter", "1",
            "--random_seed", "1", "--in-process", "--device", "cpu", "--ref_angpix", str(APIX), "--verb", "0"]
    capsys.readouterr()
    with caplog.at_level("INFO"):
        assert cli_main(["classify", "--o", str(tmp_path / "a" / "run"), *args]) == 0
    assert not [r for r in caplog.records if r.levelname == "INFO" and r.name.startswith("gerelion")]
    assert "done:" not in capsys.readouterr().out
    _, vs = read_map(tmp_path / "a" / "run_it001_class001.mrc")
    assert abs(vs - APIX) < 1e-4


def test_the_background_normalisation_check_warns_once_like_relion(small_set, tmp_path, caplog):
    # oracle: RELION 3.1's check in calculateSumOfPowerSpectraAndAverageImage (background outside the particle
    # diameter: |mean / std| > 0.5, std < 0.5 or std > 2 is warned about, once) written out with numpy -- the
    # simulated (normalised) images pass; the same images times 3 warn once, naming the first image, and
    # --dont_check_norm silences it
    import mrcfile

    from gerelion_dask.setup_job import background_stats, badly_normalised

    paths, _ = small_set
    img = mrcfile.read(paths.particles_mrcs).astype(np.float64)
    r = int(np.floor(0.8 * BOX * APIX / (2 * APIX) + 0.5))
    yy, xx = np.mgrid[:BOX, :BOX] - BOX // 2
    out = yy**2 + xx**2 > r * r
    want_m = np.array([im[out].mean() for im in img])
    want_s = np.array([im[out].std() for im in img])
    m, s = background_stats(img, r)
    assert np.allclose(m, want_m) and np.allclose(s, want_s)
    assert not badly_normalised(m, s).any()
    assert badly_normalised(np.array([0.6, 0.0, 0.0]), np.array([1.0, 0.4, 2.1])).all()
    folder = tmp_path / "scaled"
    shutil.copytree(paths.out_dir, folder)
    with mrcfile.open(folder / paths.particles_mrcs.name, "r+") as f:
        f.data[:] = f.data * 3
    args = ["--i", str(folder / paths.particles_star.name), "--ref", str(folder / paths.initial_reference.name),
            "--ctf", "--particle_diameter", str(0.8 * BOX * APIX), "--healpix_order", "0", "--offset_range", "2",
            "--offset_step", "2", "--iter", "1", "--random_seed", "1", "--in-process", "--device", "cpu"]
    for extra, n_warn in (([], 1), (["--dont_check_norm"], 0)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert cli_main(["classify", "--o", str(tmp_path / f"o{n_warn}" / "run"), *args, *extra]) == 0
        warned = [rec.getMessage() for rec in caplog.records if "not normalised" in rec.getMessage()]
        assert len(warned) == n_warn, warned
        if n_warn:
            assert "000001@" in warned[0] and "--dont_check_norm" in warned[0]


def test_classification_without_alignment_keeps_poses_and_finds_the_classes(small_set, tmp_path):
    # oracles: the simulated truth and RELION 3.1.3 -- `classify --skip_align` from the true poses (truth.star) keeps
    # every particle's angles and offsets, writes rlnDoSkipAlign, and separates the two phantoms; Debian's
    # relion_refine --skip_align on the same particles and flags (where installed) separates them too, and the two
    # programs put the same particles together
    import starfile

    paths, _ = small_set
    out = tmp_path / "Class3D"
    flags = ["--ref", str(paths.initial_reference), "--ctf", "--particle_diameter", str(0.8 * BOX * APIX), "--K", "2",
             "--iter", "4", "--skip_align", "--tau2_fudge", "4", "--flatten_solvent", "--zero_mask", "--random_seed",
             "1"]
    assert cli_main(["classify", "--i", str(paths.truth_star), "--o", str(out / "run"), "--in-process", "--device",
                     "cpu", *flags]) == 0
    truth = starfile.read(paths.truth_star)["particles"]
    ours = starfile.read(out / "run_it004_data.star")["particles"]
    for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        assert np.allclose(ours[c], truth[c], atol=1e-6), c
    agree = (ours.rlnClassNumber.values == truth.rlnClassNumber.values).mean()
    assert max(agree, 1 - agree) >= 0.95
    opt = next(iter(read_star(out / "run_it004_optimiser.star").values()))
    assert int(opt["rlnDoSkipAlign"].iloc[0]) == 1
    # iteration 1's changes are measured from the STAR file's poses and classes, as RELION's (not 999)
    first = next(iter(read_star(out / "run_it001_optimiser.star").values()))
    it1 = starfile.read(out / "run_it001_data.star")["particles"]
    assert float(first["rlnChangesOptimalOrientations"].iloc[0]) < 1e-6
    assert float(first["rlnChangesOptimalOffsets"].iloc[0]) < 1e-6
    moved = (it1.rlnClassNumber.values != truth.rlnClassNumber.values).mean()
    assert np.isclose(float(first["rlnChangesOptimalClasses"].iloc[0]), moved)
    assert int(first["rlnSmallestChangesClasses"].iloc[0]) == int(np.floor(moved + 0.5))
    if shutil.which("relion_refine") is None:
        pytest.skip("Debian relion not installed: RELION's classification without alignment not compared")
    rel = tmp_path / "Rel"
    rel.mkdir()
    flags[1] = paths.initial_reference.name
    r = subprocess.run(["relion_refine", "--i", paths.truth_star.name, "--o", str(rel / "run"), "--j", "1", "--pad",
                        "2", *flags], cwd=paths.out_dir, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    theirs = starfile.read(rel / "run_it004_data.star")["particles"]
    rel_first = next(iter(read_star(rel / "run_it001_optimiser.star").values()))
    assert float(rel_first["rlnChangesOptimalOrientations"].iloc[0]) < 1e-3  # RELION measures from the STAR too
    assert float(rel_first["rlnChangesOptimalOffsets"].iloc[0]) < 1e-3
    agree = (theirs.rlnClassNumber.values == truth.rlnClassNumber.values).mean()
    assert max(agree, 1 - agree) >= 0.95
    same = (theirs.rlnClassNumber.values == ours.rlnClassNumber.values).mean()
    assert max(same, 1 - same) >= 0.95


def _rescaled_copy(paths, tmp_path, apix: float, shifts_px=None):
    """``truth.star`` of the small set with its pixel size set to ``apix`` (offsets kept in pixels), optionally moved
    by ``shifts_px (n, 2)`` whole pixels, one micrograph (one RELION 3.1 noise group), and the initial reference
    with that voxel size; written beside the stacks (RELION reads the names from there).  Returns the STAR's and
    the map's names and the true offsets in pixels."""
    import starfile

    d = starfile.read(paths.truth_star)
    p = d["particles"]
    true_px = np.stack([p.rlnOriginXAngst, p.rlnOriginYAngst], 1) / APIX
    moved = true_px + (0 if shifts_px is None else shifts_px)
    p["rlnOriginXAngst"], p["rlnOriginYAngst"] = moved[:, 0] * apix, moved[:, 1] * apix
    p["rlnMicrographName"] = "mic1.mrc"
    d["optics"]["rlnImagePixelSize"] = apix
    star = paths.out_dir / f"moved_{apix:g}.star"
    starfile.write(d, star, overwrite=True)
    vol, _ = read_map(paths.initial_reference)
    ref = paths.out_dir / f"ref_{apix:g}.mrc"
    write_map(ref, vol, apix)
    return star.name, ref.name, true_px


def test_classification_with_translations_only_keeps_angles_and_matches_relion(small_set, tmp_path):
    # oracles: the simulated truth and RELION 3.1.3 -- `classify --skip_rotate` from particles whose offsets were
    # moved by up to 2 px keeps every particle's angles, writes rlnDoSkipRotate, brings the offsets back towards the
    # truth and separates the two phantoms; beside Debian's relion_refine --skip_rotate (where installed) one
    # iteration gives the same offset for >= 95 % of the particles and the same mean Pmax within 5 %.  That
    # comparison runs at 1 A/px: RELION (3.1-5.0, CPU and GPU code) adds the grid's translations in Angstroms to the
    # rounded old offset in pixels before the offset prior, so beyond 1 A/px its prior is sharper than the model's
    # (at 5 A/px a 1-px step costs 25x its own squared distance); ours keeps pixels throughout.
    import starfile

    paths, _ = small_set
    rng = np.random.default_rng(7)
    shifts = rng.integers(-2, 3, (120, 2))
    star, ref, true_px = _rescaled_copy(paths, tmp_path, APIX, shifts)
    flags = ["--ref", str(paths.out_dir / ref), "--ctf", "--particle_diameter", str(0.8 * BOX * APIX), "--K", "2",
             "--iter", "4", "--skip_rotate", "--tau2_fudge", "4", "--flatten_solvent", "--zero_mask", "--random_seed", "1",
             "--offset_range", "3", "--offset_step", "1"]
    out = tmp_path / "Class3D"
    assert cli_main(["classify", "--i", str(paths.out_dir / star), "--o", str(out / "run"), "--in-process",
                     "--device", "cpu", *flags]) == 0
    truth = starfile.read(paths.truth_star)["particles"]
    ours = starfile.read(out / "run_it004_data.star")["particles"]
    for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        assert np.allclose(ours[c], truth[c], atol=1e-6), c
    got = np.stack([ours.rlnOriginXAngst, ours.rlnOriginYAngst], 1) / APIX
    err0, err = np.abs(true_px + shifts - true_px).mean(), np.abs(got - true_px).mean()
    assert err < 0.5 * err0, (err, err0)
    agree = (ours.rlnClassNumber.values == truth.rlnClassNumber.values).mean()
    assert max(agree, 1 - agree) >= 0.95
    opt = next(iter(read_star(out / "run_it004_optimiser.star").values()))
    assert int(opt["rlnDoSkipRotate"].iloc[0]) == 1 and int(opt["rlnDoSkipAlign"].iloc[0]) == 0
    if shutil.which("relion_refine") is None:
        pytest.skip("Debian relion not installed: RELION's translational searches not compared")
    star1, ref1, _ = _rescaled_copy(paths, tmp_path, 1.0, shifts)
    one = ["--ref", ref1, "--ctf", "--particle_diameter", str(0.8 * BOX), "--K", "1", "--iter", "1", "--skip_rotate",
           "--zero_mask", "--random_seed", "1", "--offset_range", "3", "--offset_step", "1", "--offset", "2"]
    ours1 = ["--ref", str(paths.out_dir / ref1)] + one[2:]
    assert cli_main(["classify", "--i", str(paths.out_dir / star1), "--o", str(tmp_path / "O1" / "run"),
                     "--in-process", "--device", "cpu", *ours1]) == 0
    rel = tmp_path / "Rel"
    rel.mkdir()
    r = subprocess.run(["relion_refine", "--i", star1, "--o", str(rel / "run"), "--j", "1", "--pad", "2", *one],
                       cwd=paths.out_dir, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    a = starfile.read(tmp_path / "O1" / "run_it001_data.star")["particles"]
    b = starfile.read(rel / "run_it001_data.star")["particles"]
    same = (np.abs(a.rlnOriginXAngst - b.rlnOriginXAngst) < 1e-3) & (np.abs(a.rlnOriginYAngst - b.rlnOriginYAngst) < 1e-3)
    assert same.mean() >= 0.95, same.mean()
    pa, pb = a.rlnMaxValueProbDistribution.mean(), b.rlnMaxValueProbDistribution.mean()
    assert abs(pa - pb) < 0.05 * pb, (pa, pb)
    assert np.allclose(a.rlnAngleRot, b.rlnAngleRot, atol=1e-4)


def test_a_star_of_references_names_maps_relative_to_its_folder_or_the_project(small_set, tmp_path, monkeypatch):
    # oracle: RELION's file names (relative to the project directory, where it runs) and ours for stacks (the STAR
    # file's folder first) -- a references STAR in a job folder may name its maps either way; a missing one is
    # named in a one-line error
    paths, _ = small_set
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Maps").mkdir()
    (tmp_path / "Refs").mkdir()
    vol, _ = read_map(paths.initial_reference)
    write_map(tmp_path / "Maps" / "a.mrc", vol, APIX)
    write_map(tmp_path / "Refs" / "b.mrc", vol, APIX)
    star = tmp_path / "Refs" / "refs.star"
    star.write_text("data_\nloop_\n_rlnReferenceImage #1\nMaps/a.mrc\nb.mrc\n")  # project-relative, folder-relative
    args = ["--i", str(paths.particles_star), "--ref", "Refs/refs.star", "--K", "2", "--ctf", "--particle_diameter",
            str(0.8 * BOX * APIX), "--healpix_order", "0", "--offset_range", "2", "--offset_step", "2", "--iter", "1",
            "--random_seed", "1", "--in-process", "--device", "cpu"]
    assert cli_main(["classify", "--o", "C/run", *args]) == 0
    assert (tmp_path / "C" / "run_it001_class002.mrc").is_file()
    star.write_text("data_\nloop_\n_rlnReferenceImage #1\nMaps/a.mrc\nMaps/missing.mrc\n")
    assert cli_main(["classify", "--o", "D/run", *args]) == 2


def test_no_norm_and_no_scale_override_norm_and_scale_as_in_relion():
    # oracle: relion_refine's parser (--no_norm / --no_scale switch the corrections off whatever --norm / --scale
    # say) -- and the compatibility flags RELION's GUI writes are accepted
    from gerelion_dask.cli import _job_config, refine_parser

    base = ["--i", "p.star", "--o", "o/run", "--ref", "r.mrc", "--norm", "--scale"]
    p = refine_parser("gerelion classify", True)
    on = _job_config(p.parse_args(base), True)
    off = _job_config(p.parse_args(base + ["--no_norm", "--no_scale", "--keep_scratch", "--onthefly_shifts",
                                           "--failsafe_threshold", "40", "--dont_check_norm"]), True)
    assert on.norm and on.scale and not off.norm and not off.scale and off.dont_check_norm


def test_limit_tilt_searches_relions_directions(small_set, tmp_path):
    # oracle: relion_refine 3.1.3 --limit_tilt -- the sampling.star of one classification iteration lists the same
    # coarse directions as RELION's (where installed) and says the limit; every particle's tilt stays on the kept side
    # of it within one fine angular step (the grid's perturbation and oversampling move the samples a little)
    import starfile

    paths, _ = small_set
    limit = 50.0  # side views (the other sign: tests/test_sampling.py)
    flags = ["--ref", paths.initial_reference.name, "--ctf", "--particle_diameter", str(0.8 * BOX * APIX), "--K", "1",
             "--iter", "1", "--zero_mask", "--random_seed", "1", "--healpix_order", "1", "--offset_range", "3",
             "--offset_step", "1.5", "--limit_tilt", str(limit)]
    ours = tmp_path / "O"
    flags_here = ["--ref", str(paths.initial_reference)] + flags[2:]
    assert cli_main(["classify", "--i", str(paths.particles_star), "--o", str(ours / "run"), "--in-process",
                     "--device", "cpu", *flags_here]) == 0
    s = starfile.read(ours / "run_it001_sampling.star")
    assert float(s["sampling_general"]["rlnTiltAngleLimit"]) == limit
    d = s["sampling_directions"]
    t = starfile.read(ours / "run_it001_data.star")["particles"].rlnAngleTilt.to_numpy()
    folded = np.abs(np.where(t > 90, t - 180, t))
    fine_step = 15.0  # HEALPix order 1's 30 degrees, oversampled once
    assert len(d) < 48 and (folded >= limit - fine_step).all()
    if shutil.which("relion_refine") is None:
        pytest.skip("Debian relion not installed: RELION's direction list not compared")
    rel = tmp_path / "R"
    rel.mkdir()
    r = subprocess.run(["relion_refine", "--i", paths.particles_star.name, "--o", str(rel / "run"), "--j", "1",
                        "--pad", "2", *flags], cwd=paths.out_dir, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    dr = starfile.read(rel / "run_it001_sampling.star")["sampling_directions"]
    mine = np.sort(np.c_[d.rlnAngleRot, d.rlnAngleTilt], axis=0)
    theirs = np.sort(np.c_[dr.rlnAngleRot, dr.rlnAngleTilt], axis=0)
    assert mine.shape == theirs.shape and np.allclose(mine, theirs, atol=1e-3)


def test_separate_angle_widths_follow_relions_rule(small_set, tmp_path):
    # oracle: RELION 3.1's selectOrientationsWithNonZeroPriorProbability -- with --sigma_rot and --sigma_tilt both
    # set the directions take the larger width and psi --sigma_psi, so `--sigma_rot 10 --sigma_tilt 6 --sigma_psi 10`
    # is `--sigma_ang 10` (every output equal); --sigma_psi left out searches every psi (a different run)
    import starfile

    paths, _ = small_set
    base = ["--i", str(paths.truth_star), "--ref", str(paths.initial_reference), "--ctf", "--particle_diameter",
            str(0.8 * BOX * APIX), "--K", "1", "--iter", "1", "--healpix_order", "2", "--offset_range", "2",
            "--offset_step", "1", "--zero_mask", "--random_seed", "1", "--in-process", "--device", "cpu"]
    runs = {"ang": ["--sigma_ang", "10"], "sep": ["--sigma_rot", "10", "--sigma_tilt", "6", "--sigma_psi", "10"],
            "all_psi": ["--sigma_rot", "10", "--sigma_tilt", "10"]}
    out = {}
    for name, extra in runs.items():
        assert cli_main(["classify", "--o", str(tmp_path / name / "run"), *base, *extra]) == 0
        out[name] = starfile.read(tmp_path / name / "run_it001_data.star")["particles"]
    num = [c for c in out["ang"].columns if out["ang"][c].dtype.kind in "fi"]
    assert out["ang"][num].equals(out["sep"][num])
    a, _ = read_map(tmp_path / "ang" / "run_it001_class001.mrc")
    b, _ = read_map(tmp_path / "sep" / "run_it001_class001.mrc")
    assert np.array_equal(a, b)
    assert (out["all_psi"].rlnNrOfSignificantSamples.values != out["ang"].rlnNrOfSignificantSamples.values).any()


def test_coarse_size_caps_the_coarse_pass_as_relion(small_set, tmp_path, monkeypatch):
    # oracle: RELION 3.1's updateImageSizeAndResolutionPointers -- with --coarse_size C the coarse pass's image size
    # is min(the sampling's size, C) in every iteration (and never above the current size); optimiser.star says C;
    # an odd C is refused
    from gerelion_dask.expectation import estep
    from gerelion_dask.maximization.schedule import coarse_size

    paths, _ = small_set
    seen = []
    inner = estep.coarse_pass

    def record(xp, pre, particles, model, settings, pri, cache=None):
        seen.append((settings.coarse_size, settings.preprocess.current_size))
        return inner(xp, pre, particles, model, settings, pri, cache)

    monkeypatch.setattr(estep, "coarse_pass", record)
    base = ["--i", str(paths.truth_star), "--ref", str(paths.initial_reference), "--ctf", "--particle_diameter",
            str(0.8 * BOX * APIX), "--K", "1", "--iter", "1", "--healpix_order", "2", "--sigma_ang", "5",
            "--offset_range", "1", "--offset_step", "1", "--zero_mask", "--random_seed", "1", "--in-process",
            "--device", "cpu"]  # (local searches from the true poses: a quick E-step at HEALPix order 2)
    assert cli_main(["classify", "--o", str(tmp_path / "free" / "run"), *base]) == 0
    free = sorted(set(seen))
    seen.clear()
    assert cli_main(["classify", "--o", str(tmp_path / "cap" / "run"), *base, "--coarse_size", "12"]) == 0
    capped = sorted(set(seen))
    want = {coarse_size(BOX, APIX, 2, 0.8 * BOX * APIX, cur) for _, cur in free}
    assert {c for c, _ in free} == want and max(want) > 12  # the cap acts
    assert {c for c, _ in capped} == {min(w, 12) for w in want}
    opt = next(iter(read_star(tmp_path / "cap" / "run_it001_optimiser.star").values()))
    assert int(opt["rlnMaximumCoarseImageSize"].iloc[0]) == 12
    assert cli_main(["classify", "--o", str(tmp_path / "odd" / "run"), *base, "--coarse_size", "13"]) == 2


def test_strict_lowres_exp_high_passes_the_e_step_references(small_set, tmp_path, monkeypatch):
    # oracle: RELION 3.1's setFourierTransformMaps(strict_lowres_exp) -- every reference the E-step (and the
    # accuracy estimate) builds carries min_ires = ROUND(N a / limit); optimiser.star says the limit; the run's
    # probabilities change (a different mean Pmax)
    import starfile

    from gerelion_dask.ops import projector

    paths, _ = small_set
    seen = []
    inner = projector.ReferenceSpec.build

    def build(self, xp=None):
        seen.append(self.min_ires)
        return inner(self, xp)

    monkeypatch.setattr(projector.ReferenceSpec, "build", build)
    base = ["--i", str(paths.truth_star), "--ref", str(paths.initial_reference), "--ctf", "--particle_diameter",
            str(0.8 * BOX * APIX), "--K", "1", "--iter", "1", "--healpix_order", "2", "--sigma_ang", "5",
            "--offset_range", "1", "--offset_step", "1", "--zero_mask", "--random_seed", "1", "--in-process",
            "--device", "cpu"]
    assert cli_main(["classify", "--o", str(tmp_path / "a" / "run"), *base]) == 0
    assert set(seen) == {0}
    seen.clear()
    limit = 40.0  # Å: shell ROUND(24 x 5 / 40) = 3
    assert cli_main(["classify", "--o", str(tmp_path / "b" / "run"), *base, "--strict_lowres_exp", str(limit)]) == 0
    assert 3 in seen and set(seen) <= {0, 3}  # (the M-step's tau2 spectrum is taken before the high-pass: 0)
    opt = next(iter(read_star(tmp_path / "b" / "run_it001_optimiser.star").values()))
    assert float(opt["rlnLowresLimitExpectation"].iloc[0]) == limit
    pa = starfile.read(tmp_path / "a" / "run_it001_data.star")["particles"].rlnMaxValueProbDistribution.mean()
    pb = starfile.read(tmp_path / "b" / "run_it001_data.star")["particles"].rlnMaxValueProbDistribution.mean()
    assert pa != pb
