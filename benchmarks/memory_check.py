"""Live GPU memory of each E-step task against ``gerelion plan`` (issue 5: peak within 15 % of the prediction).

Runs the synthetic auto-refine of ``dask_scaling.py`` in process on the GPU.  A CuPy memory hook counts the bytes
that are live (allocated from CuPy's pool and not yet freed; not what the pool keeps cached) and their peak during
each pool's E-step.  For every pool it also records the significant fraction the plan's model asks for (distinct
significant coarse orientations / all of them) and its current size, and prints, per iteration, the largest
measured peak next to the plan for that size and the largest fraction of the iteration.

  python benchmarks/memory_check.py --n 20000 --box 128 --apix 2 --pool 1000 --iters 3 --healpix-order 2 --maxsig 40

``--lines N`` also traces the lines of the E-step's functions at the current size ``--lines-size`` (default: the
box, the last iteration) and prints the ``N`` lines at
which the live bytes were highest (peak during the line, and the live bytes when it started): what the peak is made
of, for the plan's terms.
"""

from __future__ import annotations

import argparse
import linecache
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    import cupy

    import gerelion_dask.expectation.estep as estep
    from dask_scaling import job_config, simulate
    from gerelion_dask.driver import InProcessRunner, run_job
    from gerelion_dask.plan import plan_memory

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--apix", type=float, default=2.0)
    ap.add_argument("--pool", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--healpix-order", type=int, default=2)
    ap.add_argument("--maxsig", type=int, default=40)
    ap.add_argument("--lines", type=int, default=0, help="trace the E-step lines at --lines-size; print the top N")
    ap.add_argument("--lines-size", type=int, default=0, help="current size whose pools --lines traces (default: box)")
    ap.add_argument("--json", default="", help="also write every pool's record (sizes, searches, peaks) to this file")
    ns = ap.parse_args()

    class Live(cupy.cuda.MemoryHook):
        name = "gerelion_live_bytes"

        def __init__(self):
            self.now = self.peak = 0

            self.marks = {}  # traced frame -> [peak during its current line, live when the line started, line]

        def malloc_postprocess(self, **kw):
            self.now += kw["mem_size"]
            self.peak = max(self.peak, self.now)
            for m in self.marks.values():
                m[0] = max(m[0], self.now)

        def free_postprocess(self, **kw):
            self.now -= kw["mem_size"]

    live = Live()
    pools = []  # (current size, significant fraction, peak live bytes during the pool)
    inner_coarse, inner_pool = estep.coarse_pass, estep._expectation_pool

    def coarse(xp, pre, particles, model, settings, pri, cache=None):
        sig = inner_coarse(xp, pre, particles, model, settings, pri, cache)
        K = len(model.refs)
        frac = len(np.unique(sig.c * sig.n_orient + sig.o)) / float(K * sig.n_orient)
        # local searches: a chunk's rows are padded to its particles' most directions and psi angles
        ol = int(np.diff(pri.dir_ptr).max() * np.isfinite(pri.psi_lp).sum(axis=1).max()) if pri.local else 0
        pools.append([settings.preprocess.current_size, frac, 0, 0, 0, bool(pri.local), float(sig.n_sig.mean()),
                      int(sig.n_sig.max()), len(particles.index), ol])
        return sig

    lines = {}  # (file, function, line) -> (highest live bytes during the line, live bytes when it started)
    grew = {}  # (file, function, line) -> the most live bytes one execution of the line added (kept after it)
    traced = {"_expectation_pool", "preprocess_pool", "coarse_pass", "fine_pass", "insert_slices", "_children_diff2",
              "children_diff2",
              "_child_posteriors", "pair_sums", "project_gathered", "rows", "whole", "__init__", "posterior_weights",
              "coarse_select", "coarse_select_dense", "cross_term", "power_term"}

    def local(frame, event, arg):
        if event in ("line", "return"):
            key = id(frame)
            m = live.marks.get(key)
            if m is not None:
                where = (frame.f_code.co_filename, frame.f_code.co_name, m[2])
                old = lines.get(where, (0, 0))
                lines[where] = max(old, (m[0], m[1]))
                grew[where] = max(grew.get(where, 0), live.now - m[1])
            if event == "line":
                live.marks[key] = [live.now, live.now, frame.f_lineno]
            else:
                live.marks.pop(key, None)
        return local

    def on_call(frame, event, arg):
        if frame.f_code.co_name in traced and "gerelion_dask" in frame.f_code.co_filename:
            return local
        return None

    def pool(xp, images, particles, model, settings, cache=None):
        live.peak = start = live.now
        trace = ns.lines and settings.preprocess.current_size == (ns.lines_size or ns.box)
        if trace:
            sys.settrace(on_call)
        try:
            out = inner_pool(xp, images, particles, model, settings, cache)
        finally:
            if trace:
                sys.settrace(None)
                live.marks.clear()
        pools[-1][2:5] = [live.peak, start, cache.nbytes if cache is not None else 0]
        return out

    estep.coarse_pass, estep._expectation_pool = coarse, pool
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        paths = simulate(out, ns.n, ns.box, ns.apix)
        cfg = job_config(paths, out, ns)
        with live:
            run_job(cfg, runner=InProcessRunner("gpu"))
    diameter = ns.box * ns.apix  # job_config leaves --particle_diameter at its default: the box
    print(f"\n{ns.n} particles, box {ns.box}, pool {ns.pool}, HEALPix order {ns.healpix_order}, maxsig {ns.maxsig}; "
          "in process on one GPU\n")
    print("| current size | pools | significant fraction (max; local: orientations, mean significant samples) | "
          "measured live peak GiB (held before a task; largest task; caches) | plan GiB (task; caches) | "
          "plan / measured |")
    print("|---|---|---|---|---|---|")
    g = 2.0**30
    for size in dict.fromkeys(p[0] for p in pools):
        sel = [p for p in pools if p[0] == size]
        f = max(p[1] for p in sel)
        peak = max(p[2] for p in sel)
        local = [p for p in sel if p[5]]  # local searches: the plan's local model at the pools' own counts
        plan = plan_memory(ns.box, ns.n, ns.pool, 1, 2, ns.healpix_order, "C1", 3.0, 1.0, 2.0, ns.apix, diameter,
                           "gpu", 0, significant_fraction=f, current_size=size, maxsig=ns.maxsig,
                           local_significant=max((p[6] for p in local), default=0.0),
                           local_orientations=max((p[9] for p in local), default=0),
                           local_max_significant=max((p[7] for p in local), default=0))
        loc = (f"; local {max(p[9] for p in local)}, {max(p[6] for p in local):.1f}" if local else "")
        print(f"| {size} | {len(sel)} | {f:.4f}{loc} | {peak / g:.2f} ({max(p[3] for p in sel) / g:.2f}; "
              f"{max(p[2] - p[3] for p in sel) / g:.2f}; {max(p[4] for p in sel) / g:.2f}) | "
              f"{plan.gpu_bytes / g:.2f} ({plan.task_bytes / g:.2f}; {plan.parts['projection caches'] / g:.2f}) | "
              f"{plan.gpu_bytes / max(peak, 1):.2f} |")

    if ns.json:
        import json

        keys = ("current_size", "significant_fraction", "peak", "held", "cache", "local", "mean_significant",
                "max_significant", "particles", "local_orientations")
        top = sorted(lines.items(), key=lambda x: -x[1][0])[:max(ns.lines, 0)]
        Path(ns.json).write_text(json.dumps({
            "args": vars(ns), "pools": [dict(zip(keys, p)) for p in pools],
            "lines": [[Path(f).name, name, ln, peak, start] for (f, name, ln), (peak, start) in top]}, indent=1))
    if lines:
        print(f"\nlines of the E-step at {ns.lines_size or ns.box} px with the most live GPU bytes (GiB: peak during the line; live when "
              "it started; the pools at full size, highest of each line)")
        for (f, name, ln), (peak, start) in sorted(lines.items(), key=lambda x: -x[1][0])[:ns.lines]:
            code = linecache.getline(f, ln).strip()[:90]
            print(f"  {peak / g:7.2f} {start / g:7.2f}  {Path(f).name}:{name}:{ln}  {code}")
        print("\nlines that kept the most live GPU bytes after one execution (GiB; same pools)")
        for (f, name, ln), add in sorted(grew.items(), key=lambda x: -x[1])[:ns.lines]:
            code = linecache.getline(f, ln).strip()[:90]
            print(f"  {add / g:7.2f}  {Path(f).name}:{name}:{ln}  {code}")


if __name__ == "__main__":
    main()
