"""A task that kills every worker that runs it ends the run with one clear line, and the last complete iteration
stays usable.

The worker deaths are real: a worker plugin (installed on the scheduler the run joins with --scheduler-file) calls
``os._exit`` in the worker process when a task of iteration 2, pool 3 starts executing, on every worker that tries
it; the nannies restart the workers and the scheduler gives up after ``allowed-failures`` + 1 deaths (KilledWorker).
Oracles: the command line's exit code and stderr, the files on disk, and ``--continue`` from them finishing the run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import child_env

BOX, APIX, N_PARTICLES = 24, 4.0, 60


def _killer(prefix: str):
    from distributed import WorkerPlugin

    class KillWhenStarting(WorkerPlugin):
        """Ends the worker process (no cleanup, like a segfault or the OOM killer) when a task named ``prefix*``
        starts executing."""

        name = "kill-when-starting"

        def __init__(self, prefix):
            self.prefix = prefix

        def transition(self, key, start, finish, **kwargs):
            if finish == "executing" and str(key).startswith(self.prefix):
                os._exit(17)

    return KillWhenStarting(prefix)


def _cli(*args, timeout=300):
    env = child_env(one_blas_thread=True)
    return subprocess.run([sys.executable, "-m", "gerelion_dask.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_task_that_kills_every_worker_ends_the_run_with_one_line(tmp_path):
    import dask
    from distributed import Client

    from gerelion_dask.checkpoint import checkpoint_for_optimiser
    from gerelion_dask.distributed.cluster import new_local_cluster
    from gerelion_dask.simulate import SimulationSpec, phantom_map, simulate_dataset

    spec = SimulationSpec(n_particles=N_PARTICLES, box=BOX, apix=APIX, snr=0.5, seed=3, ini_lowpass_angst=30.0,
                          boxpad=1, projector_padding=1)
    data = simulate_dataset([phantom_map(BOX, APIX)], spec, tmp_path / "data")
    out = tmp_path / "Refine3D"
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):  # give up after 2 deaths (default 4)
        cluster = new_local_cluster(n_workers=2, dashboard_address=None, gpus=False)
    client = Client(cluster)
    try:
        sched = tmp_path / "scheduler.json"
        client.write_scheduler_file(str(sched))
        client.register_plugin(_killer("estep-2-2-"))  # iteration 2, third pool (0-based index 2)
        flags = ["--i", str(data.particles_star), "--ref", str(data.initial_reference), "--ini_high", "30",
                 "--ctf", "--healpix_order", "1", "--offset_range", "2", "--offset_step", "1", "--maxsig", "10",
                 "--random_seed", "5", "--pool", "13", "--device", "cpu", "--auto_iter_max", "3",
                 "--scheduler-file", str(sched)]
        r = _cli("refine", "--o", str(out / "run"), *flags)
        assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
        assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
        errors = [x for x in r.stderr.splitlines() if x.startswith("gerelion: error:")]
        assert len(errors) == 1, r.stderr[-3000:]
        line = errors[0]
        # the pool that kills is pool 3 (half 1's third pool, particles 27-...); distributed also counts a death
        # against the pools a dying worker held queued, so the pool named is pool 3 or one queued beside it: the
        # line must name a pool of iteration 2 with its particles and half set
        assert re.match(r"gerelion: error: iteration 2: pool [1-6] of 6 \(particles \d+-\d+ of half [12]\) "
                        r"was lost with 2 workers that died: worker process died \(last on ", line), line
        opt = out / "run_it001_optimiser.star"
        assert line.endswith(f"the last complete iteration is run_it001: rerun with --continue {opt}"), line
        # the last complete iteration is on disk and whole; nothing of iteration 2 was written
        for name in ("run_it001_data.star", "run_it001_half1_model.star", "run_it001_half2_class001.mrc",
                     "run_it001_sampling.star", "run_it001_optimiser.star"):
            assert (out / name).is_file(), name
        assert not list(out.glob("run_it002*")) and not (out / "run_data.star").exists()
        _, ck = checkpoint_for_optimiser(opt)
        assert ck.iteration == 1
        # the advice works: without the fault, --continue finishes the run from those files
        client.unregister_worker_plugin("kill-when-starting")
        again = _cli("refine", "--continue", str(opt), "--scheduler-file", str(sched))
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert (out / "run_it002_optimiser.star").is_file() and (out / "run_data.star").is_file()
    finally:
        client.close()
        cluster.close()
