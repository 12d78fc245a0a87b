"""Tests for gerelion_dask.ops.symmetry.  Every assertion names its oracle."""

from __future__ import annotations

import numpy as np
import pytest

from gerelion_dask.conventions import centred_rfftn
from gerelion_dask.errors import InputError
from gerelion_dask.ops.symmetry import (
    direction_operators,
    parse_symmetry_name,
    rotation_about_axis,
    symmetrise_fourier,
    symmetry_operators,
)

# oracle: group theory (Cn n, Dn 2n, T 12, O 24, I 60; a mirror or inversion doubles the order)
GROUP_ORDERS = {
    "C1": 1, "C2": 2, "C4": 4, "C7": 7, "C12": 12, "D1": 2, "D2": 4, "D3": 6, "D7": 14, "D12": 24, "T": 12, "O": 24,
    "I": 60, "I1": 60, "I2": 60, "I3": 60, "I4": 60, "Ci": 2, "Cs": 2, "C4v": 8, "C3h": 6, "S4": 4, "S6": 6,
    "D2v": 8, "D3h": 12, "Td": 24, "Th": 24, "Oh": 48, "Ih": 120, "I1h": 120, "I3h": 120, "I4h": 120,
}  # fmt: skip
PROPER = {"C1", "C2", "C4", "C7", "C12", "D1", "D2", "D3", "D7", "D12", "T", "O", "I", "I1", "I2", "I3", "I4"}

# oracle: the generator axes written in RELION's symmetries.cpp (fold, axis) for each group
RELION_AXES = {
    "T": [(3, (0, 0, 1)), (2, (0.0, 0.816496, 0.577350))],
    "O": [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0, 0, 1))],
    "I2": [(2, (0, 0, 1)), (5, (0.525731114, 0, 0.850650807)), (3, (0, 0.356822076, 0.934172364))],
    "I1": [(2, (1, 0, 0)), (5, (0.85065080702670, 0, -0.5257311142635)), (3, (0.9341723640, 0.3568220765, 0))],
    "I3": [(2, (-0.5257311143, 0, 0.8506508070)), (5, (0, 0, 1)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
    "I4": [(2, (0.5257311143, 0, 0.8506508070)), (5, (0.8944271932547096, 0, 0.4472135909903704)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
}  # fmt: skip


def _contains(ops, m, tol):
    return bool((np.abs(ops - m).reshape(len(ops), -1).max(axis=1) < tol).any())


# ---------------------------------------------------------------------------------------------------- groups


@pytest.mark.parametrize("name", sorted(GROUP_ORDERS))
def test_group_order_closure_and_determinant(name):
    ops = symmetry_operators(name)
    assert ops.shape == (GROUP_ORDERS[name], 3, 3), "group order (group theory)"
    np.testing.assert_array_equal(ops[0], np.eye(3), err_msg="identity first")
    np.testing.assert_allclose(ops @ np.swapaxes(ops, 1, 2), np.broadcast_to(np.eye(3), ops.shape), atol=1e-12)
    # closure: every product is in the group (definition of a group), and the elements are distinct
    prods = (ops[:, None] @ ops[None, :]).reshape(-1, 3, 3)
    diff = np.abs(prods[:, None] - ops[None, :]).reshape(len(prods), len(ops), -1).max(axis=2)
    assert (diff.min(axis=1) < 1e-9).all(), "every product is an element"
    d_self = np.abs(ops[:, None] - ops[None, :]).reshape(len(ops), len(ops), -1).max(axis=2)
    assert (d_self + np.eye(len(ops)) > 1e-3).all(), "no element listed twice"
    det = np.linalg.det(ops)
    if name in PROPER:
        np.testing.assert_allclose(det, 1.0, atol=1e-12, err_msg="proper group: det +1")
    else:
        assert np.isclose(det, -1.0).sum() == len(ops) // 2, "improper group: half the elements have det -1"


@pytest.mark.parametrize("name", sorted(RELION_AXES))
def test_generators_are_relion_axes(name):
    # oracle: RELION symmetries.cpp generator axes (decimals), compared with our exact (golden-ratio) axes
    ops = symmetry_operators(name)
    for fold, axis in RELION_AXES[name]:
        assert _contains(ops, rotation_about_axis(axis, 360.0 / fold), 1e-6), f"{fold}-fold about {axis}"


def test_names_are_case_insensitive_and_aliases():
    # oracle: RELION isSymmetryGroup (upper-cases the name; I = I2, IH = I2H)
    np.testing.assert_array_equal(symmetry_operators("c4"), symmetry_operators("C4"))
    np.testing.assert_array_equal(symmetry_operators("i"), symmetry_operators("I2"))
    np.testing.assert_array_equal(symmetry_operators("ih"), symmetry_operators("I2h"))
    assert parse_symmetry_name("d7") == ("DN", 7)
    assert parse_symmetry_name("C12v") == ("CNV", 12)
    assert parse_symmetry_name("I3H") == ("I3H", 0)


@pytest.mark.parametrize("bad", ["X", "C", "C0", "C123", "Q2", "I5", "I5H", "S3", ""])
def test_unknown_names_raise_input_error(bad):
    # oracle: the project's error contract; RELION rejects these names (I5/I5H: "not implemented", Sn: n even)
    with pytest.raises(InputError):
        symmetry_operators(bad)


def test_unknown_name_message():
    # oracle: the brief's error text
    with pytest.raises(InputError) as err:
        symmetry_operators("X")
    assert str(err.value) == "unknown symmetry group 'X' (use C1, C4, D2, T, O, I, ...)"
    assert err.value.path is None


def test_direction_operators():
    # oracle: RELION HealpixSampling uses L_g R_g^T; L = diag(1, 1, -1) for elements containing the inversion
    for name in ("C4", "D7", "T", "O", "I"):
        np.testing.assert_array_equal(direction_operators(name), np.swapaxes(symmetry_operators(name), 1, 2))
    ci = direction_operators("Ci")
    np.testing.assert_array_equal(ci[1], np.diag([-1.0, -1.0, 1.0]))


def test_operators_returned_are_copies():
    ops = symmetry_operators("O")
    ops[:] = 0
    assert np.abs(symmetry_operators("O")[0] - np.eye(3)).max() == 0


# ---------------------------------------------------------------------------------------------------- symmetrise


N, R_PAD = 16, 12


def _blob_map(seed, n=N):
    """A non-symmetric smooth real map (sum of Gaussians) that is zero near the box edge."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    v = np.zeros((n, n, n))
    for _ in range(6):
        p, w = rng.uniform(-2.5, 2.5, 3), rng.uniform(1.5, 2.0)
        v += rng.uniform(0.5, 1.5) * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * w * w))
    return v * ((x**2 + y**2 + z**2) <= (n // 2 - 2) ** 2)


def _rotate_exact(v, R):
    """V(R r) for a signed-permutation R (exact index mapping), r about voxel N//2."""
    n, c = v.shape[0], v.shape[0] // 2
    z, y, x = np.mgrid[:n, :n, :n] - c
    src = np.einsum("ij,jzyx->izyx", R, np.stack([x, y, z]))
    si = np.rint(src).astype(int)
    assert np.abs(src - si).max() < 1e-9
    return v[(si[2] + c) % n, (si[1] + c) % n, (si[0] + c) % n]


def _rotate_spline(v, R):
    """V(R r) by cubic-spline interpolation (scipy.ndimage.affine_transform), r about voxel N//2."""
    ndimage = pytest.importorskip("scipy.ndimage")
    c = v.shape[0] // 2
    M = R[::-1, ::-1]  # (x, y, z) -> array axes (z, y, x)
    return ndimage.affine_transform(v, M, offset=c - M @ np.full(3, c), order=3, mode="constant")


def _padded_layout(v, pad, r_pad):
    """The projector's padded half-complex layout of map v (zero-padded to pad*N, centred transform)."""
    n = v.shape[0]
    p = pad * n
    big = np.zeros((p, p, p))
    o = (p - n) // 2
    big[o : o + n, o : o + n, o : o + n] = v
    F = centred_rfftn(big)
    k = np.arange(-(r_pad + 1), r_pad + 2) % p
    return F[np.ix_(k, k, np.arange(r_pad + 2))]


def _sphere(r_pad, radius):
    k = np.arange(-(r_pad + 1), r_pad + 2)
    return (k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(r_pad + 2)[None, None, :] ** 2) <= radius**2


def _case(name, rotate, pad=4):
    """(D, W, D_ref, W_ref): transforms of a map / a centrosymmetric map and of their real-space symmetrisations."""
    v = _blob_map(7)
    u = v + _rotate_exact(v, -np.eye(3))  # centrosymmetric -> real transform, used as a weight array
    ops = symmetry_operators(name)
    v_sym = sum(rotate(v, R) for R in ops)
    u_sym = sum(rotate(u, R) for R in ops)
    r_pad = R_PAD
    D, W = _padded_layout(v, pad, r_pad), _padded_layout(u, pad, r_pad).real
    return ops, D, W, _padded_layout(v_sym, pad, r_pad), _padded_layout(u_sym, pad, r_pad).real


@pytest.mark.parametrize("name", ["C4", "D2", "O"])
def test_symmetrise_matches_real_space_oracle_exact(name):
    # oracle: real-space sum over the group with exact 90/180-degree index rotations (these groups map the integer
    # grid onto itself, so trilinear interpolation is exact and the match must be to rounding)
    ops, D, W, D_ref, W_ref = _case(name, _rotate_exact)
    Ds, Ws = symmetrise_fourier(D, W, ops, R_PAD)
    m = _sphere(R_PAD, R_PAD)
    scale = np.abs(D_ref).max()
    np.testing.assert_allclose(Ds[m], D_ref[m], rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(Ws[m], W_ref[m], rtol=0, atol=1e-10 * np.abs(W_ref).max())
    assert np.abs(D * len(ops) - D_ref)[m].max() > 0.1 * scale, "the test map is not already symmetric"


@pytest.mark.parametrize("name", ["T", "I", "D7"])
def test_symmetrise_matches_real_space_oracle_interpolated(name):
    # oracle: real-space sum over the group with scipy.ndimage.affine_transform (cubic spline); in Fourier space
    # trilinear interpolation of a 4x padded transform, compared on low-frequency voxels (|q| <= r_pad / 2)
    ops, D, W, D_ref, W_ref = _case(name, _rotate_spline)
    Ds, Ws = symmetrise_fourier(D, W, ops, R_PAD)
    m = _sphere(R_PAD, R_PAD // 2)
    scale = np.abs(D_ref[m]).max()
    assert np.abs(Ds - D_ref)[m].max() < 0.02 * scale
    assert np.abs(Ws - W_ref)[m].max() < 0.02 * np.abs(W_ref[m]).max()
    assert np.abs(D * len(ops) - D_ref)[m].max() > 0.2 * scale, "unsymmetrised error is much larger"


def test_symmetrise_convention_r_vs_rt():
    # oracle: real-space oracle for a non-group operator list {I, Rz(90)}: D(R q) <-> V(R r), D(R^T q) <-> V(R^T r);
    # and for a whole group both give the same sum (the group contains every R^T)
    v = _blob_map(3)
    R = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    D = _padded_layout(v, 2, 8)
    W = np.ones(D.shape)
    m = _sphere(8, 8)
    got, _ = symmetrise_fourier(D, W, np.stack([np.eye(3), R]), 8)
    np.testing.assert_allclose(got[m], _padded_layout(v + _rotate_exact(v, R), 2, 8)[m], atol=1e-12)
    assert np.abs(got - _padded_layout(v + _rotate_exact(v, R.T), 2, 8))[m].max() > 1e-3
    ops = symmetry_operators("I")
    a, wa = symmetrise_fourier(D, W, ops, 8)
    b, wb = symmetrise_fourier(D, W, np.swapaxes(ops, 1, 2), 8)
    np.testing.assert_allclose(a, b, atol=1e-12)
    np.testing.assert_allclose(wa, wb, atol=1e-12)


def test_symmetrise_leaves_outside_and_inputs_alone():
    # oracle: RELION applyPointGroupSymmetry only touches |q|^2 <= r_pad^2 and starts from a copy
    rng = np.random.default_rng(0)
    shape = (2 * (6 + 1) + 1, 2 * (6 + 1) + 1, 6 + 2)
    D = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    W = rng.uniform(size=shape)
    D0, W0 = D.copy(), W.copy()
    Ds, Ws = symmetrise_fourier(D, W, symmetry_operators("C3"), 6)
    np.testing.assert_array_equal(D, D0)
    np.testing.assert_array_equal(W, W0)
    out = ~_sphere(6, 6)
    np.testing.assert_array_equal(Ds[out], D[out])
    np.testing.assert_array_equal(Ws[out], W[out])
    c1_d, c1_w = symmetrise_fourier(D, W, symmetry_operators("C1"), 6)
    np.testing.assert_array_equal(c1_d, D)
    np.testing.assert_array_equal(c1_w, W)
    # the origin is a fixed point of every rotation: sum of G copies (RELION sums, it does not average)
    assert Ws[7, 7, 0] == pytest.approx(3 * W[7, 7, 0])
    with pytest.raises(ValueError, match="shape"):
        symmetrise_fourier(D, W, symmetry_operators("C3"), 5)


def test_symmetrise_float32_inputs_keep_dtype():
    v = _blob_map(5)
    D = _padded_layout(v, 2, 6).astype(np.complex64)
    W = np.abs(D).astype(np.float32)
    Ds, Ws = symmetrise_fourier(D, W, symmetry_operators("D2"), 6)
    assert Ds.dtype == np.complex64 and Ws.dtype == np.float32
    ref, _ = symmetrise_fourier(D.astype(np.complex128), W.astype(np.float64), symmetry_operators("D2"), 6)
    np.testing.assert_allclose(Ds, ref, atol=1e-5 * np.abs(ref).max())


@pytest.mark.gpu
def test_symmetrise_cupy_matches_numpy():
    # oracle: the NumPy result of the same function (CPU twin)
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception:
        pytest.skip("no CUDA device")
    ops = symmetry_operators("T")
    D = _padded_layout(_blob_map(1), 2, R_PAD)
    W = np.abs(D)
    ref_d, ref_w = symmetrise_fourier(D, W, ops, R_PAD)
    got_d, got_w = symmetrise_fourier(cp.asarray(D), cp.asarray(W), ops, R_PAD)
    assert type(got_d).__module__.startswith("cupy")
    np.testing.assert_allclose(cp.asnumpy(got_d), ref_d, atol=1e-12 * np.abs(ref_d).max())
    np.testing.assert_allclose(cp.asnumpy(got_w), ref_w, atol=1e-12 * np.abs(ref_w).max())


def _parse_symmetry_ops(text: str) -> np.ndarray:
    """The matrices of a ``--print_symmetry_ops`` text (RELION's or ours): the three rows after each ``R(i)=``."""
    lines = text.splitlines()
    mats = []
    for i, line in enumerate(lines):
        if line.strip().startswith("R(") and line.strip().endswith("="):
            mats.append([[float(v) for v in lines[i + k].split()] for k in (1, 2, 3)])
    return np.array(mats)


@pytest.mark.parametrize("sym", ["C4", "D2", "D7", "T", "O", "I2"])
def test_print_symmetry_ops_lists_relions_operators(sym, capsys):
    # oracle: relion_refine 3.1.3 --print_symmetry_ops (where installed; else our own operators) -- the same count
    # and the same set of matrices, identity first, and exit code 0 without any other flag
    import shutil
    import subprocess

    from gerelion_dask.cli import main as cli_main
    from gerelion_dask.ops.symmetry import symmetry_operators

    assert cli_main(["classify", "--print_symmetry_ops", "--sym", sym]) == 0
    ours = _parse_symmetry_ops(capsys.readouterr().out)
    assert np.allclose(ours[0], np.eye(3)) and np.allclose(ours, symmetry_operators(sym), atol=1e-5)
    if shutil.which("relion_refine") is None:
        pytest.skip("Debian relion not installed: RELION's operator list not compared")
    r = subprocess.run(["relion_refine", "--print_symmetry_ops", "--sym", sym], capture_output=True, text=True,
                       timeout=60)
    theirs = _parse_symmetry_ops(r.stdout)
    assert len(theirs) == len(ours)
    # as sets: each of RELION's matrices is one of ours
    d = np.abs(theirs[:, None] - ours[None]).max(axis=(2, 3))
    assert (d.min(axis=1) < 1e-4).all() and len(set(d.argmin(axis=1))) == len(ours)
