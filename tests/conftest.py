"""Shared fixtures: the array backend (NumPy always, CuPy on a GPU machine), the shared data folder, and a tiny
simulated data set for command-line tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gerelion_dask.backend import gpu_count

# ../shared/data beside the checkout; GERELION_SHARED_DATA points elsewhere (the GPU machine gets a copy)
SHARED_DATA = Path(os.environ.get("GERELION_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
GOLDEN = SHARED_DATA / "golden"
REPO = Path(__file__).resolve().parents[1]
# the tiny simulated data set of command-line tests (tiny_set): 12 particles, box 24, 5 A/px
TINY_BOX, TINY_APIX = 24, 5.0


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    """12 simulated particles of the blobs phantom (box 24, 5 A/px, SNR 2) with a 25 A initial reference: the
    ``SimulationPaths`` of a folder that tests read (copy it before changing anything)."""
    from gerelion_dask.simulate import SimulationSpec, phantom_map, simulate_dataset

    out = tmp_path_factory.mktemp("tiny_set")
    spec = SimulationSpec(n_particles=12, box=TINY_BOX, apix=TINY_APIX, snr=2.0, seed=3, ini_lowpass_angst=25.0,
                          class_fractions=None, n_classes=1, boxpad=1)
    return simulate_dataset([phantom_map(TINY_BOX, TINY_APIX, "blobs")], spec, out)


def child_env(one_blas_thread: bool = False, **extra) -> dict:
    """The environment for a child process that must import this checkout: ``os.environ`` with the repository first
    on ``PYTHONPATH``, optionally one BLAS/OpenMP thread (as every Dask worker has), plus ``extra``."""
    from gerelion_dask.distributed.cluster import ONE_BLAS_THREAD

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if one_blas_thread:
        env.update({k: str(v) for k, v in ONE_BLAS_THREAD.items()})
    return {**env, **extra}


def cluster_cli(scheduler_file, *args, timeout: float = 90):
    """``gerelion cluster <args> --scheduler-file <scheduler_file>`` in a child process that imports this checkout."""
    return subprocess.run([sys.executable, "-m", "gerelion_dask.cli", "cluster", *args, "--scheduler-file",
                           str(scheduler_file)], env=child_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module under test: every op test runs on NumPy, and on CuPy where a CUDA device exists."""
    if request.param == "cupy":
        if gpu_count() == 0:
            pytest.skip("no CUDA device here: CuPy twins are run on the GPU machine (benchmarks/RESULTS.md)")
        import cupy

        return cupy
    return np


def to_np(a):
    """Host copy of a NumPy or CuPy array."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def need_golden():
    if not GOLDEN.is_dir():
        pytest.skip(f"RELION golden data not found at {GOLDEN}")
    return GOLDEN
