"""Tests of gerelion_dask.io: STAR, MRC, ParticleSet and the Zarr particle store.

Oracles: round trips (write then read gives back the input), ``mrcfile`` reading the same stack directly, and the
RELION 3.0 -> 3.1 conversion rules of RELION's ``StarConverter`` (pixel size = 10000 * DetectorPixelSize /
Magnification, offsets * pixel size).  Error cases check that an ``InputError`` names the offending file.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from gerelion_dask.errors import InputError
from gerelion_dask.ops.resample import resample_matrix
from gerelion_dask.io import (
    ParticleSet,
    StackReader,
    ZarrParticles,
    import_particles,
    parse_image_names,
    read_map,
    read_particles,
    read_star,
    write_map,
    write_particles,
    write_stack,
    write_star,
)

# ../shared/data beside the checkout (as tests/conftest.py: GERELION_SHARED_DATA may point elsewhere)
SHARED_DATA = Path(
    os.environ.get("GERELION_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
DEV_REFINE = SHARED_DATA / "dev_refine"


# --------------------------------------------------------------------------------------------------- helpers


def _optics(n_groups: int = 1, apix: float = 3.0, box: int | None = 16) -> pd.DataFrame:
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, n_groups + 1)],
            "rlnOpticsGroup": np.arange(1, n_groups + 1),
            "rlnVoltage": 300.0,
            "rlnSphericalAberration": 2.7,
            "rlnAmplitudeContrast": 0.1,
            "rlnImagePixelSize": apix,
        }
    )
    if box is not None:
        optics["rlnImageSize"] = box
        optics["rlnImageDimensionality"] = 2
    return optics


def _particles(n: int, stack: str = "stack.mrcs", groups: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)],
            "rlnMicrographName": [f"{i // 3:04d}" for i in range(n)],  # numeric-looking names must stay strings
            "rlnDefocusU": np.round(rng.uniform(1e4, 3e4, n), 2),
            "rlnDefocusV": np.round(rng.uniform(1e4, 3e4, n), 2),
            "rlnDefocusAngle": rng.uniform(0, 180, n),  # full float64 precision must survive
            "rlnOpticsGroup": (np.arange(n) % groups) + 1,
            "myUnknownFloat": rng.normal(size=n) * 1e-9,
            "myUnknownText": [f"tag {i % 2}" if i % 3 else "plain" for i in range(n)],  # spaces: quoted
        }
    )


def _stack(path: Path, n: int, box: int = 16, dtype=np.float32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        data = rng.integers(0, 1000, size=(n, box, box)).astype(dtype)
    else:
        data = rng.normal(size=(n, box, box)).astype(dtype)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.set_image_stack()
        m.voxel_size = 3.0
    return data


def _dataset(tmp_path: Path, n: int = 10, box: int = 16, dtype=np.float32) -> tuple[Path, np.ndarray]:
    """A STAR file + stack in tmp_path; returns (star path, images on disk)."""
    data = _stack(tmp_path / "stack.mrcs", n, box, dtype)
    star = tmp_path / "particles.star"
    write_particles(_optics(box=box), _particles(n), star)
    return star, data


def _assert_names(err: pytest.ExceptionInfo, *paths: Path) -> None:
    text = str(err.value)
    assert "\n" not in text
    for p in paths:
        assert Path(p).name in text, text


# ------------------------------------------------------------------------------------------------------ STAR


def test_star_round_trip_all_block_kinds(tmp_path):
    general = pd.DataFrame({"rlnReferenceDimensionality": [3], "rlnCurrentResolution": [7.123456789012345],
                            "rlnSomeName": ["a name"]})
    table = pd.DataFrame({"rlnSpectralIndex": [0, 1, 2], "rlnFourierShellCorrelation": [1.0, 0.5, 1e-12],
                          "rlnText": ["x", "", "y z"]})
    path = write_star({"model_general": general, "model_class_1": table}, tmp_path / "m.star",
                      key_value=["model_general"])
    text = path.read_text()
    assert text.count("# version 30001") == 2
    assert "data_model_general\n\n_rlnReferenceDimensionality" in text  # key-value, not loop_
    back = read_star(path)
    assert list(back) == ["model_general", "model_class_1"]
    assert back["model_general"].attrs["star_key_value"] is True
    pd.testing.assert_frame_equal(back["model_general"], general, check_dtype=False)
    pd.testing.assert_frame_equal(back["model_class_1"], table, check_dtype=False)
    # the key-value mark survives a second round trip without key_value=
    again = read_star(write_star(back, tmp_path / "m2.star"))
    assert again["model_general"].attrs.get("star_key_value") is True
    pd.testing.assert_frame_equal(again["model_general"], general, check_dtype=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_star_float_format_and_atomic_replace(tmp_path):
    path = tmp_path / "a.star"
    write_star({"t": pd.DataFrame({"rlnX": [1.0]})}, path)
    write_star({"t": pd.DataFrame({"rlnX": [1 / 3]})}, path, float_format="%.6f")
    assert "0.333333" in path.read_text()
    assert read_star(path)["t"]["rlnX"].iloc[0] == pytest.approx(0.333333)


def test_read_particles_31_round_trip_lossless(tmp_path):
    optics, particles = _optics(2), _particles(25, groups=2)
    path = write_particles(optics, particles, tmp_path / "p.star")
    o1, p1, version = read_particles(path, require_ctf=True)
    assert version == 30001
    pd.testing.assert_frame_equal(p1, particles, check_dtype=False)
    pd.testing.assert_frame_equal(o1, optics, check_dtype=False)
    assert p1["rlnMicrographName"].iloc[0] == "0000"
    o2, p2, _ = read_particles(write_particles(o1, p1, tmp_path / "p2.star"))
    pd.testing.assert_frame_equal(p2, p1)  # exact, dtypes included
    pd.testing.assert_frame_equal(o2, o1)
    assert (tmp_path / "p.star").read_bytes() == (tmp_path / "p2.star").read_bytes()


def _write_relion30(path: Path, n: int) -> pd.DataFrame:
    """A RELION 3.0 particle file: one table, optics per particle, pixel origins; two voltages -> two groups."""
    rng = np.random.default_rng(2)
    table = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1}@stack.mrcs" for i in range(n)],
            "rlnOriginX": rng.normal(size=n).round(3),
            "rlnOriginY": rng.normal(size=n).round(3),
            "rlnDefocusU": 20000.0, "rlnDefocusV": 19000.0, "rlnDefocusAngle": 30.0,
            "rlnVoltage": np.where(np.arange(n) < n // 2, 300.0, 200.0),
            "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1,
            "rlnDetectorPixelSize": 6.0, "rlnMagnification": 20000.0,  # 10000 * 6 / 20000 = 3 Å
            "rlnAngleRot": 10.0, "myExtra": "keep",
        }
    )
    lines = ["", "data_", "", "loop_"] + [f"_{c} #{i}" for i, c in enumerate(table.columns, 1)]
    lines += [" ".join(str(v) for v in row) for row in table.itertuples(index=False)]
    path.write_text("\n".join(lines) + "\n")
    return table


def test_read_particles_relion30_converted(tmp_path):
    table = _write_relion30(tmp_path / "old.star", 8)
    optics, particles, version = read_particles(tmp_path / "old.star", require_ctf=True)
    assert version == 30000
    assert optics["rlnOpticsGroup"].tolist() == [1, 2]
    assert optics["rlnOpticsGroupName"].tolist() == ["opticsGroup1", "opticsGroup2"]
    assert optics["rlnVoltage"].tolist() == [300.0, 200.0]
    np.testing.assert_allclose(optics["rlnImagePixelSize"], [3.0, 3.0])
    assert "rlnMagnification" not in optics and "rlnVoltage" not in particles
    assert particles["rlnOpticsGroup"].tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    np.testing.assert_allclose(particles["rlnOriginXAngst"], table["rlnOriginX"] * 3.0)
    np.testing.assert_allclose(particles["rlnOriginYAngst"], table["rlnOriginY"] * 3.0)
    assert "rlnOriginX" not in particles and particles["myExtra"].tolist() == ["keep"] * 8
    # 3.0 -> 3.1 representation -> written as 3.1 -> read again: identical
    o2, p2, v2 = read_particles(write_particles(optics, particles, tmp_path / "new.star"))
    assert v2 == 30001
    pd.testing.assert_frame_equal(p2, particles)
    pd.testing.assert_frame_equal(o2, optics)
    # as a ParticleSet, rlnImageSize comes from the stack
    data = _stack(tmp_path / "stack.mrcs", 8)
    ps = ParticleSet.from_star(tmp_path / "old.star", require_ctf=True)
    assert ps.optics["rlnImageSize"].tolist() == [16, 16] and ps.box_size == 16 and ps.pixel_size == 3.0
    np.testing.assert_array_equal(ps.read_images([7, 2]), data[[7, 2]])


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_star_handler") is None, reason="RELION binaries not on PATH")
def test_relion30_conversion_matches_relion(tmp_path):
    """Oracle: RELION 3.1's own 3.0 -> 3.1 conversion (relion_star_handler reads and rewrites the file)."""
    _write_relion30(tmp_path / "old.star", 8)
    _stack(tmp_path / "stack.mrcs", 8)  # RELION reads one image header per optics group
    subprocess.run(
        ["relion_star_handler", "--i", "old.star", "--o", "relion.star", "--select", "rlnDefocusU", "--minval", "0"],
        cwd=tmp_path, check=True, capture_output=True,
    )
    ro, rp, _ = read_particles(tmp_path / "relion.star")
    ps = ParticleSet.from_star(tmp_path / "old.star")
    for col in ("rlnOpticsGroup", "rlnOpticsGroupName", "rlnVoltage", "rlnImagePixelSize", "rlnImageSize"):
        assert ps.optics[col].tolist() == ro[col].tolist(), col
    for col in ("rlnOpticsGroup", "rlnImageName"):
        assert ps.metadata[col].tolist() == rp[col].tolist(), col
    for col in ("rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU"):
        np.testing.assert_allclose(ps.metadata[col], rp[col], atol=1e-5)


def test_relion30_image_pixel_size_column(tmp_path):
    path = tmp_path / "old.star"
    path.write_text("data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n_rlnOriginX\n1@s.mrcs 1.5 2.0\n2@s.mrcs 1.5 -1\n")
    optics, particles, _ = read_particles(path)
    assert optics["rlnImagePixelSize"].tolist() == [1.5]
    assert particles["rlnOriginXAngst"].tolist() == [3.0, -1.5]


def _bad_star(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"bad_{kind}.star"
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_text("")
    elif kind == "no_rows":
        write_particles(_optics(), _particles(0), path)
    elif kind == "no_particles_block":
        write_star({"optics": _optics()}, path)
    elif kind == "no_image_name":
        write_particles(_optics(), _particles(3).drop(columns="rlnImageName"), path)
    elif kind == "bad_group":
        p = _particles(3)
        p.loc[1, "rlnOpticsGroup"] = 7
        write_particles(_optics(), p, path)
    elif kind == "garbage":
        path.write_text("data_particles\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n1@a.mrcs 1 2 3 4\n2@a.mrcs\n")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "relion30_no_apix":
        path.write_text("data_\nloop_\n_rlnImageName\n_rlnVoltage\n1@s.mrcs 300\n")
    return path


@pytest.mark.parametrize(
    "kind", ["missing", "empty", "no_rows", "no_particles_block", "no_image_name", "bad_group", "garbage",
             "binary", "relion30_no_apix"],
)
def test_read_particles_errors_name_the_file(tmp_path, kind):
    path = _bad_star(tmp_path, kind)
    with pytest.raises(InputError) as err:
        read_particles(path)
    _assert_names(err, path)


@pytest.mark.parametrize("drop", ["rlnDefocusU", "rlnDefocusAngle", "rlnVoltage", "rlnAmplitudeContrast"])
def test_read_particles_require_ctf(tmp_path, drop):
    optics, particles = _optics(), _particles(3)
    optics, particles = optics.drop(columns=drop, errors="ignore"), particles.drop(columns=drop, errors="ignore")
    path = write_particles(optics, particles, tmp_path / "p.star")
    read_particles(path)  # fine without CTF
    with pytest.raises(InputError, match=drop) as err:
        read_particles(path, require_ctf=True)
    _assert_names(err, path)


# ------------------------------------------------------------------------------------------------------- MRC


def test_map_round_trip(tmp_path):
    vol = np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float64)
    path = write_map(tmp_path / "m.mrc", vol, 1.25)
    back, apix = read_map(path)
    assert back.dtype == np.float32 and back.shape == (8, 9, 10) and apix == pytest.approx(1.25)
    np.testing.assert_array_equal(back, vol.astype(np.float32))
    with mrcfile.open(path) as m:
        assert m.header.mode == 2 and mrcfile.validate(str(path), print_file=io.StringIO())


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int16, np.uint16])
def test_stack_reader_modes(tmp_path, dtype):
    data = _stack(tmp_path / "s.mrcs", 7, dtype=dtype)
    reader = StackReader(tmp_path / "s.mrcs")
    assert reader.shape == (7, 16, 16) and len(reader) == 7 and reader.pixel_size == 3.0
    got = reader.read([6, 0, 3, 3])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, data[[6, 0, 3, 3]].astype(np.float32))
    np.testing.assert_array_equal(reader.read(2), data[2:3].astype(np.float32))
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.read([1]), data[[1]].astype(np.float32))
    reader.close()


def test_write_stack_and_single_image_file(tmp_path):
    imgs = np.random.default_rng(3).normal(size=(3, 8, 8))
    r = StackReader(write_stack(tmp_path / "w.mrcs", imgs, 2.0, dtype=np.float16))
    np.testing.assert_array_equal(r.read([0, 1, 2]), imgs.astype(np.float16).astype(np.float32))
    one = tmp_path / "one.mrc"
    with mrcfile.new(one) as m:
        m.set_data(imgs[0].astype(np.float32))
    single = StackReader(one)
    assert single.shape == (1, 8, 8)
    np.testing.assert_array_equal(single.read([0]), imgs[:1].astype(np.float32))


def _bad_mrc(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"bad_{kind}.mrcs"
    if kind == "missing":
        return path
    if kind == "truncated":
        _stack(path, 5)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) - 16 * 16 * 4 - 100])
    elif kind == "corrupt":
        path.write_bytes(b"not an mrc file at all " * 100)
    elif kind == "short_header":
        path.write_bytes(b"\0" * 100)
    elif kind == "mode":
        with mrcfile.new(path) as m:
            m.set_data(np.zeros((2, 4, 4), np.complex64))
    elif kind == "int8":
        with mrcfile.new(path) as m:
            m.set_data(np.zeros((2, 4, 4), np.int8))
    elif kind == "nonsquare":
        with mrcfile.new(path) as m:
            m.set_data(np.zeros((2, 4, 6), np.float32))
    return path


@pytest.mark.parametrize("kind", ["missing", "truncated", "corrupt", "short_header", "mode", "int8", "nonsquare"])
def test_stack_reader_errors_name_the_file(tmp_path, kind):
    path = _bad_mrc(tmp_path, kind)
    with pytest.raises(InputError) as err:
        StackReader(path)
    _assert_names(err, path)
    expected = {"truncated": "truncated: header says 5 images of 16x16", "mode": "unsupported MRC mode 4",
                "int8": "unsupported MRC mode 0", "nonsquare": "not square", "missing": "not found",
                "corrupt": "corrupt header", "short_header": "corrupt header"}[kind]
    assert expected in str(err.value)


def test_read_map_errors(tmp_path):
    for kind in ("truncated", "corrupt", "mode"):
        path = _bad_mrc(tmp_path, kind)
        with pytest.raises(InputError) as err:
            read_map(path)
        _assert_names(err, path)


def test_stack_index_out_of_range(tmp_path):
    _stack(tmp_path / "s.mrcs", 4)
    reader = StackReader(tmp_path / "s.mrcs")
    for bad in ([4], [-1], [0, 9]):
        with pytest.raises(InputError) as err:
            reader.read(bad)
        _assert_names(err, tmp_path / "s.mrcs")
        assert "holds 4 images" in str(err.value)


# ----------------------------------------------------------------------------------------------- ParticleSet


def test_particle_set_basics(tmp_path):
    star, data = _dataset(tmp_path, n=10)
    ps = ParticleSet.from_star(star, require_ctf=True)
    assert ps.n == 10 and ps.box_size == 16 and ps.pixel_size == 3.0
    assert ps.stack_paths == (tmp_path / "stack.mrcs",)
    np.testing.assert_array_equal(ps.read_images([9, 0, 4]), data[[9, 0, 4]])
    pools = ps.pools(4)
    assert [p.tolist() for p in pools] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    h1, h2 = ps.half_sets()
    assert h1.tolist() == [0, 2, 4, 6, 8] and h2.tolist() == [1, 3, 5, 7, 9]
    r1, r2 = ps.half_sets(seed=5)
    assert len(r1) == len(r2) == 5 and sorted(np.r_[r1, r2].tolist()) == list(range(10))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ps.metadata = None
    clone = pickle.loads(pickle.dumps(ps))  # for Dask: memory maps are dropped and reopened
    np.testing.assert_array_equal(clone.read_images([3]), data[[3]])


def test_particle_set_random_subset_and_multiple_stacks(tmp_path):
    (tmp_path / "sub").mkdir()
    a = _stack(tmp_path / "a.mrcs", 3, seed=1)
    b = _stack(tmp_path / "sub" / "b.mrcs", 2, seed=2)
    particles = pd.DataFrame(
        {"rlnImageName": ["2@sub/b.mrcs", "1@a.mrcs", "3@a.mrcs", "1@sub/b.mrcs"], "rlnOpticsGroup": 1,
         "rlnRandomSubset": [2, 1, 2, 1]}
    )
    star = write_particles(_optics(box=None), particles, tmp_path / "p.star")
    ps = ParticleSet.from_star(star)
    assert ps.optics["rlnImageSize"].tolist() == [16]  # filled from the stacks
    np.testing.assert_array_equal(ps.read_images([0, 1, 2, 3]), np.stack([b[1], a[0], a[2], b[0]]))
    assert [h.tolist() for h in ps.half_sets()] == [[1, 3], [0, 2]]


_MANY_STACKS_CHILD = """
import pickle, resource, sys
import numpy as np
sys.path.insert(0, {tests!r})
from gerelion_dask.io import ParticleSet, import_particles
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
ps = ParticleSet.from_star({star!r})
order = np.random.default_rng(0).permutation(ps.n)  # every pool of reads touches many stacks
got = np.concatenate([ps.read_images(order[i:i + 37]) for i in range(0, ps.n, 37)])
store = import_particles(ps, {out!r}, pool_size=50)
ps2 = pickle.loads(pickle.dumps(ps))  # a set scattered to workers keeps working (and keeps its limit)
again = ps2.read_images(order[::-1])
pickle.dump((order, got, str(store), again), open({res!r}, "wb"))
"""


def test_particle_set_reads_more_stacks_than_open_files_allowed(tmp_path):
    # oracle: the images written to 300 one-micrograph stacks -- RELION's extraction writes one stack per micrograph,
    # and every stack kept mapped holds a file descriptor: with a soft limit of 64 open files, reading every
    # particle in random order, importing them into a store and reading through a pickled copy must still work
    import subprocess
    import sys

    from gerelion_dask.io import ZarrParticles

    n_stacks, per = 300, 3
    data = np.stack([_stack(tmp_path / f"mic{k:04d}.mrcs", per, box=8, seed=k) for k in range(n_stacks)])
    names = [f"{i + 1:06d}@mic{k:04d}.mrcs" for k in range(n_stacks) for i in range(per)]
    star = write_particles(_optics(box=8), pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": 1}),
                           tmp_path / "p.star")
    res = tmp_path / "res.pkl"
    code = _MANY_STACKS_CHILD.format(tests=os.path.dirname(__file__), star=str(star), out=str(tmp_path / "job"),
                                     res=str(res))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    order, got, store, again = pickle.load(open(res, "rb"))
    flat = data.reshape(n_stacks * per, 8, 8)
    np.testing.assert_array_equal(got, flat[order])
    np.testing.assert_array_equal(again, flat[order[::-1]])
    z = ZarrParticles(store)
    np.testing.assert_array_equal(np.concatenate([z.read_pool(i) for i in range(z.n_pools)]), flat)


def test_particle_set_resolves_relative_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "Extract").mkdir()
    (tmp_path / "Select").mkdir()
    data = _stack(tmp_path / "Extract" / "s.mrcs", 3)
    particles = pd.DataFrame({"rlnImageName": ["1@Extract/s.mrcs", "3@Extract/s.mrcs"], "rlnOpticsGroup": 1})
    star = write_particles(_optics(), particles, tmp_path / "Select" / "p.star")
    with pytest.raises(InputError) as err:
        ParticleSet.from_star(star)  # cwd is not the project folder
    _assert_names(err, star, Path("s.mrcs"))
    monkeypatch.chdir(tmp_path)
    ps = ParticleSet.from_star(star)  # as RELION: relative to the project folder
    np.testing.assert_array_equal(ps.read_images([1, 0]), data[[2, 0]])


@pytest.mark.parametrize("kind", ["missing_stack", "index_beyond_stack", "truncated_stack", "box_mismatch"])
def test_particle_set_errors(tmp_path, kind):
    star, _ = _dataset(tmp_path, n=6)
    stack = tmp_path / "stack.mrcs"
    if kind == "missing_stack":
        stack.unlink()
    elif kind == "index_beyond_stack":
        _stack(stack, 4)
    elif kind == "truncated_stack":
        stack.write_bytes(stack.read_bytes()[:-10])
    elif kind == "box_mismatch":
        _stack(stack, 6, box=20)
    with pytest.raises(InputError) as err:
        ParticleSet.from_star(star)
    _assert_names(err, star, stack)


def test_particle_set_mixed_sizes(tmp_path):
    """Optics groups of another box or pixel size are read onto the lowest-numbered group's grid (oracle: a
    same-pixel-size box change is an exact crop; the resampling matrix itself is checked analytically in test_ops);
    groups within 1e-4 of the model's pixel size at its box are read as they are."""
    a = _stack(tmp_path / "a.mrcs", 2, box=16)
    b = _stack(tmp_path / "b.mrcs", 2, box=20, seed=1)
    particles = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@b.mrcs"], "rlnOpticsGroup": [1, 2]})

    def star(sizes, name):
        optics = _optics(2, box=None)
        optics["rlnImagePixelSize"] = sizes
        return ParticleSet.from_star(write_particles(optics, particles, tmp_path / name))

    ps = star([3.0, 3.0], "p.star")  # another box, the same pixel size: the centre 16 x 16 of the 20-px image
    assert ps.box_size == 16 and ps.pixel_size == 3.0 and ps.box_sizes() == {1: 16, 2: 20}
    assert ps.resampled_groups() == {2: (20, 3.0)}
    img = ps.read_images([1, 0])
    assert img.shape == (2, 16, 16)
    np.testing.assert_allclose(img[0], b[1, 2:18, 2:18], atol=1e-5)
    np.testing.assert_array_equal(img[1], a[0])
    ps = star([3.0, 2.5], "q.star")  # finer: resampled, band-limited to the model's Nyquist
    m = resample_matrix(20, 2.5, 16, 3.0)
    np.testing.assert_allclose(ps.read_images([1])[0], m @ b[1].astype(np.float64) @ m.T, atol=1e-5)
    ps = star([3.0, 3.3], "r.star")  # coarser, another box: resampled too; its data end at its Nyquist
    assert ps.resampled_groups() == {2: (20, 3.3)} and ps.band_shells() == {2: int(np.floor(8 * 3.0 / 3.3 - 0.5))}
    m = resample_matrix(20, 3.3, 16, 3.0)
    np.testing.assert_allclose(ps.read_images([1])[0], m @ b[1].astype(np.float64) @ m.T, atol=1e-5)
    b16 = _stack(tmp_path / "b.mrcs", 2, box=16, seed=1)
    ps = star([3.0, 3.0002], "s.star")  # within 1e-4 at the model's box: read as it is
    assert ps.pixel_size == 3.0 and ps.resampled_groups() == {} and ps.band_shells() == {}
    np.testing.assert_array_equal(ps.read_images([1])[0], b16[1])


def test_particle_set_group_with_two_box_sizes(tmp_path):
    _stack(tmp_path / "a.mrcs", 2, box=16)
    _stack(tmp_path / "b.mrcs", 2, box=20)
    particles = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "1@b.mrcs"], "rlnOpticsGroup": [1, 1]})
    star = write_particles(_optics(box=None), particles, tmp_path / "p.star")
    with pytest.raises(InputError, match="mixes box sizes") as err:
        ParticleSet.from_star(star)
    _assert_names(err, star, tmp_path / "a.mrcs", tmp_path / "b.mrcs")


def test_parse_image_names():
    idx, stack = parse_image_names(["000001@a/b.mrcs", "12@c.mrcs", "single.mrc"])
    assert idx.tolist() == [0, 11, 0] and stack.tolist() == ["a/b.mrcs", "c.mrcs", "single.mrc"]
    with pytest.raises(ValueError, match="x@a"):
        parse_image_names(["1@a", "x@a"])


# ----------------------------------------------------------------------------------------------------- Zarr


@pytest.mark.parametrize("compressor", ["blosc", "zstd", None])
def test_zarr_import_and_read_pools(tmp_path, compressor, monkeypatch):
    star, data = _dataset(tmp_path, n=11, dtype=np.float16)
    ps = ParticleSet.from_star(star)
    sizes = []
    original = ParticleSet.read_images
    monkeypatch.setattr(ParticleSet, "read_images", lambda self, rows: sizes.append(len(rows)) or original(self, rows))
    path = import_particles(ps, tmp_path / "out", pool_size=4, compressor=compressor)
    assert path == tmp_path / "out" / "particles.zarr"
    assert max(sizes) <= 4 and sum(sizes) == 11  # read pool by pool, never all at once
    store = ZarrParticles(path)
    assert (store.n, store.pool_size, store.n_pools, store.box_size, store.pixel_size) == (11, 4, 3, 16, 3.0)
    assert store.array.chunks == (4, 16, 16) and store.array.dtype == np.float32
    for i in range(store.n_pools):
        rows = store.pool_rows(i)
        np.testing.assert_array_equal(store.read_pool(i), data[rows].astype(np.float32))
    assert store.read_pool(2).shape == (3, 16, 16)
    pd.testing.assert_frame_equal(store.metadata, ps.metadata)
    pd.testing.assert_frame_equal(store.optics, ps.optics)
    with pytest.raises(InputError) as err:
        store.read_pool(3)
    _assert_names(err, path)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(store)).read_pool(0), data[:4].astype(np.float32))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_import_command_compresses_only_when_asked(tmp_path):
    # oracle: the bytes on disk -- images that were float16 stacks (zero low mantissa bits) take about half with
    # --compress blosc and their full float32 size by default; both read back exactly
    from gerelion_dask.cli import main as cli_main

    star, data = _dataset(tmp_path, n=40, dtype=np.float16)
    sizes = {}
    for flag in ("none", "blosc"):
        out = tmp_path / flag
        args = ["import", "--i", str(star), "--o", str(out), "--pool", "20"] + ([] if flag == "none" else
                                                                              ["--compress", flag])
        assert cli_main(args) == 0
        store = ZarrParticles(out / "particles.zarr")
        assert store.attrs["compressor"] == flag
        np.testing.assert_array_equal(store.read_pool(1), data[20:40].astype(np.float32))
        sizes[flag] = sum(f.stat().st_size for f in (out / "particles.zarr").rglob("*") if f.is_file()
                          and f.name != "zarr.json")
    assert sizes["none"] >= 40 * 16 * 16 * 4
    assert sizes["blosc"] < 0.7 * sizes["none"]


def test_import_that_fails_midway_leaves_no_store_and_stops_reading(tmp_path, monkeypatch):
    # oracle: the failure injected at pool 5 of 40 -- the import raises that error, leaves neither a store nor its
    # temporary folder, and submits no pool beyond its window of 2 x IMPORT_THREADS (queued ones are cancelled)
    from gerelion_dask.io import zarr_store

    star, _ = _dataset(tmp_path, n=80)
    ps = ParticleSet.from_star(star)
    real, reads = ParticleSet.read_images, []

    def failing(self, rows):
        reads.append(int(rows[0]))
        if int(rows[0]) == 10:
            raise InputError(star, "truncated at image 11 (injected)")
        return real(self, rows)

    monkeypatch.setattr(ParticleSet, "read_images", failing)
    with pytest.raises(InputError, match="injected"):
        import_particles(ps, tmp_path / "out", pool_size=2)
    assert not (tmp_path / "out" / "particles.zarr").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []
    assert len(reads) <= 6 + 2 * zarr_store.IMPORT_THREADS, len(reads)  # pools 0-5 and at most the queued ones


def test_zarr_store_errors(tmp_path):
    star, _ = _dataset(tmp_path, n=3)
    ps = ParticleSet.from_star(star)
    path = import_particles(ps, tmp_path / "out", pool_size=2)
    with pytest.raises(InputError, match="already exists") as err:
        import_particles(ps, tmp_path / "out", pool_size=2)
    _assert_names(err, path)
    import_particles(ps, tmp_path / "out", pool_size=3, overwrite=True)
    assert ZarrParticles(path).n_pools == 1
    with pytest.raises(InputError) as err:
        ZarrParticles(tmp_path / "nothing.zarr")
    _assert_names(err, tmp_path / "nothing.zarr")


# ------------------------------------------------------------------------------------- shared reference data


@pytest.mark.skipif(not DEV_REFINE.is_dir(), reason="../shared/data/dev_refine not present")
def test_dev_refine_float16_stack(tmp_path):
    star = DEV_REFINE / "particles.star"
    optics, particles, version = read_particles(star, require_ctf=True)
    assert version == 30001 and len(particles) == 2000 and len(optics) == 1
    ps = ParticleSet.from_star(star, require_ctf=True)
    assert (ps.n, ps.box_size, ps.pixel_size) == (2000, 64, 3.0)
    rows = np.array([0, 1999, 17, 1000, 17])
    with mrcfile.open(DEV_REFINE / "particles.mrcs") as m:
        assert m.data.dtype == np.float16
        expected = m.data[rows].astype(np.float32)
    np.testing.assert_array_equal(ps.read_images(rows), expected)
    # lossless round trip of the real file
    o2, p2, _ = read_particles(write_particles(optics, particles, tmp_path / "copy.star"))
    pd.testing.assert_frame_equal(p2, particles)
    pd.testing.assert_frame_equal(o2, optics)
    # Zarr import of a slice of it (keeps the test fast) equals the stack
    small = ParticleSet(ps.metadata.iloc[:300], ps.optics, star)
    store = ZarrParticles(import_particles(small, tmp_path / "z", pool_size=128))
    assert store.n_pools == 3
    with mrcfile.open(DEV_REFINE / "particles.mrcs") as m:
        np.testing.assert_array_equal(store.read_pool(2), m.data[256:300].astype(np.float32))


def test_coarser_optics_groups_end_at_their_band_with_a_warning(tmp_path):
    # oracle: the band of a group of pixel size a_g on the model's grid (N, a) ends at R = N a / (2 a_g) model
    # pixels; its last shell of data is floor(R - 1/2) (every pixel of it within R): 1.0653 A against 1.06 at box 16
    # gives R = 7.96, shell 7; twice as coarse, R = 4 exactly, shell 3; a finer, equal or within-1e-4 group has
    # none and warns of nothing
    from gerelion_dask.setup_job import band_shells_per_row, coarser_groups_warning

    def star(sizes, boxes=(16, 16)):
        for b in set(boxes):
            _stack(tmp_path / f"s{b}.mrcs", 1, box=b)
        optics = _optics(len(sizes), box=None)
        optics["rlnImagePixelSize"] = sizes
        particles = pd.DataFrame({"rlnImageName": [f"1@s{b}.mrcs" for b in boxes],
                                  "rlnOpticsGroup": np.arange(1, len(sizes) + 1)})
        return ParticleSet.from_star(write_particles(optics, particles, tmp_path / "p.star"))

    ps = star([1.06, 1.0653])
    assert ps.resampled_groups() == {2: (16, 1.0653)} and ps.band_shells() == {2: 7}
    assert band_shells_per_row(ps) == (16, 7)
    msg = coarser_groups_warning(ps)
    assert "optics group 2 (16 px at 1.0653 Å; shells <= 7, 2.42 Å) is coarser" in msg and "only the other" in msg
    ps = star([1.06, 2.12], (16, 8))  # twice as coarse: R = 4 exactly -> shell 3
    assert ps.band_shells() == {2: 3}
    for sizes in ([1.06, 1.06], [1.06, 0.9], [1.06, 1.06 * (1 + 5e-5)]):
        ps = star(sizes)
        assert ps.band_shells() == {} and band_shells_per_row(ps) == () and coarser_groups_warning(ps) == ""


def test_the_normalisation_check_reads_resampled_groups_as_they_are(tmp_path, caplog):
    # oracle: RELION's check (background outside the diameter: |mean / std| <= 0.5, 0.5 <= std <= 2) applies to each
    # group's own images at its own pixel size: white noise of std 1 in a 10-px box read onto a 16-px model box is
    # mostly zeros in the model's background ring (std < 0.5 there), yet it is normalised and is not warned about;
    # the same stack times 3 is, naming its image
    import logging

    from gerelion_dask.setup_job import JobInputs, background_stats, drop_non_finite

    _stack(tmp_path / "a.mrcs", 4, box=16)
    b = _stack(tmp_path / "b.mrcs", 4, box=10, seed=1)
    optics = _optics(2, box=None)
    particles = pd.DataFrame({"rlnImageName": [f"{i}@a.mrcs" for i in (1, 2, 3, 4)] +
                              [f"{i}@b.mrcs" for i in (1, 2, 3, 4)], "rlnOpticsGroup": [1] * 4 + [2] * 4})

    def inputs():
        ps = ParticleSet.from_star(write_particles(optics, particles, tmp_path / "p.star"))
        return JobInputs(ps, [], 16, 3.0, 30.0, np.zeros(8, np.int64), ["g"], np.r_[np.zeros(4), np.ones(4)]
                         .astype(np.int64), None)

    inp = inputs()
    assert inp.particles.resampled_groups() == {2: (10, 3.0)}
    _, s = background_stats(inp.particles.read_images(np.arange(4, 8)), 5)
    assert s.max() < 0.5  # what the model's box shows (the padding's zeros): RELION's test would fail there
    with caplog.at_level(logging.WARNING):
        drop_non_finite(inp)
    assert not [r for r in caplog.records if "not normalised" in r.getMessage()]
    with mrcfile.open(tmp_path / "b.mrcs", "r+") as f:
        f.data[:] = b * 3
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        drop_non_finite(inputs())
    warned = [r.getMessage() for r in caplog.records if "not normalised" in r.getMessage()]
    assert len(warned) == 1 and "1@b.mrcs" in warned[0], warned


def test_dropping_every_particle_of_the_model_group_is_an_error(tmp_path):
    # the model takes the lowest-numbered group's grid; if the non-finite scan drops all of its particles, the grid
    # would silently change under the run: one clear error instead
    from gerelion_dask.setup_job import JobInputs, drop_non_finite

    a = _stack(tmp_path / "a.mrcs", 2, box=16)
    with mrcfile.open(tmp_path / "a.mrcs", "r+") as f:
        f.data[:] = np.where(np.arange(16) == 3, np.nan, a)
    _stack(tmp_path / "b.mrcs", 2, box=20, seed=1)
    optics = _optics(2, box=None)
    optics["rlnImagePixelSize"] = [3.0, 2.5]
    particles = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs", "1@b.mrcs", "2@b.mrcs"],
                              "rlnOpticsGroup": [1, 1, 2, 2]})
    ps = ParticleSet.from_star(write_particles(optics, particles, tmp_path / "p.star"))
    inp = JobInputs(ps, [], 16, 3.0, 30.0, np.zeros(4, np.int64), ["g"], np.array([0, 0, 1, 1]), None)
    with pytest.raises(InputError, match="every particle of optics group 1, whose grid .16 px at 3 Å.") as err:
        drop_non_finite(inp)
    _assert_names(err, tmp_path / "p.star")
