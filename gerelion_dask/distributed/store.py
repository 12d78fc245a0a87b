"""The job's image store for Dask workers: ``<output folder>/particles.zarr`` with each half set's rows contiguous.

The driver cuts pools per half set: the rows of half 1 (ascending) in runs of ``--pool``, then those of half 2.  The
halves are random (``rlnRandomSubset`` or drawn from the seed), so in the STAR file's order a pool's rows are
scattered over about twice as many rows, and a task would read two or three chunks for one.

Layout chosen: the images are imported **in half order** (the rows of half 1, then the rows of half 2, each
ascending; one half set "0" without halves), with :func:`gerelion_dask.io.zarr_store.import_particles` unchanged and
chunks of ``--pool`` rows.  ``particles_meta.star`` beside it is in the same (store) order; the row map
``position[row] = store row`` is derived from the halves again at run time (:func:`store_positions`), and checked
through the store's ``gerelion_layout`` attribute.  Then every pool is one contiguous range of store rows:

* half 1's pools are exactly chunks 0, 1, ... (pool p = chunk p);
* half 2's pools start at store row ``n1`` (the size of half 1), so unless ``n1`` is a multiple of ``--pool`` each
  of them spans two neighbouring chunks.  That is safe: workers only **read** the store (Zarr reads of one chunk by
  many readers are fine; only writes must own whole chunks, ECOSYSTEM.md §5) and a task reads one contiguous slice.
  Padding half 1 to a whole chunk would align half 2 too, but the store format (io/zarr_store.py) has no padding
  rows, and this costs at most one extra chunk read per pool.

A store is imported once per output folder and reused while its fingerprint matches (row order, pool size and the
source STAR file's path, size and modification time); otherwise it is imported again (replaced atomically).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.particles import ParticleSet
from ..io.zarr_store import STORE_NAME, ZarrParticles, import_particles

__all__ = ["ParticleStore", "half_order", "store_positions", "store_selection", "prepare_particle_store",
           "read_store_rows"]

log = logging.getLogger(__name__)

LAYOUT_ATTR = "gerelion_layout"


@dataclass(frozen=True)
class ParticleStore:
    """An imported store and the map from particle rows (STAR order) to store rows."""

    path: str  # .../particles.zarr
    position: np.ndarray  # (n,) store row of each particle row

    def selection(self, rows) -> tuple[int, int] | np.ndarray:
        return store_selection(self.position, rows)


def half_order(half: np.ndarray) -> np.ndarray:
    """Particle rows in store order: by half set, then by row (a stable sort of the half labels)."""
    return np.argsort(np.asarray(half), kind="stable").astype(np.int64)


def store_positions(order: np.ndarray) -> np.ndarray:
    """Inverse permutation: ``position[order[i]] = i``."""
    pos = np.empty(len(order), dtype=np.int64)
    pos[order] = np.arange(len(order), dtype=np.int64)
    return pos


def store_selection(position: np.ndarray, rows) -> tuple[int, int] | np.ndarray:
    """The store rows of a pool: ``(start, stop)`` when contiguous and ascending (always, for the driver's pools),
    else the array of store rows (read with orthogonal indexing)."""
    s = position[np.asarray(rows, dtype=np.int64)]
    if s.size and np.array_equal(s, np.arange(s[0], s[0] + s.size)):
        return int(s[0]), int(s[0] + s.size)
    return s


def read_store_rows(path: str, selection) -> np.ndarray:
    """Images of ``selection`` (``(start, stop)`` or an index array) from a store, float32 ``(B, D, D)``."""
    array = ZarrParticles(path).array
    if isinstance(selection, tuple):
        return np.asarray(array[selection[0]:selection[1]], dtype=np.float32)
    return np.asarray(array.oindex[np.asarray(selection)], dtype=np.float32)


def _fingerprint(particles: ParticleSet, order: np.ndarray, pool_size: int) -> dict:
    star = Path(particles.star_path).resolve()
    st = os.stat(star)
    return {"row_order_sha1": hashlib.sha1(np.ascontiguousarray(order, dtype=np.int64).tobytes()).hexdigest(),
            "pool_size": int(pool_size), "n": int(particles.n), "source_star": str(star),
            "source_size": int(st.st_size), "source_mtime_ns": int(st.st_mtime_ns)}


def _existing_layout(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return dict(ZarrParticles(path).attrs).get(LAYOUT_ATTR)
    except Exception:  # unreadable or foreign: import again
        return None


def prepare_particle_store(particles: ParticleSet, half: np.ndarray, out_dir, pool_size: int) -> ParticleStore:
    """Import ``particles`` into ``<out_dir>/particles.zarr`` in half order (once), and return the store + row map."""
    import zarr

    order = half_order(half)
    path = Path(out_dir) / STORE_NAME
    want = _fingerprint(particles, order, pool_size)
    if _existing_layout(path) != want:
        reordered = particles if np.array_equal(order, np.arange(len(order))) else ParticleSet(
            particles.metadata.iloc[order].reset_index(drop=True), particles.optics, particles.star_path)
        import_particles(reordered, out_dir, pool_size=pool_size, overwrite=True)
        zarr.open_array(str(path), mode="r+").attrs.update({LAYOUT_ATTR: want})
        log.info("images in %s (half-set order, chunks of %d)", path, pool_size)
    else:
        log.info("reusing %s", path)
    return ParticleStore(str(path.resolve()), store_positions(order))
