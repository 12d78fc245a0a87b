"""The imported particle store: ``<out>/particles.zarr`` (images) + ``<out>/particles_meta.star`` (metadata).

Layout (format version 1):

* ``particles.zarr``: one Zarr v3 **array** (not a group), float32, shape ``(N, D, D)``, dimension names
  ``("particle", "y", "x")``, chunks ``(pool_size, D, D)``: **one chunk per pool**, so a task that owns a pool owns
  its chunk, and no two writers ever touch one chunk (Zarr writes are read-modify-write per chunk; ECOSYSTEM.md §5).
  Uncompressed by default, or Blosc zstd-5 bitshuffle, or Zstd level 3.  Measured on the H100 machine (1,000
  images of 128 px, benchmarks/RESULTS.md, sixth session): a pool reads in 58-61 ms uncompressed and 125-143 ms with
  Blosc (the E-step's worker thread reads the next pool beside the device's work, where uncompressed took 175 ms and
  Blosc 340 ms); float32 noise-dominated particles compress only 1.0-1.14x, images that were float16 stacks 2.1x.
* Its attributes: ``format`` ("gerelion_dask.particles"), ``format_version`` (1), ``n``, ``box_size``,
  ``pixel_size`` (Å), ``pool_size``, ``n_pools``, ``source_star`` (absolute path of the imported STAR file),
  ``metadata_file`` ("particles_meta.star", relative to the store's folder), ``compressor``.
* ``particles_meta.star``, beside the store: the metadata as a RELION 3.1 STAR file (``data_optics`` +
  ``data_particles``, floats written exactly), **row i = image i of the array**.  Chosen over Zarr attributes
  because it stays readable by RELION tools and people, keeps every column's type and text exactly (see
  :mod:`gerelion_dask.io.star`), and a 200k-particle table would be a 40 MB JSON attribute.  ``rlnImageName`` is
  kept as in the source (it names the original stacks, relative to the source STAR file's folder); images are read
  from the store, never through those names.

Import reads the stacks one pool at a time (never the whole data set in memory), into a temporary folder beside the
target, and renames it to ``particles.zarr`` only when complete, so a ``particles.zarr`` that exists is whole.
The metadata file is written (atomically) just before that rename; :class:`ZarrParticles` checks its row count.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ._atomic import atomic_path
from .particles import ParticleSet
from .star import read_particles, write_particles

__all__ = ["FORMAT", "FORMAT_VERSION", "METADATA_NAME", "STORE_NAME", "ZarrParticles", "import_particles"]

logger = logging.getLogger(__name__)

STORE_NAME = "particles.zarr"
METADATA_NAME = "particles_meta.star"
FORMAT = "gerelion_dask.particles"
FORMAT_VERSION = 1
DEFAULT_POOL_SIZE = 256
IMPORT_THREADS = 4  # pools written at once (each thread reads its pool, then encodes and writes it as one chunk)
_COMPRESSORS = ("blosc", "zstd", "none")


def _codecs(compressor: str | None) -> Any:
    """The zarr v3 ``compressors=`` value for a compressor name."""
    from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

    name = "none" if compressor is None else str(compressor).lower()
    if name == "blosc":
        return BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle)
    if name == "zstd":
        return ZstdCodec(level=3)
    if name == "none":
        return None
    raise ValueError(f"compressor must be one of {_COMPRESSORS} or None, got {compressor!r}")


def import_particles(
    particle_set: ParticleSet,
    out_dir: str | os.PathLike,
    *,
    pool_size: int = DEFAULT_POOL_SIZE,
    compressor: str | None = "none",
    overwrite: bool = False,
) -> Path:
    """Copy a particle set's images into ``<out_dir>/particles.zarr``, one chunk per pool, plus its metadata.

    Parameters
    ----------
    particle_set : ParticleSet
        Particles with one box size and one pixel size (within 1 %).
    out_dir : str or os.PathLike
        Output folder (created if missing).
    pool_size : int, optional
        Particles per pool = per chunk (default 256).
    compressor : {"blosc", "zstd", "none"} or None, optional
        No compression (default: fastest to read, and particle images rarely compress: see the module docstring),
        Blosc zstd-5 bitshuffle (half the disk for images that were float16), or Zstd level 3.
    overwrite : bool, optional
        Replace an existing store (default: refuse).

    Returns
    -------
    pathlib.Path
        ``<out_dir>/particles.zarr``.

    Raises
    ------
    InputError
        The store exists and ``overwrite`` is false; mixed box or pixel sizes; unreadable stacks.
    """
    import zarr

    if int(pool_size) < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    codecs = _codecs(compressor)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / STORE_NAME
    if target.exists() and not overwrite:
        raise InputError(target, "already exists", "pass overwrite=True to replace it, or open it with ZarrParticles")
    box, apix, n = particle_set.box_size, particle_set.pixel_size, particle_set.n
    pools = particle_set.pools(pool_size)
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "n": n,
        "box_size": box,
        "pixel_size": apix,
        "pool_size": int(pool_size),
        "n_pools": len(pools),
        "source_star": str(Path(particle_set.star_path).resolve()),
        "metadata_file": METADATA_NAME,
        "compressor": "none" if compressor is None else str(compressor).lower(),
    }
    with atomic_path(target) as tmp:
        array = zarr.create_array(
            store=str(tmp), shape=(n, box, box), chunks=(int(pool_size), box, box), dtype="float32",
            compressors=codecs, dimension_names=("particle", "y", "x"), attributes=attrs,
        )
        # chunk writes overlap each other and the next reads (reads of one set take its lock in turn); at most
        # 2 x IMPORT_THREADS pools are in memory
        with ThreadPoolExecutor(max(1, min(IMPORT_THREADS, len(pools)))) as ex:
            pending: deque = deque()
            try:
                for i, rows in enumerate(pools):
                    if len(pending) >= 2 * IMPORT_THREADS:
                        pending.popleft().result()
                    pending.append(ex.submit(_write_pool, array, particle_set, i, rows))
                while pending:
                    pending.popleft().result()
            except BaseException:  # an unreadable stack: the queued pools are not read (the store is discarded)
                for fut in pending:
                    fut.cancel()
                raise
        particle_set.close()
        write_particles(particle_set.optics, particle_set.metadata, out_dir / METADATA_NAME)
        if target.exists():
            shutil.rmtree(target)
    logger.info("imported %d particles (%d pools of %d) into %s", n, len(pools), pool_size, target)
    return target


def _write_pool(array: Any, particle_set: ParticleSet, i: int, rows: np.ndarray) -> None:
    """Write pool ``i`` (rows ``rows``, consecutive) as exactly one chunk."""
    start, stop = int(rows[0]), int(rows[-1]) + 1
    pool_size = array.chunks[0]
    if start != i * pool_size or stop - start != len(rows) or stop - start > pool_size:
        raise AssertionError(f"pool {i} rows {start}:{stop} are not chunk {i} of size {pool_size}")
    array[start:stop] = particle_set.read_images(rows)


class ZarrParticles:
    """Read an imported particle store pool by pool.

    Parameters
    ----------
    path : str or os.PathLike
        ``.../particles.zarr`` as returned by :func:`import_particles`.

    Attributes
    ----------
    path : pathlib.Path
    n, box_size, pool_size, n_pools : int
    pixel_size : float
        Å.
    attrs : dict
        All store attributes.

    Raises
    ------
    InputError
        Missing, not a Zarr array, or not a gerelion_dask particle store.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        attrs = dict(self.array.attrs)
        if attrs.get("format") != FORMAT:
            raise InputError(self.path, f"not a gerelion_dask particle store (format {attrs.get('format')!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            version = attrs.get("format_version")
            raise InputError(self.path, f"store format version {version}, expected {FORMAT_VERSION}")
        self.attrs = attrs
        self.n = int(attrs["n"])
        self.box_size = int(attrs["box_size"])
        self.pixel_size = float(attrs["pixel_size"])
        self.pool_size = int(attrs["pool_size"])
        self.n_pools = int(attrs["n_pools"])

    def __repr__(self) -> str:
        shape = f"n={self.n}, box={self.box_size}, pools={self.n_pools}x{self.pool_size}"
        return f"ZarrParticles({str(self.path)!r}, {shape})"

    @cached_property
    def array(self) -> Any:
        """The Zarr array ``(n, D, D)`` (read-only); ``dask.array.from_zarr`` works on :attr:`path` too."""
        import zarr

        if not self.path.exists():
            raise InputError(self.path, "not found", "import the particles first")
        try:
            return zarr.open_array(str(self.path), mode="r")
        except Exception as err:  # FileNotFoundError, zarr's NodeTypeValidationError, JSON errors
            raise InputError(self.path, f"not a readable Zarr array: {type(err).__name__}: {err}") from err

    def pool_rows(self, i: int) -> np.ndarray:
        """Row indices (into :attr:`metadata`) of pool ``i``."""
        self._check_pool(i)
        return np.arange(i * self.pool_size, min((i + 1) * self.pool_size, self.n), dtype=np.int64)

    def read_pool(self, i: int) -> np.ndarray:
        """Images of pool ``i`` as float32 ``(rows, D, D)`` (the last pool may be shorter)."""
        self._check_pool(i)
        start = i * self.pool_size
        return np.asarray(self.array[start : min(start + self.pool_size, self.n)], dtype=np.float32)

    def _check_pool(self, i: int) -> None:
        if not 0 <= int(i) < self.n_pools:
            raise InputError(self.path, f"pool {i} out of range: the store has {self.n_pools} pools")

    @property
    def metadata_path(self) -> Path:
        """The metadata STAR file beside the store."""
        return self.path.parent / self.attrs.get("metadata_file", METADATA_NAME)

    @cached_property
    def _tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        optics, particles, _ = read_particles(self.metadata_path)
        if len(particles) != self.n:
            raise InputError(
                self.metadata_path, f"has {len(particles)} particles but {self.path} holds {self.n} images"
            )
        return optics, particles

    @property
    def metadata(self) -> pd.DataFrame:
        """Per-particle table (RELION 3.1 columns), row i = image i."""
        return self._tables[1]

    @property
    def optics(self) -> pd.DataFrame:
        """Optics-group table."""
        return self._tables[0]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("array", None)  # reopened lazily in the worker
        return state
