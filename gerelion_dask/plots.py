"""PNG plots of a run, written after every iteration beside RELION's files (matplotlib, Agg backend).

Per iteration NNN (``make_writer`` calls :func:`write_iteration_plots`):

* ``<root>_itNNN_fsc.png``: the FSC between the half maps of every iteration so far (the latest in bold), against
  spatial frequency, with the 0.143 and 0.5 thresholds (auto-refine; classification has no half maps);
* ``<root>_itNNN_class_fractions.png``: the fraction of particles in each class over the iterations so far;
* ``<root>_itNNN_angdist.png``: the angular distribution of the particles' best orientations (rot, tilt), a
  Mollweide map of counts.

The history comes from ``<root>_progress.jsonl``, so the plots can be redrawn from a finished run's files
(:func:`gerelion_dask.report.write_report` does).  matplotlib is imported on the first plot, never at package import,
and is switched to the Agg backend without touching the caller's pyplot state.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["write_iteration_plots", "read_progress", "plot_fsc", "plot_class_fractions", "plot_angdist",
           "plot_resolution"]


def _figure(w=6.0, h=4.0, **kw):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(w, h), dpi=100, layout="constrained", **kw)


def read_progress(root) -> list[dict]:
    """The lines of ``<root>_progress.jsonl`` (one dict per iteration; a last partial line is skipped)."""
    p = Path(f"{root}_progress.jsonl")
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_fsc(path, history: list[dict], box: int, pixel_size: float) -> Path | None:
    """FSC curves of the iterations in ``history`` (None where no iteration has one)."""
    rows = [h for h in history if any(abs(v) > 0 for v in h.get("fsc", []))]
    if not rows:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for i, h in enumerate(rows):
        f = np.asarray(h["fsc"], dtype=float)
        k = np.arange(len(f)) / (box * pixel_size)  # 1/Å
        last = i == len(rows) - 1
        ax.plot(k, f, color="C3" if last else "0.6", lw=2.0 if last else 0.8, alpha=1.0 if last else 0.3 + 0.5 * i /
                max(1, len(rows)), label=f"iteration {h['iteration']}: {h['resolution_angst']:.2f} Å" if last else None)
    ax.axhline(0.143, color="k", ls=":", lw=0.8)
    ax.axhline(0.5, color="k", ls="--", lw=0.6)
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlim(0, (box // 2) / (box * pixel_size))
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC between half maps")
    ax.set_title("Gold-standard FSC (earlier iterations grey)")
    sec = ax.secondary_xaxis("top")  # the same frequencies, labelled as resolutions
    ticks = [t for t in ax.get_xticks() if 0 < t <= ax.get_xlim()[1]]
    sec.set_xticks(ticks, labels=[f"{1.0 / t:.1f}" for t in ticks])
    sec.set_xlabel("resolution (Å)")
    ax.legend(loc="lower left")
    fig.savefig(path)
    return Path(path)


def plot_class_fractions(path, history: list[dict]) -> Path | None:
    if not history:
        return None
    its = [h["iteration"] for h in history]
    fr = np.array([h["class_fractions"] for h in history], dtype=float)
    fig = _figure(6.0, 3.5)
    ax = fig.add_subplot()
    if fr.shape[1] > 1:
        ax.stackplot(its, fr.T, labels=[f"class {c + 1}" for c in range(fr.shape[1])], alpha=0.85)
        ax.legend(loc="upper left", fontsize="small", ncol=min(4, fr.shape[1]))
    else:
        ax.plot(its, fr[:, 0], "o-", label="class 1")
    ax.set_ylim(0, 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("fraction of particles")
    ax.set_title("Class fractions")
    ax.set_xticks(its)
    fig.savefig(path)
    return Path(path)


def plot_resolution(path, history: list[dict]) -> Path | None:
    if not history:
        return None
    its = [h["iteration"] for h in history]
    fig = _figure(6.0, 3.5)
    ax = fig.add_subplot()
    ax.plot(its, [h["resolution_angst"] for h in history], "o-", color="C0")
    ax.set_xlabel("iteration")
    ax.set_ylabel("resolution (Å)", color="C0")
    ax.invert_yaxis()
    ax2 = ax.twinx()
    ax2.plot(its, [h.get("changes_orientations_deg", np.nan) for h in history], "s--", color="C1", ms=4)
    ax2.set_ylabel("orientation changes (°)", color="C1")
    ax.set_title("Resolution and orientation changes")
    ax.set_xticks(its)
    fig.savefig(path)
    return Path(path)


def plot_angdist(path, angles_deg: np.ndarray, title: str = "Angular distribution") -> Path:
    """Counts of particle directions (rot, tilt in degrees) on a Mollweide map."""
    rot = (np.asarray(angles_deg[:, 0], float) + 180.0) % 360.0 - 180.0
    lat = 90.0 - np.asarray(angles_deg[:, 1], float)
    h, xe, ye = np.histogram2d(rot, lat, bins=(36, 18), range=((-180, 180), (-90, 90)))
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(projection="mollweide")
    mesh = ax.pcolormesh(np.radians(xe), np.radians(ye), h.T, cmap="viridis", shading="flat")
    ax.set_xticklabels([])
    ax.grid(True, color="w", lw=0.3, alpha=0.5)
    ax.set_title(f"{title} ({len(rot)} particles)")
    fig.colorbar(mesh, ax=ax, shrink=0.7, label="particles")
    fig.savefig(path)
    return Path(path)


def write_iteration_plots(root, iteration: int, angles_deg, box: int, pixel_size: float) -> dict:
    """The three PNGs of iteration ``iteration`` (history from ``<root>_progress.jsonl``) -> {kind: path}."""
    history = [h for h in read_progress(root) if h.get("iteration", 0) <= iteration]
    stem = f"{root}_it{iteration:03d}"
    out = {}
    p = plot_fsc(f"{stem}_fsc.png", history, box, pixel_size)
    if p:
        out["fsc"] = p
    p = plot_class_fractions(f"{stem}_class_fractions.png", history)
    if p:
        out["class_fractions"] = p
    out["angdist"] = plot_angdist(f"{stem}_angdist.png", np.asarray(angles_deg), f"Angular distribution, "
                                  f"iteration {iteration}")
    return out
