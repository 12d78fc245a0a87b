"""DaskRunner: the E-step of an iteration as Dask tasks (same ``run`` interface as the in-process runner).

Per call of :meth:`DaskRunner.run` (one iteration):

1. the per-half :class:`~gerelion_dask.expectation.estep.EStepModel` and settings enter the graph once per iteration
   as ``model-``/``settings-`` tasks (``client.submit(hold, model)``): tasks depend on those futures, and the scheduler
   recomputes them if every worker holding them dies (scattered data would be lost);
2. one task per pool: ``client.submit(estep_task, source, selection, pool_particles, model, settings, pool,
   key=f"estep-{iteration}-{pool}-{token}", resources={"GPU": 1}, retries=2, pure=False, priority=-pool)``
   (pools run in pool order on a worker; reductions, priority 0, as soon as they are ready); the task reads its
   images itself (``particles.zarr`` when :meth:`DaskRunner.prepare` imported one, else the picklable ParticleSet)
   and reads the next pool placed on its worker in the background while it computes
   (:class:`~gerelion_dask.io.readahead.ReadAhead`, keyed by the call's token);
3. per half set, the pairwise tree of :func:`~gerelion_dask.distributed.reduce.tree_reduce_futures` over the pools in
   pool order (keys ``reduce-{iteration}-{half}-{level}-{i}-{token}``) and a last ``reduce-{iteration}-{half}-host``
   task that copies the sums to host memory; the per-particle results ride up the same tree;
4. the driver gathers the pools' PoolResults (``results-...`` tasks); the reduced sums stay on the workers;

Keys name the stage first (``estep``, ``reduce``), which is what the dashboard's task stream and progress bars group
by (``dask.utils.key_split``); ``token`` (per runner and call) keeps keys unique on a scheduler shared by several jobs.
Annotations are not used (graph optimisation drops them, ECOSYSTEM.md §2): every task is submitted with its key and
resources.  A worker lost mid-iteration: the scheduler reruns its tasks elsewhere (they are pure, so the result is
the same); the model and settings are tasks the scheduler can recompute; should an iteration's inputs still be
lost, it is submitted again once (``iteration_retries``).  A task that kills every worker that runs it
(``distributed.scheduler.allowed-failures`` + 1 of them, distributed's ``KilledWorker``) ends the run with a :class:`~gerelion_dask.errors.RunFailedError` that
names the pool (``iteration 2: pool 3 of 6 (particles 27-39 of half 1) was lost with 4 workers that died: ...``;
distributed counts a death against every task the worker held, so the pool named is the one that killed it or one
queued beside it); the driver adds the iteration to continue from, and the command line prints that one line (exit
code 3).

Results are bit-identical to :class:`~gerelion_dask.driver.InProcessRunner` (same pools, same summation tree) on the
CPU when that runs with one BLAS thread, as every worker does (see :mod:`.cluster`); on GPUs no two runs are
bit-identical yet, in process or not, because the back-projection adds with atomics (ops/backprojector.py).

5. the M-step is one ``mstep-{iteration}-{token}`` task on a worker that reads the reduced sums where they are
   (:meth:`DaskRunner.maximize`); the driver receives the new model (maps, spectra: small) and writes the files.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict

from .reduce import tree_reduce_futures
from .tasks import ImageSource, concat_results, estep_task, hold, results_of, to_host, zero_weights_of

__all__ = ["DaskRunner"]

log = logging.getLogger(__name__)


def _outcome(wait, what: str):
    """``wait()`` (a future's ``result`` or the client's ``gather`` of futures), with a task lost with every worker
    that held it raised as one :class:`~gerelion_dask.errors.RunFailedError` naming ``what`` (:func:`_task_failure`)."""
    try:
        return wait()
    except Exception as err:
        failed = _task_failure(err, what)
        if failed is None:
            raise
        raise failed from None
    finally:
        del wait  # a traceback kept by the caller must not keep the futures


def _task_failure(err: BaseException, what: str):
    """A :class:`~gerelion_dask.errors.RunFailedError` naming ``what`` for a task lost with every worker that held it
    (distributed's ``KilledWorker``, after ``distributed.scheduler.allowed-failures`` + 1 worker deaths); None for
    any other error (a task's own exception travels unchanged, with its traceback)."""
    from distributed.scheduler import KilledWorker

    from ..errors import RunFailedError

    if not isinstance(err, KilledWorker):
        return None
    last = getattr(err.last_worker, "address", err.last_worker)
    # distributed counts a worker's death against every task the worker held (running or queued), so ``what`` is
    # the pool that killed the workers or one that was queued beside it
    return RunFailedError(f"{what} was lost with {err.allowed_failures + 1} workers that died: worker process died "
                          f"(last on {last}; see its log)")


def _pool_names(tasks, it: int) -> list:
    """``iteration 2: pool 3 of 6 (particles 27-39 of half 1)`` for each task (pools counted from 1, particles
    counted within their half set as the driver splits them)."""
    seen: dict = defaultdict(int)
    names = []
    for k, (rows, pp) in enumerate(tasks):
        s = seen[pp.half]
        seen[pp.half] += len(rows)
        half = f" of half {pp.half}" if pp.half else ""
        names.append(f"iteration {it}: pool {k + 1} of {len(tasks)} (particles {s + 1}-{s + len(rows)}{half})")
    return names


def placement(workers: list, n_tasks: int) -> list:
    """A preferred worker per pool: contiguous blocks of pools (in task order, half set 1 first) per worker.

    Only a hint (``allow_other_workers``: idle workers still steal, a lost worker's pools go elsewhere), so results
    never depend on it.  What it buys: the fixed reduction tree adds neighbouring pools, which then sit on one worker
    (the partial volumes cross between workers only near the root), and a worker's pools need one half set's
    projections, so the per-worker projection cache is not filled with both halves' by every worker.
    """
    if not workers:
        return [None] * n_tasks
    return [[workers[k * len(workers) // n_tasks]] for k in range(n_tasks)]


def _is_lost_data(err: BaseException) -> bool:
    """An error that rerunning the iteration can cure (a scattered input lost with its workers)."""
    from distributed.client import FutureCancelledError

    return isinstance(err, FutureCancelledError) or "lost dependencies" in str(err).lower()


class DaskRunner:
    """Runs every E-step task on the workers of a Dask client.

    Parameters
    ----------
    client : distributed.Client
    device : {"auto", "cpu"}
        ``auto``: CuPy on workers that see a GPU, NumPy elsewhere; ``cpu``: NumPy everywhere.
    use_zarr : bool
        Import the images into ``<output folder>/particles.zarr`` in :meth:`prepare` and read them from there.
    retries : int
        Task retries (on top of the scheduler's rescheduling of the tasks of a lost worker).
    iteration_retries : int
        Times an iteration is submitted again when its scattered inputs were lost.
    """

    def __init__(self, client, device: str = "auto", use_zarr: bool = True, retries: int = 2,
                 iteration_retries: int = 1):
        self.client = client
        self.device = device
        self.use_zarr = use_zarr
        self.retries = retries
        self.iteration_retries = iteration_retries
        self.store = None  # ParticleStore after prepare()
        self.iteration = 0
        self._token = uuid.uuid4().hex[:8]
        self._calls = 0
        self._read_images = None  # (callable, its scattered ImageSource future)
        self.publisher = None  # DashboardPublisher after prepare(): the /gerelion dashboard page's numbers

    # ---------------------------------------------------------------------------------------------- driver hooks

    def prepare(self, inp, st, cfg) -> None:
        """Called once by the driver before iteration 1: import the images into ``particles.zarr`` (half order)."""
        self._start_publisher(inp, cfg)
        if self.use_zarr:
            from pathlib import Path

            from .store import prepare_particle_store

            self.store = prepare_particle_store(inp.particles, st.half, Path(cfg.o).parent, cfg.pool)

    def power_sums(self, pool_rows, optics_index, ps, read_images) -> list:
        """The initial noise spectra's :class:`~gerelion_dask.setup_job.PowerSums` of each pool (rows of
        ``pool_rows``), one ``power-`` task per pool on the workers (after :meth:`prepare`: read from the store)."""
        from .tasks import power_task

        client = self.client
        self.wait_for_a_worker("noise spectra")
        source = self._source(read_images)
        self._calls += 1  # keys unique per call: a runner may serve several jobs
        tag = f"{self._token}{self._calls:x}"
        futures = [client.submit(power_task, source, self.store.selection(rows) if self.store is not None else rows,
                                 optics_index[rows], ps, self.device, key=f"power-{k}-{tag}",
                                 resources={"GPU": 1}, retries=self.retries, pure=False, priority=-k)
                   for k, rows in enumerate(pool_rows)]
        try:
            return _outcome(lambda: client.gather(futures), "the initial noise spectra")
        finally:
            del futures

    def start_iteration(self, iteration: int) -> None:
        """Called by the driver at the start of each iteration (the number goes into the task keys)."""
        self.iteration = int(iteration)
        if self.publisher is not None:
            self.publisher.progress(self.iteration, "estep")

    def end_iteration(self, rec, last: bool = False) -> None:
        """Called by the driver after each iteration's M-step: resolution and FSC to the dashboard page."""
        if self.publisher is not None:
            self.publisher.iteration_done(rec, last)

    def _start_publisher(self, inp, cfg) -> None:
        try:
            from ..dashboard import DashboardPublisher
        except ImportError:  # no bokeh
            return
        self.publisher = DashboardPublisher(self.client, job_id=self._token)
        self.publisher.start(cfg.o, "refine" if cfg.auto_refine else "classify", inp.box, inp.pixel_size)

    # ------------------------------------------------------------------------------------------------------ run

    def run(self, tasks, models: dict, settings: dict, read_images, progress=None):
        """E-step of ``tasks`` (``[(rows, PoolParticles), ...]``) -> ``({half: Partials}, PoolResult)``."""
        for attempt in range(self.iteration_retries + 1):
            try:
                return self._run_once(tasks, models, settings, read_images, progress)
            except Exception as err:
                if not _is_lost_data(err):
                    raise
                if attempt == self.iteration_retries:
                    from ..errors import RunFailedError

                    # workers died so often that even the resubmitted iteration lost its inputs: a worker-killing
                    # task (whose KilledWorker did not come first) or a failing machine; one line, like KilledWorker
                    raise RunFailedError(f"iteration {self.iteration}: workers died during {attempt + 1} attempts "
                                         f"and took the iteration's inputs with them ({err})") from None
                log.warning("iteration %d: inputs lost with a worker (%s); submitting it again", self.iteration, err)
        raise AssertionError("unreachable")

    def _run_once(self, tasks, models, settings, read_images, progress):
        from distributed import as_completed

        client = self.client
        self._calls += 1
        tag = f"{self._token}{self._calls:x}"
        it = self.iteration or self._calls
        halves = sorted({pp.half for _, pp in tasks})
        self.wait_for_a_worker(f"iteration {it}")
        # the iteration's inputs as (recomputable) tasks, not scattered data: a worker that dies holding the only
        # copy must not take them with it (a pool that kills its workers then ends as KilledWorker, named)
        where = placement(sorted(client.scheduler_info()["workers"]), len(tasks))
        # each half set's model and settings start on the worker of that half's first pool (a hint, like the pools')
        first = {}
        for k, (_, pp) in enumerate(tasks):
            first.setdefault(pp.half, where[k])
        near = {h: {"workers": first[h], "allow_other_workers": first[h] is not None} for h in halves}
        model_f = {h: client.submit(hold, models[h], key=f"model-{it}-{h}-{tag}", pure=False, **near[h])
                   for h in halves}
        settings_f = {h: client.submit(hold, settings[h], key=f"settings-{it}-{h}-{tag}", pure=False, **near[h])
                      for h in halves}
        source = self._source(read_images)
        leaves = defaultdict(list)
        sels = [self.store.selection(rows) if self.store is not None else rows for rows, _ in tasks]
        for k, (_, pp) in enumerate(tasks):
            # the pool placed next on the same worker is read there while this one computes (a hint, like `where`);
            # priority -k: a worker runs its pools in this order (else Dask's order is arbitrary and the pool read
            # ahead is rarely the next one), and the reductions (priority 0) run as soon as they are ready
            following = sels[k + 1] if k + 1 < len(tasks) and where[k + 1] == where[k] else None
            leaves[pp.half].append(client.submit(
                estep_task, source, sels[k], pp, model_f[pp.half], settings_f[pp.half], k, self.device,
                (tag, following),
                key=f"estep-{it}-{k}-{tag}", resources={"GPU": 1}, retries=self.retries, pure=False, priority=-k,
                workers=where[k], allow_other_workers=where[k] is not None))
        roots = {}
        for h in halves:
            root = tree_reduce_futures(client, leaves[h], f"reduce-{it}-{h}", key_suffix=f"-{tag}",
                                       retries=self.retries)
            roots[h] = client.submit(to_host, root, key=f"reduce-{it}-{h}-host-{tag}", pure=False,
                                     retries=self.retries)
        # the pools not finished yet; a finished pool's future is dropped at once, so that Dask frees its sums as
        # soon as the tree has added them (holding every leaf kept all of an iteration's pools on the worker: 46
        # pools, 64.5 GiB of the H100 at 100,000 box-256 particles, and an out-of-memory error in the tree's adds)
        pending = {f.key: f for h in halves for f in leaves[h]}
        names = dict(zip(pending, _pool_names(tasks, it), strict=True))
        running = as_completed(list(pending.values()))
        leaves.clear()
        for done, fut in enumerate(running, start=1):
            del pending[fut.key]
            if fut.status == "error":
                failed = _task_failure(fut.exception(), names[fut.key])
                if failed is not None:
                    client.cancel([fut, *pending.values(), *roots.values()])
                    raise failed
                fut.result()  # raise the task's error here
            if progress:
                progress(done, len(tasks))
            if self.publisher is not None:
                self.publisher.progress(it, "estep", done, len(tasks), force=done == len(tasks))
        pending = running = fut = None
        res = [client.submit(results_of, roots[h], key=f"results-{it}-{h}-{tag}", pure=False, retries=self.retries)
               for h in halves]
        zero = [client.submit(zero_weights_of, roots[h], key=f"zero-weights-{it}-{h}-{tag}", pure=False,
                              retries=self.retries) for h in halves]
        got = _outcome(lambda: client.gather(res + zero), f"iteration {it}: the sums of the E-step")
        results = concat_results(got[:len(halves)])
        # the reduced sums stay on the workers: the M-step task reads them there (maximize)
        return {"halves": halves, "roots": [roots[h] for h in halves], "iteration": it, "tag": tag,
                "n_zero_weight": int(sum(got[len(halves):]))}, results

    @staticmethod
    def zero_weights(handle) -> int:
        """Particles of the iteration whose posterior weights all underflowed (each kept its best sample)."""
        return handle["n_zero_weight"]

    def maximize(self, handle, model, ms):
        """The M-step as one ``mstep-{iteration}`` task on a worker; only the new model comes back."""
        from .tasks import mstep_task

        it, tag = handle["iteration"], handle["tag"]
        if self.publisher is not None:
            self.publisher.progress(it, "mstep")
        fut = self.client.submit(mstep_task, handle["roots"], handle["halves"], model, ms, self.device,
                                 key=f"mstep-{it}-{tag}", resources={"GPU": 1}, pure=False, retries=self.retries)
        try:
            return _outcome(fut.result, f"iteration {it}: the M-step")
        finally:
            handle["roots"] = None
            del fut

    def accuracies(self, specs, angles, ctf, sigma2, current_size, ori_size, pixel_size, seeds) -> list:
        """Each class's estimated accuracies as one ``accuracy-`` task on a worker (its device builds the padded
        references and projects them)."""
        from .tasks import accuracy_task

        self.wait_for_a_worker("accuracy estimates")
        self._calls += 1
        fut = self.client.submit(accuracy_task, specs, angles, ctf, sigma2, current_size, ori_size, pixel_size, seeds,
                                 self.device, key=f"accuracy-{self.iteration}-{self._token}{self._calls:x}",
                                 resources={"GPU": 1}, pure=False, retries=self.retries)
        try:
            return _outcome(fut.result, "the accuracy estimates")
        finally:
            del fut

    def wait_for_a_worker(self, what: str) -> None:
        """Block until the cluster has a worker (e.g. SLURM worker jobs still queued: ``scatter`` would give up
        after its timeout, and adaptive scaling reacts only to tasks)."""
        if not self.client.scheduler_info(n_workers=1)["workers"]:
            log.info("%s: waiting for a worker", what)
            self.client.wait_for_workers(1)

    def _source(self, read_images):
        """The ImageSource future the tasks read from (the store, or the ParticleSet scattered once per runner)."""
        if self.store is not None:
            return ImageSource(zarr_path=self.store.path)
        if self._read_images is None or self._read_images[0] != read_images:
            fut = self.client.scatter(ImageSource(read_images=read_images), broadcast=True, hash=False)
            self._read_images = (read_images, fut)
        return self._read_images[1]
