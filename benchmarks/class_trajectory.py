"""Per iteration of a 3D classification with known truth: class accuracy and each true class's pose error.

Reads the ``<root>_itNNN_data.star`` files of a run (ours or RELION's: the names are the same) and prints one row per
iteration: the fraction of particles in the class that holds most of each true class (purity), the class accuracy
(best assignment of classes to true classes), and for each true class the median / 90th-percentile angular error of
its particles in that class after fitting the class's own global rotation and hand (``compare_relion.gauge``: a run
from a featureless start is defined only up to them), and the resolution in the model file.

  python benchmarks/class_trajectory.py --data ../shared/data/dev_class --root /work/runs/cls_cpu/run [--every 3]
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compare_relion import gauge  # noqa: E402

from gerelion_dask.io.star import read_particles, read_star  # noqa: E402


def iteration_row(data_star: Path, truth) -> dict:
    _, est, _ = read_particles(data_star)
    lab = truth["rlnClassNumber"].to_numpy()
    cls = est["rlnClassNumber"].to_numpy()
    k = max(int(cls.max()), int(lab.max()))
    perms = itertools.permutations(range(1, k + 1), int(lab.max()))
    acc = max(float(np.mean(np.array(p)[lab - 1] == cls)) for p in perms)
    row = {"class_accuracy": acc}
    for tc in range(1, int(lab.max()) + 1):
        mine = cls[lab == tc]
        ec = int(np.bincount(mine).argmax())
        sel = (cls == ec) & (lab == tc)
        _, mirror, err = gauge(est[sel], truth[sel])
        row[f"true{tc}"] = (ec, float(np.mean(mine == ec)), float(np.median(err)), float(np.percentile(err, 90)),
                            "m" if mirror else "")
    model = Path(str(data_star).replace("_data.star", "_model.star"))
    if model.is_file():
        g = read_star(model)["model_general"]
        row["resolution_A"] = float(g["rlnCurrentResolution"].iloc[0])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="data set folder with truth.star")
    ap.add_argument("--root", required=True, help="run root (files <root>_itNNN_data.star)")
    ap.add_argument("--every", type=int, default=1, help="every n-th iteration (the last one always)")
    a = ap.parse_args()
    _, truth, _ = read_particles(a.data / "truth.star")
    root = Path(a.root)
    its = sorted(int(m.group(1)) for p in root.parent.glob(root.name + "_it*_data.star")
                 if (m := re.search(r"_it(\d+)_data\.star$", p.name)))
    its = [i for i in its if i > 0 and (i % a.every == 0 or i == its[-1])]
    n_true = int(truth["rlnClassNumber"].max())
    head = "| it | res (Å) | class acc | " + " | ".join(
        f"true {t}: class, purity, err median / p90 (°)" for t in range(1, n_true + 1)) + " |"
    print(head)
    print("|---" * (3 + n_true) + "|")
    for i in its:
        r = iteration_row(root.parent / f"{root.name}_it{i:03d}_data.star", truth)
        cells = [f"{r[f'true{t}'][0]}{r[f'true{t}'][4]}, {r[f'true{t}'][1]:.2f}, {r[f'true{t}'][2]:.1f} / "
                 f"{r[f'true{t}'][3]:.1f}" for t in range(1, n_true + 1)]
        res = r.get("resolution_A", float("nan"))
        print(f"| {i} | {res:.2f} | {r['class_accuracy']:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
