"""Atomic file replacement: write to a temporary name in the target's folder, then ``os.replace``.

A reader never sees a half-written file: either the old file (or none) or the complete new one.  The temporary
name keeps the target's suffix (``.star``, ``.mrc``), so libraries that look at suffixes behave the same, and it
starts with a dot, so directory listings and globs such as ``*.mrc`` do not pick it up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "temporary_sibling"]

logger = logging.getLogger(__name__)


def temporary_sibling(path: Path) -> Path:
    """A fresh, unused name in ``path``'s folder: ``.<stem>.tmp-<pid>-<random><suffix>``."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path.with_name(f".{path.stem}.tmp-{tag}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically, on error it is removed.

    Works for files and for folders (a folder replaces a missing target only: ``os.replace`` cannot replace
    a non-empty folder, so callers remove an old folder first).

    Parameters
    ----------
    path : str or os.PathLike
        The final name.  Its folder must exist.

    Yields
    ------
    pathlib.Path
        Where to write.  Nothing exists there yet.
    """
    final = Path(path)
    tmp = temporary_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    logger.debug("wrote %s", final)


def _remove(path: Path) -> None:
    """Remove a file or folder if it exists, ignoring errors (clean-up after a failure)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
