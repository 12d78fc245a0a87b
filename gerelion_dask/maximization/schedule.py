"""Auto-refine schedule: image sizes, changes in hidden variables, auto-sampling and convergence (§1.6, §5.6-5.8, §6.4-6.5).

Pure functions over a small frozen :class:`ScheduleState`; the driver keeps one instance per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..ops.sampling import angular_step

__all__ = ["ScheduleState", "coarse_size", "next_current_size", "hidden_variable_changes", "update_counters",
           "update_sampling", "is_converged"]


@dataclass(frozen=True)
class ScheduleState:
    healpix_order: int
    offset_range_px: float
    offset_step_px: float
    local_sigma_rot: float = 0.0  # 0 = global searches
    local_sigma_psi: float = 0.0
    current_size: int = 0
    n_iter_wo_resol_gain: int = 0
    n_iter_wo_large_changes: int = 0
    best_resolution: float = 0.0  # 1/Å
    smallest_changes_orient: float = 999.0
    smallest_changes_offset: float = 999.0
    smallest_changes_class: float = 999.0
    fine_enough: bool = False
    has_converged: bool = False
    high_fsc_at_limit: bool = False
    changes_orient: float = 999.0
    changes_offset: float = 999.0
    changes_class: float = 1.0
    perturb: float = 0.0

    @property
    def fine_angular_step(self) -> float:
        return angular_step(self.healpix_order + 1)

    @property
    def fine_offset_step_px(self) -> float:
        return self.offset_step_px / 2.0


def coarse_size(ori_size: int, pixel_size: float, healpix_order: int, particle_diameter: float,
                current_size: int) -> int:
    """Coarse-pass image size: 2 ceil(N a / (rotated_distance / 1.2)), capped by current_size (§1.6)."""
    rotated = angular_step(healpix_order) / 360.0 * np.pi * particle_diameter
    res = rotated / 1.2
    cs = 2 * int(np.ceil(ori_size * pixel_size / res))
    return int(min(max(cs, 2), current_size))


def next_current_size(ori_size: int, resolution_shell: int, incr_size: int, fsc=None, high_fsc: bool = False,
                      ave_pmax: float = 0.0, final: bool = False) -> int:
    """current_size for the next E-step (§5.6)."""
    if final:
        return ori_size
    if high_fsc and ave_pmax > 0.1:
        nu = resolution_shell + int(round(0.25 * ori_size / 2))
    else:
        inc = incr_size
        if fsc is not None:
            f = np.asarray(fsc)
            b5 = np.nonzero(f[1:] < 0.5)[0]
            b1 = np.nonzero(f[1:] < 0.143)[0]
            if b5.size and b1.size:
                inc = max(inc, int(b1[0] - b5[0]) + 5)
        nu = resolution_shell + inc
    return int(min(2 * nu, ori_size))


def _angle_between(A, B):
    tr = np.einsum("...ij,...ij->...", A, B)
    return np.rad2deg(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


def hidden_variable_changes(old_A, new_A, old_off_angst, new_off_angst, old_cls, new_cls, sym_ops=None):
    """(orientation change deg, offset change Å, class change fraction) between two iterations (§5.8)."""
    if old_A is None:
        return 999.0, 999.0, 1.0
    ops = sym_ops if sym_ops is not None else np.eye(3)[None]
    # angular distance: mean over the 3 rows of arccos(row1 . row2), minimised over symmetry mates
    best = np.full(len(new_A), np.inf)
    for R in ops:
        B = new_A @ R
        rows = np.rad2deg(np.arccos(np.clip(np.einsum("bij,bij->bi", old_A, B), -1, 1))).mean(axis=1)
        best = np.minimum(best, rows)
    d2 = ((np.asarray(new_off_angst) - np.asarray(old_off_angst)) ** 2).sum(axis=1)
    return float(best.mean()), float(np.sqrt(d2.mean() / 2.0)), float(np.mean(np.asarray(old_cls) != np.asarray(new_cls)))


def update_counters(st: ScheduleState, new_resolution: float, old_resolution: float, changes, fsc=None,
                    current_size: int = 0) -> ScheduleState:
    """Resolution-gain and large-change counters and the sticky high-FSC flag (§5.6, §5.8).

    No gain means no gain over the previous iteration's resolution ``old_resolution`` (RELION 3.1
    ``updateCurrentResolution`` compares with the model's current resolution, not with the best so far: a run whose
    resolution dipped and recovered counts the recovery as a gain)."""
    orient, offset, cls = changes
    if new_resolution <= old_resolution + 1e-4:
        wo_gain = st.n_iter_wo_resol_gain + 1
    else:
        wo_gain = 0
    best_res = max(st.best_resolution, new_resolution)
    so = min(st.smallest_changes_orient, orient)
    sf = min(st.smallest_changes_offset, offset)
    sc = min(st.smallest_changes_class, float(np.floor(cls + 0.5)))  # RELION's ROUND (0.5 -> 1)
    small = (1.03 * cls >= st.smallest_changes_class) and \
            (offset < 0.40 * st.fine_offset_step_px or 1.03 * offset >= st.smallest_changes_offset) and \
            (orient < 0.40 * st.fine_angular_step or 1.03 * orient >= st.smallest_changes_orient)
    wo_large = st.n_iter_wo_large_changes + 1 if small else 0
    high = st.high_fsc_at_limit
    if fsc is not None and current_size > 0:
        k = current_size // 2 - 1
        if 0 < k < len(fsc) and fsc[k] > 0.2:
            high = True
    return replace(st, n_iter_wo_resol_gain=wo_gain, n_iter_wo_large_changes=wo_large, best_resolution=best_res,
                   smallest_changes_orient=so, smallest_changes_offset=sf, smallest_changes_class=sc,
                   changes_orient=orient, changes_offset=offset, changes_class=cls, high_fsc_at_limit=high)


def update_sampling(st: ScheduleState, acc_rot: float, acc_trans_angst: float, pixel_size: float,
                    auto_local_healpix_order: int) -> ScheduleState:
    """RELION ``updateAngularSampling`` (§6.4): finer HEALPix order, then local searches."""
    if not (st.n_iter_wo_resol_gain >= 1 and st.n_iter_wo_large_changes >= 1):
        return st
    if st.fine_angular_step < 0.75 * acc_rot:
        return replace(st, fine_enough=True)
    # translations (fine step in Å in RELION 3.1+)
    new_fine_step = min(1.5, 0.75 * acc_trans_angst) / pixel_size
    new_step = new_fine_step * 2.0
    new_range = 5.0 * st.changes_offset / pixel_size
    new_range = min(new_range, 1.3 * st.offset_range_px)
    new_range = max(new_range, 1.5 * new_step)
    if new_range > 4 * new_step:
        new_range /= 2.0
    if new_range > 4 * new_step:
        new_step = new_range / 4.0
    if new_step > st.offset_step_px:
        new_step, new_range = st.offset_step_px, st.offset_range_px
    order = st.healpix_order + 1
    sig_rot, sig_psi = st.local_sigma_rot, st.local_sigma_psi
    if order >= auto_local_healpix_order:
        sig_rot = sig_psi = 2.0 * angular_step(order + 1)
    return replace(st, healpix_order=order, offset_range_px=new_range, offset_step_px=new_step,
                   local_sigma_rot=sig_rot, local_sigma_psi=sig_psi, n_iter_wo_resol_gain=0,
                   n_iter_wo_large_changes=0, smallest_changes_orient=999.0, smallest_changes_offset=999.0,
                   smallest_changes_class=999.0)


def is_converged(st: ScheduleState) -> bool:
    """Converged: sampling fine enough and one iteration without resolution gain and without large changes."""
    return st.fine_enough and st.n_iter_wo_resol_gain >= 1 and st.n_iter_wo_large_changes >= 1
