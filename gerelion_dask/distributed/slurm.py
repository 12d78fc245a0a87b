"""Workers as SLURM jobs (``gerelion refine ... --cluster slurm``), through ``dask_jobqueue.SLURMCluster``.

The scheduler runs in the driver process (on a login node, or inside an sbatch job: ``deploy/slurm/``); each worker
is a process in a SLURM job, started with ``--resources GPU=1`` because every E-step task asks for one such slot
(``DaskRunner``).  On GPU nodes the job requests its GPU through the site's directive (``--gres=gpu:1`` or
``--gpus=1``, :attr:`SlurmOptions.gpu_directive`) and runs dask-cuda's worker (``python -m dask_cuda.cli``: one
worker per visible GPU, so one per job); elsewhere it runs distributed's worker with NumPy.

Settings come, in this order of precedence, from the flags (:class:`SlurmOptions`), a YAML file
(``--slurm-config``, merged into Dask's configuration: the ``jobqueue.slurm`` keys of dask-jobqueue, e.g.
``deploy/slurm/jobqueue-gpu.yaml``), Dask's own configuration (``~/.config/dask/jobqueue.yaml``, ``DASK_CONFIG``,
``DASK_JOBQUEUE__SLURM__*`` variables), then the defaults here (1 core, 4 GB per job; dask-jobqueue's 30 min wall time).  A GPU job runs one worker
process with the job's cores as threads; a CPU job runs one single-threaded NumPy worker per core.

Scaling is adaptive (``cluster.adapt(minimum_jobs, maximum_jobs)``): jobs are submitted while E-step tasks wait and
cancelled when their workers sit idle.  At least one job stays while a run lasts, because each iteration first
scatters the references to the workers and only then submits its tasks (with no worker nothing would ask for one).
The job script exports one BLAS thread and the glibc malloc limits of :data:`.cluster.WORKER_ENV` before the worker
starts, as the local clusters' nannies do (same results as a local run).  The job script is logged when the cluster starts
(``print(cluster.job_script())`` is dask-jobqueue's first debugging step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

__all__ = ["SlurmOptions", "new_slurm_cluster"]

log = logging.getLogger(__name__)

DEFAULTS = {"cores": 1, "memory": "4GB", "name": "gerelion-worker"}


@dataclass
class SlurmOptions:
    """What ``--cluster slurm`` submits; None takes the value from Dask's ``jobqueue.slurm`` configuration."""

    min_jobs: int = 1
    max_jobs: int = 4
    queue: str | None = None  # -p
    account: str | None = None  # -A
    walltime: str | None = None  # -t, HH:MM:SS
    cores: int | None = None  # --cpus-per-task: threads of the worker
    memory: str | None = None  # --mem and the worker's memory limit
    gpus: bool = False  # GPU workers: dask-cuda's worker and gpu_directive in the job script
    gpu_directive: str = "--gres=gpu:1"  # the site's way to ask for one GPU (e.g. --gpus=1, --gres=gpu:a100:1)
    interface: str | None = None  # network interface the workers reach the scheduler through (ib0, eth0, lo)
    log_directory: str | None = None
    local_directory: str | None = None  # node-local scratch
    config_file: str | None = None  # a YAML of Dask configuration (jobqueue.slurm.* keys) merged in first
    extra_directives: list = field(default_factory=list)  # more #SBATCH lines, e.g. ["--qos=short"]
    prologue: list = field(default_factory=list)  # shell lines before the worker starts (module load ...)

    def validate(self) -> "SlurmOptions":
        if self.min_jobs < 1:
            raise InputError(None, f"--slurm-min-jobs {self.min_jobs} must be at least 1",
                             "a run scatters each iteration's references before its tasks exist, so one job stays")
        if self.max_jobs < self.min_jobs:
            raise InputError(None, f"--slurm-max-jobs {self.max_jobs} is below --slurm-min-jobs {self.min_jobs}")
        if self.config_file is not None and not Path(self.config_file).is_file():
            raise InputError(self.config_file, "SLURM configuration file not found")
        return self


def load_config_file(path) -> None:
    """Merge a YAML file of Dask configuration into ``dask.config`` (its values win over the files found before)."""
    import dask
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(path, f"not a readable YAML file ({e})") from None
    if not isinstance(data, dict):
        raise InputError(path, "must hold a mapping, e.g. 'jobqueue: {slurm: {...}}'")
    dask.config.update(dask.config.config, data, priority="new")


def _worker_env_lines() -> list:
    from .cluster import WORKER_ENV

    return [f"export {k}={v}" for k, v in WORKER_ENV.items()]


def slurm_cluster_kwargs(opts: SlurmOptions, dashboard_address: str | None) -> dict:
    """Keyword arguments of ``SLURMCluster`` for ``opts`` on top of Dask's ``jobqueue.slurm`` configuration."""
    import dask

    conf = dask.config.get("jobqueue.slurm", {})
    kw: dict = {}
    for key, value in (("cores", opts.cores), ("memory", opts.memory), ("walltime", opts.walltime),
                       ("queue", opts.queue), ("account", opts.account), ("interface", opts.interface),
                       ("log_directory", opts.log_directory), ("local_directory", opts.local_directory)):
        if value is not None:
            kw[key] = value
        elif key in DEFAULTS and conf.get(key.replace("_", "-")) is None:
            kw[key] = DEFAULTS[key]
    if conf.get("name") in (None, "dask-worker"):
        kw["job_name"] = DEFAULTS["name"]
    # GPU jobs: one worker process (its GPU, all the job's cores as threads); CPU jobs: one single-threaded NumPy
    # worker process per core, as the local clusters (each E-step task takes a worker's one GPU=1 slot)
    kw["processes"] = 1 if opts.gpus else int(kw.get("cores") or conf.get("cores") or 1)
    extra_args = list(conf.get("worker-extra-args") or [])
    if "--resources" not in extra_args:  # every E-step task asks for a GPU=1 slot
        extra_args += ["--resources", "GPU=1"]
    kw["worker_extra_args"] = extra_args
    directives = list(conf.get("job-extra-directives") or []) + list(opts.extra_directives)
    prologue = list(conf.get("job-script-prologue") or []) + list(opts.prologue) + _worker_env_lines()
    if opts.gpus:
        kw["worker_command"] = "dask_cuda.cli"  # not "dask_cuda.cli worker": its __main__ is the worker command
        if opts.gpu_directive and opts.gpu_directive not in directives:
            directives.append(opts.gpu_directive)
    kw["job_extra_directives"] = directives
    kw["job_script_prologue"] = prologue
    sched = dict(conf.get("scheduler-options") or {})
    if dashboard_address is not None:
        sched["dashboard_address"] = dashboard_address
    else:
        sched.setdefault("dashboard_address", ":0")
    kw["scheduler_options"] = sched
    return kw


def new_slurm_cluster(opts: SlurmOptions, dashboard_address: str | None = "127.0.0.1:8787", adapt: bool = True):
    """A ``SLURMCluster`` (scheduler in this process) scaling between ``opts.min_jobs`` and ``opts.max_jobs``."""
    import dask

    opts.validate()
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise InputError(None, "--cluster slurm needs dask-jobqueue", "pip install dask-jobqueue") from None
    if opts.config_file:
        load_config_file(opts.config_file)
    kw = slurm_cluster_kwargs(opts, dashboard_address)
    log_dir = kw.get("log_directory") or dask.config.get("jobqueue.slurm.log-directory", None)
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    try:
        from .. import dashboard

        dashboard.register()  # our page on this scheduler's dashboard (before the scheduler starts)
    except ImportError:
        pass
    cluster = SLURMCluster(**kw)
    log.info("SLURM workers: %d-%d job(s); job script:\n%s", opts.min_jobs, opts.max_jobs, cluster.job_script())
    if adapt:
        cluster.adapt(minimum_jobs=opts.min_jobs, maximum_jobs=opts.max_jobs)
    return cluster


def options_from_namespace(ns) -> SlurmOptions:
    """:class:`SlurmOptions` from the ``--slurm-*`` flags of :func:`gerelion_dask.cli.add_dask_flags`."""
    return SlurmOptions(min_jobs=ns.slurm_min_jobs, max_jobs=ns.slurm_max_jobs, queue=ns.slurm_queue,
                        account=ns.slurm_account, walltime=ns.slurm_walltime, cores=ns.slurm_cores,
                        memory=ns.slurm_memory, gpus=ns.slurm_gpus, gpu_directive=ns.slurm_gpu_directive,
                        interface=ns.slurm_interface, log_directory=ns.slurm_log_directory,
                        config_file=ns.slurm_config, extra_directives=list(ns.slurm_directive or []))



def add_slurm_flags(p) -> None:
    """``--cluster {local,slurm}`` and the ``--slurm-*`` flags of ``gerelion refine/classify``."""
    p.add_argument("--cluster", choices=["local", "slurm"], default="local",
                   help="where a new cluster's workers run: this machine (default), or SLURM jobs (dask-jobqueue; "
                   "the scheduler runs in this process, see deploy/slurm/)")
    g = p.add_argument_group("SLURM workers (--cluster slurm; unset values come from Dask's jobqueue.slurm config)")
    a = g.add_argument
    a("--slurm-min-jobs", type=int, default=1, help="adaptive scaling: jobs kept while the run lasts (>= 1)")
    a("--slurm-max-jobs", type=int, default=4, help="adaptive scaling: at most this many worker jobs")
    a("--slurm-queue", default=None, help="partition (#SBATCH -p)")
    a("--slurm-account", default=None, help="account (#SBATCH -A)")
    a("--slurm-walltime", default=None, help="time limit per worker job, HH:MM:SS (dask-jobqueue's default 00:30:00)")
    a("--slurm-cores", type=int, default=None,
      help="CPU cores per worker job (default 1; CPU jobs run one worker per core)")
    a("--slurm-memory", default=None, help="memory per worker job, e.g. 16GB (default 4GB)")
    a("--slurm-gpus", action="store_true", help="GPU workers: one GPU per job (--slurm-gpu-directive), dask-cuda")
    a("--slurm-gpu-directive", default="--gres=gpu:1",
      help="how this site asks for one GPU (default --gres=gpu:1; e.g. --gpus=1, --gres=gpu:a100:1)")
    a("--slurm-directive", action="append", default=None, metavar="DIRECTIVE",
      help="an extra #SBATCH directive, e.g. --qos=short (repeatable)")
    a("--slurm-interface", default=None, help="network interface the workers reach the scheduler on (ib0, eth0)")
    a("--slurm-log-directory", default=None, help="folder for the worker jobs' stdout/stderr")
    a("--slurm-config", default=None, metavar="YAML",
      help="Dask configuration file with jobqueue.slurm settings (e.g. deploy/slurm/jobqueue-gpu.yaml)")
