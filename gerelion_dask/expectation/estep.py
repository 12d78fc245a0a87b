"""The expectation step of one pool of particles (RELION ``expectationOneParticle``, ALGORITHM.md §4).

Pass 1 (coarse) is written as matrix products (DESIGN.md §4): with ``w = 1/(2 sigma^2)``, CTF c and translation
phases s_t on the particle side,

    diff2(i, o, t) = sum_k w |X|^2 + sum_k w c^2 |P_o|^2 - 2 Re sum_k (w c X s_t) conj(P_o)

so all particles of a pool share one set of projections and the cross term is one real GEMM over stacked real and
imaginary parts.  Pass 2 evaluates the 32 children (8 orientations x 4 translations) of each significant coarse
sample at the current image size (``fine.py``: chunks of particles as dense GEMMs over the union of their children,
pairs whose coarse parent was not significant excluded), with the weighted sums of §4.6 and one 3D insertion per
fine orientation of the pool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from ..backend import SizedByArrays, get_xp, to_host
from ..conventions import shift_phase_2d, window_rfft2
from ..ops.fourier import cc_image_norm, cc_pixel_weights, likelihood_pixels, shells_2d
from ..ops.indexing import concat_ranges, segment_max
from ..ops.likelihood import coarse_select, cross_term, interleaved, orientation_log_prior, power_term
from ..ops.projector import ReferenceSpec
from .grid import OrientationGrid
from .partials import PoolResult
from .fine import Significant, fine_limits, fine_pass, gather, project_gathered
from .preprocess import PoolParticles, PreprocessSettings, preprocess_pool

__all__ = ["EStepModel", "EStepSettings", "expectation_pool"]

log = logging.getLogger(__name__)

# the smallest chunk budget (diff2 values) the out-of-memory retry goes down to; below it the pool is split (a
# single particle gives up)
MIN_CHUNK_ELEMS = 1 << 12
SPLIT_AFTER_HALVINGS = 3  # out of memory this many times with halved chunks: split the pool in two instead


@dataclass(frozen=True)
class EStepModel(SizedByArrays):
    """The parts of the current model that one half set's E-step reads."""

    refs: list  # FourierReference per class (None for an empty class). An iteration ships ReferenceSpec maps instead;
    # distributed.tasks.device_model makes their transforms on the worker's device before expectation_pool runs
    pdf_class: np.ndarray  # (K,)
    pdf_direction: np.ndarray  # (K, n_dir)
    sigma2_noise: np.ndarray  # (n_optics, N/2+1)
    data_vs_prior: np.ndarray  # (K, N/2+1)
    sigma_offset_angst: float
    scales: np.ndarray  # (n_groups,) intensity scale per group
    avg_norm: float = 1.0


@dataclass(frozen=True)
class EStepSettings:
    preprocess: PreprocessSettings
    grid: OrientationGrid
    coarse_size: int
    adaptive_fraction: float = 0.999
    maxsig: int = -1
    do_cc: bool = False  # --firstiter_cc in iteration 1 (or --always_cc)
    do_scale: bool = False
    ctf_on_reference: bool = True  # False in iteration 1 when the reference is not CTF-corrected
    local_sigma_rot: float = 0.0  # > 0: Gaussian local searches (degrees)
    local_sigma_psi: float = 0.0
    symmetry_operators: np.ndarray | None = None  # (G, 3, 3) for local-search distances
    n_optics: int = 1
    n_groups: int = 1
    fine_max_elems: int = 0  # E-step: most values per chunk or group of particles (0: by backend, see fine.py)
    coarse_dtype: str = "auto"  # precision of the coarse-pass GEMMs: "float32", "float64" or by backend (fine.py)
    fixed_poses: bool = False  # --skip_align: each particle keeps its angles and offset (expectation.fixed)
    search_translations: bool = False  # --skip_rotate (with fixed_poses): the angles kept, the grid's translations
    strict_size: int = 0  # --strict_highres_exp: probabilities from the window of this size only (0: current size)




def _offset_log_prior(u_px, prior_px, pixel_size, sigma_offset_angst, xp=np):
    """log of exp(-|u - mu|^2 a^2 / (2 s^2)) / (2 pi s^2), normalised by its mean over the translations (§4.4)."""
    s2 = max(sigma_offset_angst, 1e-6) ** 2
    d2 = (((u_px - prior_px[:, None, :]) * pixel_size) ** 2).sum(-1)
    lp = -d2 / (2 * s2) - np.log(2 * np.pi * s2)
    m = lp.max(axis=1, keepdims=True)
    return lp - (m + np.log(np.mean(np.exp(lp - m), axis=1, keepdims=True)))


@dataclass(frozen=True)
class OrientationPriors:
    """Log priors of the coarse samples of a pool, separable as RELION's (-inf = not searched):

    ``log p(c, dir, psi, t) = class_lp[b, c] + D(b, c, dir) + psi_lp[b, psi] + off_lp[b, t]``

    where ``D`` is the learned direction distribution of class ``c``, ``class_dir_lp[c, dir]`` (global searches), or
    particle ``b``'s Gaussian local-search prior, held for its kept directions only (local searches: compressed rows
    ``dir_index[dir_ptr[b]:dir_ptr[b + 1]]`` with log priors ``dir_value``; a pool's dense ``(B, K, n_dir)`` array
    at HEALPix order 5 cost more host time than the pool's GPU passes).  ``class_lp`` holds -inf for classes a
    particle does not search and otherwise the [3.0+] normalisation by the mean over the sampled orientations (it
    changes only log-likelihood values).
    """

    class_lp: np.ndarray  # (B, K)
    psi_lp: np.ndarray  # (B, n_psi)
    off_lp: np.ndarray  # (B, T)
    class_dir_lp: np.ndarray | None = None  # (K, n_dir): global searches
    dir_ptr: np.ndarray | None = None  # (B + 1,): local searches
    dir_index: np.ndarray | None = None  # (nnz,) ascending within each particle
    dir_value: np.ndarray | None = None  # (nnz,) log priors

    @property
    def local(self) -> bool:
        return self.dir_ptr is not None

    def searched(self) -> np.ndarray:
        """``(B, K)``: particle b searches at least one sample of class c."""
        has_psi = np.isfinite(self.psi_lp).any(axis=1)
        if self.local:
            has_dir = np.diff(self.dir_ptr) > 0
            return np.isfinite(self.class_lp) & (has_dir & has_psi)[:, None]
        has_dir = np.isfinite(self.class_dir_lp).any(axis=1)
        return np.isfinite(self.class_lp) & has_dir[None, :] & has_psi[:, None]

    def most_likely_direction(self) -> np.ndarray:
        """Local searches: each particle's direction of highest prior (the lowest index among ties; 0 for a particle
        without directions, which local searches never leave).  Each row's maximum by one reduceat, then its first
        entry that reaches it (``dir_index`` ascends within a row): linear in the kept pairs, no sort."""
        ptr, v = self.dir_ptr, self.dir_value
        n = np.diff(ptr)
        full = n > 0
        out = np.zeros(len(n), np.int64)
        if not full.any():
            return out
        hit = np.flatnonzero(v >= np.repeat(segment_max(ptr, v), n))
        rows = np.repeat(np.arange(len(n)), n)[hit]
        first = hit[np.r_[True, rows[1:] != rows[:-1]]]  # one per non-empty row, in row order
        out[full] = self.dir_index[first]
        return out

    def directions(self, J: np.ndarray, classes) -> tuple[np.ndarray, np.ndarray]:
        """The searched directions of particles ``J`` and their direction-and-class log priors
        ``(len(J), len(classes), D)`` (-inf where not searched).  Global searches: every direction, ``(n_dir,)``,
        shared.  Local searches: each particle's own, ``(len(J), D)``, padded to the longest row with the row's first
        direction at prior -inf (every local-search particle keeps at least one direction)."""
        dirs, cl, dv = self.direction_terms(J, classes)
        return dirs, cl[:, :, None] + dv

    def direction_terms(self, J: np.ndarray, classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`directions` with its log priors in their two separable parts, ``cl[:, :, None] + dv``: the classes'
        ``cl (len(J), len(classes))`` and the directions' ``dv``, ``(1, len(classes), D)`` in global searches (the
        classes' learned distributions, the same for every particle) and ``(len(J), 1, D)`` in local ones (each
        particle's own, the same for every class), so that the sum is made where it is used (on the device)."""
        J = np.asarray(J)
        cls = np.asarray(classes, np.int64)
        cl = self.class_lp[np.ix_(J, cls)]
        if not self.local:
            return np.arange(self.class_dir_lp.shape[1]), cl, self.class_dir_lp[cls][None]
        lo, n = self.dir_ptr[J], np.diff(self.dir_ptr)[J]
        rows, pos, at = np.repeat(np.arange(len(J)), n), concat_ranges(0, n), concat_ranges(lo, n)
        dirs = np.repeat(self.dir_index[lo][:, None], int(n.max(initial=0)), axis=1)
        value = np.full(dirs.shape, -np.inf)
        dirs[rows, pos] = self.dir_index[at]
        value[rows, pos] = self.dir_value[at]
        return dirs, cl, value[:, None, :]


def searched_classes(model: EStepModel, particles: PoolParticles) -> np.ndarray:
    """``(B, K)`` bool: the classes each particle of a pool may take -- those with a map and a positive fraction, or
    in a classification's seed iteration its seed class alone."""
    B, K = len(particles.index), len(model.refs)
    active = np.array([r is not None and p > 0 for r, p in zip(model.refs, model.pdf_class, strict=True)])
    search = np.broadcast_to(active, (B, K)).copy()
    if particles.seed_class is not None:
        keep = np.zeros((B, K), bool)
        keep[np.arange(B), particles.seed_class] = True
        search &= keep
    return search


def orientation_priors(particles: PoolParticles, model: EStepModel, settings: EStepSettings,
                       xp=np) -> OrientationPriors:
    """Direction, psi and offset log priors of one pool (§3.5, §4.4), on the host.

    Global searches: the learned direction distribution per class.  Local searches: Gaussian priors around each
    particle's previous angles (one implementation: :func:`gerelion_dask.ops.sampling.local_search_sparse`, whose
    directions are tested on the backend ``xp`` of the pool), without class fractions (RELION, all versions), kept
    for the directions in range only.
    """
    from ..ops.sampling import local_search_sparse

    grid = settings.grid
    B = len(particles.index)
    search = searched_classes(model, particles)
    k_b = search.sum(axis=1)
    local = settings.local_sigma_rot > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        if local:
            rot, tilt = grid.dir_angles
            a = particles.angles
            s = settings.local_sigma_rot
            lp = local_search_sparse(a[:, 0], a[:, 1], a[:, 2], s, s, settings.local_sigma_psi, rot, tilt, grid.psi,
                                     settings.symmetry_operators, xp=xp)
            dir_value = np.log(lp.dir_prior)
            psi_lp = np.full(lp.psi_prior.shape, -np.inf)  # log 0 = -inf: the logarithm at the kept samples only
            kept = np.nonzero(lp.psi_prior)
            psi_lp[kept] = np.log(lp.psi_prior[kept])
            # per particle over its kept directions: the largest log prior, the sum of exp(lp - max), the count;
            # every searched class repeats them
            n_b = np.diff(lp.dir_ptr)
            rows = np.repeat(np.arange(B), n_b)
            m_b = segment_max(lp.dir_ptr, dir_value)
            s_b = np.bincount(rows, weights=np.exp(dir_value - m_b[rows]), minlength=B)
            md, sd, nd = m_b, k_b * s_b, k_b * n_b
        else:
            pd = np.log(np.asarray(model.pdf_direction, dtype=np.float64))
            psi_lp = np.zeros((B, grid.n_psi))
            fin = np.isfinite(pd)
            m_c = np.max(np.where(fin, pd, -np.inf), axis=1)
            s_c = np.where(fin, np.exp(pd - m_c[:, None]), 0.0).sum(axis=1)
            n_c = fin.sum(axis=1)
            use = search & (n_c > 0)[None, :]
            md = np.max(np.where(use, m_c[None, :], -np.inf), axis=1)
            sd = np.where(use, s_c[None, :] * np.exp(m_c[None, :] - md[:, None]), 0.0).sum(axis=1)
            nd = np.where(use, n_c[None, :], 0).sum(axis=1)
        # divide by the mean over the sampled (finite) orientations, separably for all particles at once
        fp = np.isfinite(psi_lp)
        npsi = fp.sum(axis=1)
        ok = (nd > 0) & (npsi > 0)
        mp = np.where(ok, np.max(np.where(fp, psi_lp, -np.inf), axis=1), 0.0)
        # sum of exp(psi_lp - mp) over each row's finite entries, summed as whole rows (zeros elsewhere); local
        # searches keep a few psi angles of hundreds: the exponential there only
        if fp.all():
            ex = np.exp(psi_lp - mp[:, None])
        else:
            r_f, c_f = np.nonzero(fp)
            ex = np.zeros(psi_lp.shape)
            ex[r_f, c_f] = np.exp(psi_lp[r_f, c_f] - mp[r_f])
        sp = ex.sum(axis=1)
        log_mean = np.where(ok, md + mp + np.log(sd) + np.log(sp) - np.log(nd) - np.log(npsi), 0.0)
    class_lp = np.where(search, -log_mean[:, None], -np.inf)
    u = np.rint(particles.offset_px)[:, None, :] + grid.translations[None]
    off_lp = _offset_log_prior(u, particles.offset_prior_px, settings.preprocess.pixel_size,
                               model.sigma_offset_angst)
    if local:
        return OrientationPriors(class_lp, psi_lp, off_lp, dir_ptr=lp.dir_ptr, dir_index=lp.dir_index,
                                 dir_value=dir_value)
    return OrientationPriors(class_lp, psi_lp, off_lp, class_dir_lp=pd)


@dataclass(frozen=True)
class CoarseProjections(SizedByArrays):
    """One class's projections for the coarse pass: interleaved ``(O, 2M)`` and power ``|P|^2 (O, M)``, in the
    precision of the coarse GEMMs."""

    interleaved: object
    power: object


def coarse_projections(xp, P, dtype) -> CoarseProjections:
    Pv = interleaved(xp, P, dtype)
    return CoarseProjections(Pv, (Pv[:, 0::2] ** 2 + Pv[:, 1::2] ** 2))


def _cc_block(xp, X, C, w, normx, phase, proj: CoarseProjections, ctf_on_ref: bool, lpo, off, out=None):
    """Cross-correlation "diff2" ``(B, T, O)`` = ``-Re sum w (c X s_t) conj(P_o) / (sqrt(sum w |c P_o|^2) |X|)``
    (float64, ``+inf`` where ``lpo (B, O) + off (B, T)`` is ``-inf``) of particles ``X (B, M)`` against one class's
    projections (``--firstiter_cc``), with the pixels' weights ``w (1, M)`` and the images' norms ``normx (B,)`` of
    :func:`~gerelion_dask.ops.fourier.cc_pixel_weights` / ``cc_image_norm``: the cross term is the likelihood path's
    GEMM (:func:`~gerelion_dask.ops.likelihood.cross_term`), in the precision of ``proj``.  ``out``: a float64 array of the result's shape."""
    f64 = np.float64
    Cr = C if ctf_on_ref else xp.ones_like(C)
    g = cross_term(xp, w * Cr * X, phase, proj.interleaved)
    normp = xp.sqrt(power_term(xp, w * Cr * Cr, proj.power))  # (B, O)
    den = normp[:, None, :] * xp.asarray(normx, dtype=f64)[:, None, None]
    allowed = xp.isfinite(lpo)[:, None, :] & xp.isfinite(off)[:, :, None]
    d = xp.where(allowed, -g.astype(f64) / xp.where(den > 0, den, 1.0), xp.inf)
    if out is None:
        return d
    out[...] = d
    return out


def expectation_pool(images, particles: PoolParticles, model: EStepModel, settings: EStepSettings, cache=None,
                     release=None):
    """E-step of one pool of one half set: returns ``(Partials, PoolResult)``.

    When the device (or host) runs out of memory, the chunk budget is halved and the pool evaluated again; after
    ``SPLIT_AFTER_HALVINGS`` halvings (or at the smallest chunks) the pool is split in two halves evaluated one after
    the other (each may halve and split again) and their partial sums added: what a pool holds whatever its chunks
    (its images, and the projections and back-projection sums of the union of its particles' fine orientations:
    ~1.2 MB each at 256 px) then shrinks too.  Chunks and splits change only the order of floating-point sums, not
    the result.  ``cache``: a :class:`~gerelion_dask.expectation.fine.ProjectionCache` shared by the pools of this
    iteration and half set.  ``release``: called at the first out-of-memory error, before anything shrinks, to free
    what the process holds for other pools (a worker's references and caches of the other half set); when it returns
    true the pool is evaluated again as it was.
    """
    xp = get_xp(images)
    if any(isinstance(r, ReferenceSpec) for r in model.refs):
        raise TypeError("expectation_pool needs reference transforms, not maps: pass the model through "
                        "distributed.tasks.device_model first (it makes them once per worker and half set)")
    limit = settings.fine_max_elems or fine_limits(xp)["max_elems"]
    halvings = 0
    while True:
        try:
            return _expectation_pool(xp, images, particles, model, replace(settings, fine_max_elems=limit), cache)
        except MemoryError as e:  # numpy's MemoryError, and CuPy's OutOfMemoryError (a subclass of it)
            B = len(particles.index)
            why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        # outside the handler: the exception's traceback holds the failed attempt's arrays until it ends
        if release is not None:
            freed, release = release(), None  # once
            if xp is not np:
                xp.get_default_memory_pool().free_all_blocks()
            if freed:
                log.warning("out of memory in the E-step of %d particles (%s): freed what was held for other pools, "
                            "retrying", B, why)
                continue
        if limit <= MIN_CHUNK_ELEMS and B < 2:
            raise MemoryError(f"out of memory in the E-step of one particle with the smallest chunks ({why})")
        split = B >= 2 and (halvings >= SPLIT_AFTER_HALVINGS or limit <= MIN_CHUNK_ELEMS)
        if split:
            log.warning("out of memory in the E-step of %d particles (%s): splitting the pool in two", B, why)
        else:
            limit //= 2
            halvings += 1
            log.warning("out of memory in the E-step of %d particles (%s): retrying with chunks of %d values",
                        B, why, limit)
        if cache is not None:
            cache.clear()  # the shared projections go first
        if xp is not np:
            xp.get_default_memory_pool().free_all_blocks()
        if split:
            return _split_pool(images, particles, model, replace(settings, fine_max_elems=limit), cache)


def _split_pool(images, particles: PoolParticles, model, settings, cache):
    """The E-step of a pool as two halves of its particles, one after the other: summed partials, joined results."""
    h = len(particles.index) // 2
    first = expectation_pool(images[:h], particles.take(slice(0, h)), model, settings, cache)
    if get_xp(images) is not np:  # the first half's sums wait in host memory while the second half runs
        first = (first[0].to_host(), first[1])
    second = expectation_pool(images[h:], particles.take(slice(h, None)), model, settings, cache)
    return second[0].absorb(first[0]), PoolResult.concat([first[1], second[1]])


def _expectation_pool(xp, images, particles, model, settings, cache=None):
    pre = preprocess_pool(images, particles, settings.preprocess, model.sigma2_noise)
    if settings.fixed_poses:  # --skip_align / --skip_rotate: the particles keep their angles
        from .fixed import fixed_pose_pass

        return fixed_pose_pass(xp, pre, particles, model, settings, cache)
    pri = orientation_priors(particles, model, settings, xp)
    sig = coarse_pass(xp, pre, particles, model, settings, pri, cache)
    return fine_pass(xp, pre, particles, model, settings, sig, cache)


def coarse_pass(xp, pre, particles, model: EStepModel, settings: EStepSettings, pri: OrientationPriors, cache=None):
    """Pass 1 at the coarse image size -> the significant samples of every particle (:class:`Significant`).

    Particles are taken in chunks (global searches: all orientations, projected once per class for the pool, or
    once per iteration with a :class:`~gerelion_dask.expectation.fine.ProjectionCache`; local searches: each
    particle's own directions x psi angles, padded to the chunk's longest lists, the chunk's distinct orientations
    projected once and each particle's rows gathered, :func:`_local_chunks`), so memory stays bounded by
    ``fine_max_elems`` whatever the sampling order.  A chunk's samples form one ``(K, b, T, O)`` block of cross
    terms (one GEMM per class, batched over the particles in local searches);
    :func:`~gerelion_dask.ops.likelihood.coarse_select` turns it into each particle's significant samples (on a GPU
    without writing the float64 diff2 or weights).  Cross-correlation (iteration 1) keeps the best sample of the
    block of :func:`_cc_block`.
    """
    ps = settings.preprocess
    N, nc = ps.ori_size, settings.coarse_size
    grid = settings.grid
    K = len(model.refs)
    B = len(particles.index)
    n_psi = grid.n_psi
    O = grid.n_dir * n_psi
    limits = fine_limits(xp)
    max_elems = settings.fine_max_elems or limits["max_elems"]
    dtype = np.dtype(settings.coarse_dtype if settings.coarse_dtype != "auto" else limits["coarse_dtype"])
    scale = np.asarray(model.scales)[particles.group]
    sig2 = np.asarray(model.sigma2_noise, dtype=np.float64)
    def pixels():  # the coarse window's likelihood pixels (with the DC term for CC), their shells and the
        # translations' phases (T, Mc)
        m = likelihood_pixels(nc, include_dc=settings.do_cc)
        mx = xp.asarray(m)
        return mx, xp.asarray(shells_2d(nc)[m]), gather(shift_phase_2d(nc, N, xp.asarray(grid.translations)), mx)

    key = ("coarse-pixels", nc, N, settings.do_cc, grid.translations.tobytes())
    mc, shc, phase_c = cache.whole(key, pixels) if cache is not None else pixels()
    Xc = gather(window_rfft2(pre.fimg, nc), mc)
    Cc = gather(window_rfft2(pre.ctf, nc), mc) * xp.asarray(scale)[:, None]
    Wc = 1.0 / (2.0 * xp.asarray(sig2)[xp.asarray(particles.optics_group)][:, shc])  # on the device
    T = len(grid.translations)
    hr = to_host(pre.highres_xi2) / 2.0 if not settings.do_cc else np.zeros(B)
    if settings.do_cc:  # RELION's CC sums: the projector's circle with the kx = 0 twins, the whole window's power
        Wcc = gather(cc_pixel_weights(nc, xp), mc)[None, :]
        Xnorm = cc_image_norm(pre.fimg, nc)
    searched = pri.searched()  # (B, K)
    fin_p = np.isfinite(pri.psi_lp)
    classes = [c for c in range(K) if model.refs[c] is not None and searched[:, c].any()]
    local = pri.local

    def projections(c, A, rows=None):
        """Class c's coarse projections at rotations A; with ``rows (b, nU)`` each particle's own rows of them."""
        pq = coarse_projections(xp, project_gathered(model.refs[c], A, nc, mc, xp), dtype)
        return pq if rows is None else CoarseProjections(pq.interleaved[rows], pq.power[rows])

    if local:
        # each particle's own directions (compressed rows) and psi angles, evaluated as one batched GEMM per chunk;
        # particles in the order of their most likely direction, so that neighbours share projections
        n_p = fin_p.sum(axis=1)
        # projection rows per chunk (b x n_d x n_p), ~40 bytes a pixel each (FINE_LIMITS' local_rows_factor)
        rows_budget = limits["local_rows_factor"] * max_elems * 8 // (40 * phase_c.shape[1])
        chunks = _local_chunks(np.argsort(pri.most_likely_direction(), kind="stable"), np.diff(pri.dir_ptr), n_p,
                               T * max(1, len(classes)), max_elems, rows_budget)
        full = None
    else:
        # global searches: the chunk's float32 cross terms are the whole block, so the GPU takes twice the budget
        per = max(1, int(limits["coarse_factor"] * max_elems // max(1, O * T * max(1, len(classes)))))
        chunks = [np.arange(s, min(B, s + per)) for s in range(0, B, per)]
        full = {}
        for c in classes:
            make = (lambda c=c: projections(c, grid.coarse_matrices()))
            full[c] = cache.whole(("coarse", c, nc, dtype.str, settings.do_cc), make) if cache is not None else make()
    rows_b, rows_c, rows_o, rows_t, rows_lp = [], [], [], [], []
    n_sig = np.zeros(B, np.int64)
    best = np.zeros(B, np.int64)
    for J in chunks:
        b = len(J)
        Jx = xp.asarray(J)
        # the chunk's directions and their log priors with the classes' (b, K, n_d): global searches every direction
        # and psi angle; local searches each particle's own directions ud[j] x psi angles up[j] (padded with its
        # first ones at prior -inf), U[j] its orientations flattened, the chunk's distinct ones projected once
        ud, cl_all, dv_all = pri.direction_terms(J, classes)
        has_p = fin_p[J].any(axis=1)
        if local:
            w_p = int(n_p[J].max())
            kept_p = np.arange(w_p)[None, :] < n_p[J][:, None]
            up = _kept_columns(fin_p[J], n_p[J], w_p)  # kept psi angles first, ascending; pads: the first kept one
            U = (ud[:, :, None] * n_psi + up[:, None, :]).reshape(b, -1)
            Uq, inv = np.unique(U, return_inverse=True)
            A = grid.coarse_matrices(xp.asarray(Uq // n_psi), xp.asarray(Uq % n_psi))  # made on the chunk's device
            pl = np.where(kept_p, np.take_along_axis(pri.psi_lp[J], up, axis=1), -np.inf)
        else:
            U = np.arange(O)
            pl = pri.psi_lp[J]
        # the chunk's classes with any searched sample, and their separable log priors: (b, K', n_d) per direction,
        # (b, n_p) per psi angle, (b, T) per translation
        has_c = np.isfinite(cl_all) & np.isfinite(dv_all).any(axis=2) & has_p[:, None]
        cls_of = [c for k, c in enumerate(classes) if has_c[:, k].any()]
        kk = [classes.index(c) for c in cls_of]
        off = pri.off_lp[J]
        # (b, K', D) summed on the device from its parts: the host sends (b, K') and (1, K', D) or (b, 1, D)
        dlx = xp.asarray(cl_all[:, kk])[:, :, None] + xp.asarray(dv_all[:, kk] if dv_all.shape[1] > 1 else dv_all)
        plx, offx = xp.asarray(pl), xp.asarray(off)
        X_, C_, W_ = Xc[Jx], Cc[Jx], Wc[Jx]
        Kc, nU = len(cls_of), U.shape[-1]
        invx = xp.asarray(inv.reshape(b, nU)) if local else None
        if settings.do_cc:
            LPOx = orientation_log_prior(dlx, plx)
            D = xp.empty((b, Kc, T, nU), np.float64)
            for k, c in enumerate(cls_of):
                proj = full[c] if full is not None else projections(c, A, invx)
                _cc_block(xp, X_, C_, Wcc, Xnorm[Jx], phase_c, proj, settings.ctf_on_reference, LPOx[:, k],
                          offx, out=D[:, k])
            ib = xp.argmin(D.reshape(b, -1), axis=1)
            jj, ll = xp.arange(b), ib
            del D
        else:
            # the cross terms of every class (K', b, T, |U|) in the GEMMs' precision; coarse_select finds each
            # particle's significant samples from them without storing the float64 diff2 or weight block
            Cr_ = C_ if settings.ctf_on_reference else xp.ones_like(C_)
            G = xp.empty((Kc, b, T, nU), dtype)
            Pp = xp.empty((Kc, b, nU), np.float64)
            for k, c in enumerate(cls_of):
                proj = full[c] if full is not None else projections(c, A, invx)
                cross_term(xp, W_ * Cr_ * X_, phase_c, proj.interleaved, out=G[k])
                Pp[k] = power_term(xp, W_ * Cr_ * Cr_, proj.power)
            a = (W_ * xp.abs(X_) ** 2).sum(axis=1)
            jj, ll, ib = coarse_select(G, a, xp.asarray(hr[J], dtype=np.float64), Pp, dlx, plx, offx,
                                       settings.adaptive_fraction, settings.maxsig)
            del G, Pp
        # the chunk's significant samples as (b, c, o, t) rows with their log priors, sorted by that key on the
        # chunk's device (then copied to the host once): a flat pool has millions of them
        per_cls = nU * T
        blk, rest = xp.divmod(ll, per_cls)
        t, u = xp.divmod(rest, nU)
        ro = xp.asarray(U)[jj, u] if local else xp.asarray(U)[u]
        rb, rc = xp.asarray(J)[jj], xp.asarray(np.asarray(cls_of, np.int64))[blk]
        rlp = (dlx[jj, blk, u // pl.shape[1]] + plx[jj, u % pl.shape[1]]) + offx[jj, t]
        order = xp.argsort(((rb * K + rc) * O + ro) * T + t)
        # one gather and one copy to the host: the four index columns and the log priors' bits, stacked
        cols = [v.astype(np.int64, copy=False) for v in (rb, rc, ro, t)]
        packed = to_host(xp.stack(cols + [rlp.astype(np.float64, copy=False).view(np.int64)])[:, order])
        for rows, v in zip((rows_b, rows_c, rows_o, rows_t), packed[:4], strict=True):
            rows.append(v)
        rows_lp.append(packed[4].view(np.float64))
        n_sig[J] = np.bincount(packed[0], minlength=B)[J]
        ibh = to_host(ib)
        best[J] = np.asarray(cls_of, np.int64)[ibh // per_cls] * O + (U[np.arange(b), ibh % nU] if local else
                                                                       U[ibh % nU])
    empty = (np.zeros(0, np.int64),) * 4 + (np.zeros(0),)
    cat = [np.concatenate(r) if r else e for r, e in zip((rows_b, rows_c, rows_o, rows_t, rows_lp), empty, strict=True)]
    if cat[0].size and not np.all(cat[0][1:] >= cat[0][:-1]):  # chunks of unordered particles (local searches): each
        order = _particle_blocks_in_order(cat[0], n_sig)  # particle's block, already sorted, to its place
        cat = [x[order] for x in cat]
    return Significant(*cat, n_sig=n_sig, best=best, n_orient=O)


def _local_chunks(order: np.ndarray, n_d: np.ndarray, n_p: np.ndarray, per_sample: int, max_elems: int,
                  max_rows: int) -> list[np.ndarray]:
    """Consecutive runs of the particles ``order`` for the local-search coarse pass: a run of ``b`` particles is
    padded to its largest direction and psi counts, and holds at most ``max_elems`` cross terms (``b x n_d x n_p x
    per_sample``) and ``max_rows`` projection rows (``b x n_d x n_p``); at least one particle each.  (A sequential
    scan over Python ints: the running maxima restart at each cut.)"""
    if not len(order):
        return []
    nd, npp = n_d[order].tolist(), n_p[order].tolist()
    cuts, start, wd, wp = [], 0, 0, 0
    for i in range(len(nd)):
        d, p = (wd if wd > nd[i] else nd[i]), (wp if wp > npp[i] else npp[i])
        rows = (i - start + 1) * d * p
        if i > start and (rows > max_rows or rows * per_sample > max_elems):
            cuts.append(i)
            start, d, p = i, nd[i], npp[i]
        wd, wp = d, p
    return np.split(order, cuts)


def _kept_columns(keep: np.ndarray, n_keep: np.ndarray, width: int) -> np.ndarray:
    """``(b, width)``: the column indices of each row's True entries of ``keep (b, n)``, ascending (``n_keep`` of
    them), then padded with the row's first one (0 for a row with none) -- the rows of a local-search chunk's kept
    psi angles, without sorting every row."""
    b = len(keep)
    r, col = np.nonzero(keep)  # row-major: ascending columns within each row
    starts = np.cumsum(n_keep) - n_keep
    first = np.zeros(b, np.int64)
    has = n_keep > 0
    first[has] = col[starts[has]]
    out = np.repeat(first[:, None], width, axis=1)
    out[r, np.arange(len(r)) - starts[r]] = col
    return out


def _particle_blocks_in_order(b: np.ndarray, n_sig: np.ndarray) -> np.ndarray:
    """The permutation that puts the contiguous blocks of rows of each particle (``b``: each particle's rows
    contiguous, ``n_sig[p]`` of them) in ascending particle order, keeping the order inside each block."""
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    where = np.zeros(len(n_sig), np.int64)
    where[b[starts]] = starts  # each particle's first row in the concatenation
    return concat_ranges(where, n_sig)
