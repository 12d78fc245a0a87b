"""A large synthetic auto-refine (issue 5: "no out-of-memory failure at box 256 with 100,000 particles").

Simulating 100,000 box-256 particles one at a time takes ~30 min of one core, so the images are made in parallel
(``--procs`` processes, each its own ``simulate_dataset`` of ``--unique / --procs`` particles with its own seed and
the same phantom) and the particle STAR file lists each simulated image ``--n / --unique`` times (rows differ in
their random half set and in everything the refinement learns; the images repeat).  The run itself is the product's:
``run_job`` with a DaskRunner on one worker per GPU (LocalCUDACluster, or NumPy workers without ``--gpu``), the
store imported into ``particles.zarr`` (``--n`` images: the full size on disk), the memory plan logged at the start,
and per iteration the E-step / M-step seconds, the worker's peak RSS and CuPy pool, and the E-step's stages
(as ``dask_scaling.py --phases``).

  python benchmarks/large_run.py --gpu --n 100000 --unique 25000 --box 256 --apix 1.0 --pool 1000 --iters 2 \\
      --procs 16 --work /tmp/large

With ``--keep``, a later run with the same ``--work`` and the same data options reuses the simulated stacks, the
STAR file and the imported store (the job recognises its own store by the STAR file's size and time), so a run that
a time limit cut can be repeated without its first minutes; it also saves a checkpoint after every iteration
(``checkpoint_itNNN.npz`` in ``--work``) and continues after the latest one written with the same run options
(``--pool``, ``--iters``, ``--healpix-order``, ``--maxsig``), so that the second call goes straight to the iteration
the first one did not finish (at 100,000 x 256 px: the final one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def simulate_part(args):
    """One process's share: dask_scaling's simulation of ``n`` particles with seed ``seed`` into ``out``."""
    out, n, box, apix, seed = args
    from dask_scaling import simulate

    return simulate(Path(out), n, box, apix, seed)


def tiled_star(parts, work: Path, n: int) -> Path:
    """One particle STAR file in ``work`` listing the simulated stacks' images, repeated up to ``n`` rows."""
    import pandas as pd

    from gerelion_dask.io.star import read_particles, write_particles

    tables, optics = [], None
    for p in parts:
        optics, particles, _ = read_particles(p.particles_star)
        rel = p.particles_star.parent.relative_to(work)
        particles = particles.copy()
        particles["rlnImageName"] = [f"{name.split('@')[0]}@{rel}/{name.split('@')[1]}"
                                     for name in particles["rlnImageName"]]
        particles["rlnMicrographName"] = [f"{rel}/{m}" for m in particles["rlnMicrographName"]]
        tables.append(particles)
    one = pd.concat(tables, ignore_index=True)
    reps = -(-n // len(one))
    table = pd.concat([one] * reps, ignore_index=True).iloc[:n].reset_index(drop=True)
    return write_particles(optics, table, work / "particles.star")


def checkpoints(work: Path, data_key: dict, ns):
    """(writer, resume): a ``run_job`` writer saving each iteration's checkpoint in ``work``, and the latest checkpoint
    saved there for these data and run options (None when there is none)."""
    from gerelion_dask.checkpoint import load_checkpoint, save_checkpoint

    key = dict(data_key, pool=ns.pool, iters=ns.iters, healpix_order=ns.healpix_order, maxsig=ns.maxsig)
    tag = work / "checkpoints.json"  # the options the checkpoints in ``work`` were made with
    old = json.loads(tag.read_text()) if tag.exists() else None
    if old != key:
        for f in work.glob("checkpoint_it*.npz"):
            f.unlink()
        tag.write_text(json.dumps(key))

    def writer(it, *args, checkpoint=None, **kw):
        if checkpoint is not None:
            save_checkpoint(work / f"checkpoint_it{it:03d}.npz", checkpoint)
            print(time.strftime("%H:%M:%S"), f"checkpoint of iteration {it} saved", flush=True)
        return {}

    saved = sorted(work.glob("checkpoint_it*.npz"))
    resume = load_checkpoint(saved[-1]) if saved else None
    if resume is not None:
        print(time.strftime("%H:%M:%S"), f"continuing after iteration {resume.iteration} ({saved[-1].name})",
              flush=True)
    return writer, resume


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="particles in the run")
    ap.add_argument("--unique", type=int, default=25_000, help="distinct simulated images")
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--apix", type=float, default=1.0)
    ap.add_argument("--pool", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--healpix-order", type=int, default=2)
    ap.add_argument("--maxsig", type=int, default=40)
    ap.add_argument("--procs", type=int, default=4, help="simulation processes")
    ap.add_argument("--gpu", action="store_true", help="one LocalCUDACluster worker per GPU (else 1 NumPy worker)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--work", default="large_run", help="folder for the simulated stacks, the store and the run")
    ap.add_argument("--keep", action="store_true", help="keep --work afterwards (default: removed)")
    ap.add_argument("--gpu-memory", type=float, default=0.0, metavar="GIB",
                    help="emulate a GPU of this many GiB: CuPy's pool limit in the workers (CUPY_GPU_MEMORY_LIMIT), "
                         "which the E-step's budgets follow (fine.device_memory_bytes)")
    ns = ap.parse_args()
    if ns.unique > ns.n or ns.unique < ns.procs:
        ap.error("need procs <= unique <= n")
    if ns.gpu_memory:  # read by CuPy in each worker process the cluster starts (they inherit the environment)
        os.environ["CUPY_GPU_MEMORY_LIMIT"] = str(int(ns.gpu_memory * 2**30))

    from dask_scaling import PHASES, PrintIterations, job_config, run

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stdout)
    # the memory plan of the run, and the store import (its end, timestamped: it runs before iteration 1)
    for name in ("gerelion_dask.driver", "gerelion_dask.distributed.store", "gerelion_dask.io.zarr_store"):
        logging.getLogger(name).setLevel(logging.INFO)
    work = Path(ns.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shares = [ns.unique // ns.procs + (i < ns.unique % ns.procs) for i in range(ns.procs)]
    jobs = [(work / f"sim_{i:02d}", k, ns.box, ns.apix, 100 + i) for i, k in enumerate(shares)]
    made = work / "large_run.json"  # what the simulated data in --work are (written once they are complete)
    data_key = {"n": ns.n, "unique": ns.unique, "box": ns.box, "apix": ns.apix, "procs": ns.procs}
    old = json.loads(made.read_text()) if made.exists() else None
    if old is not None and old["data"] == data_key and Path(old["star"]).exists():
        star, initial_reference = Path(old["star"]), Path(old["initial_reference"])
        print(time.strftime("%H:%M:%S"), f"reusing the {ns.unique} simulated images listed as {ns.n} particles in "
              f"{work} (their store too, if imported)", flush=True)
    else:
        made.unlink(missing_ok=True)
        with ProcessPoolExecutor(ns.procs) as ex:
            parts = list(ex.map(simulate_part, jobs))
        star, initial_reference = tiled_star(parts, work, ns.n), parts[0].initial_reference
        made.write_text(json.dumps({"data": data_key, "star": str(star), "initial_reference": str(initial_reference)}))
        print(time.strftime("%H:%M:%S"), f"simulated {ns.unique} images of {ns.box} px in {ns.procs} processes, "
              f"listed as {ns.n} particles: {time.perf_counter() - t0:.0f} s", flush=True)

    cfg = job_config(SimpleNamespace(particles_star=star, initial_reference=initial_reference), work, ns)
    writer, resume = (checkpoints(work, data_key, ns) if ns.keep else (None, None))
    label = f"{ns.workers} {'GPU' if ns.gpu else 'NumPy'} worker{'s' if ns.workers > 1 else ''}"
    t1 = time.perf_counter()
    try:
        res, start = run(cfg, ns.workers, ns.gpu, PrintIterations(label, ns.n, pools_every=10), phases=True,
                         writer=writer, resume=resume)
    finally:
        if not ns.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t1
    print(f"\n{ns.n} particles, box {ns.box}, pool {ns.pool}, HEALPix order {ns.healpix_order}: run {total:.0f} s "
          f"(cluster start {start:.1f} s, store import and iterations included); stages timed: "
          f"{', '.join(label for _, _, label in PHASES)}")
    print("| iteration | size | E-step s | ms/particle | M-step s | worker peak RSS MiB | CuPy pool MiB |")
    print("|---|---|---|---|---|---|---|")
    for rec in res.iterations:
        mem = rec.memory or {}
        gpu = mem.get("worker_gpu_pool_held_mib", (mem.get("gpu_mib") or {}).get("pool_held"))
        print(f"| {rec.iteration} | {rec.current_size} | {rec.seconds['estep']:.1f} | "
              f"{1000 * rec.seconds['estep'] / ns.n:.2f} | {rec.seconds['mstep']:.1f} | "
              f"{mem.get('worker_peak_rss_mib', 0):.0f} | {gpu if gpu is None else round(gpu)} |")


if __name__ == "__main__":
    main()
