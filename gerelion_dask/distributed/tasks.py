"""Functions that run on Dask workers: the expectation task of one pool and the steps of its reduction.

Every task is a pure function of its arguments (pool rows, the iteration's model and settings): a task lost with its
worker reruns elsewhere with the same result.  A task reads its own images (from ``particles.zarr``, or through a
picklable :class:`~gerelion_dask.io.particles.ParticleSet`) and, on a worker with a GPU, moves them and the
references to CuPy; the reference transforms are put on the device (and all host arrays of the model and settings
re-aligned, :func:`realign`) once per worker and model, not once per task.  Partial sums stay where they were made
(on the GPU) through the reduction tree; :func:`to_host` is the last step, so only host arrays travel to the driver.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..backend import SizedByArrays
from ..expectation.partials import Partials, PoolResult

log = logging.getLogger(__name__)

__all__ = ["PoolOutput", "estep_task", "power_task", "to_host", "worker_array_module", "device_model",
           "read_task_images", "ImageSource", "realign"]


@dataclass(frozen=True)
class PoolOutput(SizedByArrays):
    """Partial sums of some pools of one half set plus their per-particle results, tagged with the pool indices.

    ``a + b`` adds the partial sums (refusing different halves) and concatenates the results, so the tree of
    :mod:`~gerelion_dask.distributed.reduce` carries the small per-particle results up with the sums: the driver
    gathers one object per half set.
    """

    partials: Partials
    results: tuple  # ((pool index, PoolResult), ...)

    def __add__(self, other: PoolOutput) -> PoolOutput:
        return PoolOutput(self.partials + other.partials, self.results + other.results)


@dataclass(frozen=True)
class ImageSource:
    """Where a task reads its images: a store path (Zarr) or a picklable ``read_images(rows)`` callable."""

    zarr_path: str | None = None
    read_images: Any = None


def read_task_images(source: ImageSource, selection) -> np.ndarray:
    """Images of one pool, float32 ``(B, D, D)``: store rows (``(start, stop)`` or indices) or particle rows."""
    if source.zarr_path is not None:
        from .store import read_store_rows

        return read_store_rows(source.zarr_path, selection)
    return np.asarray(source.read_images(selection), dtype=np.float32)


_READ_AHEAD = None  # this process's ReadAhead, made by the first task that reads ahead


@functools.lru_cache(maxsize=2)
def worker_array_module(device: str = "auto"):
    """``cupy`` on a worker that sees a GPU (unless ``device == "cpu"``), else ``numpy``; decided once per process."""
    if device == "cpu":
        return np
    from ..backend import gpu_count

    if gpu_count() > 0:
        import cupy

        return cupy
    return np


def realign(obj):
    """``obj`` with every NumPy array that is not aligned replaced by an aligned copy (dataclasses, lists and tuples
    are walked; anything else is returned as it is).

    Arrays that reach a worker as out-of-band pickle buffers are views into received frames at any byte offset
    (measured: a scattered complex128 reference at address % 64 = 33, ``flags.aligned`` False), and NumPy runs its
    slow unaligned loops on them.
    """
    if isinstance(obj, np.ndarray):
        return obj if obj.flags.aligned else obj.copy()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            if f.init:
                v = getattr(obj, f.name)
                new = realign(v)
                if new is not v:
                    changes[f.name] = new
        return dataclasses.replace(obj, **changes) if changes else obj
    if isinstance(obj, list | tuple) and type(obj) in (list, tuple):
        new = [realign(x) for x in obj]
        return obj if all(a is b for a, b in zip(new, obj, strict=True)) else type(obj)(new)
    return obj


_PREPARED: dict[tuple, tuple[Any, Any]] = {}  # (what, id(host object)) -> (host object, prepared object)
_GENERATION: list = [None]  # the iteration (runner call tag) whose objects _PREPARED holds


def _drop_prepared(keep=()) -> bool:
    """Forget the prepared objects of this process but those of ``keep`` (keys ``(what, id)``) and give the device
    memory they held back to the device; true when anything was dropped."""
    stale = [key for key in _PREPARED if key not in keep]
    for key in stale:
        del _PREPARED[key]
    if stale and "cupy" in sys.modules:
        sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
    return bool(stale)


def _cached(what: str, obj, make, generation=None):
    """``make(obj)``, once per worker process for the same host object (the scattered model or settings).

    The cache keeps the host object alive beside its prepared copy, so an ``id`` is never reused for another
    object while cached; at most eight entries are kept.  A task of a new ``generation`` (the runner's tag of an
    iteration) drops everything an earlier one prepared first: the previous iteration's references and projection
    caches would otherwise hold device memory (up to ``cache_bytes`` each) through the next iteration.
    """
    if generation is not None and generation != _GENERATION[0]:
        _drop_prepared()
        _GENERATION[0] = generation
    key = (what, id(obj))
    hit = _PREPARED.get(key)
    if hit is not None and hit[0] is obj:
        return hit[1]
    prepared = make(obj)
    while len(_PREPARED) >= 8:
        _PREPARED.pop(next(iter(_PREPARED)))
    _PREPARED[key] = (obj, prepared)
    return prepared


def device_model(model, xp):
    """The model with aligned host arrays and its reference transforms on ``xp``'s device: a
    :class:`~gerelion_dask.ops.projector.ReferenceSpec` (a map) is transformed there, a made transform is copied."""
    from ..ops.projector import ReferenceSpec

    model = realign(model)

    def on_device(r):
        if r is None:
            return None
        if isinstance(r, ReferenceSpec):
            return r.build(xp)
        return r if xp is np else replace(r, data=xp.asarray(r.data))

    refs = [on_device(r) for r in model.refs]
    return model if all(a is b for a, b in zip(refs, model.refs, strict=True)) else replace(model, refs=refs)


def _read_key(tag: str, source: ImageSource, selection) -> tuple:
    sel = tuple(selection) if isinstance(selection, tuple) else ("rows", np.asarray(selection).tobytes())
    # a store by its path; a scattered reader by identity (one object per worker while its runner lives)
    return tag, source.zarr_path if source.zarr_path is not None else id(source.read_images), sel


def worker_read_ahead():
    """This process's :class:`~gerelion_dask.io.readahead.ReadAhead` (made on first use)."""
    global _READ_AHEAD
    if _READ_AHEAD is None:
        from ..io.readahead import ReadAhead

        _READ_AHEAD = ReadAhead()
    return _READ_AHEAD


def estep_task(source: ImageSource, selection, particles, model, settings, index: int,
               device: str = "auto", read_ahead: tuple | None = None) -> PoolOutput:
    """Expectation of one pool on this worker: read the images, run the E-step, keep the sums on the device.

    ``read_ahead`` ``(tag, next selection or None)``: the images are taken from a read started by an earlier task
    of this worker under ``tag`` (the iteration's task tag), and the next selection (the pool placed next on this
    worker) is read in the background while this one computes.  The result never depends on it.
    """
    from ..expectation.estep import expectation_pool
    from ..expectation.fine import ProjectionCache, fine_limits

    xp = worker_array_module(device)
    tag = None
    if read_ahead is None:
        host_images = read_task_images(source, selection)
    else:
        tag, following = read_ahead
        ahead = worker_read_ahead()
        host_images = ahead.take(_read_key(tag, source, selection), lambda: read_task_images(source, selection))
        if following is not None:
            ahead.start(_read_key(tag, source, following), lambda: read_task_images(source, following))
    images = xp.asarray(host_images)
    del host_images
    host_model, host_settings, particles = model, settings, realign(particles)

    def prepared():
        model = _cached(f"model-{device}", host_model, lambda m: device_model(m, xp), tag)
        settings = _cached("settings", host_settings, realign, tag)
        # projections shared by the pools of this iteration and half set that run on this worker (keyed, like the
        # device copy of the model, by the scattered model object: a new iteration brings a new one)
        cache = _cached(f"projections-{device}", host_model,
                        lambda m: ProjectionCache(fine_limits(xp)["cache_bytes"]), tag)
        return model, settings, cache

    # at a pool's first out-of-memory error, what this worker holds for other pools (the other half set's references
    # and projection cache) goes before the pool's chunks shrink
    mine = {(f"model-{device}", id(host_model)), ("settings", id(host_settings)),
            (f"projections-{device}", id(host_model))}

    def run() -> PoolOutput:
        part, res = expectation_pool(images, particles, *prepared(), release=lambda: _drop_prepared(keep=mine))
        return PoolOutput(part, ((int(index), res),))

    try:
        return run()
    except MemoryError as err:
        # making the references, or the pool even when split down to single particles (expectation_pool's own
        # retries): this worker's references and projection caches for other pools go, and the pool runs again
        why, before = str(err).splitlines()[0][:160] if str(err) else type(err).__name__, _device_memory(xp)
    _drop_prepared()  # outside the handler, whose traceback holds the failed attempt's arrays
    log.warning("pool %d: out of memory (%s) with %s; dropped this worker's references and projection caches (%s "
                "now), running the pool again", index, why, before, _device_memory(xp))
    try:
        return run()
    except MemoryError as err:
        raise MemoryError(f"pool {index}: out of memory again after dropping this worker's caches ({err}); device "
                          f"memory: {_device_memory(xp)}") from None


def _device_memory(xp) -> str:
    """What holds memory in this worker, for out-of-memory messages: the CuPy pool's live and held bytes, the
    prepared objects (references, projection caches) and the task results Dask keeps here (the reduction tree's
    partial sums live on the device)."""
    from ..backend import deep_nbytes

    gib = 2.0**-30
    parts = []
    if xp is not np:
        pool = xp.get_default_memory_pool()
        parts.append(f"CuPy pool {pool.used_bytes() * gib:.1f} GiB in use of {pool.total_bytes() * gib:.1f} GiB held")
    prepared = {}
    for (what, _), (_, obj) in _PREPARED.items():  # a ProjectionCache counts its own bytes
        size = obj.nbytes if isinstance(getattr(obj, "nbytes", None), int) else deep_nbytes(obj)
        prepared[what] = prepared.get(what, 0) + size
    parts.append("prepared " + (", ".join(f"{k} {v * gib:.1f} GiB" for k, v in prepared.items()) or "nothing"))
    try:
        from distributed import get_worker

        state = get_worker().state
        parts.append(f"{len(state.data)} task results of {state.nbytes * gib:.1f} GiB kept by Dask")
    except (ImportError, ValueError, AttributeError):  # not in a worker (a task called on its own)
        pass
    return "; ".join(parts)


def power_task(source: ImageSource, selection, optics_index, ps, device: str = "auto"):
    """The :class:`~gerelion_dask.setup_job.PowerSums` of one pool's images, on this worker's device."""
    from ..setup_job import power_sums

    xp = worker_array_module(device)
    return power_sums(xp.asarray(read_task_images(source, selection)), optics_index, ps)


def hold(obj):
    """An input of the iteration (model, settings) as a task result: when every worker holding it dies, the
    scheduler recomputes it from the graph, where scattered data would be lost with its workers."""
    return obj


def to_host(out: PoolOutput) -> PoolOutput:
    """The reduced output with its volumes copied to host memory (the last task of a half set's tree)."""
    return PoolOutput(out.partials.to_host(), out.results)


def results_of(out: PoolOutput):
    """The per-particle results carried by a reduced output (what the driver gathers; the sums stay)."""
    return out.results


def zero_weights_of(out: PoolOutput) -> int:
    """Particles of a reduced output whose posterior weights all underflowed (each kept its best sample)."""
    return int(out.partials.n_zero_weight)


def mstep_task(outputs, halves, model, ms, device: str = "auto"):
    """The M-step of one iteration on a worker, from the reduced (host) outputs of every half set.

    On a GPU worker the summed volumes go to the device and the reconstruction, FSC and symmetrisation run there;
    the new model comes back in host memory either way.
    """
    from ..maximization.mstep import maximization

    xp = worker_array_module(device)
    return maximization({h: o.partials.on(xp) for h, o in zip(halves, outputs, strict=True)}, model, ms)


def accuracy_task(specs, angles, ctf, sigma2, current_size, ori_size, pixel_size, seeds, device: str = "auto"):
    """Each class's estimated accuracies on a worker's device
    (:func:`~gerelion_dask.maximization.accuracy.class_accuracies`)."""
    from ..maximization.accuracy import class_accuracies

    return class_accuracies(specs, angles, ctf, sigma2, current_size, ori_size, pixel_size, seeds,
                            worker_array_module(device))


def concat_results(result_lists) -> PoolResult:
    """Per-particle results of all halves (lists of ``(pool index, PoolResult)``) in pool-index order (the order the
    in-process runner returns)."""
    pairs = sorted((p for lst in result_lists for p in lst), key=lambda p: p[0])
    return PoolResult.concat([r for _, r in pairs])
