"""Getting a Dask client, and ``gerelion cluster start|stop|status`` (a persistent local cluster many jobs share).

:func:`make_client` returns ``(client, cluster_or_None)``:

* an existing scheduler (``scheduler_address`` or ``scheduler_file``); nobody answering within ``timeout`` seconds is
  an :class:`~gerelion_dask.errors.InputError` (exit code 2 on the command line);
* else a new ``dask_cuda.LocalCUDACluster`` (one worker per GPU, ``resources={"GPU": 1}``) when this machine has GPUs
  (:func:`detect_gpus`: NVML, no CUDA context in the client) and CuPy; dask-cuda is imported only then;
* else a ``distributed.LocalCluster`` of NumPy worker processes (one thread each, ``resources={"GPU": 1}`` so the same
  ``client.submit(..., resources={"GPU": 1})`` runs there; one worker per core by default), on 127.0.0.1.

Workers are started by nannies, which set ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``OPENBLAS_NUM_THREADS`` to 1
before the worker process starts (distributed's ``nanny.pre-spawn-environ``; set explicitly for the clusters made
here): one BLAS thread per task.  This matters for reproducibility, not only for speed: OpenBLAS's dgemm gives
results that differ in the last bits between 1 and 2 threads (measured here for (208 x 600)(600 x 500) and
1000^3 products; zgemm did not differ), so bit-identical maps need the same BLAS thread count in every task.
Workers of an external scheduler (``dask worker`` CLI) get the same default from distributed's configuration.

distributed's nannies also set ``MALLOC_TRIM_THRESHOLD_=65536`` by default (to hand freed memory back to the OS).
Setting it at all turns off glibc's dynamic mmap threshold, so every NumPy temporary above 128 KiB is mmap'ed and
page-faulted afresh: one E-step pool ran **1.9x slower** in such a process (0.12 s -> 0.23 s, 15 particles; a whole
1-worker run took 1.3-2x the in-process time).  Leaving the variable out is not enough: a nanny writes its
pre-spawn variables into its *parent's* environment, and takes a variable from that environment before its
configuration, so a later worker inherits them.  The clusters made here set both limits explicitly to glibc's own
dynamic maxima, ``MALLOC_MMAP_THRESHOLD_`` 32 MiB and ``MALLOC_TRIM_THRESHOLD_`` 64 MiB (measured 0.11 s for the
same pool), in the configuration and in this process's environment (as a nanny would do anyway).  For workers
started elsewhere, put :data:`WORKER_ENV` into ``distributed.nanny.pre-spawn-environ`` of their Dask configuration.

The service: ``gerelion cluster start`` starts ``python -m gerelion_dask.distributed.cluster serve`` in the background
(its own session, log beside the scheduler file), which runs a local cluster as above and writes the scheduler file
(default ``~/.gerelion/scheduler.json``; ``GERELION_HOME`` moves the folder).  Jobs join it with
``--scheduler-file``.  ``stop`` sends SIGTERM to the service process (its pid is kept in
``<scheduler file>.service.json`` and checked to be that service first), which closes its cluster; without a live
service it shuts down the scheduler the file names (``Client.shutdown``).  ``status`` lists the workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..cliargs import ArgumentParser as _OneLineParser
from ..errors import InputError

__all__ = ["make_client", "close_client", "detect_gpus", "connect", "new_local_cluster", "cluster_main",
           "default_scheduler_file"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
_SERVICE_MODULE = "gerelion_dask.distributed.cluster"


# ------------------------------------------------------------------------------------------------------ GPUs


def _visible_devices(env: dict) -> int | None:
    """Number of devices ``CUDA_VISIBLE_DEVICES`` allows (None: not set)."""
    v = env.get("CUDA_VISIBLE_DEVICES")
    if v is None:
        return None
    ids = [x.strip() for x in v.split(",") if x.strip()]
    n = 0
    for x in ids:  # CUDA stops at the first invalid (e.g. negative) id
        if x.lstrip("-").isdigit() and int(x) < 0:
            break
        n += 1
    return n


def detect_gpus() -> int:
    """GPUs this process could use, counted without creating a CUDA context here.

    0 without CuPy (nothing could use a GPU).  Otherwise the NVML device count (no CUDA runtime call), limited by
    ``CUDA_VISIBLE_DEVICES``; without NVML, CuPy's count in a short child process.
    """
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return 0
    visible = _visible_devices(os.environ)
    if visible == 0:
        return 0
    from distributed.diagnostics import nvml

    n = nvml.device_get_count()
    if n == 0:
        code = "from gerelion_dask.backend import gpu_count; print(gpu_count())"
        try:
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            n = int(out.stdout.strip() or 0)
        except (subprocess.SubprocessError, ValueError, OSError):
            n = 0
    return n if visible is None else min(n, visible)


# ------------------------------------------------------------------------------------------------- clients


def connect(scheduler_address: str | None = None, scheduler_file: str | os.PathLike | None = None,
            timeout: float = CONNECT_TIMEOUT_S):
    """A client of an existing scheduler; :class:`InputError` when nobody answers within ``timeout`` seconds."""
    from distributed import Client

    hint = "start one with `gerelion cluster start`, or leave out --scheduler-address/--scheduler-file to run " \
           "a local cluster for this job"
    if scheduler_file is not None:
        path = Path(scheduler_file).expanduser()
        if not path.is_file():
            raise InputError(path, "scheduler file not found", hint)
        try:
            address = json.loads(path.read_text())["address"]
        except (ValueError, KeyError, OSError) as e:
            raise InputError(path, f"not a Dask scheduler file ({e})") from None
        where = path
    else:
        address, where = scheduler_address, scheduler_address
    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError) as e:
        raise InputError(where, f"no Dask scheduler answers at {address} within {timeout:g} s "
                         f"({type(e).__name__})", hint) from None


ONE_BLAS_THREAD = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}
# glibc's own dynamic limits at their maximum (64-bit): NumPy temporaries up to 32 MiB are reused from the heap
MALLOC_LIMITS = {"MALLOC_MMAP_THRESHOLD_": 32 * 2**20, "MALLOC_TRIM_THRESHOLD_": 64 * 2**20}
WORKER_ENV = {**ONE_BLAS_THREAD, **MALLOC_LIMITS}


def new_local_cluster(n_workers: int | None = None, threads_per_worker: int = 1,
                      dashboard_address: str | None = "127.0.0.1:8787", in_process: bool = False,
                      gpus: bool = True):
    """A new local cluster: LocalCUDACluster with GPUs (unless ``gpus`` is false), else a LocalCluster of NumPy
    worker processes; their nannies set :data:`WORKER_ENV` (one BLAS thread, glibc malloc limits) before a worker
    process starts."""
    import dask

    _register_dashboard_page()
    env = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **WORKER_ENV}
    # a nanny takes a variable from this process's environment before its configuration, and writes its pre-spawn
    # variables into this environment (so an earlier default cluster's MALLOC_TRIM_THRESHOLD_=65536 would win)
    os.environ.update({k: str(v) for k, v in WORKER_ENV.items()})
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        return _new_local_cluster(n_workers, threads_per_worker, dashboard_address, in_process, gpus)


def _register_dashboard_page() -> None:
    """Our /gerelion page on the dashboard of a scheduler started in this process (:mod:`gerelion_dask.dashboard`)."""
    try:
        from ..dashboard import register

        register()
    except ImportError:  # no bokeh: no dashboard at all
        pass


def _new_local_cluster(n_workers, threads_per_worker, dashboard_address, in_process, gpus):
    from distributed import LocalCluster

    if dashboard_address is None:  # the scheduler's HTTP server always listens (default 8787): take a free port
        dashboard_address = "127.0.0.1:0"
    common = {"threads_per_worker": threads_per_worker, "dashboard_address": dashboard_address,
              "resources": {"GPU": 1}}
    if in_process:  # threads in this process (debugging); LocalCluster(processes=False) must not get a host
        return LocalCluster(n_workers=n_workers or 1, processes=False, **common)
    n_gpu = detect_gpus() if gpus else 0
    if n_gpu > 0:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as e:
            log.warning("%d GPU(s) but dask-cuda cannot be imported (%s): one worker on the first GPU "
                        "(pip install 'gerelion-dask[gpu]' for one worker per GPU)", n_gpu, e)
            return LocalCluster(n_workers=1, processes=True, host="127.0.0.1", **common)
        kw = {"n_workers": min(n_workers, n_gpu)} if n_workers else {}
        log.info("LocalCUDACluster: %d GPU worker(s)", kw.get("n_workers", n_gpu))
        return LocalCUDACluster(host="127.0.0.1", **kw, **common)
    n = n_workers or os.cpu_count() or 1
    log.info("LocalCluster: %d NumPy worker process(es)", n)
    return LocalCluster(n_workers=n, processes=True, host="127.0.0.1", **common)


def make_client(scheduler_address: str | None = None, scheduler_file: str | os.PathLike | None = None,
                n_workers: int | None = None, threads_per_worker: int = 1,
                dashboard_address: str | None = "127.0.0.1:8787", in_process: bool = False,
                timeout: float = CONNECT_TIMEOUT_S, gpus: bool = True, slurm=None):
    """``(client, cluster_or_None)``: an existing scheduler if one is named, else a new local cluster (close both
    with :func:`close_client`).  ``in_process``: a LocalCluster of threads in this process (debugging);
    ``gpus=False``: NumPy workers even on a GPU machine; ``slurm`` (a :class:`.slurm.SlurmOptions`): workers are
    SLURM jobs, scaled adaptively (:func:`.slurm.new_slurm_cluster`)."""
    if scheduler_address or scheduler_file:
        return connect(scheduler_address, scheduler_file, timeout), None
    from distributed import Client

    if slurm is not None:
        from .slurm import new_slurm_cluster

        cluster = new_slurm_cluster(slurm, dashboard_address)
        return Client(cluster), cluster

    cluster = new_local_cluster(n_workers, threads_per_worker, dashboard_address, in_process, gpus)
    return Client(cluster), cluster


def close_client(client, cluster) -> None:
    """Close a client and, when :func:`make_client` started it, its cluster."""
    try:
        client.close()
    finally:
        if cluster is not None:
            cluster.close()


# ------------------------------------------------------------------------------------------ the cluster service


def default_scheduler_file() -> Path:
    return Path(os.environ.get("GERELION_HOME", Path.home() / ".gerelion")) / "scheduler.json"


def _state_path(scheduler_file: Path) -> Path:
    return scheduler_file.with_name(scheduler_file.name + ".service.json")


def _is_service(pid: int) -> bool:
    """True if ``pid`` is a running ``gerelion_dask.distributed.cluster serve`` process."""
    try:
        import psutil

        return any(_SERVICE_MODULE in part for part in psutil.Process(pid).cmdline())
    except Exception:  # no such process, or not ours to inspect
        return False


def _serve(ns) -> int:
    """The service process: run a local cluster until a signal arrives or the scheduler is shut down remotely."""
    import threading

    from distributed import Client

    stop = threading.Event()

    def on_signal(*_):
        if stop.is_set():  # a second signal: leave now
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    sched = Path(ns.scheduler_file)
    cluster = new_local_cluster(ns.workers, ns.threads_per_worker, ns.dashboard_address or None)
    with Client(cluster) as client:
        client.write_scheduler_file(str(sched))
    print(f"scheduler {cluster.scheduler_address}; dashboard {cluster.dashboard_link}", flush=True)
    while not stop.wait(0.5) and cluster.scheduler.status.name not in ("closing", "closed", "failed"):
        pass
    sched.unlink(missing_ok=True)
    _state_path(sched).unlink(missing_ok=True)
    if stop.is_set():
        cluster.close()
        return 0
    # shut down by a client: the nannies have closed their workers; LocalCluster.close() would wait for the
    # scheduler that is gone (it hangs), so leave without it
    print("scheduler shut down by a client", flush=True)
    sys.stdout.flush()
    os._exit(0)


def _start(ns) -> int:
    sched = Path(ns.scheduler_file).expanduser().resolve()
    try:
        with connect(scheduler_file=sched, timeout=2) as client:
            print(f"a cluster is already running: {client.scheduler.address} ({sched})")
            return 0
    except InputError:
        sched.unlink(missing_ok=True)
    sched.parent.mkdir(parents=True, exist_ok=True)
    logfile = sched.with_name(sched.name + ".log")
    cmd = [sys.executable, "-m", _SERVICE_MODULE, "serve", "--scheduler-file", str(sched),
           "--threads-per-worker", str(ns.threads_per_worker), "--dashboard-address", ns.dashboard_address or ""]
    if ns.workers:
        cmd += ["--workers", str(ns.workers)]
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    _state_path(sched).write_text(json.dumps({"pid": proc.pid, "scheduler_file": str(sched), "log": str(logfile),
                                              "started": time.time()}))
    t0 = time.time()
    while time.time() - t0 < ns.timeout:
        if proc.poll() is not None:
            print(f"gerelion cluster: the service exited (code {proc.returncode}); see {logfile}", file=sys.stderr)
            return 1
        client = None
        if sched.is_file():
            try:
                client = connect(scheduler_file=sched, timeout=5)
                client.wait_for_workers(1, timeout=max(1.0, ns.timeout - (time.time() - t0)))
            except (InputError, TimeoutError, OSError):
                client = None
        if client is not None:
            with client:
                print(f"started: scheduler {client.scheduler.address}, scheduler file {sched}, "
                      f"log {logfile}\n  join it with: gerelion refine ... --scheduler-file {sched}")
                _print_workers(client)
            return 0
        time.sleep(0.3)
    print(f"gerelion cluster: no scheduler after {ns.timeout:g} s; see {logfile}", file=sys.stderr)
    return 1


def _stop(ns) -> int:
    sched = Path(ns.scheduler_file).expanduser().resolve()
    state_file = _state_path(sched)
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    pid = state.get("pid")
    stopped = False
    if pid and _is_service(pid):  # our service: it closes its cluster on SIGTERM
        os.kill(pid, signal.SIGTERM)
        stopped = True
    elif sched.is_file():  # someone else's scheduler named by the file, or the pid file is gone
        try:
            connect(scheduler_file=sched, timeout=3).shutdown()
            stopped = True
        except InputError:
            pass
    t0 = time.time()
    while pid and _is_service(pid) and time.time() - t0 < 30:
        time.sleep(0.2)
    if pid and _is_service(pid):
        print(f"gerelion cluster: the service (pid {pid}) did not exit in 30 s", file=sys.stderr)
        return 1
    sched.unlink(missing_ok=True)
    state_file.unlink(missing_ok=True)
    print("stopped" if stopped else f"no cluster was running ({sched})")
    return 0 if stopped else 1


def _print_workers(client) -> None:
    info = client.scheduler_info(n_workers=-1)
    workers = info.get("workers", {})
    print(f"scheduler {info.get('address')}  dashboard {client.dashboard_link}  workers {len(workers)}")
    print(f"  {'worker':28s} {'name':>6s} {'threads':>7s} {'memory GiB':>10s}  resources")
    for addr, w in sorted(workers.items()):
        print(f"  {addr:28s} {str(w.get('name')):>6s} {w.get('nthreads', 0):7d} "
              f"{(w.get('memory_limit') or 0) / 2**30:10.1f}  {w.get('resources', {})}")


def _status(ns) -> int:
    sched = Path(ns.scheduler_file).expanduser().resolve()
    try:
        with connect(scheduler_file=sched, timeout=3) as client:
            _print_workers(client)
            return 0
    except InputError as e:
        print(f"no cluster: {e}")
        return 1


def cluster_parser(prog: str = "gerelion cluster") -> argparse.ArgumentParser:
    p = _OneLineParser(prog=prog, description="a persistent local Dask cluster that jobs join with "
                                "--scheduler-file")
    p.add_argument("action", choices=["start", "stop", "status", "serve"],
                   help="start | stop | status (serve: the service process itself)")
    p.add_argument("--scheduler-file", default=str(default_scheduler_file()),
                   help="where the scheduler's address is written (default %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="workers (default: one per GPU, else one per core)")
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--dashboard-address", default="127.0.0.1:8787", help="'' for no dashboard")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds `start` waits for the cluster")
    return p


def cluster_main(argv) -> int:
    """``gerelion cluster start|stop|status``; returns the exit code."""
    ns = cluster_parser().parse_args(argv)
    if ns.workers is not None and ns.workers < 1:
        raise InputError(None, f"--workers {ns.workers} must be at least 1")
    return {"start": _start, "stop": _stop, "status": _status, "serve": _serve}[ns.action](ns)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sys.exit(cluster_main(sys.argv[1:]))
