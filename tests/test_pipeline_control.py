"""RELION's pipeline control (``--pipeline_control``): the exit files its GUI and schedulers watch, and the abort
request.  Oracle: RELION's pipeline_control convention (a job folder gets RELION_JOB_EXIT_SUCCESS / _FAILURE /
_ABORTED; a RELION_JOB_ABORT_NOW file stops the job, is removed, and RELION_JOB_EXIT_ABORTED is written)."""

from __future__ import annotations

import pytest

from gerelion_dask import pipeline_control as pc
from gerelion_dask.cli import main as cli_main
from conftest import TINY_APIX, TINY_BOX

BOX, APIX = TINY_BOX, TINY_APIX


def _args(paths, job, extra=()):
    return ["classify", "--i", str(paths.particles_star), "--o", str(job / "run"), "--ref",
            str(paths.initial_reference), "--ctf", "--particle_diameter", str(0.8 * BOX * APIX), "--healpix_order",
            "0", "--offset_range", "1", "--offset_step", "1", "--iter", "1", "--random_seed", "1", "--in-process",
            "--device", "cpu", "--pipeline_control", str(job) + "/", *extra]


def test_success_failure_and_abort_files(tiny_set, tmp_path):
    job = tmp_path / "Class3D" / "job003"
    job.mkdir(parents=True)
    (job / pc.EXIT_FAILURE).touch()  # from an earlier attempt: removed when the job starts
    assert cli_main(_args(tiny_set, job)) == 0
    assert sorted(p.name for p in job.glob("RELION_JOB_*")) == [pc.EXIT_SUCCESS]
    assert (job / "run_it001_model.star").is_file()
    # a bad flag under pipeline control: exit 2 and the failure file
    assert cli_main(_args(tiny_set, job, ["--K", "0"])) == 2
    assert sorted(p.name for p in job.glob("RELION_JOB_*")) == [pc.EXIT_FAILURE]
    # an abort request: the job stops before its first iteration, removes the request, says it was aborted
    job2 = tmp_path / "Class3D" / "job004"
    job2.mkdir()
    (job2 / pc.ABORT_NOW).touch()
    assert cli_main(_args(tiny_set, job2)) == 130
    assert sorted(p.name for p in job2.glob("RELION_JOB_*")) == [pc.EXIT_ABORTED]
    assert not list(job2.glob("run_it001*"))


def test_abort_watch_stops_before_the_next_iteration_and_passes_calls_on(tmp_path):
    calls = []

    class Inner:
        def iteration_started(self, it, res):
            calls.append(("started", it))

        def stage(self, name):
            calls.append(("stage", name))

        def __call__(self, done, total):
            calls.append(("pools", done, total))

    w = pc.AbortWatch(tmp_path, Inner())
    w.iteration_started(1, 30.0)
    w.stage("E-step")
    w(2, 5)
    (tmp_path / pc.ABORT_NOW).touch()
    with pytest.raises(pc.JobAborted, match="before iteration 2"):
        w.iteration_started(2, 20.0)
    assert calls == [("started", 1), ("stage", "E-step"), ("pools", 2, 5)]
    pc.AbortWatch(tmp_path / "nowhere").stage("M-step")  # no inner object: nothing to pass on
