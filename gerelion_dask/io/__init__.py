"""Input and output: STAR tables, MRC maps and stacks, particle sets, and the imported Zarr particle store.

``star`` (RELION 3.1/3.0 particle tables, exact STAR round trips), ``mrc`` (maps, memory-mapped stacks),
``particles`` (:class:`ParticleSet`), ``zarr_store`` (:func:`import_particles`, :class:`ZarrParticles`).
Every user-facing problem is an :class:`~gerelion_dask.errors.InputError` whose message starts with the file name.
"""

from __future__ import annotations

from .mrc import StackReader, read_header, read_map, write_map, write_stack
from .particles import ParticleSet, parse_image_names
from .star import ParticleTable, read_particles, read_star, write_particles, write_star
from .zarr_store import ZarrParticles, import_particles

__all__ = [
    "ParticleSet",
    "ParticleTable",
    "StackReader",
    "ZarrParticles",
    "import_particles",
    "parse_image_names",
    "read_header",
    "read_map",
    "read_particles",
    "read_star",
    "write_map",
    "write_particles",
    "write_stack",
    "write_star",
]
