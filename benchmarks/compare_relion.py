"""Side by side with RELION 3.1.3: the same data, the same flags, one table (issue 3).

Runs Debian's ``relion_refine_mpi`` (3 ranks; RELION 3.1 needs a float32 copy of float16 stacks) and ours on a data
set with known truth, or reads finished runs (``--relion-dir``, ``--ours-dir``), and prints:
wall time, gold-standard resolution, resolution where the FSC against the true map falls below 0.5, median and
90th-percentile angular error against the true poses, median shift error, and class-assignment accuracy.

  python benchmarks/compare_relion.py --data ../shared/data/dev_refine --mode refine --work /tmp/cmp_refine
  python benchmarks/compare_relion.py --data ../shared/data/dev_class --mode classify --work /tmp/cmp_class
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gerelion_dask.conventions import euler_to_matrix  # noqa: E402
from gerelion_dask.io.mrc import read_map  # noqa: E402
from gerelion_dask.io.star import read_particles  # noqa: E402
from gerelion_dask.ops.fsc import fsc, resolution_at  # noqa: E402
from gerelion_dask.ops.symmetry import symmetry_operators  # noqa: E402

REFINE_FLAGS = ("--ini_high 60 --particle_diameter 160 --ctf --ctf_corrected_ref --firstiter_cc --flatten_solvent "
                "--zero_mask --oversampling 1 --healpix_order 2 --auto_local_healpix_order 4 --offset_range 5 "
                "--offset_step 2 --sym C1 --low_resol_join_halves 40 --norm --scale --auto_refine "
                "--split_random_halves --pad 2 --random_seed 1")
CLASS_FLAGS = ("--ini_high 60 --particle_diameter 80 --ctf --ctf_corrected_ref --firstiter_cc --flatten_solvent "
               "--zero_mask --oversampling 1 --healpix_order 2 --offset_range 5 --offset_step 2 --sym C1 --K 2 "
               "--iter 25 --tau2_fudge 4 --norm --scale --pad 2 --random_seed 1")


def angular_errors(est, truth, sym="C1"):
    A = euler_to_matrix(*(truth[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    B = euler_to_matrix(*(est[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    best = np.full(len(A), np.inf)
    for R in symmetry_operators(sym):
        tr = np.einsum("bij,bij->b", A, B @ R)
        best = np.minimum(best, np.rad2deg(np.arccos(np.clip((tr - 1) / 2, -1, 1))))
    return best


MZ = np.diag([1.0, 1.0, -1.0])


def gauge(est, truth):
    """The global transform between a run's frame and the truth's, fitted from the poses (a reconstruction from a
    featureless start is defined up to a rotation and, for a blob, the hand).  Returns (R, mirror, residual errors):
    ``est pose ~ f(truth pose) R^T`` with ``f = identity`` or the z mirror ``M A M``, whichever fits better."""
    A = euler_to_matrix(*(truth[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    B = euler_to_matrix(*(est[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    best = None
    for mirror in (False, True):
        D = np.einsum("bji,bjk->bik", A, MZ @ B @ MZ if mirror else B)
        U, S, Vt = np.linalg.svd(D.mean(0))
        R = U @ np.diag([1, 1, np.sign(np.linalg.det(U @ Vt))]) @ Vt
        res = np.einsum("bij,jk->bik", D, R.T)
        err = np.rad2deg(np.arccos(np.clip((np.einsum("bii->b", res) - 1) / 2, -1, 1)))
        if best is None or np.median(err) < np.median(best[2]):
            best = (R, mirror, err)
    return best


def aligned_fsc_res(m, t, R, mirror, apix):
    """FSC-0.5 resolution of map ``m`` against truth ``t`` after undoing the gauge transform (the map is resampled;
    of the candidate orders of rotation and mirror the best-superposing one is used)."""
    from scipy.ndimage import affine_transform

    n = m.shape[0]
    c = np.full(3, n // 2)
    cands = [R.T] if not mirror else [R.T @ MZ, MZ @ R.T, MZ @ R, R @ MZ]
    best = 0.0
    for T in cands:
        Tz = T[::-1, ::-1]  # (x, y, z) -> array index order (z, y, x)
        al = affine_transform(m, Tz, offset=c - Tz @ c, order=3)
        best = max(best, 1.0 / resolution_at(fsc(al, t), 0.5, n, apix))
    return 1.0 / best


def summarise(run_root: Path, data: Path, wall: float, gold_res: float, mode: str):
    _, est, _ = read_particles(f"{run_root}_data.star")
    _, truth, _ = read_particles(data / "truth.star")
    truth_maps = sorted(data.glob("truth_*.mrc"))
    apix = float(truth.get("rlnImagePixelSize", [0])[0]) if "rlnImagePixelSize" in truth else None
    n = read_map(truth_maps[0])[0].shape[0]
    apix = read_map(truth_maps[0])[1] if not apix else apix
    row = {"wall_s": wall, "gold_standard_A": gold_res}
    if mode == "refine":
        m = read_map(f"{run_root}_class001.mrc")[0].astype(np.float64)
        t = read_map(truth_maps[0])[0].astype(np.float64)
        row["fsc_truth_0.5_A"] = resolution_at(fsc(m, t), 0.5, n, apix)
        err = angular_errors(est, truth)
        R, mirror, gerr = gauge(est, truth)
        row["gauge_rotation_deg"] = float(np.rad2deg(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))))
        row["gauge_mirror"] = mirror
        row["fsc_truth_0.5_A_gauge_aligned"] = aligned_fsc_res(m, t, R, mirror, apix)
        row["ang_err_gauge_median_deg"] = float(np.median(gerr))
        row["ang_err_gauge_p90_deg"] = float(np.percentile(gerr, 90))
    else:
        k = int(est["rlnClassNumber"].max())
        maps = [read_map(f"{run_root}_class{c:03d}.mrc")[0].astype(np.float64) for c in range(1, k + 1)]
        tmaps = [read_map(p)[0].astype(np.float64) for p in truth_maps]  # sorted: closed, open
        tlabels = truth["rlnClassNumber"].to_numpy()
        best_acc, best_perm = -1, None
        for perm in itertools.permutations(range(1, k + 1), len(tmaps)):
            acc = float(np.mean(np.array(perm)[tlabels - 1] == est["rlnClassNumber"].to_numpy()))
            if acc > best_acc:
                best_acc, best_perm = acc, perm
        row["class_accuracy"] = best_acc
        # truth.star: class 1 = open, 2 = closed; maps sorted alphabetically: closed, open
        order = {1: [p for p in truth_maps if "open" in p.name], 2: [p for p in truth_maps if "closed" in p.name]}
        res, ares, gmed, gp90 = [], [], [], []
        for tc, ec in zip((1, 2), best_perm, strict=False):
            t = read_map(order[tc][0])[0].astype(np.float64)
            res.append(round(resolution_at(fsc(maps[ec - 1], t), 0.5, n, apix), 2))
            sel = (est["rlnClassNumber"].to_numpy() == ec) & (tlabels == tc)
            R, mirror, gerr = gauge(est[sel], truth[sel])
            ares.append(round(aligned_fsc_res(maps[ec - 1], t, R, mirror, apix), 2))
            gmed.append(round(float(np.median(gerr)), 2))
            gp90.append(round(float(np.percentile(gerr, 90)), 2))
        row["fsc_truth_0.5_A"] = res
        row["fsc_truth_0.5_A_gauge_aligned"] = ares
        row["_est"], row["_truth"] = est, truth  # for common_errors (not printed)
        row["_correct"] = np.array(best_perm)[tlabels - 1] == est["rlnClassNumber"].to_numpy()
        row["ang_err_gauge_median_deg"] = gmed
        row["ang_err_gauge_p90_deg"] = gp90
        err = angular_errors(est, truth)
    row["ang_err_median_deg"] = float(np.median(err))
    row["ang_err_p90_deg"] = float(np.percentile(err, 90))
    d = np.hypot(est["rlnOriginXAngst"].to_numpy() - truth["rlnOriginXAngst"].to_numpy(),
                 est["rlnOriginYAngst"].to_numpy() - truth["rlnOriginYAngst"].to_numpy())
    row["shift_err_median_A"] = float(np.median(d))
    return row


def common_errors(rows: dict) -> None:
    """Per true class, each run's residual angular error (median / p90, own gauge) on the particles that every run
    assigns to that class's matched class.  The per-class rows above use each run's own correctly classified
    particles, so a run that classifies more of them (harder ones included) is measured on a different set."""
    runs = [r for r in rows.values() if "_correct" in r]
    if len(runs) < 2:
        return
    tl = runs[0]["_truth"]["rlnClassNumber"].to_numpy()
    both = np.logical_and.reduce([r["_correct"] for r in runs])
    for r in runs:
        med, p90 = [], []
        for tc in (1, 2):
            sel = both & (tl == tc)
            _, _, g = gauge(r["_est"][sel], r["_truth"][sel])
            med.append(round(float(np.median(g)), 2))
            p90.append(round(float(np.percentile(g, 90)), 2))
        r["common_particles"] = [int(np.sum(both & (tl == tc))) for tc in (1, 2)]
        r["ang_err_gauge_common_median_deg"] = med
        r["ang_err_gauge_common_p90_deg"] = p90


def run_relion(data: Path, work: Path, mode: str):
    f32 = work / "data_f32"
    if not (f32 / "particles.mrcs").exists():
        subprocess.run([sys.executable, str(data.parent / "to_float32.py"), str(data), str(f32)], check=True)
    out = f32 / ("Refine3D" if mode == "refine" else "Class3D")
    out.mkdir(exist_ok=True)
    ref = "ini_lp60.mrc"
    flags = REFINE_FLAGS if mode == "refine" else CLASS_FLAGS
    cmd = (f"mpirun --allow-run-as-root --oversubscribe -np 3 relion_refine_mpi --i particles.star "
           f"--o {out.name}/run --ref {ref} {flags} --dont_combine_weights_via_disc --j 1")
    t = time.time()
    with open(out / "relion.log", "w") as log:
        subprocess.run(cmd, shell=True, cwd=f32, stdout=log, stderr=subprocess.STDOUT, check=True)
    return out / "run", time.time() - t


def relion_gold_res(root: Path) -> float:
    log = (root.parent / "relion.log").read_text(errors="ignore") if (root.parent / "relion.log").exists() else ""
    m = re.findall(r"Final resolution \(without masking\) is: ([0-9.]+)", log)
    if m:
        return float(m[-1])
    from gerelion_dask.io.star import read_star

    blocks = read_star(f"{root}_model.star")
    return float(blocks["model_general"]["rlnCurrentResolution"].iloc[0])


def run_ours(data: Path, work: Path, mode: str, extra: list):
    out = work / ("ours_refine" if mode == "refine" else "ours_class")
    flags = REFINE_FLAGS if mode == "refine" else CLASS_FLAGS
    flags = flags.replace("--auto_refine --split_random_halves", "")
    cmd = [sys.executable, "-m", "gerelion_dask.cli", "refine" if mode == "refine" else "classify",
           "--i", str(data / "particles.star"), "--o", str(out / "run"), "--ref", str(data / "ini_lp60.mrc"),
           "--overwrite", *flags.split(), *extra]
    t = time.time()
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    return out / "run", time.time() - t


def ours_gold_res(root: Path) -> float:
    """The last progress line's resolution, or the final model.star's where the progress file was not kept."""
    prog = Path(f"{root}_progress.jsonl")
    if not prog.exists():
        return relion_gold_res(root)
    return float(json.loads(prog.read_text().splitlines()[-1])["resolution_angst"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--mode", choices=["refine", "classify"], required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/compare_relion"))
    ap.add_argument("--relion-dir", type=Path, help="finished RELION run root (e.g. .../Refine3D/run)")
    ap.add_argument("--relion-wall", type=float, default=float("nan"))
    ap.add_argument("--relion-label", default="RELION 3.1.3 (3 MPI ranks)",
                    help="column title of a finished RELION run (e.g. one of its CUDA build)")
    ap.add_argument("--ours-dir", type=Path, help="finished run root of ours")
    ap.add_argument("--ours-wall", type=float, default=float("nan"))
    ap.add_argument("--skip-relion", action="store_true")
    ap.add_argument("extra", nargs="*", help="extra flags for our command line")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    rows = {}
    if a.relion_dir or not a.skip_relion:
        root, wall = (a.relion_dir, a.relion_wall) if a.relion_dir else run_relion(a.data.resolve(), a.work, a.mode)
        label = a.relion_label if a.relion_dir else "RELION 3.1.3 (3 MPI ranks)"
        rows[label] = summarise(root, a.data, wall, relion_gold_res(root), a.mode)
    root, wall = (a.ours_dir, a.ours_wall) if a.ours_dir else run_ours(a.data.resolve(), a.work, a.mode, a.extra)
    rows["gerelion-dask"] = summarise(root, a.data, wall, ours_gold_res(root), a.mode)
    common_errors(rows)
    keys = [k for k in next(iter(rows.values())) if not k.startswith("_")]
    print("| metric | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(str(r[k]) if not isinstance(r[k], float) else f"{r[k]:.3g}"
                                        for r in rows.values()) + " |")
    print(f"(machine: {os.uname().nodename}, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
