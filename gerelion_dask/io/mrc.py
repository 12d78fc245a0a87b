"""MRC maps and image stacks (through ``mrcfile``), with one-line errors that name the file.

* :func:`read_map` / :func:`write_map`: 3D maps ``[z, y, x]`` as float32 with the voxel size (Å) from / into the
  header.  Writing is float32 (mode 2), header origin 0, and atomic (temporary file in the same folder, then
  ``os.replace``).
* :class:`StackReader`: memory-mapped image stacks (``mrcfile.mmap(..., permissive=False)``), read by 0-based
  index as float32 ``(n, y, x)``.  Modes 1 (int16), 2 (float32), 6 (uint16) and 12 (float16, as in
  ``../shared/data``) are read; others are refused.  Every section of the file is one image (RELION reads
  ``N@file`` the same way whether the file is called ``.mrcs`` or ``.mrc``), so a file holding one 2D image is a
  stack of one.

Before ``mrcfile`` maps the data, the header is checked against the file size, so a truncated file gives
"truncated: header says N images of YxX but file holds ..." instead of ``mmap length is greater than file size``.
A :class:`StackReader` can be pickled (for Dask): the memory map is dropped and reopened on the next read.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import to_host
from ..errors import InputError
from ._atomic import atomic_path

__all__ = ["STACK_MODES", "MrcHeader", "StackReader", "read_header", "read_map", "write_map", "write_stack"]

logger = logging.getLogger(__name__)

#: MRC modes a stack may have: int16, float32, uint16, float16.
STACK_MODES = {1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}
#: Map modes: the stack modes and int8 (mode 0, used for masks).
MAP_MODES = {0: np.int8, **STACK_MODES}
_HEADER_BYTES = 1024


class MrcHeader:
    """What we need from an MRC header: sizes, mode, voxel size and where the data start.

    Attributes
    ----------
    nx, ny, nz : int
        Columns, rows, sections (for a stack: images).
    mode : int
        MRC mode.
    voxel_size : float
        Å per voxel along x (0.0 when the header has no cell).
    data_offset : int
        Bytes before the data (1024 + extended header).
    file_size : int
        Bytes in the file.
    is_volume_stack : bool
        The file holds several 3D volumes (``ispg`` 401+); never a valid particle stack.
    """

    def __init__(self, nx: int, ny: int, nz: int, mode: int, voxel_size: float, data_offset: int,
                 file_size: int, is_volume_stack: bool):
        self.nx, self.ny, self.nz, self.mode = nx, ny, nz, mode
        self.voxel_size = voxel_size
        self.data_offset = data_offset
        self.file_size = file_size
        self.is_volume_stack = is_volume_stack

    def expected_bytes(self, itemsize: int) -> int:
        """File size the header promises for data of ``itemsize`` bytes per value."""
        return self.data_offset + self.nx * self.ny * self.nz * itemsize

    def __repr__(self) -> str:
        return f"MrcHeader(nx={self.nx}, ny={self.ny}, nz={self.nz}, mode={self.mode}, voxel_size={self.voxel_size})"


def read_header(path: str | os.PathLike) -> MrcHeader:
    """Read and check an MRC header (no data).

    Raises
    ------
    InputError
        The file is missing or its header is not a valid MRC header.
    """
    import mrcfile

    path = Path(path)
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=False) as mrc:
                h = mrc.header
                header = MrcHeader(
                    nx=int(h.nx), ny=int(h.ny), nz=int(h.nz), mode=int(h.mode),
                    voxel_size=float(mrc.voxel_size.x),
                    data_offset=_HEADER_BYTES + int(h.nsymbt),
                    file_size=path.stat().st_size,
                    is_volume_stack=int(h.ispg) >= 401 and int(h.mz) > 0 and int(h.nz) != int(h.mz),
                )
    except (ValueError, OSError) as err:
        raise InputError(path, f"not a valid MRC file (corrupt header): {_one_line(err)}") from err
    if min(header.nx, header.ny, header.nz) < 1:
        raise InputError(path, f"not a valid MRC file (corrupt header): size {header.nx}x{header.ny}x{header.nz}")
    return header


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a regular file")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _check_mode(path: Path, header: MrcHeader, modes: dict[int, Any]) -> np.dtype:
    if header.mode not in modes:
        allowed = ", ".join(f"{m} ({np.dtype(t).name})" for m, t in modes.items())
        raise InputError(path, f"unsupported MRC mode {header.mode}", f"readable modes: {allowed}")
    return np.dtype(modes[header.mode])


def _check_size(path: Path, header: MrcHeader, dtype: np.dtype, what: str) -> None:
    need = header.expected_bytes(dtype.itemsize)
    if header.file_size < need:
        have = max(header.file_size - header.data_offset, 0)
        per = header.nx * header.ny * dtype.itemsize
        raise InputError(
            path,
            f"truncated: header says {header.nz} {what} of {header.ny}x{header.nx} ({np.dtype(dtype).name}) but file "
            f"holds {have // per} complete ones ({have} of {need - header.data_offset} data bytes)",
        )


# ------------------------------------------------------------------------------------------------------- maps


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a map as float32 ``[z, y, x]`` with its voxel size.

    Parameters
    ----------
    path : str or os.PathLike
        An MRC file of mode 0, 1, 2, 6 or 12.  A single 2D image comes back as ``(1, y, x)``.

    Returns
    -------
    array : numpy.ndarray
        float32, ``(nz, ny, nx)``, C-contiguous.
    voxel_size : float
        Å per voxel (x of the header; 0.0 when the header has none).

    Raises
    ------
    InputError
        Missing, corrupt, truncated, unsupported mode, or a stack of volumes.
    """
    import mrcfile

    path = Path(path)
    header = read_header(path)
    dtype = _check_mode(path, header, MAP_MODES)
    _check_size(path, header, dtype, "sections")
    if header.is_volume_stack:
        raise InputError(path, "holds a stack of volumes, expected one map")
    try:
        with mrcfile.open(path, mode="r", permissive=False) as mrc:
            data = np.asarray(mrc.data, dtype=np.float32)
    except ValueError as err:
        raise InputError(path, f"cannot read MRC data: {_one_line(err)}") from err
    return np.ascontiguousarray(data.reshape(header.nz, header.ny, header.nx)), header.voxel_size


def write_map(path: str | os.PathLike, array: Any, voxel_size: float) -> Path:
    """Write a float32 (mode 2) map with its voxel size, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (``.mrc``); its folder must exist.
    array : array_like
        ``[z, y, x]`` (or a 2D image); NumPy or CuPy, cast to float32.
    voxel_size : float
        Å per voxel, written to the header (cell = shape * voxel size).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    data = np.ascontiguousarray(to_host(array), dtype=np.float32)
    if data.ndim not in (2, 3):
        raise ValueError(f"write_map expects a 2D or 3D array, got shape {data.shape}")
    _write_mrc(Path(path), data, voxel_size, stack=False)
    return Path(path)


def write_stack(path: str | os.PathLike, images: Any, pixel_size: float, *, dtype: Any = np.float32) -> Path:
    """Write images ``(n, y, x)`` as an MRC image stack (``ispg`` 0), atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (``.mrcs``).
    images : array_like
        ``(n, y, x)``; NumPy or CuPy.
    pixel_size : float
        Å per pixel.
    dtype : numpy dtype, optional
        float32 (mode 2, default) or float16 (mode 12; RELION 3.1 cannot read it, 4.0+ can).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    data = np.ascontiguousarray(to_host(images), dtype=dtype)
    if data.ndim != 3:
        raise ValueError(f"write_stack expects (n, y, x), got shape {data.shape}")
    _write_mrc(Path(path), data, pixel_size, stack=True)
    return Path(path)


def _write_mrc(path: Path, data: np.ndarray, voxel_size: float, *, stack: bool) -> None:
    import mrcfile

    with atomic_path(path) as tmp:
        with mrcfile.new(tmp) as mrc:
            mrc.set_data(data)
            if stack:
                mrc.set_image_stack()
            mrc.voxel_size = float(voxel_size)
    logger.debug("wrote %s %s", path, data.shape)


# ---------------------------------------------------------------------------------------------------- stacks


class StackReader:
    """Read images from an MRC stack by 0-based index, through a memory map.

    The header is checked on creation (exists, valid, supported mode, square images, not truncated); the data are
    mapped on the first :meth:`read`.

    Parameters
    ----------
    path : str or os.PathLike
        An MRC file (``.mrcs`` stack or a single-image ``.mrc``).

    Attributes
    ----------
    path : pathlib.Path
    shape : tuple of int
        ``(n_images, ny, nx)``.
    dtype : numpy.dtype
        Dtype on disk.
    pixel_size : float
        Å per pixel from the header (0.0 when absent).

    Raises
    ------
    InputError
        Missing, corrupt header, unsupported mode, non-square images, truncated file, or volumes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header = read_header(self.path)
        self.dtype = _check_mode(self.path, header, STACK_MODES)
        if header.is_volume_stack:
            raise InputError(self.path, "holds 3D volumes, expected a stack of 2D images")
        if header.nx != header.ny:
            raise InputError(self.path, f"images are not square ({header.ny}x{header.nx})")
        _check_size(self.path, header, self.dtype, "images")
        self.shape = (header.nz, header.ny, header.nx)
        self.pixel_size = header.voxel_size
        self._mrc = None

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"StackReader({str(self.path)!r}, shape={self.shape}, dtype={self.dtype.name})"

    def read(self, indices: Any) -> np.ndarray:
        """Images at 0-based ``indices``, in that order, as float32 ``(len(indices), ny, nx)``.

        Parameters
        ----------
        indices : int or array_like of int
            0-based image numbers (RELION's ``N@stack`` is index ``N - 1``); repeats allowed.

        Raises
        ------
        InputError
            An index outside ``[0, n)``.
        """
        idx = np.atleast_1d(np.asarray(indices))
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"image indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False).ravel()
        self._check_indices(idx)
        out = np.empty((idx.size, *self.shape[1:]), dtype=np.float32)
        if idx.size == 0:
            return out
        order = np.argsort(idx, kind="stable")  # ascending reads are sequential on disk
        out[order] = self._data()[idx[order]]
        return out

    def _check_indices(self, idx: np.ndarray) -> None:
        bad = (idx < 0) | (idx >= self.shape[0])
        if bad.any():
            first = int(idx[bad][0])
            raise InputError(
                self.path,
                f"image index {first} (0-based; RELION {first + 1}@) out of range: "
                f"the stack holds {self.shape[0]} images",
            )

    def _data(self) -> np.ndarray:
        if self._mrc is None:
            import mrcfile

            try:
                self._mrc = mrcfile.mmap(self.path, mode="r", permissive=False)
            except ValueError as err:
                raise InputError(self.path, f"cannot map MRC data: {_one_line(err)}") from err
        data = self._mrc.data
        return data.reshape(self.shape) if data.ndim != 3 else data

    def close(self) -> None:
        """Drop the memory map (reopened by the next :meth:`read`)."""
        if self._mrc is not None:
            self._mrc.close()
            self._mrc = None

    def __enter__(self) -> StackReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mrc"] = None
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
