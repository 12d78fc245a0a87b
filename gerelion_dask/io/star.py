"""STAR files: generic blocks, and RELION particle tables normalised to the RELION 3.1 layout.

Reading goes through ``starfile.read(path, always_dict=True)`` (ECOSYSTEM.md §6).  Two things are added on top:

* **Key-value blocks** (``data_model_general``, ``data_optimiser_general`` ...) come back from ``starfile`` as dicts.
  :func:`read_star` turns each into a **one-row DataFrame** and marks it with ``df.attrs["star_key_value"] = True``,
  so every block has the same type.  :func:`write_star` writes a block as key-value pairs when that mark is set
  or when its name is passed in ``key_value=``; all other blocks are ``loop_`` blocks (RELION's optics table must
  be a loop, even with one row).
* **Writing is our own**, not ``starfile.write``: RELION 3.1 layout (``# version 30001`` before every block, blank
  lines around ``data_``/``loop_``, right-aligned columns), floats written with the shortest text that reads back
  to the same float64 (``repr``), so read -> write -> read is exact; strings with spaces, or empty, are quoted.
  Files are replaced atomically (temporary file in the same folder, then ``os.replace``).

Known RELION string labels (:data:`STRING_LABELS`, e.g. ``rlnMicrographName``) are always read as strings, so names
such as ``0001`` stay ``"0001"``.  Unknown columns are parsed by ``starfile`` (numbers if every value parses).

Particle tables (:func:`read_particles`) accept both layouts and return the RELION 3.1 representation:

* RELION 3.1+: ``data_optics`` + ``data_particles``; returned as they are (version 30001).
* RELION 3.0: one ``data_`` block with voltage, Cs, Q0 (and beam tilt, pixel size) per particle; converted as
  RELION 3.1's ``StarConverter::convert_3p0_particlesTo_3p1`` does: particles with equal values of those columns form
  one optics group (numbered 1, 2, ... in order of first appearance, named ``opticsGroupK``); the columns move to
  the optics table; ``rlnImagePixelSize = 10000 * rlnDetectorPixelSize / rlnMagnification`` (or a per-particle
  ``rlnImagePixelSize``); pixel offsets ``rlnOriginX/Y/Z`` (and their priors, ``rlnHelicalTrackLength``) become
  Å columns (``rlnOriginXAngst`` ...) in the same column position (version 30000).  ``rlnImageSize`` is not known
  from the STAR file alone; :class:`gerelion_dask.io.particles.ParticleSet` fills it from the stacks.

Every column we do not know is kept, in its order.  The one-line errors are :class:`~gerelion_dask.errors.InputError`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..errors import InputError
from ._atomic import atomic_path

__all__ = [
    "CTF_OPTICS_LABELS",
    "CTF_PARTICLE_LABELS",
    "STAR_VERSION",
    "STRING_LABELS",
    "ParticleTable",
    "read_particles",
    "read_star",
    "write_particles",
    "write_star",
]

logger = logging.getLogger(__name__)

#: The version line RELION 3.1 (and 4.0) writes before every block.
STAR_VERSION = 30001
VERSION_30 = 30000

#: RELION labels whose values are names, read as strings even when they look like numbers.
STRING_LABELS = (
    "rlnImageName",
    "rlnImageOriginalName",
    "rlnMicrographName",
    "rlnMicrographOriginalName",
    "rlnMicrographMovieName",
    "rlnMicrographMetadata",
    "rlnMicrographGainName",
    "rlnMicrographDefectFile",
    "rlnCtfImage",
    "rlnCtfPowerSpectrum",
    "rlnOpticsGroupName",
    "rlnGroupName",
    "rlnReferenceImage",
    "rlnOriginalParticleName",
    "rlnMaskName",
    "rlnBodyMaskName",
)

#: Per-particle CTF columns needed with ``require_ctf=True``.
CTF_PARTICLE_LABELS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
#: Per-optics-group CTF columns needed with ``require_ctf=True``.
CTF_OPTICS_LABELS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")

#: Numeric columns the refinement reads (RELION 3.1 names and the 3.0 ones converted from): a value that is not a
#: finite number is bad input (one NaN defocus would otherwise turn a whole half map into NaN or zeros).
NUMERIC_LABELS = ("rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality", "rlnVoltage",
                  "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMagnification", "rlnDetectorPixelSize",
                  "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor",
                  "rlnCtfScalefactor", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                  "rlnOriginYAngst", "rlnOriginX", "rlnOriginY", "rlnOriginXPriorAngst", "rlnOriginYPriorAngst",
                  "rlnOriginXPrior", "rlnOriginYPrior", "rlnClassNumber", "rlnRandomSubset", "rlnNormCorrection",
                  "rlnGroupNumber")

# RELION 3.0 per-particle columns that become optics-group columns (StarConverter, in its order) ...
_OPTICS_LABELS_30 = (
    "rlnAmplitudeContrast",
    "rlnBeamTiltX",
    "rlnBeamTiltY",
    "rlnSphericalAberration",
    "rlnVoltage",
    "rlnDetectorPixelSize",
    "rlnMagnification",
    "rlnImagePixelSize",
)
# ... and pixel columns that become Å columns (StarConverter::translateOffsets).
_PIXEL_TO_ANGST_30 = {
    "rlnOriginX": "rlnOriginXAngst",
    "rlnOriginY": "rlnOriginYAngst",
    "rlnOriginZ": "rlnOriginZAngst",
    "rlnOriginXPrior": "rlnOriginXPriorAngst",
    "rlnOriginYPrior": "rlnOriginYPriorAngst",
    "rlnOriginZPrior": "rlnOriginZPriorAngst",
    "rlnHelicalTrackLength": "rlnHelicalTrackLengthAngst",
}
_KEY_VALUE_ATTR = "star_key_value"
_WHITESPACE = re.compile(r"\s")  # text with any (str.isspace) whitespace is written in quotes


class ParticleTable(NamedTuple):
    """A particle STAR file in the RELION 3.1 representation (unpacks as ``optics, particles, version``).

    Attributes
    ----------
    optics : pandas.DataFrame
        One row per optics group; ``rlnOpticsGroup`` (1-based), ``rlnImagePixelSize`` (Å) and whatever else the
        file had.
    particles : pandas.DataFrame
        One row per particle (``RangeIndex``); ``rlnImageName``, ``rlnOpticsGroup``, offsets in Å, all other columns.
    version : int
        Layout the file was read from: 30001 (``data_optics`` + ``data_particles``) or 30000 (one RELION 3.0 table,
        converted).
    """

    optics: pd.DataFrame
    particles: pd.DataFrame
    version: int


# --------------------------------------------------------------------------------------------------- reading


def read_star(path: str | os.PathLike, *, parse_as_string: Iterable[str] = ()) -> dict[str, pd.DataFrame]:
    """Read every block of a STAR file, in file order.

    Parameters
    ----------
    path : str or os.PathLike
        The STAR file.
    parse_as_string : iterable of str, optional
        Extra column names to keep as strings (on top of :data:`STRING_LABELS`).

    Returns
    -------
    dict of str to pandas.DataFrame
        Block name without ``data_`` (``"optics"``, ``"particles"``, ``"model_general"``; ``""`` for a bare
        ``data_``) -> table.  Key-value blocks are one-row DataFrames with ``attrs["star_key_value"] = True``.

    Raises
    ------
    InputError
        The file is missing, cannot be parsed, or holds no ``data_`` block.
    """
    import starfile  # imported here: pulls in pandas' csv machinery only when a STAR file is read

    path = Path(path)
    _check_file(path)
    strings = sorted(set(STRING_LABELS) | set(parse_as_string))
    try:
        raw = starfile.read(path, always_dict=True, parse_as_string=strings)
    except Exception as err:  # starfile raises ValueError, pandas ParserError, shlex's ValueError, ...
        raise InputError(path, f"cannot parse STAR file: {_one_line(err)}") from err
    if not raw:
        raise InputError(path, "no data_ block found (empty, or not a STAR file)")
    return {name: _as_frame(block) for name, block in raw.items()}


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a regular file")


def _as_frame(block: object) -> pd.DataFrame:
    """A starfile block (DataFrame, dict for key-value blocks, None for an empty block) as a DataFrame."""
    if isinstance(block, pd.DataFrame):
        return block
    if isinstance(block, dict):
        frame = pd.DataFrame([block]) if block else pd.DataFrame()
        frame.attrs[_KEY_VALUE_ATTR] = True
        return frame
    return pd.DataFrame()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# --------------------------------------------------------------------------------------------------- writing


def write_star(
    blocks: Mapping[str, pd.DataFrame],
    path: str | os.PathLike,
    *,
    key_value: Iterable[str] | None = None,
    float_format: str | None = None,
) -> Path:
    """Write blocks as a RELION 3.1 STAR file, atomically.

    Parameters
    ----------
    blocks : mapping of str to pandas.DataFrame
        Block name (without ``data_``) -> table, written in mapping order.  A dict value is accepted as a key-value
        block.
    path : str or os.PathLike
        Output file; its folder must exist.  An existing file is replaced only once the new one is complete.
    key_value : iterable of str, optional
        Names of one-row blocks to write as key-value pairs (``_rlnLabel value`` lines, as RELION's
        ``data_model_general``).  Default: the blocks marked ``attrs["star_key_value"]`` by :func:`read_star`.
    float_format : str, optional
        printf-style format for float columns (``"%.6f"`` as RELION).  Default: the shortest text that reads back to
        the same float64, which makes read -> write -> read exact.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    chosen = None if key_value is None else set(key_value)
    parts = []
    for name, block in blocks.items():
        frame = _as_frame(block)
        as_kv = frame.attrs.get(_KEY_VALUE_ATTR, False) if chosen is None else name in chosen
        if as_kv and len(frame) != 1:
            raise ValueError(f"block {name!r} has {len(frame)} rows; a key-value block needs exactly one")
        parts.append(_format_block(name, frame, as_kv, float_format))
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(parts))
    return path


def _format_block(name: str, frame: pd.DataFrame, key_value: bool, float_format: str | None) -> str:
    head = f"\n# version {STAR_VERSION}\n\ndata_{name}\n\n"
    columns = [_format_column(frame[c], float_format) for c in frame.columns]
    if key_value:
        width = max((len(c) for c in frame.columns), default=0) + 1
        lines = [f"_{c:<{width}} {values[0]}" for c, values in zip(frame.columns, columns, strict=True)]
        return head + "\n".join(lines) + "\n\n"
    header = "".join(f"_{c} #{i}\n" for i, c in enumerate(frame.columns, 1))
    return head + "loop_\n" + header + _format_rows(columns, len(frame)) + "\n"


def _format_rows(columns: list[list[str]], n_rows: int) -> str:
    """Right-align every column (as RELION does) and join the rows."""
    if n_rows == 0 or not columns:
        return ""
    padded = []
    for values in columns:
        width = max(12, max(len(v) for v in values))
        padded.append([v.rjust(width) for v in values])
    return "".join(" ".join(row) + " \n" for row in zip(*padded, strict=True))


def _format_column(column: pd.Series, float_format: str | None) -> list[str]:
    """Text for every value of one column."""
    dtype = column.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return [str(int(v)) for v in column.tolist()]
    if pd.api.types.is_integer_dtype(dtype) and not column.isna().any():
        return [str(v) for v in column.tolist()]
    if pd.api.types.is_float_dtype(dtype):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan).tolist()
        if float_format is None:
            return [repr(v) for v in values]
        return [float_format % v for v in values]
    return [_format_text(v) for v in column.tolist()]


def _format_text(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return "<NA>"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if text == "" or _WHITESPACE.search(text):
        return f'"{text}"'
    return text


# ---------------------------------------------------------------------------------------------- particles


def read_particles(path: str | os.PathLike, *, require_ctf: bool = False) -> ParticleTable:
    """Read a RELION 3.1 or 3.0 particle STAR file into the RELION 3.1 representation.

    Parameters
    ----------
    path : str or os.PathLike
        The STAR file.
    require_ctf : bool, optional
        Also require ``rlnDefocusU/V``, ``rlnDefocusAngle`` per particle and ``rlnVoltage``,
        ``rlnSphericalAberration``, ``rlnAmplitudeContrast`` per optics group.

    Returns
    -------
    ParticleTable
        ``(optics, particles, version)``; see :class:`ParticleTable`.

    Raises
    ------
    InputError
        File missing or unparsable; no particles; no ``rlnImageName``; no pixel size; an ``rlnOpticsGroup`` that the
        optics table lacks; CTF columns missing when ``require_ctf``.
    """
    path = Path(path)
    blocks = read_star(path)
    for name, table in blocks.items():
        blocks[name] = _numbers_checked(path, table, f"data_{name}")
    if "optics" in blocks:
        optics, particles, version = _split_31(path, blocks)
    else:
        optics, particles = _convert_30(path, _block_30(path, blocks))
        version = VERSION_30
    _validate(path, optics, particles, require_ctf)
    logger.debug("%s: %d particles, %d optics groups (layout %d)", path, len(particles), len(optics), version)
    return ParticleTable(optics, particles, version)


def write_particles(
    optics: pd.DataFrame,
    particles: pd.DataFrame,
    path: str | os.PathLike,
    *,
    float_format: str | None = None,
) -> Path:
    """Write a RELION 3.1 particle file (``data_optics`` + ``data_particles``, both ``loop_``), atomically.

    Parameters
    ----------
    optics, particles : pandas.DataFrame
        As returned by :func:`read_particles`.
    path : str or os.PathLike
        Output file.
    float_format : str, optional
        See :func:`write_star`; the default is exact.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    return write_star({"optics": optics, "particles": particles}, path, key_value=(), float_format=float_format)


def _split_31(path: Path, blocks: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    if "particles" not in blocks:
        names = ", ".join(f"data_{n}" for n in blocks)
        raise InputError(path, f"has data_optics but no data_particles block (blocks: {names})")
    optics = blocks["optics"].reset_index(drop=True)
    particles = blocks["particles"].reset_index(drop=True)
    if "rlnImagePixelSize" not in optics.columns:
        raise InputError(path, "data_optics has no rlnImagePixelSize", "add the pixel size of the particle images")
    return optics, particles, STAR_VERSION


def _block_30(path: Path, blocks: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The table of a RELION 3.0 file: its only block, or the one named particles / images / (empty)."""
    if len(blocks) == 1:
        return next(iter(blocks.values()))
    for name in ("particles", "", "images"):
        if name in blocks:
            return blocks[name]
    names = ", ".join(f"data_{n}" for n in blocks)
    raise InputError(path, f"cannot tell which block holds the particles (blocks: {names}; no data_optics)")


def _convert_30(path: Path, table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.0 table -> (optics, particles) as RELION 3.1's StarConverter does."""
    table = table.reset_index(drop=True)
    if len(table) == 0:
        raise InputError(path, "no particles (the table is empty)")
    labels = [c for c in _OPTICS_LABELS_30 if c in table.columns]
    if "rlnOpticsGroup" in table.columns:
        logger.warning("%s: RELION 3.0 table has rlnOpticsGroup; it is replaced by the optics groups found", path)
    group = _optics_groups_30(table, labels)
    optics = table.loc[~group.duplicated(), labels].reset_index(drop=True)
    optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in range(1, len(optics) + 1)])
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1, dtype=np.int64))
    optics = _unify_pixel_size(path, optics)
    particles = table.drop(columns=labels + (["rlnOpticsGroup"] if "rlnOpticsGroup" in table.columns else []))
    particles["rlnOpticsGroup"] = group.to_numpy() + 1
    apix = optics["rlnImagePixelSize"].to_numpy(dtype=np.float64)[group.to_numpy()]
    return optics, _offsets_to_angst(particles, apix)


def _optics_groups_30(table: pd.DataFrame, labels: list[str]) -> pd.Series:
    """0-based group per row; rows with equal values in ``labels`` share a group, numbered by first appearance."""
    if not labels:
        return pd.Series(np.zeros(len(table), dtype=np.int64))
    return table.groupby(labels, sort=False, dropna=False).ngroup().astype(np.int64)


def _unify_pixel_size(path: Path, optics: pd.DataFrame) -> pd.DataFrame:
    """Set rlnImagePixelSize from rlnDetectorPixelSize (µm) and rlnMagnification; both then dropped."""
    if {"rlnDetectorPixelSize", "rlnMagnification"} <= set(optics.columns):
        dstep = optics["rlnDetectorPixelSize"].to_numpy(dtype=np.float64)
        mag = optics["rlnMagnification"].to_numpy(dtype=np.float64)
        optics = optics.drop(columns=["rlnDetectorPixelSize", "rlnMagnification"])
        optics["rlnImagePixelSize"] = 10000.0 * dstep / mag
    if "rlnImagePixelSize" not in optics.columns:
        raise InputError(
            path,
            "RELION 3.0 table has no pixel size",
            "add rlnDetectorPixelSize and rlnMagnification, or rlnImagePixelSize",
        )
    apix = optics["rlnImagePixelSize"].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(apix) & (apix > 0)):
        raise InputError(path, f"invalid pixel size(s) {sorted(set(apix.tolist()))}")
    return optics


def _offsets_to_angst(particles: pd.DataFrame, apix: np.ndarray) -> pd.DataFrame:
    """Pixel offsets (rlnOriginX ...) -> Å columns in the same position."""
    renames = {old: new for old, new in _PIXEL_TO_ANGST_30.items() if old in particles.columns}
    if not renames:
        return particles
    particles = particles.copy()
    for old in renames:
        particles[old] = particles[old].to_numpy(dtype=np.float64) * apix
    return particles.rename(columns=renames)


def _numbers_checked(path: Path, table: pd.DataFrame, where: str) -> pd.DataFrame:
    """``table`` with its :data:`NUMERIC_LABELS` as numbers; a value that is not a finite number raises
    :class:`InputError` naming the column, the first such row and how many there are."""
    if not isinstance(table, pd.DataFrame):
        return table
    for label in NUMERIC_LABELS:
        if label not in table.columns:
            continue
        col = table[label]
        values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            more = f" ({int(bad.sum())} rows like it)" if bad.sum() > 1 else ""
            raise InputError(path, f"{where} row {row + 1}: {label} is {str(col.iloc[row])!r}, not a finite "
                             f"number{more}", "fix or remove those rows")
        if col.dtype == object:
            table = table.assign(**{label: values})
    return table


def _validate(path: Path, optics: pd.DataFrame, particles: pd.DataFrame, require_ctf: bool) -> None:
    if len(particles) == 0:
        raise InputError(path, "no particles (data_particles is empty)")
    if "rlnImageName" not in particles.columns:
        raise InputError(path, "particles have no rlnImageName column")
    for table, where in ((optics, "data_optics"), (particles, "data_particles")):
        if "rlnOpticsGroup" not in table.columns:
            raise InputError(path, f"{where} has no rlnOpticsGroup column")
    _check_groups(path, optics, particles)
    positive = ["rlnImagePixelSize", "rlnImageSize"] + (["rlnVoltage"] if require_ctf else [])
    for label in positive:
        if label in optics.columns and (optics[label].to_numpy(dtype=np.float64) <= 0).any():
            row = int(np.flatnonzero(optics[label].to_numpy(dtype=np.float64) <= 0)[0])
            raise InputError(path, f"data_optics row {row + 1} (optics group {optics['rlnOpticsGroup'].iloc[row]}): "
                             f"{label} is {optics[label].iloc[row]}, it must be positive")
    if require_ctf:
        _check_ctf(path, optics, particles)


def _check_groups(path: Path, optics: pd.DataFrame, particles: pd.DataFrame) -> None:
    known = optics["rlnOpticsGroup"]
    if known.duplicated().any():
        raise InputError(path, f"data_optics repeats optics group(s) {sorted(set(known[known.duplicated()]))}")
    used = particles["rlnOpticsGroup"]
    missing = ~used.isin(known)
    if missing.any():
        first = int(np.flatnonzero(missing.to_numpy())[0])
        groups = sorted(set(used[missing].tolist()))
        raise InputError(
            path,
            f"rlnOpticsGroup {groups} (first at particle row {first + 1}) not in data_optics "
            f"(groups {sorted(known.tolist())})",
        )


def _check_ctf(path: Path, optics: pd.DataFrame, particles: pd.DataFrame) -> None:
    lacking = [c for c in CTF_PARTICLE_LABELS if c not in particles.columns]
    lacking += [c for c in CTF_OPTICS_LABELS if c not in optics.columns]
    if lacking:
        raise InputError(path, f"CTF requested but {', '.join(lacking)} missing", "run CTF estimation, or drop --ctf")
