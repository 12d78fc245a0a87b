"""The element-wise stages of the coarse pass around its GEMM (ALGORITHM.md §4.3-4.4, DESIGN.md §4).

The coarse pass evaluates every (particle b, class k, translation t, orientation o) with one GEMM per class for the
cross term ``g = Re sum_k (w c X s_t) conj(P_o)``; what remains is element-wise over the ``(b, K, T, O)`` block:

- :func:`coarse_diff2`: ``diff2 = (a_b + hr_b) + p_bo - 2 g_bto`` (``a = sum w |X|^2``, ``p = sum w c^2 |P|^2``,
  ``hr`` half the power beyond the current size), ``+inf`` where the prior excludes the sample;
- :func:`coarse_weights`: ``w = exp(-(diff2 - dmin) + lp)`` with the separable log prior ``lp = lpo_bko + off_bt``,
  0 where ``diff2 - dmin > 700`` (RELION's double path, as
  :func:`~gerelion_dask.expectation.weights.posterior_weights`);
- :func:`coarse_select`: both of them and the significant samples of each particle
  (:func:`~gerelion_dask.expectation.weights.significant_set`) from the GEMM's cross terms, with the orientation prior
  given separably per direction and psi angle.

Each is written once with NumPy broadcasting; on CuPy arrays the same formula runs as one fused kernel
(:mod:`gerelion_dask.kernels.coarse`), so the GPU touches each of the block's values once per stage instead of once
per operator; ``coarse_select`` runs as four passes over the cross terms that never write the float64 block at all.

The fine pass (ALGORITHM.md §4.5) needs diff2 only for the 32 children of each particle's significant samples:
:func:`children_diff2` evaluates exactly those, child by child (CuPy twin: one thread block per significant sample,
:mod:`gerelion_dask.kernels.fine`).  Its weighted sums (§4.6) run over the (particle, fine orientation) pairs that
kept weight: :func:`pair_sums` (CuPy twin: :mod:`gerelion_dask.kernels.pairs`, two kernels that write no per-pair
arrays).
"""

from __future__ import annotations

import numpy as np

from ..backend import get_xp

__all__ = ["CANDIDATE_CAP", "REDO_SAMPLES", "add_rows", "block_diff2", "block_sums", "candidate_segment",
           "children_diff2", "coarse_diff2", "coarse_select", "coarse_select_dense", "coarse_weights", "cross_term",
           "diff2_from_terms", "interleaved", "orientation_log_prior", "power_term", "shifted_rows"]

# candidates per particle the GPU twin of coarse_select sorts in shared memory (128 KiB); a particle with more
# (a flat posterior: the first likelihood iterations put 4,000-16,000 of 96,768 samples above the bound) is
# redone by coarse_select_dense
CANDIDATE_CAP = 16384

# samples of such particles the GPU twin redoes at once from their dense rows (coarse_select_dense's float64 diff2 and
# weights with their temporaries): bounded whatever the chunk, so a chunk of a whole pool of 1,000 at a flat first
# iteration does not hold gigabytes of them
REDO_SAMPLES = 1 << 22


def coarse_diff2(g, a, p, hr, lpo, off, out=None):
    """``g (b, T, O)`` cross terms (any float dtype) -> float64 diff2 ``(b, T, O)``.

    ``a, hr (b,)``, ``p (b, O)``, ``lpo (b, O)`` and ``off (b, T)`` log priors (``-inf``: not searched).  ``out``: an
    optional float64 array of the result's shape (a view into a larger block) written in place and returned.
    """
    xp = get_xp(g, p)
    if xp is not np:
        from ..kernels.coarse import coarse_diff2_kernel

        return coarse_diff2_kernel()(g, (a + hr)[:, None, None], p[:, None, :], lpo[:, None, :], off[:, :, None],
                                     out if out is not None else xp.empty(g.shape, np.float64))
    allowed = np.isfinite(lpo)[:, None, :] & np.isfinite(off)[:, :, None]
    d = np.where(allowed, ((a + hr)[:, None, None] + p[:, None, :]) - 2.0 * g.astype(np.float64, copy=False), np.inf)
    if out is None:
        return d
    out[...] = d
    return out


def coarse_weights(d, dmin, lpo, off):
    """Un-normalised posterior weights of ``d (b, K, T, O)`` (``+inf`` excluded) given ``dmin (b,)``, ``lpo (b, K, O)``
    and ``off (b, T)``: ``exp(-(d - dmin) + (lpo + off))``, 0 where ``d - dmin > 700`` or excluded."""
    xp = get_xp(d)
    if xp is not np:
        from ..kernels.coarse import coarse_weights_kernel

        return coarse_weights_kernel()(d, dmin[:, None, None, None], lpo[:, :, None, :], off[:, None, :, None])
    x = d - dmin[:, None, None, None]
    lp = lpo[:, :, None, :] + off[:, None, :, None]
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(x <= 700.0, np.exp(np.where(x <= 700.0, -x + lp, -np.inf)), 0.0)


def coarse_select(g, a, hr, p, dl, pl, off, adaptive_fraction: float = 0.999, maxsig: int = -1):
    """The significant samples of a chunk of particles from the coarse pass's cross terms.

    ``g (K, b, T, U)``: cross terms per class (any float dtype); ``a, hr (b,)``; ``p (K, b, U)``; the log prior of
    sample ``(k, t, u)`` is ``(dl[b, k, u // n_psi] + pl[b, u % n_psi]) + off[b, t]`` with ``dl (b, K, n_dir)``,
    ``pl (b, n_psi)``, ``off (b, T)`` (``-inf``: not searched; ``U = n_dir * n_psi``).  With diff2 and weights as
    :func:`coarse_diff2` and :func:`coarse_weights` and ``dmin`` per particle, returns ``(rows, cols, best)``: the
    significant samples (:func:`~gerelion_dask.expectation.weights.significant_set`) as particle and column in the
    ``(K, T, U)`` flattening of a particle's samples, in row-major order, and each particle's column of largest weight
    (the first on ties).  A particle whose weights all underflow keeps its smallest diff2 alone (weight 1).
    """
    xp = get_xp(g, p)
    if xp is not np:
        from ..kernels.coarse import coarse_select as twin

        return twin(g, a, hr, p, dl, pl, off, adaptive_fraction, maxsig)
    return coarse_select_dense(g, a, hr, p, dl, pl, off, adaptive_fraction, maxsig)


def coarse_select_dense(g, a, hr, p, dl, pl, off, adaptive_fraction: float = 0.999, maxsig: int = -1, total=None):
    """:func:`coarse_select` with the diff2 and weight blocks written out (NumPy's path, and the GPU twin's for
    particles with more candidates than it sorts in shared memory).  ``total``: the particles' weight sums when the
    caller has them (the twin's, so that its candidates and these agree)."""
    from ..expectation.weights import significant_set

    xp = get_xp(g, p)
    K, b, T, U = g.shape
    lpo = orientation_log_prior(dl, pl)  # (b, K, U)
    D = xp.empty((b, K, T, U), np.float64)
    for k in range(K):
        coarse_diff2(g[k], a, p[k], hr, lpo[:, k], off, out=D[:, k])
    D2 = D.reshape(b, -1)
    dmin = D2.min(axis=1)
    w = coarse_weights(D, dmin, lpo, off).reshape(b, -1)
    total = w.sum(axis=1) if total is None else total
    bad = xp.nonzero(~(total > 0))[0]
    if bad.size:  # every weight underflowed: the best sample alone (as posterior_weights does)
        w[bad, xp.argmin(D2[bad], axis=1)] = 1.0
        total[bad] = 1.0
    rows, cols, _, best = significant_set(w, adaptive_fraction, maxsig, total)
    return rows, cols, best


def orientation_log_prior(dl, pl):
    """The log prior ``(b, K, n_dir n_psi)`` of every orientation ``u = i_dir n_psi + i_psi`` from its separable
    parts ``dl (b, K, n_dir)`` and ``pl (b, n_psi)``."""
    xp = get_xp(dl, pl)
    n_psi = pl.shape[1]
    u = xp.arange(dl.shape[2] * n_psi)
    return dl[:, :, u // n_psi] + pl[:, None, u % n_psi]


def candidate_segment(n_samples: int) -> int:
    """Candidates per particle the GPU twin of :func:`coarse_select` sorts in shared memory: the next power of two
    at or above a particle's ``n_samples``, at most ``CANDIDATE_CAP``."""
    return int(min(CANDIDATE_CAP, 1 << max(0, int(n_samples - 1).bit_length())))


def diff2_from_terms(a, p, g, cc: bool = False):
    """diff2 ``(a + p) - 2 g`` from a sample's image term ``a``, model power ``p`` and cross term ``g`` (broadcast
    together), or for ``--firstiter_cc`` ``-g / (sqrt(p) a)`` (``a`` the image norm): RELION's negative CC."""
    xp = get_xp(a, p, g)
    return -g / (xp.sqrt(p) * a + 1e-300) if cc else (a + p) - 2.0 * g


def children_diff2(Z, V, a, ph, P, j, prow, trow, cc: bool = False, max_elems: int = 1 << 22):
    """diff2 (or ``-CC``) of the 32 children of significant samples, each child on its own: ``(R, 32)`` float64.

    Sample ``r`` of particle ``j[r]`` has the fine orientations ``prow[r] (8,)`` (rows of the projections ``P (F, M)``,
    complex) and the fine translations ``trow[r] + 0..3`` (rows of the phases ``ph (T, M)``);
    its child ``4 f + t`` is orientation ``f`` with translation ``t``.  Per particle: ``Z (b, M)`` the weighted image
    (``w c X``, or ``c X`` on the likelihood pixels for CC), ``V (b, M)`` the model weights (``w c^2``, or ``c^2`` on
    the likelihood pixels), ``a (b,)`` the image term (or the image norm for CC).  With
    ``g = Re sum_m Z[j, m] ph[trow + t, m] conj(P[prow[f], m])`` and ``p = sum_m V[j, m] |P[prow[f], m]|^2``:
    ``diff2 = (a + p) - 2 g``, or ``-g / (sqrt(p) a + 1e-300)`` for CC.  NumPy evaluates samples in batches of at
    most ``max_elems`` gathered values; the CuPy twin (:func:`gerelion_dask.kernels.fine.children_diff2`) reads each
    sample's rows once in one thread block.
    """
    xp = get_xp(Z, P)
    if xp is not np:
        from ..kernels.fine import children_diff2 as twin

        return twin(Z, V, a, ph, P, j, prow, trow, cc)
    R, M = len(j), Z.shape[1]
    out = np.empty((R, 32), np.float64)
    left = _children_dense(Z, V, a, ph, P, j, prow, trow, cc, max_elems, out)
    step = max(1, int(max_elems // (24 * M)))  # shifted images (4 M complex), projections and powers (8 M each)
    t4 = np.arange(4)
    for s0 in range(0, len(left), step):
        sel = left[s0 : s0 + step]
        js, pr = j[sel], prow[sel]
        Y = np.ascontiguousarray(Z[js][:, None, :] * ph[trow[sel, None] + t4[None, :]])  # (S, 4, M)
        Pg = np.ascontiguousarray(P[pr], dtype=np.complex128)  # (S, 8, M)
        g = np.matmul(Y.view(np.float64), Pg.view(np.float64).transpose(0, 2, 1))  # (S, 4, 8) = Re(Y conj(P))
        p = np.matmul(Pg.real**2 + Pg.imag**2, V[js][:, :, None])[:, :, 0]  # (S, 8)
        g = g.transpose(0, 2, 1)  # (S, 8, 4): child 4 f + t
        out[sel] = diff2_from_terms(a[js][:, None, None], p[:, :, None], g, cc).reshape(-1, 32)
    return out


# the NumPy children_diff2 takes a particle's samples as one dense product over its translations x orientations when
# it has at least DENSE_MIN_SAMPLES of them and the product holds at most DENSE_MAX_WASTE times their children: flat
# posteriors (early classification: ~20,000 samples a particle, nearly every translation of each orientation) then
# cost a GEMM instead of gathering 12 rows per sample (3.7x faster on such a pool); peaked ones keep the batches
DENSE_MIN_SAMPLES = 64
DENSE_MAX_WASTE = 4.0


def _children_dense(Z, V, a, ph, P, j, prow, trow, cc: bool, max_elems: int, out) -> np.ndarray:
    """:func:`children_diff2` (NumPy) of the particles whose samples suit one dense product each, written into
    ``out``; returns the samples left for the per-sample batches.  Per particle: ``Y`` its image shifted by each of
    its distinct fine translations ``(4 n_t, M)``, ``Pg`` the 8 rows of each of its distinct orientations, a block of
    them at a time within ``max_elems`` values, ``g = Re(Y conj(Pg))`` as one real GEMM ``(4 n_t, 8 n_o)`` and ``p``
    once per orientation row; each sample then reads its 32 children from ``g``."""
    R, M = len(j), Z.shape[1]
    if R < DENSE_MIN_SAMPLES:
        return np.arange(R)
    order = np.argsort(j, kind="stable")
    js = j[order]
    starts = np.flatnonzero(np.r_[True, js[1:] != js[:-1]])
    ends = np.r_[starts[1:], R]
    left, t4 = [], np.arange(4)
    block = max(1, int(max_elems // (24 * M)))  # orientations per product (8 rows of M complex, their powers)
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        idx = order[s:e]
        if e - s < DENSE_MIN_SAMPLES:
            left.append(idx)
            continue
        uo, first, io = np.unique(prow[idx, 0], return_index=True, return_inverse=True)
        rows = prow[idx[first]]  # (n_o, 8): each distinct orientation's rows
        ut, it = np.unique(trow[idx], return_inverse=True)
        if len(uo) * len(ut) > DENSE_MAX_WASTE * (e - s) or not np.array_equal(rows[io], prow[idx]):
            left.append(idx)  # too sparse a product (or rows not fixed by their first: never in the fine pass)
            continue
        jj = int(js[s])
        Yv = (Z[jj] * ph[(ut[:, None] + t4).ravel()]).view(np.float64)  # (4 n_t, 2 M)
        by_o = np.argsort(io, kind="stable")
        cut = np.searchsorted(io[by_o], np.arange(0, len(uo) + block, block))
        for k, o0 in enumerate(range(0, len(uo), block)):
            o1 = min(o0 + block, len(uo))
            Pg = np.ascontiguousarray(P[rows[o0:o1].ravel()], dtype=np.complex128)  # (8 n_b, M)
            G = (Yv @ Pg.view(np.float64).T).reshape(len(ut), 4, o1 - o0, 8)
            p = ((Pg.real**2 + Pg.imag**2) @ V[jj]).reshape(o1 - o0, 8)
            del Pg
            mine = by_o[cut[k] : cut[k + 1]]
            oo = io[mine] - o0
            g = G[it[mine], :, oo, :].transpose(0, 2, 1)  # (S, 8, 4): child 4 f + t
            out[idx[mine]] = diff2_from_terms(a[jj], p[oo][:, :, None], g, cc).reshape(-1, 32)
    return np.concatenate(left) if left else np.zeros(0, np.int64)


def add_rows(target, rows, values) -> None:
    """``target[rows[i]] += values[i]`` for every ``i`` (NumPy host arrays; repeated rows add up; ``values`` with rows
    of any shape), in a fixed order: each run of equal rows (after a stable sort by row) is summed and added once
    (7x faster than a row at a time; ``np.add.at`` is slower still, and ``np.add.reduceat`` 1.2-6x slower than this
    loop on a pool's (pairs, M) rows, complex ones most); the rows that occur once are added in one indexed step."""
    rows = np.asarray(rows)
    if rows.size == 0:
        return
    values = np.asarray(values)
    if rows.size > 1 and np.any(rows[1:] < rows[:-1]):
        order = np.argsort(rows, kind="stable")
        rows, values = rows[order], values[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    ends = np.r_[starts[1:], len(rows)]
    single = ends - starts == 1  # rows that occur once are added in one indexed step (a local search's pairs)
    if single.all():  # (no copy of the values)
        target[rows] += values
        return
    if single.any():
        target[rows[starts[single]]] += values[starts[single]]
    for lo, hi in zip(starts[~single].tolist(), ends[~single].tolist(), strict=True):
        target[rows[lo]] += values[lo:hi].sum(axis=0)


def pair_sums(XCW, CCW, X, Cr, gf, ph, P, pj, prow, brow, cstart, tp, wv, bp_i, bp_w, resid, xa, aa,
              max_elems: int = 1 << 22, rows_sorted: bool = False) -> None:
    """The fine pass's weighted sums over (particle, fine orientation) pairs (ALGORITHM.md §4.6), added in place.

    Pair ``p`` is particle ``pj[p]`` (a row of the per-particle arrays ``(b, M)``) with the projection ``P[prow[p]]``
    (``P (F, M)`` complex); its children (the fine translations it kept weight on) are ``i = cstart[p] ..
    cstart[p + 1] - 1``, with phase row ``ph[tp[i]]`` (``ph (T, M)`` complex) and weight ``wv[i]``.  With
    ``Q = sum_i wv[i] ph[tp[i]]`` and ``wo = sum_i wv[i]``:

        bp_i[brow[p]] += XCW[j] Q            (back-projection data, ``XCW = X c / sigma^2`` of the unmasked image)
        bp_w[brow[p]] += wo CCW[j]           (back-projection weight, ``CCW = c^2 / sigma^2``)
        x = Cr[j] Re(X[j] conj(P) Q),  m = Cr[j]^2 |P|^2
        resid[j] += wo m - 2 x               (the noise spectrum's model terms)
        xa[j] += sum_k x gf,  aa[j] += wo sum_k m gf    (the scale sums over the pixels ``gf`` marks)

    for ``j = pj[p]``.  ``rows_sorted``: the caller's promise that ``brow`` is in ascending order (the twin then
    skips a sort).  NumPy takes at most ``max_elems / (8 M)`` pairs at a time (``Q`` as one product of their
    weights over the translations with ``ph``; rows added by :func:`add_rows`); the CuPy twin
    (:func:`gerelion_dask.kernels.pairs.pair_sums`) makes each pair's ``Q`` in registers, once per orientation row
    and once per particle, and writes no per-pair arrays.
    """
    xp = get_xp(X, P)
    if xp is not np:
        from ..kernels.pairs import pair_sums as twin

        twin(XCW, CCW, X, Cr, gf, ph, P, pj, prow, brow, cstart, tp, wv, bp_i, bp_w, resid, xa, aa, rows_sorted)
        return
    n_p, M, T = len(pj), X.shape[1], ph.shape[0]
    ph_v = np.ascontiguousarray(ph, dtype=np.complex128).view(np.float64)  # (T, 2 M)
    step = max(1, int(max_elems // (8 * M)))  # ~14 (pairs, M) arrays live
    for s in range(0, n_p, step):
        e = min(s + step, n_p)
        lo, hi = int(cstart[s]), int(cstart[e])
        Wc = np.zeros((e - s, T), np.float64)  # each pair's weights over the translations
        np.add.at(Wc, (np.repeat(np.arange(e - s), np.diff(cstart[s : e + 1])), tp[lo:hi]), wv[lo:hi])
        Q = (Wc @ ph_v).view(np.complex128)  # (n, M): sum_i w_i ph_i
        wo = Wc.sum(axis=1)
        del Wc
        J = pj[s:e]
        add_rows(bp_i, brow[s:e], XCW[J] * Q)
        add_rows(bp_w, brow[s:e], wo[:, None] * CCW[J])
        Pr = P[prow[s:e]]
        x = Cr[J] * (X[J] * (np.conj(Pr) * Q)).real
        del Q
        m = Cr[J] ** 2 * (Pr.real**2 + Pr.imag**2)
        del Pr
        add_rows(resid, J, wo[:, None] * m - 2.0 * x)
        xa += np.bincount(J, weights=x @ gf, minlength=len(xa))
        aa += np.bincount(J, weights=wo * (m @ gf), minlength=len(aa))


def interleaved(xp, Z, dtype):
    """Complex ``Z (..., M)`` as real ``(..., 2M)`` (real and imaginary parts interleaved) in ``dtype`` (float32 or
    float64): the dot product of two such rows is ``Re(z1 conj(z2))``."""
    ct = np.complex64 if np.dtype(dtype) == np.float32 else np.complex128
    return xp.ascontiguousarray(Z.astype(ct, copy=False)).view(dtype)


def shifted_rows(xp, Z, ph, dtype=np.float64):
    """Each particle's row of ``Z (b, M)`` times each phase row of ``ph (T, M)``, as interleaved real rows
    ``(b, T, 2M)`` in ``dtype`` (the product formed in that precision)."""
    ct = np.complex64 if np.dtype(dtype) == np.float32 else np.complex128
    return interleaved(xp, Z.astype(ct, copy=False)[:, None, :] * ph.astype(ct, copy=False)[None], dtype)


def cross_term(xp, Z, ph, Pv, out=None):
    """``g (b, T, O) = Re sum_m (Z_b s_t)(m) conj(P_o(m))`` for particle-side ``Z (b, M)``, phases ``s = ph (T, M)``
    and interleaved projections ``Pv`` (:func:`interleaved`): one real GEMM in the precision of ``Pv``.  ``Pv
    (O, 2M)`` is shared by the particles; ``(b, O, 2M)`` are each particle's own (local searches: one batched GEMM).
    ``out``: a contiguous ``(b, T, O)`` array of ``Pv``'s dtype to write into."""
    b, T = Z.shape[0], ph.shape[0]
    Y = shifted_rows(xp, Z, ph, Pv.dtype)  # (b, T, 2M)
    if Pv.ndim == 3:
        Pt = Pv.transpose(0, 2, 1)
        return xp.matmul(Y, Pt) if out is None else xp.matmul(Y, Pt, out=out)
    Y = Y.reshape(b * T, -1)
    if out is None:
        return (Y @ Pv.T).reshape(b, T, -1)
    xp.matmul(Y, Pv.T, out=out.reshape(b * T, -1))
    return out


def power_term(xp, V, power):
    """``p (b, O) = sum_m V_b(m) power_o(m)`` as float64, in the precision of ``power`` (``|P|^2``, shared ``(O, M)``
    or each particle's own ``(b, O, M)``); ``V`` is the particles' ``w c^2``."""
    v = V.astype(power.dtype, copy=False)
    if power.ndim == 3:
        return xp.matmul(v[:, None, :], power.transpose(0, 2, 1))[:, 0].astype(np.float64, copy=False)
    return (v @ power.T).astype(np.float64, copy=False)


def block_diff2(Z, V, a, ph, P, power):
    """diff2 of every child of a dense block (flat posteriors, ALGORITHM.md §4.5): ``(b, T, F)`` float64 for the
    particles' ``Z (b, M)`` (``w c X``), ``V (b, M)`` (``w c^2``) and image terms ``a (b,)`` against every fine
    translation ``ph (T, M)`` (phases) and fine orientation ``P (F, M)`` (projections, complex128; ``power`` their
    ``|P|^2``): ``diff2 = (a + p) - 2 g`` with the coarse pass's :func:`cross_term` and :func:`power_term` in
    float64, the terms of :func:`children_diff2` for all ``T x F`` children at once."""
    xp = get_xp(Z, P)
    g = cross_term(xp, Z, ph, interleaved(xp, P, np.float64))
    p = power_term(xp, V, power)  # (b, F)
    return (a[:, None, None] + p[:, None, :]) - 2.0 * g


def block_sums(W, XCW, CCW, X, Cr, gf, ph, P, power):
    """The weighted sums of :func:`pair_sums` over a dense block of weights ``W (b, T, F)`` (particle, fine
    translation ``ph (T, M)``, fine orientation ``P (F, M)``; zeros where a child kept no weight), as GEMMs.
    With ``wo = sum_t W`` (b, F) and ``Q_bf = sum_t W ph_t``:

        bp_i (F, M) = sum_b XCW_b Q_bf = W^T (F, b T) @ (XCW_b ph_t) (b T, M)
        bp_w (F, M) = wo^T @ CCW
        m_b = Cr_b^2 sum_f wo_bf |P_f|^2,  x_b = Cr_b Re(X_b sum_t ph_t conj(sum_f W_btf P_f))
        resid (b, M) = m - 2 x,  xa (b,) = x @ gf,  aa (b,) = m @ gf

    (``sum_f conj(P_f) Q_bf`` regrouped by translation: ``W`` is real, so ``sum_f W conj(P_f)`` is the conjugate of
    one real GEMM over interleaved parts).  Returns ``(bp_i, bp_w, resid, xa, aa, wo)``."""
    xp = get_xp(W, P)
    b, T, F = W.shape
    M = X.shape[1]
    Wf = W.reshape(b * T, F)
    wo = xp.matmul(xp.ones((1, T)), W)[:, 0]  # sum over t as a product (a GPU's reduction over the middle axis is slow)
    bp_i = xp.ascontiguousarray(Wf.T @ shifted_rows(xp, XCW, ph).reshape(b * T, 2 * M)).view(np.complex128)  # (F, M)
    bp_w = wo.T @ CCW
    H = xp.ascontiguousarray(Wf @ interleaved(xp, P, np.float64)).view(np.complex128).reshape(b, T, M)  # sum_f W P_f
    S = (xp.conj(H) * ph[None]).sum(axis=1)
    del H
    x = Cr * (X * S).real
    m = Cr * Cr * (wo @ power)
    return bp_i, bp_w, m - 2.0 * x, x @ gf, m @ gf, wo
