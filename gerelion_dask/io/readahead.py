"""Read the next pool's images while this one computes.

An E-step task reads its pool's images (Zarr chunk or MRC stacks) and then computes on them; on a GPU the read was
40 % of an iteration's E-step (benchmarks/RESULTS.md, sixth session: 4.0 of 9.3 s at 20,000 particles, box 128),
and the device sat idle meanwhile.  :class:`ReadAhead` keeps one background thread per process: a task takes its
own images (from a read started for it earlier, or read now) and starts the read of the pool expected next in this
process; while it computes, that read runs (file I/O and decompression release the GIL).

Every read, started ahead or not, runs in that one thread, one at a time, so a reader that is not thread-safe (an
open MRC stack) is never entered twice.  Reads are keyed by the caller (include whatever makes a key unique across
runs, e.g. the iteration's task tag): a key that is never taken costs one read and is dropped when ``depth`` newer
reads are pending.  An error of a read ahead is raised by the :meth:`take` that asks for it, as the direct read would.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["DEFAULT_DEPTH", "ReadAhead"]

DEFAULT_DEPTH = 2  # reads kept that were not yet taken (gerelion_dask.plan counts this many pools of raw images)


class ReadAhead:
    """Background reads keyed by the caller; at most ``depth`` reads not yet taken are kept."""

    def __init__(self, depth: int = DEFAULT_DEPTH):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = int(depth)
        self._pending: OrderedDict[Hashable, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.hits = 0  # takes served by a read started ahead (for tests and benchmarks)
        self.misses = 0

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gerelion-readahead")
        return self._pool

    def start(self, key: Hashable, read: Callable[[], Any]) -> None:
        """Begin ``read()`` in the background for a later :meth:`take` of ``key`` (no-op if already pending)."""
        with self._lock:
            if key in self._pending:
                return
            self._pending[key] = self._executor().submit(read)
            while len(self._pending) > self.depth:
                self._pending.popitem(last=False)  # the oldest was not taken here (its pool ran elsewhere)

    def take(self, key: Hashable, read: Callable[[], Any]) -> Any:
        """The result of the read started for ``key``, else of ``read()`` (run in the reader thread, after any read
        in flight)."""
        with self._lock:
            fut = self._pending.pop(key, None)
            if fut is None:
                self.misses += 1
                fut = self._executor().submit(read)
            else:
                self.hits += 1
        return fut.result()

    def close(self) -> None:
        """Drop what is pending and stop the thread (waits for a read in flight)."""
        with self._lock:
            self._pending.clear()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
