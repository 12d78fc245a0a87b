"""Pass 2 of the E-step (ALGORITHM.md §4.3-4.6): the children of significant coarse samples, batched over particles.

Every particle's significant coarse samples ``(class, orientation, translation)`` have 8 x 4 children (oversampling
1).  Particles are grouped into chunks whose members search similar orientations (sorted by their best coarse
orientation); a chunk is evaluated as dense matrix products over the union of its members' children,

    diff2(j, f, t) = a_j + sum_k w_jk c_jk^2 |P_f(k)|^2 - 2 Re sum_k (w_jk c_jk X_j(k) s_t(k)) conj(P_f(k))

and the pairs whose coarse parent was not significant for particle j are excluded (weight 0), so the result equals
the per-particle evaluation (a chunk of one).  How many particles share a chunk is a cost decision only: on a GPU
large chunks amortise kernel launches, on a CPU chunks stay near one particle unless the members overlap (a union at
most ``waste`` times the sum of the members' own work).

The weighted sums of §4.6 use the same algebra: with ``Q_j = W_j @ s`` (weights over translations times the
translation phases), the back-projection data of fine orientation f is ``sum_j Q_jf * X_j * c_j / sigma^2``, and
the model/data cross term of the noise, scale and norm sums is ``Re(X_j * sum_f conj(P_f) Q_jf)``.  Back-projection
sums of all particles of the pool are merged per fine orientation before one 3D insertion each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import deep_nbytes, get_xp, to_host
from ..conventions import matrix_to_euler, shift_phase_2d
from ..ops.backprojector import BackProjection, insert_slices
from ..ops.fourier import likelihood_pixels, shells_2d
from ..ops.projector import project
from .grid import OrientationGrid
from .partials import Partials, PoolResult, empty_partials
from .weights import posterior_weights, significance_threshold

__all__ = ["FINE_LIMITS", "ProjectionCache", "Significant", "fine_limits", "fine_pass", "insert_row_bytes", "overlap_chunks",
           "project_row_bytes"]

# Work budgets per chunk of particles (diff2 values) and the dense-over-union waste allowed, per backend: on a GPU large
# chunks amortise kernel launches (waste 512 against 64: 1,950 against 930 particles/s for a pool of 1,000 at box 128,
# H100, benchmarks/RESULTS.md; 2^26 values against 2^25 since the sparse fine-pass weights: 4,690 against 4,060 at
# ~40 significant samples, the same at ~7); on a CPU chunks stay near one particle unless the members overlap.
# The coarse pass runs its GEMMs in float32 on GPUs (tensor-core rates; it only selects significant samples) and
# in float64 on CPUs (the reference path).
# ``cache_bytes``: the most a ProjectionCache keeps per iteration and half set.  ``slice_bytes``: the working
# memory of one chunk of full 2D slices, in the projection of fine orientations (``project_row_bytes`` per slice) and
# in the 3D insertion at the end of the fine pass (``insert_row_bytes``); all of a pool's slices at once took 9-12 GB
# per 1,000 slices at 256 px (memory_check --lines).  A NumPy insertion chunk costs a few passes over the whole
# volume (``bincount``), so the CPU's chunks are larger.
FINE_LIMITS = {"cpu": {"max_elems": 1 << 22, "waste": 1.5, "coarse_dtype": "float64", "cache_bytes": 1 << 30,
                       "slice_bytes": 4 << 30},
               "gpu": {"max_elems": 1 << 26, "waste": 512.0, "coarse_dtype": "float32", "cache_bytes": 8 << 30,
                       "slice_bytes": 2 << 30}}


def fine_limits(xp) -> dict:
    """The ``FINE_LIMITS`` entry of the backend ``xp`` computes on (NumPy: ``"cpu"``, else ``"gpu"``)."""
    return FINE_LIMITS["cpu" if xp is np else "gpu"]


def project_row_bytes(n: int) -> int:
    """Bytes the projection of one ``n``-px slice holds at most (``ops.projector.project``: the slice's 3D
    coordinates, Friedel-folded corners, fractions, indices and the interpolated values, ~200 bytes a half-plane
    pixel); ``gerelion plan`` uses the same number."""
    return 200 * n * (n // 2 + 1)


def insert_row_bytes(n: int, M: int) -> int:
    """Bytes the 3D insertion of one ``n``-px slice with ``M`` likelihood pixels holds at most: the slice and its
    weights in the half-plane layout and their 3D coordinates (``49 h``, ``h = n (n/2+1)``), and the per-pixel
    corner indices, fractions and weighted values of ``insert_slices`` (``150 M``).  An upper bound (~2x the live
    peak measured at 128 px); ``gerelion plan`` uses the same number."""
    return 49 * n * (n // 2 + 1) + 150 * M


def gather(a, mask):
    """Window pixels of ``a (..., n, n/2+1)`` selected by a boolean mask -> ``(..., M)``."""
    return a[..., mask]


def project_gathered(ref, A, n: int, mask, xp, max_bytes: int | None = None):
    """Projections of ``ref`` at the rotations ``A (R, 3, 3)``, size ``n``, window pixels ``mask`` -> ``(R, M)``;
    a chunk of rotations at a time whose full slices hold at most ``max_bytes`` (default: the backend's
    ``FINE_LIMITS[...]["slice_bytes"]``; at most 4,096 rotations), written into one output array."""
    if max_bytes is None:
        max_bytes = fine_limits(xp)["slice_bytes"]
    chunk = min(4096, max(1, int(max_bytes // project_row_bytes(n))))
    out = None
    for s in range(0, len(A), chunk):
        part = gather(project(ref, xp.asarray(A[s : s + chunk]), n), mask)
        if out is None:
            out = xp.empty((len(A),) + part.shape[1:], part.dtype)
        out[s : s + len(part)] = part
        part = None
    return out if out is not None else gather(project(ref, xp.asarray(A[:0]), n), mask)


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
    best: np.ndarray  # (B,) class * n_orient + orientation of the best coarse sample (a sort key for chunking)
    n_orient: int

    def rows_of(self, J) -> np.ndarray:
        lo = np.searchsorted(self.b, J, side="left")
        hi = np.searchsorted(self.b, J, side="right")
        return np.concatenate([np.arange(x, y) for x, y in zip(lo, hi, strict=True)]) if len(J) else np.zeros(0, int)


def overlap_chunks(sets_a, sets_b, key, per_pair: float, max_elems: int, waste: float) -> list[np.ndarray]:
    """Group items whose index sets overlap: item j searches ``sets_a[j] x sets_b[j]`` (sorted unique arrays).

    Items are taken in ``key`` order; an item joins the current chunk while the chunk's dense work (members x
    union_a x union_b x ``per_pair``) stays within ``max_elems`` and within ``waste`` times the members' own work.
    The unions are kept as marks over the values that occur, so an item costs the size of its own sets.
    """
    ids_a, n_a = _compact(sets_a)
    ids_b, n_b = _compact(sets_b)
    mark_a, mark_b = np.zeros(n_a, bool), np.zeros(n_b, bool)
    chunks, cur = [], []
    la = lb = 0
    own_sum = 0.0
    for j in np.argsort(key, kind="stable"):
        own = float(len(ids_a[j])) * len(ids_b[j]) * per_pair
        if cur:
            na = la + int(np.count_nonzero(~mark_a[ids_a[j]]))
            nb = lb + int(np.count_nonzero(~mark_b[ids_b[j]]))
            dense = (len(cur) + 1) * float(na) * nb * per_pair
            if dense > max_elems or dense > waste * (own_sum + own):
                chunks.append(np.array(cur))
                for i in cur:
                    mark_a[ids_a[i]] = False
                    mark_b[ids_b[i]] = False
                cur, own_sum = [], 0.0
        if not cur:
            na, nb = len(ids_a[j]), len(ids_b[j])
        mark_a[ids_a[j]] = True
        mark_b[ids_b[j]] = True
        cur.append(j)
        la, lb = na, nb
        own_sum += own
    if cur:
        chunks.append(np.array(cur))
    return chunks


def _compact(sets) -> tuple[list[np.ndarray], int]:
    """The sets' values renumbered 0..n-1 (n distinct values in all): per set an index array, and n."""
    sizes = [len(x) for x in sets]
    if not sum(sizes):
        return [np.zeros(0, np.int64) for _ in sets], 0
    u, inv = np.unique(np.concatenate([np.asarray(x) for x in sets]), return_inverse=True)
    return np.split(inv, np.cumsum(sizes)[:-1]), len(u)


def shifted_sums(xp, W, V, ph, max_elems: int):
    """``out[i, m] = sum_j sum_t W[i, j, t] V[j, m] ph[t, m]`` for real ``W (I, J, Tf)``, complex ``V (J, M)`` and
    translation phases ``ph (Tf, M)``: the fine pass's weighted sums of shifted images per orientation (``V`` =
    images, ``j`` = particles) and of projections per particle (``V`` = conj(P), ``j`` = orientations).

    Contracted in the order with the smaller intermediate (as ``einsum`` would choose): over ``t`` first (a real GEMM
    ``(I*J, Tf) @ (Tf, 2M)`` against the interleaved phases, then a pass over ``(I, J, M)``) when ``J < Tf``, else
    over ``j`` first (``(I*Tf, J) @ (J, 2M)`` against the interleaved ``V``, then a pass over ``(I, Tf, M)``); rows
    ``i`` are taken in chunks whose intermediate holds at most ``max_elems`` values.
    """
    I, J, Tf = W.shape
    M = V.shape[1]
    out = xp.empty((I, M), np.complex128)
    over_t = J < Tf
    step = max(1, int(max_elems // max(1, (J if over_t else Tf) * M)))
    Vv = xp.ascontiguousarray(V, dtype=np.complex128)
    ph_v = xp.ascontiguousarray(ph, dtype=np.complex128).view(np.float64) if over_t else None
    for s in range(0, I, step):
        w = W[s : s + step]
        n = w.shape[0]
        if over_t:
            Q = (xp.ascontiguousarray(w).reshape(n * J, Tf) @ ph_v).view(np.complex128).reshape(n, J, M)
            out[s : s + n] = (Q * Vv[None]).sum(axis=1)
        else:
            wt = xp.ascontiguousarray(w.transpose(0, 2, 1)).reshape(n * Tf, J)
            Z = (wt @ Vv.view(np.float64)).view(np.complex128).reshape(n, Tf, M)
            out[s : s + n] = (Z * ph[None]).sum(axis=1)
    return out


def shifted_cross(xp, Z, ph, P, max_elems: int):
    """``g[i, t, f] = Re(sum_m Z[i, m] ph[t, m] conj(P[f, m]))``: ``(I, Tf, F)`` float64.

    One real GEMM over interleaved real and imaginary parts per chunk of rows ``i``; the shifted rows
    ``Z[i] ph[t]`` of a chunk (``(n, Tf, M)`` complex) hold at most ``max_elems`` values (all of a fine-pass chunk's
    particles at once held ~12 GiB at 256 px).
    """
    I, M = Z.shape
    Tf, F = ph.shape[0], P.shape[0]
    out = xp.empty((I, Tf, F), np.float64)
    Pv = xp.ascontiguousarray(P, dtype=np.complex128).view(np.float64).T  # (2M, F)
    step = max(1, int(max_elems // max(1, Tf * M)))
    for s in range(0, I, step):
        Y = (Z[s : s + step][:, None, :] * ph[None]).astype(np.complex128, copy=False)  # (n, Tf, M), contiguous
        n = Y.shape[0]
        out[s : s + n] = (Y.reshape(n * Tf, M).view(np.float64) @ Pv).reshape(n, Tf, F)
    return out


def _unique_per_particle(b, k, B: int) -> list[np.ndarray]:
    """The sorted unique values of ``k`` for each particle ``0..B-1`` (``b`` sorted): a list of ``B`` arrays."""
    order = np.lexsort((k, b))
    bs, ks = b[order], k[order]
    first = np.ones(len(ks), bool)
    first[1:] = (bs[1:] != bs[:-1]) | (ks[1:] != ks[:-1])
    return np.split(ks[first], np.searchsorted(bs[first], np.arange(1, B)))


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
        self._blocks = {}  # class -> list of (R, M) arrays
        self._index = {}  # class -> (gids, block, row) of everything cached, sorted by gid
        self._whole = {}  # key -> the coarse pass's projections of the whole coarse grid (global searches)

    def clear(self) -> None:
        self._blocks, self._index, self._whole, self.nbytes = {}, {}, {}, 0

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
        """Projections of the sorted unique fine-orientation ids ``gids`` of class ``c``; ``compute(ids)`` makes the
        missing ones."""
        have_g, have_b, have_r = self._index.get(c, (np.zeros(0, np.int64),) * 3)
        missing = gids[~np.isin(gids, have_g, assume_unique=True)]
        blocks = list(self._blocks.get(c, []))
        if missing.size:
            new = compute(missing)
            blocks.append(new)
            g = np.concatenate([have_g, missing])
            order = np.argsort(g, kind="stable")
            g, b = g[order], np.concatenate([have_b, np.full(missing.size, len(blocks) - 1)])[order]
            r = np.concatenate([have_r, np.arange(missing.size)])[order]
            if self.nbytes + new.nbytes <= self.max_bytes:
                self._blocks[c], self._index[c] = blocks, (g, b, r)
                self.nbytes += new.nbytes
        else:
            g, b, r = have_g, have_b, have_r
        pos = np.searchsorted(g, gids)
        blk, row = b[pos], r[pos]
        xp = get_xp(blocks[0])
        out = xp.empty((len(gids), blocks[0].shape[1]), blocks[0].dtype)
        for i in np.unique(blk):
            sel = np.nonzero(blk == i)[0]
            out[xp.asarray(sel)] = blocks[i][xp.asarray(row[sel])]
        return out


class FineProjections:
    """Projections of every fine orientation any particle of the pool needs, computed once per class (and, with a
    :class:`ProjectionCache`, once per iteration on this process).

    The fine grid (with its perturbation) is shared by all particles of an iteration, so a pool projects the union
    of the children of its significant coarse orientations once instead of once per particle.
    """

    def __init__(self, model, grid: OrientationGrid, sig: Significant, n: int, mask, xp,
                 cache: ProjectionCache | None = None):
        self.rows = {}
        self.data = {}
        self.power = {}

        def compute(c):
            def make(gid):
                return project_gathered(model.refs[c], grid.fine_matrices_from_ids(gid), n, mask, xp)
            return make

        for c in np.unique(sig.c):
            o = np.unique(sig.o[sig.c == c])
            gid = np.sort(grid.fine_ids(o).reshape(-1))
            self.data[c] = cache.rows(int(c), gid, compute(c)) if cache is not None else compute(c)(gid)
            self.power[c] = xp.abs(self.data[c]) ** 2
            self.rows[c] = gid

    def positions(self, c: int, gid) -> np.ndarray:
        return np.searchsorted(self.rows[c], gid)

    def gids(self, c: int) -> np.ndarray:
        return self.rows[c]


def fine_pass(xp, pre, particles, model, settings, sig: Significant, cache: ProjectionCache | None = None):
    """Pass 2 for one pool: the significant coarse samples of pass 1 -> ``(Partials, PoolResult)``."""
    ps = settings.preprocess
    N, n = ps.ori_size, ps.current_size
    grid = settings.grid
    K = len(model.refs)
    B = len(particles.index)
    nO = grid.n_dir * grid.n_psi
    limits = fine_limits(xp)
    max_elems = settings.fine_max_elems or limits["max_elems"]
    waste = settings.fine_waste or limits["waste"]

    sig2 = np.asarray(model.sigma2_noise, dtype=np.float64)
    scale = np.asarray(model.scales)[particles.group]
    og = np.asarray(particles.optics_group)
    mb = likelihood_pixels(n, include_dc=True)
    shb = shells_2d(n)[mb]
    nsh = N // 2 + 1
    M = len(shb)
    mb_x = xp.asarray(mb)
    X_all = gather(pre.fimg, mb_x)
    Xnm_all = gather(pre.fimg_nomask, mb_x)
    C_all = gather(pre.ctf, mb_x) * xp.asarray(scale)[:, None]
    Cr_all = C_all if settings.ctf_on_reference else xp.ones_like(C_all)
    lik_h = shb >= 1
    lik = xp.asarray(lik_h)
    s2_all = xp.asarray(sig2)[xp.asarray(og)][:, xp.asarray(shb)]  # (B, M), gathered on the device
    Wd_all = xp.where(lik[None], 1.0 / (2.0 * s2_all), 0.0)
    Wbp_all = 1.0 / s2_all
    X2_all = xp.abs(X_all) ** 2
    a_all = (Wd_all * X2_all).sum(axis=1)
    hr_xi2 = to_host(pre.highres_xi2)
    highres = to_host(pre.power_highres)
    shell_1hot = xp.asarray((shb[:, None] == np.arange(nsh)[None, :]).astype(np.float64))  # (M, nsh)
    good = {c: xp.asarray(np.asarray(model.data_vs_prior)[c][shb] > 3) for c in range(K)}
    int_off = pre.int_offset_px

    partials = empty_partials(particles.half, grid_of(model), K, grid.n_dir, settings.n_optics, settings.n_groups,
                              N, np)
    acc = {f: np.array(getattr(partials, f), dtype=np.float64, copy=True) for f in
           ("wsum_sigma2", "sumw_optics", "wsum_pdf_class", "wsum_pdf_direction", "wsum_scale_xa", "wsum_scale_aa",
            "group_counts")}
    scal = {"off": 0.0, "norm": 0.0, "ll": 0.0, "pmax": 0.0, "zero": 0}
    out = {k: np.zeros(B) for k in ("rot", "tilt", "psi", "ox", "oy", "cls", "pmax", "ll", "norm")}

    cache = FineProjections(model, grid, sig, n, mb_x, xp, cache=cache)
    bp_i = {c: xp.zeros(cache.data[c].shape, np.complex128) for c in cache.data}
    bp_w = {c: xp.zeros(cache.data[c].shape, np.float64) for c in cache.data}
    touched = {c: np.zeros(cache.data[c].shape[0], bool) for c in cache.data}
    logsig = np.array([np.log(2 * np.pi * sig2[g][shb[lik_h]]).sum() for g in range(sig2.shape[0])])

    okeys = _unique_per_particle(sig.b, sig.c * nO + sig.o, B)  # each particle's significant (class, orientation)
    tkeys = _unique_per_particle(sig.b, sig.t, B)  # and translations
    # the phases of every fine translation of the pool, made once (chunks take their rows)
    ut_pool = np.unique(sig.t)
    t_fine_pool = grid.fine_translations(ut_pool).reshape(-1, 2)
    ph_pool = gather(shift_phase_2d(n, N, xp.asarray(t_fine_pool)), mb_x)  # (4 |ut_pool|, M)
    child_f, child_t = np.divmod(np.arange(32), 4)  # a significant sample's 32 children: (8 orientations, 4 shifts)
    for J in overlap_chunks(okeys, tkeys, sig.best, 32.0, max_elems, waste):
        b = len(J)
        Jx = xp.asarray(J)
        r = sig.rows_of(J)  # grouped by particle in the order of J, each particle's rows by (class, orient., trans.)
        S = len(r)
        jl = _local_index(J, sig.b[r])  # row of each significant sample's particle within the chunk
        ut = np.unique(sig.t[r])
        tf_rows = (np.searchsorted(ut_pool, ut)[:, None] * 4 + np.arange(4)[None, :]).reshape(-1)
        t_fine = t_fine_pool[tf_rows]  # (Tf, 2), and their phases
        ph = ph_pool[xp.asarray(tf_rows)]
        Tf = len(t_fine)
        it_all = np.searchsorted(ut, sig.t[r])
        X, Xnm, C, Cr, Wd = X_all[Jx], Xnm_all[Jx], C_all[Jx], Cr_all[Jx], Wd_all[Jx]
        ah = xp.asarray(a_all[Jx] + xp.asarray(hr_xi2[J]) / 2.0)
        # Every significant sample's 32 children are evaluated; the values are gathered per particle into a padded
        # (b, L) array (L = 32 x the most significant samples of a member) instead of the dense (b, F x Tf) block,
        # most of which belongs to other members' parents.  ``col`` maps each child to its column in the dense
        # layout (class blocks of (F, Tf)) that the weighted sums below use.
        d_rows = xp.empty((S, 32), np.float64)
        col_rows = np.empty((S, 32), np.int64)
        blocks = []
        pos = 0
        for c in np.unique(sig.c[r]):
            sel = np.nonzero(sig.c[r] == c)[0]
            oc = np.unique(sig.o[r][sel])
            io = np.searchsorted(oc, sig.o[r][sel])
            gid = grid.fine_ids(oc).reshape(-1)
            rows = cache.positions(c, gid)
            rows_x = xp.asarray(rows)
            P = cache.data[c][rows_x]  # (F, M)
            F = len(rows)
            f_e = io[:, None] * 8 + child_f[None, :]  # (S_c, 32) the children's fine orientations in this block
            t_e = it_all[sel][:, None] * 4 + child_t[None, :]  # and fine translations
            jx, fx, tx = xp.asarray(jl[sel])[:, None], xp.asarray(f_e), xp.asarray(t_e)
            if settings.do_cc:
                g_ = shifted_cross(xp, Cr * X, ph, P * lik, max_elems)  # (b, Tf, F)
                normp = xp.sqrt((Cr * Cr * lik) @ cache.power[c][rows_x].T)  # (b, F)
                normx = xp.sqrt((X2_all[Jx] * lik).sum(axis=1))  # (b,)
                d_rows[xp.asarray(sel)] = -g_[jx, tx, fx] / (normp[jx, fx] * normx[jx] + 1e-300)
            else:
                bb = (Wd * Cr * Cr) @ cache.power[c][rows_x].T  # (b, F)
                g_ = shifted_cross(xp, Wd * Cr * X, ph, P, max_elems)  # (b, Tf, F)
                d_rows[xp.asarray(sel)] = (ah[jx] + bb[jx, fx]) - 2.0 * g_[jx, tx, fx]
            del g_
            col_rows[sel] = pos + f_e * Tf + t_e
            blocks.append((c, oc, gid, rows, P))
            pos += F * Tf
        # the padded per-particle layout: particle jl's q-th significant sample fills columns 32 q .. 32 q + 31
        cnt = np.bincount(jl, minlength=b)
        first = np.cumsum(cnt) - cnt  # each particle's first significant sample in r
        q = np.arange(S) - first[jl]
        L = 32 * int(cnt.max())
        jq = (xp.asarray(jl), xp.asarray(q))
        D = xp.full((b, L // 32, 32), xp.inf)
        LP = xp.full((b, L // 32, 32), -xp.inf)
        D[jq] = d_rows
        LP[jq] = xp.asarray(sig.lp[r])[:, None]  # children inherit their parent's prior
        D, LP = D.reshape(b, L), LP.reshape(b, L)
        del d_rows
        if settings.do_cc:
            best = xp.argmin(xp.where(xp.isfinite(LP), D, xp.inf), axis=1)
            w = xp.zeros_like(D)
            w[xp.arange(b), best] = 1.0
            dmin = D[xp.arange(b), best]
            sumw = xp.ones(b)
            bad = np.zeros(b, bool)
        else:
            w, dmin, sumw, bad = posterior_weights(D, LP)
            thr = significance_threshold(w, settings.adaptive_fraction, settings.maxsig, sumw)
            w = xp.where(w >= thr[:, None], w, 0.0)
            bad = to_host(bad)
        del D, LP
        scal["zero"] += int(np.sum(bad))
        wp = w / sumw[:, None]  # normalised, padded
        del w
        ib = to_host(xp.argmax(wp, axis=1))
        pmax = to_host(wp.max(axis=1))
        ibest = col_rows[first + ib // 32, ib % 32]  # the best sample's column in the dense layout
        wn = xp.zeros((b, pos), np.float64)  # the normalised weights in the dense layout of the weighted sums
        wn[xp.asarray(jl)[:, None], xp.asarray(col_rows)] = wp.reshape(b, L // 32, 32)[jq]
        del wp
        resid = xp.zeros((b, M), np.float64)
        ws_tot = xp.zeros(b, np.float64)
        w_trans = xp.zeros((b, Tf), np.float64)
        xa = xp.zeros(b, np.float64)
        aa = xp.zeros(b, np.float64)
        pos = 0
        for c, oc, gid, rows, P in blocks:
            F = len(rows)
            Wm = wn[:, pos : pos + F * Tf].reshape(b, F, Tf)
            jb = np.nonzero((ibest >= pos) & (ibest < pos + F * Tf))[0]  # members whose best sample is here
            if jb.size:
                r_, t_ = np.divmod(ibest[jb].astype(np.int64) - pos, Tf)
                Jb = J[jb]
                out["rot"][Jb], out["tilt"][Jb], out["psi"][Jb] = matrix_to_euler(grid.fine_matrices_from_ids(gid[r_]))
                o_b = (int_off[Jb] + t_fine[t_]) * ps.pixel_size
                out["ox"][Jb], out["oy"][Jb] = o_b[:, 0], o_b[:, 1]
                out["cls"][Jb] = int(c) + 1
            pos += F * Tf
            wo = Wm.sum(axis=2)  # (b, F)
            w_dir = to_host(wo.sum(axis=0)).reshape(len(oc), 8).sum(axis=1)
            np.add.at(acc["wsum_pdf_direction"][c], oc // grid.n_psi, w_dir)
            keep = np.nonzero(to_host(wo.max(axis=0)) > 0)[0]
            if keep.size == 0:
                continue
            touched[c][rows[keep]] = True
            w_trans += Wm.sum(axis=1)
            ws = wo.sum(axis=1)
            ws_tot += ws
            acc["wsum_pdf_class"][c] += float(ws.sum())
            bp_d = Xnm * C * Wbp_all[Jx]
            bp_wt = C * C * Wbp_all[Jx]
            kk, rk = xp.asarray(keep), xp.asarray(rows[keep])
            Wk = Wm[:, kk]  # (b, F', Tf): the orientations with any weight
            # each fine orientation occurs once per chunk, so the scatters below have no duplicate rows
            bp_i[c][rk] += shifted_sums(xp, Wk.transpose(1, 0, 2), bp_d, ph, max_elems)
            bp_w[c][rk] += wo[:, kk].T @ bp_wt
            T_ = shifted_sums(xp, Wk, xp.conj(P[kk]), ph, max_elems)  # (b, M): sum_f conj(P_f) (shifted weights)
            Pw = wo[:, kk] @ cache.power[c][rk]
            del Wk
            XT = (X * T_).real  # sum_f Re(conj(P_f) X Q_f): the model/data cross term
            resid += (Cr * Cr) * Pw - 2.0 * Cr * XT + X2_all[Jx] * ws[:, None]
            if settings.do_scale:
                xa += (Cr * XT * good[c]).sum(axis=1)
                aa += (Cr * Cr * Pw * good[c]).sum(axis=1)
        u_f = int_off[J][:, None, :] + t_fine[None]  # (b, Tf, 2)
        d2o = (((particles.offset_prior_px[J][:, None, :] - u_f) * ps.pixel_size) ** 2).sum(-1)
        scal["off"] += float((to_host(w_trans) * d2o).sum())
        if settings.do_scale:
            np.add.at(acc["wsum_scale_xa"], particles.group[J], to_host(xa))
            np.add.at(acc["wsum_scale_aa"], particles.group[J], to_host(aa))
        per_shell = to_host(resid @ shell_1hot) + highres[J]  # (b, nsh)
        np.add.at(acc["wsum_sigma2"], og[J], per_shell)
        np.add.at(acc["sumw_optics"], og[J], to_host(ws_tot))
        np.add.at(acc["group_counts"], particles.group[J], 1.0)
        acc_norm = to_host(resid.sum(axis=1)) + highres[J].sum(axis=1)
        norm_j = np.asarray(particles.norm)[J]
        newnorm = (norm_j / model.avg_norm) * np.sqrt(2.0 * acc_norm) if ps.do_norm else norm_j
        out["norm"][J] = newnorm
        out["pmax"][J] = pmax
        if settings.do_cc:
            out["ll"][J] = -to_host(dmin)
        else:
            out["ll"][J] = np.log(to_host(sumw)) - to_host(dmin) - logsig[og[J]]
    scal["norm"] = float(out["norm"].sum())
    scal["pmax"] = float(out["pmax"].sum())
    scal["ll"] = float(out["ll"].sum())

    bp_data = xp.zeros(partials.bp_data.shape, np.complex128)
    bp_weight = xp.zeros(partials.bp_weight.shape, np.float64)
    step = max(1, int(limits["slice_bytes"] // insert_row_bytes(n, M)))  # slices per chunk of the insertion
    for c in bp_i:
        touched_rows = np.nonzero(touched[c])[0]
        for s in range(0, touched_rows.size, step):
            rows = touched_rows[s : s + step]
            rx = xp.asarray(rows)
            slices = xp.zeros((rows.size, n, n // 2 + 1), np.complex128)
            weights = xp.zeros((rows.size, n, n // 2 + 1), np.float64)
            slices[:, mb_x] = bp_i[c][rx]
            weights[:, mb_x] = bp_w[c][rx]
            A = grid.fine_matrices_from_ids(cache.gids(c)[rows])
            insert_slices(BackProjection(bp_data[c], bp_weight[c], grid_of(model)), A, slices, weights)
            slices = weights = None
    part = Partials(particles.half, grid_of(model), bp_data, bp_weight, acc["wsum_sigma2"], acc["sumw_optics"],
                    acc["wsum_pdf_class"], acc["wsum_pdf_direction"], scal["off"], scal["norm"],
                    acc["wsum_scale_xa"], acc["wsum_scale_aa"], acc["group_counts"], scal["ll"], scal["pmax"], B,
                    scal["zero"])
    res = PoolResult(particles.index, out["rot"], out["tilt"], out["psi"], out["ox"], out["oy"],
                     out["cls"].astype(np.int64), out["pmax"], sig.n_sig.astype(np.int64), out["ll"], out["norm"])
    return part, res
