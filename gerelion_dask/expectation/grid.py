"""The hidden-variable grid of one iteration: coarse orientations and translations and their oversampled children.

Index conventions follow ALGORITHM.md §3.3 and §4.3: coarse orientation ``o = dir * n_psi + psi``; with
oversampling 1 each coarse orientation has 8 children ``i_over_rot = child_direction * 2 + psi_sub`` (children of
HEALPix pixel p at order n+1 are 4p..4p+3, NESTED) and each coarse translation 4 children
``i_over_trans = x_sub * 2 + y_sub``.  The random perturbation of §3.4 is applied to every matrix (``A @ E(d, d, d)``)
and every translation (``+ r S`` in x and y).  Fine orientations get a global id so that back-projection sums of all
particles of a pool can be merged before one 3D insertion per orientation.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np

from ..backend import get_xp
from ..conventions import euler_to_matrix

__all__ = ["OrientationGrid", "coarse_translations"]


def coarse_translations(offset_range_px: float, offset_step_px: float) -> np.ndarray:
    """Square grid of step S inside the disc of radius R (pixels), ``(T, 2)`` (x, y), centre first."""
    if offset_step_px <= 0:
        return np.zeros((1, 2))
    m = int(np.floor(offset_range_px / offset_step_px + 1e-9))
    v = np.arange(-m, m + 1) * offset_step_px
    xx, yy = np.meshgrid(v, v, indexing="ij")
    t = np.stack([xx.ravel(), yy.ravel()], -1)
    keep = (t**2).sum(-1) <= offset_range_px**2 + 1e-6
    t = t[keep]
    order = np.argsort((t**2).sum(-1), kind="stable")
    return t[order]


@dataclass(frozen=True)
class OrientationGrid:
    """Coarse and fine sampling of one iteration (3D, oversampling order 1)."""

    healpix_order: int
    dir_pix: np.ndarray  # (n_dir,) NESTED pixel ids at healpix_order of the directions searched
    psi_step: float  # degrees
    offset_range_px: float
    offset_step_px: float
    perturb: float = 0.0  # r in [-f, f]; angles move by r * psi_step, translations by r * offset_step
    oversampling: int = 1

    def __getstate__(self) -> dict:
        """Pickled with its fields only: the cached tables (direction angles and frames: tens of MB at HEALPix
        orders 6-7) are remade where the grid is used, not shipped to every Dask task."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def n_dir(self) -> int:
        return len(self.dir_pix)

    @property
    def n_psi(self) -> int:
        return int(np.ceil(360.0 / self.psi_step - 1e-9))

    @property
    def fine_id_bound(self) -> int:
        """One more than the largest global fine id :meth:`fine_ids` can return (all directions of the order)."""
        return 8 * 12 * 4**self.healpix_order * self.n_psi

    @cached_property
    def psi(self) -> np.ndarray:
        return np.arange(self.n_psi) * self.psi_step

    @cached_property
    def dir_angles(self) -> tuple[np.ndarray, np.ndarray]:
        from ..ops.sampling import healpix_directions

        rot, tilt = healpix_directions(self.healpix_order)
        return rot[self.dir_pix], tilt[self.dir_pix]

    @cached_property
    def _perturb_matrix(self) -> np.ndarray:
        d = self.perturb * self.psi_step
        return euler_to_matrix(d, d, d)

    @cached_property
    def translations(self) -> np.ndarray:
        """Coarse translations (pixels, perturbed), ``(T, 2)``."""
        return coarse_translations(self.offset_range_px, self.offset_step_px) + self.perturb * self.offset_step_px

    @cached_property
    def _direction_frames(self) -> np.ndarray:
        """``Ry(tilt) Rz(rot) E`` of every direction (the Euler matrix at psi = 0 times the perturbation) as rows of
        9, ``(n_dir, 9)``: an orientation's matrix is ``Rz(psi)`` times its direction's frame (:func:`_spin`)."""
        return _frames(*self.dir_angles, self._perturb_matrix)

    @cached_property
    def _psi_cos_sin(self) -> tuple[np.ndarray, np.ndarray]:
        r = np.deg2rad(self.psi)
        return np.cos(r), np.sin(r)

    def coarse_matrices(self, dir_idx=None, psi_idx=None) -> np.ndarray:
        """Rotation matrices of coarse orientations ``(n, 3, 3)`` (``euler_to_matrix(rot, tilt, psi) @ E``, E the
        perturbation); all of them (``o = dir * n_psi + psi``) by default.  Made as ``Rz(psi)`` times the direction's
        cached frame (local searches ask for tens of thousands of orientations per chunk, whose trigonometry and
        matrix products cost ~10 ms of host time a pool).  On the backend of ``dir_idx``: with CuPy indices the
        matrices are made on the device from device copies of the tables."""
        if dir_idx is None:
            dir_idx = np.repeat(np.arange(self.n_dir), self.n_psi)
            psi_idx = np.tile(np.arange(self.n_psi), self.n_dir)
        xp = get_xp(dir_idx)
        dir_idx = xp.asarray(dir_idx)
        frames, (cos, sin) = self._direction_frames, self._psi_cos_sin
        if xp is not np:  # device indices: the tables copied to that device once (a few MB), the matrices made there
            frames, cos, sin = self._device_tables(xp)
        f = xp.take(frames, dir_idx.reshape(-1), axis=0)
        c, s = (xp.take(v, xp.asarray(psi_idx).reshape(-1)) for v in (cos, sin))
        return _spin(f, c, s).reshape(dir_idx.shape + (3, 3))

    def _device_tables(self, xp):
        """The direction frames and psi cos/sin on the current device of ``xp`` (CuPy), kept per device."""
        key = (xp.__name__, xp.cuda.Device().id)
        tables = self.__dict__.setdefault("_on_device", {})
        if key not in tables:
            tables[key] = (xp.asarray(self._direction_frames),) + tuple(xp.asarray(v) for v in self._psi_cos_sin)
        return tables[key]

    @cached_property
    def _fine_directions(self) -> tuple[np.ndarray, np.ndarray]:
        """(rot, tilt) of every HEALPix pixel one order finer (the fine directions' lookup table)."""
        from ..ops.sampling import healpix_directions

        return healpix_directions(self.healpix_order + 1)

    def fine_ids(self, coarse_o, child=None):
        """Global ids ``(len, 8)`` of the children of coarse orientations (their matrices:
        :meth:`fine_matrices_from_ids`): ``((4 * dir_pix + sub_dir) * n_psi + psi) * 2 + sub_psi``; with ``child``
        (0-7, the shape of ``coarse_o``) only that child's id, ``(len,)``.  On the backend of ``coarse_o`` (NumPy or
        CuPy)."""
        xp = get_xp(coarse_o)
        coarse_o = xp.asarray(coarse_o, dtype=np.int64)
        if child is None:  # all 8 children: (len, 1) against (1, 8)
            coarse_o, child = coarse_o[:, None], xp.arange(8)[None, :]
        child = xp.asarray(child, dtype=np.int64)
        d, p = coarse_o // self.n_psi, coarse_o % self.n_psi
        return ((4 * xp.asarray(self.dir_pix)[d] + child // 2) * self.n_psi + p) * 2 + child % 2

    def fine_translations(self, coarse_t: np.ndarray) -> np.ndarray:
        """Children of coarse translations, ``(len, 4, 2)`` pixels (``x_sub * 2 + y_sub``)."""
        base = self.translations[np.asarray(coarse_t, dtype=np.int64)]
        q = 0.25 * self.offset_step_px
        sub = np.array([[-q, -q], [-q, q], [q, -q], [q, q]])
        return base[:, None, :] + sub[None, :, :]

    @cached_property
    def _fine_frames(self):
        """:attr:`_direction_frames` of every fine direction (rows of 9), or None where they would take more than
        ``FINE_FRAMES_BYTES`` (HEALPix order 7 and up: they are then made per call)."""
        rot_f, tilt_f = self._fine_directions
        return None if 72 * rot_f.size > FINE_FRAMES_BYTES else _frames(rot_f, tilt_f, self._perturb_matrix)

    @cached_property
    def _fine_psi_cos_sin(self) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of the fine psi angles ``psi -/+ psi_step / 4``, ``(n_psi, 2)`` each (flat index ``2 psi +
        psi_sub``)."""
        r = np.deg2rad(self.psi[:, None] + np.array([-0.25, 0.25])[None, :] * self.psi_step)
        return np.cos(r), np.sin(r)

    def fine_matrices_from_ids(self, gid: np.ndarray) -> np.ndarray:
        """Matrices of fine orientations from their global ids (inverse of the id rule): ``Rz(psi)`` times the fine
        direction's frame, as :meth:`coarse_matrices`."""
        gid = np.asarray(gid, dtype=np.int64)
        child, q = np.divmod(gid.reshape(-1), 2 * self.n_psi)  # q = 2 psi + psi_sub
        frames = self._fine_frames
        if frames is None:
            rot_f, tilt_f = self._fine_directions
            f = _frames(rot_f[child], tilt_f[child], self._perturb_matrix)
        else:
            f = np.take(frames, child, axis=0)
        cos, sin = self._fine_psi_cos_sin
        return _spin(f, np.take(cos, q), np.take(sin, q)).reshape(gid.shape + (3, 3))


# the most memory an OrientationGrid keeps for the frames of its fine directions: up to HEALPix order 6 (fine order
# 7: 196,608 directions, 14 MB, 23 ms to make on the 2-core VM); from order 7 (786,432: 57 MB, 138 ms) they are made
# per call (45,000 fine ids: 10 ms, against 5.6 ms from the table and 15 ms by the Euler formula)
FINE_FRAMES_BYTES = 16 << 20


def _frames(rot, tilt, perturb: np.ndarray) -> np.ndarray:
    """``euler_to_matrix(rot, tilt, 0) @ perturb`` as rows of 9, ``(n, 9)``: rows ``(cos t cos r, cos t sin r,
    -sin t)``, ``(-sin r, cos r, 0)``, ``(sin t cos r, sin t sin r, cos t)``, then one matrix product."""
    r, t = np.deg2rad(np.asarray(rot, np.float64)), np.deg2rad(np.asarray(tilt, np.float64))
    ca, sa, cb, sb = np.cos(r), np.sin(r), np.cos(t), np.sin(t)
    F = np.empty((ca.size, 3, 3))
    F[:, 0, 0], F[:, 0, 1], F[:, 0, 2] = cb * ca, cb * sa, -sb
    F[:, 1, 0], F[:, 1, 1], F[:, 1, 2] = -sa, ca, 0.0
    F[:, 2, 0], F[:, 2, 1], F[:, 2, 2] = sb * ca, sb * sa, cb
    return (F.reshape(-1, 3) @ perturb).reshape(-1, 9)


def _spin(f: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``Rz(psi) F`` for frames ``f (n, 9)`` (rows f0 f1 f2 of F) and ``c, s = cos psi, sin psi (n,)``: rows
    ``c f0 + s f1``, ``c f1 - s f0``, ``f2`` -- RELION's ZYZ Euler matrix at psi, its frame at psi = 0 (``(n, 9)``)."""
    c, s = c[:, None], s[:, None]
    A = np.empty_like(f)
    np.multiply(c, f[:, 0:3], out=A[:, 0:3])
    A[:, 0:3] += s * f[:, 3:6]
    np.multiply(c, f[:, 3:6], out=A[:, 3:6])
    A[:, 3:6] -= s * f[:, 0:3]
    A[:, 6:9] = f[:, 6:9]
    return A
