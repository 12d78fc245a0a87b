"""Per-line times of the coarse and fine passes of one synthetic pool (issue 5: where the GPU time goes).

Every line of the traced functions ends with a device synchronisation, so a line's time includes the kernels it
launched (and the functions it called); the top lines are printed per pass.  Tracing adds a few microseconds per
line: compare lines, not totals.  Runs on CuPy when a GPU is present, else NumPy.

  python benchmarks/line_profile.py --box 128 --n 1024 --coarse 64 --current 96 --noise 3 [--top 25]
  python benchmarks/line_profile.py --box 128 --apix 2 --n 1000 --coarse 22 --current 42 --maxsig 40 \\
      --offset-range 3 --offset-step 1 --noise 15      (a pool of a 128-px refinement's second iteration)
  python benchmarks/line_profile.py --from-run 4000 --iters 3 --pool 1000 --box 128 --apix 2 --maxsig 40
      (the last pool of a real refinement: dask_scaling.py's simulated data, run in process for --iters
      iterations; its coarse and fine passes are then timed on that pool's own inputs)
  python benchmarks/line_profile.py --box 128 --apix 2 --n 1000 --order 5 --coarse 64 --current 96 --local-sigma 1.25
      (a local search at HEALPix order 5 around the true angles; prints the host time of its priors too)
  python benchmarks/line_profile.py --from-run 4000 ... --save pool.pkl, then --load pool.pkl --no-trace
      (A/B: time two trees on one recorded pool, alternating processes; run-to-run drift on the GPU machine is
      ~25 %, larger than many changes)
  ... --host-time: the untraced runs also print the host's share (issue 5: "no stage spends more time in Python
      than on the GPU"): with CUDA's blocking synchronisation (a waiting thread sleeps instead of spinning), the
      thread's CPU time during a pass is its host time H (Python, launches, host arrays); the GPU was busy at least
      for the rest of the wall time W - H, since the thread only ever waits for the GPU. H <= W - H meets the target.
"""

from __future__ import annotations

import argparse
import linecache
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gerelion_dask.backend import gpu_count  # noqa: E402
from gerelion_dask.expectation.estep import coarse_pass, orientation_priors  # noqa: E402
from gerelion_dask.expectation.fine import ProjectionCache, _group_particles, fine_limits, fine_pass  # noqa: E402
from gerelion_dask.expectation.preprocess import preprocess_pool  # noqa: E402
from stages import synthetic_estep  # noqa: E402  (benchmarks/stages.py: the same synthetic pool)

def traced(sync, fn, names, *args, top=25, host=False):
    """Run ``fn(*args)`` with per-line synchronised timing of the functions called ``names``; print the top lines.
    With ``host`` (CUDA's blocking synchronisation, ``--host-time``) each line's thread CPU time too, and the lines
    are ranked by it: the line's host work, its wait for the GPU excluded."""
    acc, cpu, hits, last = defaultdict(float), defaultdict(float), defaultdict(int), {}

    def local(frame, event, arg):
        if event in ("line", "return"):
            sync()
            now, now_h = time.perf_counter(), time.thread_time()
            key = id(frame)
            if key in last:
                where = (frame.f_code.co_filename, frame.f_code.co_name, last[key][0])
                acc[where] += now - last[key][1]
                cpu[where] += now_h - last[key][2]
                hits[where] += 1
            last[key] = (frame.f_lineno, time.perf_counter(), time.thread_time())
        return local

    def on_call(frame, event, arg):
        if event == "call" and frame.f_code.co_name in names:
            last.pop(id(frame), None)  # a new frame may reuse a finished one's id
            return local
        return None

    sys.settrace(on_call)
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    finally:
        sys.settrace(None)
    sync()
    print(f"{fn.__name__}: {1e3 * (time.perf_counter() - t0):.1f} ms traced" + (" (wall, host ms per line)" if host
                                                                                  else ""))
    for (f, name, ln), t in sorted(acc.items(), key=lambda x: -(cpu if host else acc)[x[0]])[:top]:
        code = linecache.getline(f, ln).strip()[:90]
        h = f" {1e3 * cpu[(f, name, ln)]:7.2f}" if host else ""
        print(f"  {1e3 * t:8.2f}{h} ms {hits[(f, name, ln)]:5d}x {name}:{ln}  {code}")
    return out


def gpu_busy(sync, fn, *args) -> tuple[float, int]:
    """The GPU's busy time during one run of ``fn(*args)``: the union of the intervals of every kernel, copy and
    memset the device ran (CUPTI's activity records, read through ``torch.profiler``, which sees CuPy's kernels as
    well: the records are the device's, not the launching library's), in seconds, and the number of records."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        sync()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events
                   if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    busy, end = 0.0, -np.inf
    for s, e in spans:  # microseconds; overlapping records (concurrent streams) counted once
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy * 1e-6, len(spans)


def group_stats(sig, st, xp):
    """The fine pass's groups of particles (``fine._group_particles``, as ``fine_pass`` forms them) and the children
    it evaluates (32 per significant sample)."""
    limits = fine_limits(xp)
    max_elems = st.fine_max_elems or limits["max_elems"]
    groups = _group_particles(np.argsort(sig.best, kind="stable"), sig.n_sig, max_elems)
    print(f"fine groups (budget {max_elems:.3g} values): {len(groups)}, members {[len(g) for g in groups][:8]}; "
          f"significant samples {len(sig.b)}, children evaluated {32 * len(sig.b)}")


def pool_of_run(a):
    """The inputs of the coarse and fine passes of the last pool of a synthetic refinement (``dask_scaling.py``'s
    data and flags: ``--from-run`` particles, ``--box``, ``--apix``, ``--pool``, ``--iters``, ``--order``,
    ``--maxsig``), run in process: ``((xp, pre, parts, model, st, pri, cache), (..., sig, cache))``."""
    import tempfile

    from dask_scaling import job_config, simulate  # benchmarks/dask_scaling.py: the same data and flags

    from gerelion_dask.driver import InProcessRunner, run_job
    from gerelion_dask.expectation import estep

    seen = {}
    real = {"coarse_pass": estep.coarse_pass, "fine_pass": estep.fine_pass}

    def recorder(name):
        def call(*args):
            seen[name] = args
            return real[name](*args)
        return call

    estep.coarse_pass, estep.fine_pass = recorder("coarse_pass"), recorder("fine_pass")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = simulate(Path(tmp), a.from_run, a.box, a.apix)
            ns = argparse.Namespace(healpix_order=a.order, iters=a.iters, pool=a.pool, maxsig=a.maxsig)
            res = run_job(job_config(paths, Path(tmp), ns), runner=InProcessRunner("auto"))
    finally:
        estep.coarse_pass, estep.fine_pass = real["coarse_pass"], real["fine_pass"]
    last = res.iterations[-1]
    print(f"refinement of {a.from_run} particles: {len(res.iterations)} iterations, the last at size "
          f"{last.current_size}, its E-step {last.seconds['estep']:.2f} s in process")
    return seen["coarse_pass"], seen["fine_pass"]


def blocking_sync(device: int = 0) -> None:
    """CUDA's blocking synchronisation for the primary context of ``device`` (a waiting thread sleeps instead of
    spinning, so its CPU time is host work only). CuPy has no cudaSetDeviceFlags: the driver API's
    ``cuDevicePrimaryCtxSetFlags`` (``CU_CTX_SCHED_BLOCKING_SYNC`` = 4) through ctypes, before the context exists."""
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    dev = ctypes.c_int()
    for call, args in (("cuInit", (0,)), ("cuDeviceGet", (ctypes.byref(dev), device)),
                       ("cuDevicePrimaryCtxSetFlags", (dev, 4))):
        err = getattr(cuda, call)(*args)
        if err != 0:
            raise RuntimeError(f"{call} failed with CUDA error {err}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--coarse", type=int, default=64)
    ap.add_argument("--current", type=int, default=96)
    ap.add_argument("--noise", type=float, default=3.0)
    ap.add_argument("--apix", type=float, default=1.5)
    ap.add_argument("--maxsig", type=int, default=-1)
    ap.add_argument("--offset-range", type=float, default=5.0, help="pixels")
    ap.add_argument("--offset-step", type=float, default=2.0, help="pixels")
    ap.add_argument("--local-sigma", type=float, default=0.0, metavar="DEG",
                    help="a local search: Gaussian priors of this width around the true angles (synthetic pools)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--fine-max-elems", type=int, default=0, help="E-step chunk budget (0: backend's)")
    ap.add_argument("--repeat", type=int, default=2, help="untraced runs of each pass (best time printed)")
    ap.add_argument("--sweep", nargs="*", default=[], metavar="MAX_ELEMS",
                    help="also time the fine pass untraced with these group budgets, e.g. 1e6 1e7")
    ap.add_argument("--no-trace", action="store_true", help="untraced times only")
    ap.add_argument("--host-time", action="store_true",
                    help="CUDA's blocking synchronisation; print each untraced pass's thread CPU time (see above)")
    ap.add_argument("--gpu-busy", action="store_true",
                    help="one more run of each pass under CUPTI (torch.profiler): the GPU's busy time, to set beside "
                         "the host time of --host-time")
    ap.add_argument("--from-run", type=int, default=0, metavar="N",
                    help="profile the last pool of a synthetic refinement of N particles instead (see above)")
    ap.add_argument("--iters", type=int, default=3, help="with --from-run: iterations of the refinement")
    ap.add_argument("--pool", type=int, default=1000, help="with --from-run: particles per pool")
    ap.add_argument("--save", default="", metavar="FILE", help="with --from-run: pickle the pool's inputs to FILE")
    ap.add_argument("--load", default="", metavar="FILE",
                    help="time the passes on a pool saved by --save (A/B of two trees on one pool, one process each)")
    a = ap.parse_args()
    xp = np
    if gpu_count():
        import cupy

        xp = cupy
        if a.host_time:  # before the first CUDA call of the process creates its context
            blocking_sync()
    sync = xp.cuda.runtime.deviceSynchronize if xp is not np else (lambda: None)
    if a.load:
        import pickle

        with open(a.load, "rb") as fh:
            pre, parts, model, st, pri, sig = pickle.load(fh)
        st = replace(st, fine_max_elems=a.fine_max_elems)
        cache = ProjectionCache(fine_limits(xp)["cache_bytes"])
        coarse_pass(xp, pre, parts, model, st, pri, cache)  # warm-up: compilation, plans, the projection cache
        fine_pass(xp, pre, parts, model, st, sig, cache)
        what = f"the pool of {a.load} ({len(parts.index)} particles, size {st.preprocess.current_size})"
    elif a.from_run:
        (xp, pre, parts, model, st, pri, cache), (_, _, _, _, _, sig, _) = pool_of_run(a)
        if a.save:
            import pickle

            with open(a.save, "wb") as fh:
                pickle.dump((pre, parts, model, st, pri, sig), fh)
        st = replace(st, fine_max_elems=a.fine_max_elems)
        fine_pass(xp, pre, parts, model, st, sig, cache)  # warm-up: the projection cache (the run freed it)
        what = f"the last pool of a refinement ({len(parts.index)} particles, size {st.preprocess.current_size})"
    else:
        images, parts, model, st = synthetic_estep(xp, a.n, a.box, a.apix, a.noise, a.order, a.coarse, a.current)
        grid = replace(st.grid, offset_range_px=a.offset_range, offset_step_px=a.offset_step)
        st = replace(st, grid=grid, maxsig=a.maxsig, fine_max_elems=a.fine_max_elems)
        if a.local_sigma > 0:
            st = replace(st, local_sigma_rot=a.local_sigma, local_sigma_psi=a.local_sigma,
                         symmetry_operators=np.eye(3)[None])
        cache = ProjectionCache(1 << 33)
        pre = preprocess_pool(images, parts, st.preprocess, model.sigma2_noise)
        for rep in range(3):  # (the GPU's first call compiles its kernels); the result is on the host: wall time
            t0 = time.perf_counter()
            pri = orientation_priors(parts, model, st, xp)
            print(f"orientation_priors ({'host' if xp is np else 'GPU search'}): "
                  f"{1e3 * (time.perf_counter() - t0):.1f} ms")
        sig = coarse_pass(xp, pre, parts, model, st, pri, cache)  # warm-up: compilation, plans, the projection cache
        fine_pass(xp, pre, parts, model, st, sig, cache)
        what = f"box {a.box}, {a.n} particles, noise {a.noise}"
    print(f"{'numpy' if xp is np else 'cupy'}; {what}: median {np.median(sig.n_sig):.0f} significant samples "
          f"(mean {np.mean(sig.n_sig):.1f})")
    group_stats(sig, st, xp)
    for name, fn, args in (("coarse_pass", coarse_pass, (xp, pre, parts, model, st, pri, cache)),
                           ("fine_pass", fine_pass, (xp, pre, parts, model, st, sig, cache))):
        times, host = [], []
        for _ in range(a.repeat):
            sync()
            t0, h0 = time.perf_counter(), time.thread_time()
            fn(*args)
            sync()
            times.append(time.perf_counter() - t0)
            host.append(time.thread_time() - h0)
        print(f"{name}: {1e3 * min(times):.1f} ms untraced (best of {a.repeat}; median {1e3 * np.median(times):.1f})")
        if a.host_time:
            i = int(np.argmin(times))
            w, h = times[i], host[i]
            print(f"  {name} host time (thread CPU) {1e3 * h:.1f} ms of {1e3 * w:.1f} ms wall ({100 * h / w:.0f} %); "
                  f"GPU busy >= {1e3 * max(0.0, w - h):.1f} ms: {'host <= GPU' if h <= w - h else 'HOST-BOUND'}")
        if a.gpu_busy and xp is not np:
            g, n_rec = gpu_busy(sync, fn, *args)
            line = f"  {name} GPU busy (CUPTI, one run): {1e3 * g:.1f} ms in {n_rec} kernels/copies"
            if a.host_time:
                line += f"; host {1e3 * min(host):.1f} ms: {'host <= GPU' if min(host) <= g else 'HOST-BOUND'}"
            print(line)
    for item in a.sweep:
        e = float(item)
        st_s = replace(st, fine_max_elems=int(e))
        group_stats(sig, st_s, xp)
        best = np.inf
        for _ in range(a.repeat):
            sync()
            t0 = time.perf_counter()
            fine_pass(xp, pre, parts, model, st_s, sig, cache)
            sync()
            best = min(best, time.perf_counter() - t0)
        print(f"  fine_pass with max_elems {e:g}: {1e3 * best:.1f} ms untraced (best of {a.repeat})")
    if a.no_trace:
        return
    traced(sync, coarse_pass, {"coarse_pass", "cross_term", "coarse_select", "coarse_select_dense", "significant_set"},
           xp, pre, parts, model, st, pri, cache, top=a.top, host=a.host_time)
    traced(sync, fine_pass, {"fine_pass", "children_diff2", "posterior_weights", "significant_set", "_children_diff2",
                             "_child_posteriors", "pair_sums", "_flat_group", "_flat_sums", "block_sums", "block_diff2",
                             "significance_threshold"},
           xp, pre, parts, model, st, sig, cache, top=a.top, host=a.host_time)


if __name__ == "__main__":
    main()
