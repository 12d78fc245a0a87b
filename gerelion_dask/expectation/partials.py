"""Partial sums of the E-step (RELION's ``wsum_*`` accumulators) and per-particle results.

A :class:`Partials` holds everything the M-step needs from a set of particles of one half set; two of them add up
(``a + b``) to the partials of the union, which is what the Dask tree reduction relies on (tested in
``tests/test_engine.py``).  Halves are never mixed: adding partials of different halves raises.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..backend import SizedByArrays, get_xp, to_host
from ..ops.fourier import PaddedGrid

__all__ = ["Partials", "PoolResult", "empty_partials"]


@dataclass(frozen=True)
class Partials(SizedByArrays):
    half: int  # 1, 2, or 0 without halves
    grid: PaddedGrid
    bp_data: object  # (K, P, P, r_pad+2) complex128
    bp_weight: object  # (K, P, P, r_pad+2) float64
    wsum_sigma2: np.ndarray  # (n_optics, N/2+1)
    sumw_optics: np.ndarray  # (n_optics,)
    wsum_pdf_class: np.ndarray  # (K,)
    wsum_pdf_direction: np.ndarray  # (K, n_dir)
    wsum_sigma2_offset: float
    wsum_avg_norm: float
    wsum_scale_xa: np.ndarray  # (n_groups,)
    wsum_scale_aa: np.ndarray  # (n_groups,)
    group_counts: np.ndarray  # (n_groups,)
    sum_ll: float
    sum_pmax: float
    n_particles: int
    n_zero_weight: int

    def _check_addable(self, other: Partials) -> None:
        if self.half != other.half:
            raise ValueError(f"refusing to add partial sums of half set {self.half} and half set {other.half}")
        if self.grid != other.grid:
            raise ValueError("partial sums on different Fourier grids cannot be added")

    def __add__(self, other: Partials) -> Partials:
        self._check_addable(other)
        vals = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            vals[f.name] = a if f.name in ("half", "grid") else a + b
        return Partials(**vals)

    def absorb(self, other: Partials) -> Partials:
        """``self + other`` with ``other``'s volumes added into ``self``'s arrays in place (slab by slab, so
        ``other``'s may be in host memory while ``self``'s are on the device: no third volume is allocated).  Only
        for partials whose volumes nothing else holds (a pool's fresh E-step output); same sums as ``+``."""
        self._check_addable(other)
        xp = get_xp(self.bp_data)
        for name in ("bp_data", "bp_weight"):
            mine, theirs = getattr(self, name), getattr(other, name)
            step = max(1, mine.shape[1] // 8)
            for k in range(mine.shape[0]):
                for s in range(0, mine.shape[1], step):
                    mine[k, s : s + step] += xp.asarray(theirs[k, s : s + step])
        vals = {f.name: getattr(self, f.name) if f.name in ("half", "grid", "bp_data", "bp_weight")
                else getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        return Partials(**vals)

    def to_host(self) -> Partials:
        return self.on(np)

    def on(self, xp) -> Partials:
        """The same sums with the two volumes in ``xp``'s memory (``cupy``: the M-step runs on the GPU)."""
        move = to_host if xp is np else xp.asarray
        return Partials(**{f.name: (move(getattr(self, f.name)) if f.name in ("bp_data", "bp_weight")
                                    else getattr(self, f.name)) for f in fields(self)})


def empty_partials(half: int, grid: PaddedGrid, n_classes: int, n_dir: int, n_optics: int, n_groups: int,
                   ori_size: int, xp=np) -> Partials:
    from ..ops.fourier import layout_shape

    shape = (n_classes,) + layout_shape(grid.r_pad)
    nsh = ori_size // 2 + 1
    return Partials(half, grid, xp.zeros(shape, np.complex128), xp.zeros(shape, np.float64),
                    np.zeros((n_optics, nsh)), np.zeros(n_optics), np.zeros(n_classes),
                    np.zeros((n_classes, n_dir)), 0.0, 0.0, np.zeros(n_groups), np.zeros(n_groups),
                    np.zeros(n_groups), 0.0, 0.0, 0, 0)


@dataclass(frozen=True)
class PoolResult(SizedByArrays):
    """Best pose and statistics per particle of a pool (host arrays, length B)."""

    index: np.ndarray
    rot: np.ndarray
    tilt: np.ndarray
    psi: np.ndarray
    origin_x_angst: np.ndarray
    origin_y_angst: np.ndarray
    class_number: np.ndarray  # 1-based
    pmax: np.ndarray
    n_significant: np.ndarray
    loglik: np.ndarray
    norm: np.ndarray

    @staticmethod
    def concat(results: list[PoolResult]) -> PoolResult:
        return PoolResult(**{f.name: np.concatenate([getattr(r, f.name) for r in results]) for f in fields(PoolResult)})
