"""The E-step and M-step on small simulated pools.  Oracles: the true poses, additivity of partial sums, the NumPy
path (for CuPy), and the true class labels."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest
from conftest import to_np

from gerelion_dask import conventions as cv
from gerelion_dask.expectation.estep import EStepModel, EStepSettings, expectation_pool
from gerelion_dask.expectation.grid import OrientationGrid
from gerelion_dask.expectation.preprocess import PreprocessSettings
from gerelion_dask.ops.projector import make_reference
from gerelion_dask.ops.sampling import angular_step, asymmetric_unit_directions
from gerelion_dask.simulate import phantom_map, synthetic_pool

N, APIX = 32, 4.0


def _dataset(n, noise, seed=0, maps=None, classes=None):
    return synthetic_pool(n, N, APIX, noise, seed, maps, classes)


def _model_settings(maps, s2, order=2):
    dirs = asymmetric_unit_directions(order, "C1")
    grid = OrientationGrid(order, dirs.pix, angular_step(order), 3.0, 1.0, 0.0)
    K = len(maps)
    refs = [make_reference(m, r_max=N // 2) for m in maps]
    model = EStepModel(refs, np.full(K, 1.0 / K), np.full((K, len(dirs.pix)), 1.0 / (K * len(dirs.pix))), s2,
                       np.full((K, N // 2 + 1), 10.0), 5.0, np.ones(1))
    settings = EStepSettings(PreprocessSettings(N, APIX, N, 0.9 * N * APIX, do_norm=False), grid, coarse_size=16)
    return model, settings


def _assert_partials_close(a, b, rtol: float) -> None:
    """Every summed field of two Partials equal to ``rtol`` (and to 1e-12 of the field's largest value)."""
    for f in fields(a):
        if f.name != "grid":
            x, y = getattr(a, f.name), getattr(b, f.name)
            assert np.allclose(x, y, rtol=rtol, atol=1e-12 * np.max(np.abs(x))), f.name


def _ang_err(A, B):
    return np.rad2deg(np.arccos(np.clip((np.einsum("bij,bij->b", A, B) - 1) / 2, -1, 1)))


def test_estep_recovers_true_poses():
    # oracle: the simulated poses -- with the true map at high SNR, the best pose lies within the fine grid's
    # spacing (order 3: 7.5 deg; measured grid limit ~3.5 deg median) and the offsets within a quarter pixel
    img, parts, A, off, s2, maps = _dataset(30, 0.1, seed=1)
    model, st = _model_settings(maps, s2)
    _, res = expectation_pool(img, parts, model, st)
    B = cv.euler_to_matrix(res.rot, res.tilt, res.psi)
    err = _ang_err(A, B)
    assert np.median(err) < 10.0 and np.percentile(err, 90) < 20.0
    o = np.stack([res.origin_x_angst, res.origin_y_angst], 1) / APIX
    assert np.median(np.abs(o - off)) < 0.5
    assert np.all(res.pmax > 0.5)


def test_partial_sums_of_two_half_pools_add_up():
    # oracle: additivity -- the E-step of a pool equals the sum of the E-steps of its two halves (what the Dask
    # tree reduction relies on); per-particle results are identical
    img, parts, A, off, s2, maps = _dataset(16, 1.0, seed=2)
    model, st = _model_settings(maps, s2, order=1)
    whole, res = expectation_pool(img, parts, model, st)

    def sub(p, s):
        return replace(p, **{f.name: (getattr(p, f.name)[s] if isinstance(getattr(p, f.name), np.ndarray) else
                                      getattr(p, f.name)) for f in fields(p) if f.name not in ("half", "ctf")},
                       ctf=p.ctf.take(s))

    a, ra = expectation_pool(img[:7], sub(parts, slice(0, 7)), model, st)
    b, rb = expectation_pool(img[7:], sub(parts, slice(7, 16)), model, st)
    total = a + b
    for f in fields(whole):
        x, y = getattr(whole, f.name), getattr(total, f.name)
        if f.name == "grid":
            assert x == y
        else:
            assert np.allclose(x, y, rtol=1e-9, atol=1e-12), f.name
    assert np.allclose(np.concatenate([ra.rot, rb.rot]), res.rot)
    with pytest.raises(ValueError):
        _ = a + replace(b, half=2)
    with pytest.raises(ValueError):
        _ = a.absorb(replace(b, half=2))


def test_absorb_adds_in_place_exactly_like_plus(xp):
    # oracle: Partials.__add__ -- absorb (what a split pool uses to add its halves without a third volume) gives
    # bit-identical sums, also when the absorbed partials wait in host memory and the others are on the device
    img, parts, A, off, s2, maps = _dataset(10, 1.0, seed=6)
    model, st = _model_settings(maps, s2, order=1)
    a, _ = expectation_pool(img[:4], parts.take(slice(0, 4)), model, st)
    b, _ = expectation_pool(img[4:], parts.take(slice(4, None)), model, st)
    want = a + b
    got = b.on(xp).absorb(a)  # a stays on the host
    for f in fields(want):
        x, y = getattr(want, f.name), getattr(got, f.name)
        assert np.array_equal(to_np(y), x) if f.name != "grid" else x == y, f.name


@pytest.mark.parametrize("local", [False, True])
def test_estep_gpu_matches_numpy(xp, local):
    # oracle: the float64 NumPy path -- the same pool on CuPy gives the same poses and partial sums (global
    # searches, and local searches: each particle's own orientations as one batched GEMM per chunk)
    if xp is np:
        pytest.skip("compares CuPy with NumPy")
    img, parts, A, off, s2, maps = _dataset(20, 1.0, seed=3)
    model, st = _model_settings(maps, s2, order=1 if not local else 2)
    if local:
        ang = np.stack(cv.matrix_to_euler(A), 1) + np.random.default_rng(1).normal(0, 4, (len(A), 3))
        parts = replace(parts, angles=ang)
        st = replace(st, local_sigma_rot=8.0, local_sigma_psi=8.0, symmetry_operators=np.eye(3)[None])
    p_np, r_np = expectation_pool(img, parts, model, st)
    mg = replace(model, refs=[replace(r, data=xp.asarray(r.data)) for r in model.refs])
    p_gpu, r_gpu = expectation_pool(xp.asarray(img), parts, mg, st)
    assert np.mean(r_np.rot == r_gpu.rot) >= 0.99
    assert np.allclose(to_np(p_gpu.bp_weight), p_np.bp_weight, rtol=1e-6, atol=1e-9)
    assert np.allclose(p_gpu.wsum_sigma2, p_np.wsum_sigma2, rtol=1e-6)


def test_references_shipped_as_maps_are_made_on_the_tasks_device(xp):
    # oracle: make_reference of the float64 map on NumPy (the transform the driver made before references were
    # shipped as maps) -- device_model makes the same transform on xp's device (bit for bit on NumPy), the E-step of
    # a pool gives the same sums, and the shipped model carries the N^3 map, not the ~8x larger transform
    from gerelion_dask.backend import deep_nbytes
    from gerelion_dask.distributed.tasks import device_model
    from gerelion_dask.ops.projector import ReferenceSpec

    img, parts, A, off, s2, maps = _dataset(12, 1.0, seed=4)
    model, st = _model_settings(maps, s2, order=1)
    shipped = replace(model, refs=[ReferenceSpec(maps[0], r_max=N // 2, padding=2.0)])
    with pytest.raises(TypeError, match="device_model"):
        expectation_pool(img, parts, shipped, st)
    made = device_model(shipped, xp)
    assert made.refs[0].grid == model.refs[0].grid
    assert device_model(replace(shipped, refs=[None, *shipped.refs]), xp).refs[0] is None  # an empty class
    got = to_np(made.refs[0].data)
    if xp is np:
        assert np.array_equal(got, model.refs[0].data)
    else:
        assert np.allclose(got, model.refs[0].data, rtol=1e-12, atol=1e-15 * np.abs(got).max())
    assert deep_nbytes(shipped) * 4 < deep_nbytes(made)
    p_ref, r_ref = expectation_pool(img, parts, model, st)
    p_got, r_got = expectation_pool(xp.asarray(img), parts, made, st)
    assert np.mean(r_ref.rot == r_got.rot) >= 0.99
    assert np.allclose(to_np(p_got.bp_weight), p_ref.bp_weight, rtol=1e-6, atol=1e-9)


def test_classification_tau2_prior_is_the_references_power_spectrum(xp):
    # oracle: reference_power_spectrum of make_reference on NumPy, padded with zeros to N/2+1 shells (what the
    # driver computed and handed to the M-step before) -- reference_tau2 makes it from the map on xp's device
    from gerelion_dask.maximization.mstep import MStepSettings, reference_tau2
    from gerelion_dask.ops.projector import reference_power_spectrum

    m = _dataset(2, 1.0, seed=5)[-1][0]
    for r_max in (N // 4, N // 2):
        ms = MStepSettings(False, reference_r_max=r_max, padding=2.0)
        want = np.zeros(N // 2 + 1)
        want[: r_max + 1] = reference_power_spectrum(make_reference(m, r_max=r_max, padding=2.0))
        got = reference_tau2(m, ms, N // 2 + 1, xp)
        assert isinstance(got, np.ndarray) and got.shape == want.shape
        assert np.allclose(got, want, rtol=1e-10, atol=0) and np.all(got[r_max + 1:] == 0)


def test_two_classes_separate():
    # oracle: the true class labels -- with the two true maps as references, particles go to their own class
    maps = [phantom_map(N, APIX, "blobs"), phantom_map(N, APIX, "blobs2")]
    cls = np.random.default_rng(4).integers(0, 2, 40)
    img, parts, A, off, s2, maps = _dataset(40, 0.5, seed=4, maps=maps, classes=cls)
    model, st = _model_settings(maps, s2, order=2)
    part, res = expectation_pool(img, parts, model, st)
    assert np.mean(res.class_number - 1 == cls) >= 0.95
    assert abs(part.wsum_pdf_class.sum() - 40 * st.adaptive_fraction) < 0.05 * 40


def test_local_searches_around_prior_angles():
    # oracle: the simulated poses -- with priors at the true angles and sigma 10 deg, only nearby orientations are
    # searched (samples beyond 3 sigma get no weight) and the poses are recovered as with a global search
    img, parts, A, off, s2, maps = _dataset(20, 0.5, seed=6)
    rot, tilt, psi = cv.matrix_to_euler(A)
    parts = replace(parts, angles=np.stack([rot, tilt, psi], 1))
    model, st = _model_settings(maps, s2, order=2)
    st = replace(st, local_sigma_rot=10.0, local_sigma_psi=10.0, symmetry_operators=np.eye(3)[None])
    _, res = expectation_pool(img, parts, model, st)
    B = cv.euler_to_matrix(res.rot, res.tilt, res.psi)
    err = _ang_err(A, B)
    assert np.max(err) < 3 * 10.0 + 8.0  # never outside the local window (plus the fine grid's reach)
    assert np.median(err) < 8.0


@pytest.mark.parametrize("local,seeded", [(False, False), (True, False), (False, True), (True, True)])
def test_orientation_priors_equal_the_dense_definition(local, seeded):
    # oracle: the dense float64 definition over (B, K, n_dir): log direction prior (learned per class, or each
    # particle's Gaussian local prior, local_search_sparse scattered to all directions) + log psi prior, -inf for an
    # empty class (pdf_class 0) and for every class but the seed class, then minus the log of the mean of exp(prior)
    # over the searched orientations of the particle; the separable / sparse OrientationPriors must give the same
    # blocks
    from gerelion_dask.expectation.estep import orientation_priors
    from gerelion_dask.ops.sampling import local_search_sparse

    img, parts, A, off, s2, maps = _dataset(12, 1.0, seed=2)
    model, st = _model_settings(maps + maps[:1] + maps[:1], s2, order=2)
    K, n_dir = 3, st.grid.n_dir
    rng = np.random.default_rng(0)
    pdf_dir = rng.uniform(0.1, 1.0, (K, n_dir))
    pdf_dir[1, ::3] = 0.0  # directions this class never takes
    model = replace(model, pdf_class=np.array([0.5, 0.0, 0.5]) if not seeded else np.array([0.4, 0.3, 0.3]),
                    pdf_direction=pdf_dir / pdf_dir.sum(axis=1, keepdims=True))
    ang = np.stack(cv.matrix_to_euler(A), 1)
    parts = replace(parts, angles=ang)
    if seeded:
        parts = replace(parts, seed_class=np.arange(12) % K)
    if local:
        st = replace(st, local_sigma_rot=6.0, local_sigma_psi=8.0)
    pri = orientation_priors(parts, model, st)
    with np.errstate(divide="ignore"):
        if local:
            rot, tilt = st.grid.dir_angles
            lp = local_search_sparse(ang[:, 0], ang[:, 1], ang[:, 2], 6.0, 6.0, 8.0, rot, tilt, st.grid.psi)
            dp, pp = lp.dense_directions(n_dir), lp.psi_prior
            D = np.repeat(np.log(dp)[:, None, :], K, axis=1)
            psi_lp = np.log(pp)
        else:
            D = np.repeat(np.log(model.pdf_direction)[None], 12, axis=0)
            psi_lp = np.zeros((12, st.grid.n_psi))
    D[:, model.pdf_class == 0] = -np.inf
    if seeded:
        D = np.where((np.arange(K)[None] == parts.seed_class[:, None])[..., None], D, -np.inf)
    full = D[:, :, :, None] + psi_lp[:, None, None, :]  # (B, K, n_dir, n_psi)
    fin = np.isfinite(full)
    log_mean = np.array([np.log(np.mean(np.exp(f[m]))) for f, m in zip(full, fin, strict=True)])
    want = np.where(np.isfinite(D), D - log_mean[:, None, None], -np.inf)
    dirs, lp_all = pri.directions(np.arange(12), list(range(K)))
    if local:  # each particle's own directions (padded at -inf) scattered over all of them
        got = np.full((12, K, n_dir), -np.inf)
        for j in range(12):
            fin_j = np.isfinite(lp_all[j]).any(axis=0)  # (not the pads)
            got[j][:, dirs[j][fin_j]] = lp_all[j][:, fin_j]
    else:
        np.testing.assert_array_equal(dirs, np.arange(n_dir))
        got = lp_all
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(pri.psi_lp, psi_lp)
    # the directions of some particles and classes are the same slice of the whole (local: the same rows, padded to
    # these particles' longest)
    J, cls = np.array([7, 2, 9]), [2, 0]
    d_J, lp_J = pri.directions(J, cls)
    width = d_J.shape[-1]
    np.testing.assert_array_equal(d_J, dirs[J][:, :width] if local else dirs)
    np.testing.assert_array_equal(lp_J, lp_all[np.ix_(J, cls)][..., :width])
    if local:  # each particle's most likely direction is the one nearest its prior
        np.testing.assert_array_equal(pri.most_likely_direction(), np.argmax(dp, axis=1))


@pytest.mark.parametrize("cc,local", [(False, False), (True, False), (False, True)])
def test_chunking_of_particles_does_not_change_results(cc, local):
    # oracle: the per-particle E-step (chunks of one particle) -- evaluating chunks of particles densely over the
    # union of their samples (coarse local searches; the fine pass), with excluded samples masked, must give the
    # same sums and poses
    img, parts, A, off, s2, maps = _dataset(20, 3.0, seed=4)
    model, st = _model_settings(maps, s2, order=1)
    st = replace(st, do_cc=cc, do_scale=True, grid=replace(st.grid, perturb=0.3),
                 preprocess=replace(st.preprocess, do_norm=True))
    if local:
        ang = np.stack(cv.matrix_to_euler(A), 1) + np.random.default_rng(0).normal(0, 5, (len(A), 3))
        parts = replace(parts, angles=ang)
        st = replace(st, local_sigma_rot=15.0, local_sigma_psi=15.0)
    one, r1 = expectation_pool(img, parts, model, replace(st, fine_max_elems=1))
    dense, rd = expectation_pool(img, parts, model, replace(st, fine_max_elems=1 << 30))
    assert int(np.max(r1.n_significant)) > 1 or cc
    _assert_partials_close(one, dense, rtol=1e-9)
    for f in ("rot", "tilt", "psi", "origin_x_angst", "origin_y_angst", "class_number", "pmax", "loglik", "norm",
              "n_significant"):
        assert np.allclose(getattr(r1, f), getattr(rd, f), rtol=1e-9, atol=1e-9), f


def test_particle_blocks_are_put_in_particle_order():
    # oracle: NumPy's stable sort by particle -- the coarse pass's chunks (local searches take particles in the order
    # of their best orientation) leave each particle's rows contiguous and sorted; the permutation that puts those
    # blocks in particle order, keeping each block's order, is argsort(b, kind="stable")
    from gerelion_dask.expectation.estep import _particle_blocks_in_order

    rng = np.random.default_rng(3)
    for _ in range(20):
        n_sig = rng.integers(0, 5, 12)
        perm = rng.permutation(12)
        b = np.repeat(perm, n_sig[perm])
        assert np.array_equal(_particle_blocks_in_order(b, n_sig), np.argsort(b, kind="stable"))


def test_most_likely_direction_with_ties_and_empty_rows():
    # oracle: np.argmax of each particle's dense row (directions not kept at -inf; argmax takes the lowest index
    # among ties), over the kept directions only where all of them are at -inf, and 0 for a particle without any
    from gerelion_dask.expectation.estep import OrientationPriors

    rng = np.random.default_rng(8)
    B, D = 40, 30
    dense = np.full((B, D), -np.inf)
    keep = rng.random((B, D)) < 0.3
    keep[5] = False  # no directions
    keep[6] = False
    keep[6, 17] = True  # one direction
    dense[keep] = np.round(rng.normal(size=keep.sum()), 1)  # rounded: ties within rows
    dense[7, keep[7]] = -np.inf  # kept, but all at -inf
    ptr = np.r_[0, np.cumsum(keep.sum(axis=1))]
    r, c = np.nonzero(keep)
    pri = OrientationPriors(np.zeros((B, 1)), np.zeros((B, 4)), np.zeros((B, 1)), None, ptr, c, dense[r, c])
    want = np.argmax(dense, axis=1)
    want[5] = 0
    want[7] = np.flatnonzero(keep[7])[0]  # the argmax over its kept directions (all tie at -inf)
    np.testing.assert_array_equal(pri.most_likely_direction(), want)


def test_kept_columns_equal_the_stable_sort_of_each_row():
    # oracle: the formula the local-search coarse pass used before -- np.argsort(~keep, kind="stable") per row (its
    # True columns first, ascending), cut to the width, the pads (past a row's count) set to the row's first entry
    from gerelion_dask.expectation.estep import _kept_columns

    rng = np.random.default_rng(4)
    for p in (0.0, 0.05, 0.5, 1.0):
        keep = rng.random((30, 17)) < p
        n = keep.sum(axis=1)
        w = int(n.max()) if n.size else 0
        want = np.argsort(~keep, axis=1, kind="stable")[:, :w]
        want = np.where(np.arange(w)[None, :] < n[:, None], want, want[:, :1])
        assert np.array_equal(_kept_columns(keep, n, w), want)


def test_local_chunks_are_the_greedy_runs_within_both_budgets():
    # oracle: the budgets written out per run -- the chunks cover the order in sequence; each run padded to its
    # largest direction and psi counts stays within max_rows and max_elems (or is a single particle), and adding
    # the next particle would break one of them
    from gerelion_dask.expectation.estep import _local_chunks

    rng = np.random.default_rng(6)
    assert _local_chunks(np.zeros(0, np.int64), np.zeros(0), np.zeros(0), 3, 100, 100) == []
    for _ in range(20):
        B = int(rng.integers(1, 60))
        n_d, n_p = rng.integers(0, 12, B), rng.integers(0, 9, B)
        order = rng.permutation(B)
        per, max_elems, max_rows = int(rng.integers(1, 5)), int(rng.integers(50, 3000)), int(rng.integers(20, 900))
        chunks = _local_chunks(order, n_d, n_p, per, max_elems, max_rows)
        assert np.array_equal(np.concatenate(chunks), order)

        def cost(J):
            rows = len(J) * n_d[J].max() * n_p[J].max()
            return rows <= max_rows and rows * per <= max_elems

        start = 0
        for J in chunks:
            assert len(J) == 1 or cost(J)
            end = start + len(J)
            if end < B:
                assert not cost(order[start : end + 1])
            start = end


def _direct_fine_pass(pre, parts, model, st, sig):
    """The fine pass evaluated child by child in float64 NumPy (ALGORITHM.md §4.3-4.6): every child's projection
    and shifted image made on its own, diff2 = sum_k |X s_t - Cr P_f|^2 / (2 sigma^2) + the high-resolution term,
    weights over a particle's children, its significance threshold, and each sum written out per child."""
    from gerelion_dask.expectation.fine import gather, grid_of, project_gathered
    from gerelion_dask.expectation.weights import posterior_weights, significance_threshold
    from gerelion_dask.ops.backprojector import BackProjection, insert_slices
    from gerelion_dask.ops.fourier import likelihood_pixels, shells_2d

    ps, grid = st.preprocess, st.grid
    n, NB = ps.current_size, ps.ori_size
    mb = likelihood_pixels(n, include_dc=True)
    shb = shells_2d(n)[mb]
    X, Xnm, ctf = gather(pre.fimg, mb), gather(pre.fimg_nomask, mb), gather(pre.ctf, mb)
    s2 = np.asarray(model.sigma2_noise)[parts.optics_group][:, shb]
    K = len(model.refs)
    bp = {c: {} for c in range(K)}  # class -> fine id -> [data, weight] (M,)
    sigma2 = np.zeros((1, NB // 2 + 1))
    wdir = np.zeros((K, grid.n_dir))
    wcls, off, xa, aa, norm, pmax, ll = np.zeros(K), 0.0, 0.0, 0.0, [], [], []
    poses = []
    for j in range(len(parts.index)):
        C = ctf[j] * model.scales[parts.group[j]]
        Cr = C if st.ctf_on_reference else np.ones_like(C)
        rows = np.nonzero(sig.b == j)[0]
        kids = []  # (class, coarse orientation, fine id, fine translation px, log prior, P, s)
        for r in rows:
            gids = grid.fine_ids(np.array([sig.o[r]]))[0]
            tf = grid.fine_translations(np.array([sig.t[r]]))[0]
            P = project_gathered(model.refs[sig.c[r]], grid.fine_matrices_from_ids(gids), n, mb, np)
            s = gather(cv.shift_phase_2d(n, NB, tf), mb)
            kids += [(sig.c[r], sig.o[r], gids[f], tf[t], sig.lp[r], P[f], s[t]) for f in range(8) for t in range(4)]
        lik = shb >= 1
        d = np.array([(np.abs(X[j] * k[6] - Cr * k[5]) ** 2 / (2 * s2[j]))[lik].sum() + pre.highres_xi2[j] / 2
                      for k in kids])
        w, dmin, sumw, _ = posterior_weights(d[None], np.array([k[4] for k in kids])[None])
        thr = significance_threshold(w, st.adaptive_fraction, st.maxsig, sumw)
        w = np.where(w >= thr[:, None], w, 0.0)[0] / sumw[0]
        best = kids[int(np.argmax(w))]
        poses.append((best[0], best[2], best[3]))
        pmax.append(w.max())
        ll.append(np.log(sumw[0]) - dmin[0] - np.log(2 * np.pi * s2[j][lik]).sum())
        resid = np.zeros(len(mb.nonzero()[0]))
        for wk, (c, o, g, tf, _, P, s) in zip(w, kids, strict=True):
            if wk == 0:
                continue
            e = bp[c].setdefault(g, [0j, 0.0])
            e[0] = e[0] + wk * Xnm[j] * s * C / s2[j]
            e[1] = e[1] + wk * C * C / s2[j]
            resid += wk * np.abs(X[j] * s - Cr * P) ** 2
            good = np.asarray(model.data_vs_prior)[c][shb] > 3
            xa += wk * (Cr * np.real(X[j] * s * np.conj(P)) * good).sum()
            aa += wk * (Cr * Cr * np.abs(P) ** 2 * good).sum()
            wdir[c, o // grid.n_psi] += wk
            wcls[c] += wk
            off += wk * (((parts.offset_prior_px[j] - pre.int_offset_px[j] - tf) * ps.pixel_size) ** 2).sum()
        np.add.at(sigma2[0], shb, resid)
        sigma2[0] += pre.power_highres[j]
        norm.append(parts.norm[j] / model.avg_norm * np.sqrt(2 * (resid.sum() + pre.power_highres[j].sum())))
    vol_d = np.zeros((K,) + grid_of(model).shape, complex)
    vol_w = np.zeros((K,) + grid_of(model).shape)
    for c in range(K):
        g = np.array(sorted(bp[c]))
        sl = np.zeros((len(g), n, n // 2 + 1), complex)
        wt = np.zeros((len(g), n, n // 2 + 1))
        sl[:, mb] = [bp[c][x][0] for x in g]
        wt[:, mb] = [bp[c][x][1] for x in g]
        insert_slices(BackProjection(vol_d[c], vol_w[c], grid_of(model)), grid.fine_matrices_from_ids(g), sl, wt)
    return (vol_d, vol_w, sigma2, wdir, wcls, off, xa, aa, np.array(norm), np.array(pmax), np.array(ll), poses)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("K", [1, 2])
def test_fine_pass_equals_a_direct_evaluation_of_every_child(K, flat, xp, monkeypatch):
    # oracle: _direct_fine_pass (float64 NumPy, child by child) -- the fine pass's chunked diff2 and its weighted
    # sums over (particle, class, orientation) pairs (on NumPy and on CuPy) must give the same volumes, noise,
    # prior, offset, scale and norm sums, and the same best pose, pmax and log-likelihood per particle; with
    # ``flat`` every particle takes the dense blocks of _flat_group / block_sums instead (flat_waste), without it
    # none does
    from gerelion_dask.expectation import fine as fine_mod
    from gerelion_dask.expectation.estep import coarse_pass, orientation_priors
    from gerelion_dask.expectation.fine import fine_pass

    for backend in ("cpu", "gpu"):
        monkeypatch.setitem(fine_mod.FINE_LIMITS[backend], "flat_waste", 1e12 if flat else 0.0)
    monkeypatch.setattr(fine_mod, "FLAT_MIN_RUN", 1)
    dense = []
    real_group = fine_mod._flat_group
    monkeypatch.setattr(fine_mod, "_flat_group", lambda *a: dense.append(len(a[5])) or real_group(*a))
    from gerelion_dask.expectation.preprocess import PreprocessedPool, preprocess_pool

    maps = [phantom_map(N, APIX, seed=1), phantom_map(N, APIX, seed=2)][:K] if K == 2 else None
    img, parts, A, off, s2, maps = _dataset(6, 4.0, seed=11, maps=maps, classes=np.arange(6) % K if K == 2 else None)
    model, st = _model_settings(maps, s2, order=1)
    st = replace(st, do_scale=True, grid=replace(st.grid, perturb=0.3), preprocess=replace(st.preprocess, do_norm=True))
    model = replace(model, data_vs_prior=np.where(np.arange(N // 2 + 1) < 6, 10.0, 1.0)[None].repeat(K, 0))
    mx = replace(model, refs=[replace(r, data=xp.asarray(r.data)) for r in model.refs])
    pre = preprocess_pool(xp.asarray(img), parts, st.preprocess, model.sigma2_noise)
    sig = coarse_pass(xp, pre, parts, mx, st, orientation_priors(parts, model, st))
    assert sig.n_sig.max() > 3  # several significant samples, so the weights and pairs are not trivial
    part, res = fine_pass(xp, pre, parts, mx, st, sig)
    assert sum(dense) == (len(parts.index) if flat else 0)  # the path under test took every particle (or none)
    part = part.to_host()
    pre = PreprocessedPool(*(to_np(getattr(pre, f.name)) for f in fields(pre)))
    vd, vw, sigma2, wdir, wcls, off_, xa, aa, norm, pmax, ll, poses = _direct_fine_pass(pre, parts, model, st, sig)
    close = dict(rtol=1e-9, atol=1e-12)
    assert np.allclose(part.bp_data, vd, rtol=1e-9, atol=1e-12 * np.abs(vd).max())
    assert np.allclose(part.bp_weight, vw, rtol=1e-9, atol=1e-12 * np.abs(vw).max())
    assert np.allclose(part.wsum_sigma2, sigma2, **close)
    assert np.allclose(part.wsum_pdf_direction, wdir, **close) and np.allclose(part.wsum_pdf_class, wcls, **close)
    assert np.isclose(part.wsum_sigma2_offset, off_, **close)
    assert np.isclose(part.wsum_scale_xa.sum(), xa, **close) and np.isclose(part.wsum_scale_aa.sum(), aa, **close)
    assert np.allclose(res.norm, norm, **close) and np.allclose(res.pmax, pmax, **close)
    assert np.allclose(res.loglik, ll, **close)
    assert list(res.class_number) == [p[0] + 1 for p in poses]
    got = np.stack(cv.matrix_to_euler(cv.euler_to_matrix(res.rot, res.tilt, res.psi)), 1)
    want = np.stack(cv.matrix_to_euler(st.grid.fine_matrices_from_ids(np.array([p[1] for p in poses]))), 1)
    assert np.allclose(got, want, atol=1e-9)
    want_o = (pre.int_offset_px + np.array([p[2] for p in poses])) * st.preprocess.pixel_size
    assert np.allclose(np.stack([res.origin_x_angst, res.origin_y_angst], 1), want_o, atol=1e-9)


def _direct_fixed_pose(pre, parts, model, st, translations=None):
    """``--skip_align``'s E-step written out per particle, class and translation in float64 NumPy (RELION's
    do_skip_align: one orientation, the particle's own angles, and one translation, its offset's fractional part;
    class prior pdf_class over its mean), or with ``translations (T, 2)`` (pixels from the integer pre-shift)
    ``--skip_rotate``'s (do_skip_rotate: those translations under the Gaussian offset prior over its mean): diff2 as
    in _direct_fine_pass, weights and significance over the samples, each sum per sample.  Returns the volumes, the
    noise, class, scale and offset sums, and per particle norm, pmax, log-likelihood, class and offset (pixels)."""
    from gerelion_dask.expectation.fine import gather, grid_of, project_gathered
    from gerelion_dask.expectation.weights import posterior_weights, significance_threshold
    from gerelion_dask.ops.backprojector import BackProjection, insert_slices
    from gerelion_dask.ops.fourier import likelihood_pixels, shells_2d

    ps = st.preprocess
    n, NB = ps.current_size, ps.ori_size
    mb = likelihood_pixels(n, include_dc=True)
    shb = shells_2d(n)[mb]
    lik = shb >= 1
    X, Xnm, ctf = gather(pre.fimg, mb), gather(pre.fimg_nomask, mb), gather(pre.ctf, mb)
    s2 = np.asarray(model.sigma2_noise)[parts.optics_group][:, shb]
    K = len(model.refs)
    pdf = np.asarray(model.pdf_class)
    vol_d = np.zeros((K,) + grid_of(model).shape, complex)
    vol_w = np.zeros((K,) + grid_of(model).shape)
    sigma2, wcls, xa, aa, off_sum = np.zeros((1, NB // 2 + 1)), np.zeros(K), 0.0, 0.0, 0.0
    norm, pmax, ll, cls, best_off = [], [], [], [], []
    s2o = model.sigma_offset_angst**2
    for j in range(len(parts.index)):
        C = ctf[j] * model.scales[parts.group[j]]
        Cr = C if st.ctf_on_reference else np.ones_like(C)
        A = cv.euler_to_matrix(*parts.angles[j])[None]
        if translations is None:
            offs = parts.offset_px[j][None]
            lpo = np.zeros(1)
        else:
            offs = pre.int_offset_px[j] + translations
            po = np.exp(-(((offs - parts.offset_prior_px[j]) * APIX) ** 2).sum(1) / (2 * s2o)) / (2 * np.pi * s2o)
            lpo = np.log(po / po.mean())
        lp = (np.log(pdf) - np.log(pdf.mean()))[:, None] + lpo[None]  # (K, T)
        sh = [gather(cv.shift_phase_2d(n, NB, o - pre.int_offset_px[j]), mb) for o in offs]
        P = [project_gathered(model.refs[c], A, n, mb, np)[0] for c in range(K)]
        d = np.array([[(np.abs(X[j] * s - Cr * P[c]) ** 2 / (2 * s2[j]))[lik].sum() + pre.highres_xi2[j] / 2
                       for s in sh] for c in range(K)])
        w, dmin, sumw, _ = posterior_weights(d.reshape(1, -1), lp.reshape(1, -1))
        thr = significance_threshold(w, st.adaptive_fraction, st.maxsig, sumw)
        w = (np.where(w >= thr[:, None], w, 0.0)[0] / sumw[0]).reshape(K, len(offs))
        c_b, t_b = np.unravel_index(np.argmax(w), w.shape)
        cls.append(c_b + 1)
        best_off.append(offs[t_b])
        pmax.append(w.max())
        ll.append(np.log(sumw[0]) - dmin[0] - np.log(2 * np.pi * s2[j][lik]).sum())
        resid = np.zeros(len(shb))
        for c, t in zip(*np.nonzero(w)):
            s = sh[t]
            sl = np.zeros((1, n, n // 2 + 1), complex)
            wt = np.zeros((1, n, n // 2 + 1))
            sl[0, mb] = w[c, t] * Xnm[j] * s * C / s2[j]
            wt[0, mb] = w[c, t] * C * C / s2[j]
            insert_slices(BackProjection(vol_d[c], vol_w[c], grid_of(model)), A, sl, wt)
            resid += w[c, t] * np.abs(X[j] * s - Cr * P[c]) ** 2
            good = np.asarray(model.data_vs_prior)[c][shb] > 3
            xa += w[c, t] * (Cr * np.real(X[j] * s * np.conj(P[c])) * good).sum()
            aa += w[c, t] * (Cr * Cr * np.abs(P[c]) ** 2 * good).sum()
            wcls[c] += w[c, t]
            off_sum += w[c, t] * (((offs[t] - parts.offset_prior_px[j]) * APIX) ** 2).sum()
        np.add.at(sigma2[0], shb, resid)
        sigma2[0] += pre.power_highres[j]
        norm.append(parts.norm[j] / model.avg_norm * np.sqrt(2 * (resid.sum() + pre.power_highres[j].sum())))
    return (vol_d, vol_w, sigma2, wcls, xa, aa, off_sum, np.array(norm), np.array(pmax), np.array(ll), np.array(cls),
            np.array(best_off))


@pytest.mark.parametrize("rotate", [False, True])
def test_fixed_pose_pass_equals_a_direct_evaluation_and_finds_the_classes(rotate, xp):
    # oracle: _direct_fixed_pose (float64 NumPy, per particle, class and translation) -- the pass of --skip_align
    # (rotate False) and of --skip_rotate (True: the grid's translations searched) gives, on NumPy and CuPy, the same
    # volumes, noise, class, scale, norm and offset sums, pmax, log-likelihood, class and offset per particle; the
    # particles keep their angles; and with the true poses (--skip_rotate: offsets 1-2 px off the truth) the two
    # classes separate and the offsets come back (the simulated truth)
    from gerelion_dask.expectation.fixed import fixed_pose_pass
    from gerelion_dask.expectation.preprocess import PreprocessedPool, preprocess_pool

    maps = [phantom_map(N, APIX, "blobs"), phantom_map(N, APIX, "blobs2")]
    truth = np.arange(12) % 2
    img, parts, A, off, s2, maps = _dataset(12, 2.0, seed=11, maps=maps, classes=truth)
    angles = np.stack(cv.matrix_to_euler(A), 1)
    start = off + (np.random.default_rng(3).integers(-2, 3, off.shape) if rotate else 0)
    parts = replace(parts, angles=angles, offset_px=start.copy(), offset_prior_px=start + 0.3)
    model, st = _model_settings(maps, s2, order=1)
    st = replace(st, do_scale=True, preprocess=replace(st.preprocess, do_norm=True), search_translations=rotate,
                 grid=replace(st.grid, perturb=0.0, offset_range_px=3.0, offset_step_px=1.0))
    model = replace(model, pdf_class=np.array([0.6, 0.4]), sigma_offset_angst=4.0,
                    data_vs_prior=np.where(np.arange(N // 2 + 1) < 6, 10.0, 1.0)[None].repeat(2, 0))
    mx = replace(model, refs=[replace(r, data=xp.asarray(r.data)) for r in model.refs])
    pre = preprocess_pool(xp.asarray(img), parts, st.preprocess, model.sigma2_noise)
    part, res = fixed_pose_pass(xp, pre, parts, mx, st)
    part = part.to_host()
    pre = PreprocessedPool(*(to_np(getattr(pre, f.name)) for f in fields(pre)))
    vd, vw, sigma2, wcls, xa, aa, off_sum, norm, pmax, ll, cls, best = _direct_fixed_pose(
        pre, parts, model, st, st.grid.translations if rotate else None)
    close = dict(rtol=1e-9, atol=1e-12)
    assert np.allclose(part.bp_data, vd, rtol=1e-9, atol=1e-12 * np.abs(vd).max())
    assert np.allclose(part.bp_weight, vw, rtol=1e-9, atol=1e-12 * np.abs(vw).max())
    assert np.allclose(part.wsum_sigma2, sigma2, **close) and np.allclose(part.wsum_pdf_class, wcls, **close)
    assert np.isclose(part.wsum_scale_xa.sum(), xa, **close) and np.isclose(part.wsum_scale_aa.sum(), aa, **close)
    assert np.allclose(res.norm, norm, **close) and np.allclose(res.pmax, pmax, **close)
    assert np.allclose(res.loglik, ll, **close) and list(res.class_number) == list(cls)
    assert np.isclose(part.wsum_sigma2_offset, off_sum, rtol=1e-9)
    assert np.allclose(part.wsum_pdf_direction.sum(axis=1), wcls, **close)
    assert np.allclose(np.stack([res.rot, res.tilt, res.psi], 1), angles)
    assert np.allclose(np.stack([res.origin_x_angst, res.origin_y_angst], 1), best * APIX)
    if rotate:  # the true offsets come back to the 1-px grid's spacing (the images were made at off)
        assert np.abs(best - off).max() < 1.0 and np.abs(best - off).mean() < 0.5 < np.abs(start - off).mean()
        assert res.n_significant.max() > 1  # more than one sample kept: the sums over translations are exercised
    else:
        assert np.allclose(best, off)
    assert (res.class_number - 1 == truth).mean() >= 0.9


@pytest.mark.parametrize("cc", [False, True])
def test_strict_highres_exp_takes_the_probabilities_of_the_smaller_window(cc, xp):
    # oracle: RELION's --strict_highres_exp (both passes' probabilities at image_coarse_size, the weighted sums at the
    # current size) -- an E-step at the full current size whose probabilities are limited to a 16-px window gives
    # the same weights (pmax, best pose, class) as the E-step of 16-px images, whose own sums stop at 16 px; the
    # noise sums of the limited E-step still reach the full size
    maps = [phantom_map(N, APIX, "blobs"), phantom_map(N, APIX, "blobs2")]
    img, parts, A, off, s2, maps = _dataset(8, 1.0, seed=4, maps=maps, classes=np.arange(8) % 2)
    model, st = _model_settings(maps, s2, order=1)
    c = 16
    st = replace(st, coarse_size=c, do_cc=cc)
    small = replace(st, preprocess=replace(st.preprocess, current_size=c))
    limited = replace(st, strict_size=c)
    mx = replace(model, refs=[replace(r, data=xp.asarray(r.data)) for r in model.refs])
    ps, rs = expectation_pool(xp.asarray(img), parts, mx, small)
    pl, rl = expectation_pool(xp.asarray(img), parts, mx, limited)
    pf, rf = expectation_pool(xp.asarray(img), parts, mx, st)  # the whole window: other weights
    assert np.allclose(rl.pmax, rs.pmax, rtol=1e-9, atol=1e-12)
    assert list(rl.class_number) == list(rs.class_number)
    for f in ("rot", "tilt", "psi", "origin_x_angst", "origin_y_angst"):
        assert np.allclose(getattr(rl, f), getattr(rs, f), atol=1e-9), f
    assert not np.allclose(rf.pmax, rl.pmax, rtol=1e-6) or cc
    from gerelion_dask.expectation.fine import ProjectionCache

    cache = ProjectionCache(1 << 30)  # the smaller window's pixel masks made once and reused (as a run's pools do)
    for _ in range(2):
        _, rc = expectation_pool(xp.asarray(img), parts, mx, limited, cache)
        assert np.array_equal(rc.pmax, rl.pmax) and np.array_equal(rc.rot, rl.rot)
    assert any(k[0] == "strict-pixels" for k in cache._whole)
    nsh = np.asarray(pl.wsum_sigma2)[0]
    assert nsh[c // 2 + 2 : N // 2].min() > 0 and np.allclose(np.asarray(pl.wsum_sigma2)[0][N // 2 + 1 :], 0)


@pytest.mark.parametrize("maxsig", [-1, 20000])
def test_flat_particles_in_dense_blocks_give_the_sums_of_the_sparse_path(maxsig, xp, monkeypatch):
    # oracle: the fine pass with every particle's children evaluated one significant sample at a time
    # (flat_waste 0) -- with flat_waste set so that the flatter half of a noisy two-class pool takes dense blocks
    # (and the rest the sparse path in the same pass), every sum, pose, class, pmax and log-likelihood is the same
    from gerelion_dask.expectation import fine as fine_mod
    from gerelion_dask.expectation.estep import coarse_pass, orientation_priors
    from gerelion_dask.expectation.fine import fine_pass
    from gerelion_dask.expectation.preprocess import preprocess_pool

    maps = [phantom_map(N, APIX, seed=1), phantom_map(N, APIX, seed=2)]
    img, parts, A, off, s2, maps = _dataset(10, 12.0, seed=5, maps=maps, classes=np.arange(10) % 2)
    model, st = _model_settings(maps, s2, order=1)
    st = replace(st, do_scale=True, maxsig=maxsig, grid=replace(st.grid, perturb=0.3),
                 preprocess=replace(st.preprocess, do_norm=True))
    model = replace(model, data_vs_prior=np.where(np.arange(N // 2 + 1) < 6, 10.0, 1.0)[None].repeat(2, 0))
    mx = replace(model, refs=[replace(r, data=xp.asarray(r.data)) for r in model.refs])
    pre = preprocess_pool(xp.asarray(img), parts, st.preprocess, model.sigma2_noise)
    sig = coarse_pass(xp, pre, parts, mx, st, orientation_priors(parts, model, st))
    width = 32 * len(np.unique(sig.t)) * len(np.unique(sig.o)) * len(np.unique(sig.c))
    cut = np.sort(sig.n_sig)[len(sig.n_sig) // 2]
    assert sig.n_sig.min() < cut, sig.n_sig  # some particles below the cut: a pool of both paths
    dense = []
    real_group = fine_mod._flat_group
    monkeypatch.setattr(fine_mod, "_flat_group", lambda *a: dense.append(len(a[5])) or real_group(*a))
    monkeypatch.setattr(fine_mod, "FLAT_MIN_RUN", 1)  # lone flat particles too (runs of one or two here)
    runs = {}
    for waste in (0.0, width / (32.0 * cut)):
        for backend in ("cpu", "gpu"):
            monkeypatch.setitem(fine_mod.FINE_LIMITS[backend], "flat_waste", waste)
        part, res = fine_pass(xp, pre, parts, mx, st, sig)
        runs[waste] = (part.to_host(), res)
    assert sum(dense) == int(np.sum(sig.n_sig >= cut))
    (p0, r0), (p1, r1) = runs.values()
    _assert_partials_close(p0, p1, rtol=1e-9)
    for f in ("rot", "tilt", "psi", "origin_x_angst", "origin_y_angst", "class_number", "pmax", "loglik", "norm"):
        assert np.allclose(getattr(r0, f), getattr(r1, f), rtol=1e-9, atol=1e-9), f


def test_flat_runs_are_consecutive_particles_cut_to_groups_and_short_runs_left_out():
    # oracle: the rule written out -- runs of consecutive particles, cut every `per`, runs shorter than
    # min(per, min_run) left to the sparse path
    from gerelion_dask.expectation.fine import _flat_runs

    J = np.array([0, 1, 2, 3, 4, 7, 9, 10, 11, 20, 21, 22, 23, 24, 25, 26])
    got = [list(g) for g in _flat_runs(J, per=3, min_run=3)]
    assert got == [[0, 1, 2], [3, 4], [9, 10, 11], [20, 21, 22], [23, 24, 25], [26]]
    assert [list(g) for g in _flat_runs(J, per=10, min_run=4)] == [[0, 1, 2, 3, 4], [20, 21, 22, 23, 24, 25, 26]]
    assert [list(g) for g in _flat_runs(J, per=1, min_run=8)] == [[int(j)] for j in J]  # a CPU's groups of one
    assert _flat_runs(np.zeros(0, np.int64), 4, 2) == []


def _relion_cc(F, C, P, phase, n):
    """RELION's cross-correlation written literally on whole ``[n][n/2+1]`` windows (``getAllSquaredDifferences``,
    ``--firstiter_cc``): ``-Re sum (X s_t) conj(C P)`` over every stored entry with ``kx^2 + ky^2 <= (n/2)^2`` (DC and
    the ``kx = 0, ky < 0`` twins included), divided by the root of ``sum |C P|^2`` there and by the root of the image
    power over every stored entry.  ``F (n, n/2+1)`` one image, ``C`` its CTF, ``P (O, n, n/2+1)``, ``phase (T, ...)``
    -> ``(O, T)``."""
    ky, kx = cv.freq_indices_2d(n)
    circle = (kx * kx + ky * ky) <= (n // 2) ** 2
    R = C[None] * P * circle
    cross = np.einsum("oyx,tyx->ot", np.conj(R), F[None] * phase).real
    return -cross / (np.sqrt((np.abs(R) ** 2).sum(axis=(1, 2)))[:, None] * np.sqrt((np.abs(F) ** 2).sum()))


def test_cross_correlation_iteration_follows_relions_sums(xp):
    # oracle: _relion_cc, RELION's CC sums written out on the whole half-complex windows (float64 NumPy): each
    # particle's best coarse sample at the coarse size, then the best of its 32 children at the current size, and
    # that child's CC as the particle's log-likelihood contribution
    from gerelion_dask.expectation.estep import coarse_pass, orientation_priors
    from gerelion_dask.expectation.fine import fine_pass, project_gathered
    from gerelion_dask.expectation.preprocess import PreprocessedPool, preprocess_pool

    img, parts, A, off, s2, maps = _dataset(5, 3.0, seed=21)
    model, st = _model_settings(maps, s2, order=1)
    st = replace(st, do_cc=True, grid=replace(st.grid, perturb=0.3))
    mx = replace(model, refs=[replace(r, data=xp.asarray(r.data)) for r in model.refs])
    pre = preprocess_pool(xp.asarray(img), parts, st.preprocess, model.sigma2_noise)
    sig = coarse_pass(xp, pre, parts, mx, st, orientation_priors(parts, model, st))
    _, res = fine_pass(xp, pre, parts, mx, st, sig)
    pre = PreprocessedPool(*(to_np(getattr(pre, f.name)) for f in fields(pre)))
    grid, nc, n = st.grid, st.coarse_size, st.preprocess.current_size
    full_c, full_n = np.ones((nc, nc // 2 + 1), bool), np.ones((n, n // 2 + 1), bool)
    Pc = project_gathered(model.refs[0], grid.coarse_matrices(), nc, full_c, np).reshape(-1, nc, nc // 2 + 1)
    phase_c = cv.shift_phase_2d(nc, N, grid.translations)
    assert list(sig.n_sig) == [1] * len(parts.index)
    for j in range(len(parts.index)):
        C = pre.ctf[j] * model.scales[parts.group[j]]
        cc = _relion_cc(cv.window_rfft2(pre.fimg[j], nc), cv.window_rfft2(C, nc), Pc, phase_c, nc)
        o, t = np.unravel_index(np.argmin(cc), cc.shape)
        assert (sig.o[j], sig.t[j]) == (o, t), j
        gids = grid.fine_ids(np.array([o]))[0]
        Pf = project_gathered(model.refs[0], grid.fine_matrices_from_ids(gids), n, full_n, np).reshape(8, n, -1)
        tf = grid.fine_translations(np.array([t]))[0]
        ccf = _relion_cc(cv.window_rfft2(pre.fimg[j], n), cv.window_rfft2(C, n), Pf, cv.shift_phase_2d(n, N, tf), n)
        f, u = np.unravel_index(np.argmin(ccf), ccf.shape)
        assert np.isclose(res.loglik[j], -ccf[f, u], rtol=1e-10)
        want = cv.matrix_to_euler(grid.fine_matrices_from_ids(gids[f:f + 1]))
        got = cv.matrix_to_euler(cv.euler_to_matrix(res.rot[j:j + 1], res.tilt[j:j + 1], res.psi[j:j + 1]))
        assert np.allclose(np.ravel(got), np.ravel(want), atol=1e-9)
        o_want = (pre.int_offset_px[j] + tf[u]) * st.preprocess.pixel_size
        assert np.allclose([res.origin_x_angst[j], res.origin_y_angst[j]], o_want, atol=1e-9)


_OOM_CHILD = r"""
import logging, resource, sys, pickle
import numpy as np
sys.path.insert(0, {tests!r})
import test_engine as te
from dataclasses import replace
from gerelion_dask.expectation.estep import expectation_pool
logging.basicConfig(level=logging.WARNING)
img, parts, A, off, s2, maps = te._dataset(24, 10.0, seed=6)
model, st = te._model_settings(maps, s2, order=1)
def vm(key):
    return int([l.split()[1] for l in open("/proc/self/status") if l.startswith(key)][0]) * 1024
small = replace(st, fine_max_elems=1 << 18)
expectation_pool(img, parts, model, small)  # warm-up: lazy imports and tables
vm0 = vm("VmSize")
ref = expectation_pool(img, parts, model, small)
need = vm("VmPeak") - vm0  # address space the small-chunk run needed (VmPeak: high-water mark of VmSize)
# room for that plus 64 MiB; one dense chunk of all particles needs far more.  (The child runs with a low glibc
# mmap threshold, so freed arrays leave the address space at once and the limit measures what is live.)
resource.setrlimit(resource.RLIMIT_AS, (vm("VmSize") + need + (64 << 20), resource.RLIM_INFINITY))
big = expectation_pool(img, parts, model, replace(st, fine_max_elems=1 << 26))
pickle.dump((ref, big), open({out!r}, "wb"))
"""


def test_estep_out_of_memory_shrinks_the_chunks_and_gives_the_same_result(tmp_path):
    # a real allocation failure: the child process caps its address space (RLIMIT_AS) just above what a run with
    # small chunks used, then asks for one dense chunk of all particles; the E-step must halve its chunks until they fit
    # and return what the default chunking returns (oracle: the unconstrained run)
    import os
    import pickle
    import subprocess
    import sys

    out = tmp_path / "res.pkl"
    code = _OOM_CHILD.format(tests=os.path.dirname(__file__), out=str(out))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072",
               MALLOC_ARENA_MAX="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "out of memory in the E-step" in r.stderr  # the limit was hit and the retry path taken
    (p1, r1), (p2, r2) = pickle.load(open(out, "rb"))
    _assert_partials_close(p1, p2, rtol=1e-9)
    assert np.allclose(r1.rot, r2.rot) and np.allclose(r1.pmax, r2.pmax)


def test_a_pool_that_never_fits_is_split_and_gives_the_same_result(xp, monkeypatch, caplog):
    # oracle: the whole pool's E-step -- a pool whose particles do not fit together at any chunk size (what holds
    # the union of their fine orientations is per pool) is evaluated as halves, recursively; partial sums add up and
    # per-particle results keep their order.  The failure is injected (for more than 6 particles, whatever the chunk
    # budget: NumPy's MemoryError, or on a GPU the OutOfMemoryError CuPy raises); the E-step beneath is the real one.
    from gerelion_dask.distributed.tasks import device_model
    from gerelion_dask.expectation import estep

    img, parts, A, off, s2, maps = _dataset(20, 3.0, seed=4)
    model, st = _model_settings(maps, s2, order=1)
    img, model = xp.asarray(img), device_model(model, xp)
    st = replace(st, do_scale=True, preprocess=replace(st.preprocess, do_norm=True))
    whole, rw = expectation_pool(img, parts, model, st)
    real, sizes = estep._expectation_pool, []

    def oom():
        if xp is np:
            return MemoryError("injected: out of memory")
        from cupy.cuda.memory import OutOfMemoryError

        return OutOfMemoryError(1 << 40, 80 << 30)

    def tight(xp_, images, particles, *a, **k):
        sizes.append(len(particles.index))
        if len(particles.index) > 6:
            raise oom()
        return real(xp_, images, particles, *a, **k)

    monkeypatch.setattr(estep, "_expectation_pool", tight)
    with caplog.at_level("WARNING", logger="gerelion_dask.expectation.estep"):
        split, rs = expectation_pool(img, parts, model, st)
    assert sizes[:estep.SPLIT_AFTER_HALVINGS + 1] == [20] * (estep.SPLIT_AFTER_HALVINGS + 1)  # halvings first
    assert sorted(n for n in sizes if n <= 6) == [5, 5, 5, 5]  # 20 -> 10 + 10 -> four pools of 5
    assert "splitting the pool in two" in caplog.text
    _assert_partials_close(whole.to_host(), split.to_host(), rtol=1e-9)
    for f in fields(rw):
        assert np.allclose(getattr(rw, f.name), getattr(rs, f.name), rtol=1e-9, atol=1e-9), f.name


def test_insertion_in_chunks_of_slices_gives_the_same_sums(xp, monkeypatch):
    # oracle: the one-shot insertion of all of a pool's fine slices -- the fine pass inserts them in chunks of
    # FINE_LIMITS["slice_bytes"] (bounded working memory at 256 px); chunks of 2 slices must give the same sums
    # (up to the order of float additions) and the same per-particle results
    from gerelion_dask.distributed.tasks import device_model
    from gerelion_dask.expectation import fine
    from gerelion_dask.ops.fourier import likelihood_pixels

    img, parts, A, off, s2, maps = _dataset(12, 3.0, seed=4)
    model, st = _model_settings(maps, s2, order=1)
    img, model = xp.asarray(img), device_model(model, xp)
    backend = "cpu" if xp is np else "gpu"
    whole, rw = expectation_pool(img, parts, model, st)
    n = st.preprocess.current_size
    row = fine.insert_row_bytes(int(likelihood_pixels(n, include_dc=True).sum()))
    calls = []
    real_insert = fine.insert_slices
    monkeypatch.setattr(fine, "insert_slices",
                        lambda bp, A_, *a, **k: calls.append(len(A_)) or real_insert(bp, A_, *a, **k))
    monkeypatch.setitem(fine.FINE_LIMITS[backend], "slice_bytes", 2 * row)
    chunked, rc = expectation_pool(img, parts, model, st)
    assert max(calls) == 2 and len(calls) > 10  # the insertion ran in chunks of (at most) 2 slices
    _assert_partials_close(whole.to_host(), chunked.to_host(), rtol=1e-10)
    for f in fields(rw):
        assert np.array_equal(getattr(rw, f.name), getattr(rc, f.name)), f.name


@pytest.mark.parametrize("cc", [False, True])
def test_float32_coarse_pass_agrees_with_float64(cc):
    # oracle: the float64 coarse pass -- float32 GEMMs (the GPU default) must select the same best poses and give
    # the same sums up to the few samples at the edge of significance
    img, parts, A, off, s2, maps = _dataset(24, 2.0, seed=8)
    model, st = _model_settings(maps, s2, order=2)
    st = replace(st, do_cc=cc)
    p64, r64 = expectation_pool(img, parts, model, replace(st, coarse_dtype="float64"))
    p32, r32 = expectation_pool(img, parts, model, replace(st, coarse_dtype="float32"))
    same = np.mean((r64.rot == r32.rot) & (r64.tilt == r32.tilt) & (r64.psi == r32.psi))
    assert same >= 0.95, same
    assert np.allclose(r64.pmax, r32.pmax, atol=0.02)
    w64, w32 = to_np(p64.bp_weight), to_np(p32.bp_weight)
    assert np.linalg.norm(w64 - w32) <= 0.02 * np.linalg.norm(w64)


def test_float32_coarse_diff2_is_accurate():
    # oracle: the float64 products -- float32 GEMMs change diff2 by far less than one unit of log-likelihood
    # (weights exp(-diff2) move by < 1 %), yet they are really float32 (not bit-identical)
    from gerelion_dask.expectation import estep
    from gerelion_dask.ops.likelihood import coarse_diff2, cross_term, power_term

    rng = np.random.default_rng(0)
    B, T, O, M = 6, 5, 40, 300
    X = rng.normal(size=(B, M)) + 1j * rng.normal(size=(B, M))
    P = X[rng.integers(0, B, O)] * 0.8 + 0.5 * (rng.normal(size=(O, M)) + 1j * rng.normal(size=(O, M)))
    C = rng.uniform(-1, 1, (B, M))
    W = np.full((B, M), 0.5)
    ph = np.exp(2j * np.pi * rng.uniform(size=(T, M)))
    hr, lpo, off = np.zeros(B), np.zeros((B, O)), np.zeros((B, T))

    def diff2(dtype):  # the coarse pass's terms: cross term and power term in dtype, assembled by coarse_diff2
        proj = estep.coarse_projections(np, P, dtype)
        g = cross_term(np, W * C * X, ph, proj.interleaved)
        return coarse_diff2(g, (W * np.abs(X) ** 2).sum(axis=1), power_term(np, W * C * C, proj.power), hr, lpo, off)

    d64, d32 = diff2(np.float64), diff2(np.float32)
    # and the float64 block is the direct sum over pixels: sum w |c P - X s_t^*|^2 ... written with the shift on X
    direct = np.array([[[np.sum(W[b] * np.abs(C[b] * P[o] - X[b] * ph[t]) ** 2) for o in range(O)]
                        for t in range(T)] for b in range(B)])
    assert np.allclose(d64, direct, rtol=1e-12, atol=1e-9)
    err = np.abs(d32 - d64).max()
    assert 0 < err < 0.01 and d64.dtype == d32.dtype == np.float64


def test_projection_cache_gives_bit_identical_results():
    # oracle: the pool without a cache -- projections reused from an earlier pool of the same iteration (and those
    # added to the cache by this one) must leave every sum and pose bit-identical
    from gerelion_dask.expectation.fine import ProjectionCache

    img, parts, A, off, s2, maps = _dataset(24, 2.0, seed=9)
    model, st = _model_settings(maps, s2, order=1)

    def sub(s):
        return replace(parts, **{f.name: (getattr(parts, f.name)[s] if isinstance(getattr(parts, f.name), np.ndarray)
                                          else getattr(parts, f.name)) for f in fields(parts)
                                 if f.name not in ("half", "ctf")}, ctf=parts.ctf.take(s))

    plain, rp = expectation_pool(img[12:], sub(slice(12, 24)), model, st)
    cache = ProjectionCache()
    first, rf = expectation_pool(img[:12], sub(slice(0, 12)), model, st, cache=cache)  # an earlier pool fills it
    alone, ra = expectation_pool(img[:12], sub(slice(0, 12)), model, st)
    for f in fields(first):  # the first pool reads the cache's own array: the same sums
        if f.name != "grid":
            assert np.array_equal(np.asarray(getattr(first, f.name)), np.asarray(getattr(alone, f.name))), f.name
    gids = np.sort(cache._index[0][0])
    P, where = cache.rows(0, gids, lambda ids: 1 / 0)  # everything cached: nothing computed, the cache's array
    assert P is cache._rows[0] and np.array_equal(np.sort(where), np.arange(len(gids)))
    P2, where2 = cache.rows(0, gids[1::2], lambda ids: 1 / 0)  # a subset: the same array, no copy
    assert P2 is P and np.array_equal(where2, where[1::2])
    tiny = ProjectionCache(max_bytes=0)  # nothing fits: each pool gets its own rows, the same sums
    over, ro = expectation_pool(img[12:], sub(slice(12, 24)), model, st, cache=tiny)
    assert tiny.nbytes == 0
    for f in fields(plain):
        if f.name != "grid":
            assert np.array_equal(np.asarray(getattr(plain, f.name)), np.asarray(getattr(over, f.name))), f.name
    n_cached = cache.nbytes
    cached, rc = expectation_pool(img[12:], sub(slice(12, 24)), model, st, cache=cache)
    assert n_cached > 0 and cache.nbytes >= n_cached
    for f in fields(plain):
        if f.name != "grid":
            assert np.array_equal(np.asarray(getattr(plain, f.name)), np.asarray(getattr(cached, f.name))), f.name
    for f in fields(rp):
        assert np.array_equal(getattr(rp, f.name), getattr(rc, f.name)), f.name


def _two_half_pools(n, noise, seed, do_norm=False):
    """E-step sums of the first and second halves of a synthetic set (half sets 1 and 2) and their model."""
    img, parts, A, off, s2, maps = _dataset(n, noise, seed=seed)
    model, st = _model_settings(maps, s2, order=1)
    st = replace(st, preprocess=replace(st.preprocess, do_norm=do_norm))
    m = n // 2

    def part(sl, half):
        return replace(parts, **{f.name: getattr(parts, f.name)[sl] for f in fields(parts)
                                 if isinstance(getattr(parts, f.name), np.ndarray)}, ctf=parts.ctf.take(sl), half=half)

    p1, _ = expectation_pool(img[:m], part(slice(0, m), 1), model, st)
    p2, _ = expectation_pool(img[m:], part(slice(m, n), 2), model, st)
    return p1, p2, model, s2, maps


def _two_half_model(vol, s2, pdf_direction):
    """The model an auto-refine M-step starts from: one class, the map ``vol`` in both half sets, the direction
    prior ``pdf_direction (1, n_dir)`` and noise ``s2`` in each, flat spectra, sigma_offset 5 A."""
    from gerelion_dask.maximization.model import Model

    nsh = N // 2 + 1
    return Model(N, APIX, [[vol], [vol]], np.ones((2, 1)), np.stack([np.asarray(pdf_direction)] * 2),
                 np.stack([np.asarray(s2)[None]] * 2), np.ones((2, 1, nsh)), np.ones((2, 1, nsh)), np.zeros((1, nsh)),
                 np.ones((2, 1, nsh)), np.full(2, 5.0), np.ones(2), np.ones((2, 1)), 1.0 / 20.0, loglik=np.zeros(2))


def test_each_half_set_keeps_its_own_other_parameters():
    # oracle: RELION 3.1's gold-standard auto-refine (ALGORITHM.md §6.2 step 10; its MPI followers add the weighted
    # sums of their own half set only, and its run_it001_half1/half2_model.star differ in norm average, sigma offset,
    # direction priors, noise and log-likelihood) -- each half's other parameters are the §5.4 formulas written out on
    # that half's sums alone; data_vs_prior and the average Pmax are half 1's in both (RELION broadcasts them); the
    # final iteration joins the sums, so both halves then hold the joined values
    from gerelion_dask.maximization.mstep import MStepSettings, maximization
    from gerelion_dask.ops.fourier import npix_per_shell

    p1, p2, model, s2, maps = _two_half_pools(40, 1.0, seed=11, do_norm=True)
    nsh = N // 2 + 1
    n_dir = np.asarray(model.pdf_direction).shape[-1]
    m0 = _two_half_model(maps[0], s2, np.full((1, n_dir), 1.0 / n_dir))
    ms = MStepSettings(True, do_norm=True)
    got, _ = maximization({1: p1, 2: p2}, m0, ms)
    npix = np.maximum(npix_per_shell(N), 1)

    def want(p):
        S = float(p.wsum_pdf_class.sum())
        noise = p.wsum_sigma2[0] / (2.0 * p.sumw_optics[0] * npix)
        for k in range(1, nsh):
            noise[k] = noise[k] if noise[k] >= 1e-14 else noise[k - 1]
        return {"avg_norm": p.wsum_avg_norm / p.n_particles,
                "sigma_offset_angst": np.sqrt(p.wsum_sigma2_offset / (2 * S)),
                "pdf_direction": p.wsum_pdf_direction / S, "loglik": p.sum_ll, "sigma2_noise": noise[None]}

    for hi, p in enumerate((p1, p2)):
        for name, value in want(p).items():
            assert np.allclose(np.asarray(getattr(got, name))[hi], value, rtol=1e-12, atol=0), (hi, name)
    assert abs(got.avg_norm[0] - got.avg_norm[1]) > 1e-6
    assert abs(got.sigma_offset_angst[0] - got.sigma_offset_angst[1]) > 1e-6
    assert not np.allclose(got.pdf_direction[0], got.pdf_direction[1])
    assert np.array_equal(got.data_vs_prior[1], got.data_vs_prior[0]) and got.tau2[0, 0, 1] != got.tau2[1, 0, 1]
    assert got.ave_pmax == p1.sum_pmax / p1.n_particles
    fin, _ = maximization({1: p1, 2: p2}, m0, replace(ms, final=True))
    joined = p1 + replace(p2, half=1)
    for name, value in want(joined).items():
        for hi in range(2):
            assert np.allclose(np.asarray(getattr(fin, name))[hi], value, rtol=1e-12, atol=0), (hi, name)


def _same_run(xp, a, b, tol: float = 1e-12) -> None:
    """Two M-steps that must give the same result: bit for bit on NumPy; on CuPy to ``tol`` of the largest value
    (its symmetrisation and sums add with atomics, whose order changes the last bits from call to call)."""
    a, b = np.asarray(to_np(a)), np.asarray(to_np(b))
    if xp is np:
        assert np.array_equal(a, b)
    else:
        err = np.abs(a - b).max() / max(np.abs(a).max(), 1e-300)
        assert err <= tol, err


def _flattening_case(xp):
    """The M-step inputs of the solvent-flattening tests: two half sets' sums on ``xp``, their model, and the
    voxels' radius and z (from the centre) to make masks of."""
    from gerelion_dask.ops.masks import radius_grid

    p1, p2, model, s2, maps = _two_half_pools(24, 1.0, seed=5)
    m0 = _two_half_model(maps[0], s2, model.pdf_direction)
    return {1: p1.on(xp), 2: p2.on(xp)}, m0, radius_grid(N, 3), np.arange(N)[:, None, None] - N // 2


def test_solvent_flattening_multiplies_each_half_map_by_the_mask(xp):
    # oracle: RELION's solventFlatten (ALGORITHM.md §5.5) -- the maps of an M-step with --flatten_solvent are the
    # maps of the same M-step without it, times the --solvent_mask (values in [0, 1]) or, without one, times the soft
    # sphere of the particle diameter; the final iteration is not flattened
    from gerelion_dask.maximization.mstep import MStepSettings, maximization
    from gerelion_dask.ops.masks import soft_sphere

    parts, m0, r, z = _flattening_case(xp)
    mask = np.clip(1.2 - r / (0.3 * N), 0, 1) * (z >= -2)  # off-centre, not a sphere: a wrong mask shows
    base = MStepSettings(True, particle_diameter_angst=0.8 * N * APIX)
    plain, _ = maximization(parts, m0, base)
    masked, _ = maximization(parts, m0, replace(base, flatten_solvent=True, solvent_mask=mask.astype(np.float32)))
    sphere, _ = maximization(parts, m0, replace(base, flatten_solvent=True))
    final, _ = maximization(parts, m0, replace(base, final=True, flatten_solvent=True, solvent_mask=mask))
    final_plain, _ = maximization(parts, m0, replace(base, final=True))
    ball = soft_sphere(N, 0.8 * N / 2, 5.0)
    for h in range(2):
        a = plain.maps[h][0]
        assert np.abs(a).max() > 0 and np.abs(a[mask == 0]).max() > 1e-3 * np.abs(a).max()
        assert np.allclose(masked.maps[h][0], a * mask.astype(np.float32), rtol=1e-12, atol=1e-12 * np.abs(a).max())
        assert np.allclose(sphere.maps[h][0], a * ball, rtol=1e-12, atol=1e-12 * np.abs(a).max())
        _same_run(xp, final.maps[h][0], final_plain.maps[h][0])


def test_second_solvent_mask_sets_its_region_to_its_average(xp):
    # oracle: RELION 3.1's solventFlatten with --solvent_mask2, written out voxel by voxel in float64 -- after the
    # solvent mask, softMaskOutsideMap(map, mask2, invert): avg = sum(m2 map) / sum(m2), map = (1 - m2) map + m2 avg;
    # where the second mask is 1 the map is that one value; the final iteration is not flattened
    from gerelion_dask.maximization.mstep import MStepSettings, maximization

    parts, m0, r, z = _flattening_case(xp)
    mask = np.clip(1.3 - r / (0.35 * N), 0, 1)
    m2 = (np.clip(1.5 - np.abs(r - 0.22 * N) / 1.5, 0, 1) * (z > 0)).astype(np.float32)  # a soft-edged half shell
    base = MStepSettings(True, particle_diameter_angst=0.8 * N * APIX, flatten_solvent=True,
                         solvent_mask=mask.astype(np.float32))
    one, _ = maximization(parts, m0, base)
    two, _ = maximization(parts, m0, replace(base, solvent_mask2=m2))
    final, _ = maximization(parts, m0, replace(base, final=True, solvent_mask2=m2))
    final_one, _ = maximization(parts, m0, replace(base, final=True))
    w = m2.astype(np.float64).ravel()
    for h in range(2):
        v = np.asarray(one.maps[h][0], np.float64).ravel()
        sum_w = sum_bg = 0.0
        for i in np.flatnonzero(w):
            sum_w += w[i]
            sum_bg += w[i] * v[i]
        want = (1.0 - w) * v + w * (sum_bg / sum_w)
        got = np.asarray(two.maps[h][0], np.float64).ravel()
        assert np.allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(v).max())
        inside = w == 1
        assert inside.sum() > 50 and np.ptp(got[inside]) <= 1e-9 * np.abs(v).max()
        assert np.ptp(v[inside]) > 1e-3 * np.abs(v).max()  # (the region was not constant before)
        _same_run(xp, got[w == 0], np.asarray(one.maps[h][0]).ravel()[w == 0])
        _same_run(xp, final.maps[h][0], final_one.maps[h][0])


def test_lowpass_mask_adds_its_region_low_pass_filtered(xp):
    # oracle: RELION 3.1's solventFlatten with --lowpass_mask / --lowpass, written out in float64 with its
    # lowPassFilterMap (shell ROUND(N a / lowpass), a raised cosine from one shell below to one above, in 1/pixel
    # units) -- map = solvent mask x map + lowpass(low-pass mask x map); the final iteration is not flattened
    from gerelion_dask.maximization.mstep import MStepSettings, maximization

    parts, m0, r, z = _flattening_case(xp)
    mask = np.clip(1.3 - r / (0.35 * N), 0, 1) * (z <= 0)
    lmask = np.clip(1.3 - r / (0.35 * N), 0, 1) * (z > 0)  # the other half, low-pass filtered
    res = N * APIX / 4.4  # shell 4.4: RELION rounds it to 4 (an unrounded edge would keep 4 < r < 5.4)
    base = MStepSettings(True, particle_diameter_angst=0.8 * N * APIX)
    plain, _ = maximization(parts, m0, base)
    flat = replace(base, flatten_solvent=True, solvent_mask=mask.astype(np.float32),
                   lowpass_mask=lmask.astype(np.float32), lowpass_angst=res)
    got, _ = maximization(parts, m0, flat)
    final, _ = maximization(parts, m0, replace(flat, final=True))
    final_plain, _ = maximization(parts, m0, replace(base, final=True))
    ires = int(np.floor(N * APIX / res + 0.5))
    lo, hi = max(0.0, (ires - 1) / N), (ires + 1) / N
    k = np.fft.fftfreq(N) * N
    rr = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(N // 2 + 1)[None, None, :] ** 2) / N
    filt = np.where(rr < lo, 1.0, np.where(rr > hi, 0.0, 0.5 + 0.5 * np.cos(np.pi * (rr - lo) / (hi - lo))))
    for h in range(2):
        v = np.asarray(plain.maps[h][0], np.float64)
        region = np.fft.irfftn(np.fft.rfftn(v * lmask.astype(np.float32)) * filt, s=v.shape, axes=(0, 1, 2))
        want = v * mask.astype(np.float32) + region
        assert np.allclose(got.maps[h][0], want, rtol=1e-10, atol=1e-12 * np.abs(v).max())
        assert np.abs(region).max() > 1e-3 * np.abs(v).max()
        _same_run(xp, final.maps[h][0], final_plain.maps[h][0])


def test_solvent_corrected_fsc_replaces_the_gold_standard_fsc(xp):
    # oracle: RELION's reconstructUnregularisedMapAndCalculateSolventCorrectedFSC -- with --solvent_correct_fsc and
    # a mask, the M-step's FSC is the phase-randomisation-corrected FSC of the masked unregularised half maps, zero
    # beyond the current size, and the same seed gives the same curve; without a mask the flag changes nothing
    from gerelion_dask.maximization.mstep import MStepSettings, maximization, symmetrised
    from gerelion_dask.ops.fsc import solvent_corrected_fsc
    from gerelion_dask.ops.masks import soft_sphere
    from gerelion_dask.ops.reconstruct import reconstruct

    p1, p2, model, s2, maps = _two_half_pools(24, 1.0, seed=5)
    m0 = _two_half_model(maps[0], s2, model.pdf_direction)
    parts = {1: p1.on(xp), 2: p2.on(xp)}
    mask = soft_sphere(N, 0.3 * N, 2.0)
    base = MStepSettings(True)
    plain, _ = maximization(parts, m0, base)
    # (an FSC divides sums that carry the atomics' last bits: 1e-9 on CuPy)
    _same_run(xp, maximization(parts, m0, replace(base, solvent_correct_fsc=True))[0].fsc, plain.fsc, 1e-9)
    ms = replace(base, solvent_correct_fsc=True, solvent_mask=mask, fsc_seed=11)
    got, _ = maximization(parts, m0, ms)
    u = [reconstruct(symmetrised(p.bp_data[0], p.bp_weight[0], p.grid, None), tau2=None) for p in (p1, p2)]
    want, at, *_ = solvent_corrected_fsc(u[0], u[1], mask, np.random.default_rng(11))
    want[p1.grid.r_max + 1:] = 0.0
    assert at > 0
    np.testing.assert_allclose(np.asarray(got.fsc)[0], want, rtol=1e-9, atol=1e-9)
    assert np.abs(np.asarray(got.fsc)[0] - np.asarray(plain.fsc)[0]).max() > 0.01
    _same_run(xp, maximization(parts, m0, ms)[0].fsc, got.fsc, 1e-8)  # the same seed, the same curve


def test_non_finite_e_step_sums_stop_the_m_step_with_one_clear_error(xp):
    # oracle: the rule for bad numbers -- a NaN or infinity in a half set's sums (here put into its back-projection,
    # then into its noise spectra) stops the run with one RunFailedError naming the half set and the sums, instead
    # of maps of NaN or zeros; finite sums pass
    from gerelion_dask.errors import RunFailedError
    from gerelion_dask.maximization.mstep import MStepSettings, maximization

    p1, p2, model, s2, maps = _two_half_pools(24, 1.0, seed=5)
    m0 = _two_half_model(maps[0], s2, model.pdf_direction)
    ms = MStepSettings(True)
    maximization({1: p1.on(xp), 2: p2.on(xp)}, m0, ms)
    data = np.array(p2.bp_data)
    data[0, 3, 4, 5] = np.nan
    with pytest.raises(RunFailedError, match=r"half set 2 hold NaN or infinite values \(back-projected images\)"):
        maximization({1: p1.on(xp), 2: replace(p2, bp_data=data).on(xp)}, m0, ms)
    noise = np.array(p1.wsum_sigma2)
    noise[0, 2] = np.inf
    with pytest.raises(RunFailedError, match=r"half set 1 .*\(noise spectra\)"):
        maximization({1: replace(p1, wsum_sigma2=noise).on(xp), 2: p2.on(xp)}, m0, ms)


@pytest.mark.parametrize("final, gridding, sym", [(False, 0, "C1"), (False, 10, "C2"), (True, 0, "C1")])
def test_mstep_gpu_matches_numpy(xp, final, gridding, sym):
    # oracle: the float64 NumPy M-step -- the same summed partials reconstructed on CuPy give the same maps, FSC,
    # spectra and resolution (the GPU M-step of the runners), including symmetrisation, iterative gridding and the
    # final iteration's joined halves
    if xp is np:
        pytest.skip("compares CuPy with NumPy")
    from gerelion_dask.maximization.mstep import MStepSettings, maximization
    from gerelion_dask.ops.symmetry import symmetry_operators

    p1, p2, model, s2, maps = _two_half_pools(24, 1.0, seed=5)
    m0 = _two_half_model(maps[0], s2, model.pdf_direction)
    ms = MStepSettings(True, final=final, low_resol_join_halves=40.0, flatten_solvent=True,
                       particle_diameter_angst=0.9 * N * APIX, symmetry_operators=symmetry_operators(sym),
                       gridding_iterations=gridding)
    ref, ref_unfil = maximization({1: p1, 2: p2}, m0, ms)
    got, got_unfil = maximization({1: p1.on(xp), 2: p2.on(xp)}, m0, ms)
    for h in range(2):
        a, b = ref.maps[h][0], got.maps[h][0]
        assert isinstance(b, np.ndarray)
        assert np.abs(a - b).max() <= 1e-9 * np.abs(a).max()
        if final:
            assert np.abs(ref_unfil[h][0] - got_unfil[h][0]).max() <= 1e-9 * np.abs(ref_unfil[h][0]).max()
    assert np.allclose(ref.fsc, got.fsc, rtol=1e-9, atol=1e-12)
    assert np.allclose(ref.tau2, got.tau2, rtol=1e-9, atol=1e-20)
    assert np.allclose(ref.data_vs_prior, got.data_vs_prior, rtol=1e-9, atol=1e-12)
    assert ref.current_resolution == got.current_resolution


def test_after_a_cross_correlation_iteration_resolution_and_spectra_follow_ini_high(xp):
    # oracle: RELION 3.1.3 after a --firstiter_cc iteration -- the current resolution is ini_high's shell again
    # (updateCurrentResolution), not data_vs_prior's, and tau^2 and data_vs_prior are tapered by the squared raised
    # cosine at ini_high (maximizationOtherParameters); the same sums without the CC flag give the untapered spectra
    from gerelion_dask.maximization.model import Model
    from gerelion_dask.maximization.mstep import MStepSettings, ini_high_resolution, ini_high_taper, maximization

    img, parts, A, off, s2, maps = _dataset(24, 0.5, seed=6)
    model, st = _model_settings(maps, s2, order=1)
    st = replace(st, preprocess=replace(st.preprocess, do_norm=True))
    p0, _ = expectation_pool(img, parts, model, st)
    p0 = p0.on(xp)  # the M-step on xp's device
    nsh = N // 2 + 1
    m0 = Model(N, APIX, [[maps[0]]], np.ones((1, 1)), np.asarray(model.pdf_direction)[None], np.asarray(s2)[None, None],
               np.ones((1, 1, nsh)), np.ones((1, 1, nsh)), np.zeros((1, nsh)), np.ones((1, 1, nsh)), np.full(1, 5.0),
               np.ones(1), np.ones((1, 1)), 1.0 / 20.0)
    ini_high = 30.0
    plain, _ = maximization({0: p0}, m0, MStepSettings(False, ini_high_angst=ini_high, tau2_fudge=4.0, do_norm=True))
    cc, _ = maximization({0: p0}, m0, MStepSettings(False, cc_iteration=True, ini_high_angst=ini_high, tau2_fudge=4.0,
                                                      do_norm=True))
    # the average norm correction is updated in the CC iteration too; its log-likelihood is the average CC
    assert cc.avg_norm == plain.avg_norm != m0.avg_norm
    assert cc.loglik == pytest.approx(plain.loglik / float(to_np(p0.wsum_pdf_class).sum()), rel=1e-12)
    assert 1 / plain.current_resolution < 20.0  # the data alone would claim far more than ini_high's 32 Å
    assert cc.current_resolution == ini_high_resolution(N, APIX, ini_high) == 4 / (N * APIX)
    taper = ini_high_taper(nsh, N, APIX, ini_high)
    assert np.allclose(cc.tau2, plain.tau2 * taper, rtol=1e-12, atol=0)
    assert np.allclose(cc.data_vs_prior, plain.data_vs_prior * taper, rtol=1e-12, atol=0)
    assert np.all(cc.data_vs_prior[..., 6:] == 0) and np.all(taper[:4] == 1)  # CuPy's sums differ in the last bits


def test_background_noise_is_per_particle_and_has_the_spectrum(xp):
    # oracles: (1) the definition "one generator per particle" -- a batch of noise images with a spectrum per image
    # equals the images made one at a time, bit for bit (so a particle's noise does not depend on its pool, and the
    # batched path is the per-particle one); (2) the analytic variance -- the transform of the noise has variance
    # sigma2(shell) per real and imaginary part, checked on the mean power of 400 images
    from gerelion_dask.conventions import centred_rfft2
    from gerelion_dask.expectation.preprocess import coloured_noise
    from gerelion_dask.ops.fourier import shells_2d

    n = 16
    s2 = np.stack([np.linspace(2.0, 0.5, n // 2 + 1), np.linspace(1.0, 3.0, n // 2 + 1), np.full(n // 2 + 1, 0.7)])
    seeds = [11, 5, 11]
    batch = to_np(coloured_noise(3, n, s2, seeds, xp))
    ones = np.concatenate([to_np(coloured_noise(1, n, s2[i], [seeds[i]], xp)) for i in range(3)])
    assert np.array_equal(batch, ones)
    assert not np.array_equal(batch[0], batch[2])  # same seed, different spectrum: scaled differently
    many = to_np(coloured_noise(400, n, s2[0], np.arange(400), xp))
    F = to_np(centred_rfft2(xp.asarray(many)))
    sh = shells_2d(n)
    inner = (sh > 0) & (sh < n // 2) & (np.arange(n // 2 + 1)[None, :] > 0)  # away from the self-conjugate column
    ratio = (np.abs(F[:, inner]) ** 2).mean(axis=0) / (2 * s2[0][sh[inner]])
    assert abs(ratio.mean() - 1.0) < 0.05


def test_counter_normals_are_standard_and_independent(xp):
    # oracles: the standard normal's moments (mean 0, variance 1, skew 0, kurtosis 3) within 5 standard errors of
    # 2 x 10^6 samples; zero correlation between neighbours, between the real and imaginary parts and between
    # adjacent seeds; and the definition -- element j of a seed's row does not depend on the other rows or on m
    from gerelion_dask.expectation.preprocess import counter_normals

    z = to_np(counter_normals(np.arange(200), 5000, xp))
    x = np.concatenate([z.real.ravel(), z.imag.ravel()])
    se = 1 / np.sqrt(x.size)
    assert abs(x.mean()) < 5 * se and abs(x.var() - 1) < 5 * np.sqrt(2) * se
    assert abs(np.mean(x**3)) < 5 * np.sqrt(15) * se and abs(np.mean(x**4) - 3) < 5 * np.sqrt(96) * se
    for a, b in ((z.real[:, :-1], z.real[:, 1:]), (z.real, z.imag), (z.real[:-1], z.real[1:])):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 5 / np.sqrt(a.size)
    assert np.array_equal(to_np(counter_normals([7], 10, xp))[0], to_np(counter_normals([3, 7], 20, xp))[1, :10])


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_add_rows_matches_add_at(dtype):
    # oracle: np.add.at -- the NumPy scatter-add of rows (runs of equal rows summed in order) must add every row,
    # repeats included, in any order of the rows
    from gerelion_dask.ops.likelihood import add_rows

    rng = np.random.default_rng(3)
    rows = rng.integers(0, 40, 3000)
    rows[:50] = 7  # a long run into one row
    values = rng.normal(size=(3000, 300)) + (1j * rng.normal(size=(3000, 300)) if dtype is np.complex128 else 0)
    target = rng.normal(size=(40, 300)).astype(dtype)
    want = target.copy()
    np.add.at(want, rows, values)
    got = target.copy()
    add_rows(got, rows, values)
    assert np.allclose(got, want, rtol=1e-12, atol=1e-12)
    add_rows(got, rows[:0], values[:0])  # nothing to add
    assert np.allclose(got, want, rtol=1e-12, atol=1e-12)
    per = target[:, 0].copy()  # one value per row (the fine pass's per-group and per-optics-group sums)
    want1 = per.copy()
    np.add.at(want1, rows, values[:, 0])
    add_rows(per, rows, values[:, 0])
    assert np.allclose(per, want1, rtol=1e-12, atol=1e-12)
    # rows mostly once each (a local search's pairs), some repeated, unsorted: singles go in one indexed step
    rows = rng.permutation(np.r_[np.arange(0, 5000, 2), [3, 3, 3, 9, 9, 4998]])
    values = values[: rows.size]
    big = rng.normal(size=(5000, 300)).astype(dtype)
    want = big.copy()
    np.add.at(want, rows, values)
    add_rows(big, rows, values)
    assert np.allclose(big, want, rtol=1e-12, atol=1e-12)


def test_distinct_matches_numpy_unique():
    # oracle: np.unique -- ops.indexing.distinct over non-negative integers, counted when they are small (classes,
    # orientations, translations of the significant samples) and sorted when sparse (local-search keys): repeated
    # values, gaps, one value, a 2-D array, none at all, int32, and values far above the array's size
    from gerelion_dask.ops.indexing import distinct

    rng = np.random.default_rng(5)
    for x in (rng.integers(0, 4608, 100_000), rng.integers(0, 2, 50), np.array([7, 7, 7]),
              rng.choice([3, 90, 4000], (30, 4)), np.zeros(0, np.int64), rng.integers(0, 12288 * 1000, 60_000),
              np.array([10**12, 5, 10**12, 0]), rng.integers(0, 10**6, 500).astype(np.int32)):
        got = distinct(x)
        assert np.array_equal(got, np.unique(x)) and got.dtype.kind == "i"


def test_segment_max_is_each_rows_max():
    # oracle: max() of each compressed row in a Python loop, -inf for an empty row (first, middle and last rows empty,
    # rows of one entry, -inf entries)
    from gerelion_dask.ops.indexing import segment_max

    rng = np.random.default_rng(6)
    n = np.array([0, 3, 1, 0, 0, 5, 2, 0])
    v = rng.normal(size=n.sum())
    v[4] = -np.inf
    ptr = np.r_[0, np.cumsum(n)]
    want = [max(v[a:b]) if b > a else -np.inf for a, b in zip(ptr[:-1], ptr[1:])]
    assert np.array_equal(segment_max(ptr, v), want)
    assert np.array_equal(segment_max(np.zeros(4, np.int64), np.zeros(0)), np.full(3, -np.inf))


def test_pair_sums_match_a_loop_over_pairs_and_children(xp, monkeypatch):
    # oracle: the definition of ops.likelihood.pair_sums written as a float64 loop over pairs and their children --
    # Q = sum_i w_i ph[tp_i], wo = sum_i w_i; bp_i[brow] += XCW[j] Q, bp_w[brow] += wo CCW[j],
    # x = Cr Re(X conj(P) Q), m = Cr^2 |P|^2, resid[j] += wo m - 2 x, xa[j] += x.gf, aa[j] += wo m.gf.  Pairs come
    # unsorted, with repeated rows and particles (one particle with 70 pairs), a pair with no children, onto nonzero
    # targets; NumPy in chunks of 1, 3 and all pairs, the CuPy kernels in one call with a particle's pairs in
    # segments of 32 (the default), 3 and 1 pairs; rows unsorted and sorted (with rows_sorted)
    from gerelion_dask.ops.likelihood import pair_sums

    rng = np.random.default_rng(8)
    b, F, T, M, R, n_p = 6, 11, 16, 300, 9, 110  # M > the kernels' 128 threads
    cplx = lambda *s: rng.normal(size=s) + 1j * rng.normal(size=s)  # noqa: E731
    XCW, X, ph, P = cplx(b, M), cplx(b, M), np.exp(2j * np.pi * rng.uniform(size=(T, M))), cplx(F, M)
    CCW, Cr, gf = rng.uniform(0.1, 2, (b, M)), rng.uniform(-1, 1, (b, M)), (rng.uniform(size=M) > 0.3) * 1.0
    pj, prow, brow = rng.integers(0, b, n_p), rng.integers(0, F, n_p), rng.integers(0, R, n_p)
    pj[rng.permutation(n_p)[:70]] = 4  # a flat particle: more pairs than a segment holds
    nch = rng.integers(1, 5, n_p)
    nch[7] = 0
    cstart = np.r_[0, np.cumsum(nch)]
    tp = np.concatenate([rng.choice(T, k, replace=False) for k in nch])
    wv = rng.uniform(0.0, 1.0, cstart[-1])
    start = {"bp_i": cplx(R, M), "bp_w": rng.normal(size=(R, M)), "resid": rng.normal(size=(b, M)),
             "xa": rng.normal(size=b), "aa": rng.normal(size=b)}

    def oracle(brow):
        want = {k: v.copy() for k, v in start.items()}
        for p in range(n_p):
            j, ch = pj[p], slice(cstart[p], cstart[p + 1])
            Q = (wv[ch, None] * ph[tp[ch]]).sum(axis=0)
            wo = wv[ch].sum()
            want["bp_i"][brow[p]] += XCW[j] * Q
            want["bp_w"][brow[p]] += wo * CCW[j]
            x = Cr[j] * (X[j] * np.conj(P[prow[p]]) * Q).real
            m = Cr[j] ** 2 * np.abs(P[prow[p]]) ** 2
            want["resid"][j] += wo * m - 2 * x
            want["xa"][j] += (x * gf).sum()
            want["aa"][j] += wo * (m * gf).sum()
        return want

    # unsorted rows, and rows in order with the caller's promise (rows_sorted: the twin skips its sort)
    for rows, promise in ((brow, False), (np.sort(brow), True)):
        want = oracle(rows)
        ins = [xp.asarray(a) for a in (XCW, CCW, X, Cr, gf, ph, P, pj, prow, rows, cstart, tp, wv)]
        for max_elems, seg in (((1, 0), (3 * 8 * M, 0), (10**8, 0)) if xp is np else ((10**8, 32), (10**8, 3),
                                                                                     (10**8, 1))):
            if seg:
                from gerelion_dask.kernels import pairs

                monkeypatch.setattr(pairs, "SEGMENT_PAIRS", seg)
            got = {k: xp.asarray(v.copy()) for k, v in start.items()}
            pair_sums(*ins, *got.values(), max_elems=max_elems, rows_sorted=promise)
            for k in start:
                assert np.allclose(to_np(got[k]), want[k], rtol=1e-12, atol=1e-10), (k, max_elems, seg, promise)
    got = {k: xp.asarray(v.copy()) for k, v in start.items()}
    pair_sums(*ins[:7], *(a[:0] for a in ins[7:10]), ins[10][:1], *ins[11:], *got.values())  # no pairs
    assert all(np.array_equal(to_np(got[k]), start[k]) for k in start)


def test_fine_limits_follow_the_devices_memory(xp):
    # oracle: the device's own total memory (CUDA's memGetInfo), CuPy's pool limit and gpu_limits -- NumPy uses the
    # CPU budgets; a GPU uses FINE_LIMITS["gpu"] itself from ~78 GiB up (an H100 or H200), else the budgets scaled
    # to the memory it offers this process; its coarse products are float64 where the device property
    # singleToDoublePrecisionPerfRatio is at most 2 (H100: 2), else float32
    from gerelion_dask.expectation.fine import FINE_LIMITS, GPU_SIZED_FOR, fine_limits, gpu_limits

    if xp is np:
        assert fine_limits(np) is FINE_LIMITS["cpu"]
        return

    def budgets(d):
        return {k: v for k, v in d.items() if k != "coarse_dtype"}

    total = xp.cuda.runtime.memGetInfo()[1]
    got = fine_limits(xp)
    ratio = xp.cuda.runtime.getDeviceProperties(xp.cuda.runtime.getDevice())["singleToDoublePrecisionPerfRatio"]
    assert got["coarse_dtype"] == ("float64" if ratio <= 2 else "float32")
    assert budgets(got) == budgets(gpu_limits(FINE_LIMITS["gpu"], total))
    assert (budgets(got) == budgets(FINE_LIMITS["gpu"])) == (total >= GPU_SIZED_FOR)
    pool = xp.get_default_memory_pool()
    before = pool.get_limit()
    try:  # a process limited to 24 GiB (CUPY_GPU_MEMORY_LIMIT on a shared GPU) takes a 24 GiB card's budgets
        pool.set_limit(size=24 * 2**30)
        assert budgets(fine_limits(xp)) == budgets(gpu_limits(FINE_LIMITS["gpu"], min(total, 24 * 2**30)))
        assert fine_limits(xp)["max_elems"] == 1 << 24
    finally:
        pool.set_limit(size=before)


def test_projection_in_chunks_of_rotations_is_the_same(xp):
    # oracle: the projection of all rotations at once -- project_gathered takes as many rotations at a time as fit
    # max_bytes (bounded working memory at 256 px); each slice depends on its own rotation only, so chunks of 3
    # (and an empty list) give the same values to the bit
    from gerelion_dask.expectation.fine import project_gathered, project_row_bytes
    from gerelion_dask.ops.fourier import likelihood_pixels
    from gerelion_dask.ops.projector import make_reference

    n = 16
    ref = make_reference(xp.asarray(phantom_map(n, APIX, "blobs")), r_max=n // 2)
    A = cv.euler_to_matrix(*np.random.default_rng(2).uniform(0, 180, (3, 10)))
    mask = xp.asarray(likelihood_pixels(n, include_dc=True))
    whole = to_np(project_gathered(ref, A, n, mask, xp, max_bytes=1 << 40))
    chunked = to_np(project_gathered(ref, A, n, mask, xp, max_bytes=3 * project_row_bytes(n, xp is not np)))
    assert whole.shape == (10, int(to_np(mask).sum())) and np.array_equal(whole, chunked)
    assert project_gathered(ref, A[:0], n, mask, xp).shape == (0, whole.shape[1])


def _child_posterior_case(seed=11):
    """A group of particles' children for the fine posteriors: 1-40 significant samples each, excluded samples
    (-inf prior), exact ties, a particle whose weights all underflow and one with every sample excluded."""
    rng = np.random.default_rng(seed)
    cnt = rng.integers(1, 41, 60)
    cnt[5], cnt[6] = 3, 2
    first = np.cumsum(cnt) - cnt
    R = int(cnt.sum())
    jl = np.repeat(np.arange(len(cnt)), cnt)
    q = np.arange(R) - first[jl]
    d = rng.normal(0.0, 3.0, (R, 32)) + rng.uniform(0, 20, R)[:, None]
    d[first[1], 3] = d[first[1], 7] = d[first[1]:first[1] + cnt[1]].min() - 1.0  # the best child, tied
    lp = rng.normal(0.0, 1.0, R)
    lp[rng.uniform(size=R) < 0.1] = -np.inf
    lp[first[5]:first[5] + 3] = -900.0  # every weight of particle 5 underflows: its best child alone
    lp[first[6]:first[6] + 2] = -np.inf  # particle 6: no sample allowed
    return d, lp, jl, q, first, cnt


def _posteriors_one_by_one(d, lp, first, cnt, frac, maxsig):
    """RELION's rule particle by particle (float64): weights exp(-(d - dmin) + lp) over the allowed children (0 beyond
    700), the best child alone when all underflow; sorted in descending order, the threshold is the weight at the
    first running sum >= frac * total (every positive weight at frac >= 1), at most maxsig of them."""
    w_all, dmin, sumw, bad, best, pmax = [], [], [], [], [], []
    for j in range(len(cnt)):
        rows = slice(first[j], first[j] + cnt[j])
        l = np.repeat(lp[rows], 32)
        x = np.where(np.isfinite(l), d[rows].ravel(), np.inf)
        m = x.min()
        with np.errstate(invalid="ignore"):  # inf - inf where no child is allowed
            w = np.where(np.isfinite(l) & (x - m <= 700), np.exp(-(x - m) + np.where(np.isfinite(l), l, 0)), 0.0)
        s = w.sum()
        bad.append(not s > 0)
        if bad[-1]:
            w, s = (np.arange(w.size) == np.argmin(x)) * 1.0, 1.0
        srt = np.sort(w)[::-1]
        k = (np.count_nonzero(w > 0) - 1 if frac >= 1 else
             min(int(np.argmax(np.cumsum(srt) >= frac * s)), np.count_nonzero(w > 0) - 1))
        if maxsig > 0:
            k = min(k, maxsig - 1)
        w = np.where(w >= srt[k], w, 0.0) / s
        w_all.append(w.reshape(-1, 32))
        dmin.append(m), sumw.append(s), best.append(int(np.argmax(w))), pmax.append(w.max())
    return np.concatenate(w_all), np.array(dmin), np.array(sumw), np.array(bad), np.array(best), np.array(pmax)


def test_child_posteriors_follow_relions_rule_particle_by_particle(xp):
    # oracle: _posteriors_one_by_one, RELION's significance rule written per particle with a full sort -- the fine
    # pass's posteriors (NumPy and CuPy's padded path: posterior_weights and significance_threshold over the group's
    # padded layout; CuPy: one kernel with a block per particle, kernels/posteriors.py) must give the same
    # thresholded weights, minima, sums, underflow flags, best children (first on ties) and Pmax, for adaptive
    # fractions below and at 1, with and without --maxsig; on CuPy also with the kernel's sort too small (the padded
    # path on the device)
    from types import SimpleNamespace

    from gerelion_dask.expectation.fine import _child_posteriors

    d, lp, jl, q, first, cnt = _child_posterior_case()
    paths = [None]
    if xp is not np:
        from gerelion_dask.kernels import posteriors

        assert posteriors.fits(cnt) and not posteriors.fits(np.r_[cnt, posteriors.CHILD_CAP // 32 + 1])
        paths.append(0)
    for frac, maxsig in ((0.999, -1), (0.9, -1), (0.999, 5), (1.0, -1), (1.0, 7)):
        st = SimpleNamespace(do_cc=False, adaptive_fraction=frac, maxsig=maxsig)
        want = _posteriors_one_by_one(d, lp, first, cnt, frac, maxsig)
        for cap in paths:
            if cap is not None:
                old, posteriors.CHILD_CAP = posteriors.CHILD_CAP, cap
            try:
                got = _child_posteriors(xp, xp.asarray(d), lp, jl, q, first, cnt, st)
            finally:
                if cap is not None:
                    posteriors.CHILD_CAP = old
            for name, g, w in zip(("w", "dmin", "sumw", "bad", "best", "pmax"), got, want, strict=True):
                g = to_np(g)
                if name in ("bad", "best"):
                    assert np.array_equal(g, w), (name, frac, maxsig, cap)
                else:
                    assert np.allclose(g, w, rtol=1e-12, atol=1e-300), (name, frac, maxsig, cap)
        assert int(want[3].sum()) == 2 and int((want[0] > 0).sum()) > 2 * len(cnt)


def test_children_diff2_matches_the_definition(xp):
    # oracle: the float64 einsum of the definition for each sample's 32 children (ops.likelihood.children_diff2):
    # g = Re sum_m Z[j] ph[trow + t] conj(P[prow[f]]), p = sum_m V[j] |P[prow[f]]|^2, diff2 = (a + p) - 2 g and
    # -CC = -g / (sqrt(p) a); NumPy in batches of 1, 3 and all samples, the CuPy kernel in one launch; repeated
    # particles, orientations and translations
    from gerelion_dask.ops.likelihood import children_diff2

    rng = np.random.default_rng(6)
    b, F, T, M, R = 5, 13, 12, 300, 23  # M > the kernel's 128 threads: each thread sums several pixels
    Z = rng.normal(size=(b, M)) + 1j * rng.normal(size=(b, M))
    V = rng.uniform(0.1, 2.0, size=(b, M))
    a = rng.uniform(50.0, 100.0, size=b)
    ph = np.exp(2j * np.pi * rng.uniform(size=(T, M)))
    P = rng.normal(size=(F, M)) + 1j * rng.normal(size=(F, M))
    power = np.abs(P) ** 2
    j = rng.integers(0, b, R)
    prow = rng.integers(0, F, (R, 8))
    trow = rng.integers(0, T // 4, R) * 4
    g = np.einsum("rm,rtm,rfm->rft", Z[j], ph[trow[:, None] + np.arange(4)], P[prow].conj()).real  # (R, 8, 4)
    p = np.einsum("rm,rfm->rf", V[j], power[prow])
    want = ((a[j][:, None, None] + p[:, :, None]) - 2.0 * g).reshape(R, 32)
    want_cc = (-g / (np.sqrt(p)[:, :, None] * a[j][:, None, None])).reshape(R, 32)
    args = [xp.asarray(x) for x in (Z, V, a, ph, P, j, prow, trow)]
    for max_elems in ((1, 3 * 24 * M, 10**8) if xp is np else (10**8,)):
        got = to_np(children_diff2(*args, cc=False, max_elems=max_elems))
        assert got.shape == (R, 32) and np.allclose(got, want, rtol=1e-12, atol=1e-10)
        got = to_np(children_diff2(*args, cc=True, max_elems=max_elems))
        assert np.allclose(got, want_cc, rtol=1e-12, atol=1e-14)
    assert children_diff2(*args[:5], *(x[:0] for x in args[5:])).shape == (0, 32)


def test_children_diff2_of_flat_posteriors_as_dense_products_matches_the_definition():
    # oracle: the same float64 einsum as above, on particles with hundreds of samples each (the NumPy path's dense
    # per-particle products, in blocks of orientations when max_elems is small) beside a particle with few samples
    # and one whose rows are not fixed by their first (both left to the per-sample batches)
    from gerelion_dask.ops import likelihood as lk

    rng = np.random.default_rng(7)
    b, F, T, M = 4, 8 * 40, 24, 50
    Z = rng.normal(size=(b, M)) + 1j * rng.normal(size=(b, M))
    V = rng.uniform(0.1, 2.0, size=(b, M))
    a = rng.uniform(50.0, 100.0, size=b)
    ph = np.exp(2j * np.pi * rng.uniform(size=(T, M)))
    P = rng.normal(size=(F, M)) + 1j * rng.normal(size=(F, M))
    js, prs, trs = [], [], []
    for q, (n_o, n_t) in enumerate(((30, 5), (25, 6), (3, 2))):  # two dense particles, one with 6 samples
        o = rng.choice(40, n_o, replace=False)
        t = rng.choice(T // 4, n_t, replace=False)
        oo, tt = (x.ravel() for x in np.meshgrid(o, t, indexing="ij"))
        keep = rng.uniform(size=oo.size) < 0.8  # most of the product kept, as in a flat posterior
        js.append(np.full(int(keep.sum()), q))
        prs.append(oo[keep, None] * 8 + np.arange(8))
        trs.append(tt[keep] * 4)
    js.append(np.full(80, 3))  # many samples, but random rows: not a product of orientations
    prs.append(rng.integers(0, F, (80, 8)))
    trs.append(rng.integers(0, T // 4, 80) * 4)
    j, prow, trow = np.concatenate(js), np.concatenate(prs), np.concatenate(trs)
    perm = rng.permutation(len(j))
    j, prow, trow = j[perm], prow[perm], trow[perm]
    R = len(j)
    g = np.einsum("rm,rtm,rfm->rft", Z[j], ph[trow[:, None] + np.arange(4)], P[prow].conj()).real
    p = np.einsum("rm,rfm->rf", V[j], (np.abs(P) ** 2)[prow])
    want = ((a[j][:, None, None] + p[:, :, None]) - 2.0 * g).reshape(R, 32)
    want_cc = (-g / (np.sqrt(p)[:, :, None] * a[j][:, None, None])).reshape(R, 32)
    out = np.zeros((R, 32))
    left = lk._children_dense(Z, V, a, ph, P, j, prow, trow, False, 10**8, out)
    assert set(j[left].tolist()) == {2, 3}  # the sparse particle and the one with random rows
    for max_elems in (24 * M * 7, 10**8):  # blocks of 7 orientations, or all at once
        got = lk.children_diff2(Z, V, a, ph, P, j, prow, trow, cc=False, max_elems=max_elems)
        assert np.allclose(got, want, rtol=1e-12, atol=1e-10)
        got = lk.children_diff2(Z, V, a, ph, P, j, prow, trow, cc=True, max_elems=max_elems)
        assert np.allclose(got, want_cc, rtol=1e-12, atol=1e-14)


def test_initial_noise_spectrum_of_white_noise(xp):
    # oracle: analytic -- images of white Gaussian noise of variance v, transformed with the 1/N^2 normalisation,
    # have E|F(k)|^2 = v / N^2 at every frequency, so the noise spectrum before iteration 1 (half the mean power minus
    # half the power of the mean image) is v / (2 N^2) (1 - 1/n) in every shell; pools computed on xp add up to the
    # whole set's sums
    from gerelion_dask.setup_job import PowerSettings, power_sums, sigma2_from_power_sums

    n, v = 32, 4.0
    rng = np.random.default_rng(7)
    img = rng.normal(scale=np.sqrt(v), size=(600, n, n))
    optics = np.repeat([0, 1], 300)
    ps = PowerSettings(n, 2, n / 2 - 2, False, 3.0)
    parts = [power_sums(xp.asarray(img[s : s + 250]), optics[s : s + 250], ps) for s in range(0, 600, 250)]
    total = parts[0] + parts[1] + parts[2]
    whole = power_sums(img, optics, ps)
    for name in ("power", "image_sum", "count"):
        assert np.allclose(getattr(total, name), getattr(whole, name), rtol=1e-10, atol=1e-12), name
    s2 = sigma2_from_power_sums(total, ps)
    want = v / (2 * n * n) * (1 - 1 / 300)
    assert s2.shape == (2, n // 2 + 1)
    # shells 2..N/2 hold 12-100 pixels x 300 images: each within 5 % (shell 1 has 4 pixels, shell 0 one)
    assert np.all(np.abs(s2[:, 2:] / want - 1) < 0.05), s2[:, 2:] / want
    assert np.all(s2 > 0)
    masked = PowerSettings(n, 2, n / 2 - 4, True, 3.0)  # --zero_mask: the device's masked sums are NumPy's
    a, b = power_sums(xp.asarray(img[:50]), optics[:50], masked), power_sums(img[:50], optics[:50], masked)
    assert np.allclose(a.power, b.power, rtol=1e-10) and np.allclose(a.image_sum, b.image_sum, rtol=1e-10, atol=1e-12)


def test_estep_task_drops_the_workers_caches_and_runs_a_pool_again_after_running_out_of_memory(monkeypatch, caplog):
    # oracle: the same task without the failure -- a pool that runs out of memory even after expectation_pool's own
    # halvings and splits (injected once) runs again once the worker has dropped its prepared references and
    # projection caches, with the same sums and poses; a second failure is one MemoryError naming the pool
    from gerelion_dask.distributed import tasks
    from gerelion_dask.expectation import estep

    img, parts, A, off, s2, maps = _dataset(8, 1.0, seed=8)
    model, st = _model_settings(maps, s2, order=1)
    src, sel = tasks.ImageSource(read_images=lambda rows: img[rows]), np.arange(8)
    want = tasks.estep_task(src, sel, parts, model, st, 3, "cpu")
    real, calls = estep.expectation_pool, []

    def failing(n_failures):
        def run(*a, **k):
            calls.append(len(tasks._PREPARED))
            if len(calls) <= n_failures:
                raise MemoryError("injected: out of memory")
            return real(*a, **k)
        return run

    monkeypatch.setattr(estep, "expectation_pool", failing(1))
    with caplog.at_level("WARNING", logger="gerelion_dask.distributed.tasks"):
        got = tasks.estep_task(src, sel, parts, model, st, 3, "cpu")
    assert "pool 3: out of memory (injected: out of memory)" in caplog.text
    assert calls[0] > 0 and calls[1] == 3  # the prepared model, settings and cache were dropped and made again
    assert np.array_equal(got.partials.bp_data, want.partials.bp_data) and got.results[0][0] == 3
    assert np.array_equal(got.results[0][1].rot, want.results[0][1].rot)
    calls.clear()
    monkeypatch.setattr(estep, "expectation_pool", failing(2))
    with pytest.raises(MemoryError, match="pool 3: out of memory again after dropping"):
        tasks.estep_task(src, sel, parts, model, st, 3, "cpu")


@pytest.mark.parametrize("freed", [True, False])
def test_first_out_of_memory_frees_what_other_pools_hold_before_shrinking(freed, monkeypatch):
    # oracle: the pool's own E-step without failures -- at the first out-of-memory error the ``release`` callback
    # runs once (in estep_task it drops the worker's references and caches of other half sets); if it freed
    # something the pool runs again with the same chunks, else the chunks halve; the sums are the same either way.
    # Also in estep_task: the worker's prepared objects of another half set go, this pool's stay.
    from gerelion_dask.distributed import tasks
    from gerelion_dask.expectation import estep

    img, parts, A, off, s2, maps = _dataset(8, 1.0, seed=9)
    model, st = _model_settings(maps, s2, order=1)
    want, _ = expectation_pool(img, parts, model, st)
    real, limits, released = estep._expectation_pool, [], []

    def once(xp_, images, particles, model_, settings, *a, **k):
        limits.append(settings.fine_max_elems)
        if len(limits) == 1:
            raise MemoryError("injected: out of memory")
        return real(xp_, images, particles, model_, settings, *a, **k)

    monkeypatch.setattr(estep, "_expectation_pool", once)
    got, _ = expectation_pool(img, parts, model, st, release=lambda: released.append(1) or freed)
    assert released == [1]
    assert limits[1] == (limits[0] if freed else limits[0] // 2)
    assert np.allclose(got.bp_data, want.bp_data, rtol=1e-9, atol=1e-12 * np.abs(want.bp_data).max())
    if not freed:
        return
    src = tasks.ImageSource(read_images=lambda rows: img[rows])  # a task reads float32 images
    monkeypatch.setattr(estep, "_expectation_pool", real)
    want = tasks.estep_task(src, np.arange(8), parts, model, st, 0, "cpu").partials
    monkeypatch.setattr(estep, "_expectation_pool", once)
    monkeypatch.setattr(tasks, "_PREPARED", {("model-cpu", -1): (None, "other half set's references")})
    limits.clear()
    out = tasks.estep_task(src, np.arange(8), parts, model, st, 0, "cpu")
    assert ("model-cpu", -1) not in tasks._PREPARED and len(tasks._PREPARED) == 3 and limits[0] == limits[1]
    assert np.allclose(out.partials.bp_data, want.bp_data, rtol=1e-9, atol=1e-12 * np.abs(want.bp_data).max())


def _ssnr_voxel_by_voxel(grid, W, nsh, T, tau2=None, fsc=None):
    """RELION's BackProjector::updateSSNRarrays written out voxel by voxel in float64 (the oracle of ssnr_spectra)."""
    p, rp = grid.padding, grid.r_pad
    max_r2 = round(grid.r_max * p) ** 2
    P, _, px = W.shape
    s2, cnt = np.zeros(nsh), np.zeros(nsh)
    voxels = []
    for iz in range(P):
        for iy in range(P):
            for ix in range(px):
                r2 = (iz - rp - 1) ** 2 + (iy - rp - 1) ** 2 + ix**2
                if r2 < max_r2:
                    ires = int(np.floor(np.sqrt(r2) / p + 0.5))
                    s2[ires] += p**3 * W[iz, iy, ix]
                    cnt[ires] += 1
                    voxels.append((ires, W[iz, iy, ix]))
    s2 = np.where(s2 > 1e-10, cnt / np.where(s2 > 0, s2, 1), 0.0)
    if fsc is not None:
        f = np.minimum(np.maximum(fsc, 0.001), 0.999)
        tau2, dvp = T * f / (1 - f) * s2, T * f / (1 - f)
    else:
        dvp = np.zeros(nsh)
    cov, cnt = np.zeros(nsh), np.zeros(nsh)
    for ires, w in voxels:
        invtau2 = 1 / (p**3 * T * tau2[ires]) if tau2[ires] > 0 else 1 / (0.001 * w)
        if fsc is None:
            dvp[ires] += w / invtau2
        cov[ires] += w / invtau2 >= 1
        cnt[ires] += 1
    if fsc is None:
        dvp = np.where(cnt > 0.001, dvp / np.maximum(cnt, 1), 999.0)
        dvp[np.arange(nsh) > grid.r_max] = 0
    return s2, tau2, dvp, np.where(cnt > 0, cov / np.maximum(cnt, 1), 0.0)


def test_ssnr_spectra_and_coverage_follow_relion():
    # oracle: _ssnr_voxel_by_voxel (RELION 3.1.3's updateSSNRarrays in float64): sigma2_recon, tau2, data_vs_prior
    # and the Fourier coverage (model.star's rlnFourierCompleteness) per shell, with a reference tau2 prior
    # (classification; one shell's prior exactly 0 takes RELION's 1/(0.001 W)) and with a gold-standard FSC
    from gerelion_dask.maximization.mstep import ssnr_spectra
    from gerelion_dask.ops.backprojector import BackProjection
    from gerelion_dask.ops.fourier import PaddedGrid

    rng = np.random.default_rng(3)
    grid = PaddedGrid.create(16, r_max=6)
    nsh = 9
    W = rng.uniform(0, 2, grid.shape) * np.exp(-np.arange(grid.shape[2]) / 4.0)  # coverage falls with kx
    bp = BackProjection(np.zeros(grid.shape, complex), W, grid)
    tau2 = np.exp(-np.arange(nsh) / 2.0)
    tau2[3] = 0.0
    for kw in ({"tau2": tau2}, {"fsc": np.linspace(1.0, -0.1, nsh)}):
        got = ssnr_spectra(bp, nsh, 4.0, **kw)
        want = _ssnr_voxel_by_voxel(grid, W, nsh, 4.0, **kw)
        for g, w, name in zip(got, want, ("sigma2_recon", "tau2", "data_vs_prior", "coverage"), strict=True):
            w = w.copy()
            if name in ("tau2", "data_vs_prior"):  # beyond r_max (no voxels) ours writes 0, RELION's FSC branch
                w[np.arange(nsh) > grid.r_max] = 0  # T 0.001/0.999 from the clamped FSC: nothing reads them
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=0, err_msg=name)
        cov = got[3]
        assert 0 < cov[grid.r_max] < cov[1] <= 1 and np.all(cov[grid.r_max + 1:] == 0)


def test_a_coarser_optics_group_adds_nothing_beyond_its_band(xp):
    # oracle: RELION leaves a coarser optics group's pixels beyond its Nyquist out of every sum (its images have none).
    # With PreprocessSettings.band_shells the pool's particles of that group (optics row 1, last shell 6) have
    # images and CTFs 0 beyond shell 6 and are unchanged below; the other group's particles are bit-identical to a run
    # without band limits; and the pool's partial sums beyond shell 6 come from the other group's particles alone
    # (the sums of the pool equal those of its group-0 particles there: back-projection data and weights, noise)
    from gerelion_dask.expectation.preprocess import preprocess_pool
    from gerelion_dask.ops.fourier import shells_2d

    img, parts, A, off, s2, maps = _dataset(24, 0.5, seed=4)
    og = np.r_[np.zeros(12, int), np.ones(12, int)]
    parts = replace(parts, optics_group=og)
    s2 = np.repeat(s2, 2, axis=0)
    model, st = _model_settings(maps, s2)
    pp = st.preprocess
    band = replace(pp, band_shells=(N, 6))
    ix = xp.asarray(img)
    plain, lim = preprocess_pool(ix, parts, pp, s2), preprocess_pool(ix, parts, band, s2)
    beyond = shells_2d(N) > 6
    for f in ("fimg", "fimg_nomask", "ctf"):
        a, b = to_np(getattr(plain, f)), to_np(getattr(lim, f))
        assert np.array_equal(a[:12], b[:12]), f
        assert np.array_equal(a[12:][:, ~beyond], b[12:][:, ~beyond]) and not np.any(b[12:][:, beyond]), f
    assert np.array_equal(to_np(plain.power_highres), to_np(lim.power_highres))  # (current size = N: none beyond)
    stb = replace(st, preprocess=band, n_optics=2)
    model = replace(model, refs=[replace(r, data=xp.asarray(r.data)) for r in model.refs])
    whole, _ = expectation_pool(ix, parts, model, stb)
    first, _ = expectation_pool(ix[:12], parts.take(slice(0, 12)), model, stb)
    second, _ = expectation_pool(ix[12:], parts.take(slice(12, 24)), model, stb)
    w2 = to_np(second.wsum_sigma2)
    assert not np.any(w2[1, 7:]) and np.any(w2[1, 1:7])
    assert np.allclose(to_np(whole.wsum_sigma2), to_np(first.wsum_sigma2) + w2, rtol=1e-9)
