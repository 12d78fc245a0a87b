"""A page of ours on the Dask dashboard: ``/gerelion`` (live iteration, resolution history, latest FSC curve).

How the numbers get there: the driver's Dask runner publishes them into the scheduler's metadata store
(``client.set_metadata(["gerelion", job_id, ...], value)``: one small RPC per update, kept by the scheduler, shared
by every client), through :class:`DashboardPublisher`:

* ``info``: output root, job kind, box and pixel size (once);
* ``progress``: iteration, stage (``estep``, ``mstep``, ``done``), pools done / total, time of the update;
* ``history``: one entry per finished iteration (resolution, current size, HEALPix order, changes, class
  fractions, stage times), as in ``<root>_progress.jsonl``;
* ``fsc``: the latest iteration's FSC curve (auto-refine: between the half maps) with its spatial frequencies.

The page is a Bokeh document served by the scheduler's own dashboard server (ECOSYSTEM.md §3.3(c)): it reads the
metadata in the scheduler process once a second, so it works for any client that publishes there.  Bokeh pages have
to be registered before the scheduler starts, in the scheduler's process: :func:`register` is called by the cluster
makers of :mod:`gerelion_dask.distributed.cluster` (LocalCluster, LocalCUDACluster, the ``gerelion cluster`` service)
and :mod:`gerelion_dask.distributed.slurm` (the SLURMCluster's scheduler lives in the driver).  For a scheduler
started elsewhere: ``dask scheduler --preload gerelion_dask.dashboard`` (importing this module registers the page).
The page is also listed as ``/individual-gerelion`` under the dashboard's "More..." menu.  With several jobs on one
scheduler it shows the one that reported last (``?job=<id>`` picks one; ids are listed on the page).
"""

from __future__ import annotations

import html
import logging
import time
import uuid

__all__ = ["register", "DashboardPublisher", "PAGE", "MENU_PAGE"]

log = logging.getLogger(__name__)

PAGE = "/gerelion"
MENU_PAGE = "/individual-gerelion"  # the "More..." menu lists /individual-* pages
_META = "gerelion"


# ----------------------------------------------------------------------------------------------- publishing


class DashboardPublisher:
    """Publishes one job's progress into the scheduler's metadata (never fails the run: errors are logged)."""

    def __init__(self, client, job_id: str | None = None, min_interval_s: float = 0.5):
        self.client = client
        self.job_id = job_id or uuid.uuid4().hex[:12]
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._history: list = []
        self._freq: list = []

    def _set(self, key: str, value) -> None:
        try:
            self.client.set_metadata([_META, self.job_id, key], value)
        except Exception as e:  # the page is a convenience: never stop a refinement for it
            log.debug("dashboard metadata %s not published: %s", key, e)

    def start(self, root: str, kind: str, box: int, pixel_size: float, history=()) -> None:
        nsh = box // 2 + 1
        self._freq = [i / (box * pixel_size) for i in range(nsh)]
        self._set("info", {"root": str(root), "kind": kind, "box": int(box), "pixel_size": float(pixel_size),
                           "started": time.time()})
        self._history = [record_summary(r) for r in history]
        self._set("history", self._history)
        if history and getattr(history[-1], "fsc", None):
            self._set("fsc", {"iteration": int(history[-1].iteration), "freq": self._freq,
                              "fsc": [float(x) for x in history[-1].fsc]})

    def progress(self, iteration: int, stage: str, done: int = 0, total: int = 0, force: bool = True) -> None:
        now = time.time()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        self._set("progress", {"iteration": int(iteration), "stage": stage, "pools_done": int(done),
                               "pools_total": int(total), "updated": now})

    def iteration_done(self, rec, last: bool = False) -> None:
        self._history.append(record_summary(rec))
        self._set("history", self._history)
        if rec.fsc:
            self._set("fsc", {"iteration": int(rec.iteration), "freq": self._freq[: len(rec.fsc)],
                              "fsc": [float(x) for x in rec.fsc]})
        self.progress(rec.iteration, "done" if last else "iteration done")


def record_summary(rec) -> dict:
    """The JSON-friendly part of a :class:`~gerelion_dask.driver.IterationRecord` the page shows."""
    return {"iteration": int(rec.iteration), "resolution_angst": float(rec.resolution_angst),
            "current_size": int(rec.current_size), "healpix_order": int(rec.healpix_order),
            "changes_orientations_deg": float(rec.changes_orient), "changes_offsets_angst": float(rec.changes_offset),
            "changes_classes": float(rec.changes_class), "class_fractions": [float(x) for x in rec.class_fractions],
            "seconds": {k: float(v) for k, v in (rec.seconds or {}).items()}}


def jobs(scheduler) -> dict:
    """``{job_id: {"info", "progress", "history", "fsc"}}`` as published to ``scheduler`` (a Scheduler object)."""
    return scheduler.get_metadata([_META], default={}) or {}


# --------------------------------------------------------------------------------------------------- the page


def _pick(all_jobs: dict, wanted: str | None):
    if wanted and wanted in all_jobs:
        return wanted, all_jobs[wanted]
    if not all_jobs:
        return None, None
    return max(all_jobs.items(), key=lambda kv: (kv[1].get("progress") or {}).get("updated", 0.0))


def _status_html(job_id, job, all_jobs) -> str:
    if job is None:
        return "<h2>gerelion</h2><p>No gerelion job has reported to this scheduler yet.</p>"
    info, prog, hist = job.get("info") or {}, job.get("progress") or {}, job.get("history") or []
    res = f"{hist[-1]['resolution_angst']:.2f} Å" if hist else "–"
    pools = f"{prog.get('pools_done', 0)}/{prog.get('pools_total', 0)} pools" if prog.get("pools_total") else ""
    others = ", ".join(html.escape(j) for j in all_jobs if j != job_id)
    return (f"<h2 style='margin:4px 0'>gerelion {html.escape(str(info.get('kind', '')))}: "
            f"{html.escape(str(info.get('root', '')))}</h2>"
            f"<p style='font-size:16px;margin:4px 0'><b>iteration {prog.get('iteration', '–')}</b> · "
            f"stage {html.escape(str(prog.get('stage', '–')))} {pools} · latest resolution <b>{res}</b> · "
            f"box {info.get('box', '–')} px, {info.get('pixel_size', 0):.3g} Å/px · job {html.escape(job_id)}"
            + (f" · other jobs: {others}" if others else "") + "</p>")


def gerelion_doc(scheduler, extra, doc):
    """The Bokeh document of :data:`PAGE` (distributed calls it with the Scheduler and the template variables)."""
    from bokeh.layouts import column, row
    from bokeh.models import BasicTicker, ColumnDataSource, Div, HoverTool, Span
    from bokeh.plotting import figure

    wanted = None
    try:
        args = doc.session_context.request.arguments if doc.session_context else {}
        wanted = args.get("job", [b""])[0].decode() or None
    except Exception:
        pass
    status = Div(text=_status_html(None, None, {}), name="gerelion-status", sizing_mode="stretch_width")
    res_src = ColumnDataSource({"iteration": [], "resolution": []}, name="gerelion-resolution-data")
    fsc_src = ColumnDataSource({"freq": [], "fsc": []}, name="gerelion-fsc-data")
    common = {"height": 380, "sizing_mode": "stretch_width", "tools": "pan,wheel_zoom,box_zoom,reset,save"}
    f_res = figure(title="Resolution per iteration (FSC 0.143, gold standard)", x_axis_label="iteration",
                   y_axis_label="resolution (Å)", name="gerelion-resolution", **common)
    f_res.xaxis.ticker = BasicTicker(min_interval=1)  # whole iterations
    f_res.line("iteration", "resolution", source=res_src, line_width=2)
    f_res.scatter("iteration", "resolution", source=res_src, size=8)
    f_res.add_tools(HoverTool(tooltips=[("iteration", "@iteration"), ("resolution", "@resolution{0.00} Å")]))
    f_fsc = figure(title="FSC of the latest iteration", x_axis_label="spatial frequency (1/Å)",
                   y_axis_label="FSC", y_range=(-0.1, 1.05), name="gerelion-fsc", **common)
    f_fsc.line("freq", "fsc", source=fsc_src, line_width=2)
    for level in (0.5, 0.143):
        f_fsc.add_layout(Span(location=level, dimension="width", line_dash="dashed", line_color="gray"))
    f_fsc.add_tools(HoverTool(tooltips=[("1/Å", "@freq{0.000}"), ("FSC", "@fsc{0.000}")]))
    seen = {"job": None, "n": -1, "fsc_it": None}

    def update():
        all_jobs = jobs(scheduler)
        job_id, job = _pick(all_jobs, wanted)
        status.text = _status_html(job_id, job, all_jobs)
        if job is None:
            return
        hist = job.get("history") or []
        if job_id != seen["job"] or len(hist) != seen["n"]:
            res_src.data = {"iteration": [h["iteration"] for h in hist],
                            "resolution": [h["resolution_angst"] for h in hist]}
            seen["n"] = len(hist)
        fsc = job.get("fsc") or {}
        if job_id != seen["job"] or fsc.get("iteration") != seen["fsc_it"]:
            fsc_src.data = {"freq": list(fsc.get("freq", [])), "fsc": list(fsc.get("fsc", []))}
            f_fsc.title.text = f"FSC of iteration {fsc.get('iteration', '–')}"
            seen["fsc_it"] = fsc.get("iteration")
        seen["job"] = job_id

    update()
    doc.add_periodic_callback(update, 1000)
    doc.add_root(column(status, row(f_res, f_fsc, sizing_mode="stretch_width"), sizing_mode="stretch_width"))
    doc.title = "gerelion: iteration, resolution, FSC"
    try:  # the dashboard's navigation bar, as distributed's own pages
        from distributed.dashboard.components.scheduler import BOKEH_THEME, env

        doc.template = env.get_template("simple.html")
        doc.template_variables.update(extra)
        doc.theme = BOKEH_THEME
    except Exception:
        pass


def register() -> None:
    """Add the page to distributed's dashboard applications (call before the scheduler starts; idempotent)."""
    from distributed.dashboard.scheduler import applications

    applications.setdefault(PAGE, gerelion_doc)
    applications.setdefault(MENU_PAGE, gerelion_doc)


try:  # importing the module registers the page (``dask scheduler --preload gerelion_dask.dashboard``)
    register()
except ImportError:  # no bokeh: the dashboard itself is off
    pass
