"""Our first iteration against RELION's, particle by particle, on RELION's own sampling grid (issue 3).

RELION perturbs its orientation and translation grids by a random instance per iteration
(``rlnSamplingPerturbInstance`` in ``run_itNNN_sampling.star``; ALGORITHM.md §3.4).  This script runs our iteration 1
with the same flags as ``compare_relion.py`` and RELION's instance put in place of ours, so both programs search the
same grid from the same reference: every rule of that iteration (the ``--firstiter_cc`` score, preprocessing, the
fine pass) can then be compared pose by pose.  It prints the share of particles given RELION's pose, the ratio of the
CC values (``rlnLogLikeliContribution``) where the poses agree, and the directions left with a zero prior.  In refine
mode our run takes RELION's half sets (its ``rlnRandomSubset``), and each half's model is compared: directions with a
zero prior, average norm correction, sigma offset, log-likelihood (RELION 3.1 keeps them per half set).

  python benchmarks/first_iteration_vs_relion.py --data ../shared/data/dev_class --mode classify \\
      --relion-root <RELION>/Class3D/run [--work /tmp/first_it]

(2026-12-06, dev_class against RELION 3.1.3's CUDA run: 957 of 3,000 poses equal before eb2ebc8, 2,742 after; ~15 s
on a 2-core machine.  dev_refine against Debian's RELION 3.1.3: ``--mode refine --relion-root <f32>/Refine3D/run``.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compare_relion  # noqa: E402

from gerelion_dask.conventions import euler_to_matrix  # noqa: E402
from gerelion_dask.io.star import read_particles, read_star, write_particles  # noqa: E402


def perturbation_instance(sampling_star: Path) -> float:
    """RELION's ``rlnSamplingPerturbInstance`` of one iteration."""
    for block in read_star(sampling_star).values():
        if "rlnSamplingPerturbInstance" in block.columns:
            return float(block["rlnSamplingPerturbInstance"].iloc[0])
    raise SystemExit(f"{sampling_star}: no rlnSamplingPerturbInstance")


def model_rows(root: str) -> dict:
    """Per model of iteration 1 (each half set's for an auto-refine): directions whose prior is exactly zero in the
    first class's ``data_model_pdf_orient_class_1`` block, the average norm correction, sigma offset (Å) and
    log-likelihood; and the directions with a zero prior in every model."""
    paths = [p for p in (Path(f"{root}_it001_model.star"), Path(f"{root}_it001_half1_model.star"),
                         Path(f"{root}_it001_half2_model.star")) if p.exists()]
    out, zero = {}, None
    for path in paths:
        blocks = read_star(path)
        tag = path.name.split("_it001_")[1].removesuffix("_model.star").removeprefix("model.star") or "model"
        pdf = blocks["model_pdf_orient_class_1"]["rlnOrientationDistribution"].to_numpy(float)
        g = blocks["model_general"].iloc[0]
        out[f"zero_directions_{tag}"] = int(np.sum(pdf == 0))
        out[f"norm_average_{tag}"] = round(float(g["rlnNormCorrectionAverage"]), 6)
        out[f"sigma_offset_{tag}"] = round(float(g["rlnSigmaOffsetsAngst"]), 6)
        out[f"loglik_{tag}"] = round(float(g["rlnLogLikelihood"]), 6)
        zero = (pdf == 0) if zero is None else zero & (pdf == 0)
    if len(paths) > 1:
        out["zero_directions_in_all"] = int(zero.sum())
    return out


def with_relion_halves(star: Path, relion_data: Path, out: Path) -> Path:
    """A copy of the particles STAR file ``star`` with RELION's half sets (``rlnRandomSubset`` of the same images) and
    absolute image paths, written to ``out``."""
    optics, parts, _ = read_particles(star)
    _, rel, _ = read_particles(relion_data)

    def key(names):
        return [(int(n.split("@")[0]), Path(n.split("@")[1]).name) for n in names]

    subset = dict(zip(key(rel["rlnImageName"]), rel["rlnRandomSubset"].astype(int), strict=True))
    parts = parts.copy()
    parts["rlnRandomSubset"] = [subset[k] for k in key(parts["rlnImageName"])]
    parts["rlnImageName"] = [f"{n.split('@')[0]}@{(star.parent / n.split('@')[1]).resolve()}"
                             for n in parts["rlnImageName"]]
    return write_particles(optics, parts, out)


def compare(relion_data: Path, ours_data: Path) -> dict:
    _, r, _ = read_particles(relion_data)
    _, o, _ = read_particles(ours_data)
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    A = euler_to_matrix(*(r[c].to_numpy(float) for c in cols))
    B = euler_to_matrix(*(o[c].to_numpy(float) for c in cols))
    ang = np.degrees(np.arccos(np.clip((np.einsum("nij,nij->n", A, B) - 1) / 2, -1, 1)))
    dx = np.hypot(r["rlnOriginXAngst"].to_numpy(float) - o["rlnOriginXAngst"].to_numpy(float),
                  r["rlnOriginYAngst"].to_numpy(float) - o["rlnOriginYAngst"].to_numpy(float))
    same = (ang < 0.5) & (dx < 0.01)
    cr, co = r["rlnLogLikeliContribution"].to_numpy(float), o["rlnLogLikeliContribution"].to_numpy(float)
    ratio = co[same] / cr[same]
    return {"particles": len(r), "same_pose": int(same.sum()), "within_10deg": float(np.mean(ang < 10)),
            "cc_ratio_median": float(np.median(ratio)) if same.any() else float("nan"),
            "cc_ratio_p5_p95": [round(float(x), 5) for x in np.percentile(ratio, [5, 95])] if same.any() else [],
            "mean_cc_relion": float(cr.mean()), "mean_cc_ours": float(co.mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a data set folder (particles.star, ini_lp60.mrc)")
    ap.add_argument("--mode", choices=("refine", "classify"), required=True)
    ap.add_argument("--relion-root", required=True, help="RELION's run root, e.g. .../Class3D/run")
    ap.add_argument("--work", default="/tmp/first_iteration_vs_relion")
    ap.add_argument("extra", nargs="*", help="extra flags for our command line")
    a = ap.parse_args(argv)
    root = a.relion_root
    r_inst = perturbation_instance(Path(f"{root}_it001_sampling.star"))
    import gerelion_dask.driver as driver
    from gerelion_dask.cli import main as cli_main

    driver.next_perturbation = lambda r, factor, rng: r_inst  # RELION's grid in place of our random instance
    flags = (compare_relion.CLASS_FLAGS if a.mode == "classify" else compare_relion.REFINE_FLAGS).split()
    for flag in ("--iter", "--auto_iter_max"):  # one iteration (auto-refine counts --auto_iter_max)
        if flag in flags:
            flags[flags.index(flag) + 1] = "1"
        else:
            flags += [flag, "1"]
    data = Path(a.data)
    out = Path(a.work) / "run"
    out.parent.mkdir(parents=True, exist_ok=True)
    star = data / "particles.star"
    if a.mode == "refine":  # RELION's half sets, so that each half's model is compared with RELION's
        star = with_relion_halves(star, Path(f"{root}_it001_data.star"), out.parent / "particles_relion_halves.star")
    rc = cli_main([a.mode, "--i", str(star), "--o", str(out), "--ref", str(data / "ini_lp60.mrc"),
                   *flags, "--device", "cpu", "--in-process", "--pool", "250", "--overwrite", *a.extra])
    if rc:
        return rc
    row = compare(Path(f"{root}_it001_data.star"), Path(f"{out}_it001_data.star"))
    relion, ours = model_rows(root), model_rows(str(out))
    for k in relion:
        row[k] = f"RELION {relion[k]} / ours {ours.get(k)}"
    print(f"RELION's perturbation instance {r_inst}")
    print("| metric | value |\n|---|---|")
    for k, v in row.items():
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
