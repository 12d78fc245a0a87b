"""RELION's pipeline control (``--pipeline_control <job folder>``): the files its GUI and schedulers watch.

Under control a job folder gets ``RELION_JOB_EXIT_SUCCESS``, ``RELION_JOB_EXIT_FAILURE`` or
``RELION_JOB_EXIT_ABORTED`` when the job ends (older ones are removed when it starts), and a
``RELION_JOB_ABORT_NOW`` file that someone puts there (the GUI's "Abort" button) stops the job before its next
iteration: the file is removed and ``RELION_JOB_EXIT_ABORTED`` written, as RELION does.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ABORT_NOW", "EXIT_ABORTED", "EXIT_FAILURE", "EXIT_SUCCESS", "AbortWatch", "JobAborted", "clear",
           "mark"]

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"


class JobAborted(Exception):
    """A ``RELION_JOB_ABORT_NOW`` file asked the job to stop."""


def clear(folder: str | Path) -> None:
    """Remove the exit files of an earlier run of the job (RELION does so when a job starts)."""
    for name in (EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED):
        (Path(folder) / name).unlink(missing_ok=True)


def mark(folder: str | Path, name: str) -> None:
    """Write the exit file ``name``; for an abort, also remove the ``RELION_JOB_ABORT_NOW`` request."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).touch()
    if name == EXIT_ABORTED:
        (folder / ABORT_NOW).unlink(missing_ok=True)


class AbortWatch:
    """A progress object (:mod:`gerelion_dask.progress`) that raises :class:`JobAborted` when an iteration is about to
    start and ``folder`` holds ``RELION_JOB_ABORT_NOW``; every call is passed on to ``inner``."""

    def __init__(self, folder: str | Path, inner=None):
        self.folder, self.inner = Path(folder), inner

    def _pass(self, name, *args):
        f = getattr(self.inner, name, None)
        if f is not None:
            f(*args)

    def iteration_started(self, iteration: int, *args) -> None:
        if (self.folder / ABORT_NOW).exists():
            raise JobAborted(f"{self.folder / ABORT_NOW} asked the job to stop before iteration {iteration}")
        self._pass("iteration_started", iteration, *args)

    def stage(self, *args) -> None:
        self._pass("stage", *args)

    def iteration_finished(self, *args) -> None:
        self._pass("iteration_finished", *args)

    def __call__(self, *args) -> None:
        if callable(self.inner):
            self.inner(*args)

    def __getattr__(self, name):  # any other hook the inner object has
        return getattr(self.inner, name)
