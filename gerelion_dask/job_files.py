"""Writing a job's files each iteration: RELION's names and columns, plus a JSON progress line.

``make_writer(root)`` returns the callback that :func:`gerelion_dask.driver.run_job` calls after each iteration
(``it000`` describes the starting state; ``"final"`` writes ``run_data.star``, ``run_model.star``,
``run_class001.mrc`` and, in auto-refine, ``run_half1/2_class001_unfil.mrc``).  Within an iteration the
checkpoint (``run_itNNN_checkpoint.npz``, :mod:`gerelion_dask.checkpoint`) and then ``run_itNNN_optimiser.star``
come last, so an optimiser STAR on disc always belongs to a complete iteration (``--continue`` starts from it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from .checkpoint import CHECKPOINT_LABEL, checkpoint_path, save_checkpoint
from .io._atomic import atomic_path
from .io.mrc import write_map
from .outputs import output_names, write_data_star, write_model_star, write_optimiser_star, write_sampling_star

__all__ = ["make_writer", "particles_table", "restart_progress"]


def _image_names_for(md, star_path, out_dir):
    """``rlnImageName`` values that still find their stacks from a STAR file written in ``out_dir``.

    Names that resolve from the current directory (RELION's project-directory convention) or are absolute stay as
    they are; names relative to the input STAR file's folder are rewritten relative to ``out_dir``.
    """
    from .io.particles import _resolve_stack, parse_image_names

    idx, stacks = parse_image_names(md["rlnImageName"].to_numpy())
    new = {}
    for s in set(stacks.tolist()):
        p = Path(s)
        if p.is_absolute() or (Path.cwd() / p).is_file():
            new[s] = s
            continue
        resolved = _resolve_stack(s, Path(star_path))
        new[s] = os.path.relpath(resolved, Path(out_dir).resolve()) if resolved is not None else s
    return [f"{i + 1:06d}@{new[s]}" for i, s in zip(idx, stacks, strict=True)]


def particles_table(inp, st, auto_refine: bool, out_dir=None):
    """The particles table with this iteration's poses and statistics (RELION 3.1 columns, offsets in Å)."""
    md = inp.particles.metadata.copy()
    if out_dir is not None and "rlnImageName" in md:
        md["rlnImageName"] = _image_names_for(md, inp.particles.star_path, out_dir)
    a = inp.pixel_size
    md["rlnAngleRot"], md["rlnAngleTilt"], md["rlnAnglePsi"] = st.angles[:, 0], st.angles[:, 1], st.angles[:, 2]
    md["rlnOriginXAngst"] = st.offsets_px[:, 0] * a
    md["rlnOriginYAngst"] = st.offsets_px[:, 1] * a
    md["rlnClassNumber"] = st.class_index + 1
    md["rlnNormCorrection"] = st.norm
    md["rlnLogLikeliContribution"] = st.loglik
    md["rlnMaxValueProbDistribution"] = st.pmax
    md["rlnNrOfSignificantSamples"] = st.n_significant
    if auto_refine:
        md["rlnRandomSubset"] = st.half
    md["rlnGroupNumber"] = inp.group_index + 1
    return md


def make_writer(root: str, plots: bool = True):
    """The per-iteration writer of a job under ``root``; ``plots``: PNG plots per iteration (:mod:`.plots`)."""
    root = str(root)
    Path(root).parent.mkdir(parents=True, exist_ok=True)

    def write(iteration, cfg, inp, model, st, sched, rec, final=False, unfil=None, original=None, checkpoint=None):
        original = sched if original is None else original
        it = None if iteration == "final" else int(iteration)
        halves = cfg.split_random_halves and not (it is None and cfg.auto_refine)
        names = output_names(root, it, halves=halves, n_classes=cfg.K)
        if it is None and cfg.auto_refine:
            names["model"] = [f"{root}_model.star"]
            names["classes"] = [[f"{root}_class{c:03d}.mrc" for c in range(1, cfg.K + 1)]]
        write_data_star(names["data"], inp.particles.optics,
                        particles_table(inp, st, cfg.auto_refine, Path(names["data"]).parent))
        for hi, mnames in enumerate(names["classes"]):
            for c, path in enumerate(mnames):
                vol = model.maps[min(hi, model.n_halves - 1)][c]
                write_map(path, np.zeros((model.ori_size,) * 3, np.float32) if vol is None else vol, model.pixel_size)
        prior_mode = 1 if sched.local_sigma_rot > 0 else 0
        for hi, mpath in enumerate(names["model"]):
            ref_names = names["classes"][min(hi, len(names["classes"]) - 1)]
            # a half's model.star counts its own particles (RELION's nr_particles_per_group), the joined one all
            own = st.half == hi + 1 if len(names["model"]) == 2 else np.ones(len(st.half), bool)
            counts = np.bincount(inp.group_index[own], minlength=len(inp.group_names))
            write_model_star(mpath, model, min(hi, model.n_halves - 1), cfg, n_groups_names=inp.group_names,
                             group_counts=counts, ref_image_names=ref_names, iteration=it or 0,
                             orientational_prior_mode=prior_mode, sigma_prior_rot=sched.local_sigma_rot,
                             sigma_prior_psi=sched.local_sigma_psi, current_size=sched.current_size or None)
        write_sampling_star(names["sampling"], schedule=sched, symmetry=cfg.sym, pixel_size=inp.pixel_size,
                            perturb_factor=cfg.perturb, original=original, limit_tilt=cfg.limit_tilt)
        extra = None
        if checkpoint is not None:  # before the optimiser STAR that names it: that file marks a complete iteration
            ck = save_checkpoint(checkpoint_path(root, it), checkpoint)
            extra = {CHECKPOINT_LABEL: ck.name}
        acc_r, acc_t = model.overall_accuracy()
        write_optimiser_star(names["optimiser"], config=cfg, schedule=sched, iteration=it if it is not None else
                             (rec.iteration if rec else 0), output_root=root, model_star=names["model"][0],
                             model_star2=names["model"][1] if len(names["model"]) > 1 else None,
                             data_star=names["data"], sampling_star=names["sampling"],
                             acc_rot=acc_r, acc_trans_angst=acc_t,
                             has_converged=bool(final), particle_diameter=inp.diameter, extra=extra)
        files = {"data": names["data"], "model": names["model"], "maps": names["classes"]}
        if it is None and unfil is not None:
            files["unfil"] = []
            for h, maps in enumerate(unfil):
                p = f"{root}_half{h + 1}_class001_unfil.mrc"
                write_map(p, maps[0], model.pixel_size)
                files["unfil"].append(p)
        if it == 0:
            write_job_info(root, cfg, inp)
        if rec is not None and it is not None:
            with open(f"{root}_progress.jsonl", "a") as fh:
                fh.write(_progress_line(rec))
                fh.flush()
                os.fsync(fh.fileno())
            if plots:
                _plots(root, it, st, model)
        return files

    return write


def _progress_line(rec) -> str:
    line = {"iteration": rec.iteration, "resolution_angst": rec.resolution_angst,
            "current_size": rec.current_size, "healpix_order": rec.healpix_order,
            "changes_orientations_deg": rec.changes_orient, "changes_offsets_angst": rec.changes_offset,
            "changes_classes": rec.changes_class, "class_fractions": rec.class_fractions,
            "ave_pmax": rec.ave_pmax, "loglik": rec.loglik, "seconds": rec.seconds,
            "memory": getattr(rec, "memory", {}), "n_zero_weight": getattr(rec, "n_zero_weight", 0),
            "fsc": rec.fsc}
    return json.dumps(line) + "\n"


def _plots(root, it, st, model) -> None:
    """The iteration's PNG plots; a plot that fails is logged, never a reason to stop the refinement."""
    try:
        from .plots import write_iteration_plots

        write_iteration_plots(root, it, st.angles, model.ori_size, model.pixel_size)
    except Exception as e:  # noqa: BLE001
        logging.getLogger(__name__).warning("plots of iteration %d not written: %s: %s", it, type(e).__name__, e)


def write_job_info(root: str, cfg, inp) -> Path:
    """``<root>_job.json``: the settings, the equivalent command line, box and pixel size (read by the report)."""
    import sys
    import time
    from dataclasses import asdict

    info = {"command": command_line(cfg), "argv": list(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "box": int(inp.box), "pixel_size": float(inp.pixel_size), "n_particles": int(inp.particles.n),
            "config": asdict(cfg)}
    p = Path(f"{root}_job.json")
    with atomic_path(p) as tmp:
        tmp.write_text(json.dumps(info, indent=1))
    return p


def command_line(cfg) -> str:
    """The ``gerelion refine|classify`` command with the flags of ``cfg`` that differ from the defaults."""
    import shlex
    from dataclasses import fields

    from .config import JobConfig

    default = JobConfig("", "", "")
    words = ["gerelion", "refine" if cfg.auto_refine else "classify"]
    for f in fields(JobConfig):
        v = getattr(cfg, f.name)
        if f.name in ("auto_refine", "split_random_halves") and cfg.auto_refine:
            continue
        if f.name not in ("i", "o", "ref") and v == getattr(default, f.name):
            continue
        if isinstance(v, bool):
            words.append(f"--{f.name}")
        else:
            words += [f"--{f.name}", shlex.quote(str(v))]
    return " ".join(words)


def restart_progress(root: str, records) -> None:
    """``<root>_progress.jsonl`` as it was after the last of ``records`` (on ``--continue``), replaced atomically."""
    with atomic_path(f"{root}_progress.jsonl") as tmp:
        tmp.write_text("".join(_progress_line(r) for r in records))
