"""Python client API: start a refinement or classification and watch it through a handle.

    import gerelion_dask as gd
    from distributed import Client

    job = gd.refine3d("particles.star", "initial.mrc", "Refine3D/job001/run", client=Client("tcp://host:8786"),
                      ini_high=60, particle_diameter=200, ctf=True, firstiter_cc=True, healpix_order=2)
    job.status()          # 'pending' | 'running' | 'finished' | 'failed' | 'cancelled'
    job.iteration         # last complete iteration (its files are on disc)
    job.history           # one dict per iteration: resolution, changes, class fractions, stage times, memory
    job.cancel()          # stop within the current iteration; the last complete iteration's files stay intact
    res = job.result()    # waits; output paths and the final maps as NumPy arrays (re-raises the job's error)

``refine3d``/``classify3d`` return at once: the driver (:func:`gerelion_dask.driver.run_job`, the same one as the
command line) runs in a background thread.  ``client``: ``None`` runs the E-step in this process; a
``distributed.Client`` (e.g. connected to ``gerelion cluster start``'s scheduler) runs it on that cluster's workers
and is left open; ``"local"`` starts a local cluster for the job and closes it at the end; a ``tcp://`` address or a
scheduler file path connects to that scheduler for the job.  ``relion_flags`` are ``relion_refine``'s flag names
without the dashes (``healpix_order=2``, ``K=3``, ``ctf=True``; see :class:`gerelion_dask.config.JobConfig`); bad
settings raise :class:`~gerelion_dask.errors.InputError` at once, before the thread starts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

__all__ = ["refine3d", "classify3d", "Job", "JobOutput", "JobCancelled"]


class JobCancelled(Exception):
    """Raised by :meth:`Job.result` of a cancelled job (the files of its last complete iteration are on disc)."""


@dataclass
class JobOutput:
    """What :meth:`Job.result` returns."""

    output_root: str
    files: dict  # {"data": path, "model": [paths], "maps": [[paths]], "unfil": [paths] (auto-refine)}
    maps: list  # final maps, one (N, N, N) float array per class
    half_maps: list  # auto-refine: the two unfiltered half maps; else empty
    resolution_angst: float
    history: list = field(default_factory=list)


def _record_dict(rec) -> dict:
    return {"iteration": rec.iteration, "resolution_angst": float(rec.resolution_angst),
            "current_size": rec.current_size, "healpix_order": rec.healpix_order,
            "changes_orientations_deg": float(rec.changes_orient), "changes_offsets_angst": float(rec.changes_offset),
            "changes_classes": float(rec.changes_class), "class_fractions": [float(x) for x in rec.class_fractions],
            "ave_pmax": float(rec.ave_pmax), "seconds": dict(rec.seconds), "memory": dict(rec.memory)}


class Job:
    """Handle of a job running in a background thread (see the module docstring)."""

    def __init__(self, cfg, client=None, device: str = "auto", workers: int | None = None, progress=False,
                 plots: bool = True):
        from .progress import ProgressBar

        self.config = cfg
        self._client_spec = client
        self._device = device
        self._workers = workers
        self._plots = plots
        self._bar = ProgressBar() if progress == "auto" else (ProgressBar(enabled=True) if progress else None)
        self._status = "pending"
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._history: list = []
        self._stage = "pending"
        self._pools = (0, 0)
        self._error: BaseException | None = None
        self._result: JobOutput | None = None
        self._thread = threading.Thread(target=self._main, name=f"gerelion-{Path(cfg.o).name}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------------- the handle

    def status(self) -> str:
        return self._status

    @property
    def iteration(self) -> int:
        """The last complete iteration (0 before the first one ends)."""
        with self._lock:
            return self._history[-1]["iteration"] if self._history else 0

    @property
    def history(self) -> list[dict]:
        with self._lock:
            return [dict(h) for h in self._history]

    @property
    def current_stage(self) -> str:
        """What the job does now: 'pending', 'prepare', 'E-step' (with :attr:`pools`), 'M-step', 'write', ..."""
        return self._stage

    @property
    def pools(self) -> tuple[int, int]:
        """E-step pools done / total in the current iteration."""
        return self._pools

    def cancel(self) -> None:
        """Stop at the next pool or iteration boundary; files of complete iterations are left as they are."""
        self._cancel.set()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float | None = None) -> JobOutput:
        """Wait for the end (``TimeoutError`` after ``timeout`` s); re-raise the job's error; the outputs."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"job {self.config.o} still {self._status} after {timeout} s")
        if self._status == "cancelled":
            raise JobCancelled(f"job {self.config.o} was cancelled after iteration {self.iteration}")
        if self._error is not None:
            raise self._error
        return self._result

    def __repr__(self) -> str:
        return f"<gerelion Job {self.config.o}: {self._status}, iteration {self.iteration}, {self._stage}>"

    # ------------------------------------------------------------------------- progress hooks (driver thread)

    def _check(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled("cancelled")

    def iteration_started(self, iteration, resolution_angst=float("nan")) -> None:
        self._check()
        self._stage, self._pools = "prepare", (0, 0)
        if self._bar:
            self._bar.iteration_started(iteration, resolution_angst)

    def stage(self, name) -> None:
        self._stage = name
        if self._bar:
            self._bar.stage(name)

    def __call__(self, done, total) -> None:
        self._pools = (done, total)
        if self._bar:
            self._bar(done, total)
        self._check()

    def iteration_finished(self, rec) -> None:
        self._stage = "write"
        if self._bar:
            self._bar.iteration_finished(rec)

    # ------------------------------------------------------------------------------------------ the thread

    def _writer(self):
        from .job_files import make_writer

        write = make_writer(self.config.o, plots=self._plots)

        def writer(iteration, *args, **kw):
            files = write(iteration, *args, **kw)
            rec = args[5] if len(args) > 5 else None
            if iteration != "final" and rec is not None:
                with self._lock:  # the iteration's files are on disc now
                    self._history.append(_record_dict(rec))
            return files

        return writer

    def _runner(self):
        from .driver import InProcessRunner

        spec = self._client_spec
        if spec is None:
            return InProcessRunner(self._device), None
        from .distributed.runner import DaskRunner

        if isinstance(spec, str):
            from .distributed.cluster import make_client

            if spec == "local":
                client, cluster = make_client(n_workers=self._workers, dashboard_address=None,
                                              gpus=self._device != "cpu")
            elif "://" in spec:
                client, cluster = make_client(scheduler_address=spec)
            else:
                client, cluster = make_client(scheduler_file=spec)
            return DaskRunner(client, device=self._device), (client, cluster)
        return DaskRunner(spec, device=self._device), None

    def _main(self) -> None:
        from .driver import run_job

        owned = None
        try:
            self._status = "running"
            runner, owned = self._runner()
            res = run_job(self.config, runner=runner, writer=self._writer(), progress=self)
            self._result = _output(res)
            self._stage, self._status = "done", "finished"
        except JobCancelled:
            self._stage, self._status = "cancelled", "cancelled"
        except BaseException as e:  # noqa: BLE001  (re-raised by result())
            self._error = e
            self._stage, self._status = "failed", "failed"
        finally:
            if owned is not None:
                from .distributed.cluster import close_client

                close_client(*owned)


def _output(res) -> JobOutput:
    from .backend import to_host
    from .io.mrc import read_map

    files = res.final_files or {}
    maps = [np.asarray(to_host(m)) if m is not None else None for m in res.model.maps[0]]
    half = [read_map(p)[0] for p in files.get("unfil", [])]
    last = res.iterations[-1] if res.iterations else None
    return JobOutput(res.output_root, files, maps, half, float(last.resolution_angst) if last else float("nan"),
                     [_record_dict(r) for r in res.iterations])


def _config(particles, reference, output, auto_refine: bool, flags: dict):
    from .config import JobConfig
    from .errors import InputError

    names = {f.name for f in fields(JobConfig)} - {"i", "o", "ref"}
    kw = {}
    for k, v in flags.items():
        key = k.lstrip("-")
        if key not in names:
            raise InputError(None, f"unknown setting {k}={v!r}", "use relion_refine's flag names without dashes, "
                             "e.g. healpix_order=2 (see gerelion_dask.config.JobConfig)")
        kw[key] = v
    if auto_refine:
        kw["auto_refine"] = kw["split_random_halves"] = True
    return JobConfig(i=str(particles), o=str(output), ref=str(reference), **kw).validate()


def _start(particles, reference, output, auto_refine, client, device, workers, progress, plots, flags) -> Job:
    from .cli import _check_output

    cfg = _config(particles, reference, output, auto_refine, flags)
    _check_output(cfg)
    return Job(cfg, client=client, device=device, workers=workers, progress=progress, plots=plots)


def refine3d(particles, reference, output, client=None, *, device: str = "auto", workers: int | None = None,
             progress=False, plots: bool = True, **relion_flags) -> Job:
    """Start a gold-standard 3D auto-refinement (``relion_refine --auto_refine --split_random_halves``).

    ``particles``: STAR file; ``reference``: initial map (MRC); ``output``: output root (``Refine3D/job001/run``).
    ``progress``: ``True`` draws the terminal progress bar, ``"auto"`` only when stderr is a terminal.
    Returns a :class:`Job` at once.
    """
    return _start(particles, reference, output, True, client, device, workers, progress, plots, relion_flags)


def classify3d(particles, reference, output, client=None, *, device: str = "auto", workers: int | None = None,
               progress=False, plots: bool = True, **relion_flags) -> Job:
    """Start a 3D classification (``K=`` classes, ``iter=`` iterations); returns a :class:`Job` at once."""
    return _start(particles, reference, output, False, client, device, workers, progress, plots, relion_flags)
