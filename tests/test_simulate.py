"""Tests of gerelion_dask.simulate (small boxes; the whole file runs in a few seconds)."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from scipy.ndimage import map_coordinates

from gerelion_dask.conventions import euler_to_matrix
from gerelion_dask.ops.ctf import CtfParams, ctf_2d
from gerelion_dask.simulate import (
    SimulationSpec,
    default_model_path,
    density_from_atoms,
    hinge_perturb,
    lowpass_map,
    phantom_map,
    read_pdb_atoms,
    simulate_dataset,
)
from gerelion_dask.simulate_cli import simulate_main

OPTICS_COLS = ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration",
               "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"]
PART_COLS = ["rlnImageName", "rlnMicrographName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnOpticsGroup"]
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
POSE_COLS = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber",
             "rlnCtfBfactor"]


@pytest.fixture(scope="module")
def phantoms32():
    return [phantom_map(32, 4.0, "blobs"), phantom_map(32, 4.0, "blobs2")]


# ---------------------------------------------------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------------------------------------------------


def test_pdb_reader_and_density_of_shipped_model():
    coords, z = read_pdb_atoms(default_model_path())
    assert coords.shape == (1656, 3)  # heavy atoms of 1AKE chain A (../shared/data/structures/README.md)
    assert z.sum() == 10935
    n, apix = 48, 2.0
    v = density_from_atoms(coords, z, n, apix)
    assert v.shape == (n, n, n) and v.dtype == np.float64
    assert v.sum() * apix**3 == pytest.approx(z.sum(), rel=1e-9)  # integral = sum of Z
    g = np.arange(n) - n // 2
    m = v.sum()
    centroid = [(v.sum(axis=tuple(a for a in range(3) if a != ax)) * g).sum() / m for ax in range(3)]
    assert np.abs(centroid).max() < 0.02  # voxels
    # the two gridding methods agree; the map is the model's, not a blur of a point
    w = density_from_atoms(coords, z, n, apix, method="grid")
    assert np.abs(w - v).max() < 1e-5 * np.abs(v).max()
    assert v.max() > 10 * abs(v.min())


def test_density_single_atom_is_gaussian():
    """One atom at a voxel centre: value there = Z / (2 pi sigma^2)^1.5 (band limit negligible for a wide atom)."""
    n, apix, B = 32, 1.0, 400.0
    v = density_from_atoms(np.zeros((1, 3)), [6.0], n, apix, bfactor=B, sampling_bfactor=0.0)
    s2 = B / (8 * np.pi**2)
    assert v[16, 16, 16] == pytest.approx(6.0 / (2 * np.pi * s2) ** 1.5, rel=1e-6)
    # offset along x moves the peak along the last axis
    v2 = density_from_atoms(np.array([[3.0, 0.0, 0.0]]), [6.0], n, apix, bfactor=B, centre=(0, 0, 0),
                            sampling_bfactor=0.0)
    assert np.unravel_index(v2.argmax(), v2.shape) == (16, 16, 19)


def test_read_pdb_atoms_rules(tmp_path):
    lines = [
        "ATOM      1  N   MET A   1      11.000  12.000  13.000  1.00 10.00           N",
        "ATOM      2  CA AMET A   1       1.000   2.000   3.000  0.50 10.00           C",
        "ATOM      3  CA BMET A   1       9.000   9.000   9.000  0.50 10.00           C",  # altloc B: skipped
        "ATOM      4  HA  MET A   1       1.000   1.000   1.000  1.00 10.00           H",  # hydrogen
        "ATOM      5  SD  MET A   1       0.000   0.000   0.000  1.00 10.00",  # no element: S from name
        "ATOM      6 HG1  MET A   1       0.000   0.000   0.000  1.00 10.00",  # no element: H -> skipped
        "ATOM      7 1HB  MET A   1       0.000   0.000   0.000  1.00 10.00",  # leading digit: H -> skipped
        "HETATM    8 ZN    ZN A 301       5.000   5.000   5.000  1.00 10.00",  # ion, no element column
        "HETATM    9  O   HOH A 401       7.000   7.000   7.000  1.00 10.00           O",  # water
        "ENDMDL",
        "ATOM     10  C   MET A   1       0.000   0.000   0.000  1.00 10.00           C",  # second model
    ]
    text = "\n".join(lines) + "\n"
    p = tmp_path / "x.pdb"
    p.write_text(text)
    pg = tmp_path / "x.pdb.gz"
    with gzip.open(pg, "wt") as fh:
        fh.write(text)
    for path in (p, pg):
        c, z = read_pdb_atoms(path)
        np.testing.assert_array_equal(z, [7, 6, 16, 30])
        np.testing.assert_allclose(c[0], [11, 12, 13])
        np.testing.assert_allclose(c[3], [5, 5, 5])


def test_phantoms_asymmetric_and_distinct(phantoms32):
    a, b = phantoms32

    def cc(x, y):
        return np.corrcoef(x.ravel(), y.ravel())[0, 1]

    assert a.shape == (32, 32, 32)
    assert cc(a, b) < 0.8
    # no inversion, mirror or 2-fold/4-fold symmetry about the box centre (voxel 16)
    c = np.roll(a, (-16, -16, -16), axis=(0, 1, 2))

    def back(x):
        return np.roll(x, (16, 16, 16), axis=(0, 1, 2))

    inv = back(np.roll(c[::-1, ::-1, ::-1], 1, axis=(0, 1, 2)))
    assert cc(a, inv) < 0.8
    for ax in range(3):
        assert cc(a, back(np.roll(np.flip(c, ax), 1, axis=ax))) < 0.8
        assert cc(a, np.rot90(a, 2, axes=[(0, 1), (1, 2), (0, 2)][ax])) < 0.8
    r = phantom_map(32, 4.0, "random", seed=3)
    assert np.array_equal(r, phantom_map(32, 4.0, "random", seed=3))
    assert not np.array_equal(r, phantom_map(32, 4.0, "random", seed=4))
    with pytest.raises(ValueError):
        phantom_map(32, 4.0, "sphere")


def test_lowpass_and_hinge():
    v = phantom_map(32, 4.0, "blobs")
    lp = lowpass_map(v, 4.0, 32.0, edge_px=2.0)  # shell round(128/32) = 4, edge 3..5
    F = np.fft.fftshift(np.abs(np.fft.fftn(lp)))
    k = np.arange(32) - 16
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    assert F[r > 5.01].max() < 1e-10 * F.max()
    assert lp.sum() == pytest.approx(v.sum())
    coords, z = read_pdb_atoms(default_model_path())
    moved = hinge_perturb(coords, 20.0)
    d = np.linalg.norm(moved - coords, axis=1)
    assert 0.2 < (d > 1e-9).mean() < 0.4 and d.max() > 5.0


@pytest.mark.skipif(not (SHARED / "dev_class" / "truth_adk_closed.mrc").exists(), reason="no ../shared/data")
def test_maps_match_shared_data_recipe():
    """Without the sampling blur our atoms reproduce the shared truth map; lowpass_map its initial references."""
    coords, z = read_pdb_atoms(SHARED / "structures" / "adk_closed_core.pdb")
    ours = density_from_atoms(coords, z, 64, 1.5, bfactor=50.0, centre=(0, 0, 0), sampling_bfactor=0.0)
    ref = mrcfile.read(SHARED / "dev_class" / "truth_adk_closed.mrc").astype(np.float64)
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.999
    assert ours.sum() == pytest.approx(ref.sum(), rel=1e-6)
    truth = mrcfile.read(SHARED / "dev_refine" / "truth_6msm.mrc").astype(np.float64)
    ini = mrcfile.read(SHARED / "dev_refine" / "ini_lp40.mrc").astype(np.float64)
    assert np.abs(lowpass_map(truth, 3.0, 40.0) - ini).max() < 1e-6 * np.abs(ini).max()


# ---------------------------------------------------------------------------------------------------------------------
# data sets
# ---------------------------------------------------------------------------------------------------------------------


def test_odd_box_and_bad_maps_refused(tmp_path, phantoms32):
    with pytest.raises(ValueError, match="even"):
        SimulationSpec(box=33)
    with pytest.raises(ValueError, match="shape"):
        simulate_dataset([phantoms32[0]], SimulationSpec(n_particles=5, box=48, apix=4.0), tmp_path)
    with pytest.raises(ValueError):
        simulate_dataset(phantoms32, SimulationSpec(n_particles=5, box=32, apix=4.0, n_classes=3), tmp_path)


def test_determinism_and_star_files(tmp_path, phantoms32):
    spec = SimulationSpec(n_particles=60, box=32, apix=4.0, snr=0.1, seed=11, particles_per_micrograph=25,
                          class_fractions=(2, 1), batch_size=16)
    p1 = simulate_dataset(phantoms32, spec, tmp_path / "a")
    p2 = simulate_dataset(phantoms32, spec, tmp_path / "b")
    for f1, f2 in zip(p1.all(), p2.all()):
        if f1.name == "params.json":  # holds timings
            continue
        assert f1.read_bytes() == f2.read_bytes(), f1.name
    p3 = simulate_dataset(phantoms32, dataclasses.replace(spec, seed=12), tmp_path / "c")
    assert p3.particles_mrcs.read_bytes() != p1.particles_mrcs.read_bytes()

    names = sorted(f.name for f in p1.all())
    assert names == sorted(["particles.star", "particles.mrcs", "truth.star", "truth_class001.mrc",
                            "truth_class002.mrc", "initial_lp40.mrc", "params.json"])
    assert p1.particles_star.read_text().startswith("# version 30001\n")
    ps = starfile.read(p1.particles_star)
    ts = starfile.read(p1.truth_star)
    assert list(ps["optics"].columns) == OPTICS_COLS
    opt = ps["optics"].iloc[0]
    assert (opt.rlnVoltage, opt.rlnSphericalAberration, opt.rlnAmplitudeContrast) == (300.0, 2.7, 0.1)
    assert (opt.rlnImagePixelSize, opt.rlnImageSize, opt.rlnImageDimensionality) == (4.0, 32, 2)
    parts = ps["particles"]
    assert list(parts.columns) == PART_COLS
    assert len(parts) == 60
    assert parts.rlnImageName.iloc[0] == "000001@particles.mrcs"
    assert parts.rlnImageName.iloc[-1] == "000060@particles.mrcs"
    assert parts.rlnMicrographName.nunique() == 3
    assert parts.rlnDefocusU.between(9000, 31000).all() and (parts.rlnDefocusU >= parts.rlnDefocusV).all()
    truth = ts["particles"]
    assert list(truth.columns) == PART_COLS + POSE_COLS
    assert truth[PART_COLS].equals(parts)
    assert sorted(truth.rlnClassNumber.value_counts().items()) == [(1, 40), (2, 20)]
    assert truth.rlnAngleTilt.between(0, 180).all() and truth.rlnAngleRot.between(-180, 180).all()
    assert (np.hypot(truth.rlnOriginXAngst, truth.rlnOriginYAngst) <= 4 * 4.0 + 1e-6).all()
    assert (truth.rlnCtfBfactor == 100).all()
    for path in (p1.particles_mrcs, *p1.truth_maps, p1.initial_reference):
        with mrcfile.open(path, permissive=False) as m:
            assert m.data.dtype == np.float32
            assert m.voxel_size.x == pytest.approx(4.0)
            assert m.header.nlabl == 0  # no time-stamped label: files are byte-reproducible across runs
    with mrcfile.open(p1.particles_mrcs) as m:
        assert m.data.shape == (60, 32, 32)
        assert float(m.header.dmean) == pytest.approx(float(m.data.mean()), abs=1e-4)
    np.testing.assert_allclose(mrcfile.read(p1.truth_maps[1]), phantoms32[1], rtol=1e-6, atol=1e-6)


def test_background_noise_statistics(tmp_path):
    spec = SimulationSpec(n_particles=200, box=48, apix=3.0, snr=0.05, seed=5)
    p = simulate_dataset([phantom_map(48, 3.0, "blobs")], spec, tmp_path)
    img = mrcfile.read(p.particles_mrcs).astype(np.float64)
    k = np.arange(48) - 24
    outside = np.hypot(k[:, None], k[None, :]) > 0.45 * 48
    bg = img[:, outside]
    assert abs(bg.mean()) < 0.01
    assert abs(bg.std() - 1.0) < 0.02
    assert abs(img.mean()) < 0.05 and abs(img.std() - np.sqrt(1.05)) < 0.02  # whole box: 1 + snr (mean: CTF(0) > 0)


def _realspace_projection(vol, A, P):
    """Oracle: P(x, y) = sum_z V(A^T (x, y, z)) on a P x P image, trilinear in real space (scipy)."""
    n = vol.shape[0]
    g = np.arange(P, dtype=np.float64) - P // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    r = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    m = r @ A  # rows: (A^T r)^T
    coords = np.stack([m[:, 2], m[:, 1], m[:, 0]]) + n // 2
    vals = map_coordinates(vol, coords, order=1, cval=0.0).reshape(P, P, P)
    return vals.sum(axis=0)


def _oracle_image(vol, A, origin_px, ctf: CtfParams, apix, N, P):
    """Real-space projection, translated by -o and CTF-multiplied on the P grid (plain numpy FFTs), central N px."""
    img = _realspace_projection(vol, A, P)
    F = np.fft.fft2(np.roll(img, (-(P // 2), -(P // 2)), axis=(0, 1)))
    kx = np.fft.fftfreq(P)[None, :] * P
    ky = np.fft.fftfreq(P)[:, None] * P
    F *= np.exp(2j * np.pi * (kx * origin_px[0] + ky * origin_px[1]) / P)  # I(x) = P(x + o)
    F *= ctf_2d(ctf, kx, ky, apix, P)
    out = np.roll(np.fft.ifft2(F).real, (P // 2, P // 2), axis=(0, 1))
    c0 = P // 2 - N // 2
    return out[c0:c0 + N, c0:c0 + N]


def _lowpass2(img, kmax):
    n = img.shape[-1]
    k = np.fft.fftfreq(n) * n
    F = np.fft.fft2(img) * (np.hypot(k[:, None], k[None, :]) <= kmax)
    return np.fft.ifft2(F).real


def test_clean_images_match_realspace_projection(tmp_path, phantoms32):
    N, apix = 32, 4.0
    spec = SimulationSpec(n_particles=6, box=N, apix=apix, snr=np.inf, seed=3, shift_sigma_px=3.0, shift_max_px=6.0,
                          defocus_min_um=0.8, defocus_max_um=1.5, ini_lowpass_angst=None)
    p = simulate_dataset(phantoms32, spec, tmp_path)
    imgs = mrcfile.read(p.particles_mrcs).astype(np.float64)
    truth = starfile.read(p.truth_star)["particles"]
    good, transposed, flipped = [], [], []
    for i, row in truth.iterrows():
        vol = phantoms32[int(row.rlnClassNumber) - 1]
        A = euler_to_matrix(row.rlnAngleRot, row.rlnAngleTilt, row.rlnAnglePsi)
        o = np.array([row.rlnOriginXAngst, row.rlnOriginYAngst]) / apix
        ctf = CtfParams(row.rlnDefocusU, row.rlnDefocusV, row.rlnDefocusAngle, 300.0, 2.7, 0.1, 0.0,
                        row.rlnCtfBfactor, 1.0)
        sim = _lowpass2(imgs[i], N / 4)

        def corr(ref):
            return np.corrcoef(sim.ravel(), _lowpass2(ref, N / 4).ravel())[0, 1]

        good.append(corr(_oracle_image(vol, A, o, ctf, apix, N, 2 * N)))
        transposed.append(corr(_oracle_image(vol, A.T, o, ctf, apix, N, 2 * N)))
        flipped.append(corr(_oracle_image(vol, A, -o, ctf, apix, N, 2 * N)))
    assert min(good) > 0.99, good
    assert np.mean(transposed) < 0.9, transposed  # the test can tell the Euler convention apart
    assert np.mean(flipped) < min(good) - 0.05, flipped  # ... and the shift sign


def test_cli(tmp_path, capsys):
    rc = simulate_main(["--o", str(tmp_path / "ph"), "--n", "20", "--box", "32", "--angpix", "4", "--phantom",
                        "--classes", "2", "--seed", "1", "--ini_lowpass", "30"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "particles.star" in out and "initial_lp30.mrc" in out
    assert sorted(starfile.read(tmp_path / "ph" / "truth.star")["particles"].rlnClassNumber.unique()) == [1, 2]
    rc = simulate_main(["--o", str(tmp_path / "pdb"), "--n", "10", "--box", "32", "--angpix", "3", "--snr", "0.2",
                        "--classes", "2"])
    assert rc == 0
    a, b = (mrcfile.read(tmp_path / "pdb" / f"truth_class00{k}.mrc") for k in (1, 2))
    assert 0.3 < np.corrcoef(a.ravel(), b.ravel())[0, 1] < 0.99  # a hinge motion, same frame
