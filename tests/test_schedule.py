"""The resolution bookkeeping between iterations.  Oracle: RELION 3.1.3's rules in ``MlOptimiser``
(``updateCurrentResolution``, ``maximizationOtherParameters``), written out here as numbers."""

from __future__ import annotations

import numpy as np

from gerelion_dask.maximization.mstep import ini_high_resolution, ini_high_taper
from gerelion_dask.maximization.schedule import ScheduleState, update_counters

NO_CHANGES = (0.0, 0.0, 0.0)


def test_no_gain_means_no_gain_over_the_previous_iteration_not_the_best_so_far():
    # best 1/9 Å earlier, 1/9.5 last iteration: 1/9.2 now is a gain over the last one (RELION resets the counter),
    # though not over the best; 1/9.6 now is none
    st = ScheduleState(2, 5.0, 2.0, n_iter_wo_resol_gain=1, best_resolution=1 / 9.0)
    up = update_counters(st, 1 / 9.2, 1 / 9.5, NO_CHANGES)
    assert up.n_iter_wo_resol_gain == 0 and up.best_resolution == 1 / 9.0
    down = update_counters(st, 1 / 9.6, 1 / 9.5, NO_CHANGES)
    assert down.n_iter_wo_resol_gain == 2
    same = update_counters(st, 1 / 9.5 + 0.5e-4, 1 / 9.5, NO_CHANGES)  # within RELION's 1e-4 (1/Å) tolerance
    assert same.n_iter_wo_resol_gain == 2
    gain = update_counters(st, 1 / 8.0, 1 / 9.5, NO_CHANGES)
    assert gain.n_iter_wo_resol_gain == 0 and gain.best_resolution == 1 / 8.0


def test_ini_high_resolution_rounds_half_up_like_relion():
    # shell ROUND(N a / ini_high) = floor(x + 0.5): 96 Å / 38.4 Å = 2.5 -> shell 3 (Python's round gives 2)
    assert ini_high_resolution(64, 1.5, 38.4) == 3 / 96
    assert ini_high_resolution(64, 1.5, 60.0) == 2 / 96  # dev_class: 1.6 -> 2, i.e. 48 Å (below minres_map 5)
    assert ini_high_resolution(64, 3.0, 60.0) == 3 / 192  # dev_refine: 3.2 -> 3, i.e. 64 Å


def test_ini_high_taper_is_relions_squared_raised_cosine():
    # N a = 128 Å, ini_high 30 Å: the edge runs from shell 128/30 - 1 = 3.267 to 5.267
    t = ini_high_taper(17, 32, 4.0, 30.0)
    lo = 128 / 30 - 1
    expect = np.zeros(17)
    expect[:4] = 1.0
    for r in (4, 5):
        expect[r] = (0.5 - 0.5 * np.cos(np.pi * (lo + 2 - r) / 2)) ** 2
    assert np.allclose(t, expect, rtol=0, atol=1e-15)
    assert 0.49 < t[4] < 0.5 and t[5] < 0.002
