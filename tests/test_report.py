"""Progress lines, per-iteration PNG plots, the terminal progress bar and ``gerelion report``.

A tiny auto-refine (box 24, 70 particles, 2 iterations, in process) through the command line; oracles: the
files written (PNG signatures, JSON fields), the HTML page's content, the bar's text on a fake terminal."""

from __future__ import annotations

import io
import json
import re

import pytest

from gerelion_dask.cli import main as cli_main
from gerelion_dask.progress import ProgressBar
from gerelion_dask.simulate import SimulationSpec, phantom_map, simulate_dataset

BOX, APIX = 24, 5.0
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep")
    maps = [phantom_map(BOX, APIX, "blobs"), phantom_map(BOX, APIX, "blobs2")]
    spec = SimulationSpec(n_particles=70, box=BOX, apix=APIX, snr=2.0, seed=3, ini_lowpass_angst=25.0,
                          n_classes=2, boxpad=1)
    paths = simulate_dataset(maps, spec, out / "sim")
    rc = cli_main(["refine", "--i", str(paths.particles_star), "--o", str(out / "R" / "run"), "--ref",
                   str(paths.initial_reference), "--ctf", "--ctf_corrected_ref", "--firstiter_cc", "--particle_diameter",
                   str(0.8 * BOX * APIX), "--zero_mask", "--healpix_order", "1", "--offset_range", "3",
                   "--offset_step", "1.5", "--random_seed", "5", "--pool", "35", "--ini_high", "25",
                   "--auto_iter_max", "2", "--in-process", "--device", "cpu"])
    assert rc == 0
    return out / "R"


@pytest.mark.slow
def test_progress_lines_and_plots_per_iteration(run):
    lines = [json.loads(s) for s in (run / "run_progress.jsonl").read_text().splitlines()]
    assert [ln["iteration"] for ln in lines] == [1, 2]
    for ln in lines:
        assert set(ln["seconds"]) >= {"prepare", "estep", "mstep", "total"}
        assert ln["resolution_angst"] > 0 and len(ln["class_fractions"]) == 1
        assert {"changes_orientations_deg", "changes_offsets_angst", "changes_classes"} <= set(ln)
        assert ln["memory"]["peak_rss_mib"] > 10 and len(ln["fsc"]) == BOX // 2 + 1
    for it in (1, 2):
        for kind in ("fsc", "class_fractions", "angdist"):
            p = run / f"run_it{it:03d}_{kind}.png"
            assert p.read_bytes()[:8] == PNG, p
    job = json.loads((run / "run_job.json").read_text())
    assert job["command"].startswith("gerelion refine --i ") and "--healpix_order 1" in job["command"]
    assert job["box"] == BOX


@pytest.mark.slow
def test_report_page(run):
    assert cli_main(["report", str(run / "run")]) == 0
    page = (run / "run_report.html").read_text()
    assert "3D auto-refine" in page and "gerelion refine --i" in page
    assert page.count("data:image/png;base64,") == 4  # resolution, FSC, class fractions, angular distribution
    assert "run_class001.mrc" in page and "run_half1_class001_unfil.mrc" in page
    res = json.loads((run / "run_progress.jsonl").read_text().splitlines()[-1])["resolution_angst"]
    assert f"{res:.2f} Å" in page
    assert len(re.findall(r"<tr><td>\d+</td>", page)) == 2  # one row per iteration
    assert cli_main(["report", str(run)]) == 0  # the folder of a single run works too
    assert cli_main(["report", str(run / "nothing")]) == 2


def test_progress_bar_terminal_and_quiet():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    class Rec:
        resolution_angst = 12.8

    t = Tty()
    bar = ProgressBar(stream=t)
    bar.iteration_started(3, 20.0)
    bar.stage("E-step")
    bar(5, 10)
    assert "it   3" in bar.line() and "5/10 pools" in bar.line() and "E-step" in bar.line() and "20.00 Å" in bar.line()
    assert bar.line().count("#") == 12  # half of the 24-character bar
    bar.iteration_finished(Rec())
    assert t.getvalue().endswith("\n") and "12.80 Å" in t.getvalue().splitlines()[-1]
    quiet = io.StringIO()  # not a terminal: nothing written
    qb = ProgressBar(stream=quiet)
    qb.iteration_started(1)
    qb(1, 2)
    assert quiet.getvalue() == ""
