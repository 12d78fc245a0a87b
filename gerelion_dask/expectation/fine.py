"""Pass 2 of the E-step (ALGORITHM.md §4.3-4.6): the children of significant coarse samples, batched over particles.

Every particle's significant coarse samples ``(class, orientation, translation)`` have 8 x 4 children (oversampling
1), and only those children are evaluated (:func:`~gerelion_dask.ops.likelihood.children_diff2`, a thread block per
significant sample on a GPU),

    diff2(j, f, t) = a_j + sum_k w_jk c_jk^2 |P_f(k)|^2 - 2 Re sum_k (w_jk c_jk X_j(k) s_t(k)) conj(P_f(k))

with the projections ``P_f`` of every fine orientation the pool needs made once per pool (:class:`FineProjections`,
shared by the pools of an iteration through a :class:`ProjectionCache`).  Posterior weights and significance are
taken per group of particles (the whole pool unless its padded child layout exceeds the chunk budget).

The weighted sums of §4.6 are taken over the (particle, class, fine orientation) pairs that kept any weight after
the fine pass's significance threshold: with ``Q = sum_t w_t s_t`` (a pair's weights over its fine translations times
the translation phases), the pair adds ``Q * X_j * c_j / sigma^2`` to the back-projection data of its orientation, and
``Re(X_j conj(P_f) Q)`` to the model/data cross term of its particle's noise, scale and norm sums.  Back-projection
sums of all particles of the pool are merged per fine orientation before one 3D insertion each.

Particles with flat posteriors (the first iterations from a low-pass start keep about half of their coarse samples
significant) take another route to the same numbers (``FINE_LIMITS``' ``flat_waste``): their children form one
dense block over the pool's significant coarse orientations and translations (:class:`_FlatLayout`), diff2 and the
weighted sums are GEMMs over it (:func:`~gerelion_dask.ops.likelihood.block_diff2`,
:func:`~gerelion_dask.ops.likelihood.block_sums`), and children of samples that were not significant get prior
``-inf``, as if never evaluated.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..backend import deep_nbytes, get_xp, scatter_add, to_host
from ..conventions import freq_indices_2d, matrix_to_euler, shift_phase, window_rfft2
from ..ops.backprojector import BackProjection, insert_slices
from ..ops.fourier import cc_image_norm, cc_pixel_weights, likelihood_pixels, shells_2d
from ..ops.indexing import concat_ranges, distinct
from ..ops.likelihood import add_rows, block_diff2, block_sums, children_diff2, pair_sums
from ..ops.projector import project
from .grid import OrientationGrid
from .partials import Partials, PoolResult, empty_partials
from .weights import best_sample_weights, kept_weights, posterior_weights

__all__ = ["FINE_LIMITS", "GPU_SIZED_FOR", "ProjectionCache", "Significant", "device_memory_bytes",
           "fine_limits", "fine_pass", "gpu_limits", "insert_row_bytes", "project_row_bytes"]

# Work budgets per chunk of particles (values; the coarse pass's chunks and the fine pass's groups), per backend: on a
# GPU large chunks amortise kernel launches (2^26 values against 2^25: 4,690 against 4,060 particles/s at ~40
# significant samples, the same at ~7; benchmarks/RESULTS.md).
# The coarse pass runs its GEMMs in float64 on CPUs (the reference path) and on GPUs whose double precision runs at
# half their single-precision rate or better (H100: 5.67e9 against 5.31e9 coarse evaluations/s at 64 px, dev_refine
# 55 against 59 s, and the CPU run's poses exactly; RESULTS.md, fourteenth session), in float32 on other GPUs
# (workstation cards: 1/32 to 1/64), where its selection of significant samples drifts from the CPU run's.
# ``coarse_factor``: a global coarse search's chunks hold ``coarse_factor x max_elems`` samples (on a GPU 8: one
# chunk for the default pool of 4,000 at HEALPix order 2 with up to 29 translations, where chunks of ~1,400
# particles paid the selection's fixed steps and ~5 ms of host time three times; 4 GiB of float64 cross terms).
# ``local_rows_factor``: a local search's chunks gather each particle's own projection rows (~40 bytes a pixel a
# row: interleaved projections and their power) into at most ``local_rows_factor x 8 max_elems`` bytes (on a GPU 4
# GiB, at most ~5 GiB with the chunk's other arrays: one chunk, not four, for a 1,000-particle order-5 pool at 64
# px, each chunk costing ~5 ms of host time; benchmarks/RESULTS.md, twenty-first session).
# ``cache_bytes``: the most a ProjectionCache keeps per iteration and half set.  ``slice_bytes``: the working
# memory of one chunk of the 3D insertion at the end of the fine pass (``insert_row_bytes`` per slice); all of a
# pool's slices at once took 9-12 GB per 1,000 slices at 256 px when the kernel read whole slices (memory_check
# --lines).
# ``project_bytes``: the working memory of one chunk of projections (``project_gathered``); NumPy's projector makes
# ~200 bytes of temporaries per half-plane pixel and runs 3-4x faster in chunks of 8 MiB than of up to 4 GiB (cache
# misses; 32, 64 and 128 px on the 2-core VM: 12,900 / 2,680 / 711 against 4,370 / 693 / 178 projections/s,
# RESULTS.md, seventeenth session; benchmarks/projection_chunks.py).
# ``flat_waste``: a particle's children are evaluated as one dense block over the pool's significant coarse
# orientations and translations (:func:`_flat_group`) when that block holds at most ``flat_waste`` times its own
# children (0: never).  Flat posteriors (the first iterations from a low-pass start keep about half of 96,768 coarse
# samples significant) cost 50-200x any later iteration one child at a time; on a CPU the blocks' GEMMs make a flat
# 62-particle pool's fine pass 4x faster (151 -> 37 s), and 16 beat 4, 8 and 32 (200 particles at 32 px: refine
# iterations 1-3 87 / 97 / 83 s against 90 / 159 / 106 s with 4; K=2 classification iterations 2-4 26 s against
# 31-47 s; RESULTS.md, twenty-second session).  On an H100 (twenty-third session, 6efb55f) the blocks took
# iteration 1 of 8,000 particles at 128 px from 128.5 to 33.7 s (iteration 2 4.85 -> 1.43 s, the same statistics)
# and a flat 982-particle pool's fine pass from 49.9 to 5.6 s; 64 beat 16 and 4 on the first set (29.9 / 36.2 / 90.0
# s) and tied on the second (256 too).
FINE_LIMITS = {"cpu": {"max_elems": 1 << 22, "coarse_dtype": "float64", "cache_bytes": 1 << 30,
                       "slice_bytes": 4 << 30, "project_bytes": 8 << 20, "coarse_factor": 1,
                       "local_rows_factor": 1, "flat_waste": 16.0},
               "gpu": {"max_elems": 1 << 26, "coarse_dtype": "float32", "cache_bytes": 8 << 30,
                       "slice_bytes": 2 << 30, "project_bytes": 2 << 30, "coarse_factor": 8,
                       "local_rows_factor": 8, "flat_waste": 64.0}}


# FINE_LIMITS["gpu"] was sized on an 80 GB H100 (79.6 GiB usable); GPUs from here up use it as it is
GPU_SIZED_FOR = 78 << 30


def gpu_limits(limits: dict, total_bytes: float) -> dict:
    """``limits`` (a ``FINE_LIMITS["gpu"]``) for a GPU of ``total_bytes``: the dict itself from ``GPU_SIZED_FOR``
    up; below, a copy whose projection caches, slice chunks and chunk budget shrink with the memory (the budget to a
    power of two of at least 2^20 values, the slice chunks to at least 64 MiB).  From the device's total, not its
    free memory, so that a run's chunks, and so its sums to the last bit, do not depend on what else is running."""
    if total_bytes >= GPU_SIZED_FOR:
        return limits
    f = max(float(total_bytes), 1.0) / GPU_SIZED_FOR
    out = dict(limits)
    out["cache_bytes"] = int(limits["cache_bytes"] * f)
    out["slice_bytes"] = max(64 << 20, int(limits["slice_bytes"] * f))
    out["project_bytes"] = max(64 << 20, int(limits["project_bytes"] * f))
    out["max_elems"] = max(1 << 20, 1 << int(math.log2(max(1.0, limits["max_elems"] * f))))
    return out


def device_memory_bytes(xp) -> int:
    """The memory the current CuPy device offers this process: its total, or less where CuPy's memory pool is limited
    (``CUPY_GPU_MEMORY_LIMIT``, e.g. ``50%`` on a shared GPU, or ``set_limit``)."""
    total = int(xp.cuda.runtime.memGetInfo()[1])
    limit = int(xp.get_default_memory_pool().get_limit())
    return min(total, limit) if limit > 0 else total


# a GPU whose float64 rate is at least this fraction of its float32 rate runs the coarse GEMMs in float64
FAST_FP64_RATIO = 2


@functools.lru_cache(maxsize=None)
def _fp64_ratio(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes.get("SingleToDoublePrecisionPerfRatio", 64))


def fine_limits(xp) -> dict:
    """The ``FINE_LIMITS`` entry of the backend ``xp`` computes on: ``"cpu"`` for NumPy, else ``"gpu"`` for the
    current device's memory (:func:`gpu_limits` of :func:`device_memory_bytes`), with ``coarse_dtype`` float64 where
    the device's double precision is fast (``FAST_FP64_RATIO``)."""
    if xp is np:
        return FINE_LIMITS["cpu"]
    limits = gpu_limits(FINE_LIMITS["gpu"], device_memory_bytes(xp))
    if _fp64_ratio(int(xp.cuda.runtime.getDevice())) <= FAST_FP64_RATIO:
        limits = dict(limits, coarse_dtype="float64")
    return limits


def project_row_bytes(n: int, gpu: bool = False) -> int:
    """Bytes the projection of one ``n``-px slice holds at most (``ops.projector.project``): on a GPU its output
    (``16 h``, ``h = n (n/2+1)``: a whole complex128 slice, or the fewer pixels of a mask; one kernel,
    ``kernels/projector.py``); NumPy computes the likelihood pixels only, with their 3D coordinates, Friedel-folded
    corners, fractions and indices (~200 bytes a pixel, counted here for the whole half plane: an upper bound);
    ``gerelion plan`` uses the same number."""
    return (16 if gpu else 200) * n * (n // 2 + 1)


def insert_row_bytes(M: int) -> int:
    """Bytes the 3D insertion of one slice with ``M`` likelihood pixels holds: the row of sums gathered for it
    (``24 M``; CuPy's kernel and NumPy both read the rows of the mask's pixels, NumPy a few MiB of pixels at a time,
    ``ops.backprojector.NUMPY_CHUNK_BYTES``, not counted per row).  ``gerelion plan`` uses the same number."""
    return 24 * M


def gather(a, mask):
    """Window pixels of ``a (..., n, n/2+1)`` selected by a boolean mask -> ``(..., M)``."""
    return a[..., mask]


def project_gathered(ref, A, n: int, mask, xp, max_bytes: int | None = None):
    """Projections of ``ref`` at the rotations ``A (R, 3, 3)``, size ``n``, window pixels ``mask`` -> ``(R, M)``;
    a chunk of rotations at a time whose full slices hold at most ``max_bytes`` (default: the backend's
    ``FINE_LIMITS[...]["project_bytes"]``; at most 4,096 rotations), written into one output array."""
    if max_bytes is None:
        max_bytes = fine_limits(xp)["project_bytes"]
    chunk = min(4096, max(1, int(max_bytes // project_row_bytes(n, xp is not np))))
    out = None
    for s in range(0, len(A), chunk):
        part = project(ref, xp.asarray(A[s : s + chunk]), n, pixels=mask)
        if out is None:
            out = xp.empty((len(A),) + part.shape[1:], part.dtype)
        out[s : s + len(part)] = part
        part = None
    return out if out is not None else project(ref, xp.asarray(A[:0]), n, pixels=mask)


def grid_of(model):
    for r in model.refs:
        if r is not None:
            return r.grid
    raise ValueError("no non-empty class in the model")


@dataclass(frozen=True)
class Significant:
    """The significant coarse samples of a pool after pass 1, one row each, sorted by particle (COO form)."""

    b: np.ndarray  # particle (row in the pool)
    c: np.ndarray  # class (0-based)
    o: np.ndarray  # coarse orientation (dir * n_psi + psi)
    t: np.ndarray  # coarse translation
    lp: np.ndarray  # log prior of the coarse sample (its children inherit it)
    n_sig: np.ndarray  # (B,) significant samples per particle
    best: np.ndarray  # (B,) class * n_orient + orientation of the best coarse sample (the fine pass groups by it)
    n_orient: int

    def rows_of(self, J) -> np.ndarray:
        """The rows of the particles ``J``, particle by particle in the order of ``J``."""
        lo = np.searchsorted(self.b, J, side="left")
        return concat_ranges(lo, np.searchsorted(self.b, J, side="right") - lo)


def _local_index(J, b):
    pos = np.full(int(max(J)) + 1, -1)
    pos[J] = np.arange(len(J))
    return pos[b]


class ProjectionCache:
    """Fine-orientation projections shared by the pools of one iteration and half set on one process.

    Every pool of an iteration uses the same model and fine grid, so the projection of a fine orientation (by its
    global id) is the same in every pool; the pools a worker runs one after another project only what earlier pools
    did not.  Create one per (iteration, half set, current size) - the owner keys it by the model object - and
    at most ``max_bytes`` are kept (beyond that, projections are computed for the pool only).
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._rows = {}  # class -> (R, M) array of every projection cached, in the order they were made
        self._index = {}  # class -> (gids sorted, their rows in that array)
        self._whole = {}  # key -> the coarse pass's projections of the whole coarse grid (global searches)

    def clear(self) -> None:
        self._rows, self._index, self._whole, self.nbytes = {}, {}, {}, 0

    def whole(self, key, compute):
        """``compute()`` once per ``key`` (the coarse pass keys its whole-grid projections by class and size)."""
        if key in self._whole:
            return self._whole[key]
        value = compute()
        size = deep_nbytes(value)
        if self.nbytes + size <= self.max_bytes:
            self._whole[key] = value
            self.nbytes += size
        return value

    def rows(self, c: int, gids: np.ndarray, compute):
        """Projections of the sorted unique fine-orientation ids ``gids`` of class ``c``: ``(P, where)``, the
        projection of ``gids[i]`` being ``P[where[i]]``; ``compute(ids)`` makes the missing ones.  ``P`` is the
        cache's own array (one per class, grown by the missing rows) unless they do not fit its budget, when it is
        made for these ids alone; read it, never write to it.  A pool never holds a copy of cached rows (2.5 GiB at
        256 px)."""
        if not len(gids):
            return compute(gids), np.zeros(0, np.int64)
        have = self._rows.get(c)
        have_g, have_r = self._index.get(c, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        missing = gids[~np.isin(gids, have_g, assume_unique=True)]
        if missing.size:
            new = compute(missing)
            if self.nbytes + new.nbytes <= self.max_bytes:  # grow the cache's array
                xp = get_xp(new)
                grown = new if have is None else xp.concatenate([have, new])
                have = new = None
                g = np.concatenate([have_g, missing])
                r = np.concatenate([have_r, np.arange(len(have_r), len(g))])
                order = np.argsort(g, kind="stable")
                self._rows[c], self._index[c] = grown, (g[order], r[order])
                self.nbytes += (len(grown) - len(have_r)) * grown.shape[1] * grown.itemsize
            else:  # over budget: these ids' rows alone, the cached ones copied
                present = gids[np.isin(gids, have_g, assume_unique=True)]
                if present.size:
                    xp = get_xp(new)
                    new = xp.concatenate([have[xp.asarray(have_r[np.searchsorted(have_g, present)])], new])
                return new, _rows_of(np.concatenate([present, missing]), gids)
        g, r = self._index[c]
        return self._rows[c], r[np.searchsorted(g, gids)]


def _rows_of(g: np.ndarray, gids: np.ndarray) -> np.ndarray:
    """Position in ``g`` (unique values, any order) of each of ``gids`` (all present)."""
    order = np.argsort(g, kind="stable")
    return order[np.searchsorted(g[order], gids)]


class FineProjections:
    """Projections of every fine orientation any particle of the pool needs, computed once per class (and, with a
    :class:`ProjectionCache`, once per iteration on this process).

    The fine grid (with its perturbation) is shared by all particles of an iteration, so a pool projects the union
    of the children of its significant coarse orientations once instead of once per particle.
    """

    def __init__(self, model, grid: OrientationGrid, sig: Significant, n: int, mask, xp,
                 cache: ProjectionCache | None = None):
        self.rows = {}  # class -> the pool's fine-orientation ids, sorted: the pool's rows
        self.data = {}  # class -> projections: the pool's row i is data[c][where[c][i]] (maybe the cache's array)
        self.where = {}
        self._rows_x = {}  # class -> ``rows`` on the device (made once: positions() runs per group)

        def compute(c):
            def make(gid):
                return project_gathered(model.refs[c], grid.fine_matrices_from_ids(gid), n, mask, xp)
            return make

        for c in distinct(sig.c):
            o = distinct(sig.o[sig.c == c])
            gid = np.sort(grid.fine_ids(o).reshape(-1))
            if cache is not None:
                self.data[c], where = cache.rows(int(c), gid, compute(c))
            else:
                self.data[c], where = compute(c)(gid), np.arange(len(gid))
            self.rows[c] = gid
            self.where[c] = xp.asarray(where)

    def positions(self, c: int, gid):
        """The pool's rows of the fine-orientation ids ``gid`` (on ``gid``'s backend)."""
        xp = get_xp(gid)
        if xp is np:
            return np.searchsorted(self.rows[c], gid)
        if c not in self._rows_x:
            self._rows_x[c] = xp.asarray(self.rows[c])
        return xp.searchsorted(self._rows_x[c], gid)

    def members(self, c: int, gid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Host ids ``gid`` that may be absent from the pool: ``(rows, present)``, ``rows`` valid where ``present``
        (:meth:`positions` takes ids that are all there)."""
        have = self.rows[c]
        pos = np.minimum(np.searchsorted(have, gid), len(have) - 1)
        return pos, have[pos] == gid

    def projections(self, c: int, pool_rows):
        """Rows of ``data[c]`` holding the projections of the pool's rows ``pool_rows``."""
        return self.where[c][pool_rows]

    def gids(self, c: int) -> np.ndarray:
        return self.rows[c]


@dataclass(frozen=True)
class _PoolPixels:
    """A pool's arrays at the fine pass's likelihood pixels, ``(B, M)`` (``a``: ``(B,)``), on the pool's device."""

    X: object  # masked images
    Xnm: object  # unmasked images (back-projection)
    C: object  # CTF x scale
    Cr: object  # CTF on the reference (ones without --ctf on the likelihood side)
    Wd: object  # 1 / (2 sigma^2) at the likelihood shells, else 0
    Wbp: object  # 1 / sigma^2
    a: object  # sum Wd |X|^2 + the high-resolution part: the image term of diff2
    wcc: object = None  # --firstiter_cc: the pixels' weights in RELION's CC sums, (1, M)
    xnorm: object = None  # --firstiter_cc: the images' norms over the whole window, (B,)

    def backprojection_terms(self):
        """The back-projection's data and weight terms of each image: ``X c / sigma^2`` (unmasked image) and
        ``c^2 / sigma^2``, ``(B, M)``."""
        return self.Xnm * self.C * self.Wbp, self.C * self.C * self.Wbp

    def diff2_terms(self, rows, cc: bool):
        """``(Z, V, a)`` of the particles ``rows`` (an index array, or ``slice(None)``) for
        :func:`~gerelion_dask.ops.likelihood.children_diff2`: ``w c X``, ``w c^2`` and the image term, or for CC
        RELION's CC sums (``cc_pixel_weights``) and the whole window's image power (``cc_image_norm``)."""
        X, Cr = self.X[rows], self.Cr[rows]
        if cc:
            return Cr * X * self.wcc, Cr * Cr * self.wcc, self.xnorm[rows]
        Wd = self.Wd[rows]
        return Wd * Cr * X, Wd * Cr * Cr, self.a[rows]


@dataclass(frozen=True)
class _FinePixels:
    """The fine pass's pixel tables of one current size ``n`` (box ``N``), the same for every pool of an iteration
    (kept in the :class:`ProjectionCache` as the coarse pass keeps its own)."""

    mask: np.ndarray  # (n, n/2+1) host: the likelihood pixels with the DC term (the weighted sums' pixels)
    shells: np.ndarray  # (M,) host: their shells
    mask_x: object  # the mask, the shells and the likelihood pixels among them (shell >= 1) on the device
    shells_x: object
    lik_x: object
    shell_1hot: object  # (M, N/2+1) float64 on the device: pixel -> shell
    kx: object  # (M,) integer frequencies on the device (the translations' phases)
    ky: object

    @staticmethod
    def make(n: int, N: int, xp) -> "_FinePixels":
        mb = likelihood_pixels(n, include_dc=True)
        shb = shells_2d(n)[mb]
        ky, kx = freq_indices_2d(n)
        shb_x = xp.asarray(shb)
        return _FinePixels(mb, shb, xp.asarray(mb), shb_x, xp.asarray(shb >= 1),
                           (shb_x[:, None] == xp.arange(N // 2 + 1)[None, :]).astype(np.float64),
                           xp.asarray(kx[mb]), xp.asarray(ky[mb]))


def pool_pixels(xp, pre, particles, model, settings, cache: ProjectionCache | None = None):
    """A preprocessed pool at the likelihood pixels of its current size: ``(_FinePixels, _PoolPixels, |X|^2)``, the
    images, CTFs (times the groups' scales), noise weights and diff2 image terms every pass over the pool's samples
    (the fine pass, the fixed-pose pass of ``--skip_align``) starts from."""
    ps = settings.preprocess
    N, n = ps.ori_size, ps.current_size
    sig2 = np.asarray(model.sigma2_noise, dtype=np.float64)
    scale = np.asarray(model.scales)[particles.group]
    og = np.asarray(particles.optics_group)
    key = ("fine-pixels", n, N)
    pix = cache.whole(key, lambda: _FinePixels.make(n, N, xp)) if cache is not None else _FinePixels.make(n, N, xp)
    mb_x, lik = pix.mask_x, pix.lik_x
    s2_all = xp.asarray(sig2)[xp.asarray(og)][:, pix.shells_x]  # (B, M), gathered on the device
    X_all = gather(pre.fimg, mb_x)
    C_all = gather(pre.ctf, mb_x) * xp.asarray(scale)[:, None]
    Wd_all = xp.where(lik[None], 1.0 / (2.0 * s2_all), 0.0)
    X2_all = xp.abs(X_all) ** 2
    hr_xi2 = to_host(pre.highres_xi2)
    a = (Wd_all * X2_all).sum(axis=1)
    strict = 0 < settings.strict_size < n  # --strict_highres_exp: probabilities from a smaller window's pixels
    if strict:
        def masks():  # (device arrays; once per iteration and sizes with a cache, like the fine pixels)
            return tuple(xp.asarray(v)[None] for v in strict_pixels(pix, settings.strict_size))

        skey = ("strict-pixels", n, N, settings.strict_size)
        window, circle = cache.whole(skey, masks) if cache is not None else masks()
        a = (Wd_all * window * X2_all).sum(axis=1)  # the image term of the smaller window's diff2
        Wd_all = Wd_all * circle  # where its projections are not 0 (beyond, diff2 gets the same |X|^2 always)
    wcc = xnorm = None
    if settings.do_cc:
        m = settings.strict_size if strict else n
        wcc = gather(cc_pixel_weights(n, xp), mb_x)[None, :] * (circle if strict else 1.0)
        xnorm = cc_image_norm(window_rfft2(pre.fimg, m), m)
    px = _PoolPixels(X_all, gather(pre.fimg_nomask, mb_x), C_all, C_all if settings.ctf_on_reference else
                     xp.ones_like(C_all), Wd_all, 1.0 / s2_all, a + xp.asarray(hr_xi2) / 2.0, wcc, xnorm)
    return pix, px, X2_all


def pass_start(xp, pre, particles, model, settings, cache: ProjectionCache | None = None):
    """What a pass over a pool's samples starts from: :func:`pool_pixels` ``(pix, px, |X|^2)``, then per optics group
    the log-likelihood's normalisation ``sum log(2 pi sigma^2)`` over the likelihood shells, per class the pixels of
    the scale sums (shells where its data dominate its prior), each image's power beyond the current size, the
    pool's empty :class:`Partials` and its host accumulators (summed into by :func:`_sums_to_host`)."""
    N = settings.preprocess.ori_size
    K = len(model.refs)
    pix, px, X2 = pool_pixels(xp, pre, particles, model, settings, cache)
    shb = pix.shells
    sig2 = np.asarray(model.sigma2_noise, dtype=np.float64)
    logsig = np.array([np.log(2 * np.pi * sig2[g][shb[shb >= 1]]).sum() for g in range(sig2.shape[0])])
    goodf = {c: xp.asarray((np.asarray(model.data_vs_prior)[c][shb] > 3).astype(np.float64)) for c in range(K)}
    partials = empty_partials(particles.half, grid_of(model), K, settings.grid.n_dir, settings.n_optics,
                              settings.n_groups, N, np)
    acc = {f: np.array(getattr(partials, f), dtype=np.float64, copy=True) for f in
           ("wsum_sigma2", "sumw_optics", "wsum_pdf_class", "wsum_pdf_direction", "wsum_scale_xa", "wsum_scale_aa",
            "group_counts")}
    return pix, px, X2, logsig, goodf, to_host(pre.power_highres), partials, acc


def strict_pixels(pix: "_FinePixels", size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of the fine pass's pixels (``pix``, of a window of the current size) are likelihood pixels of the
    smaller window ``size`` at the same frequency, and which of those lie within its projections' circle
    ``|k| <= size / 2`` (``--strict_highres_exp``: RELION computes the probabilities of both passes at that size,
    where projections are 0 beyond the circle, and the weighted sums at the current size): two ``(M,)`` bool arrays
    on the host."""
    ky, kx = freq_indices_2d(size)
    small = likelihood_pixels(size, include_dc=True)
    big = max(size, pix.mask.shape[0])  # frequencies of either window lie in [-big/2, big/2]
    span = 2 * big + 1
    keys = np.sort((ky[small] + big) * span + kx[small])
    mine = (to_host(pix.ky) + big) * span + to_host(pix.kx)
    pos = np.minimum(np.searchsorted(keys, mine), len(keys) - 1)
    window = keys[pos] == mine
    k2 = to_host(pix.kx).astype(np.int64) ** 2 + to_host(pix.ky).astype(np.int64) ** 2
    return window, window & (4 * k2 <= size * size)


def _group_particles(order: np.ndarray, n_sig: np.ndarray, max_elems: int) -> list[np.ndarray]:
    """Consecutive runs of ``order`` whose padded child layout (members x 32 x their most significant samples)
    holds at most ``max_elems`` values and whose children (32 per significant sample) number at most
    ``max_elems / 16``: the host keeps ~15 index arrays per child that kept weight (at least one particle each)."""
    owns = 32 * np.maximum(np.asarray(n_sig, np.int64)[order], 1)
    if len(order) * int(owns.max(initial=0)) <= max_elems and int(owns.sum()) <= max_elems // 16:
        return [order] if len(order) else []  # one group (the loop below would make the same one)
    groups, start, widest, children = [], 0, 0, 0
    for i, j in enumerate(order):
        own = 32 * max(int(n_sig[j]), 1)
        if i > start and ((i - start + 1) * max(widest, own) > max_elems or children + own > max_elems // 16):
            groups.append(order[start:i])
            start, widest, children = i, 0, 0
        widest, children = max(widest, own), children + own
    if len(order):
        groups.append(order[start:])
    return groups


# rows of a group's sample table (:func:`_sample_table`): each significant sample's particle (its position in
# the group and in the pool), class, class x direction (the direction sums' index), first fine translation (a row
# of the pool's phases), then the global ids of its 8 fine orientations
_T_J, _T_POOL, _T_CLASS, _T_CDIR, _T_TROW, _T_FID = 0, 1, 2, 3, 4, 5


def _sample_table(xp, sig: Significant, G: np.ndarray, r: np.ndarray, jl: np.ndarray, grid, ut_pool):
    """The group's significant samples ``r`` as one ``(13, len(r))`` int64 table on the pool's device (rows
    ``_T_*``, each a contiguous column of the samples), made on the host and copied once: the children's diff2 and
    the weighted sums' bookkeeping read their indices from it instead of copying and deriving each one.  Stored by
    field so that a flat iteration's millions of children gather only the fields they read (gathering whole
    13-field rows made NumPy's fine pass of iteration 1 20 % slower)."""
    o, c = sig.o[r], sig.c[r].astype(np.int64)
    cols = [jl, G[jl], c, c * grid.n_dir + o // grid.n_psi, np.searchsorted(ut_pool, sig.t[r]) * 4]
    return xp.asarray(np.concatenate([np.stack(cols), grid.fine_ids(o).T]).astype(np.int64))


def _children_diff2(xp, px: _PoolPixels, fp: FineProjections, cr: np.ndarray, tab, G: np.ndarray, ph_pool,
                    do_cc: bool, max_elems: int):
    """diff2 (or -CC) of the 32 children of a group's significant samples (``tab``: their :func:`_sample_table`,
    ``cr`` their classes on the host) of the group of particles ``G``: ``(len(cr), 32)``, child ``4 f + t`` for fine
    orientation ``f`` and fine translation ``t`` (:func:`~gerelion_dask.ops.likelihood.children_diff2`, per
    class)."""
    Z, V, a = px.diff2_terms(xp.asarray(G), do_cc)
    d = xp.empty((len(cr), 32), np.float64)
    for c in distinct(cr):
        sel = np.nonzero(cr == c)[0]
        whole = len(sel) == len(cr)
        sx = None if whole else xp.asarray(sel)
        t = tab if whole else tab[:, sx]
        prow = fp.projections(c, fp.positions(c, xp.ascontiguousarray(t[_T_FID:].T)))  # (S, 8) children's rows
        d_c = children_diff2(Z, V, a, ph_pool, fp.data[c], t[_T_J], prow, t[_T_TROW], do_cc, max_elems)
        if whole:
            return d_c
        d[sx] = d_c
    return d


def _child_posteriors(xp, d, lp, jl: np.ndarray, q: np.ndarray, first: np.ndarray, cnt: np.ndarray, settings):
    """Normalised posterior weights of a group's children ``d (R, 32)`` (row ``r`` the ``q[r]``-th significant
    sample of the group's particle ``jl[r]``; a particle's rows ``first .. first + cnt - 1``), thresholded at the
    significance of the fine samples (RELION keeps weights >= the significant weight in its sums); with
    ``--firstiter_cc`` the best child alone has weight 1.  Returns ``(w (R, 32), dmin, sumw, bad, best, pmax)``,
    all on the device of ``d``: ``best`` the position of each particle's largest weight among its children
    (``32 q + child``), ``bad`` (particles whose weights all underflowed).

    NumPy (and CuPy for CC or particles with over ``kernels.posteriors.CHILD_CAP`` children) lays the children out
    padded, ``(b, 32 (max q + 1))``, and runs :func:`posterior_weights` and :func:`significance_threshold` on it; the
    CuPy twin is one kernel with a thread block per particle (:mod:`gerelion_dask.kernels.posteriors`)."""
    b = len(cnt)
    if xp is not np and not settings.do_cc:
        from ..kernels.posteriors import child_posteriors, fits

        if fits(cnt):
            w, dmin, sumw, bad, best, pmax = child_posteriors(d, lp, first, cnt, settings.adaptive_fraction,
                                                              settings.maxsig)
            return w, dmin, sumw, bad, best, pmax
    L = 32 * (int(q.max()) + 1)
    jq = (xp.asarray(jl), xp.asarray(q))
    D = xp.full((b, L // 32, 32), xp.inf)
    LP = xp.full((b, L // 32, 32), -xp.inf)
    D[jq] = d
    LP[jq] = xp.asarray(lp)[:, None]  # children inherit their parent's prior
    D, LP = D.reshape(b, L), LP.reshape(b, L)
    if settings.do_cc:
        w, dmin, sumw, bad = best_sample_weights(D, LP)
    else:
        w, dmin, sumw, bad = posterior_weights(D, LP)
        del D, LP
        w = kept_weights(w, sumw, settings.adaptive_fraction, settings.maxsig)
    best, pmax = xp.argmax(w, axis=1), w.max(axis=1)
    return w.reshape(b, L // 32, 32)[jq], dmin, sumw, bad, best, pmax


# a flat particle (FINE_LIMITS' flat_waste) takes a dense block when it is one of at least FLAT_MIN_RUN consecutive
# flat particles of the pool (or of a whole group)
FLAT_MIN_RUN = 8


@dataclass(frozen=True)
class _FlatLayout:
    """The dense child layout of a pool's flat particles: per particle ``(K', 4 n_t, F)`` children -- the pool's
    classes with significant samples, the fine translations of its ``n_t`` distinct coarse ones (rows of its phases),
    the ``F = 8 |U|`` fine orientations of the union ``U`` of its significant coarse orientations (column ``8 u + i``:
    child ``i`` of ``U[u]``) -- with each class's projections of them (zero rows where the class has none: no sample
    of the pool is there, so no child either) on the pool's device."""

    classes: np.ndarray  # (K',) host
    U: np.ndarray  # (|U|,) host, sorted
    nt: int
    P: list  # per class (F, M) complex128
    power: list  # per class (F, M) |P|^2
    cols: list  # per class: the columns the class has projections for (device) ...
    rows: list  # ... and their rows in the pool's back-projection sums (FineProjections' pool rows; device)
    udir: object  # (|U|,) the directions of U (device: the direction sums)
    of_class: object  # device lookup tables: a class's position in ``classes`` ...
    of_t: object  # ... a coarse translation's among the pool's distinct ones (``ut_pool``) ...
    of_o: object  # ... and a coarse orientation's in ``U``


def _flat_particles(n_sig: np.ndarray, width: int, max_elems: int, proj_bytes: int, budget: int, waste: float):
    """The particles of a pool whose children are evaluated as one dense block of ``width`` children each (those
    with at least ``width / waste`` children: ``FINE_LIMITS``' ``flat_waste``): ``(B,)`` bool, or None.  None also
    when one particle's block exceeds ``4 max_elems`` values (a flat particle's padded children in the sparse path
    take as many: 32 x ~110,000 significant samples at HEALPix order 2; halving the budget after running out of
    memory ends in the sparse path) or the layout's projections (``proj_bytes``) the ``budget``."""
    if width > 4 * max_elems or proj_bytes > budget:
        return None
    flat = 32 * n_sig * waste >= width
    return flat if flat.any() else None


def _lookup(xp, values: np.ndarray, bound: int):
    """A device table of the positions of the distinct ``values`` (all in ``[0, bound)``; -1 elsewhere)."""
    table = np.full(bound, -1, np.int64)
    table[values] = np.arange(len(values))
    return xp.asarray(table)


def _flat_runs(J: np.ndarray, per: int, min_run: int) -> list[np.ndarray]:
    """The sorted particles ``J`` as runs of consecutive ones, cut every ``per`` particles: a run's significant
    samples are one contiguous range of the pool's (sorted by particle), sliced without a gather.  Runs shorter
    than ``min(per, min_run)`` are left out (their particles take the sparse path: a group's fixed costs -- its
    block's passes and sort, the layout-wide sums -- outweigh a lone flat particle's children on a GPU)."""
    cuts = np.flatnonzero(np.diff(J) != 1) + 1
    return [run[s : s + per] for run in np.split(J, cuts) if len(run) >= min(per, min_run)
            for s in range(0, len(run), per)]


def _flat_layout(xp, sig: Significant, classes: np.ndarray, U: np.ndarray, ut_pool: np.ndarray, fp: FineProjections,
                 grid, M: int) -> _FlatLayout:
    """The :class:`_FlatLayout` of a pool's classes with significant samples ``classes``, its significant coarse
    orientations ``U`` and distinct coarse translations ``ut_pool`` (all sorted)."""
    n_t = len(ut_pool)
    gid = grid.fine_ids(U).reshape(-1)
    P, power, cols, rows = [], [], [], []
    for c in classes:
        pos, ok = fp.members(c, gid)
        Pc = xp.zeros((len(gid), M), np.complex128)
        cx, rx = xp.asarray(np.nonzero(ok)[0]), xp.asarray(pos[ok])
        Pc[cx] = fp.data[c][fp.projections(c, rx)]
        P.append(Pc)
        power.append(Pc.real**2 + Pc.imag**2)
        cols.append(cx)
        rows.append(rx)
    return _FlatLayout(classes, U, n_t, P, power, cols, rows, xp.asarray(U // grid.n_psi),
                       _lookup(xp, classes, int(classes[-1]) + 1), _lookup(xp, ut_pool, int(ut_pool[-1]) + 1),
                       _lookup(xp, U, sig.n_orient))


def _flat_group(xp, lay: _FlatLayout, px: _PoolPixels, ph_pool, sig: Significant, G: np.ndarray, settings):
    """Posterior weights of the flat particles ``G`` (consecutive ones, :func:`_flat_runs`) over their dense block
    of children (:class:`_FlatLayout`): diff2 by :func:`~gerelion_dask.ops.likelihood.block_diff2`, log priors inherited from the significant coarse
    samples (``-inf`` for every other child: weight 0, as children never evaluated), RELION's weights and
    significance threshold per particle over the whole block.  Returns ``(W (b, K', 4 n_t, F), dmin, sumw, bad)``,
    ``W`` normalised and zero below the threshold, as :func:`_child_posteriors`."""
    b, K2, nt, nu = len(G), len(lay.classes), lay.nt, len(lay.U)
    # the group's samples (consecutive particles: one range of rows), each placed in the coarse block
    # (b, K', n_t, |U|) on the device from its fields' slices
    lo, hi = np.searchsorted(sig.b, [G[0], G[-1] + 1])
    at = (xp.asarray(sig.b[lo:hi]) - int(G[0])) * K2 + lay.of_class[xp.asarray(sig.c[lo:hi])]
    at = (at * nt + lay.of_t[xp.asarray(sig.t[lo:hi])]) * nu + lay.of_o[xp.asarray(sig.o[lo:hi])]
    lpc = xp.full(b * K2 * nt * nu, -np.inf)
    lpc[at] = xp.asarray(sig.lp[lo:hi])
    del at
    # children inherit their parent's prior: (b, K', n_t, 4, |U|, 8) = the fine block (b, K' 4 n_t, F)
    LP = xp.broadcast_to(lpc.reshape(b, K2, nt, 1, nu, 1), (b, K2, nt, 4, nu, 8)).reshape(b, K2 * 4 * nt, 8 * nu)
    del lpc
    Gx = xp.asarray(G)
    Z, V, a = px.diff2_terms(Gx, False)
    D = xp.empty((b, K2 * 4 * nt, 8 * nu))  # a particle's row: K' 4 n_t rows of F columns (reduced column-wise)
    for k in range(K2):
        D[:, 4 * nt * k : 4 * nt * (k + 1)] = block_diff2(Z, V, a, ph_pool, lay.P[k], lay.power[k])
    del Z, V
    w, dmin, sumw, bad = posterior_weights(D, LP)
    del D, LP
    w = kept_weights(w, sumw, settings.adaptive_fraction, settings.maxsig)
    return w.reshape(b, K2, 4 * nt, 8 * nu), dmin, sumw, bad


@dataclass(frozen=True)
class _Sums:
    """A pool's weighted sums on its device, added to in place: per particle its kept weight ``ws``, noise terms
    ``resid (B, M)`` and scale terms ``xa``, ``aa``; the class, direction and offset-prior sums; per class the
    back-projection sums of the pool's fine orientations and which of them any particle touched."""

    ws: object
    pdf_class: object
    pdf_dir: object
    off: object
    resid: object
    xa: object
    aa: object
    bp_i: dict
    bp_w: dict
    touched: dict


def _flat_sums(xp, lay: _FlatLayout, W, G: np.ndarray, px: _PoolPixels, XCW, CCW, ph_pool, goodf, prior_px, t_fine,
               pixel_size: float, sums: _Sums, acc: dict) -> None:
    """Add the weighted sums of the flat particles ``G`` (weights ``W (b, K', 4 n_t, F)`` of :func:`_flat_group`):
    per particle (weight, noise, scale) and the offset-prior sum to ``sums``; per class, over the layout's columns,
    the back-projection sums and the columns' weights to ``acc`` (``class -> [data (F, M), weight (F, M), (F,)]``,
    made here at the first group; :func:`_flat_merge` adds them to the pool's sums once: the fancy-indexed update of
    every fine orientation's rows per group cost more than the group's GEMMs).  ``prior_px (b, 2)``: each particle's
    offset prior from its integer pre-shift; ``t_fine (4 n_t, 2)`` the fine translations."""
    Gx = xp.asarray(G)
    X, Cr, XCW_g, CCW_g = px.X[Gx], px.Cr[Gx], XCW[Gx], CCW[Gx]
    per_t = W.sum(axis=3).sum(axis=1)  # (b, 4 n_t): the weight of each fine translation (reduced column-wise first)
    sums.ws[Gx] += per_t.sum(axis=1)
    e = (prior_px[:, None, :] - t_fine[None]) * pixel_size  # (b, 4 n_t, 2)
    sums.off[0] += (per_t * (e * e).sum(axis=2)).sum()
    for k, c in enumerate(lay.classes.tolist()):
        Wk = xp.ascontiguousarray(W[:, k])
        bp_i, bp_w, resid, xa, aa, wo = block_sums(Wk, XCW_g, CCW_g, X, Cr, goodf[c], ph_pool, lay.P[k], lay.power[k])
        if c not in acc:
            acc[c] = [bp_i, bp_w, wo.sum(axis=0)]
        else:
            acc[c][0] += bp_i
            acc[c][1] += bp_w
            acc[c][2] += wo.sum(axis=0)
        del bp_i, bp_w
        sums.resid[Gx] += resid
        sums.xa[Gx] += xa
        sums.aa[Gx] += aa


def _flat_merge(lay: _FlatLayout, acc: dict, sums: _Sums) -> None:
    """The flat groups' per-column sums (:func:`_flat_sums`) into the pool's: back-projection rows, touched rows,
    class and direction sums."""
    for k, c in enumerate(lay.classes.tolist()):
        if c not in acc:
            continue
        bp_i, bp_w, per_f = acc.pop(c)
        cols, rows = lay.cols[k], lay.rows[k]
        sums.bp_i[c][rows] += bp_i[cols]
        sums.bp_w[c][rows] += bp_w[cols]
        del bp_i, bp_w
        sums.touched[c][rows] |= per_f[cols] > 0
        sums.pdf_class[c : c + 1] += per_f.sum()
        scatter_add(sums.pdf_dir[c], lay.udir, per_f.reshape(len(lay.U), 8).sum(axis=1))


def _record_best(out: dict, G: np.ndarray, grid, c, o, cf, t, ct, int_off, pixel_size: float) -> None:
    """Each particle's best child -- class ``c``, child ``cf`` (0-7) of coarse orientation ``o``, child ``ct``
    (0-3) of coarse translation ``t`` -- as its pose, class and offset (Angstrom, with its integer pre-shift)."""
    gid = grid.fine_ids(np.asarray(o), np.asarray(cf))
    out["rot"][G], out["tilt"][G], out["psi"][G] = matrix_to_euler(grid.fine_matrices_from_ids(gid))
    o_b = (int_off[G] + grid.fine_translations(np.asarray(t))[np.arange(len(G)), ct]) * pixel_size
    out["ox"][G], out["oy"][G] = o_b[:, 0], o_b[:, 1]
    out["cls"][G] = np.asarray(c) + 1


def _to_host_together(xp, arrays) -> list[np.ndarray]:
    """Host copies of device arrays of any shapes (float, int or bool) in one transfer: flattened as float64 (exact
    for these values: integers below 2^53), concatenated, split and cast back."""
    if xp is np:
        return [np.asarray(a) for a in arrays]
    host = to_host(xp.concatenate([a.astype(np.float64, copy=False).reshape(-1) for a in arrays]))
    ends = np.cumsum([a.size for a in arrays])
    return [h.reshape(a.shape).astype(a.dtype, copy=False)
            for h, a in zip(np.split(host, ends[:-1]), arrays, strict=True)]


def fine_pass(xp, pre, particles, model, settings, sig: Significant, cache: ProjectionCache | None = None):
    """Pass 2 for one pool: the significant coarse samples of pass 1 -> ``(Partials, PoolResult)``.

    Per group of particles (all of a pool unless their padded child layout exceeds the chunk budget): the children's
    diff2 (:func:`_children_diff2`), the posterior weights and significance of
    the whole group at once (:func:`_child_posteriors`), then the weighted sums over the (particle, class, fine
    orientation) pairs that kept any weight.  A pair's weights over its fine translations times their phases give
    ``Q = sum_t w_t s_t``; it adds ``Q X c / sigma^2`` to its orientation's back-projection data and
    ``Re(X conj(P) Q)`` to its particle's model/data cross term (§4.6).
    """
    ps = settings.preprocess
    N, n = ps.ori_size, ps.current_size
    grid = settings.grid
    K = len(model.refs)
    B = len(particles.index)
    limits = fine_limits(xp)
    max_elems = settings.fine_max_elems or limits["max_elems"]

    og = np.asarray(particles.optics_group)
    pix, px, X2_all, logsig, goodf, highres, partials, acc = pass_start(xp, pre, particles, model, settings, cache)
    mb = pix.mask
    M = len(pix.shells)
    shell_1hot = pix.shell_1hot  # (M, N/2+1)
    int_off = pre.int_offset_px
    n_zero = 0  # particles whose weights all underflowed
    out = {k: np.zeros(B) for k in ("rot", "tilt", "psi", "ox", "oy", "cls", "pmax", "ll", "norm")}

    fp = FineProjections(model, grid, sig, n, mb, xp, cache=cache)  # host mask: its pixels known without a wait
    bp_i = {c: xp.zeros((len(fp.gids(c)), M), np.complex128) for c in fp.data}  # per pool row
    bp_w = {c: xp.zeros((len(fp.gids(c)), M), np.float64) for c in fp.data}
    touched = {c: xp.zeros(len(fp.gids(c)), bool) for c in fp.data}

    # the phases of every fine translation of the pool, made once (chunks take their rows)
    ut_pool = distinct(sig.t)
    t_fine_pool = grid.fine_translations(ut_pool).reshape(-1, 2)
    ph_pool = shift_phase(pix.kx, pix.ky, N, xp.asarray(t_fine_pool), xp)  # (4 |ut_pool|, M)
    resid = xp.zeros((B, M), np.float64)  # per particle: sum over its weighted samples of |X - C P|^2 terms
    XCW, CCW = px.backprojection_terms()
    xa = xp.zeros(B, np.float64)  # the scale sums' model/data and model/model terms per particle
    aa = xp.zeros(B, np.float64)
    ws = xp.zeros(B, np.float64)  # each particle's kept weight (normalised: ~1)
    # class, direction and offset-prior sums stay on the pool's device until the groups are done
    pdf_class_x, pdf_dir_x, off_x = xp.zeros(K), xp.zeros((K, grid.n_dir)), xp.zeros(1)
    t_fine_x = xp.asarray(t_fine_pool)
    prior_px = particles.offset_prior_px - int_off  # (B, 2): the offset prior from each image's integer pre-shift
    order = np.argsort(sig.best, kind="stable")
    # flat particles (flat_waste; not with --firstiter_cc's one sample a particle): their children as dense blocks,
    # as many particles a block as max_elems holds
    runs, flat = [], None
    if limits["flat_waste"] > 0 and not settings.do_cc and len(sig.b):
        classes, U = distinct(sig.c), distinct(sig.o)
        width = 32 * len(ut_pool) * len(U) * len(classes)  # a particle's dense block of children
        flat = _flat_particles(sig.n_sig, width, max_elems, 24 * 8 * len(U) * M * len(classes),
                               limits["cache_bytes"], limits["flat_waste"])
    if flat is not None:
        runs = _flat_runs(np.nonzero(flat)[0], max(1, max_elems // width), FLAT_MIN_RUN)
        flat[:] = False
        for G in runs:
            flat[G] = True
    if runs:
        lay = _flat_layout(xp, sig, classes, U, ut_pool, fp, grid, M)
        sums = _Sums(ws, pdf_class_x, pdf_dir_x, off_x, resid, xa, aa, bp_i, bp_w, touched)
        by_col = {}
        for G in runs:
            W, *per_particle = _flat_group(xp, lay, px, ph_pool, sig, G, settings)
            # each particle's largest weight, the first in its block's order: per row of F, then per particle
            Wr = W.reshape(len(G), -1, W.shape[-1])
            row_max = Wr.max(axis=2)
            top = xp.argmax(row_max, axis=1)
            ib = top * Wr.shape[2] + xp.argmax(Wr[xp.arange(len(G)), top], axis=1)
            dmin, sumw, bad, ib, out["pmax"][G] = _to_host_together(
                xp, per_particle + [ib, row_max[xp.arange(len(G)), top]])
            del Wr, row_max
            n_zero += int(np.sum(bad))
            k_b, rest = np.divmod(ib, 32 * len(ut_pool) * len(lay.U))
            tf_b, f_b = np.divmod(rest, 8 * len(lay.U))
            _record_best(out, G, grid, lay.classes[k_b], lay.U[f_b // 8], f_b % 8, ut_pool[tf_b // 4], tf_b % 4,
                         int_off, ps.pixel_size)
            out["ll"][G] = np.log(sumw) - dmin - logsig[og[G]]
            _flat_sums(xp, lay, W, G, px, XCW, CCW, ph_pool, goodf, xp.asarray(prior_px[G]), t_fine_x,
                       ps.pixel_size, sums, by_col)
            del W
        _flat_merge(lay, by_col, sums)
        del lay, by_col
        order = order[~flat[order]]
    for G in _group_particles(order, sig.n_sig, max_elems):
        b = len(G)
        r = sig.rows_of(G)  # the group's significant samples, grouped by particle in the order of G
        jl = _local_index(G, sig.b[r])
        cnt = np.bincount(jl, minlength=b)
        first = np.cumsum(cnt) - cnt  # each particle's first significant sample in r
        q = np.arange(len(r)) - first[jl]
        stab = _sample_table(xp, sig, G, r, jl, grid, ut_pool)
        d = _children_diff2(xp, px, fp, sig.c[r], stab, G, ph_pool, settings.do_cc, max_elems)
        wr, *per_particle = _child_posteriors(xp, d, sig.lp[r], jl, q, first, cnt, settings)
        dmin, sumw, bad, ib, out["pmax"][G] = _to_host_together(xp, per_particle)  # one wait for the device
        del d, per_particle
        n_zero += int(np.sum(bad))
        # each particle's best child -> its pose, class and offset
        row_b = r[first + ib // 32]
        cf_b, ct_b = np.divmod(ib % 32, 4)
        _record_best(out, G, grid, sig.c[row_b], sig.o[row_b], cf_b, sig.t[row_b], ct_b, int_off, ps.pixel_size)
        out["ll"][G] = -dmin if settings.do_cc else np.log(sumw) - dmin - logsig[og[G]]
        # the children that kept weight, as (particle, class, fine orientation) pairs; on the pool's device
        rr, ck = xp.nonzero(wr > 0)  # (the group's sample, child), by particle
        wv = wr[rr, ck]
        del wr
        # each child's fields of its sample's column of the table; its fine orientation among the sample's 8
        cj, cc, tp = stab[_T_J][rr], stab[_T_CLASS][rr], stab[_T_TROW][rr] + ck % 4  # tp: its phase row
        cg = stab[_T_FID:].reshape(-1)[(ck // 4) * stab.shape[1] + rr]
        scatter_add(ws, stab[_T_POOL][rr], wv)  # (no host synchronisation on CuPy, unlike its bincount)
        scatter_add(pdf_class_x, cc, wv)
        scatter_add(pdf_dir_x, stab[_T_CDIR][rr], wv)
        del rr, ck, stab
        # each child's squared distance (A^2) from its particle's offset prior
        e_o = (xp.asarray(prior_px[G])[cj] - t_fine_x[tp]) * ps.pixel_size
        off_x += (wv * (e_o * e_o).sum(axis=1)).sum()
        del e_o
        key = (cc.astype(np.int64) * grid.fine_id_bound + cg) * b + cj  # children by class, fine orientation, particle
        order = xp.argsort(key)
        key, cj, cc, cg, tp, wv = key[order], cj[order], cc[order], cg[order], tp[order], wv[order]
        del order
        new = xp.ones(key.size, bool)
        new[1:] = key[1:] != key[:-1]
        del key
        starts = xp.flatnonzero(new)  # each pair's first child
        del new
        p_c, p_g, p_j = cc[starts], cg[starts], xp.asarray(G)[cj[starts]]
        cstart = xp.concatenate([starts, xp.full(1, cj.size, starts.dtype)])  # pair i: cstart[i] .. cstart[i + 1]
        # pairs are ordered by class (one class: all of them, no wait for the device)
        bounds = np.array([0, starts.size]) if K == 1 else to_host(xp.searchsorted(p_c, xp.arange(K + 1)))
        del cc, cg, cj, starts
        for c in range(K):
            lo_c, hi_c = int(bounds[c]), int(bounds[c + 1])
            if hi_c == lo_c:
                continue
            rows_c = fp.positions(c, p_g[lo_c:hi_c])
            touched[c][rows_c] = True
            pair_sums(XCW, CCW, px.X, px.Cr, goodf[c], ph_pool, fp.data[c], p_j[lo_c:hi_c],
                      fp.projections(c, rows_c), rows_c, cstart[lo_c : hi_c + 1], tp, wv, bp_i[c], bp_w[c], resid,
                      xa, aa, max_elems, rows_sorted=True)  # pairs are ordered by fine orientation
        del wv, tp, p_c, p_g, p_j, cstart
    del XCW, CCW
    classes = sorted(bp_i)
    off_sum, out["norm"], touched_h = _sums_to_host(
        xp, particles, model, settings, acc, resid, X2_all, ws, xa, aa, pdf_class_x, pdf_dir_x, off_x, shell_1hot,
        highres, [touched[c] for c in classes])
    # the 3D insertion needs only the back-projection sums: the pool's pixels, phases and projections go first
    del resid, px, X2_all, ph_pool
    fp.data = {}

    bp_data = xp.zeros(partials.bp_data.shape, np.complex128)
    bp_weight = xp.zeros(partials.bp_weight.shape, np.float64)
    step = max(1, int(limits["slice_bytes"] // insert_row_bytes(M)))  # slices per insertion chunk
    for c, touched_c in zip(classes, touched_h, strict=True):
        touched_rows = np.nonzero(touched_c)[0]
        for s in range(0, touched_rows.size, step):
            rows = touched_rows[s : s + step]
            rx = xp.asarray(rows)
            A = grid.fine_matrices_from_ids(fp.gids(c)[rows])
            insert_slices(BackProjection(bp_data[c], bp_weight[c], grid_of(model)), A, bp_i[c][rx], bp_w[c][rx],
                          pixels=mb)
    return _pool_output(particles, model, acc, bp_data, bp_weight, off_sum, out, sig.n_sig, n_zero)


def _sums_to_host(xp, particles, model, settings, acc: dict, resid, X2, ws, xa, aa, pdf_class_x, pdf_dir_x, off_x,
                  shell_1hot, highres: np.ndarray, extra=()):
    """A pool's per-particle sums (noise terms ``resid (B, M)`` without the images' own power ``X2``, kept weights
    ``ws``, scale terms ``xa``, ``aa``) and its class, direction and offset-prior sums, in one transfer, into the
    host accumulators ``acc`` (noise per optics group and shell, optics weights, group counts, scale, class and
    direction sums).  Returns ``(offset-prior sum, each particle's new norm correction, extra arrays on the host)``."""
    ps = settings.preprocess
    og = np.asarray(particles.optics_group)
    resid += X2 * ws[:, None]
    # each copy waits for the device: everything comes back at once
    pdf_class, pdf_dir, off, ws, xa, aa, per_shell, resid_sum, *extra_h = _to_host_together(
        xp, [pdf_class_x, pdf_dir_x, off_x, ws, xa, aa, resid @ shell_1hot, resid.sum(axis=1)] + list(extra))
    acc["wsum_pdf_class"] += pdf_class
    acc["wsum_pdf_direction"] += pdf_dir
    if settings.do_scale:
        add_rows(acc["wsum_scale_xa"], particles.group, xa)
        add_rows(acc["wsum_scale_aa"], particles.group, aa)
    per_shell = per_shell + highres  # (B, nsh)
    add_rows(acc["wsum_sigma2"], og, per_shell)
    add_rows(acc["sumw_optics"], og, ws)
    add_rows(acc["group_counts"], particles.group, np.ones(len(og)))
    acc_norm = resid_sum + highres.sum(axis=1)
    norm_j = np.asarray(particles.norm, dtype=np.float64)
    norm = (norm_j / model.avg_norm) * np.sqrt(2.0 * acc_norm) if ps.do_norm else norm_j.copy()
    return float(off[0]), norm, extra_h


def _pool_output(particles, model, acc: dict, bp_data, bp_weight, off_sum: float, out: dict, n_sig, n_zero: int):
    """The pool's :class:`Partials` and :class:`PoolResult` from its accumulators and per-particle results."""
    part = Partials(particles.half, grid_of(model), bp_data, bp_weight, acc["wsum_sigma2"], acc["sumw_optics"],
                    acc["wsum_pdf_class"], acc["wsum_pdf_direction"], off_sum, float(out["norm"].sum()),
                    acc["wsum_scale_xa"], acc["wsum_scale_aa"], acc["group_counts"], float(out["ll"].sum()),
                    float(out["pmax"].sum()), len(particles.index), n_zero)
    res = PoolResult(particles.index, out["rot"], out["tilt"], out["psi"], out["ox"], out["oy"],
                     out["cls"].astype(np.int64), out["pmax"], np.asarray(n_sig).astype(np.int64), out["ll"],
                     out["norm"])
    return part, res
