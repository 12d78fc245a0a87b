"""Tests for gerelion_dask.ops.sampling.  Every assertion names its oracle."""

from __future__ import annotations

import numpy as np
import pytest

from gerelion_dask.conventions import euler_to_matrix
from gerelion_dask.errors import InputError
from gerelion_dask.ops import sampling as s
from gerelion_dask.ops.symmetry import direction_operators, symmetry_operators

# Oracle: relion_refine 3.1.3 (Debian package, /usr/bin/relion_refine), run on 33 particles of
# ../shared/data/golden/recon_box32_ctf_proj.star with --sym G --healpix_order n; the count is the logged
# "NrOrientations" at oversampling 0 divided by the number of psi angles 6 * 2**n.
RELION_313_DIRECTION_COUNTS = {
    "C1": (48, 192, 768, 3072, 12288), "C2": (None, None, None, 1536, 6176), "C3": (14, 60, 248, 1003, 4086),
    "C4": (12, 48, 192, 768, 3072), "D1": (24, 96, 384), "D2": (12, 48, 192, 768, 3072), "D3": (8, 33, 129),
    "D7": (3, 13, 53, 218, 864), "T": (3, 14, 59, 250, 1009), "O": (1, 7, 32, 126, 507),
    "I": (0, 2, 11, 48, 199), "I1": (1, 3, 12, 49, 199), "I2": (0, 2, 11), "I3": (0, 4, 12, 53, 206),
    "I4": (1, 2, 11, 48, 196), "Ci": (14, 52, 200, 784, 6208), "Cs": (28, 104, 400), "C4v": (9, 30, 108),
    "C4h": (7, 26, 100), "S4": (14, 52, 200), "D2v": (8, 28, 104), "D2h": (8, 28, 104), "D4v": (5, 16, 56),
    "D4h": (5, 16, 56), "Td": (2, 6, 29), "Th": (2, 5, 21), "Oh": (1, 5, 19, 69, 266), "Ih": (0, 1, 7),
    "I1h": (1, 3, 9), "I2h": (0, 1, 7), "I3h": (0, 2, 7), "I4h": (1, 2, 8),
}  # fmt: skip

# Oracle: the direction lists (rlnAngleRot, rlnAngleTilt) in relion_refine 3.1.3's run_it001_sampling.star.
RELION_313_T_ORDER2 = [
    (146.25, 70.528779), (123.75, 70.528779), (135.0, 60.0), (146.25, 48.189685), (112.5, 60.0),
    (123.75, 48.189685), (101.25, 48.189685), (105.0, 35.659088), (135.0, 35.659088), (112.5, 23.556464),
    (135.0, 11.715852), (101.25, 90.0), (112.5, 80.405932), (101.25, 70.528779),
]  # fmt: skip
RELION_313_I_ORDER3 = [
    (75.0, 17.612439), (11.25, 23.556464), (15.0, 17.612439), (45.0, 17.612439), (67.5, 11.715852),
    (22.5, 11.715852), (45.0, 5.850267), (165.0, 17.612439), (157.5, 11.715852), (112.5, 11.715852),
    (135.0, 5.850267),
]  # fmt: skip
RELION_313_C4_ORDER1 = [
    (45.0, 70.528779), (22.5, 48.189685), (45.0, 23.556464), (-22.5, 48.189685), (0.0, 109.471221),
    (22.5, 90.0), (-22.5, 90.0), (0.0, 70.528779), (45.0, 156.443536), (22.5, 131.810315), (45.0, 109.471221),
    (-22.5, 131.810315),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- HEALPix


@pytest.mark.parametrize("order", range(0, 7))
def test_pix2ang_matches_healpy_nested(order):
    hp = pytest.importorskip("healpy")  # oracle: healpy NESTED pix2ang
    theta, phi = s.healpix_pix2ang_nest(order)
    t_ref, p_ref = hp.pix2ang(2**order, np.arange(12 * 4**order), nest=True)
    np.testing.assert_allclose(theta, t_ref, rtol=0, atol=1e-9, err_msg="theta vs healpy.pix2ang(nest=True)")
    np.testing.assert_allclose(phi, p_ref, rtol=0, atol=1e-9, err_msg="phi vs healpy.pix2ang(nest=True)")


def test_pix2ang_subset_and_xyf_round_trip():
    hp = pytest.importorskip("healpy")  # oracle: healpy pix2xyf / NESTED pix2ang on a subset
    order, pix = 5, np.array([0, 1, 777, 5000, 12287])
    ix, iy, face = s.healpix_nest2xyf(pix, order)
    rx, ry, rf = hp.pix2xyf(2**order, pix, nest=True)
    assert (ix == rx).all() and (iy == ry).all() and (face == rf).all(), "nest2xyf vs healpy.pix2xyf"
    assert (s.healpix_xyf2nest(ix, iy, face, order) == pix).all(), "xyf2nest inverts nest2xyf"
    np.testing.assert_allclose(s.healpix_pix2ang_nest(order, pix)[0], hp.pix2ang(32, pix, nest=True)[0], atol=1e-9)


@pytest.mark.parametrize("order", range(0, 9))
def test_max_pixrad(order):
    hp = pytest.importorskip("healpy")  # oracle: healpy.max_pixrad
    assert s.max_pixrad(order) == pytest.approx(hp.max_pixrad(2**order), abs=1e-12)


def test_max_pixrad_algorithm_table():
    # oracle: ALGORITHM.md §3.1 (48.2, 27.6, 14.57, 7.47, 3.78, 1.90 degrees for orders 0..5)
    got = [np.degrees(s.max_pixrad(o)) for o in range(6)]
    np.testing.assert_allclose(got, [48.2, 27.6, 14.57, 7.47, 3.78, 1.90], atol=0.015)


def test_healpix_directions_relion_ranges():
    # oracle: definition (ALGORITHM.md §3.1): rot = phi wrapped to (-180, 180], tilt = acos(z)
    theta, phi = s.healpix_pix2ang_nest(3)
    rot, tilt = s.healpix_directions(3)
    assert rot.min() > -180 and rot.max() <= 180
    np.testing.assert_allclose(np.cos(np.deg2rad(rot)), np.cos(phi), atol=1e-12)
    np.testing.assert_allclose(np.sin(np.deg2rad(rot)), np.sin(phi), atol=1e-12)
    np.testing.assert_allclose(tilt, np.degrees(theta), atol=1e-12)


# ---------------------------------------------------------------------------------------------------- grids


def test_angular_step_and_psi():
    # oracle: ALGORITHM.md §3.1 (order 2 = 15 deg, order 3 = 7.5 deg; n_psi = 6 * 2**n)
    assert [s.angular_step(o) for o in (0, 1, 2, 3, 4)] == [60.0, 30.0, 15.0, 7.5, 3.75]
    psi = s.psi_angles(2)
    assert len(psi) == 24 and psi[0] == 0.0 and psi[-1] == 345.0
    assert len(s.psi_angles(3)) == 48
    # RELION setOrientations: n_psi = ceil(360/step), step re-rounded to 360/n_psi
    assert len(s.psi_angles(0, psi_step=7.0)) == 52
    assert s.psi_angles(0, psi_step=7.0)[1] == pytest.approx(360 / 52)


@pytest.mark.parametrize(("rng", "step", "count"), [(5, 2, 21), (6, 2, 29), (5, 1, 81)])
def test_translation_grid_counts(rng, step, count):
    # oracle: ALGORITHM.md §3.2 and §11 (R=5, S=2 -> 21; R=6, S=2 -> 29; R=5, S=1 -> 81)
    t = s.translation_grid(rng, step)
    assert t.shape == (count, 2)
    assert len(s.translation_grid(rng, step, pixel_size=1.2156)) == count
    assert (np.hypot(t[:, 0], t[:, 1]) <= rng + 1e-9).all(), "inside the disc"
    assert [0.0, 0.0] in t.tolist()


def test_translation_grid_order_x_major():
    # oracle: RELION setTranslations loops x outer, y inner
    t = s.translation_grid(2, 2)
    assert t.tolist() == [[-2, 0], [0, -2], [0, 0], [0, 2], [2, 0]]


# ---------------------------------------------------------------------------------------------------- oversampling


def test_oversampled_children_o1_are_nested_children():
    # oracle: ALGORITHM.md §3.1/§3.3 (NESTED children 4p..4p+3) and healpy ang2pix of the child centres
    hp = pytest.importorskip("healpy")
    pix = np.arange(s.healpix_npix(2))
    children = s.oversampled_direction_pixels(pix, 2, 1)
    assert (children == 4 * pix[:, None] + np.arange(4)).all()
    rot, tilt = s.oversampled_directions(pix, 2, 1)
    parent = hp.ang2pix(4, np.deg2rad(tilt), np.deg2rad(rot), nest=True)
    assert (parent == pix[:, None]).all(), "every child centre lies in its coarse pixel"


def test_oversampled_children_o2_cover_the_nested_range():
    # oracle: NESTED scheme: the order-(n+2) children of p are 16p..16p+15 (listed in RELION's y-outer loop order)
    pix = np.array([0, 5, 191])
    children = s.oversampled_direction_pixels(pix, 2, 2)
    assert children.shape == (3, 16)
    for p, c in zip(pix, children, strict=True):
        assert sorted(c.tolist()) == list(range(16 * p, 16 * p + 16))
    assert children[0, :4].tolist() == [0, 1, 4, 5], "x inner loop: (x, y) = (0,0), (1,0), (2,0), (3,0)"


def test_oversampled_psi_and_translations():
    # oracle: ALGORITHM.md §3.3 (o=1: psi +- step/4; x, y +- S/4; i_over_trans = x_sub * 2 + y_sub)
    np.testing.assert_allclose(s.oversampled_psi([30.0], 15.0, 1), [[26.25, 33.75]])
    np.testing.assert_allclose(s.oversampled_psi([0.0], 8.0, 2), [[-3.0, -1.0, 1.0, 3.0]])
    fine = s.oversampled_translations([[2.0, -2.0]], 2.0, 1)
    np.testing.assert_allclose(fine[0], [[1.5, -2.5], [1.5, -1.5], [2.5, -2.5], [2.5, -1.5]])
    assert s.oversampled_translations(np.zeros((5, 2)), 2.0, 2).shape == (5, 16, 2)


def test_oversampled_sample_count_is_32_for_o1():
    # oracle: ALGORITHM.md §3.3 ("with o = 1 each coarse pair expands to 8 orientations x 4 translations = 32")
    rot, tilt, psi = s.oversampled_orientations(np.array([7, 100]), np.array([0.0, 45.0]), 2, 1)
    trans = s.oversampled_translations(np.zeros((1, 2)), 2.0, 1)
    assert rot.shape == tilt.shape == psi.shape == (2, 8)
    assert rot.shape[-1] * trans.shape[-2] == 32
    # i_over_rot = child_direction * 2 + psi_sub (ALGORITHM.md §4.3)
    c_rot, c_tilt = s.oversampled_directions(np.array([7]), 2, 1)
    np.testing.assert_allclose(rot[0], np.repeat(c_rot[0], 2))
    np.testing.assert_allclose(tilt[0], np.repeat(c_tilt[0], 2))
    np.testing.assert_allclose(psi[0], np.tile([-3.75, 3.75], 4))
    r0, _, p0 = s.oversampled_orientations(np.array([7]), np.array([0.0]), 2, 0)
    assert r0.shape == (1, 1) and p0[0, 0] == 0.0, "o = 0 returns the coarse sample itself"


# ---------------------------------------------------------------------------------------------------- perturbation


def test_perturbation():
    # oracle: ALGORITHM.md §3.4 (r <- wrap(r + U(f/2, f), [-f, f]); A -> A E(d,d,d), d = r * step; t -> t + r S)
    rng = np.random.default_rng(1)
    r, f = 0.0, 0.5
    for _ in range(200):
        r_new = s.next_perturbation(r, f, rng)
        assert -f <= r_new < f
        inc = (r_new - r) % (2 * f)
        assert f / 2 - 1e-12 <= inc <= f + 1e-12, "increment U(f/2, f) modulo the wrap width"
        r = r_new
    assert s.next_perturbation(0.3, 0.0, rng) == 0.0
    A = euler_to_matrix(np.array([10.0, -50.0]), np.array([30.0, 120.0]), np.array([0.0, 200.0]))
    np.testing.assert_allclose(s.perturb_orientations(A, 0.0, 15.0), A, atol=1e-15)
    P = s.perturb_orientations(A, 0.2, 15.0)
    np.testing.assert_allclose(P, A @ euler_to_matrix(3.0, 3.0, 3.0), atol=1e-14)
    np.testing.assert_allclose(P @ np.swapaxes(P, -1, -2), np.broadcast_to(np.eye(3), P.shape), atol=1e-12)
    np.testing.assert_allclose(s.perturb_translations([[1.0, -2.0]], -0.25, 2.0), [[0.5, -2.5]])


# ---------------------------------------------------------------------------------------------------- local searches


def test_local_search_pole_neighbours_c1():
    # oracle: HEALPix geometry: at order 2 the first ring has tilt acos(1 - 1/48) = 11.7 deg (4 pixels), the second
    # tilt acos(1 - 4/48) = 23.6 deg; a prior at the pole with 3 sigma = 20 deg keeps exactly the first ring.
    au = s.asymmetric_unit_directions(2, "C1")
    psi = s.psi_angles(2)
    ls = s.local_search_sparse(0.0, 0.0, 37.0, 20 / 3, 20 / 3, 5.0, au.rot, au.tilt, psi).row(0)
    assert len(ls.dir_indices) == 4
    np.testing.assert_allclose(au.tilt[ls.dir_indices], np.degrees(np.arccos(1 - 1 / 48)))
    np.testing.assert_allclose(ls.dir_prior, 0.25)
    # psi: 30 (7 deg) and 45 (8 deg) are within 3 * 5 deg of 37; Gaussian weights, normalised
    assert psi[ls.psi_indices].tolist() == [30.0, 45.0]
    w = np.exp(-0.5 * (np.array([7.0, 8.0]) / 5.0) ** 2)
    np.testing.assert_allclose(ls.psi_prior, w / w.sum())


def test_local_search_psi_wraps_around_180():
    # oracle: RELION: |dpsi| > 180 -> |dpsi - 360|; prior -170 with 3 sigma = 15: psi 180 (10 deg), 195 (5 deg)
    au = s.asymmetric_unit_directions(1, "C1")
    ls = s.local_search_sparse(0.0, 90.0, -170.0, 10.0, 10.0, 5.0, au.rot, au.tilt, s.psi_angles(2)).row(0)
    assert s.psi_angles(2)[ls.psi_indices].tolist() == [180.0, 195.0]


def test_local_search_uses_closest_symmetry_mate():
    # oracle: C4 symmetry: the prior (rot 100, tilt 60) is the same view as (rot 10, tilt 60)
    au = s.asymmetric_unit_directions(2, "C4")
    psi = s.psi_angles(2)
    ops = direction_operators("C4")
    a = s.local_search_sparse([100.0, 10.0], [60.0, 60.0], [0.0, 0.0], 5.0, 5.0, 5.0, au.rot, au.tilt, psi,
                              ops).dense_directions(len(au.rot))
    np.testing.assert_allclose(a[0], a[1], atol=1e-12)
    assert (a[0] > 0).sum() >= 1
    d = np.degrees(np.arccos(np.clip(s.direction_vectors(au.rot, au.tilt) @ s.direction_vectors(10.0, 60.0), -1, 1)))
    assert ((a[1] > 0) == (d < 15.0)).all(), "kept = inside 3 sigma of the prior (brute force over the list)"


def test_local_search_direction_weights_match_a_particle_by_particle_oracle():
    # oracle: float64, one particle and one direction at a time: the angle to the closest symmetry image of each
    # sampled direction (arccos of the dot products of the rotated unit vectors), Gaussian weights inside 3 sigma,
    # normalised; D3 at order 3 with several particles and widths (one per particle)
    au = s.asymmetric_unit_directions(3, "D3")
    ops = direction_operators("D3")
    rng = np.random.default_rng(5)
    prot, ptilt = rng.uniform(-180, 180, 6), rng.uniform(0, 180, 6)
    sig = np.array([2.0, 4.0, 7.5, 10.0, 15.0, 30.0])
    got = s.local_search_sparse(prot, ptilt, np.zeros(6), sig, sig, sig, au.rot, au.tilt, s.psi_angles(3),
                                ops).dense_directions(len(au.rot))
    dirs = s.direction_vectors(au.rot, au.tilt)
    for p in range(6):
        u = s.direction_vectors(prot[p], ptilt[p])
        d = np.array([min(np.degrees(np.arccos(np.clip(float(u @ (g @ v)), -1.0, 1.0))) for g in ops) for v in dirs])
        w = np.where(d < 3 * sig[p], np.exp(-0.5 * (d / sig[p]) ** 2), 0.0)
        assert w.sum() > 0
        np.testing.assert_allclose(got[p], w / w.sum(), rtol=1e-9, atol=1e-12)


def _dense_local_oracle(prot, ptilt, sig, rot, tilt, ops, cutoff=3.0):
    """float64 reference over the whole list: angle to the closest symmetry image of every direction, Gaussian
    weights inside cutoff * sigma, the nearest direction alone when none is in range, uniform when sigma <= 0."""
    dirs = s.direction_vectors(rot, tilt)
    u = s.direction_vectors(prot, ptilt)
    cos = np.max(np.stack([u @ (dirs @ g.T).T for g in ops]), axis=0)  # (P, N)
    d = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    out = np.zeros(d.shape)
    for p in range(len(d)):
        if sig[p] <= 0:
            out[p] = 1.0 / d.shape[1]
            continue
        w = np.where(d[p] < cutoff * sig[p], np.exp(-0.5 * (d[p] / sig[p]) ** 2), 0.0)
        if not w.any():
            w[np.argmin(d[p])] = 1.0
        out[p] = w / w.sum()
    return out


@pytest.mark.parametrize("sym,order", [("C1", 3), ("C4", 3), ("D3", 2), ("O", 3), ("I", 2)])
def test_sparse_local_search_equals_the_dense_reference(sym, order):
    # oracle: _dense_local_oracle (every direction of the list tested in float64): the neighbourhood query must find
    # every direction in range, also at the poles (tilt 0 / 180), at the azimuth seam (rot 0 / 360), with widths
    # from far below the grid spacing (nearest direction alone) to caps past a hemisphere, and sigma 0 (uniform)
    au = s.asymmetric_unit_directions(order, sym)
    ops = direction_operators(sym)
    rng = np.random.default_rng(11)
    P = 60
    prot = np.r_[rng.uniform(-180, 180, P - 8), [0.0, 0.0, 180.0, 359.999, -0.001, 45.0, 90.0, 10.0]]
    ptilt = np.r_[rng.uniform(0, 180, P - 8), [0.0, 180.0, 1e-7, 90.0, 90.0, 179.9999, 0.05, 90.0]]
    sig = rng.choice([0.05, 0.5, 2.0, 5.0, 12.0, 33.0, 70.0], P)
    sig[[5, 17]] = 0.0
    lp = s.local_search_sparse(prot, ptilt, np.zeros(P), sig, sig, 5.0, au.rot, au.tilt, s.psi_angles(order), ops)
    want = _dense_local_oracle(prot, ptilt, sig, au.rot, au.tilt, ops)
    got = lp.dense_directions(len(au.rot))
    np.testing.assert_array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    for p in range(P):  # each particle's row is ascending
        row = lp.dir_index[lp.dir_ptr[p]:lp.dir_ptr[p + 1]]
        assert np.all(np.diff(row) > 0)


@pytest.mark.parametrize("sym,order", [("C1", 3), ("D3", 2), ("I", 2)])
def test_dense_local_search_equals_the_neighbourhood_query(xp, sym, order, monkeypatch):
    # oracle: the neighbourhood query on NumPy (itself checked against _dense_local_oracle above) -- the dense search
    # a GPU takes for every particle (ops.sampling._dense_directions; on NumPy forced with _WIDE_CAPS 0, on CuPy the
    # GPU path itself, in blocks of a few particles) keeps the same directions with the same weights: on NumPy the
    # same bits (element-by-element cosines), on a GPU within rounding (its GEMM's cosines)
    au = s.asymmetric_unit_directions(order, sym)
    ops = direction_operators(sym)
    rng = np.random.default_rng(12)
    P = 40
    prot = np.r_[rng.uniform(-180, 180, P - 4), [0.0, 0.0, 359.999, 45.0]]
    ptilt = np.r_[rng.uniform(0, 180, P - 4), [0.0, 180.0, 90.0, 179.9999]]
    sig = rng.choice([0.05, 2.0, 5.0, 12.0, 70.0], P)
    sig[[3, 11]] = 0.0
    args = (prot, ptilt, rng.uniform(-180, 180, P), sig, sig, 5.0, au.rot, au.tilt, s.psi_angles(order), ops)
    want = s.local_search_sparse(*args)
    if xp is np:
        monkeypatch.setattr(s, "_WIDE_CAPS", 0.0)
    monkeypatch.setattr(s, "_DENSE_ELEMS", 7 * len(au.rot))  # blocks of 7 particles
    got = s.local_search_sparse(*args, xp=xp)
    for name in ("dir_ptr", "dir_index"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    if xp is np:
        np.testing.assert_array_equal(got.dir_prior, want.dir_prior)
    np.testing.assert_allclose(got.dir_prior, want.dir_prior, rtol=1e-9)
    np.testing.assert_array_equal(got.psi_prior, want.psi_prior)


def test_sparse_local_search_in_blocks_of_particles_gives_the_same_priors(monkeypatch):
    # oracle: the one-block result -- particles taken a few at a time (the candidate budget bounds memory for wide
    # searches) give the same rows, weights and psi priors; an empty pool gives empty rows
    au = s.asymmetric_unit_directions(3, "D2")
    ops = direction_operators("D2")
    rng = np.random.default_rng(4)
    P = 23
    sig = rng.choice([0.0, 0.1, 3.0, 40.0], P)  # none, below the grid spacing, local, past a hemisphere (3 sigma)
    args = (rng.uniform(-180, 180, P), rng.uniform(0, 180, P), rng.uniform(-180, 180, P), sig, sig, 4.0, au.rot,
            au.tilt, s.psi_angles(3), ops)
    whole = s.local_search_sparse(*args)
    monkeypatch.setattr(s, "_CANDIDATE_PAIRS", 3 * len(ops) * len(au.rot))  # blocks of 3 particles
    blocks = s.local_search_sparse(*args)
    for a, b in zip(whole, blocks, strict=True):
        np.testing.assert_array_equal(a, b)
    empty = s.local_search_sparse([], [], [], 2.0, 2.0, 2.0, au.rot, au.tilt, s.psi_angles(3), ops)
    assert empty.dir_ptr.tolist() == [0] and empty.dir_index.size == 0
    assert empty.psi_prior.shape == (0, len(s.psi_angles(3)))


def test_local_search_candidates_cover_every_direction_in_range():
    # oracle: brute force over all directions: the band-and-azimuth query returns a superset of the pairs within
    # the radius, for caps at the poles, across the azimuth seam and larger than a hemisphere
    rng = np.random.default_rng(3)
    rot, tilt = s.healpix_directions(4)
    dirs = s.direction_vectors(rot, tilt)
    q = rng.normal(size=(200, 3))
    q[:4] = [[0, 0, 1], [0, 0, -1], [1, -1e-9, 0], [1e-6, 0, 1]]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    radius = np.exp(rng.uniform(np.log(1e-3), np.log(2.5), 200))
    rows, cols = s._candidate_pairs(q, np.arange(200), radius, s._direction_bands(dirs, float(np.median(radius))))
    got = set(zip(rows.tolist(), cols.tolist(), strict=True))
    ang = np.arccos(np.clip(q @ dirs.T, -1, 1))
    want = set(zip(*np.nonzero(ang < radius[:, None])))
    assert want <= got
    assert len(got) < 8 * len(want) + 50 * 200  # and not the whole sphere for every cap


def test_local_search_falls_back_to_nearest():
    # oracle: RELION: if no direction survives, keep the single nearest one with weight 1
    au = s.asymmetric_unit_directions(2, "C4")
    ls = s.local_search_sparse(100.0, 60.0, 3.0, 1.0, 1.0, 0.1, au.rot, au.tilt, s.psi_angles(2)).row(0)  # C1 ops
    d = s.direction_vectors(au.rot, au.tilt) @ s.direction_vectors(100.0, 60.0)
    assert ls.dir_indices.tolist() == [int(np.argmax(d))] and ls.dir_prior.tolist() == [1.0]
    assert ls.psi_indices.tolist() == [0] and ls.psi_prior.tolist() == [1.0]


def test_local_search_without_sigma_is_uniform():
    # oracle: RELION: no prior (sigma 0) -> every sample, equal weight
    au = s.asymmetric_unit_directions(1, "C1")
    lp = s.local_search_sparse([0.0, 5.0], [0.0, 5.0], [0.0, 5.0], 0.0, 0.0, 0.0, au.rot, au.tilt, s.psi_angles(1))
    dp, pp = lp.dense_directions(len(au.rot)), lp.psi_prior
    np.testing.assert_allclose(dp, 1 / 48)
    np.testing.assert_allclose(pp, 1 / 12)
    with pytest.raises(NotImplementedError):
        s.local_search_sparse(0.0, 0.0, 0.0, 1.0, 0.0, 1.0, au.rot, au.tilt, s.psi_angles(1))


# ---------------------------------------------------------------------------------------------------- asymmetric unit


@pytest.mark.parametrize("group", sorted(RELION_313_DIRECTION_COUNTS))
def test_asymmetric_unit_counts_match_relion(group):
    # oracle: relion_refine 3.1.3 direction counts (RELION_313_DIRECTION_COUNTS above)
    for order, count in enumerate(RELION_313_DIRECTION_COUNTS[group], start=1):
        if count is None:
            continue
        if count == 0:
            with pytest.raises(InputError, match="no HEALPix order-1 direction"):
                s.asymmetric_unit_directions(order, group)
            continue
        assert len(s.asymmetric_unit_directions(order, group).pix) == count, f"{group} order {order}"


@pytest.mark.parametrize(
    ("group", "order", "ref"),
    [("T", 2, RELION_313_T_ORDER2), ("I", 3, RELION_313_I_ORDER3), ("C4", 1, RELION_313_C4_ORDER1)],
)
def test_asymmetric_unit_lists_match_relion(group, order, ref):
    # oracle: relion_refine 3.1.3 run_it001_sampling.star direction lists (same directions, same order)
    au = s.asymmetric_unit_directions(order, group)
    np.testing.assert_allclose(np.stack([au.rot, au.tilt], axis=1), np.array(ref), atol=1e-5)


def test_asymmetric_unit_c1_c4_counts_algorithm_doc():
    # oracle: ALGORITHM.md §3.1 (C1 48/192/768/3072, C4 12/48/192/768 at orders 1-4)
    assert [len(s.asymmetric_unit_directions(n, "C1").pix) for n in (1, 2, 3, 4)] == [48, 192, 768, 3072]
    assert [len(s.asymmetric_unit_directions(n, "c4").pix) for n in (1, 2, 3, 4)] == [12, 48, 192, 768]


@pytest.mark.parametrize("group", ["D2", "D7", "T", "O", "I", "I1", "I3", "I4"])
def test_asymmetric_unit_is_sensible(group):
    # oracle: geometry: about 1/|G| of the sphere, and the symmetry images of the kept directions cover every
    # C1 direction to within 2 pixel radii (RELION's own I and I4 cuts leave holes of up to ~1.7 radii)
    order = 3
    au = s.asymmetric_unit_directions(order, group)
    g = len(symmetry_operators(group))
    assert 0.8 < len(au.pix) * g / s.healpix_npix(order) < 1.1
    ops = direction_operators(group)
    images = np.einsum("gij,nj->gni", ops, s.direction_vectors(au.rot, au.tilt)).reshape(-1, 3)
    all_dirs = s.direction_vectors(*s.healpix_directions(order))
    gap = np.arccos(np.clip((all_dirs @ images.T).max(axis=1), -1, 1)).max()
    assert gap < 2 * s.max_pixrad(order)


def test_asymmetric_unit_unknown_symmetry():
    # oracle: the project's error contract (errors.InputError, one line with a hint)
    with pytest.raises(InputError, match=r"unknown symmetry group 'X7'"):
        s.asymmetric_unit_directions(2, "X7")


@pytest.mark.parametrize("order", [1, 3])
def test_coarse_and_fine_matrices_are_the_perturbed_euler_matrices(order, monkeypatch):
    # oracle: euler_to_matrix(rot, tilt, psi) @ E(d, d, d) (RELION's ZYZ Euler matrix of each coarse orientation,
    # times the perturbation), for the whole grid and for scattered (direction, psi) pairs of a subset of directions;
    # fine orientations from their ids (the id rule written out: fine direction 4 dir_pix + sub_dir of the next
    # order, psi -/+ a quarter step), with the fine directions' frames cached and made per call
    from gerelion_dask.expectation import grid as grid_module
    from gerelion_dask.expectation.grid import OrientationGrid

    dirs = s.asymmetric_unit_directions(order, "C2")
    grid = OrientationGrid(order, dirs.pix, s.angular_step(order), 3.0, 1.0, 0.37)
    rot, tilt = grid.dir_angles
    d = grid.perturb * grid.psi_step
    E = euler_to_matrix(d, d, d)
    di, pi = np.repeat(np.arange(grid.n_dir), grid.n_psi), np.tile(np.arange(grid.n_psi), grid.n_dir)
    np.testing.assert_allclose(grid.coarse_matrices(), euler_to_matrix(rot[di], tilt[di], grid.psi[pi]) @ E,
                               rtol=0, atol=2e-15)
    rng = np.random.default_rng(order)
    di, pi = rng.integers(0, grid.n_dir, (40, 3)), rng.integers(0, grid.n_psi, (40, 3))
    got = grid.coarse_matrices(di, pi)
    assert got.shape == (40, 3, 3, 3)
    np.testing.assert_allclose(got, euler_to_matrix(rot[di], tilt[di], grid.psi[pi]) @ E, rtol=0, atol=2e-15)
    o = rng.integers(0, grid.n_dir * grid.n_psi, 50)
    gid = grid.fine_ids(o)  # (50, 8)
    rot_f, tilt_f = s.healpix_directions(order + 1)
    child, psi_sub = gid // 2 // grid.n_psi, gid % 2
    psi_f = grid.psi[gid // 2 % grid.n_psi] + np.where(psi_sub == 0, -0.25, 0.25) * grid.psi_step
    want = euler_to_matrix(rot_f[child], tilt_f[child], psi_f) @ E
    assert np.array_equal(child // 4, grid.dir_pix[o // grid.n_psi][:, None].repeat(8, 1))
    np.testing.assert_allclose(grid.fine_matrices_from_ids(gid), want, rtol=0, atol=2e-15)
    monkeypatch.setattr(grid_module, "FINE_FRAMES_BYTES", 0)  # too large to keep: made per call
    fresh = OrientationGrid(order, dirs.pix, s.angular_step(order), 3.0, 1.0, 0.37)
    assert fresh._fine_frames is None
    np.testing.assert_allclose(fresh.fine_matrices_from_ids(gid), want, rtol=0, atol=2e-15)


def test_grid_pickles_without_its_cached_tables():
    # oracle: the grid's fields -- a grid that has made its fine-direction frames (3.5 MB at order 5) pickles to a
    # few kB, and the copy equals the original and makes the same matrices
    import pickle

    from gerelion_dask.expectation.grid import OrientationGrid

    grid = OrientationGrid(5, np.arange(12 * 4**5), s.angular_step(5), 3.0, 1.0, 0.2)
    gid = grid.fine_ids(np.array([0, 12345, 2_000_000]))
    A = grid.fine_matrices_from_ids(gid)
    blob = pickle.dumps(grid)
    assert len(blob) < 200_000 and "_fine_frames" in vars(grid)
    copy = pickle.loads(blob)
    assert "_fine_frames" not in vars(copy) and copy.healpix_order == 5 and np.array_equal(copy.dir_pix, grid.dir_pix)
    assert np.array_equal(copy.fine_matrices_from_ids(gid), A)


def test_coarse_matrices_on_the_backend_of_their_indices(xp):
    # oracle: euler_to_matrix(rot, tilt, psi) @ E in float64 NumPy; indices given on the device (CuPy) give device
    # matrices made from device copies of the grid's tables, equal to the host's to rounding
    from gerelion_dask.backend import to_host
    from gerelion_dask.expectation.grid import OrientationGrid

    grid = OrientationGrid(2, np.arange(12 * 16), s.angular_step(2), 3.0, 1.0, 0.29)
    rng = np.random.default_rng(5)
    di, pi = rng.integers(0, grid.n_dir, 300), rng.integers(0, grid.n_psi, 300)
    got = grid.coarse_matrices(xp.asarray(di), xp.asarray(pi))
    assert type(got) is type(xp.asarray(di)) and got.shape == (300, 3, 3)
    rot, tilt = grid.dir_angles
    d = grid.perturb * grid.psi_step
    want = euler_to_matrix(rot[di], tilt[di], grid.psi[pi]) @ euler_to_matrix(d, d, d)
    np.testing.assert_allclose(to_host(got), want, rtol=0, atol=4e-15)


def test_psi_priors_equal_the_dense_formula():
    # oracle: the dense formula, row by row in float64 -- the folded distance |psi - p| (360 - it past 180) to every
    # sample, Gaussian weights inside cutoff * sigma (the nearest sample alone where none is), each row normalised;
    # uniform rows for sigma <= 0. The same operations element by element, so the priors are equal to the bit. Priors
    # at the fold (0, 180, -180, 359.99), outside [0, 360) (-350, 540), widths from far below the step (nearest
    # sample) to windows wider than a half turn
    rng = np.random.default_rng(12)
    psi = s.psi_angles(3)
    P = 80
    p = np.r_[rng.uniform(-180, 180, P - 8), [0.0, 180.0, -180.0, 359.99, -350.0, 540.0, 3.75, 1e-9]]
    sig = rng.choice([0.01, 0.5, 1.9, 5.0, 20.0, 59.0, 61.0, 200.0], P)
    sig[[3, 9]] = 0.0
    got = s.local_search_sparse(np.zeros(P), np.full(P, 90.0), p, 5.0, 5.0, sig, [0.0], [90.0], psi).psi_prior
    want = np.empty((P, len(psi)))
    for i in range(P):
        if sig[i] <= 0:
            want[i] = 1.0 / len(psi)
            continue
        d = np.abs(psi - p[i])
        d = np.where(d > 180.0, np.abs(d - 360.0), d)
        w = np.where(d < 3.0 * sig[i], np.exp(-0.5 * (d / sig[i]) ** 2), 0.0)
        if not w.any():
            w[np.argmin(d)] = 1.0
        want[i] = w / w.sum()
    assert np.array_equal(got, want)
    assert (np.count_nonzero(got, axis=1) == 1).sum() >= 2  # some rows fell back to the nearest sample


def test_limit_tilt_keeps_relions_side_or_top_views():
    # oracle: RELION 3.1's removePointsOutsideLimitedTiltAngles written out per direction (tilt above 90 folded to
    # tilt - 180; a positive limit keeps |tilt| >= limit, a negative one |tilt| <= |limit|), applied after the
    # symmetry reduction; a limit that keeps nothing is a one-line error
    from gerelion_dask.errors import InputError
    from gerelion_dask.ops.sampling import asymmetric_unit_directions, limit_tilt_mask

    for sym in ("C1", "D2"):
        full = asymmetric_unit_directions(2, sym)
        for limit in (50.0, -30.0, -91.0, 90.0):
            want = []
            for t in full.tilt:
                f = t - 180.0 if t > 90.0 else t
                want.append(abs(limit) >= 90.0 or (abs(f) >= abs(limit) if limit > 0 else abs(f) <= abs(limit)))
            got = asymmetric_unit_directions(2, sym, limit)
            assert np.array_equal(got.pix, full.pix[np.array(want)]), (sym, limit)
            assert np.array_equal(limit_tilt_mask(full.tilt, limit), np.array(want))
        assert 0 < len(asymmetric_unit_directions(2, sym, 50.0).pix) < len(full.pix)
    with pytest.raises(InputError, match="--limit_tilt"):
        asymmetric_unit_directions(0, "C1", -1.0)
