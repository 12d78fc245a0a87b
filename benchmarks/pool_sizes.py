"""Seconds per iteration of one synthetic refinement at several pool sizes (issue 5: the pool's fixed host costs).

One data set (``dask_scaling.py``'s simulation: phantom map, CTF, random halves) is refined in process with the same
seed at each ``--pools`` value (0: the size the run chooses, ``plan.task_pool_size``), alternating the sizes for
``--rounds`` rounds after a one-iteration warm-up (compilation, FFT plans).  Prints per run the pool size used, the
number of E-step tasks, and the E-step and whole seconds of each iteration, then the best of the rounds per size.

  python benchmarks/pool_sizes.py --n 8000 --box 128 --apix 2 --iters 3 --pools 128,0 [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from dask_scaling import job_config, simulate  # benchmarks/dask_scaling.py: the same data and flags

    from gerelion_dask import driver
    from gerelion_dask.driver import InProcessRunner, run_job

    sizes = []  # the particles of each E-step task, as the driver hands them over
    real = driver.expectation_pool

    def spy(images, pp, *args, **kw):
        sizes.append(len(pp.index))
        return real(images, pp, *args, **kw)

    driver.expectation_pool = spy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--apix", type=float, default=2.0)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--healpix-order", type=int, default=2)
    ap.add_argument("--maxsig", type=int, default=40)
    ap.add_argument("--pools", default="128,0", help="pool sizes, comma-separated (0: the run's own choice)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    a = ap.parse_args()
    pools = [int(p) for p in a.pools.split(",")]
    best: dict[int, tuple[float, float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = simulate(Path(tmp), a.n, a.box, a.apix)
        print(f"simulated {a.n} particles of {a.box} px in {time.perf_counter() - t0:.0f} s")

        def run(pool, iters):
            ns = argparse.Namespace(healpix_order=a.healpix_order, iters=iters, pool=pool, maxsig=a.maxsig)
            out = Path(tmp) / f"run_{pool}"
            out.mkdir(exist_ok=True)
            return run_job(job_config(paths, out, ns), runner=InProcessRunner(a.device))

        run(pools[-1], 1)  # warm-up
        print("| round | --pool | pool used | tasks per iteration | E-step s per iteration | whole s per iteration |")
        print("|---|---|---|---|---|---|")
        for r in range(a.rounds):
            for pool in pools:
                sizes.clear()
                res = run(pool, a.iters)
                used = max(sizes)
                es = [it.seconds["estep"] for it in res.iterations]
                tot = [it.seconds["total"] for it in res.iterations]
                tasks = len(sizes) // len(res.iterations)
                print(f"| {r + 1} | {pool} | {used} | {tasks} | {' / '.join(f'{x:.2f}' for x in es)} | "
                      f"{' / '.join(f'{x:.2f}' for x in tot)} |", flush=True)
                key = (sum(es[1:]), sum(tot[1:]), used)  # iterations 2.. (iteration 1 has the CC search's extras)
                best[pool] = min(best.get(pool, key), key)
        print("\nbest of the rounds, iterations 2 to the last summed:")
        for pool, (es, tot, used) in best.items():
            print(f"  --pool {pool} (pool {used}): E-step {es:.2f} s, whole {tot:.2f} s")


if __name__ == "__main__":
    main()
