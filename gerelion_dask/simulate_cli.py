"""``gerelion simulate``: write a synthetic RELION 3.1 data set with ground truth (see :mod:`gerelion_dask.simulate`).

Examples::

    gerelion simulate --o sim_adk --n 2000 --box 64 --angpix 1.5 --snr 0.1            # shipped 1AKE model
    gerelion simulate --o sim_2cls --phantom --classes 2 --box 48 --angpix 3 --n 1000  # blobs / blobs2
    gerelion simulate --o sim_adk2 --model open.pdb closed.pdb                         # one class per model
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .cliargs import ArgumentParser as _OneLineParser
from .simulate import (
    PHANTOM_KINDS,
    SimulationSpec,
    default_model_path,
    density_from_atoms,
    hinge_perturb,
    phantom_map,
    read_pdb_atoms,
    simulate_dataset,
)

__all__ = ["build_parser", "simulate_main", "class_maps_from_args"]


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="gerelion simulate",
                                description="Simulate RELION 3.1 particles with known poses, CTFs and classes.")
    p.add_argument("--o", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--n", type=int, default=1000, help="number of particles (default 1000)")
    p.add_argument("--box", type=int, default=64, help="image/map box in pixels, even (default 64)")
    p.add_argument("--angpix", type=float, default=1.5, help="pixel size in Å (default 1.5)")
    p.add_argument("--snr", type=float, default=0.1, help="whole-box SNR; 'inf' for noise-free (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", nargs="+", metavar="PDB",
                     help="atomic model(s), .pdb or .pdb.gz (default: the shipped PDB 1AKE); several = one class each")
    src.add_argument("--phantom", nargs="?", const="blobs", choices=PHANTOM_KINDS,
                     help="use a built-in blob phantom instead of a model (default kind: blobs)")
    p.add_argument("--classes", type=int, default=None,
                   help="number of classes K (default: number of models, else 1). K > 1 with one model: hinge-"
                        "perturbed copies; with --phantom: blobs, blobs2, then random phantoms")
    p.add_argument("--hinge_angle", type=float, default=20.0,
                   help="hinge rotation step (deg) between perturbed model classes (default 20)")
    p.add_argument("--bfactor", type=float, default=50.0, help="atomic B-factor in Å^2 (default 50)")
    p.add_argument("--sampling_bfactor", type=float, default=None,
                   help="extra B added to every atom (Å^2; default 8 pi^2 angpix^2 / 12; 0 = as ../shared/data)")
    p.add_argument("--ctf_bfactor", type=float, default=100.0,
                   help="CTF envelope B in Å^2 applied in the simulation, truth.star only (default 100)")
    p.add_argument("--ini_lowpass", type=float, default=40.0,
                   help="resolution (Å) of the initial reference; <= 0 writes none (default 40)")
    p.add_argument("--boxpad", type=float, default=2.0, help="simulation field of view / box (default 2)")
    p.add_argument("--projector_padding", type=float, default=2.0,
                   help="Fourier padding of the projector (default 2; 1 is ~8x cheaper, ~0.6 %% different)")
    p.add_argument("--batch", type=int, default=256, help="particles per batch (default 256)")
    return p


def class_maps_from_args(args) -> tuple[list[np.ndarray], list[str]]:
    """The class maps (one common frame) and a description of each."""
    box, apix = args.box, args.angpix
    if args.phantom is not None:
        k = args.classes or 1
        kinds = [args.phantom] + (["blobs2"] if args.phantom == "blobs" else [])
        maps, desc = [], []
        for i in range(k):
            kind = kinds[i] if i < len(kinds) else "random"
            seed = args.seed + i
            maps.append(phantom_map(box, apix, kind, seed=seed))
            desc.append(f"phantom {kind}" + (f" (seed {seed})" if kind == "random" else ""))
        return maps, desc
    paths = args.model or [str(default_model_path())]
    models = [read_pdb_atoms(pth) for pth in paths]
    k = args.classes or len(models)
    if len(models) > 1:
        if k != len(models):
            raise ValueError(f"--classes {k} with {len(models)} models: give one model per class")
        centres = [(c * z[:, None]).sum(0) / z.sum() for c, z in models]
        centre = np.mean(centres, axis=0)
        sets = [(c, z, f"model {pth}") for (c, z), pth in zip(models, paths)]
    else:
        c0, z0 = models[0]
        centre = (c0 * z0[:, None]).sum(0) / z0.sum()
        sets = []
        for i in range(k):
            step = (i + 1) // 2 * (1 if i % 2 else -1)  # 0, +1, -1, +2, -2, ...
            ang = step * args.hinge_angle
            c = c0 if ang == 0 else hinge_perturb(c0, ang, weights=z0)
            sets.append((c, z0, f"model {paths[0]}" + (f", hinge {ang:+g} deg" if ang else "")))
    maps, desc = [], []
    half = 0.5 * box * apix
    for c, z, d in sets:
        rmax = float(np.linalg.norm(c - centre, axis=1).max())
        if rmax > 0.9 * half:
            print(f"warning: {d}: farthest atom {rmax:.1f} Å from the centre, half box {half:.1f} Å",
                  file=sys.stderr)
        maps.append(density_from_atoms(c, z, box, apix, bfactor=args.bfactor, centre=centre,
                                       sampling_bfactor=args.sampling_bfactor))
        desc.append(d)
    return maps, desc


def simulate_main(argv: list[str]) -> int:
    """Entry point of ``gerelion simulate``; prints the written paths and returns 0 (2 on a bad argument)."""
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        spec = SimulationSpec(
            n_particles=args.n, box=args.box, apix=args.angpix, snr=args.snr, seed=args.seed,
            ctf_bfactor=args.ctf_bfactor, ini_lowpass_angst=args.ini_lowpass if args.ini_lowpass > 0 else None,
            boxpad=args.boxpad, projector_padding=args.projector_padding, batch_size=args.batch,
        )
        maps, desc = class_maps_from_args(args)
        paths = simulate_dataset(maps, spec, args.o)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for k, d in enumerate(desc, 1):
        print(f"class {k}: {d}")
    for pth in paths.all():
        print(pth)
    print(f"simulated {args.n} particles in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(simulate_main(sys.argv[1:]))
