"""The /gerelion page on the Dask dashboard, loaded in Debian's headless Chromium over the DevTools protocol while a
small refinement runs on a local cluster.  Oracles: the run's own IterationRecords (the page's resolution history and
FSC curve must be those numbers, received from the scheduler), and the pixels of the page's plot canvases (the plots
were drawn, not only sent).  Skipped, with the reason, only where no Chromium can be found or installed.

``GERELION_DASHBOARD_SCREENSHOT=docs/dashboard_gerelion.png`` also saves the screenshot there (README's picture).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

BOX, APIX, N_PARTICLES = 24, 4.0, 60

# everything the page shows, read through Bokeh's own JS document (plots live in shadow DOM), and the canvases'
# non-background pixels (Bokeh draws plots into canvases)
_PAGE_STATE = r"""
(() => {
  const docs = (window.Bokeh && Bokeh.documents) || [];
  if (!docs.length) return null;
  const d = docs[0];
  const get = (n) => d.get_model_by_name(n);
  const res = get("gerelion-resolution-data"), fsc = get("gerelion-fsc-data"), status = get("gerelion-status");
  if (!res || !fsc || !status) return null;
  const canvases = [];
  const walk = (root) => root.querySelectorAll("*").forEach((el) => {
    if (el.tagName === "CANVAS") canvases.push(el);
    if (el.shadowRoot) walk(el.shadowRoot);
  });
  walk(document);
  const drawn = canvases.map((c) => {
    if (!c.width || !c.height) return 0;
    const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < px.length; i += 4) {
      if (px[i + 3] > 0 && (px[i] < 200 || px[i + 1] < 200 || px[i + 2] < 200)) n++;
    }
    return n;
  });
  return {iterations: Array.from(res.data.iteration), resolution: Array.from(res.data.resolution),
          fsc: Array.from(fsc.data.fsc), freq: Array.from(fsc.data.freq), status: status.text,
          canvases: canvases.length, drawn: drawn, title: document.title};
})()
"""


@pytest.fixture(scope="module")
def chromium():
    from chromium_cdp import find_chromium

    path = find_chromium()
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env,
                       capture_output=True, timeout=600)
        path = find_chromium()
    if path is None:
        pytest.skip("Chromium is not installed and cannot be installed here (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from gerelion_dask.simulate import SimulationSpec, phantom_map, simulate_dataset

    spec = SimulationSpec(n_particles=N_PARTICLES, box=BOX, apix=APIX, snr=0.5, seed=3, ini_lowpass_angst=30.0,
                          boxpad=1, projector_padding=1)
    return simulate_dataset([phantom_map(BOX, APIX)], spec, tmp_path_factory.mktemp("dash_data"))


def test_gerelion_page_shows_the_runs_iterations_resolution_and_fsc(chromium, dataset, tmp_path):
    from chromium_cdp import Chromium

    from gerelion_dask.config import JobConfig
    from gerelion_dask.dashboard import PAGE
    from gerelion_dask.distributed.cluster import close_client, make_client
    from gerelion_dask.distributed.runner import DaskRunner
    from gerelion_dask.driver import run_job

    cfg = JobConfig(i=str(dataset.particles_star), o=str(tmp_path / "run"), ref=str(dataset.initial_reference),
                    auto_refine=True, split_random_halves=True, healpix_order=1, auto_iter_max=3, pool=30,
                    ini_high=30.0, ctf=True, random_seed=5, offset_range=2.0, offset_step=1.0, maxsig=10)
    client, cluster = make_client(n_workers=1, dashboard_address="127.0.0.1:0", gpus=False)
    try:
        url = client.dashboard_link.rsplit("/", 1)[0] + PAGE
        with Chromium(executable=chromium) as browser:
            browser.navigate(url)  # before the run: the page waits for a job
            empty = browser.wait_for(_PAGE_STATE, ok=lambda v: v is not None, timeout=30)
            assert empty is not None, "the page's Bokeh document never loaded"
            assert "No gerelion job" in empty["status"] and empty["resolution"] == []
            res = run_job(cfg, runner=DaskRunner(client, device="cpu"))
            want_res = [r.resolution_angst for r in res.iterations]
            # the page polls the scheduler once a second: it must come to show exactly this run's numbers
            state = browser.wait_for(_PAGE_STATE, ok=lambda v: v["resolution"] == pytest.approx(want_res) and
                                     v["fsc"] == pytest.approx(res.iterations[-1].fsc, abs=1e-9), timeout=20)
            shot = browser.screenshot(tmp_path / "gerelion_page.png")
            if os.environ.get("GERELION_DASHBOARD_SCREENSHOT"):
                Path(os.environ["GERELION_DASHBOARD_SCREENSHOT"]).write_bytes(shot)
    finally:
        close_client(client, cluster)
    assert state["iterations"] == [r.iteration for r in res.iterations], state
    assert state["resolution"] == pytest.approx(want_res), state
    last = res.iterations[-1]
    assert state["fsc"] == pytest.approx(last.fsc, abs=1e-9)
    assert state["freq"] == pytest.approx([i / (BOX * APIX) for i in range(len(last.fsc))])
    assert f"iteration {last.iteration}</b>" in state["status"] and "stage done" in state["status"], state["status"]
    assert str(tmp_path / "run") in state["status"]
    # both plots were drawn: at least two canvases with a few hundred non-background pixels (axes, lines, labels)
    drawn = sorted(state["drawn"], reverse=True)
    assert state["canvases"] >= 2 and drawn[1] > 300, state["drawn"]
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000
