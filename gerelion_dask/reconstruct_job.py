"""Reconstruction of a map from particles with known poses (the twin of ``relion_reconstruct``)."""

from __future__ import annotations

import numpy as np

from .conventions import centred_rfft2, euler_to_matrix, shift_phase_2d
from .errors import InputError
from .expectation.preprocess import band_mask
from .io.particles import ParticleSet
from .ops.backprojector import empty_backprojection, insert_slices
from .ops.ctf import ctf_rfft
from .ops.fourier import PaddedGrid
from .ops.reconstruct import reconstruct
from .ops.symmetry import symmetry_operators
from .maximization.mstep import symmetrised
from .setup_job import _col, band_shells_per_row, ctf_params, optics_index

__all__ = ["reconstruct_star"]


def reconstruct_star(star: str, *, ctf: bool = True, sym: str = "C1", subset: int = 0, class_number: int = 0,
                     gridding_iterations: int = 10, pad: float = 2.0, chunk: int = 500):
    """Back-project every (selected) particle at its pose and reconstruct; returns ``(map, pixel_size)``."""
    ps = ParticleSet.from_star(star, require_ctf=ctf)
    md = ps.metadata
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        if col not in md:
            raise InputError(star, f"missing column {col}: reconstruction needs the particles' poses")
    sel = np.ones(ps.n, bool)
    if subset:
        if "rlnRandomSubset" not in md:
            raise InputError(star, "--subset needs a rlnRandomSubset column")
        sel &= md["rlnRandomSubset"].to_numpy() == subset
    if class_number:
        sel &= md["rlnClassNumber"].to_numpy() == class_number if "rlnClassNumber" in md else False
    rows = np.nonzero(sel)[0]
    if rows.size == 0:
        raise InputError(star, "no particles selected for reconstruction")
    N, a = ps.box_size, ps.pixel_size
    if N % 2:
        raise InputError(star, f"odd box size {N} cannot be reconstructed (RELION cannot either)",
                         "re-extract with an even box")
    ctf_all = ctf_params(ps, optics_index(ps)) if ctf else None

    def col(name, default):
        return _col(md, name, default)

    # optics groups coarser than the model's grid: no data beyond their band, so neither data nor weight there
    band = band_shells_per_row(ps)
    lim = np.asarray(band)[optics_index(ps)] if band else None
    bp = empty_backprojection(PaddedGrid.create(N, padding=pad))
    for s in range(0, rows.size, chunk):
        r = rows[s : s + chunk]
        img = ps.read_images(r).astype(np.float64)
        A = euler_to_matrix(col("rlnAngleRot", 0)[r], col("rlnAngleTilt", 0)[r], col("rlnAnglePsi", 0)[r])
        sh = np.stack([col("rlnOriginXAngst", 0)[r], col("rlnOriginYAngst", 0)[r]], 1) / a
        X = centred_rfft2(img) * shift_phase_2d(N, N, sh)
        if ctf:
            c = ctf_rfft(ctf_all.take(r), N, a, N)
        else:
            c = np.ones(X.shape)
        if lim is not None:
            c = c * band_mask(N, lim[r])
        bp = insert_slices(bp, A, X * c, c * c)
    bp = symmetrised(bp.data, bp.weight, bp.grid, symmetry_operators(sym))
    return reconstruct(bp, gridding_iterations=gridding_iterations).astype(np.float32), a
