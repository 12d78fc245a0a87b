"""Memory planning: host and GPU memory of a run, predicted before it starts (``gerelion plan``).

The model counts the large arrays of the code as written (sizes in bytes; float64 = 8, complex128 = 16); everything
else (Python, libraries, small per-particle arrays) is a constant that is not counted, so the prediction is of the
memory the arrays need above an idle process.  Symbols:

* ``N`` box, ``n`` image size of the E-step (``current_size``, at most ``N``; the plan takes ``N``: the last
  auto-refine iteration runs at full size), ``nc`` coarse size, ``M`` / ``Mc`` likelihood pixels of an ``n`` / ``nc``
  window (about ``pi n^2 / 4``), ``h = n (n/2+1)`` half-plane pixels;
* ``L = P^2 (r+2)`` voxels of a padded Fourier volume (``r = round(pad n / 2)``, ``P = 2 r + 3``);
* ``B`` particles per pool (``--pool``), ``K`` classes, ``H`` half sets, ``O = n_dir n_psi`` coarse orientations of
  one asymmetric unit at the HEALPix order, ``T`` coarse translations;
* ``E = FINE_LIMITS[backend]["max_elems"]`` (``expectation/fine.py``): the most diff2 values of one chunk of
  particles, in the coarse and in the fine pass (on a GPU with less than ~78 GiB it, the projection caches and the
  slice chunks below shrink with the GPU's memory: ``fine.gpu_limits``, ``--gpu_memory``);
* ``f`` the fraction of coarse orientations that are significant for some particle of a pool (``--significant``;
  default 1, the worst case, met in the first iterations after a cross-correlation start).

One E-step task (one pool; ``expectation/estep.py``, ``fine.py``):

* ``preprocessing`` (``expectation/preprocess.py``; ``r`` bytes a real image value: 4 on a GPU, which keeps the
  float32 images in float32 / complex64, 8 on a CPU): the pool's raw float32 images ``4 B N^2`` and the largest of
  its steps, the shifted images and the background noise being made (``2 r B N^2`` and one batch of 256 noise
  images' float64 temporaries, ``256 (40 N (N/2+1) + 8 N^2)``), their blend (``4 r B N^2``: both, the result and one
  temporary), or the masked images with their rolled copy and transform (``2 r B N^2 + 2 r B N (N/2+1)``);
* ``held`` through the passes: the raw images and the windowed transforms, masked and unmasked, and CTFs,
  ``4 B N^2 + B h (4 r + 8)``;
* ``coarse``: projections of every orientation ``16 K O Mc`` + ``8 O Mc`` (|P|^2) + the chunk's arrays (``e =
  min(F E, B O T K)`` samples, ``b = max(1, F E / (O T K))`` particles per chunk, ``F =
  FINE_LIMITS[backend]["coarse_factor"]``: 2 on a GPU, 1 on a CPU): on a CPU ``~7 x 8 e`` (cross terms, diff2,
  weights, the significance sort) and the particle side of the product ``32 b T Mc``; on a GPU the float32 cross
  terms ``4 e`` beside the larger of two phases, the GEMM's shifted images (``16 b T Mc``: complex64 and their
  interleaved copy) or the selection: each particle's candidate segment ``17 c b`` (``c = candidate_segment(O T
  K)``: at most 16,384) and the rows of particles with flat posteriors redone densely, a batch of at most
  ``ops.likelihood.REDO_SAMPLES`` samples at a time with their temporaries (``48 min(e, 2^22)``).  Local searches
  (``local_significant > 0``: auto-refine from ``--auto_local_healpix_order``, ``--sigma_ang``) project no grid:
  each particle searches its own ``Ol`` orientations (:func:`local_search_orientations`), and a chunk gathers its
  particles' rows of its distinct orientations' projections (:func:`_local_coarse_bytes`: at most
  ``local_rows_factor x 8 E`` bytes of rows, 4 GiB on an 80 GB GPU, whatever the pool's size);
* ``fine``: the pool's window pixels (images masked and unmasked, CTFs, noise weights, the back-projection terms and
  the per-particle residuals: ``112 B M``) and the union of the children of the significant orientations, ``R = 8 f K
  O`` fine orientations (at most ``8 B maxsig`` with ``--maxsig``; in local searches at most ``8 B s``, ``s`` the
  significant samples a particle, ``LOCAL_SIGNIFICANT`` unless measured: the grid no longer bounds them). While they
  are projected: their projections ``16 R M`` and one chunk's working memory (``min(R, S_p) x s_p``, ``S_p =
  project_bytes / s_p``, at most 4,096, ``s_p = 16 h`` on a GPU, ``200 h`` on a CPU; ``fine.project_row_bytes``). The projections are the process's cache's own
  array (no copy; growing it by a pool's missing rows holds a second copy of it for a moment, ``min(16 M U,
  cache_bytes)``, ``U`` below) unless the cache cannot hold them, when the pool keeps its own, ``16 R M``. Then each
  fine orientation with its back-projection sums, ``24 R M``, and the largest of the pass's phases (they do not
  coexist): the group's children's diff2, ``8 g`` (``g = min(E / 16, w)`` children, ``fine._group_particles``;
  twice with ``K > 1``, gathered per class) beside the group's weighted images ``24 B M``, and on a CPU the batch of
  ``ops.likelihood.children_diff2`` (shifted images, gathered projections and powers: ``11 E``; the GPU kernel keeps
  none); the group's posterior weights ``~6 x 8 w`` on a GPU, ``~10 x 8 w`` on a CPU (NumPy's temporaries; checked
  by ``tests/test_plan.py``), ``w = min(e', max(E / 16, 32 s))`` padded children of a group of particles with
  ``s`` significant samples each (``s = f O T K``, local searches ``local_significant``, at most ``maxsig``; ``e' =
  min(e, 32 B maxsig)``); or a chunk of
  the weighted sums' pairs, ``100 min(E / 8, P M)`` (``P = B R`` pairs of a particle and a fine orientation, at most
  ``8 B maxsig``) beside the children's index arrays (``40 g`` on a GPU, ``120 g`` on a CPU's host); or, where a
  particle's dense block of children holds at most ``4 E`` values and ``24 R M`` bytes fit
  ``cache_bytes`` (flat posteriors, ``fine._flat_group``), the flat groups: ``72 R M`` (the layout's projections and
  powers, its per-column sums, one group's sums being made) and ``48 max(min(B x, E), x)`` (a group's weights and
  their temporaries), ``x = 4 T R`` when a particle's children reach ``x / flat_waste`` (``FINE_LIMITS``; never
  with a small ``--maxsig``, nor on a GPU for now). Last, with only the
  back-projection sums ``24 R M`` left (the pixels and projections are freed first), the 3D insertion of the ``R``
  slices in chunks of ``S = slice_bytes / s`` slices, ``min(R, S) s`` with ``s = 24 M``, the gathered rows of sums
  (CuPy's kernel reads them as they are, NumPy a few MiB of pixels at a time; ``fine.insert_row_bytes``);
* ``partials``: the pool's back-projection sums ``24 K L``, made for the 3D insertion (so beside that phase only).

Each process that runs E-step tasks also keeps one projection cache per half set it works on, for the whole iteration
(``expectation/fine.py::ProjectionCache``): the coarse pass's whole-grid projections (not in local searches)
``(8 + 4) K O Mc`` (in float32;
``24 K O Mc`` in float64, a CPU's and a fast-FP64 GPU's) and every fine orientation projected so far, ``16 M`` each: the
union over the ``P`` pools of that half set on the process, ``U``, modelled as ``R P^(1/4)`` (an empirical fit: the
pools of an iteration share most of their orientations; measured on an H100: 1.17 R over 2 pools at 256 px, eighth
session, and 1.76 R over 10 at 128 px, fourth session), at most ``8 K O`` in a global search; each cache is capped at
``FINE_LIMITS[backend]["cache_bytes"]``.  In process the driver runs one half set's pools after the other and frees a
half set's cache and references with its last pool (``driver.InProcessRunner``), so one of each lives at a time; a Dask
worker holds two caches when its block of pools straddles the half sets (one worker, or an odd number of workers), else
one.

Task peak = max(preprocessing, held + max(coarse, fine)), the fine pass's insertion phase holding the partials. On
a GPU worker the task lives on the GPU (with the references ``16 H K L``, made there from the maps the iteration
ships); the worker's host holds the raw images and the partials copied back. Every process that runs tasks also
holds the raw images of up to ``READ_AHEAD_DEPTH`` (2) pools read ahead, ``4 B N^2`` each (``io/readahead.py``).

The driver holds the maps ``3 x 8 H K N^3`` (model, new model, low-passed/unfiltered copies), the reference of the
accuracy estimate ``16 L`` (it makes no other: the E-step's are made where the tasks run, in process by the driver),
the reduced partials ``24 H K L`` and the M-step's working volumes ``~6 x 8 (pad N)^3``; in process (no Dask) it
also runs each task and adds each pool's partials on the host as it finishes, in the fixed pairwise tree
(``distributed/reduce.py::TreeSum``: at most ``bit_length(pools of a half set)`` sums per half set, plus the sum
being made, ``24 K L`` each).  A Dask worker holds one task, the references it makes and the partials of its part of
the reduction tree (``~(log2 pools + 2) x 24 K L``; a finished pool's sums are freed once added), on the GPU for a
GPU worker (the tasks' outputs stay on the device), and the half sets' reduced sums copied to its host for the
M-step task (``24 H K L``).

Checked by ``tests/test_plan.py`` against tracemalloc's peak of a small in-process run (the model is an upper bound,
within a factor stated there).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from .config import COARSE_PRECISIONS, local_widths

__all__ = ["ExecutionTarget", "MemoryPlan", "execution_target", "has_global_searches", "has_local_searches",
           "local_search_orientations", "plan_for_inputs", "plan_main", "plan_memory", "pool_for_inputs",
           "task_pool_size"]

_GIB = 1024.0**3


def _likelihood_pixels(n: int) -> int:
    from .ops.fourier import likelihood_pixels

    return int(likelihood_pixels(n, include_dc=True).sum())


def _volume_voxels(n: int, pad: float) -> int:
    r = int(round(pad * (n // 2)))
    P = 2 * (r + 1) + 1
    return P * P * (r + 2)


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted memory (bytes) of one run; ``parts`` names every counted term."""

    backend: str  # "cpu" or "gpu"
    mode: str  # "in-process" or "dask"
    workers: int
    driver_bytes: float  # host memory of the driver process (in process: with the tasks it runs)
    worker_host_bytes: float  # host memory of one Dask worker (0 in process)
    gpu_bytes: float  # memory of one GPU (0 on the CPU)
    task_bytes: float  # one E-step task at its peak
    parts: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)

    @property
    def host_total_bytes(self) -> float:
        return self.driver_bytes + self.workers * self.worker_host_bytes

    def summary(self) -> str:
        s = self.sizes
        head = (f"memory plan ({self.mode}, {self.backend}, box {s['box']}, pool {s['pool']}, K {s['K']}, "
                f"HEALPix order {s['healpix_order']}: {s['orientations']} orientations x {s['translations']} "
                f"translations, " + (f"local searches: {s['local_orientations']} orientations and "
                                     f"{s['local_significant']:g} significant samples a particle): "
                                     if s.get("local_orientations") else
                                     f"significant fraction {s['significant_fraction']:g}): "))
        parts = [f"driver {self.driver_bytes / _GIB:.2f} GiB"]
        if self.mode == "dask":
            parts.append(f"per worker {self.worker_host_bytes / _GIB:.2f} GiB host")
        if self.backend == "gpu":
            parts.append(f"per GPU {self.gpu_bytes / _GIB:.2f} GiB")
        parts.append(f"(one E-step task {self.task_bytes / _GIB:.2f} GiB)")
        return head + ", ".join(parts)

    def table(self) -> str:
        rows = [f"  {k:28s} {v / _GIB:10.3f} GiB" for k, v in self.parts.items()]
        return self.summary() + "\n" + "\n".join(rows)


def plan_memory(box: int, n_particles: int, pool: int = 64, K: int = 1, halves: int = 2, healpix_order: int = 2,
                sym: str = "C1", offset_range: float = 6.0, offset_step: float = 2.0, pad: float = 2.0,
                pixel_size: float = 1.0, diameter: float = 0.0, backend: str = "cpu", workers: int = 0,
                significant_fraction: float = 1.0, current_size: int | None = None,
                gpu_memory_bytes: float | None = None, maxsig: int = -1,
                coarse_precision: str = "auto", local_significant: float = 0.0,
                local_orientations: int = 0, local_max_significant: float = 0.0) -> MemoryPlan:
    """Predict the memory of a run (see the module docstring for the model); ``workers=0``: in process.
    ``gpu_memory_bytes``: the GPU's total memory, whose budgets the E-step takes (``fine.gpu_limits``; default: those
    of an 80 GB H100).  ``maxsig`` (``--maxsig``, > 0): at most that many significant samples per particle, which
    bounds the fine pass's per-group weights.  ``coarse_precision`` float64 on a GPU doubles the coarse pass's
    cross terms and shifted images (8 bytes a value instead of 4); ``auto`` is counted as float64 there (what GPUs
    with fast double precision choose, ``fine.fine_limits``; an upper bound for the others).
    ``local_significant`` (> 0): the pools search locally (auto-refine's last iterations, ``--sigma_ang``) and keep
    that many significant samples a particle (mean; ``local_max_significant`` the most one particle keeps, default
    the mean), each particle searching ``local_orientations`` orientations (default
    :func:`local_search_orientations` of the HEALPix order: auto-refine's own prior width); see the module
    docstring's local searches."""
    from .expectation.fine import (FINE_LIMITS, FLAT_MIN_RUN, GPU_SIZED_FOR, gpu_limits, insert_row_bytes,
                                   project_row_bytes)
    from .expectation.grid import coarse_translations
    from .maximization.schedule import coarse_size
    from .expectation.preprocess import _NOISE_BATCH as NOISE_BATCH
    from .io.readahead import DEFAULT_DEPTH as READ_AHEAD_DEPTH
    from .ops.likelihood import REDO_SAMPLES, candidate_segment
    from .ops.sampling import angular_step, asymmetric_unit_directions

    N = int(box)
    n = int(current_size or N)
    diameter = diameter or N * pixel_size
    nc = coarse_size(N, pixel_size, healpix_order, diameter, n)
    M, Mc, h = _likelihood_pixels(n), _likelihood_pixels(nc), n * (n // 2 + 1)
    L = _volume_voxels(n, pad)
    n_dir = len(asymmetric_unit_directions(healpix_order, sym).pix)
    n_psi = int(math.ceil(360.0 / angular_step(healpix_order) - 1e-9))
    O = n_dir * n_psi
    T = len(coarse_translations(offset_range, offset_step))
    B = min(int(pool), int(n_particles))
    f = float(significant_fraction)
    limits = FINE_LIMITS[backend]
    if backend == "gpu":
        limits = gpu_limits(limits, GPU_SIZED_FOR if gpu_memory_bytes is None else gpu_memory_bytes)
    E = limits["max_elems"]
    n_pools = sum(math.ceil(c / pool) for c in _half_counts(n_particles, halves))

    # float64 / complex128 on a CPU; a GPU preprocesses the float32 images in float32 / complex64 (CTFs in float64)
    rb = 4 if backend == "gpu" else 8  # bytes of a real image value while preprocessing
    raw = 4 * B * N * N  # the pool's float32 images, held by the task throughout
    held = raw + B * h * (4 * rb + 8)  # beside the windowed transforms, masked and unmasked, and the CTFs
    noise_batch = NOISE_BATCH * (40 * N * (N // 2 + 1) + 8 * N * N)  # one batch of background noise, float64
    preprocessing = raw + max(rb * B * N * N * 2 + noise_batch,  # the shifted images and the noise being made
                              rb * B * N * N * 4,  # their blend (the result and one temporary)
                              rb * B * N * N * 2 + 2 * rb * B * N * (N // 2 + 1))  # masked, rolled, transformed
    E_c = limits["coarse_factor"] * E  # a global coarse search's chunk budget
    b_c = max(1, E_c // max(1, O * T * K))
    e_c = min(E_c, max(B * O * T * K, O * T * K))
    if backend == "gpu":  # cross terms beside the GEMM's shifted images (complex and interleaved), then
        # beside the selection's candidates in per-particle segments and flat rows redone densely (two phases)
        cap = candidate_segment(O * T * K)
        redo = 48 * min(e_c, REDO_SAMPLES)  # flat particles' dense rows, a bounded batch at a time
        g = 4 if coarse_precision == "float32" else 8  # bytes of a cross term (--coarse_precision)
        chunk_c = g * e_c + max(4 * g * min(b_c, B) * T * Mc,
                                redo + 17 * cap * min(b_c, B) + 8 * K * min(b_c, B) * O)
    else:  # float64 cross terms, diff2, weights and the significance sort of the whole block; the shifted images
        chunk_c = 7 * 8 * e_c + 32 * min(b_c, B) * T * Mc
    coarse = 16 * K * O * Mc + 8 * O * Mc + chunk_c
    local = local_significant > 0
    s_p = s_top = f * O * T * K  # significant samples a particle (mean; most): global searches, all the pool's
    if local:
        Ol = min(O, int(local_orientations) if local_orientations > 0 else
                 local_search_orientations(healpix_order, sym))
        coarse = _local_coarse_bytes(backend, limits, coarse_precision, B, K, T, Mc, O, Ol, nc)
        s_p = min(s_p, float(local_significant))
        s_top = min(s_top, max(s_p, float(local_max_significant)))
    R = min(8 * f * K * O, 8 * B * s_p)
    e_f = min(E, 32 * B * s_p)
    e_w, P = e_f, min(B * R, 8 * B * s_p)  # a group's padded children; (particle, fine orientation) pairs
    if maxsig and maxsig > 0:  # at most maxsig significant samples a particle, 32 children (8 orientations) each
        R, e_w, P = min(R, 8 * B * maxsig), min(e_f, 32 * B * maxsig), min(P, 8 * B * maxsig)
    e_g = min(E // 16, e_w)  # children of one group of particles (fine._group_particles)
    # the children of the particle with the most: groups are padded to it, and it may take a dense block
    per_particle = 32 * s_top if not (maxsig and maxsig > 0) else min(32 * s_top, 32 * maxsig)
    # a group's padded weights: its children (the particles' equal counts pad nothing), or one particle's own
    w_g = min(e_w, max(E // 16, per_particle))
    dense_w = (6 if backend == "gpu" else 10) * 8 * w_g  # the group's posterior weights; NumPy's temporaries
    slice_bytes = limits["slice_bytes"]
    row_i, row_p = insert_row_bytes(M), project_row_bytes(n, backend == "gpu")
    insert = min(R, max(1, slice_bytes // row_i)) * row_i
    projecting = 16 * R * M + min(R, 4096, max(1, limits["project_bytes"] // row_p)) * row_p
    # the fine pass's peak is one of its phases, which do not coexist: the group's diff2 (beside its weighted images;
    # NumPy's batch temporaries), the group's posterior weights, a chunk of pairs of the
    # weighted sums (~100 bytes a pixel of E / 8 pair pixels, beside the children's index arrays: ~40 bytes a child
    # on a GPU, ~120 on a CPU's host), or a chunk of the 3D insertion.  The GPU's pair kernels keep only the
    # segments' noise rows (kernels.pairs: at most 8 B M + min(P M / 4, 256 MiB)), within that pairs term
    pairs = 100 * min(E // 8, P * M) + (40 if backend == "gpu" else 120) * e_g
    diff2 = 24 * B * M + (16 if K > 1 else 8) * e_g + (11 * E if backend == "cpu" else 0)
    # flat particles' dense blocks (fine._flat_group, when a particle's block of children fits 4 E values and the
    # layout's projections the cache's budget): the layout's projections and powers, its per-column sums and one
    # group's sums being made (24 R M each) beside the group's weights and their temporaries (~6 x 8 bytes of at most
    # E values, or one particle's block)
    width = 4 * T * R  # the union's fine orientations (R) x fine translations (4 T)
    # a block is made for runs of at least min(blocks a chunk holds, FLAT_MIN_RUN) consecutive flat particles: where
    # one particle is a run, the most significant one decides; where a run takes several, the most significant one
    # only while the mean particle keeps at least half its samples (a few outliers among 1,000 particles of a 256-px
    # local search, 799 of a mean 117 significant samples, made no block on the H100, benchmarks/gpu_checks.sh; 40
    # particles at box 32 with 3,129 of a mean 1,984 made one: tests/test_plan.py)
    runs_of_one = min(max(1, E // max(width, 1)), FLAT_MIN_RUN) <= 1
    flat_particle = per_particle if runs_of_one else min(per_particle, 2 * 32 * s_p)  # (maxsig: in per_particle)
    flat = 0.0
    if limits["flat_waste"] * flat_particle >= width and width <= 4 * E and 24 * R * M <= limits["cache_bytes"]:
        flat = 72 * R * M + 48 * max(min(B * width, E), width)
    partials = 24 * K * L
    counts = _half_counts(n_particles, halves)
    # pools of one half set on one process: all of them in process or on one worker, else their share
    per_process = max(math.ceil(c / pool) for c in counts) * (1 if workers <= halves else halves / workers)
    union = min(8 * K * O, R * max(1.0, per_process) ** 0.25)
    grid_bytes = 0 if local else (12 if backend == "gpu" and coarse_precision == "float32" else 24) * K * O * Mc
    cache_want = grid_bytes + 16 * M * union  # (local searches project each chunk's own orientations: no grid)
    cache_one = min(limits["cache_bytes"], cache_want)
    # growing the cache's array by a pool's missing rows holds a second copy of it for a moment; a pool reads that
    # array (its projections are the cache's) unless the cache is full, when it keeps its own rows beside it
    grow = min(16 * M * union, limits["cache_bytes"])
    own = 0 if cache_want <= limits["cache_bytes"] else 16 * R * M
    fine = max(112 * B * M + max(projecting, grow, own + 24 * R * M + max(diff2, dense_w, pairs, flat)),
               24 * R * M + insert + partials)
    ahead = READ_AHEAD_DEPTH * 4 * B * N * N  # raw float32 images of the pools read ahead (io/readahead.py)
    task = max(preprocessing, held + max(coarse, fine))
    refs = 16 * halves * K * L
    driver_own = 3 * 8 * halves * K * N**3 + 16 * L + 24 * halves * K * L + 6 * 8 * (pad * N) ** 3
    parts = {"preprocessing (per task)": preprocessing, "images held (per task)": held,
             "coarse pass (per task)": coarse, "fine pass (per task)": fine,
             "pool partials": partials, "references (H halves)": refs, "driver: maps, sums, M-step": driver_own,
             "images read ahead": ahead}
    if workers <= 0:  # in process: the driver runs each task and adds its partials into the pairwise tree
        held_tree = (sum(max(1, math.ceil(c / pool).bit_length()) for c in counts) + 1) * partials
        caches = cache_one  # one half set's at a time, as its references (refs / halves)
        refs = refs / halves
        parts["references (H halves)"] = refs
        parts["in process: reduction tree"] = held_tree
        parts["projection caches"] = caches
        if backend == "gpu":
            driver, worker, gpu = driver_own + raw + held_tree + ahead, 0.0, task + refs + caches
        else:
            driver, worker, gpu = driver_own + refs + task + held_tree + caches + ahead, 0.0, 0.0
        mode, workers = "in-process", 0
    else:
        tree = (math.log2(max(2, n_pools / max(1, workers))) + 2) * partials
        caches = (1 if halves == 1 or workers % 2 == 0 else 2) * cache_one
        parts["worker: reduction tree"] = tree
        parts["worker: projection caches"] = caches
        if backend == "gpu":
            worker, gpu = raw + halves * partials + ahead, task + refs + caches + tree
        else:
            worker, gpu = task + refs + tree + caches + ahead, 0.0
        driver, mode = driver_own, "dask"
    sizes = {"box": N, "current_size": n, "coarse_size": nc, "pool": B, "K": K, "halves": halves,
             "healpix_order": healpix_order, "orientations": O, "translations": T, "pixels": M, "volume_voxels": L,
             "fine_orientations": int(R), "max_elems": E, "pools": n_pools, "significant_fraction": f,
             "local_significant": float(local_significant), "local_orientations": int(Ol) if local else 0}
    return MemoryPlan(backend, mode, int(workers), float(driver), float(worker), float(gpu), float(task),
                      {k: float(v) for k, v in parts.items()}, sizes)


def _local_coarse_bytes(backend: str, limits: dict, coarse_precision: str, B: int, K: int, T: int, Mc: int, O: int,
                        Ol: int, nc: int) -> float:
    """The local-search coarse pass of one pool (``estep.coarse_pass``, ``_local_chunks``): chunks of ``b``
    particles whose ``rc = b Ol`` rows (a particle and one of its orientations) hold at most ``local_rows_factor x 8
    E / (40 Mc)`` rows and ``E / (T K)`` of them a class; a chunk's cross terms ``(K, b, T, Ol)`` (``g`` bytes a value,
    the GEMMs' precision; float64 on a CPU), the model powers ``8 K rc``, the class's projections of the chunk's
    distinct orientations (at most ``rc``, at most ``O``: complex128 from the projector, ``16 Mc``, and their
    interleaved copy and power, ``3 g Mc``, with the projector's working chunk) beside each particle's rows gathered
    from them (``3 g Mc`` a row), then the larger of the GEMM's shifted images (``4 g b T Mc``) or, on a GPU, the
    selection (each particle's candidate segment ``17 c b``, ``c = candidate_segment(T K Ol)``, and the flat rows
    redone densely, ``48 min(e, 2^22)``); on a CPU the selection's float64 diff2, weights and sort (``~6 x 8 e``)."""
    from .expectation.fine import project_row_bytes
    from .ops.likelihood import REDO_SAMPLES, candidate_segment

    E = limits["max_elems"]
    gpu = backend == "gpu"
    g = 8 if not gpu or coarse_precision != "float32" else 4
    budget = max(1, limits["local_rows_factor"] * E * 8 // (40 * Mc))
    rc = min(B * Ol, max(Ol, min(budget, E // max(1, T * K))))
    b = min(B, max(1, rc // Ol))
    e = K * rc * T
    row_p = project_row_bytes(nc, gpu)
    proj = (16 + 3 * g) * min(rc, O) * Mc + min(rc, O, 4096, max(1, limits["project_bytes"] // row_p)) * row_p
    held = g * e + 8 * K * rc + 3 * g * Mc * rc
    if gpu:
        select = 48 * min(e, REDO_SAMPLES) + 17 * candidate_segment(T * K * Ol) * b
    else:
        select = 6 * 8 * e
    return held + max(proj, 4 * g * b * T * Mc, select)


@functools.lru_cache(maxsize=64)  # (a run's start asks once per pool size tried and per plan logged)
def local_search_orientations(healpix_order: int, sym: str = "C1", sigma: float = 0.0,
                              sigma_psi: float | None = None) -> int:
    """Orientations one particle searches locally at a HEALPix order (the coarse pass's padded rows): its directions
    within 3 sigma of its own, times its psi angles within 3 sigma, the largest of 32 particles spread over the
    sphere (``ops.sampling.local_search_sparse``).  ``sigma`` (degrees; 0: auto-refine's, twice the angular step of
    the next order, ``maximization.schedule.update_sampling``); ``sigma_psi`` the psi width when it differs (<= 0:
    every psi; ``--sigma_psi``)."""
    from .ops.sampling import angular_step, asymmetric_unit_directions, local_search_sparse, psi_angles
    from .ops.symmetry import direction_operators

    s = float(sigma) if sigma > 0 else 2.0 * angular_step(int(healpix_order) + 1)
    dirs = asymmetric_unit_directions(int(healpix_order), sym)
    i = np.arange(32) + 0.5  # a Fibonacci spiral of prior directions, psi priors between the grid's angles
    tilt = np.degrees(np.arccos(1.0 - 2.0 * i / 32))
    rot = (i * 137.50776405) % 360.0 - 180.0
    psi = (i * 53.3) % 360.0
    sp = s if sigma_psi is None else float(sigma_psi)
    lp = local_search_sparse(rot, tilt, psi, s, s, sp, dirs.rot, dirs.tilt, psi_angles(int(healpix_order)),
                             direction_operators(sym))
    return int(np.diff(lp.dir_ptr).max()) * int((lp.psi_prior > 0).sum(axis=1).max())


def _half_counts(n: int, halves: int) -> list[int]:
    return [n] if halves == 1 else [(n + 1) // 2, n // 2]


def worker_backend(device: str = "auto") -> str:
    """``"gpu"`` or ``"cpu"``: what E-step tasks compute on in this process (a Dask worker: ``client.run``)."""
    import numpy as np

    from .distributed.tasks import worker_array_module

    return "cpu" if worker_array_module(device) is np else "gpu"


def worker_gpu_memory(device: str = "auto") -> float:
    """Memory of the GPU that E-step tasks compute on in this process (``fine.device_memory_bytes``), 0 without one
    (``client.run``)."""
    if worker_backend(device) != "gpu":
        return 0.0
    import cupy

    from .expectation.fine import device_memory_bytes

    return float(device_memory_bytes(cupy))


CPU_AUTO_POOL = 64  # particles per E-step task on CPUs when --pool is not given
GPU_MIN_POOL = 128  # particles: below this a GPU task's fixed costs (projections, kernel launches) dominate
# particles per GPU task when --pool is not given: a pool's E-step has ~15-20 ms of host work (Python, ~480 kernel
# launches) whatever its size, while the GPU's work grows with the particles -- on an H100 (benchmarks/RESULTS.md,
# twentieth session) the last pool of a 128-px refinement took 5.2 + 18.8 ms of host time for 0.7 + 1.6 ms of GPU
# time at 106 particles, 6.1 + 13.6 ms for 3.8 + 6.7 ms at 999 and ~16 + 17 ms for 15.3 + 21.2 ms at 4,021
# (coarse + fine passes); the E-step of iterations 2-3 of a 16,000-particle refinement took 4.21 / 3.35 / 2.78 s
# with pools of 1000 / 2000 / 4000 (benchmarks/pool_sizes.py)
GPU_AUTO_POOL = 4000
GPU_POOL_SHARE = 0.25  # at most this fraction of a GPU's memory for what grows with the pool (GPU_AUTO_POOL halved)
# significant samples a particle assumed for the local searches of auto-refine's later iterations, where the pool's
# fine orientations are no longer bounded by the grid (HEALPix order 4-5: millions of orientations) but by the pool:
# ~8 per significant sample, rarely shared.  dev_refine's local iterations on the H100 (twentieth session): mean
# 6.4-10.8, median 5-8 (rlnNrOfSignificantSamples)
LOCAL_SIGNIFICANT = 8


def task_pool_size(pool: int, backend: str, n_particles: int = 0, workers: int = 0, gpu_bytes_of=None,
                   gpu_memory: float | None = None) -> int:
    """Particles per E-step task.  ``--pool`` when given (``pool > 0``), but at least :data:`GPU_MIN_POOL` when the
    tasks run on GPUs (a RELION command line's ``--pool 3`` means particles per CPU thread there).  Not given
    (``pool == 0``): :data:`CPU_AUTO_POOL` on CPUs; on GPUs :data:`GPU_AUTO_POOL`, at most the share of two tasks
    per Dask worker of ``n_particles`` (so that every GPU gets work and reads its next pool ahead), and halved while
    the plan's GPU memory (``gpu_bytes_of(pool)``) exceeds that of :data:`GPU_MIN_POOL` by more than
    :data:`GPU_POOL_SHARE` of the GPU's total ``gpu_memory`` (the total, not the free memory: the pools, and so
    the sums' rounding, do not depend on what else runs)."""
    pool = int(pool)
    if pool > 0:
        return max(pool, GPU_MIN_POOL) if backend == "gpu" else pool
    if backend != "gpu":
        return CPU_AUTO_POOL
    B = GPU_AUTO_POOL
    if workers > 1 and n_particles > 0:
        B = min(B, max(GPU_MIN_POOL, math.ceil(n_particles / (2 * workers))))
    if gpu_bytes_of is not None and gpu_memory:
        base = gpu_bytes_of(GPU_MIN_POOL)
        while B > GPU_MIN_POOL and gpu_bytes_of(B) - base > GPU_POOL_SHARE * gpu_memory:
            B = max(GPU_MIN_POOL, B // 2)
    return B


@dataclass(frozen=True)
class ExecutionTarget:
    """Where a job's E-step tasks run: ``workers`` Dask workers (0: in process), on ``backend``, with the total
    memory of the smallest GPU (``gpu_memory``, bytes; None on CPUs)."""

    workers: int
    backend: str
    gpu_memory: float | None


def execution_target(runner) -> ExecutionTarget:
    """The :class:`ExecutionTarget` of a runner (a Dask client's workers are asked what they compute on)."""
    workers, backend, gpu_memory = 0, "cpu", None
    client = getattr(runner, "client", None)
    device = getattr(runner, "device", "auto")
    if client is not None:
        wait = getattr(runner, "wait_for_a_worker", None)
        if device != "cpu" and wait is not None:  # e.g. SLURM worker jobs still queued: no worker to ask would mean
            wait("memory plan")  # a CPU plan (and pool) for a GPU run; the run needs a worker before its first task
        try:
            workers = len(client.scheduler_info(n_workers=-1)["workers"])
        except Exception:  # an older scheduler API or a lost connection: plan for one worker
            workers = 1
        workers = max(1, workers)
    if device != "cpu" and client is not None:  # the tasks run on the workers: plan for what they compute on
        try:
            sizes = [v for v in client.run(worker_gpu_memory, device).values() if v > 0]
            backend, gpu_memory = ("gpu", min(sizes)) if sizes else ("cpu", None)
        except Exception:  # no worker answered: the CPU plan (the larger host terms)
            backend = "cpu"
    elif device != "cpu":  # in this process, which imports CuPy for the E-step anyway unless told --device cpu
        backend = worker_backend(device)
        gpu_memory = worker_gpu_memory(device) if backend == "gpu" else None
    return ExecutionTarget(workers, backend, gpu_memory)


def plan_for_inputs(cfg, inp, runner, significant_fraction: float = 1.0, target: ExecutionTarget | None = None,
                    pool: int | None = None, local: bool = False) -> MemoryPlan:
    """The plan of a job about to run (the driver logs its summary at the start of every run), with the budgets of
    the smallest GPU the tasks run on (``target``: :func:`execution_target` of ``runner`` unless given), for
    ``pool`` particles per task (default: :func:`pool_for_inputs` of the same searches).  ``local``: the plan of its
    local searches (:data:`LOCAL_SIGNIFICANT` significant samples a particle, at the full size: auto-refine's last
    iterations, or every iteration with ``--sigma_ang``), else of its global ones."""
    t = target if target is not None else execution_target(runner)
    if pool is None:
        pool = pool_for_inputs(cfg, inp, t, local=local)
    order = cfg.healpix_order
    sigma, sigma_psi = local_widths(cfg)
    if local and getattr(cfg, "auto_refine", False) and sigma <= 0:  # local from auto_local_healpix_order on
        order = max(order, getattr(cfg, "auto_local_healpix_order", 4))
    return plan_memory(inp.box, inp.particles.n, pool, cfg.K, 2 if cfg.split_random_halves else 1,
                       order, cfg.sym, cfg.offset_range, cfg.offset_step, cfg.pad, inp.pixel_size,
                       inp.diameter, t.backend, t.workers, significant_fraction, gpu_memory_bytes=t.gpu_memory,
                       maxsig=getattr(cfg, "maxsig", -1), coarse_precision=getattr(cfg, "coarse_precision", "auto"),
                       local_significant=LOCAL_SIGNIFICANT if local else 0.0,
                       local_orientations=(local_search_orientations(order, cfg.sym, sigma,
                                                                     sigma_psi if sigma > 0 else None)
                                           if local else 0))


def has_local_searches(cfg) -> bool:
    """Whether a job searches locally in some iterations: auto-refine (its last ones) or ``--sigma_ang`` (all; or
    ``--sigma_rot`` / ``--sigma_tilt``: :func:`~gerelion_dask.config.local_widths`)."""
    return bool(getattr(cfg, "auto_refine", False) or local_widths(cfg)[0] > 0)


def has_global_searches(cfg) -> bool:
    """Whether a job searches globally in some iterations: all but ``--sigma_ang`` jobs and auto-refines that start
    at ``--auto_local_healpix_order`` or above (local searches from the first iteration)."""
    if local_widths(cfg)[0] > 0:
        return False
    return not (getattr(cfg, "auto_refine", False)
                and cfg.healpix_order >= getattr(cfg, "auto_local_healpix_order", 4))


def pool_for_inputs(cfg, inp, target: ExecutionTarget, local: bool | None = None) -> int:
    """Particles per E-step task of a job: :func:`task_pool_size` of its ``--pool`` on its target, the pool's GPU
    bytes from the plan of the same searches (:func:`plan_for_inputs`; local searches: each particle's fine rows,
    which the grid does not bound).  ``local``: the pool of the job's local-search iterations (True) or of its
    global ones (False); None: of a job's every iteration (local if it has any, :func:`has_local_searches`).  A given
    ``--pool`` is the same for both."""
    if local is None:
        local = has_local_searches(cfg)

    def gpu_bytes(B):
        return plan_for_inputs(cfg, inp, None, target=target, pool=B, local=local).gpu_bytes

    return task_pool_size(cfg.pool, target.backend, inp.particles.n, target.workers, gpu_bytes, target.gpu_memory)


def plan_main(argv) -> int:
    """``gerelion plan``: the memory a run will need, from the particles STAR file or from sizes alone."""
    from .cliargs import ArgumentParser as _OneLineParser

    p = _OneLineParser(prog="gerelion plan", allow_abbrev=False,
                                description="predict the host and GPU memory of a run (model: gerelion_dask/plan.py) "
                                "from its sizes; a refine/classify command line's other flags are accepted and "
                                "do not change the plan")
    p.add_argument("--i", help="particles STAR file (box, pixel size and particle count are read from it)")
    p.add_argument("--box", type=int, help="box size in pixels (without --i)")
    p.add_argument("--n_particles", type=int, default=10000, help="particles (without --i)")
    p.add_argument("--angpix", type=float, default=1.0, help="pixel size, Å (without --i)")
    p.add_argument("--particle_diameter", type=float, default=0.0)
    p.add_argument("--K", type=int, default=1)
    p.add_argument("--classify", action="store_true", help="classification (one half set) instead of auto-refine")
    p.add_argument("--healpix_order", type=int, default=2)
    p.add_argument("--sym", default="C1")
    p.add_argument("--offset_range", type=float, default=6.0)
    p.add_argument("--offset_step", type=float, default=2.0)
    p.add_argument("--pad", type=float, default=2.0)
    p.add_argument("--pool", type=int, default=0,
                   help="particles per E-step task (0: as a run chooses it for the device: task_pool_size)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--workers", type=int, default=0, help="Dask workers (0: in process)")
    p.add_argument("--gpu_memory", type=float, default=0.0,
                   help="GPU memory in GiB (with --device gpu; 0: an 80 GB H100's budgets, which larger GPUs use too)")
    p.add_argument("--maxsig", type=int, default=-1, help="most significant samples per particle (-1: no limit)")
    p.add_argument("--coarse_precision", choices=COARSE_PRECISIONS, default="auto",
                   help="the coarse pass's products (auto: float64 on a CPU and on GPUs with fast double "
                        "precision, counted as float64 here)")
    p.add_argument("--significant", type=float, default=1.0,
                   help="fraction of coarse orientations significant in a pool (1: the worst case)")
    ns, rest = p.parse_known_args(argv)
    # the rest of a refine/classify command line (--o, --ref, --ctf ...): accepted if those take it; its local
    # searches' flags (--sigma_ang, --auto_local_healpix_order) shape the plan of its local searches
    from .cli import refine_parser

    refine_ns, unknown = refine_parser("gerelion plan", ns.classify).parse_known_args(rest)
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    from .errors import InputError

    if ns.i:
        from .io.particles import ParticleSet

        ps = ParticleSet.from_star(ns.i)
        box, n, apix = ps.box_size, ps.n, ps.pixel_size
    elif ns.box:
        box, n, apix = ns.box, ns.n_particles, ns.angpix
    else:
        raise InputError(None, "give --i particles.star or --box N", "e.g. gerelion plan --box 256 --n_particles "
                         "100000 --healpix_order 2 --pool 64")
    if not 0 < ns.significant <= 1:
        raise InputError(None, f"--significant {ns.significant} must be in (0, 1]")
    if ns.gpu_memory < 0 or (ns.gpu_memory and ns.device != "gpu"):
        raise InputError(None, f"--gpu_memory {ns.gpu_memory:g} needs --device gpu and a size in GiB above 0")
    if ns.pool < 0:
        raise InputError(None, f"--pool {ns.pool} must be at least 1 (or 0: chosen for the device)")
    from types import SimpleNamespace

    from .expectation.fine import GPU_SIZED_FOR

    # the run these flags describe, sized as the driver sizes it (pool_for_inputs): auto-refine (two half sets,
    # local searches at the end) unless --classify; the GPU's budgets those of an 80 GB H100 unless --gpu_memory
    gpu = ns.device == "gpu"
    target = ExecutionTarget(ns.workers, "gpu" if gpu else "cpu",
                             ns.gpu_memory * 2**30 if ns.gpu_memory else (GPU_SIZED_FOR if gpu else None))
    cfg = SimpleNamespace(pool=ns.pool, K=ns.K, auto_refine=not ns.classify, split_random_halves=not ns.classify,
                          healpix_order=ns.healpix_order, sym=ns.sym, offset_range=ns.offset_range,
                          offset_step=ns.offset_step, pad=ns.pad, maxsig=ns.maxsig,
                          coarse_precision=ns.coarse_precision, sigma_ang=refine_ns.sigma_ang,
                          sigma_rot=refine_ns.sigma_rot, sigma_tilt=refine_ns.sigma_tilt,
                          sigma_psi=refine_ns.sigma_psi,
                          auto_local_healpix_order=refine_ns.auto_local_healpix_order)
    inp = SimpleNamespace(box=box, particles=SimpleNamespace(n=n), pixel_size=apix, diameter=ns.particle_diameter)
    if has_global_searches(cfg):
        print(plan_for_inputs(cfg, inp, None, ns.significant, target).table())
    if has_local_searches(cfg):  # auto-refine's last iterations (all from --auto_local_healpix_order), full size
        print("\nlocal searches (auto-refine's last iterations):" if has_global_searches(cfg) else
              "local searches (every iteration):")
        print(plan_for_inputs(cfg, inp, None, ns.significant, target, local=True).table())
    return 0
