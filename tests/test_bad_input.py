"""Bad input on the command line (issue 7): every case ends with exit code 2 and one line on stderr that names the
file or flag at fault and says what is wrong, without a traceback, and leaves the files already in the output folder
as they were.

Each case runs ``python -m gerelion_dask.cli`` in a fresh process on a copy of a tiny simulated data set (12
particles, box 24) whose output folder already holds files of an earlier start (``run_progress.jsonl`` and an
``it000`` map, which a run that went ahead would rewrite).  Oracle: the issue's list of cases and its rule.
NaN or infinite pixels are not an error (the particles are dropped; tests/test_driver.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import TINY_APIX, TINY_BOX, child_env

from gerelion_dask.io.mrc import write_map, write_stack

BOX, APIX = TINY_BOX, TINY_APIX


@pytest.fixture(scope="module")
def dataset(tiny_set):
    return tiny_set.out_dir  # each case works on a copy


def _edit_star(path: Path, old: str, new: str, count: int = 1):
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, count))


def _drop_column(path: Path, label: str):
    """Remove a column of the particles loop (its label line and its field in every row)."""
    lines = path.read_text().splitlines()
    start = lines.index("data_particles")
    labels = [i for i in range(start, len(lines)) if lines[i].startswith("_rln")]
    col = next(k for k, i in enumerate(labels) if lines[i].split()[0] == f"_{label}")
    out = lines[: labels[col]] + lines[labels[col] + 1 : labels[-1] + 1]
    for row in lines[labels[-1] + 1 :]:
        f = row.split()
        out.append("\t".join(f[:col] + f[col + 1 :]) if len(f) == len(labels) else row)
    path.write_text("\n".join(out) + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# each case: (edit(data folder, output folder) -> extra or replaced arguments, what the line must name)
def _truncated_stack(d, o):
    p = d / "particles.mrcs"
    p.write_bytes(p.read_bytes()[: 1024 + 5 * BOX * BOX * 4 + 100])
    return {}, "particles.mrcs"


def _corrupt_stack_header(d, o):
    p = d / "particles.mrcs"
    b = bytearray(p.read_bytes())
    b[0:12] = np.array([-5, 7, 3], np.int32).tobytes()
    p.write_bytes(bytes(b))
    return {}, "particles.mrcs"


def _wrong_mode(d, o):
    p = d / "particles.mrcs"
    b = bytearray(p.read_bytes())
    b[12:16] = np.array([3], np.int32).tobytes()  # complex int16
    p.write_bytes(bytes(b))
    return {}, "particles.mrcs"


def _no_image_name(d, o):
    _drop_column(d / "particles.star", "rlnImageName")
    return {}, "particles.star"


def _no_ctf_columns(d, o):
    _drop_column(d / "particles.star", "rlnDefocusU")
    return {}, "particles.star"


def _set_field(path: Path, image: str, field: int, value: str):
    """Write ``value`` into field ``field`` (0-based) of the particle row whose rlnImageName is ``image``."""
    lines = path.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.split() and line.split()[0] == image)
    parts = lines[i].split()
    parts[field] = value
    lines[i] = "\t".join(parts)
    path.write_text("\n".join(lines) + "\n")


def _nan_defocus(d, o):
    # one NaN defocus made a whole half map zeros before read_particles checked the numeric columns
    _set_field(d / "particles.star", "000003@particles.mrcs", 2, "nan")
    return {}, "particles.star: data_particles row 3: rlnDefocusU is 'nan'"


def _text_in_numeric_column(d, o):
    _set_field(d / "particles.star", "000005@particles.mrcs", 5, "one")
    return {}, "particles.star: data_particles row 5: rlnOpticsGroup is 'one'"


def _zero_pixel_size(d, o):
    _edit_star(d / "particles.star", "\t0.100000\t5.000000\t24\t2", "\t0.100000\t0\t24\t2")
    return {}, "particles.star: data_optics row 1 (optics group 1): rlnImagePixelSize is 0"


def _mask_box(d, o):
    write_map(d / "mask.mrc", np.ones((BOX + 8,) * 3, np.float32), APIX)
    return {"--flatten_solvent": None, "--solvent_mask": d / "mask.mrc"}, "mask.mrc: solvent mask has shape"


def _mask_values(d, o):
    write_map(d / "mask.mrc", np.full((BOX,) * 3, 2.0, np.float32), APIX)  # a map, not a mask
    return {"--flatten_solvent": None, "--solvent_mask": d / "mask.mrc"}, "mask.mrc: solvent mask values"


def _empty_second_mask(d, o):
    write_map(d / "mask2.mrc", np.zeros((BOX,) * 3, np.float32), APIX)  # no region: its average is 0 / 0
    return ({"--flatten_solvent": None, "--solvent_mask2": d / "mask2.mrc"},
            "mask2.mrc: second solvent mask is zero everywhere")


def _unknown_flag(d, o):
    # argparse's usage text (40 lines) used to come before the error
    return {"--bogus_flag": None}, "unrecognized arguments: --bogus_flag"


def _unsupported_relion_flag(d, o):
    return {"--bodies": "bodies.star"}, "--bodies: multi-body refinement is not implemented"


def _skip_align_in_refine(d, o):
    return {"--skip_align": None}, "--skip_align is for classification without alignment"


def _skip_rotate_in_refine(d, o):
    return {"--skip_rotate": None}, "--skip_rotate is for classification with translational searches only"


def _skip_rotate_without_angles(d, o):
    return {"cmd": "classify", "--K": "2", "--skip_rotate": None}, "particles.star: --skip_rotate keeps every particle"


def _skip_align_without_angles(d, o):
    # the simulated particles.star has no angles: there is no pose to keep
    return {"cmd": "classify", "--K": "2", "--skip_align": None}, "particles.star: --skip_align keeps every particle"


def _flag_value_not_a_number(d, o):
    return {"--healpix_order": "two"}, "argument --healpix_order: invalid int value: 'two'"


def _index_beyond_stack(d, o):
    _edit_star(d / "particles.star", "000012@particles.mrcs", "000099@particles.mrcs")
    return {}, "particles.mrcs"


def _stack_missing(d, o):
    (d / "particles.mrcs").unlink()
    return {}, "particles.mrcs"


def _non_square(d, o):
    write_stack(d / "particles.mrcs", np.zeros((12, BOX, BOX + 2), np.float32), APIX)
    return {}, "particles.mrcs"


def _odd_box(d, o):
    write_stack(d / "particles.mrcs", np.zeros((12, BOX + 1, BOX + 1), np.float32), APIX)
    _edit_star(d / "particles.star", "5.000000\t24\t2", "5.000000\t25\t2")
    return {}, "particles.star"


def _empty_star_file(d, o):
    (d / "particles.star").write_text("")
    return {}, "particles.star"


def _star_without_particles(d, o):
    text = (d / "particles.star").read_text()
    rows = [ln for ln in text.splitlines() if "@particles.mrcs" not in ln]
    (d / "particles.star").write_text("\n".join(rows) + "\n")
    return {}, "particles.star"


def _particle_image_size(d, o):
    # the optics table's rlnImageSize disagrees with the stack's images (optics groups of other boxes or pixel sizes
    # are fine: they are resampled onto the first group's grid, tests/test_io.py)
    _edit_star(d / "particles.star", "opticsGroup1\t1\t300.000000\t2.700000\t0.100000\t5.000000\t24\t2",
               "opticsGroup1\t1\t300.000000\t2.700000\t0.100000\t5.000000\t26\t2")
    return {}, "particles.star"


def _reference_box(d, o):
    write_map(d / "initial_lp25.mrc", np.zeros((32, 32, 32), np.float32), APIX)
    return {}, "initial_lp25.mrc"


def _reference_pixel_size(d, o):
    vol = mrcfile.read(d / "initial_lp25.mrc")
    write_map(d / "initial_lp25.mrc", vol, 1.02 * APIX)
    return {}, "initial_lp25.mrc"


def _reference_angpix_differs(d, o):
    # RELION's --ref_angpix replaces the header's voxel size, which must then match the particles'
    return {"--ref_angpix": str(1.05 * APIX)}, "initial_lp25.mrc: reference (--ref_angpix) voxel size"


def _sigma_rot_alone(d, o):
    return {"cmd": "classify", "--sigma_rot": "10"}, "--sigma_rot or --sigma_tilt alone"


def _sigma_psi_alone(d, o):
    return {"cmd": "classify", "--sigma_psi": "10"}, "--sigma_psi without --sigma_rot and --sigma_tilt"


def _sgd_flag_family(d, o):
    return {"--sgd_ini_iter": "50"}, "--sgd_ini_iter: initial-model generation by SGD is not implemented"


def _abbreviated_flag(d, o):
    # relion_refine takes no abbreviations (its --tau names a STAR file): neither do we
    return {"--tau2": "3"}, "unrecognized arguments: --tau2"


def _reference_missing(d, o):
    (d / "initial_lp25.mrc").unlink()
    return {}, "initial_lp25.mrc"


def _reference_truncated(d, o):
    p = d / "initial_lp25.mrc"
    p.write_bytes(p.read_bytes()[:3000])
    return {}, "initial_lp25.mrc"


def _reference_nan(d, o):
    vol = mrcfile.read(d / "initial_lp25.mrc").copy()
    vol[3, 4, 5] = np.nan
    with warnings.catch_warnings():  # mrcfile warns about the NaN we put there
        warnings.simplefilter("ignore", RuntimeWarning)
        write_map(d / "initial_lp25.mrc", vol, APIX)
    return {}, "initial_lp25.mrc"


def _all_images_nan(d, o):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        write_stack(d / "particles.mrcs", np.full((12, BOX, BOX), np.nan, np.float32), APIX)
    return {}, "particles.star"


def _output_unwritable(d, o):
    (o.parent / "afile").write_text("not a folder")
    return {"--o": o.parent / "afile" / "run"}, "afile"


def _output_read_only(d, o):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders (the case 'output_unwritable' covers root)")
    ro = o.parent / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return {"--o": ro / "run"}, "ro"


def _output_holds_run(d, o):
    (o / "run_it003_data.star").write_text("data_\n")
    return {}, "run_it003_data.star"


def _k_zero(d, o):
    return {"cmd": "classify", "--K": 0}, "--K"


def _healpix_order_high(d, o):
    return {"--healpix_order": 9}, "--healpix_order"


def _healpix_order_negative(d, o):
    return {"--healpix_order": -1}, "--healpix_order"


def _unknown_symmetry(d, o):
    return {"--sym": "Q7"}, "--sym Q7"


def _negative_offset_range(d, o):
    return {"--offset_range": -2}, "--offset_range"


def _diameter_larger_than_box(d, o):
    return {"--particle_diameter": 10 * BOX * APIX}, "--particle_diameter"


def _auto_refine_without_halves(d, o):
    return {"cmd": "classify", "--auto_refine": None}, "--split_random_halves"


def _scheduler_nobody(d, o):
    addr = f"tcp://127.0.0.1:{_free_port()}"
    return {"--in-process": "drop", "--scheduler-address": addr, "--connect-timeout": 1}, addr


def _scheduler_file_missing(d, o):
    return {"--in-process": "drop", "--scheduler-file": d / "nobody.json"}, "nobody.json"


def _continue_missing(d, o):
    return {"continue": o / "run_it004_optimiser.star"}, "run_it004_optimiser.star"


def _continue_garbled(d, o):
    p = o / "run_it002_optimiser.star"
    p.write_bytes(b"data_optimiser_general\nloop_\n_rlnCurrentIteration #1\n\x00\xff\x13 'unclosed\n")
    return {"continue": p}, "run_it002_optimiser.star"


def _continue_not_optimiser(d, o):
    return {"continue": d / "particles.star"}, "particles.star"


def _continue_checkpoint_garbled(d, o):
    p = o / "run_it002_optimiser.star"
    p.write_text("data_optimiser_general\n\n_rlnCurrentIteration 2\n_rlnGerelionCheckpoint run_it002_checkpoint.npz\n")
    (o / "run_it002_checkpoint.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    return {"continue": p}, "run_it002_checkpoint.npz"


def _missing_required_flags(d, o):
    return {"--ref": "drop"}, "--ref"


CASES = {f.__name__[1:]: f for f in (
    _truncated_stack, _corrupt_stack_header, _wrong_mode, _no_image_name, _no_ctf_columns, _index_beyond_stack,
    _nan_defocus, _text_in_numeric_column, _zero_pixel_size, _mask_box, _mask_values, _empty_second_mask,
    _unknown_flag,
    _unsupported_relion_flag, _flag_value_not_a_number, _skip_align_in_refine, _skip_align_without_angles,
    _skip_rotate_in_refine, _skip_rotate_without_angles,
    _stack_missing, _non_square, _odd_box, _empty_star_file, _star_without_particles, _particle_image_size,
    _reference_box, _reference_pixel_size, _reference_angpix_differs, _sigma_rot_alone, _sigma_psi_alone,
    _sgd_flag_family, _abbreviated_flag,
    _reference_missing, _reference_truncated, _reference_nan, _all_images_nan,
    _output_unwritable, _output_read_only, _output_holds_run, _k_zero, _healpix_order_high, _healpix_order_negative,
    _unknown_symmetry, _negative_offset_range, _diameter_larger_than_box, _auto_refine_without_halves,
    _scheduler_nobody, _scheduler_file_missing, _continue_missing, _continue_garbled, _continue_not_optimiser,
    _continue_checkpoint_garbled, _missing_required_flags)}


def _argv(d: Path, o: Path, change: dict) -> list:
    change = dict(change)
    cmd = change.pop("cmd", "refine")
    if "continue" in change:
        return [cmd, "--continue", str(change.pop("continue")), "--in-process", "--device", "cpu"]
    flags = {"--i": d / "particles.star", "--o": o / "run", "--ref": d / "initial_lp25.mrc", "--ctf": None,
             "--particle_diameter": 0.8 * BOX * APIX, "--healpix_order": 0, "--offset_range": 1,
             "--offset_step": 1, "--auto_iter_max": 2, "--iter": 1, "--random_seed": 1, "--in-process": None,
             "--device": "cpu"}
    flags.update(change)
    out = [cmd]
    for k, v in flags.items():
        if v == "drop":
            continue
        out += [k] if v is None else [k, str(v)]
    return out


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_at_least_twenty_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line_exit_2_nothing_overwritten(dataset, tmp_path, case):
    d, o = tmp_path / "data", tmp_path / "Refine3D"
    shutil.copytree(dataset, d)
    o.mkdir()
    (o / "run_progress.jsonl").write_text('{"iteration": 1}\n')
    write_map(o / "run_it000_half1_class001.mrc", np.ones((BOX,) * 3, np.float32), APIX)
    change, names = CASES[case](d, o)
    before = _snapshot(o)
    env = child_env(OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "gerelion_dask.cli", *_argv(d, o, change)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("gerelion: error: ") and str(names) in lines[0], lines[0]
    assert len(lines[0]) > len("gerelion: error: ") + len(str(names)) + 10  # says what is wrong, not just the name
    assert _snapshot(o) == before  # nothing written over, nothing added
