"""Workers as SLURM jobs, against a real single-node SLURM (slurmctld + slurmd + munged) started here from scratch by
``deploy/slurm/ci-single-node.sh`` and stopped at the end.  Oracles: ``squeue`` (the worker jobs exist while the run
needs them and are gone after), the jobs' ids as dask-jobqueue submitted them (every E-step task ran in one of
them), and the run's own output files.

Skipped, with the reason, only where SLURM cannot be installed or started (not root, no apt, a foreign SLURM
configured on this machine).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import child_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "slurm" / "ci-single-node.sh"
BOX, APIX, N_PARTICLES = 24, 4.0, 60


@pytest.fixture(scope="module")
def slurm():
    """A running single-node SLURM; the daemons this fixture started are stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd needs root (deploy/slurm/ci-single-node.sh writes /etc/slurm)")
    try:
        out = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"SLURM could not be started: {e}")
    if out.returncode != 0:
        pytest.skip(f"SLURM not installable/startable here (exit {out.returncode}): "
                    f"{(out.stderr or out.stdout).strip()[-400:]}")
    try:
        yield out.stdout.strip()
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=60)


def squeue(name: str) -> list[tuple[str, str]]:
    """``[(job id, state), ...]`` of the jobs called ``name`` that SLURM still lists."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]


def all_jobs() -> list[str]:
    """Every job SLURM still lists (any name, any state)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from gerelion_dask.simulate import SimulationSpec, phantom_map, simulate_dataset

    spec = SimulationSpec(n_particles=N_PARTICLES, box=BOX, apix=APIX, snr=0.5, seed=3, ini_lowpass_angst=30.0,
                          boxpad=1, projector_padding=1)
    return simulate_dataset([phantom_map(BOX, APIX)], spec, tmp_path_factory.mktemp("slurm_data"))


def _refine_flags(dataset, out: Path, iters: int = 3) -> list[str]:
    return ["--i", str(dataset.particles_star), "--o", str(out / "run"), "--ref", str(dataset.initial_reference),
            "--ini_high", "30", "--ctf", "--healpix_order", "1", "--auto_iter_max", str(iters), "--pool", "13",
            "--random_seed", "5", "--offset_range", "2", "--offset_step", "1", "--maxsig", "10", "--device", "cpu"]


class Watcher(threading.Thread):
    """Polls squeue, and the scheduler's workers with their SLURM job ids, until stopped."""

    def __init__(self, name, cluster=None, client=None, period=0.25):
        super().__init__(daemon=True)
        self.name_, self.cluster, self.client, self.period = name, cluster, client, period
        self.seen_jobs: dict[str, set] = {}  # job id -> states seen
        self.max_running = 0
        self.worker_job: dict[str, str] = {}  # worker address -> SLURM job id
        self.stop_event = threading.Event()

    def poll(self):
        jobs = squeue(self.name_)
        for jid, state in jobs:
            self.seen_jobs.setdefault(jid, set()).add(state)
        self.max_running = max(self.max_running, sum(s == "RUNNING" for _, s in jobs))
        if self.cluster is not None:
            ids = {name: job.job_id for name, job in list(self.cluster.workers.items())}
            try:
                info = self.client.scheduler_info(n_workers=-1)["workers"]
            except Exception:
                return
            for addr, w in info.items():
                if ids.get(w.get("name")):
                    self.worker_job[addr] = ids[w["name"]]

    def run(self):
        while not self.stop_event.is_set():
            self.poll()
            time.sleep(self.period)

    def stop(self):
        self.stop_event.set()
        self.join(10)


def test_refine_with_adaptive_slurm_workers(slurm, dataset, tmp_path, monkeypatch):
    """The E-step runs in SLURM jobs that the adaptive cluster submits (up to 2) and cancels when idle."""
    import dask
    import dask_jobqueue  # noqa: F401  (adds its config defaults first: leaving config.set must not remove them)
    from distributed import get_task_stream

    from gerelion_dask.cli import _job_config, refine_parser
    from gerelion_dask.distributed.cluster import close_client, make_client
    from gerelion_dask.distributed.runner import DaskRunner
    from gerelion_dask.distributed.slurm import SlurmOptions
    from gerelion_dask.driver import run_job
    from gerelion_dask.job_files import make_writer

    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    # the node has as many CPUs as this machine (2 in CI): a job of an earlier test still ending (KillWait) would keep
    # the second worker job pending through this short run (seen once in a full-suite run)
    t0 = time.time()
    while all_jobs() and time.time() - t0 < 60:
        time.sleep(0.5)
    name = f"gerelion-ci-{uuid.uuid4().hex[:6]}"
    flags = _refine_flags(dataset, tmp_path, iters=5)
    cfg = _job_config(refine_parser("gerelion refine", False).parse_args(flags), False)
    opts = SlurmOptions(min_jobs=1, max_jobs=2, cores=1, memory="2GB", walltime="00:10:00", interface="lo",
                        log_directory=str(tmp_path / "slurm-logs"))
    # quick adaptive decisions (defaults: every 1 s, 3 alike in a row, 5 s of work per worker), but a worker job is
    # only given up after 20 alike (6 s): an iteration's E-step here is well under a second (tenth session), and
    # with 3 the adaptive cluster cancelled the second job 0.9 s after submitting it, before SLURM had started it
    # (slurmctld.log; three full-suite runs of twelve)
    with dask.config.set({"jobqueue.slurm.name": name, "distributed.adaptive.interval": "300ms",
                          "distributed.adaptive.wait-count": 20, "distributed.adaptive.target-duration": "1s"}):
        client, cluster = make_client(dashboard_address="127.0.0.1:0", gpus=False, slurm=opts)
        watcher = Watcher(name, cluster, client)
        watcher.start()
        try:
            assert "#SBATCH -J " + name in cluster.job_script() and "--resources GPU=1" in cluster.job_script()
            with get_task_stream(client) as ts:
                res = run_job(cfg, runner=DaskRunner(client, device="cpu"), writer=make_writer(cfg.o))
            assert len(res.iterations) >= 2 and Path(f"{cfg.o}_class001.mrc").is_file()
            # scale-down while the cluster still runs: back to min_jobs once the workers sit idle
            t0 = time.time()
            while len(squeue(name)) > opts.min_jobs and time.time() - t0 < 40:
                time.sleep(0.3)
            left = squeue(name)
            assert len(left) == opts.min_jobs, f"adaptive scaling kept {left} after the run"
        finally:
            watcher.stop()
            close_client(client, cluster)
    # scale-up: two worker jobs ran at the same time
    assert watcher.max_running == 2, (watcher.seen_jobs, watcher.max_running)
    # every E-step task ran on a worker of a SLURM job that squeue listed
    estep = [t for t in ts.data if str(t["key"]).startswith("estep-")]
    assert len(estep) >= 2 * 5  # 2+ iterations of 5-6 pools
    jobs_of_tasks = {watcher.worker_job.get(t["worker"]) for t in estep}
    assert None not in jobs_of_tasks and jobs_of_tasks <= set(watcher.seen_jobs), (jobs_of_tasks, watcher.seen_jobs)
    # after close: every job is gone from the queue
    t0 = time.time()
    while squeue(name) and time.time() - t0 < 20:
        time.sleep(0.2)
    assert squeue(name) == []


def test_sbatch_driver_script_runs_refine_with_slurm_workers(slurm, dataset, tmp_path):
    """deploy/slurm/gerelion-refine.sbatch: the driver is itself a SLURM job and submits its worker jobs."""
    tag = uuid.uuid4().hex[:6]
    driver, worker = f"gerelion-driver-{tag}", f"gerelion-worker-{tag}"
    env = child_env(GERELION=f"{shlex.quote(sys.executable)} -m gerelion_dask.cli", DASK_JOBQUEUE__SLURM__NAME=worker)
    cmd = ["sbatch", "--parsable", "-J", driver, "-c", "1", "--mem=2G", "-o", str(tmp_path / "driver-%j.out"),
           "--chdir", str(tmp_path), str(ROOT / "deploy" / "slurm" / "gerelion-refine.sbatch"),
           "refine", *_refine_flags(dataset, tmp_path), "--slurm-max-jobs", "1", "--slurm-memory", "2GB",
           "--slurm-interface", "lo", "--slurm-log-directory", str(tmp_path / "slurm-logs"),
           "--dashboard-address", "127.0.0.1:0"]
    jid = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    watcher = Watcher(worker)
    watcher.start()
    t0 = time.time()
    try:
        while squeue(driver) and time.time() - t0 < 150:
            time.sleep(0.3)
    finally:
        watcher.stop()
    log = (tmp_path / f"driver-{jid.split(';')[0]}.out").read_text()
    assert not squeue(driver), "driver job still running:\n" + log[-3000:]
    assert "done: " in log and (tmp_path / "run_class001.mrc").is_file(), log[-3000:]
    assert watcher.seen_jobs, "no worker job was ever listed:\n" + log[-3000:]
    t0 = time.time()
    while squeue(worker) and time.time() - t0 < 20:
        time.sleep(0.2)
    assert squeue(worker) == []


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_shipped_jobqueue_profiles_make_the_job_scripts_they_document(profile, monkeypatch):
    """deploy/slurm/jobqueue-*.yaml through --slurm-config: GPU jobs ask for their GPU and run dask-cuda's worker,
    one process; CPU jobs run one single-threaded worker per core; both give every worker a GPU=1 slot and export
    one BLAS thread.  (Only the generated scripts: no GPU node here.)"""
    import copy

    import dask
    from dask_jobqueue import SLURMCluster

    from gerelion_dask.distributed.slurm import SlurmOptions, load_config_file, slurm_cluster_kwargs

    saved = copy.deepcopy(dask.config.config)
    try:
        load_config_file(ROOT / "deploy" / "slurm" / f"jobqueue-{profile}.yaml")
        kw = slurm_cluster_kwargs(SlurmOptions(gpus=profile == "gpu", interface="lo", queue="short"), None)
        cluster = SLURMCluster(**kw)
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    finally:
        dask.config.config.clear()
        dask.config.config.update(saved)
    lines = script.splitlines()
    assert "#SBATCH -p short" in lines  # the flag wins over the file
    assert "export OPENBLAS_NUM_THREADS=1" in lines
    worker = lines[-1]
    assert "--resources GPU=1" in worker and "--interface lo" in worker
    if profile == "gpu":
        assert "#SBATCH --gres=gpu:1" in lines and "-m dask_cuda.cli tcp://" in worker
        assert "--nworkers" not in worker and "--nthreads 8" in worker
    else:
        assert not any("gres" in x for x in lines) and "-m distributed.cli.dask_worker" in worker
        assert "--nworkers 16" in worker and "--nthreads 1" in worker


@pytest.mark.parametrize("extra, message", [
    (["--in-process"], "--cluster slurm starts its own scheduler"),
    (["--scheduler-address", "tcp://127.0.0.1:1"], "--cluster slurm starts its own scheduler"),
    (["--slurm-min-jobs", "0"], "--slurm-min-jobs 0 must be at least 1"),
    (["--slurm-max-jobs", "1", "--slurm-min-jobs", "2"], "--slurm-max-jobs 1 is below --slurm-min-jobs 2"),
    (["--slurm-config", "/nonexistent/jobqueue.yaml"], "SLURM configuration file not found"),
])
def test_cluster_slurm_flag_errors_exit_2_before_anything_is_submitted(dataset, tmp_path, capsys, extra, message):
    from gerelion_dask.cli import main

    code = main(["refine", *_refine_flags(dataset, tmp_path), "--cluster", "slurm", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
