"""Watching a run: memory use and a terminal progress bar per iteration.

The driver (:func:`gerelion_dask.driver.run_job`) calls its ``progress`` argument as ``progress(done, total)`` after
each E-step pool and, where the object has them, the hooks ``iteration_started(iteration, resolution_angst)``,
``stage(name)`` and ``iteration_finished(record)``.  :class:`ProgressBar` draws one line per iteration on a terminal
(pools done / total, stage, resolution) and writes nothing when its stream is not a terminal (logs, batch jobs).

:func:`memory_usage` is what each ``<root>_progress.jsonl`` line carries under ``memory``: the peak resident set
size of this process so far, of the Dask workers (when the runner has a client), and GPU memory where CuPy is
already in use (CuPy is never imported here).
"""

from __future__ import annotations

import sys
import time

__all__ = ["ProgressBar", "memory_usage", "peak_rss_mib", "gpu_memory_mib"]

_MIB = 1024.0 * 1024.0


def peak_rss_mib() -> float:
    """Peak resident set size of this process since it started (MiB)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / _MIB if sys.platform == "darwin" else r / 1024.0  # bytes on macOS, KiB on Linux


def gpu_memory_mib() -> dict | None:
    """CuPy's memory pool (in use, held) and the device's used memory, in MiB; None where CuPy is not in use."""
    cp = sys.modules.get("cupy")
    if cp is None:
        return None
    try:
        pool = cp.get_default_memory_pool()
        free, total = cp.cuda.runtime.memGetInfo()
        return {"pool_used": pool.used_bytes() / _MIB, "pool_held": pool.total_bytes() / _MIB,
                "device_used": (total - free) / _MIB, "device_total": total / _MIB}
    except Exception:  # no device visible to this process although CuPy was imported
        return None


def _worker_memory() -> dict:
    return {"peak_rss_mib": peak_rss_mib(), "gpu_mib": gpu_memory_mib()}


def memory_usage(client=None, timeout: float = 5.0) -> dict:
    """Memory of the run so far: this process, and the workers of ``client`` (largest worker) when given."""
    out = {"peak_rss_mib": round(peak_rss_mib(), 1)}
    gpu = gpu_memory_mib()
    if gpu:
        out["gpu_mib"] = {k: round(v, 1) for k, v in gpu.items()}
    if client is not None:
        try:
            per = client.run(_worker_memory, wait=True, on_error="ignore")
        except Exception:  # workers busy or gone: memory is a report, never a reason to stop the run
            per = {}
        if per:
            out["workers"] = len(per)
            out["worker_peak_rss_mib"] = round(max(v["peak_rss_mib"] for v in per.values()), 1)
            used = [v["gpu_mib"]["pool_held"] for v in per.values() if v.get("gpu_mib")]
            if used:
                out["worker_gpu_pool_held_mib"] = round(max(used), 1)
    return out


class ProgressBar:
    """One line per iteration on a terminal: ``it 3 [#####-----] 12/20 pools  E-step  12.80 Å  34 s``.

    Quiet (draws nothing) unless ``stream`` (default ``sys.stderr``) is a terminal or ``enabled=True``.
    """

    def __init__(self, stream=None, enabled: bool | None = None, width: int = 24):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.width = width
        self.iteration = 0
        self.resolution = float("nan")
        self.stage_name = "setup"
        self.done = self.total = 0
        self._t0 = time.time()

    def iteration_started(self, iteration: int, resolution_angst: float = float("nan")) -> None:
        self.iteration, self.resolution = int(iteration), float(resolution_angst)
        self.done = self.total = 0
        self.stage_name = "prepare"
        self._t0 = time.time()
        self._draw()

    def stage(self, name: str) -> None:
        self.stage_name = name
        self._draw()

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = int(done), int(total)
        self._draw()

    def iteration_finished(self, rec) -> None:
        self.resolution = float(rec.resolution_angst)
        self.stage_name = "done"
        self._draw(end="\n")

    def line(self) -> str:
        frac = self.done / self.total if self.total else 0.0
        fill = int(round(frac * self.width))
        res = f"{self.resolution:.2f} Å" if self.resolution == self.resolution else "-"
        return (f"it {self.iteration:3d} [{'#' * fill}{'-' * (self.width - fill)}] {self.done}/{self.total} pools  "
                f"{self.stage_name:8s} {res:>9s}  {time.time() - self._t0:5.0f} s")

    def _draw(self, end: str = "") -> None:
        if not self.enabled:
            return
        self.stream.write("\r\x1b[K" + self.line() + end)
        self.stream.flush()
