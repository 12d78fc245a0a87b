"""The iteration loop of 3D auto-refine and 3D classification (RELION ``MlOptimiser::iterate``).

The driver holds no large arrays beyond the current maps: each iteration it builds the E-step inputs per half set,
hands the pools to a runner (in process here; on Dask workers with :mod:`gerelion_dask.distributed`), sums the
partials per half, runs the M-step, updates the schedule and writes the iteration's files.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .config import JobConfig, local_widths
from .conventions import euler_to_matrix
from .expectation.estep import EStepModel, EStepSettings, expectation_pool
from .expectation.grid import OrientationGrid
from .expectation.partials import PoolResult
from .expectation.preprocess import PoolParticles, PreprocessSettings
from .io.readahead import ReadAhead
from .maximization.accuracy import MIN_CLASS_FRACTION, class_accuracies
from .maximization.model import Model
from .maximization.mstep import MStepSettings, ini_high_resolution, lowpass_map, maximization
from .maximization.schedule import (ScheduleState, coarse_size, hidden_variable_changes, is_converged,
                                    next_current_size, update_counters, update_sampling)
from .ops.ctf import CtfParams
from .ops.projector import ReferenceSpec
from .ops.sampling import angular_step, asymmetric_unit_directions, next_perturbation
from .ops.symmetry import direction_operators, symmetry_operators
from .errors import InputError, RunFailedError
from .progress import memory_usage
from .setup_job import (JobInputs, ParticleState, drop_non_finite, initial_sigma2, input_classes, load_inputs,
                        particle_state)

log = logging.getLogger(__name__)

__all__ = ["run_job", "JobResult", "InProcessRunner", "IterationRecord"]


@dataclass
class IterationRecord:
    iteration: int
    resolution_angst: float
    current_size: int
    healpix_order: int
    changes_orient: float
    changes_offset: float
    changes_class: float
    class_fractions: list
    ave_pmax: float
    loglik: float
    seconds: dict = field(default_factory=dict)
    fsc: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)  # progress.memory_usage() after the M-step
    n_zero_weight: int = 0  # particles whose posterior weights all underflowed (each kept its best sample)


@dataclass
class JobResult:
    output_root: str
    iterations: list
    model: Model
    state: ParticleState
    final_files: dict


class InProcessRunner:
    """Runs every E-step task in this process, in pool order (the reference the distributed runner must match)."""

    def __init__(self, device: str = "auto"):
        self.device = device

    def run(self, tasks, models: dict, settings: dict, read_images, progress=None):
        from .distributed.reduce import TreeSum
        from .distributed.tasks import device_model

        from .expectation.fine import ProjectionCache, fine_limits

        # each half set's sums, added as the pools finish in the fixed pairwise order of the Dask runner (so both give
        # bit-identical sums) and holding ~log2(pools) of them (all of them: 109 GB at 100,000 box-256 particles)
        parts: dict[int, TreeSum] = {}
        results = []
        xp = _array_module(self.device)
        budget = fine_limits(xp)["cache_bytes"]
        caches = {h: ProjectionCache(budget) for h in models}  # one iteration's projections, per half set
        dev_models = {}  # each half set's references on the device, once per call
        left = collections.Counter(pp.half for _, pp in tasks)  # a half set's cache and references go after its last
        with ReadAhead() as ahead:  # the next pool's images are read while this one computes
            for k, (rows, pp) in enumerate(tasks):
                imgs = xp.asarray(ahead.take(k, functools.partial(read_images, rows)))
                if k + 1 < len(tasks):
                    ahead.start(k + 1, functools.partial(read_images, tasks[k + 1][0]))
                m = dev_models.get(pp.half)
                if m is None:
                    m = dev_models[pp.half] = device_model(models[pp.half], xp)

                def release(h=pp.half):  # at a pool's first out-of-memory error: the other half set's holdings
                    others = {o for o in dev_models if o != h} | {o for o, c in caches.items() if o != h and c.nbytes}
                    for o in others:
                        dev_models.pop(o, None)
                        caches[o].clear()
                    return bool(others)

                part, res = expectation_pool(imgs, pp, m, settings[pp.half], cache=caches[pp.half], release=release)
                part = part.to_host()
                parts.setdefault(pp.half, TreeSum()).add(part)
                results.append(res)
                left[pp.half] -= 1
                if not left[pp.half]:
                    caches[pp.half].clear()
                    dev_models.pop(pp.half, None)
                if progress:
                    progress(k + 1, len(tasks))
        return {h: p.result() for h, p in parts.items()}, PoolResult.concat(results)

    @staticmethod
    def zero_weights(parts) -> int:
        """Particles of the iteration whose posterior weights all underflowed (each kept its best sample)."""
        return sum(int(p.n_zero_weight) for p in parts.values())

    def power_sums(self, pool_rows, optics_index, ps, read_images) -> list:
        """The :class:`~gerelion_dask.setup_job.PowerSums` of each pool, on this runner's device."""
        from .setup_job import pool_power_sums

        return pool_power_sums(read_images, pool_rows, optics_index, ps, _array_module(self.device))

    def maximize(self, parts, model, ms):
        """The M-step on this runner's device (CuPy: the summed volumes go to the GPU for the reconstruction)."""
        xp = _array_module(self.device)
        return maximization({h: p.on(xp) for h, p in parts.items()}, model, ms)

    def accuracies(self, specs, angles, ctf, sigma2, current_size, ori_size, pixel_size, seeds) -> list:
        """Each class's estimated accuracies (:func:`~gerelion_dask.maximization.accuracy.class_accuracies`) on this
        runner's device."""
        return class_accuracies(specs, angles, ctf, sigma2, current_size, ori_size, pixel_size, seeds,
                                _array_module(self.device))


def _array_module(device: str):
    if device == "cpu":
        return np
    from .backend import gpu_count

    if gpu_count() > 0:
        import cupy

        return cupy
    return np


def _pool_particles(inp: JobInputs, st: ParticleState, rows, half: int) -> PoolParticles:
    c = inp.ctf
    if c is None:
        ctf = CtfParams(np.zeros(len(rows)), np.zeros(len(rows)), np.zeros(len(rows)))
    else:
        ctf = c.take(rows)
    md = inp.particles.metadata
    prior = np.zeros((len(rows), 2))
    for j, name in enumerate(("rlnOriginXPriorAngst", "rlnOriginYPriorAngst")):
        if name in md:
            prior[:, j] = md[name].to_numpy(dtype=np.float64)[rows] / inp.pixel_size
    return PoolParticles(np.asarray(rows), inp.optics_index[rows], inp.group_index[rows], half, ctf,
                         st.offsets_px[rows], st.angles[rows], st.class_index[rows], st.norm[rows], prior)


def _pool_rows(st: ParticleState, pool_size: int) -> list:
    """``[(half, rows), ...]``: each half set's particles in pools of ``pool_size`` (the E-step's tasks)."""
    out = []
    for h in sorted(set(st.half.tolist())):
        rows = np.nonzero(st.half == h)[0]
        out.extend((int(h), rows[s : s + pool_size]) for s in range(0, len(rows), pool_size))
    return out


def _make_tasks(inp, st, pool_size):
    return [(r, _pool_particles(inp, st, r, h)) for h, r in _pool_rows(st, pool_size)]


def _initial_model(inp: JobInputs, cfg: JobConfig, sigma2, n_dir: int, halves: list) -> Model:
    N, a = inp.box, inp.pixel_size
    K = cfg.K
    maps = [np.asarray(lowpass_map(m, cfg.ini_high, a)) if cfg.ini_high > 0 else m for m in inp.reference]
    nsh = N // 2 + 1
    H = len(halves)
    res = ini_high_resolution(N, a, cfg.ini_high) if cfg.ini_high > 0 else (nsh - 1) / (N * a)
    return Model(N, a, [[m.copy() for m in maps] for _ in range(H)], np.full((H, K), 1.0 / K),
                 np.full((H, K, n_dir), 1.0 / (K * n_dir)), sigma2, np.zeros((H, K, nsh)), np.full((H, K, nsh), 999.0),
                 np.zeros((K, nsh)), np.zeros((H, K, nsh)), np.full(H, float(cfg.offset)), np.ones(H),
                 np.ones((H, len(inp.group_names))), res, loglik=np.zeros(H), tau2_fudge=cfg.tau2_fudge)


def _fsc_seed(random_seed: int, iteration: int) -> int:
    """Seed of an iteration's phase randomisation (--solvent_correct_fsc): the same run gives the same FSC."""
    return int(np.random.SeedSequence([max(random_seed, 0), iteration]).generate_state(1)[0])


def _hook(progress, name: str, *args) -> None:
    """Call ``progress.<name>(*args)`` where the progress object has it (see :mod:`gerelion_dask.progress`)."""
    f = getattr(progress, name, None)
    if f is not None:
        f(*args)


def _resolution_shell(model: Model) -> int:
    return int(round(model.current_resolution * model.ori_size * model.pixel_size))


def run_job(cfg: JobConfig, runner=None, writer=None, progress=None, resume=None) -> JobResult:
    """Run a refinement or classification to the end; ``writer(iteration, ...)`` writes the files of each iteration.

    ``resume`` (a :class:`~gerelion_dask.checkpoint.Checkpoint`) continues after its iteration; with the same
    settings and seed the result is bit-identical to a run that was never stopped (on the CPU, one BLAS thread).
    The writer receives each iteration's checkpoint (``checkpoint=``) and the sampling before iteration 1
    (``original=``).
    """
    from .checkpoint import Checkpoint

    cfg = cfg.validate()
    if resume is not None:
        seed = resume.config.random_seed
    else:
        seed = cfg.random_seed if cfg.random_seed >= 0 else int(time.time()) % 2**31
    cfg = replace(cfg, random_seed=seed)  # the resolved seed is written to optimiser.star and the checkpoint
    inp = drop_non_finite(load_inputs(cfg), check_norm=not cfg.dont_check_norm)
    runner = runner or InProcessRunner()
    from .plan import execution_target, has_global_searches, has_local_searches, plan_for_inputs, pool_for_inputs

    target = execution_target(runner)
    # the pools of global and of local searches: a local-search pool holds the fine-orientation rows of its
    # particles' own neighbourhoods (the plan's local searches), so on a GPU it may be smaller; the particle
    # store's chunks and the noise spectra's tasks take the smaller one
    pool = pool_for_inputs(cfg, inp, target)
    pool_global = pool_for_inputs(cfg, inp, target, local=False) if has_global_searches(cfg) else pool
    if cfg.pool == 0:
        log.info("--pool not given: %d particles per E-step task on %s%s", pool_global,
                 "GPUs" if target.backend == "gpu" else "CPUs",
                 f" ({pool} in local searches)" if pool != pool_global else "")
    elif pool != cfg.pool:
        log.warning("--pool %d: here --pool counts the particles of one E-step task (RELION's --pool batches "
                    "particles per CPU thread; its GUI passes 3), and GPU tasks of so few particles spend their time "
                    "in fixed costs: this run uses --pool %d", cfg.pool, pool)
    cfg = replace(cfg, pool=pool)
    if has_global_searches(cfg):  # (all of a classification's iterations, auto-refine's first ones)
        log.info("%s", plan_for_inputs(cfg, inp, runner, target=target, pool=pool_global).summary())
    if has_local_searches(cfg):
        log.info("%s", plan_for_inputs(cfg, inp, runner, target=target, pool=pool, local=True).summary())
    N, a = inp.box, inp.pixel_size
    halves = [1, 2] if cfg.split_random_halves else [0]
    sym_ops = symmetry_operators(cfg.sym)
    dir_ops = direction_operators(cfg.sym)
    if resume is None:
        st = particle_state(inp, cfg, seed)
        sched = ScheduleState(cfg.healpix_order, cfg.offset_range, cfg.offset_step)
        if cfg.auto_refine and cfg.healpix_order >= cfg.auto_local_healpix_order:
            s = 2 * angular_step(cfg.healpix_order + 1)
            sched = replace(sched, local_sigma_rot=s, local_sigma_psi=s)
        d_sigma, psi_sigma = local_widths(cfg)  # --sigma_ang, or --sigma_rot/--sigma_tilt and --sigma_psi
        if d_sigma > 0:
            sched = replace(sched, local_sigma_rot=d_sigma, local_sigma_psi=psi_sigma)
        original = sched
        dirs = asymmetric_unit_directions(sched.healpix_order, cfg.sym, cfg.limit_tilt)
        model = None  # made below, once the runner has its images (the noise spectra are summed where they are)
        records, it, final, unfil = [], 0, False, None
    else:
        _check_resume(resume, inp)
        st, sched, original, model = resume.state, resume.schedule, resume.original_schedule, resume.model
        records, it, final, unfil = list(resume.records), resume.iteration, resume.final, resume.unfil
        dirs = asymmetric_unit_directions(sched.healpix_order, cfg.sym, cfg.limit_tilt)
    if hasattr(runner, "prepare"):
        runner.prepare(inp, st, cfg)  # e.g. DaskRunner: import the images into <output folder>/particles.zarr
    if model is None:  # the initial noise spectra, pool by pool (a Dask runner sums each pool on a worker)
        sigma2 = initial_sigma2(inp, cfg, _pool_rows(st, cfg.pool), runner)  # (H, optics, shells)
        model = _initial_model(inp, cfg, sigma2, len(dirs.pix), halves)
    if writer and resume is None:
        writer(0, cfg, inp, model, st, sched, None, final=False, original=original)
    # iteration 1's changes are measured from the STAR file's poses (RELION: missing angles and offsets read as 0,
    # a missing class as 0, so every class changes)
    prev_A = euler_to_matrix(st.angles[:, 0], st.angles[:, 1], st.angles[:, 2])
    prev_off = st.offsets_px * a
    prev_cls = st.class_index.copy() if it > 0 else input_classes(inp.particles.metadata)
    max_iter = cfg.auto_iter_max if cfg.auto_refine else cfg.iter
    seed_classes = cfg.K > 1 and len(inp.reference) == cfg.K and not cfg.ref.endswith(".star")
    while it < max_iter and not final:
        it += 1
        t0 = time.time()
        _hook(progress, "iteration_started", it, model.resolution_angst())
        if hasattr(runner, "start_iteration"):
            runner.start_iteration(it)  # e.g. DaskRunner: the iteration number in its task keys
        cc_iter = cfg.firstiter_cc and it == 1
        if cfg.auto_refine and it > 1 and (is_converged(sched) or it == max_iter):
            final = True  # converged (or out of iterations): one last iteration at full size with joined halves
        shell = _resolution_shell(model)
        cur = next_current_size(N, shell, cfg.incr_size, model.fsc[0] if cfg.auto_refine else None,
                                sched.high_fsc_at_limit, model.ave_pmax, final) if it > 1 else \
            min(2 * (shell + cfg.incr_size), N)
        sched = replace(sched, current_size=cur, perturb=next_perturbation(sched.perturb, cfg.perturb,
                                                                             np.random.default_rng([seed, it])))
        # the references go to the E-step as maps (ReferenceSpec): each worker makes the transforms on its device

        # --strict_lowres_exp: RELION zeroes the E-step references' shells up to ROUND(N a / limit)
        low = int(np.floor(N * a / cfg.strict_lowres_exp + 0.5)) if cfg.strict_lowres_exp > 0 else 0

        def ref_of(hi, c, maps=model.maps, cur=cur):
            return ReferenceSpec(maps[hi][c], r_max=cur // 2, padding=cfg.pad, min_ires=low)

        # --strict_highres_exp: the window of the E-step's probabilities (RELION's image_coarse_size then), <= cur
        strict = min(max(2 * int(round(N * a / cfg.strict_highres_exp)), 2), cur) if cfg.strict_highres_exp > 0 else 0
        # accuracies per class (not in CC iterations nor the final one), then auto-sampling from the best class's
        if not cc_iter and not final and not cfg.skip_align:  # (RELION skips them without alignment too)
            on = st.half == halves[0]
            # on the runner's device (a task on a worker for Dask runners): the padded transforms of the references
            # and ~2,600 projections a class (20 of dev_class's 113 s on the H100 on the driver's NumPy)
            specs = [ref_of(0, c) if model.maps[0][c] is not None and model.pdf_class[0][c] >= MIN_CLASS_FRACTION
                     else None for c in range(cfg.K)]
            args = (specs, st.angles[on], None if inp.ctf is None else inp.ctf.take(on), model.sigma2_noise[0][0],
                    strict or cur, N, a, [[seed, it, c] for c in range(cfg.K)])  # (RELION: the strict size too)
            acc = runner.accuracies(*args) if hasattr(runner, "accuracies") else class_accuracies(*args)
            # --skip_rotate: the translations' accuracies only (RELION's imode_start = 1)
            model = replace(model, acc_rot=model.acc_rot if cfg.skip_rotate else np.array([r for r, _ in acc]),
                            acc_trans_angst=np.array([t for _, t in acc]))
        if it > 1 and not cc_iter and cfg.auto_refine and not final:
            acc_r, acc_t = model.overall_accuracy()
            old_order = sched.healpix_order
            sched = update_sampling(sched, acc_r, acc_t, a, cfg.auto_local_healpix_order)
            if sched.healpix_order != old_order:
                dirs = asymmetric_unit_directions(sched.healpix_order, cfg.sym, cfg.limit_tilt)
                K = cfg.K
                model = replace(model, pdf_direction=np.full((len(halves), K, len(dirs.pix)),
                                                             1.0 / (K * len(dirs.pix))))
        grid = OrientationGrid(sched.healpix_order, dirs.pix, angular_step(sched.healpix_order),
                               sched.offset_range_px, sched.offset_step_px,
                               0.0 if cfg.skip_rotate else sched.perturb)  # (RELION: no perturbation without rotations)
        cs = coarse_size(N, a, sched.healpix_order, inp.diameter, cur)
        if cfg.coarse_size > 0:  # --coarse_size caps it (RELION: not with --strict_highres_exp, which replaces it)
            cs = min(cs, cfg.coarse_size)
        if strict:  # --strict_highres_exp replaces the coarse size (RELION), both passes' probabilities use it
            cs = strict
        # classification seeding: random class per particle in the first non-CC iteration
        seed_iter = seed_classes and ((it == 1 and not cfg.firstiter_cc) or (it == 2 and cfg.firstiter_cc))
        if seed_classes and it == 1 and cfg.firstiter_cc:
            models_pdf = np.zeros((len(halves), cfg.K))
            models_pdf[:, 0] = 1.0
            model = replace(model, pdf_class=models_pdf)
        seeds = np.random.default_rng(seed + 7).integers(0, cfg.K, inp.particles.n) if seed_iter else None
        models, settings = {}, {}
        for hi, h in enumerate(halves):
            # each half set with its own parameters (gold standard, as RELION 3.1: maximization/model.py)
            refs = [None if m is None or model.pdf_class[hi][c] <= 0 else ref_of(hi, c)
                    for c, m in enumerate(model.maps[hi])]
            models[h] = EStepModel(refs, model.pdf_class[hi], model.pdf_direction[hi], model.sigma2_noise[hi],
                                   model.data_vs_prior[hi], float(model.sigma_offset_angst[hi]), model.scales[hi],
                                   float(model.avg_norm[hi]))
            pp = PreprocessSettings(N, a, cur, inp.diameter, cfg.maskedge, cfg.zero_mask, cfg.norm,
                                    float(model.avg_norm[hi]),
                                    cfg.ctf, cfg.ctf_intact_first_peak, cfg.ctf_phase_flipped, cfg.only_flip_phases,
                                    seed, inp.band_shells)
            settings[h] = EStepSettings(pp, grid, cs, cfg.adaptive_fraction, cfg.maxsig,
                                        do_cc=cc_iter, do_scale=cfg.scale and not cc_iter,
                                        ctf_on_reference=cfg.ctf_corrected_ref or it > 1,
                                        local_sigma_rot=sched.local_sigma_rot, local_sigma_psi=sched.local_sigma_psi,
                                        symmetry_operators=dir_ops, n_optics=len(inp.particles.optics),
                                        n_groups=len(inp.group_names),
                                        coarse_dtype=cfg.coarse_precision,
                                        fixed_poses=cfg.skip_align or cfg.skip_rotate,
                                        search_translations=cfg.skip_rotate and not cfg.skip_align,
                                        strict_size=strict if strict < cur else 0)
        tasks = _make_tasks(inp, st, cfg.pool if sched.local_sigma_rot > 0 else pool_global)
        if seeds is not None:
            tasks = [(r, replace(p, seed_class=seeds[r])) for r, p in tasks]
        t1 = time.time()
        _hook(progress, "stage", "E-step")
        try:
            parts, res = runner.run(tasks, models, settings, inp.particles.read_images, progress)
        except RunFailedError as e:
            raise RunFailedError(e.problem, _resume_hint(cfg.o, it - 1)) from None
        n_zero = runner.zero_weights(parts) if hasattr(runner, "zero_weights") else 0
        if n_zero:
            log.warning("iteration %d: %d particle(s) with all-zero weights (every posterior weight underflowed); "
                        "each keeps its best sample", it, n_zero)
        t2 = time.time()
        _hook(progress, "stage", "M-step")
        ms = MStepSettings(cfg.auto_refine, final, cc_iter, cfg.ini_high, cfg.tau2_fudge, cfg.low_resol_join_halves,
                           cfg.flatten_solvent, inp.diameter, cfg.maskedge, sym_ops, 5,
                           10 if cfg.dont_skip_gridding else 0, cfg.fix_sigma_noise, cfg.fix_sigma_offset, cfg.norm,
                           cfg.scale, reference_r_max=cur // 2, padding=cfg.pad, solvent_mask=inp.solvent_mask,
                           solvent_mask2=inp.solvent_mask2, lowpass_mask=inp.lowpass_mask, lowpass_angst=cfg.lowpass,
                           solvent_correct_fsc=cfg.solvent_correct_fsc, fsc_seed=_fsc_seed(cfg.random_seed, it))
        try:
            new_model, unfil = runner.maximize(parts, model, ms) if hasattr(runner, "maximize") \
                else maximization(parts, model, ms)
        except RunFailedError as e:
            raise RunFailedError(e.problem, _resume_hint(cfg.o, it - 1)) from None
        if seed_classes and it == 1 and cfg.firstiter_cc:
            # RELION copies class 1's map, direction prior, tau^2 and data_vs_prior (which picks the shells of the
            # scale correction in the seed iteration) to every class
            m0 = new_model.maps[0][0]
            first = {k: np.repeat(getattr(new_model, k)[:, :1], cfg.K, axis=1) for k in ("tau2", "data_vs_prior")}
            new_model = replace(new_model, maps=[[m0.copy() for _ in range(cfg.K)]],
                                pdf_class=np.full((len(halves), cfg.K), 1.0 / cfg.K),
                                pdf_direction=np.repeat(new_model.pdf_direction[:, :1], cfg.K, axis=1), **first)
        old_resolution, model = model.current_resolution, new_model
        t3 = time.time()
        st = _update_state(st, res, a)
        new_A = euler_to_matrix(st.angles[:, 0], st.angles[:, 1], st.angles[:, 2])
        changes = hidden_variable_changes(prev_A, new_A, prev_off, st.offsets_px * a, prev_cls, st.class_index, sym_ops)
        prev_A, prev_off, prev_cls = new_A, st.offsets_px * a, st.class_index.copy()
        sched = update_counters(sched, model.current_resolution, old_resolution, changes,
                                model.fsc[0] if cfg.auto_refine else None, cur)
        rec = IterationRecord(it, model.resolution_angst(), cur, sched.healpix_order, *changes,
                              model.class_fractions().tolist(), model.ave_pmax, float(model.loglik[0]),
                              {"prepare": t1 - t0, "estep": t2 - t1, "mstep": t3 - t2, "total": time.time() - t0},
                              model.fsc[0].tolist(), memory_usage(getattr(runner, "client", None)), n_zero)
        records.append(rec)
        if hasattr(runner, "end_iteration"):
            runner.end_iteration(rec, final or it >= max_iter)  # e.g. DaskRunner: the dashboard page's numbers
        _hook(progress, "iteration_finished", rec)
        log.info("iteration %d: resolution %.2f Å, size %d, order %d, changes %.2f deg %.2f Å %.3f, Pmax %.3f",
                 it, rec.resolution_angst, cur, sched.healpix_order, *changes, model.ave_pmax)
        if writer:
            ck = Checkpoint(it, cfg, model, st, sched, original, records, final, unfil if final else None)
            writer(it, cfg, inp, model, st, sched, rec, final=final, unfil=unfil, original=original, checkpoint=ck)
    files = writer("final", cfg, inp, model, st, sched, records[-1] if records else None, final=True, unfil=unfil,
                   original=original) if writer else {}
    return JobResult(cfg.o, records, model, st, files or {})


def _resume_hint(root: str, last: int) -> str:
    """What to do after a failed iteration: continue from the last complete one (its files are intact)."""
    if last < 1:
        return "no iteration is complete yet: start the run again (with --overwrite)"
    return (f"the last complete iteration is {Path(root).name}_it{last:03d}: rerun with "
            f"--continue {root}_it{last:03d}_optimiser.star")


def _check_resume(ck, inp: JobInputs) -> None:
    """The inputs found now must be the ones the checkpoint was written for."""
    n = len(ck.state.angles)
    if inp.particles.n != n:
        raise InputError(inp.particles.star_path, f"holds {inp.particles.n} usable particles but the checkpoint of "
                         f"iteration {ck.iteration} has {n}", "continue with the particles STAR file of the run")
    if inp.box != ck.model.ori_size or abs(inp.pixel_size - ck.model.pixel_size) > 1e-6 * ck.model.pixel_size:
        raise InputError(inp.particles.star_path, f"box {inp.box} px / {inp.pixel_size:.4g} Å differs from the "
                         f"checkpoint's {ck.model.ori_size} px / {ck.model.pixel_size:.4g} Å",
                         "continue with the particles STAR file of the run")


def _update_state(st: ParticleState, res: PoolResult, pixel_size: float) -> ParticleState:
    idx = res.index
    angles = st.angles.copy()
    offs = st.offsets_px.copy()
    cls = st.class_index.copy()
    norm = st.norm.copy()
    pmax, nsig, ll = st.pmax.copy(), st.n_significant.copy(), st.loglik.copy()
    angles[idx] = np.stack([res.rot, res.tilt, res.psi], 1)
    offs[idx] = np.stack([res.origin_x_angst, res.origin_y_angst], 1) / pixel_size
    cls[idx] = res.class_number - 1
    norm[idx] = res.norm
    pmax[idx], nsig[idx], ll[idx] = res.pmax, res.n_significant, res.loglik
    return replace(st, angles=angles, offsets_px=offs, class_index=cls, norm=norm, pmax=pmax, n_significant=nsig,
                   loglik=ll)


_ = Path
