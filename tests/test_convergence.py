"""An auto-refine of a small simulated set gets better, iteration by iteration, and stops by itself.

Oracle: the simulated truth map -- each iteration's half-1 map is compared with it (FSC), and the run must end by
its own convergence criterion well before the iteration cap, with RELION's ``rlnHasConverged`` set.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gerelion_dask.cli import main as cli_main
from gerelion_dask.io.mrc import read_map
from gerelion_dask.io.star import read_star
from gerelion_dask.ops.fsc import fsc
from gerelion_dask.simulate import SimulationSpec, phantom_map, simulate_dataset

BOX, APIX, CAP = 24, 5.0, 30


@pytest.mark.slow
def test_auto_refine_improves_and_stops_by_itself(tmp_path):
    truth = phantom_map(BOX, APIX, "blobs")
    spec = SimulationSpec(n_particles=200, box=BOX, apix=APIX, snr=1.0, seed=11, ini_lowpass_angst=30.0,
                          class_fractions=None, n_classes=1, boxpad=1)
    paths = simulate_dataset([truth], spec, tmp_path / "sim")
    out = tmp_path / "Refine3D"
    rc = cli_main(["refine", "--i", str(paths.particles_star), "--o", str(out / "run"),
                   "--ref", str(paths.initial_reference), "--ini_high", "30", "--ctf", "--ctf_corrected_ref",
                   "--particle_diameter", str(0.8 * BOX * APIX), "--zero_mask", "--flatten_solvent", "--norm",
                   "--scale", "--healpix_order", "1", "--auto_local_healpix_order", "3", "--offset_range", "3",
                   "--offset_step", "1.5", "--low_resol_join_halves", "40", "--auto_refine",
                   "--split_random_halves", "--auto_iter_max", str(CAP), "--random_seed", "3", "--pool", "50",
                   "--device", "cpu", "--in-process"])
    assert rc == 0
    lines = [json.loads(x) for x in (out / "run_progress.jsonl").read_text().splitlines()]
    n_it = len(lines)
    assert n_it < CAP, f"ran into the iteration cap ({n_it} iterations)"
    opt = read_star(out / f"run_it{n_it:03d}_optimiser.star")["optimiser_general"]
    assert int(opt["rlnHasConverged"].iloc[0]) == 1
    # FSC of each iteration's half-1 map against the truth, averaged over the shells to Nyquist
    t = truth.astype(np.float64)
    q = [float(np.mean(fsc(read_map(out / f"run_it{i:03d}_half1_class001.mrc")[0].astype(np.float64), t)[1:]))
         for i in range(1, n_it)]
    slope = np.polyfit(np.arange(len(q)), q, 1)[0]
    assert slope > 0, q  # better on average, iteration by iteration
    assert q[-1] > q[0] + 0.05 and q[-1] >= max(q[: len(q) // 2]) - 0.01, q
    final = read_map(out / "run_class001.mrc")[0].astype(np.float64)
    assert np.mean(fsc(final, t)[1:]) >= q[-1] - 0.02  # the final map (both halves, to Nyquist) is no worse
