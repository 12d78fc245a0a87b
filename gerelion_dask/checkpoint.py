"""Checkpoints: everything the driver needs to continue a job after iteration NNN (``--continue``).

After each iteration the job writer stores one ``<root>_itNNN_checkpoint.npz`` beside RELION's files, atomically
(temporary name, then ``os.replace``), *before* ``<root>_itNNN_optimiser.star``; the optimiser STAR names it in
``rlnGerelionCheckpoint`` (relative to the optimiser STAR's folder; RELION 3.1 keeps such unknown labels and warns).
So an optimiser STAR that exists always belongs to a complete iteration.

A checkpoint holds the job's settings (with the resolved random seed), the model (maps as float64, all spectra and
priors), the per-particle state (poses, classes, norms, halves, Pmax ...), the schedule (sampling, HEALPix order,
local-search sigmas, convergence counters, current size, perturbation), the original sampling, the iteration records,
whether the last iteration was the final one (then also the unfiltered half maps).  Per-iteration randomness is
derived from (seed, iteration), so no generator state needs saving.  The arrays are stored exactly (NumPy ``.npy``
inside an uncompressed zip); every other value as JSON, whose floats round-trip exactly; NumPy scalars keep their
type.  No pickle: loading runs no code from the file.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import numpy as np

from .backend import to_host
from .errors import InputError
from .io._atomic import atomic_path

__all__ = ["Checkpoint", "checkpoint_path", "save_checkpoint", "load_checkpoint", "checkpoint_for_optimiser",
           "CHECKPOINT_LABEL"]

FORMAT = "gerelion_dask checkpoint"
VERSION = 2  # 2: the model's other parameters per half set; version 1 (one shared copy) is read as both halves'
_PER_HALF_V2 = ("pdf_class", "pdf_direction", "sigma2_noise", "sigma_offset_angst", "avg_norm", "scales", "loglik")
CHECKPOINT_LABEL = "rlnGerelionCheckpoint"
_RETRY = "continue from an earlier iteration's _optimiser.star, or start again"


@dataclass
class Checkpoint:
    iteration: int
    config: object  # JobConfig (random_seed resolved)
    model: object  # Model
    state: object  # ParticleState
    schedule: object  # ScheduleState after the iteration
    original_schedule: object  # ScheduleState before iteration 1 (sampling.star's *Original labels)
    records: list  # IterationRecord of iterations 1..iteration
    final: bool  # the iteration was the last one (joined halves, full size)
    unfil: list | None = None  # unfiltered half maps of the final iteration


def checkpoint_path(root: str, iteration: int) -> str:
    return f"{root}_it{int(iteration):03d}_checkpoint.npz"


def _types() -> dict:
    from .config import JobConfig
    from .driver import IterationRecord
    from .maximization.model import Model
    from .maximization.schedule import ScheduleState
    from .setup_job import ParticleState

    return {t.__name__: t for t in (Checkpoint, JobConfig, Model, ScheduleState, ParticleState, IterationRecord)}


def _pack(obj, arrays: dict):
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.generic):
        key = f"a{len(arrays)}"
        arrays[key] = np.asarray(obj)
        return {"scalar": key}
    if isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, np.ndarray) or hasattr(obj, "__cuda_array_interface__"):
        key = f"a{len(arrays)}"
        arrays[key] = np.ascontiguousarray(to_host(obj))
        return {"array": key}
    if isinstance(obj, (list, tuple)):
        return {"list" if isinstance(obj, list) else "tuple": [_pack(v, arrays) for v in obj]}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("checkpoint dictionaries need string keys")
        return {"dict": {k: _pack(v, arrays) for k, v in obj.items()}}
    if is_dataclass(obj) and not isinstance(obj, type):
        if type(obj).__name__ not in _types():
            raise TypeError(f"{type(obj).__name__} is not a checkpoint type")
        return {"dataclass": type(obj).__name__, "fields": {f.name: _pack(getattr(obj, f.name), arrays)
                                                           for f in fields(obj)}}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _unpack(v, arrays, types):
    if not isinstance(v, dict):
        return v
    if "scalar" in v:
        return arrays[v["scalar"]][()]
    if "array" in v:
        return arrays[v["array"]]
    if "list" in v:
        return [_unpack(x, arrays, types) for x in v["list"]]
    if "tuple" in v:
        return tuple(_unpack(x, arrays, types) for x in v["tuple"])
    if "dict" in v:
        return {k: _unpack(x, arrays, types) for k, x in v["dict"].items()}
    cls = types[v["dataclass"]]
    return cls(**{k: _unpack(x, arrays, types) for k, x in v["fields"].items()})


def save_checkpoint(path: str | os.PathLike, ck: Checkpoint) -> Path:
    """Write ``ck`` to ``path`` atomically (and flushed to disc before the rename)."""
    arrays: dict = {}
    meta = {"format": FORMAT, "version": VERSION, "checkpoint": _pack(ck, arrays)}
    text = json.dumps(meta, allow_nan=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, __meta__=np.array(text), **arrays)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint; a missing, truncated or foreign file is an :class:`InputError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found", _RETRY)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"][()]))
            if meta.get("format") != FORMAT:
                raise ValueError("not a gerelion_dask checkpoint")
            version = meta.get("version")
            if version not in (1, VERSION):
                raise ValueError(f"checkpoint format version {version}, this gerelion reads 1 and {VERSION}")
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
        packed = meta["checkpoint"]
        if version == 1:
            packed = _model_per_half(packed, arrays)
        ck = _unpack(packed, arrays, _types())
        if not isinstance(ck, Checkpoint):
            raise ValueError("no checkpoint record inside")
    except InputError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        msg = " ".join(str(err).split()) or type(err).__name__
        raise InputError(path, f"checkpoint is unreadable ({msg})", _RETRY) from None
    return ck


def _model_per_half(packed: dict, arrays: dict) -> dict:
    """A version-1 checkpoint's model (one copy of the other parameters for both halves, as gerelion wrote them
    then) in version 2's layout: each of those fields repeated for every half set."""
    fields_ = packed["fields"]["model"]["fields"]
    n_halves = len(fields_["maps"]["list"])
    for name in _PER_HALF_V2:
        v = fields_.get(name)
        if v is None:
            continue
        key = f"v1_{name}"
        value = v if not isinstance(v, dict) else arrays[v["array"] if "array" in v else v["scalar"]]
        arrays[key] = np.repeat(np.asarray(value, dtype=np.float64)[None], n_halves, axis=0)
        fields_[name] = {"array": key}
    return packed


def checkpoint_for_optimiser(optimiser_star: str | os.PathLike) -> tuple[Path, Checkpoint]:
    """The checkpoint that ``<root>_itNNN_optimiser.star`` names, loaded and checked against it."""
    from .io.star import read_star

    path = Path(optimiser_star)
    if path.is_file() and not path.name.endswith("_optimiser.star"):
        raise InputError(path, "--continue takes a <root>_itNNN_optimiser.star file")
    try:
        blocks = read_star(path)
    except InputError as e:  # missing or garbled
        raise InputError(e.path, e.problem, "pass the _optimiser.star of the last complete iteration") from None
    tab = blocks.get("optimiser_general")
    if tab is None or len(tab) != 1:
        raise InputError(path, "no optimiser_general block (not an optimiser STAR file)",
                         "pass a <root>_itNNN_optimiser.star written by gerelion")
    row = tab.iloc[0]
    if CHECKPOINT_LABEL not in row.index:
        raise InputError(path, f"has no {CHECKPOINT_LABEL} (written by relion_refine, or by a gerelion without "
                         "checkpoints)", "continue it with relion_refine, or start a new gerelion run")
    ck_path = path.parent / str(row[CHECKPOINT_LABEL])
    ck = load_checkpoint(ck_path)
    if "rlnCurrentIteration" in row.index and int(row["rlnCurrentIteration"]) != ck.iteration:
        raise InputError(ck_path, f"holds iteration {ck.iteration} but {path.name} is iteration "
                         f"{int(row['rlnCurrentIteration'])}", _RETRY)
    return ck_path, ck
