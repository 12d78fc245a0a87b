"""The ``gerelion`` command: refine, classify, simulate, import, reconstruct, demo, cluster.

``refine`` and ``classify`` take ``relion_refine``'s flag names (README: flag table).  Bad input prints one line
``gerelion: error: <file>: <problem>`` and exits with code 2; existing results are never overwritten unless
``--overwrite`` is given or the run is continued (``--continue <root>_itNNN_optimiser.star``).  A run that cannot
go on (an E-step task that killed every worker that ran it) prints one line naming the iteration and pool and the
``--continue`` file of the last complete iteration, and exits with code 3.  Logging is
configured here only (the library uses module loggers).

``refine``/``classify`` run the E-step tasks on Dask: by default on a new local cluster for the job (one worker per
GPU, else one NumPy worker per core; ``--workers N``), or on a running scheduler (``--scheduler-address``,
``--scheduler-file``, e.g. the one of ``gerelion cluster start``), or without Dask (``--in-process``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .cliargs import ArgumentParser as _OneLineParser
from .cliargs import refuse_unsupported
from .config import COARSE_PRECISIONS
from .errors import InputError, RunFailedError

__all__ = ["main", "refine_parser", "add_dask_flags", "run_with_dask_flags"]

# relion_refine flags accepted for compatibility whose meaning here differs (documented in the README)
_COMPAT_VALUE = {"--j": "threads per task (ignored: one task per worker)",
                 "--memory_per_thread": "ignored (memory is planned from the GPU/host size)",
                 "--mode": "ignored (GeRelion's --mode 1 is our only mode)",
                 "--gpu": "ignored (GPUs are found automatically)",
                 "--free_gpu_memory": "ignored", "--keep_free_scratch": "ignored (no scratch copy)",
                 "--r_min_nn": "ignored (projections interpolate trilinearly, RELION's default interpolator, which "
                               "does not read it)",
                 "--failsafe_threshold": "ignored (no fail-safe mode: particles whose weights all vanish are "
                                         "counted in the log and the progress file)"}
_COMPAT_FLAG = {"--dont_combine_weights_via_disc": "always (partial sums travel in memory)",
                "--no_parallel_disc_io": "ignored", "--preread_images": "ignored (images are read per pool)",
                "--scratch_dir": "ignored", "--reuse_scratch": "ignored", "--keep_scratch": "ignored",
                "--onthefly_shifts": "ignored (shifted images are never stored here)",
                "--no_norm": "no normalisation correction (the default here; overrides --norm, as RELION)",
                "--no_scale": "no intensity-scale correction (the default here; overrides --scale, as RELION)",
                "--skip_gridding": "the default here (RELION 3.1's flag; --dont_skip_gridding does the gridding)"}
# relion_refine's speed heuristics that change which particles or samples an iteration uses: accepted so that
# RELION command lines run, with a warning that every iteration here uses all particles and the full sampling
_IGNORED_HEURISTICS = {"--fast_subsets": "subsets of the particles in the first iterations",
                       "--allow_coarser_sampling": "coarser sampling in the early iterations",
                       "--auto_ignore_angles": "finer angles only once the offsets have converged",
                       "--auto_resol_angles": "finer angles only once the resolution allows"}


def refine_parser(prog: str, classify: bool) -> argparse.ArgumentParser:
    from . import __version__

    # no abbreviations (relion_refine has none: its --tau, a STAR file, must not become --tau2_fudge)
    p = _OneLineParser(prog=prog, allow_abbrev=False, description=(
        "3D classification" if classify else "3D auto-refinement (gold-standard halves)") +
        " with relion_refine's flags. Example: see README.")
    a = p.add_argument
    a("--i", help="input particles STAR file (RELION 3.0 or 3.1)")
    a("--o", help="output root, e.g. Refine3D/job001/run (with --continue: default the run's own root)")
    a("--ref", help="initial reference map (MRC), or a STAR file of K maps")
    a("--continue", dest="continue_from", default=None, metavar="ROOT_itNNN_optimiser.star",
      help="continue a run after iteration NNN (its settings come from the checkpoint; --iter, --auto_iter_max "
      "and --pool may be changed)")
    a("--ini_high", type=float, default=0.0, help="low-pass filter the reference to this resolution (Å)")
    a("--particle_diameter", type=float, default=0.0, help="mask diameter (Å)")
    for f, h in (("--ctf", "do CTF correction"), ("--ctf_corrected_ref", "the reference is CTF-corrected"),
                 ("--ctf_intact_first_peak", "ignore CTFs until their first peak"),
                 ("--ctf_phase_flipped", "images are phase flipped"), ("--only_flip_phases", "phase flipping only"),
                 ("--firstiter_cc", "cross-correlation in iteration 1"), ("--flatten_solvent", "solvent flattening"),
                 ("--zero_mask", "zero (not noise) background"), ("--norm", "normalisation correction"),
                 ("--scale", "intensity-scale correction"), ("--auto_refine", "auto-refine"),
                 ("--split_random_halves", "gold-standard halves"),
                 ("--dont_skip_gridding", "iterative gridding in the reconstruction"),
                 ("--fix_sigma_noise", "keep the noise spectra"), ("--fix_sigma_offset", "keep sigma_offset"),
                 ("--overwrite", "replace the results of an earlier run under --o"),
                 ("--skip_align", "classification without alignment: every particle keeps the angles and offsets "
                  "of its STAR row, only its class is sampled"),
                 ("--skip_rotate", "classification with translational searches only: every particle keeps the angles "
                  "of its STAR row; its class and offset are sampled"),
                 ("--dont_check_norm", "no warning about particle images whose background is not normalised to "
                  "mean 0 and standard deviation 1"),
                 ("--trust_ref_size", "use a reference whose header voxel size differs from the particles' (a "
                  "warning instead of an error; the box must still match)"),
                 ("--solvent_correct_fsc", "auto-refine: the gold-standard FSC of the half maps masked by "
                  "--solvent_mask, corrected by phase randomisation (as relion_postprocess)")):
        a(f, action="store_true", help=h)
    a("--strict_lowres_exp", type=float, default=-1.0,
      help="Å: the E-step's references carry no frequencies up to this resolution (RELION's high-pass)")
    a("--coarse_size", type=int, default=-1, help="pixels: the most the coarse pass's image size may be")
    a("--limit_tilt", type=float, default=-91.0,
      help="degrees: positive keeps side views (|tilt| >= it), negative top views (|tilt| <= |it|); default: all")
    a("--ref_angpix", type=float, default=-1.0,
      help="voxel size (Å) of the reference instead of its header's (it must still match the particles')")
    a("--version", action="version", version=f"gerelion {__version__}")
    a("--print_symmetry_ops", action="store_true", help="print the --sym group's operator matrices and exit")
    a("--verb", type=int, default=1, help="0: warnings and errors only; 1 (default): progress too")
    a("--healpix_order", type=int, default=2)
    a("--oversampling", type=int, default=1)
    a("--offset_range", type=float, default=6.0, help="pixels")
    a("--offset_step", type=float, default=2.0, help="pixels")
    a("--sym", default="C1")
    a("--K", type=int, default=1)
    a("--iter", type=int, default=25)
    a("--tau2_fudge", type=float, default=1.0)
    a("--low_resol_join_halves", type=float, default=0.0)
    a("--auto_local_healpix_order", type=int, default=4)
    a("--random_seed", type=int, default=-1)
    a("--pad", type=float, default=2.0)
    a("--adaptive_fraction", type=float, default=0.999)
    a("--maxsig", type=int, default=-1)
    a("--coarse_precision", choices=COARSE_PRECISIONS, default="auto",
      help="the coarse pass's products, which pick the significant samples (auto: float64 on a CPU and on GPUs "
           "with fast double precision such as the H100 or A100, float32 on other GPUs; float64 follows the CPU run)")
    a("--offset", type=float, default=10.0, help="sigma of the offset prior (Å)")
    a("--perturb", type=float, default=0.5)
    a("--incr_size", type=int, default=10)
    a("--maskedge", type=float, default=5.0)
    a("--strict_highres_exp", type=float, default=-1.0, metavar="ANGSTROM",
      help="compute the E-step's probabilities from frequencies up to this resolution only (both passes; the "
           "reconstruction still uses the current size), as RELION's 'Limit resolution E-step to'; <= 0: off")
    a("--solvent_mask", default="", metavar="MAP",
      help="with --flatten_solvent: multiply the references by this map (values 0..1, the particles' box and pixel "
           "size) instead of the soft sphere of --particle_diameter")
    a("--solvent_mask2", default="", metavar="MAP",
      help="with --flatten_solvent: after the solvent mask, set the region of this map (values 0..1, 1: the region) "
           "to its own average density, e.g. a detergent micelle or a virus's interior (RELION's secondary mask)")
    a("--lowpass_mask", default="", metavar="MAP",
      help="with --flatten_solvent: add this map's region of each reference (values 0..1), low-pass filtered at "
           "--lowpass, to the solvent-masked reference (RELION's low-pass mask, e.g. a flexible domain)")
    a("--lowpass", type=float, default=0.0, metavar="ANGSTROM", help="resolution of --lowpass_mask's filter")
    a("--sigma_ang", type=float, default=0.0)
    for f, h in (("--sigma_rot", "directions' local-search width with --sigma_tilt (the larger is used, as RELION)"),
                 ("--sigma_tilt", "see --sigma_rot"), ("--sigma_psi", "psi's local-search width (default: every psi)")):
        a(f, type=float, default=-1.0, help=h + "; --sigma_ang overrides all three")
    a("--auto_iter_max", type=int, default=999)
    a("--pool", type=int, default=0, help="particles per E-step task (default: 64 on CPUs, 4000 on GPUs, fewer for "
      "several GPUs, a small GPU, large boxes or local searches at large boxes (gerelion plan prints it); at least "
      "128 on GPUs: RELION's --pool, "
      "particles per CPU thread, is 3 in its GUI)")
    a("--device", choices=["auto", "cpu", "gpu"], default="auto", help="array backend (auto: GPU when present)")
    a("--pipeline_control", default="", metavar="JOB_FOLDER",
      help="RELION's pipeline control: RELION_JOB_EXIT_SUCCESS / _FAILURE / _ABORTED in this folder at the end; a "
           "RELION_JOB_ABORT_NOW file there stops the job before its next iteration")
    add_dask_flags(p)
    for f, h in _COMPAT_VALUE.items():  # --gpu may come without a value (RELION: all GPUs)
        a(f, default=None, help=h, **({"nargs": "?", "const": ""} if f == "--gpu" else {}))
    for f, h in _COMPAT_FLAG.items():
        a(f, action="store_true", help=h)
    for f, h in _IGNORED_HEURISTICS.items():
        a(f, action="store_true", help=f"ignored with a warning (RELION: {h}; here every iteration uses all "
          "particles and the full sampling)")
    return p


def add_dask_flags(p: argparse.ArgumentParser, default_workers: int | None = None) -> None:
    """Where the E-step tasks run: an existing scheduler, a new local cluster (the default), or in this process."""
    g = p.add_argument_group("execution (Dask)")
    g.add_argument("--scheduler-address", default=None, help="join a running Dask scheduler, e.g. tcp://host:8786")
    g.add_argument("--scheduler-file", default=None,
                   help="join the scheduler named in this file (e.g. the one `gerelion cluster start` wrote)")
    g.add_argument("--workers", type=int, default=default_workers,
                   help="workers of a new local cluster (default: " +
                   (f"{default_workers}" if default_workers else "one per GPU, else one per CPU core") + ")")
    g.add_argument("--dashboard-address", default="127.0.0.1:8787", help="dashboard of a new local cluster "
                   "('' for none)")
    g.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds to wait for the scheduler named by --scheduler-address/--scheduler-file")
    g.add_argument("--in-process", action="store_true", help="no Dask: run every task in this process (debugging)")
    from .distributed.slurm import add_slurm_flags

    add_slurm_flags(p)


def run_with_dask_flags(ns, cfg, writer, device: str = "auto", resume=None, progress=None):
    """``run_job`` on the runner the execution flags ask for; a local cluster started here is closed at the end.

    ``progress``: passed to ``run_job`` (e.g. :class:`gerelion_dask.progress.ProgressBar`)."""
    from .driver import InProcessRunner, run_job

    joining = ns.scheduler_address or ns.scheduler_file
    if ns.in_process and joining:
        raise InputError(None, "--in-process runs without Dask: leave out --scheduler-address/--scheduler-file")
    if ns.workers is not None and ns.workers < 1:
        raise InputError(None, f"--workers {ns.workers} must be at least 1")
    slurm = getattr(ns, "cluster", "local") == "slurm"
    if slurm and (ns.in_process or joining):
        raise InputError(None, "--cluster slurm starts its own scheduler: leave out --in-process, "
                         "--scheduler-address and --scheduler-file")
    if ns.in_process:
        return run_job(cfg, runner=InProcessRunner(device), writer=writer, resume=resume, progress=progress)
    from .distributed.cluster import close_client, make_client
    from .distributed.slurm import options_from_namespace
    from .distributed.runner import DaskRunner

    import distributed  # noqa: F401  (its import sets its loggers to INFO: quiet them after it)

    logging.getLogger("distributed").setLevel(logging.WARNING)
    client, cluster = make_client(ns.scheduler_address, ns.scheduler_file,
                                  n_workers=None if joining else ns.workers,
                                  dashboard_address=ns.dashboard_address or None, timeout=ns.connect_timeout,
                                  gpus=device != "cpu", slurm=options_from_namespace(ns) if slurm else None)
    try:
        logging.getLogger(__name__).info("Dask: %d workers; dashboard %s",
                                         len(client.scheduler_info(n_workers=-1)["workers"]), client.dashboard_link)
        return run_job(cfg, runner=DaskRunner(client, device=device), writer=writer, resume=resume,
                       progress=progress)
    finally:
        close_client(client, cluster)


def _job_config(ns, classify: bool):
    from .config import JobConfig

    fields = set(JobConfig.__dataclass_fields__)
    kw = {k: v for k, v in vars(ns).items() if k in fields}
    if ns.no_norm:  # RELION: --no_norm and --no_scale switch the corrections off whatever --norm / --scale say
        kw["norm"] = False
    if ns.no_scale:
        kw["scale"] = False
    if not classify:
        kw["auto_refine"] = True
        kw["split_random_halves"] = True
    return JobConfig(**kw)


def _check_output(cfg, continuing: bool = False) -> None:
    """The output folder must be writable and hold no earlier run under this root (unless continuing it)."""
    root = Path(cfg.o)
    folder = root.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".gerelion_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InputError(folder, f"output folder cannot be created or written ({e.strerror})",
                         "choose an --o in a folder you can write") from None
    existing = sorted(folder.glob(root.name + "_it*_data.star")) + sorted(folder.glob(root.name + "_data.star"))
    if existing and not cfg.overwrite and not continuing:
        raise InputError(existing[0], "an earlier run's results are there",
                         "use another --o, --continue <root>_itNNN_optimiser.star, or --overwrite")
    if cfg.overwrite and not continuing:
        pj = folder / (root.name + "_progress.jsonl")
        if pj.exists():
            pj.unlink()


# settings that may change on --continue (as relion_refine); the others come from the checkpoint
_CONTINUE_OVERRIDES = ("iter", "auto_iter_max", "pool")


def _given_flags(argv) -> set:
    return {t[2:].split("=", 1)[0].replace("-", "_") for t in argv if t.startswith("--")}


def _continue_config(ns, argv, classify: bool):
    """The job settings and checkpoint of ``--continue``; the output root defaults to the run's own."""
    import re
    from dataclasses import fields, replace

    from .checkpoint import checkpoint_for_optimiser
    from .config import JobConfig

    opt = Path(ns.continue_from)
    m = re.fullmatch(r"(.*)_it(\d{3,})_optimiser\.star", str(opt))
    if m is None:
        raise InputError(opt, "--continue takes a <root>_itNNN_optimiser.star file",
                         "pass the optimiser STAR of the last complete iteration")
    _, ck = checkpoint_for_optimiser(opt)
    if ck.config.auto_refine == classify:
        kind = "an auto-refine" if ck.config.auto_refine else "a classification"
        raise InputError(opt, f"is {kind} run", f"continue it with gerelion {'refine' if classify else 'classify'}")
    given = _given_flags(argv)
    ignored = sorted(f.name for f in fields(JobConfig)
                     if f.name in given and f.name not in _CONTINUE_OVERRIDES + ("o", "overwrite"))
    if ignored:
        logging.getLogger(__name__).warning("--continue: the run's own settings are kept; ignored: %s",
                                            " ".join("--" + f for f in ignored))
    over = {k: getattr(ns, k) for k in _CONTINUE_OVERRIDES if k in given}
    cfg = replace(ck.config, o=ns.o or m.group(1), overwrite=ns.overwrite, **over).validate()
    same_root = Path(cfg.o).resolve() == Path(m.group(1)).resolve()
    return cfg, ck, same_root


def print_symmetry_ops(sym: str) -> str:
    """RELION's ``--print_symmetry_ops`` text: the group's name, count and operator matrices (identity first)."""
    from .ops.symmetry import symmetry_operators

    ops = symmetry_operators(sym)
    lines = [f" ++++ Using symmetry group {sym}, with the following {len(ops)} transformation matrices:"]
    for i, R in enumerate(ops, 1):
        lines.append(f" R({i})= ")
        lines += ["".join(f"{v:14.6g}" for v in row) for row in R + 0.0]  # (+ 0.0: no -0)
    return "\n".join(lines)


def cmd_refine(argv, classify: bool) -> int:
    prog = "gerelion classify" if classify else "gerelion refine"
    refuse_unsupported(argv, prog)
    ns = refine_parser(prog, classify).parse_args(argv)
    if ns.print_symmetry_ops:  # as relion_refine: print the --sym group's operators and exit
        print(print_symmetry_ops(ns.sym))
        return 0
    if not ns.pipeline_control:
        return _refine(ns, argv, classify, None)
    from . import pipeline_control as pc

    pc.clear(ns.pipeline_control)
    try:
        rc = _refine(ns, argv, classify, ns.pipeline_control)
    except pc.JobAborted as e:
        pc.mark(ns.pipeline_control, pc.EXIT_ABORTED)
        print(f"gerelion: aborted: {e}", file=sys.stderr)
        return 130
    except BaseException:
        pc.mark(ns.pipeline_control, pc.EXIT_FAILURE)
        raise
    pc.mark(ns.pipeline_control, pc.EXIT_SUCCESS if rc == 0 else pc.EXIT_FAILURE)
    return rc


def _refine(ns, argv, classify: bool, pipeline_control) -> int:
    from .job_files import restart_progress

    resume = None
    if ns.continue_from:
        cfg, resume, same_root = _continue_config(ns, argv, classify)
        _check_output(cfg, continuing=same_root)
        restart_progress(cfg.o, resume.records)
    else:
        missing = [f"--{k}" for k in ("i", "o", "ref") if not getattr(ns, k)]
        if missing:
            raise InputError(None, f"{' and '.join(missing)} missing",
                             "give --i, --o and --ref, or --continue <root>_itNNN_optimiser.star")
        cfg = _job_config(ns, classify).validate()
        _check_output(cfg)
    root_level = logging.getLogger().level
    if ns.verb <= 0:  # RELION's --verb 0: no progress output; warnings and errors still print
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return _run_refine(ns, cfg, resume, pipeline_control)
    finally:
        logging.getLogger().setLevel(root_level)


def _run_refine(ns, cfg, resume, pipeline_control) -> int:
    from .job_files import make_writer
    from .progress import ProgressBar

    for f, h in _IGNORED_HEURISTICS.items():
        if getattr(ns, f[2:]):
            logging.getLogger(__name__).warning("%s ignored (RELION: %s); every iteration here uses all particles "
                                                "and the full sampling", f, h)
    progress = ProgressBar() if ns.verb > 0 else None  # draws only on a terminal
    if pipeline_control:
        from .pipeline_control import AbortWatch

        progress = AbortWatch(pipeline_control, progress)
    res = run_with_dask_flags(ns, cfg, make_writer(cfg.o), ns.device if ns.device != "gpu" else "auto", resume,
                              progress=progress)
    last = res.iterations[-1] if res.iterations else None
    if last and ns.verb > 0:
        print(f"done: {len(res.iterations)} iterations, resolution {last.resolution_angst:.2f} Å; "
              f"files under {Path(cfg.o).parent}")
    return 0


def cmd_reconstruct(argv) -> int:
    p = _OneLineParser(prog="gerelion reconstruct", description="reconstruct a map from particles at "
                                "their poses (like relion_reconstruct)")
    p.add_argument("--i", required=True)
    p.add_argument("--o", required=True)
    p.add_argument("--ctf", action="store_true")
    p.add_argument("--sym", default="C1")
    p.add_argument("--subset", type=int, default=0)
    p.add_argument("--class", dest="class_number", type=int, default=0)
    p.add_argument("--pad", type=float, default=2.0)
    p.add_argument("--skip_gridding", action="store_true")
    ns = p.parse_args(argv)
    from .io.mrc import write_map
    from .reconstruct_job import reconstruct_star

    vol, apix = reconstruct_star(ns.i, ctf=ns.ctf, sym=ns.sym, subset=ns.subset, class_number=ns.class_number,
                                 gridding_iterations=0 if ns.skip_gridding else 10, pad=ns.pad)
    write_map(ns.o, vol, apix)
    print(ns.o)
    return 0


def cmd_import(argv) -> int:
    p = _OneLineParser(prog="gerelion import", description="copy a STAR + MRCS data set into particles.zarr")
    p.add_argument("--i", required=True)
    p.add_argument("--o", required=True, help="output folder")
    p.add_argument("--pool", type=int, default=256)
    p.add_argument("--compress", choices=("none", "blosc", "zstd"), default="none",
                   help="none (default: fastest to read; float32 particles compress ~1.1x) or blosc (half the disk "
                        "for stacks that were float16) or zstd")
    p.add_argument("--overwrite", action="store_true")
    ns = p.parse_args(argv)
    from .io.particles import ParticleSet
    from .io.zarr_store import import_particles

    out = import_particles(ParticleSet.from_star(ns.i), ns.o, pool_size=ns.pool, compressor=ns.compress,
                           overwrite=ns.overwrite)
    print(out)
    return 0


def _cmd_plan(argv) -> int:
    from .plan import plan_main

    return plan_main(argv)


def _cmd_report(argv) -> int:
    from .report import report_main

    return report_main(argv)


def _cmd_cluster(argv) -> int:
    from .distributed.cluster import cluster_main

    return cluster_main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = {"refine": lambda a: cmd_refine(a, False), "classify": lambda a: cmd_refine(a, True),
            "reconstruct": cmd_reconstruct, "import": cmd_import, "cluster": _cmd_cluster,
            "plan": _cmd_plan, "report": _cmd_report}
    if argv and argv[0] == "--version":
        from . import __version__

        print(f"gerelion {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in cmds | {"simulate": 0, "demo": 0}:
        print("usage: gerelion {refine,classify,simulate,import,reconstruct,demo,cluster,plan,report} ...  "
              "(each takes --help)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "simulate":
            from .simulate_cli import simulate_main

            return simulate_main(rest)
        if cmd == "demo":
            from .demo import demo_main

            return demo_main(rest)
        rc = cmds[cmd](rest)
        sys.stdout.flush()  # inside the try: a reader gone before our last lines is a BrokenPipeError here
        return rc
    except InputError as e:
        print(f"gerelion: error: {e}", file=sys.stderr)
        return 2
    except RunFailedError as e:
        print(f"gerelion: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("gerelion: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # whoever read our output went away (``gerelion plan ... | head``): no traceback; stdout goes to /dev/null so
        # that the interpreter's own flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
