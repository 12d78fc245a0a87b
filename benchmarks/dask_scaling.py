"""Seconds per iteration in process and on LocalClusters of 1, 2, ... workers (NumPy, or one GPU each).

A synthetic gold-standard refinement (phantom map, CTF, random halves) is run to ``--iters`` iterations with the same
seed by each runner.  Per runner and iteration: the E-step (tasks + reduction + gather: everything between handing the
pools to the runner and getting the sums back), the M-step (one task on a worker) and the whole iteration; the bytes
that workers fetched from each other for the iteration's E-step outputs and reduction (``estep-``/``reduce-`` keys,
from the workers' transfer logs) and for everything (the model and settings too); the speed-up and efficiency
(speed-up / workers) against 1 worker; and how the final maps compare with the base run's (bit-identical on NumPy;
CuPy's atomic back-projection is not, so the largest relative difference and the FSC are given).  ``--gpu``: CuPy in
process against a LocalCUDACluster (one worker per GPU); the in-process run is then the base for the Dask overhead.

``--phases``: where an E-step task's time goes, per iteration (summed over tasks and workers): reading the images
(in the background thread of io/readahead.py, overlapping the device's work), waiting for them, preprocessing,
priors, coarse pass, fine pass, and the whole task (the rest is moving images to the device, the model's device copy
and the Dask task's own overhead); the device stages are timed between device synchronisations.

Usage: ``python benchmarks/dask_scaling.py [--n 240] [--box 32] [--pool 15] [--iters 3] [--workers 1,2] [--gpu]
[--json out.json] [--phases]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def simulate(out: Path, n: int, box: int, apix: float, seed: int = 3):
    from gerelion_dask.simulate import SimulationSpec, phantom_map, simulate_dataset

    spec = SimulationSpec(n_particles=n, box=box, apix=apix, snr=0.5, seed=seed, ini_lowpass_angst=30.0, boxpad=1,
                          projector_padding=1)
    return simulate_dataset([phantom_map(box, apix)], spec, out / "data")


def job_config(paths, out: Path, ns):
    from gerelion_dask.config import JobConfig

    return JobConfig(i=str(paths.particles_star), o=str(out / "run"), ref=str(paths.initial_reference),
                     auto_refine=True, split_random_halves=True, healpix_order=ns.healpix_order,
                     auto_iter_max=ns.iters, pool=ns.pool, ini_high=30.0, ctf=True, random_seed=5,
                     offset_range=3.0, offset_step=1.0, maxsig=ns.maxsig, overwrite=True)


PHASES = (("tasks", "read_task_images", "read images"), ("readahead", "take", "wait for images"),
          ("estep", "preprocess_pool", "preprocess"), ("estep", "orientation_priors", "priors"),
          ("estep", "coarse_pass", "coarse pass"), ("estep", "fine_pass", "fine pass"),
          ("tasks", "estep_task", "whole task"))
HOST_ONLY = ("read images", "wait for images")  # timed without device synchronisation (the read runs in a
# background thread while the device computes: a synchronisation there would wait for the other thread's kernels)


def install_phase_timers(task_level: bool = True) -> None:
    """Wrap the E-step's stages in this process (a worker, or the driver for in-process runs) with timers that
    synchronise the device before and after; seconds are summed per stage in ``tasks._phase_seconds``.  Module
    attributes are replaced, so tasks unpickled afterwards (by reference) and ``_expectation_pool``'s global look-ups
    get the timed versions.  ``task_level`` False (the driver): leave the task functions alone, or a Dask run started
    later from this process would submit the driver's timed wrapper, and its sums would stay in the task's copy."""
    import sys

    from gerelion_dask.distributed import tasks
    from gerelion_dask.expectation import estep
    from gerelion_dask.io.readahead import ReadAhead

    if getattr(tasks, "_phase_seconds", None) is not None:
        return
    acc = tasks._phase_seconds = {}

    def sync():
        cp = sys.modules.get("cupy")
        if cp is not None and cp.cuda.runtime.getDeviceCount() > 0:
            cp.cuda.runtime.deviceSynchronize()

    def wrap(mod, name, label):
        inner = getattr(mod, name)
        device = label not in HOST_ONLY

        def timed(*a, **k):
            if device:
                sync()
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                if device:
                    sync()
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t

        setattr(mod, name, timed)

    modules = {"estep": estep, "tasks": tasks, "readahead": ReadAhead}
    for module, name, label in PHASES:
        if module != "tasks" or task_level:
            wrap(modules[module], name, label)


def take_phase_seconds() -> dict:
    """This process's stage seconds since the last call (and reset them)."""
    from gerelion_dask.distributed import tasks

    acc = getattr(tasks, "_phase_seconds", None) or {}
    out = dict(acc)
    acc.clear()
    ahead = tasks._READ_AHEAD
    if ahead is not None:  # a worker's pools read ahead / read when their task started
        out["pools read ahead"], out["pools not read ahead"] = float(ahead.hits), float(ahead.misses)
        ahead.hits = ahead.misses = 0
    return out


class PrintIterations:
    """Progress hook: one line per finished iteration, so a run cut off by a time limit still reports."""

    def __init__(self, label: str, n: int, pools_every: int = 0):
        self.label, self.n, self.pools_every = label, n, pools_every
        self.collect = None  # () -> {stage: seconds} since the last call, when --phases

    def __call__(self, done: int, total: int) -> None:
        """Pools done in the E-step: a timestamped line every ``pools_every`` pools (0: none)."""
        if self.pools_every and (done % self.pools_every == 0 or done == total):
            print(time.strftime("%H:%M:%S"), f"[{self.label}] {done} of {total} pools done", flush=True)

    def iteration_finished(self, rec) -> None:
        s, mem = rec.seconds, rec.memory or {}
        gpu = mem.get("worker_gpu_pool_held_mib", (mem.get("gpu_mib") or {}).get("pool_held"))
        print(f"  [{self.label}] iteration {rec.iteration}: size {rec.current_size}, E-step {s['estep']:.2f} s "
              f"({1000 * s['estep'] / self.n:.2f} ms/particle), M-step {s['mstep']:.2f} s, total {s['total']:.2f} s; "
              f"driver RSS {mem.get('peak_rss_mib', 0):.0f} MiB"
              + (f", worker RSS {mem['worker_peak_rss_mib']:.0f} MiB" if "worker_peak_rss_mib" in mem else "")
              + (f", CuPy pool {gpu:.0f} MiB" if gpu is not None else ""), flush=True)
        if self.collect is not None:
            ph = self.collect()
            print(f"  [{self.label}] iteration {rec.iteration} stages (s, all tasks): "
                  + ", ".join(f"{label} {ph.get(label, 0.0):.2f}" for _, _, label in PHASES if label in ph)
                  + "".join(f", {k} {ph[k]:.0f}" for k in ("pools read ahead", "pools not read ahead") if k in ph),
                  flush=True)


def run(cfg, n_workers: int | None, gpu: bool, progress=None, phases: bool = False, writer=None, resume=None):
    """(JobResult, cluster start seconds); ``n_workers`` None: in process; ``phases``: time the E-step's stages;
    ``writer`` and ``resume`` go to ``run_job``."""
    from gerelion_dask.driver import InProcessRunner, run_job

    device = "auto" if gpu else "cpu"
    if n_workers is None:
        if phases:
            install_phase_timers(task_level=False)
            progress.collect = take_phase_seconds
        return run_job(cfg, runner=InProcessRunner(device), progress=progress, writer=writer, resume=resume), 0.0
    from gerelion_dask.distributed.cluster import close_client, make_client
    from gerelion_dask.distributed.runner import DaskRunner

    t0 = time.perf_counter()
    client, cluster = make_client(n_workers=n_workers, dashboard_address=None, gpus=gpu)
    client.wait_for_workers(n_workers)
    start = time.perf_counter() - t0
    if phases:
        client.run(install_phase_timers)

        def collect():
            out = {}
            for part in client.run(take_phase_seconds).values():
                for k, v in part.items():
                    out[k] = out.get(k, 0.0) + v
            return out

        progress.collect = collect
    try:
        from distributed import get_task_stream

        with get_task_stream(client) as stream:
            res = run_job(cfg, runner=DaskRunner(client, device=device), progress=progress, writer=writer,
                              resume=resume)
        print_task_stream(stream.data, res)
        res.transfers = transfers_by_iteration(client)
        return res, start
    finally:
        close_client(client, cluster)


def profiled(cfg, ns, label: str):
    """The in-process run under cProfile; prints the ``ns.profile`` functions with the most time of their own and the
    most cumulative time (on a GPU, time spent waiting for the device shows where Python synchronises)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        return run(cfg, None, ns.gpu, PrintIterations(label, ns.n))
    finally:
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(ns.profile)
        stats.sort_stats("cumulative").print_stats(ns.profile)


def print_task_stream(data, res) -> None:
    """Per iteration: compute seconds and task count per worker, the longest task, and how busy the workers were."""
    from collections import defaultdict

    busy = defaultdict(lambda: defaultdict(float))
    count = defaultdict(lambda: defaultdict(int))
    longest = defaultdict(float)
    for t in data:
        key = str(t["key"])
        if not key.startswith(("estep-", "reduce-")):
            continue
        it = int(key.split("-")[1])
        sec = sum(s["stop"] - s["start"] for s in t["startstops"] if s["action"] == "compute")
        busy[it][t["worker"]] += sec
        count[it][t["worker"]] += 1
        if key.startswith("estep-"):
            longest[it] = max(longest[it], sec)
    for rec in res.iterations:
        w = busy[rec.iteration]
        wall = rec.seconds["estep"]
        eff = sum(w.values()) / (max(len(w), 1) * wall) if wall else 0.0
        per = ", ".join(f"{v:.2f} s/{count[rec.iteration][k]} tasks" for k, v in sorted(w.items()))
        print(f"  it {rec.iteration}: E-step {wall:.2f} s; workers busy {per}; longest E-step task "
              f"{longest[rec.iteration]:.2f} s; busy fraction {eff:.2f}", flush=True)


def transfers_by_iteration(client) -> dict:
    """``{iteration: (reduction bytes, all bytes)}`` fetched between workers, from each worker's transfer log."""
    from collections import defaultdict

    def log(dask_worker):
        return [dict(t["keys"]) for t in dask_worker.transfer_incoming_log]

    out = defaultdict(lambda: [0, 0])
    for entries in client.run(log).values():
        for keys in entries:
            for key, nbytes in keys.items():
                parts = str(key).split("-")
                if len(parts) < 2 or not parts[1].isdigit():
                    continue
                it = int(parts[1])
                out[it][1] += int(nbytes)
                if parts[0] in ("estep", "reduce"):
                    out[it][0] += int(nbytes)
    return dict(out)


def agreement(a, b) -> str:
    """``yes`` when the final maps and poses are bit-identical, else the largest relative map difference and the
    lowest FSC between the two runs' maps."""
    import numpy as np

    from gerelion_dask.ops.fsc import fsc

    if same(a, b):
        return "yes"
    rel, low = 0.0, 1.0
    for ha, hb in zip(a.model.maps, b.model.maps, strict=True):
        for x, y in zip(ha, hb, strict=True):
            rel = max(rel, float(np.abs(x - y).max() / np.abs(y).max()))
            low = min(low, float(np.min(fsc(x, y)[1:])))
    poses = float(np.mean(np.all(a.state.angles == b.state.angles, axis=1)))
    return f"no: max rel. diff {rel:.1e}, min FSC {low:.6f}, same angles {100 * poses:.1f}%"


def same(a, b) -> bool:
    import numpy as np

    maps = all(np.array_equal(x, y) for ha, hb in zip(a.model.maps, b.model.maps, strict=True)
               for x, y in zip(ha, hb, strict=True))
    return maps and np.array_equal(a.state.angles, b.state.angles)


def label_of(w: int | None, gpu: bool) -> str:
    kind = "GPU " if gpu else "NumPy "
    return ("in process" + (" (GPU)" if gpu else "")) if w is None else f"{w} {kind}worker{'s' if w > 1 else ''}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=240)
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--apix", type=float, default=4.0)
    p.add_argument("--pool", type=int, default=15)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--healpix-order", type=int, default=1)
    p.add_argument("--maxsig", type=int, default=40)
    p.add_argument("--workers", default="1,2", help="cluster sizes to time, comma-separated ('' for none)")
    p.add_argument("--no-in-process", action="store_true", help="skip the in-process run")
    p.add_argument("--gpu", action="store_true", help="CuPy in process vs LocalCUDACluster workers (one per GPU)")
    p.add_argument("--json", help="also write every run's per-iteration seconds and bytes to this file")
    p.add_argument("--phases", action="store_true",
                   help="print per iteration the seconds of the E-step task's stages (read, preprocess, passes)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="run the in-process job under cProfile and print its N most expensive functions")
    ns = p.parse_args()
    sizes = [int(x) for x in ns.workers.split(",") if x.strip()]
    if not sizes and ns.no_in_process:
        p.error("nothing to run: give --workers or drop --no-in-process")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = simulate(tmp, ns.n, ns.box, ns.apix)
        runs = {}
        for w in ([] if ns.no_in_process else [None]) + sizes:
            label = label_of(w, ns.gpu)
            cfg = job_config(paths, tmp / label.replace(" ", "_").replace("(", "").replace(")", ""), ns)
            if w is None and ns.profile:
                res, start = profiled(cfg, ns, label)
            else:
                res, start = run(cfg, w, ns.gpu, PrintIterations(label, ns.n), ns.phases)
            runs[label] = (w, res, start)
            print(f"{label}: E-step per iteration " +
                  ", ".join(f"{r.seconds['estep']:.2f}" for r in res.iterations) + f" s (cluster start {start:.1f} s)",
                  flush=True)
    base_label = label_of(None if (ns.gpu or not sizes) and not ns.no_in_process else sizes[0], ns.gpu)
    base = runs[base_label][1]
    n_it = len(base.iterations)
    print(f"\nE-step seconds per iteration; {ns.n} particles, box {ns.box}, pool {ns.pool}, HEALPix order "
          f"{ns.healpix_order}, maxsig {ns.maxsig}, {len(os.sched_getaffinity(0))} usable cores\n")
    print("| runner | " + " | ".join(f"it {i + 1}" for i in range(n_it)) + " | total | speed-up vs "
          f"{base_label} | bit-identical to {base_label} |")
    print("|---" * (n_it + 4) + "|")
    t_base = sum(r.seconds["estep"] for r in base.iterations)
    for label, (_, res, _) in runs.items():
        t = [r.seconds["estep"] for r in res.iterations]
        print(f"| {label} | " + " | ".join(f"{x:.2f}" for x in t) + f" | {sum(t):.2f} | {t_base / sum(t):.2f}x | "
              f"{'yes' if same(res, base) else 'NO'} |")
    summary(runs, sizes, ns)


def summary(runs: dict, sizes: list, ns) -> None:
    """Mean seconds per iteration (iterations 2 on: iteration 1 includes start-up costs such as compiling), the
    efficiency against 1 worker, bytes moved per iteration, and agreement of the final maps with 1 worker's."""
    import json

    w1 = sizes[0] if sizes else 1
    one = runs.get(label_of(sizes[0], ns.gpu)) if sizes else None

    def mean(res, key):
        recs = res.iterations[1:] or res.iterations
        return sum(r.seconds[key] for r in recs) / len(recs)

    print(f"\nMean seconds per iteration (iterations 2-{ns.iters}); efficiency = speed-up over {w1} worker(s) / "
          f"(workers / {w1}); bytes fetched between workers per iteration\n")
    print(f"| runner | E-step s | M-step s | other s | iteration s | E-step eff. | iteration eff. | reduction MB/it "
          f"| all MB/it | maps vs {label_of(w1, ns.gpu)} |")
    print("|---" * 10 + "|")
    rows = {}
    for label, (w, res, start) in runs.items():
        e, m, tot = mean(res, "estep"), mean(res, "mstep"), mean(res, "total")
        eff_e = eff_t = ""
        if one is not None and w is not None:
            f = w / w1
            eff_e = f"{100 * mean(one[1], 'estep') / (e * f):.0f}%"
            eff_t = f"{100 * mean(one[1], 'total') / (tot * f):.0f}%"
        tr = getattr(res, "transfers", {}) or {}
        its = [r.iteration for r in (res.iterations[1:] or res.iterations)]
        red = sum(tr.get(i, (0, 0))[0] for i in its) / max(len(its), 1) / 1e6
        allb = sum(tr.get(i, (0, 0))[1] for i in its) / max(len(its), 1) / 1e6
        agree = agreement(res, one[1]) if one is not None and res is not one[1] else "(base)"
        print(f"| {label} | {e:.2f} | {m:.2f} | {tot - e - m:.2f} | {tot:.2f} | {eff_e or '-'} | {eff_t or '-'} | "
              f"{red:.1f} | {allb:.1f} | {agree} |")
        rows[label] = {"workers": w, "cluster_start_s": start, "agreement": agree,
                       "iterations": [{"iteration": r.iteration, "current_size": r.current_size,
                                       "seconds": r.seconds, "transfer_bytes": tr.get(r.iteration, (0, 0)),
                                       "memory": r.memory}
                                      for r in res.iterations]}
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump({"args": vars(ns), "runs": rows}, fh, indent=1)

if __name__ == "__main__":
    main()
