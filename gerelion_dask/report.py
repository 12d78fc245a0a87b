"""``gerelion report <o>``: one self-contained HTML page of a run (``<root>_report.html``).

It reads only the run's files: ``<root>_progress.jsonl`` (one line per iteration), ``<root>_job.json`` (command
line, box, pixel size) and the final files, redraws the plots of the last iteration (:mod:`.plots`) and a
resolution history, and embeds them as PNG data URIs so the page can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

__all__ = ["write_report", "find_root", "report_main"]


def find_root(o) -> Path:
    """The output root of a run from ``<root>``, ``<root>_progress.jsonl`` or the run's folder (one run in it)."""
    from .errors import InputError

    p = Path(o)
    if p.name.endswith("_progress.jsonl"):
        return p.with_name(p.name[: -len("_progress.jsonl")])
    if Path(f"{p}_progress.jsonl").is_file():
        return p
    if p.is_dir():
        runs = sorted(p.glob("*_progress.jsonl"))
        if len(runs) == 1:
            return runs[0].with_name(runs[0].name[: -len("_progress.jsonl")])
        if len(runs) > 1:
            raise InputError(p, f"holds {len(runs)} runs ({', '.join(r.name for r in runs)})",
                             "name one by its output root, e.g. Refine3D/job001/run")
    raise InputError(p, "no run found (no <root>_progress.jsonl)", "give the --o of a refine or classify run")


def _img(path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}">'


def _fmt(v, f="{:.2f}"):
    try:
        return f.format(v)
    except (TypeError, ValueError):
        return html.escape(str(v))


def write_report(o) -> Path:
    """Write ``<root>_report.html`` for the run at ``o`` and return its path."""
    from .errors import InputError
    from .io.mrc import read_map
    from .plots import plot_angdist, plot_class_fractions, plot_fsc, plot_resolution, read_progress

    root = find_root(o)
    hist = read_progress(root)
    if not hist:
        raise InputError(f"{root}_progress.jsonl", "holds no complete iteration", "wait for iteration 1 to end")
    info_p = Path(f"{root}_job.json")
    info = json.loads(info_p.read_text()) if info_p.is_file() else {}
    cfg = info.get("config", {})
    last = hist[-1]
    it = last["iteration"]
    final_map = Path(f"{root}_class001.mrc")
    box, apix = info.get("box"), info.get("pixel_size")
    if (box is None or apix is None) and final_map.is_file():
        v, apix = read_map(final_map)
        box = v.shape[-1]
    plots = []
    stem = f"{root}_report"
    p = plot_resolution(f"{stem}_resolution.png", hist)
    plots.append(("Resolution history", p))
    if box:
        p = plot_fsc(f"{stem}_fsc.png", hist, int(box), float(apix))
        if p:
            plots.append(("FSC", p))
    plots.append(("Class fractions", plot_class_fractions(f"{stem}_class_fractions.png", hist)))
    data_star = Path(f"{root}_data.star") if Path(f"{root}_data.star").is_file() else Path(f"{root}_it{it:03d}_data.star")
    if data_star.is_file():
        from .io.star import read_particles

        _, parts, _ = read_particles(data_star)
        import numpy as np

        ang = np.stack([parts["rlnAngleRot"].to_numpy(float), parts["rlnAngleTilt"].to_numpy(float)], 1)
        plots.append(("Angular distribution", plot_angdist(f"{stem}_angdist.png", ang,
                                                           f"Angular distribution ({data_star.name})")))
    kind = "3D auto-refine" if cfg.get("auto_refine", True) and len(last["class_fractions"]) == 1 else \
        "3D classification"
    rows = []
    for h in hist:
        mem = h.get("memory", {})
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
            h["iteration"], _fmt(h["resolution_angst"]), h.get("current_size", ""), h.get("healpix_order", ""),
            _fmt(h.get("changes_orientations_deg")), _fmt(h.get("changes_offsets_angst")),
            _fmt(h.get("changes_classes"), "{:.3f}"), " / ".join(f"{x:.2f}" for x in h["class_fractions"]),
            _fmt(h.get("ave_pmax"), "{:.3f}"),
            " ".join(f"{k} {v:.1f}" for k, v in h.get("seconds", {}).items()),
            _fmt(mem.get("worker_peak_rss_mib", mem.get("peak_rss_mib")), "{:.0f}"))) + "</tr>")
    folder = root.parent
    finals = sorted(f for f in folder.glob(root.name + "_*") if "_it" not in f.name[len(root.name):]
                    and not f.name.startswith(f"{root.name}_report") and f.is_file())
    finals += sorted(folder.glob(f"{root.name}_it{it:03d}_*"))
    files = "".join(f"<tr><td>{html.escape(f.name)}</td><td>{f.stat().st_size / 1024:.1f} KiB</td></tr>"
                    for f in finals)
    cmd = html.escape(info.get("command", "(no <root>_job.json: command line unknown)"))
    figs = "".join(f"<figure><figcaption>{html.escape(t)}</figcaption>{_img(p)}</figure>" for t, p in plots if p)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gerelion report: {html.escape(str(root))}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1300px; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 1.4em; border-bottom: 1px solid #ccc; }}
table {{ border-collapse: collapse; font-size: 0.85em; }} td, th {{ border: 1px solid #ddd; padding: 2px 7px; }}
th {{ background: #f0f0f0; }} .big {{ font-size: 1.3em; font-weight: bold; }}
figure {{ display: inline-block; margin: 0.4em; }} figcaption {{ font-weight: bold; font-size: 0.9em; }}
img {{ width: 420px; border: 1px solid #eee; }} code {{ background: #f6f6f6; padding: 3px; display: block;
white-space: pre-wrap; word-break: break-all; }}
</style></head><body>
<h1>{kind}: {html.escape(str(root))}</h1>
<p><span class="big">{last['resolution_angst']:.2f} Å</span> after {len(hist)} iterations
({info.get('n_particles', '?')} particles, box {box} px, {_fmt(apix, '{:.3g}')} Å/px, started {info.get('started', '?')})</p>
<h2>Command line</h2><code>{cmd}</code>
<h2>Iterations</h2>
<table><tr><th>it</th><th>resolution (Å)</th><th>size</th><th>HEALPix</th><th>Δ orient. (°)</th>
<th>Δ offsets (Å)</th><th>Δ classes</th><th>class fractions</th><th>Pmax</th><th>seconds</th><th>peak RSS (MiB)</th></tr>
{''.join(rows)}</table>
<h2>Plots</h2>{figs}
<h2>Files</h2><table><tr><th>file</th><th>size</th></tr>{files}</table>
</body></html>
"""
    out = Path(f"{root}_report.html")
    out.write_text(page)
    return out


def report_main(argv) -> int:
    from .cliargs import ArgumentParser as _OneLineParser

    p = _OneLineParser(prog="gerelion report", description="write an HTML page of a run: resolution "
                                "history, FSC, class fractions, angular distribution, files, command line")
    p.add_argument("o", help="the run's output root (e.g. Refine3D/job001/run) or its folder")
    ns = p.parse_args(argv)
    print(write_report(ns.o))
    return 0
