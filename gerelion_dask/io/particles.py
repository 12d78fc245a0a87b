"""ParticleSet: the particle table of a STAR file plus lazy, validated access to its images.

A :class:`ParticleSet` is immutable: ``metadata`` (one row per particle, RELION 3.1 columns, ``RangeIndex``; rows are
addressed by position), ``optics`` and ``star_path``.  Creating one checks, once, that every stack named in
``rlnImageName`` exists and holds the image asked for; images are then read on demand, grouped by stack, through
cached memory-mapped :class:`~gerelion_dask.io.mrc.StackReader` objects.

Decisions:

* ``rlnImageName`` is ``N@stack`` with N 1-based (no ``@``: the file's first image).  A relative stack name is looked
  up first relative to the STAR file's folder, then, as RELION does, relative to the current directory.
* ``rlnImageSize`` (and ``rlnImageDimensionality``) missing from the optics table (RELION 3.0 input) are filled in
  from the stack headers; present ones must match the stacks.
* :attr:`ParticleSet.box_size` and :attr:`ParticleSet.pixel_size` are the model's grid: the lowest-numbered optics
  group's in use (RELION takes the first optics group's).  Images of optics groups of another box or pixel size
  are resampled onto that grid as they are read (:mod:`gerelion_dask.ops.resample`; RELION 3.1 scales their
  projections instead).  A group coarser than the model's grid holds nothing beyond its own Nyquist frequency
  (:meth:`ParticleSet.band_shells`: the E-step leaves its data out there).  Per-group values:
  :meth:`ParticleSet.box_sizes`, :meth:`ParticleSet.pixel_sizes`.
* :meth:`ParticleSet.pools` cuts the rows into consecutive pools (row order), the unit of work and of Zarr chunks.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ..ops.resample import resample_images, resample_matrix
from .mrc import StackReader
from .star import read_particles

__all__ = ["SAME_GRID_RTOL", "ParticleSet", "parse_image_names"]

logger = logging.getLogger(__name__)

#: Optics groups of the model's box within this (relative) of the model's pixel size are read as they are (their
#: Fourier data misplaced by at most half a voxel at shell 5,000); others, and groups of another box, are resampled
#: onto the model's grid (:mod:`gerelion_dask.ops.resample`).
SAME_GRID_RTOL = 1e-4


def parse_image_names(names: Any) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rlnImageName`` values ``"N@stack"`` into 0-based image indices and stack names.

    Parameters
    ----------
    names : array_like of str
        ``rlnImageName`` values; a value without ``@`` means image 1 of that file.

    Returns
    -------
    index : numpy.ndarray of int64
        ``N - 1``.
    stack : numpy.ndarray of object (str)
        The stack part, as written.

    Raises
    ------
    ValueError
        A number before ``@`` that is not a positive integer (the message lists the first bad value).
    """
    text = pd.Series(np.asarray(names, dtype=object)).astype(str)
    parts = text.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:
        parts[1] = None
    has_at = parts[1].notna().to_numpy()
    stack = np.where(has_at, parts[1].to_numpy(dtype=object), parts[0].to_numpy(dtype=object))
    number = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(number) | (number < 1) | (number != np.round(number))
    if bad.any():
        raise ValueError(f"bad rlnImageName {text[int(np.flatnonzero(bad)[0])]!r} (expected N@stack, N >= 1)")
    return number.astype(np.int64) - 1, stack.astype(object)


@dataclass(frozen=True, eq=False)
class ParticleSet:
    """Particle metadata plus lazy access to the images.

    Parameters
    ----------
    metadata : pandas.DataFrame
        One row per particle, RELION 3.1 columns (``rlnImageName``, ``rlnOpticsGroup``, CTF, poses, anything else).
        Re-indexed to a ``RangeIndex``.
    optics : pandas.DataFrame
        One row per optics group (``rlnOpticsGroup``, ``rlnImagePixelSize`` ...).
    star_path : pathlib.Path
        The STAR file the table came from (stack names are resolved relative to its folder).

    Raises
    ------
    InputError
        A stack is missing or unreadable, an image number exceeds its stack, or ``rlnImageSize`` disagrees with
        the stacks.
    """

    metadata: pd.DataFrame
    optics: pd.DataFrame
    star_path: Path
    _stack_paths: tuple[Path, ...] = field(init=False, repr=False)
    _stack_of_row: np.ndarray = field(init=False, repr=False)
    _index_of_row: np.ndarray = field(init=False, repr=False)
    _readers: dict[int, StackReader] = field(init=False, repr=False, default_factory=dict)
    # stacks whose memory maps are open, least recently read first (each holds a file descriptor: at most
    # max_open_stacks() stay open, or a data set of thousands of micrograph stacks runs out of descriptors)
    _open: OrderedDict = field(init=False, repr=False, compare=False, default_factory=OrderedDict)
    _lock: Any = field(init=False, repr=False, compare=False, default_factory=threading.Lock)
    # per optics group read onto the model's grid: its (model box, group box) resampling matrix
    _resamplers: dict = field(init=False, repr=False, compare=False, default_factory=dict)
    _grid: dict = field(init=False, repr=False, compare=False, default_factory=dict)  # the model grid, made once

    def __post_init__(self) -> None:
        star_path = Path(self.star_path)
        object.__setattr__(self, "star_path", star_path)
        object.__setattr__(self, "metadata", self.metadata.reset_index(drop=True))
        names = self._column("rlnImageName")
        try:
            index, stack = parse_image_names(names)
        except ValueError as err:
            raise InputError(star_path, str(err)) from err
        unique, stack_of_row = np.unique(stack, return_inverse=True)
        paths = tuple(_resolve_stack(str(s), star_path) for s in unique)
        object.__setattr__(self, "_stack_paths", paths)
        object.__setattr__(self, "_stack_of_row", stack_of_row.astype(np.int64).ravel())
        object.__setattr__(self, "_index_of_row", index)
        readers = {i: self._open_stack(i, str(unique[i])) for i in range(len(paths))}
        object.__setattr__(self, "_readers", readers)
        self._check_indices(unique)
        object.__setattr__(self, "optics", self._optics_with_sizes())
        logger.debug("%s: %d particles in %d stacks", star_path, self.n, len(paths))

    # ------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_star(cls, path: str | os.PathLike, *, require_ctf: bool = False) -> ParticleSet:
        """Read a RELION 3.1 or 3.0 particle STAR file and check its stacks.

        Parameters
        ----------
        path : str or os.PathLike
            The STAR file.
        require_ctf : bool, optional
            Require the CTF columns (see :func:`gerelion_dask.io.star.read_particles`).
        """
        optics, particles, _ = read_particles(path, require_ctf=require_ctf)
        return cls(metadata=particles, optics=optics, star_path=Path(path))

    def _column(self, name: str) -> np.ndarray:
        if name not in self.metadata.columns:
            raise InputError(self.star_path, f"particles have no {name} column")
        return self.metadata[name].to_numpy()

    def _open_stack(self, i: int, name: str) -> StackReader:
        path = self._stack_paths[i]
        if path is None:
            cwd = Path.cwd()
            raise InputError(
                self.star_path,
                f"stack {name} not found (looked in {self.star_path.resolve().parent} and {cwd})",
            )
        try:
            return StackReader(path)
        except InputError as err:
            raise InputError(self.star_path, f"stack {err}") from err

    def _check_indices(self, names: np.ndarray) -> None:
        sizes = np.array([len(self._readers[i]) for i in range(len(names))], dtype=np.int64)
        too_big = self._index_of_row >= sizes[self._stack_of_row]
        if too_big.any():
            row = int(np.flatnonzero(too_big)[0])
            s = int(self._stack_of_row[row])
            raise InputError(
                self.star_path,
                f"row {row + 1} asks for image {self._index_of_row[row] + 1}@{names[s]} but "
                f"{self._stack_paths[s]} holds {sizes[s]} images",
            )

    def _optics_with_sizes(self) -> pd.DataFrame:
        """The optics table with rlnImageSize (from the stacks when missing; checked when present)."""
        group_box = self._box_per_group()
        optics = self.optics.reset_index(drop=True).copy()
        groups = optics["rlnOpticsGroup"].to_numpy()
        if "rlnImageSize" in optics.columns:
            for g, size in zip(groups, optics["rlnImageSize"].to_numpy(), strict=True):
                if g in group_box and int(size) != group_box[g][0]:
                    box, stack = group_box[g]
                    raise InputError(
                        self.star_path,
                        f"optics group {g}: rlnImageSize {size} but its stack {stack} holds {box}-pixel images",
                    )
        else:
            optics["rlnImageSize"] = [group_box.get(g, (0, None))[0] for g in groups]
        if "rlnImageDimensionality" not in optics.columns:
            optics["rlnImageDimensionality"] = 2
        return optics

    def _box_per_group(self) -> dict[Any, tuple[int, Path]]:
        """Optics group -> (box size of its stacks, one of those stacks)."""
        box_of_stack = np.array([self._readers[i].shape[1] for i in range(len(self._stack_paths))])
        table = pd.DataFrame({"g": self._column("rlnOpticsGroup"), "s": self._stack_of_row})
        table["box"] = box_of_stack[table["s"].to_numpy()]
        table = table.drop_duplicates(["g", "box"])
        result: dict[Any, tuple[int, Path]] = {}
        for g, rows in table.groupby("g"):
            if len(rows) > 1:
                pairs = zip(rows["s"], rows["box"], strict=True)
                stacks = ", ".join(f"{self._stack_paths[s]} ({b} px)" for s, b in pairs)
                raise InputError(self.star_path, f"optics group {g} mixes box sizes: {stacks}")
            result[g] = (int(rows["box"].iloc[0]), self._stack_paths[int(rows["s"].iloc[0])])
        return result

    # --------------------------------------------------------------------------------------------- properties

    @property
    def n(self) -> int:
        """Number of particles."""
        return len(self.metadata)

    @property
    def stack_paths(self) -> tuple[Path, ...]:
        """Resolved paths of the stacks, in sorted order of their names in the STAR file."""
        return self._stack_paths

    def box_sizes(self) -> dict[int, int]:
        """Box size (pixels) per optics group in use."""
        used = set(self.metadata["rlnOpticsGroup"].tolist())
        table = self.optics[self.optics["rlnOpticsGroup"].isin(used)]
        return {int(g): int(b) for g, b in zip(table["rlnOpticsGroup"], table["rlnImageSize"], strict=True)}

    def pixel_sizes(self) -> dict[int, float]:
        """Pixel size (Å) per optics group in use."""
        used = set(self.metadata["rlnOpticsGroup"].tolist())
        table = self.optics[self.optics["rlnOpticsGroup"].isin(used)]
        return {int(g): float(p) for g, p in zip(table["rlnOpticsGroup"], table["rlnImagePixelSize"], strict=True)}

    def model_group(self) -> int:
        """The lowest-numbered optics group in use: its box and pixel size are the model's (RELION: the first optics
        group's)."""
        return min(self.box_sizes())

    def resampled_groups(self) -> dict[int, tuple[int, float]]:
        """Optics groups in use whose images are resampled onto the model's grid as they are read (another box, or a
        pixel size more than :data:`SAME_GRID_RTOL` away from the model's): ``{group: (box, pixel size)}``."""
        if "resampled" not in self._grid:
            boxes, sizes = self.box_sizes(), self.pixel_sizes()
            g0 = self.model_group()
            n0, a0 = boxes[g0], sizes[g0]
            self._grid.update(box=n0, apix=a0, resampled={
                g: (boxes[g], sizes[g]) for g in sorted(boxes)
                if boxes[g] != n0 or abs(sizes[g] - a0) > SAME_GRID_RTOL * a0})
        return self._grid["resampled"]

    def band_shells(self) -> dict[int, int]:
        """Optics groups coarser than the model's grid: ``{group: its last shell}``.  Their images, resampled onto the
        grid, hold nothing beyond their own Nyquist frequency, ``R = N a / (2 a_g)`` model pixels; every pixel of
        shell ``floor(R - 1/2)`` and below (``|k| < R``) lies inside that band.  The E-step and the reconstruction
        zero such a group's images and CTFs beyond that shell (``PreprocessSettings.band_shells``), so beyond it the
        finer groups' particles alone make the map, as in RELION."""
        N, a = self.box_size, self.pixel_size
        return {g: max(int(np.floor(N * a / (2.0 * a_g) - 0.5 + 1e-9)), 1)
                for g, (_, a_g) in self.resampled_groups().items() if a_g > a}

    @property
    def box_size(self) -> int:
        """The model's box size (pixels): the lowest-numbered optics group's in use.  Other groups' images are read
        onto it (:meth:`read_images`, :meth:`resampled_groups`)."""
        self.resampled_groups()
        return self._grid["box"]

    @property
    def pixel_size(self) -> float:
        """The model's pixel size (Å): the lowest-numbered optics group's in use (RELION takes the first optics
        group's)."""
        self.resampled_groups()
        return self._grid["apix"]

    # ------------------------------------------------------------------------------------------------ subsets

    def pools(self, pool_size: int) -> list[np.ndarray]:
        """Consecutive row ranges of ``pool_size`` rows (the last may be shorter).

        Parameters
        ----------
        pool_size : int
            Particles per pool (> 0).

        Returns
        -------
        list of numpy.ndarray
            Row indices (int64) of each pool.
        """
        if int(pool_size) < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        return [np.arange(s, min(s + pool_size, self.n), dtype=np.int64) for s in range(0, self.n, int(pool_size))]

    def half_sets(self, *, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the two gold-standard halves.

        Parameters
        ----------
        seed : int, optional
            Used only without ``rlnRandomSubset``: a random balanced split with ``numpy.random.default_rng(seed)``.
            Without a seed, rows alternate (row 0 -> half 1, row 1 -> half 2, ...).

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            Sorted row indices of half 1 and half 2.

        Raises
        ------
        InputError
            ``rlnRandomSubset`` holds values other than 1 and 2.
        """
        if "rlnRandomSubset" in self.metadata.columns:
            subset = self.metadata["rlnRandomSubset"].to_numpy()
            bad = ~np.isin(subset, (1, 2))
            if bad.any():
                raise InputError(self.star_path, f"rlnRandomSubset must be 1 or 2, found {sorted(set(subset[bad]))}")
        elif seed is None:
            subset = np.where(np.arange(self.n) % 2 == 0, 1, 2)
        else:
            subset = np.where(np.random.default_rng(seed).permutation(self.n) % 2 == 0, 1, 2)
        return np.flatnonzero(subset == 1), np.flatnonzero(subset == 2)

    # ------------------------------------------------------------------------------------------------- images

    def read_images(self, rows: Any, native: bool = False) -> np.ndarray:
        """Images of the given rows as float32 ``(len(rows), N, N)``, in the order asked.

        Reads are grouped by stack and sorted within a stack.  ``N`` is the model's box (:attr:`box_size`): the
        images of optics groups of another box or pixel size come resampled onto the model's grid
        (:meth:`resampled_groups`).  With ``native`` the images come as they are in their stacks, at their own box
        (all rows must share one).

        Parameters
        ----------
        rows : array_like of int
            0-based row positions in :attr:`metadata`.
        native : bool, optional
            Skip the resampling.

        Raises
        ------
        IndexError
            A row outside ``[0, n)``.
        """
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64)).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"row out of range [0, {self.n}) in {self.star_path}")
        box, apix = self.box_size, self.pixel_size
        resampled = self.resampled_groups()
        stacks = self._stack_of_row[rows]
        if native:
            boxes = {self._readers[int(s)].shape[1] for s in np.unique(stacks)}
            if len(boxes) > 1:
                raise ValueError(f"read_images(native=True): the rows have different box sizes {sorted(boxes)}")
            box, resampled = (boxes.pop() if boxes else box), {}
        groups = self._column("rlnOpticsGroup")[rows] if resampled else None
        out = np.empty((rows.size, box, box), dtype=np.float32)
        with self._lock:  # threads may share a set; a map is never closed under another thread's read
            for s in np.unique(stacks):
                where = np.flatnonzero(stacks == s)
                raw = self._readers[int(s)].read(self._index_of_row[rows[where]])
                self._opened(int(s))
                if groups is None:
                    out[where] = raw
                    continue
                for g in np.unique(groups[where]):
                    sel = groups[where] == g
                    if int(g) in resampled:
                        out[where[sel]] = resample_images(raw[sel], self._resampler(int(g), box, apix))
                    else:
                        out[where[sel]] = raw[sel]
        return out

    def _resampler(self, g: int, box: int, apix: float) -> np.ndarray:
        """Group ``g``'s :func:`~gerelion_dask.ops.resample.resample_matrix` onto the model's grid (made once)."""
        m = self._resamplers.get(g)
        if m is None:
            n, a = self.resampled_groups()[g]
            m = self._resamplers[g] = resample_matrix(n, a, box, apix)
        return m

    def _opened(self, s: int) -> None:
        """Stack ``s`` was just read (its map is open): close the least recently read maps beyond the limit."""
        self._open[s] = None
        self._open.move_to_end(s)
        limit = max_open_stacks()
        while len(self._open) > limit:
            old, _ = self._open.popitem(last=False)
            self._readers[old].close()

    def close(self) -> None:
        """Drop the stacks' memory maps (they reopen on the next read)."""
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._open.clear()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # the readers drop their maps themselves
        state["_open"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())


def max_open_stacks() -> int:
    """How many stacks a :class:`ParticleSet` keeps mapped at once: a quarter of this process's soft limit on open
    files (Dask's sockets, Zarr and the rest need the others), between 16 and 512."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 512
    return int(min(512, max(16, soft // 4)))


def _resolve_stack(name: str, star_path: Path) -> Path | None:
    """The stack's path: absolute as is; relative: STAR folder first, then the current directory; None if absent."""
    candidate = Path(name)
    if candidate.is_absolute():
        return candidate if candidate.is_file() else None
    for base in (star_path.resolve().parent, Path.cwd()):
        if (base / candidate).is_file():
            return base / candidate
    return None
