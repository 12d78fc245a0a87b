"""The files a refinement or classification writes, in RELION 3.1 layout (ALGORITHM.md §6.6, §7).

Pure writers: every function takes the state it reports and writes one file atomically through
:mod:`gerelion_dask.io` (``# version 30001`` before every block).  Nothing here computes refinement state.

* :func:`write_model_star` (:func:`model_star_blocks`): ``run_itNNN[_halfH]_model.star``.
* :func:`write_optimiser_star`: ``run_itNNN_optimiser.star`` (one key-value block ``optimiser_general``).
* :func:`write_sampling_star`: ``run_itNNN_sampling.star`` (``sampling_general`` + ``sampling_directions``).
* :func:`angdist_bild`: ``run_itNNN[_halfH]_classKKK_angdist.bild`` for ChimeraX/Chimera.
* :func:`write_data_star`: ``run_itNNN_data.star`` (``data_optics`` + ``data_particles``).
* :func:`output_names`: the file names RELION uses for an iteration.

Conventions taken from RELION 3.1.3 (``MlModel::write``, ``MlOptimiser::write``, ``HealpixSampling::write`` and
``writeBildFileOrientationalDistribution``), with the deviations listed where they occur:

* ``rlnCurrentResolution`` in ``model_general`` is written in **Å** (RELION writes ``1/current_resolution``),
  although the optimiser keeps 1/Å internally (``rlnBestResolutionThusFar`` in optimiser.star stays in 1/Å).
* ``rlnEstimatedResolution`` of a class is ``1/resolution(maxres)`` (Å) where ``maxres`` is the **last** shell
  before ``rlnSsnrMap`` first drops below 1 (RELION ``calculateTotalFourierCoverage``); ``inf`` if shell 0 is
  already below 1.
* ``rlnOffsetRange`` / ``rlnOffsetStep`` in sampling.star are in **Å** since RELION 3.1 (the command line takes
  pixels; RELION multiplies by the pixel size).  ``rlnOffsetStep`` and ``rlnPsiStep`` are the **coarse** steps
  (before adaptive oversampling), as RELION stores them.
* Noise spectra are written per optics group as ``data_model_optics_group_N`` with ``rlnNrOpticsGroups`` in
  ``model_general``: that is RELION **4.0**'s layout (our noise model is per optics group).  RELION 3.1 itself
  writes ``data_model_group_N`` per micrograph group and has no ``rlnNrOpticsGroups`` label (its reader keeps the
  unknown label with a warning).
* ``rlnClassPriorOffsetX/Y`` are written by RELION for 2D references only; pass ``class_prior_offsets=True`` to
  write them (zeros) anyway.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import JobConfig
from .io._atomic import atomic_path
from .io.star import write_particles, write_star
from .maximization.model import Model
from .maximization.schedule import ScheduleState
from .ops.sampling import angular_step as _angular_step
from .ops.sampling import asymmetric_unit_directions

__all__ = [
    "INTEGER_PARTICLE_LABELS",
    "angdist_bild",
    "estimated_resolution",
    "model_star_blocks",
    "output_names",
    "overall_fourier_completeness",
    "write_data_star",
    "write_model_star",
    "write_optimiser_star",
    "write_sampling_star",
]

_KV = "star_key_value"

#: Particle / optics labels that RELION 3.1 types as integers or booleans (written without decimals).
INTEGER_PARTICLE_LABELS = (
    "rlnOpticsGroup",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnClassNumber",
    "rlnRandomSubset",
    "rlnNrOfSignificantSamples",
    "rlnGroupNumber",
    "rlnParticleId",
    "rlnImageId",
    "rlnMicrographId",
    "rlnHelicalTubeID",
    "rlnBeamTiltClass",
    "rlnIsFlip",
    "rlnAnglePsiFlip",
    "rlnCtfDataArePhaseFlipped",
    "rlnCtfDataAreCtfPremultiplied",
)

# RELION 3.0 pixel offsets -> RELION 3.1 Å columns
_PIXEL_OFFSETS = {
    "rlnOriginX": "rlnOriginXAngst",
    "rlnOriginY": "rlnOriginYAngst",
    "rlnOriginZ": "rlnOriginZAngst",
    "rlnOriginXPrior": "rlnOriginXPriorAngst",
    "rlnOriginYPrior": "rlnOriginYPriorAngst",
}


# ------------------------------------------------------------------------------------------------------ helpers


def _key_value(values: Mapping[str, Any]) -> pd.DataFrame:
    """A one-row DataFrame marked as a key-value block (one column per label, its own dtype)."""
    frame = pd.DataFrame({k: pd.Series([_scalar(v)]) for k, v in values.items()})
    frame.attrs[_KV] = True
    return frame


def _scalar(v: Any) -> Any:
    """Plain Python scalars (bool before int: numpy bools stay bools, so they are written 0/1)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if v is None:
        return "None"  # RELION's spelling of an unset file name
    return str(v) if isinstance(v, (os.PathLike,)) else v


def _per_class(values: Any, n_classes: int, name: str) -> np.ndarray:
    a = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if a.size == 1:
        return np.full(n_classes, float(a[0]))
    if a.size != n_classes:
        raise ValueError(f"{name} has {a.size} values for {n_classes} classes")
    return a


def _shell_resolution(n_shells: int, ori_size: int, pixel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """(1/Å, Å) per shell as RELION's getResolution / getResolutionAngstrom (999 Å for shell 0)."""
    idx = np.arange(n_shells, dtype=np.float64)
    inv = idx / (pixel_size * ori_size)
    with np.errstate(divide="ignore"):
        ang = np.where(idx > 0, (pixel_size * ori_size) / np.where(idx > 0, idx, 1.0), 999.0)
    return inv, ang


def _last_shell_above_one(data_vs_prior: np.ndarray) -> int:
    """RELION's ``maxres``: the last shell before data_vs_prior first drops below 1 (0 if shell 0 does)."""
    below = np.flatnonzero(np.asarray(data_vs_prior) < 1.0)
    if below.size == 0:
        return len(data_vs_prior) - 1
    return max(int(below[0]) - 1, 0)


def estimated_resolution(data_vs_prior: np.ndarray, ori_size: int, pixel_size: float) -> float:
    """``rlnEstimatedResolution`` (Å) of one class: ``N a / maxres``, ``inf`` when maxres is 0 (as RELION)."""
    maxres = _last_shell_above_one(data_vs_prior)
    return math.inf if maxres == 0 else ori_size * pixel_size / maxres


def overall_fourier_completeness(completeness: np.ndarray, data_vs_prior: np.ndarray) -> float:
    """``rlnOverallFourierCompleteness``: per-shell completeness averaged over the voxels of the sphere up to maxres.

    As RELION ``calculateTotalFourierCoverage``: voxels ``(k, i, j)`` of the cube ``[-(m-1), m-1]^3`` (m = maxres)
    with ``r = floor(|k|) <= m``, each weighted by ``completeness[r]``.  RELION divides 0 by 0 (writes ``nan``)
    when maxres is 0; we return 0 there.
    """
    m = _last_shell_above_one(data_vs_prior)
    if m <= 0:
        return 0.0
    c = np.arange(-(m - 1), m, dtype=np.float64)
    r = np.floor(np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)).astype(np.int64)
    r = r[r <= m]
    counts = np.bincount(r, minlength=m + 1)
    comp = np.asarray(completeness, dtype=np.float64)[: m + 1]
    return float((counts[: comp.size] * comp).sum() / counts.sum())


# --------------------------------------------------------------------------------------------------- model.star


def model_star_blocks(
    model: Model,
    half: int,
    config: JobConfig,
    *,
    n_groups_names: list[str],
    group_counts: Sequence[int] | np.ndarray,
    ref_image_names: list[str],
    iteration: int,
    orientational_prior_mode: int,
    sigma_prior_rot: float,
    sigma_prior_psi: float,
    sigma_prior_tilt: float | None = None,
    current_size: int | None = None,
    fourier_completeness: np.ndarray | None = None,
    orientability: np.ndarray | None = None,
    class_prior_offsets: bool = False,
) -> dict[str, pd.DataFrame]:
    """The blocks of a RELION 3.1 ``model.star`` for one half (or the classification model), in RELION's order.

    Parameters
    ----------
    model : Model
        Every array is per half (``[half]...``, see :mod:`gerelion_dask.maximization.model`); ``half`` picks which.
    half : int
        0 or 1: which half's model to report (0 for classification and for the joined final ``run_model.star``).
    config : JobConfig
        Supplies the padding factor (``--pad``) and ``--tau2_fudge`` (the model's own value wins if set).
    n_groups_names : list of str
        ``rlnGroupName`` per group (``rlnGroupNumber`` = position + 1).
    group_counts : sequence of int
        ``rlnGroupNrParticles`` per group.
    ref_image_names : list of str
        ``rlnReferenceImage`` per class (e.g. ``Refine3D/job001/run_it003_half1_class001.mrc``).
    iteration : int
        The iteration these files describe.  RELION's model.star carries no iteration number; it is only checked
        (>= 0).
    orientational_prior_mode : int
        0 = no prior (global searches), 1 = Gaussian priors on rot/tilt/psi (local searches).
    sigma_prior_rot, sigma_prior_psi : float
        Standard deviations (degrees) of the local-search priors (0 for global searches).
    sigma_prior_tilt : float, optional
        Defaults to ``sigma_prior_rot`` (RELION keeps them equal).
    current_size : int, optional
        ``rlnCurrentImageSize`` (the E-step window); default the original box.
    fourier_completeness : array (K, N/2+1), optional
        Fraction of voxels per shell with voxel SSNR >= 1 (RELION's ``fourier_coverage_class``).  Default: the
        model's ``fourier_coverage`` (made by each M-step, ``maximization.mstep.ssnr_spectra``); a model from
        before any M-step has none, and RELION's initial model.star then holds zeros: so do we.
    orientability : array (K, N/2+1), optional
        ``rlnSpectralOrientabilityContribution``; RELION writes it (for information only) once accuracies are
        estimated.  Default zeros.
    class_prior_offsets : bool
        Also write ``rlnClassPriorOffsetX/Y`` (0) in ``model_classes``; RELION does so for 2D references only.

    Returns
    -------
    dict of str to pandas.DataFrame
        ``model_general`` (key-value, marked ``attrs["star_key_value"]``), ``model_classes``, ``model_class_K``,
        ``model_groups``, ``model_optics_group_N``, ``model_pdf_orient_class_K``.
    """
    if iteration < 0:
        raise ValueError(f"iteration {iteration} must be >= 0")
    if not 0 <= half < model.n_halves:
        raise ValueError(f"half {half} out of range for a model with {model.n_halves} half set(s)")
    K = model.n_classes
    N = int(model.ori_size)
    apix = float(model.pixel_size)
    if len(ref_image_names) != K:
        raise ValueError(f"{len(ref_image_names)} reference names for {K} classes")
    counts = np.asarray(group_counts, dtype=np.int64).reshape(-1)
    scales = np.asarray(model.scales, dtype=np.float64)[half].reshape(-1)
    if not len(n_groups_names) == counts.size == scales.size:
        raise ValueError(f"{len(n_groups_names)} group names, {counts.size} counts and {scales.size} scales")

    tau2 = np.asarray(model.tau2, dtype=np.float64)[half]
    dvp = np.asarray(model.data_vs_prior, dtype=np.float64)[half]
    s2r = np.asarray(model.sigma2_recon, dtype=np.float64)[half]
    fsc = np.asarray(model.fsc, dtype=np.float64)
    n_sh = tau2.shape[-1]
    if fourier_completeness is None:
        cov = model.fourier_coverage
        completeness = np.zeros((K, n_sh)) if cov is None else np.asarray(cov, dtype=np.float64)[half].reshape(K, n_sh)
    else:
        completeness = np.asarray(fourier_completeness, dtype=np.float64).reshape(K, n_sh)
    orient = np.zeros((K, n_sh)) if orientability is None else np.asarray(orientability, np.float64).reshape(K, n_sh)
    tau2_fudge = float(model.tau2_fudge) if model.tau2_fudge else float(config.tau2_fudge)
    sigma_tilt = sigma_prior_rot if sigma_prior_tilt is None else sigma_prior_tilt
    res_inv = 1.0 / model.current_resolution if model.current_resolution > 0 else math.inf

    blocks: dict[str, pd.DataFrame] = {}
    blocks["model_general"] = _key_value({
        "rlnReferenceDimensionality": 3,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": N,
        "rlnCurrentResolution": res_inv,
        "rlnCurrentImageSize": int(current_size if current_size else N),
        "rlnPaddingFactor": float(config.pad),
        "rlnIsHelix": False,
        "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": apix,
        "rlnNrClasses": K,
        "rlnNrBodies": 1,
        "rlnNrGroups": len(n_groups_names),
        "rlnNrOpticsGroups": int(np.asarray(model.sigma2_noise).shape[1]),
        "rlnTau2FudgeFactor": tau2_fudge,
        "rlnNormCorrectionAverage": float(model.avg_norm[half]),
        "rlnSigmaOffsetsAngst": float(model.sigma_offset_angst[half]),
        "rlnOrientationalPriorMode": int(orientational_prior_mode),
        "rlnSigmaPriorRotAngle": float(sigma_prior_rot),
        "rlnSigmaPriorTiltAngle": float(sigma_tilt),
        "rlnSigmaPriorPsiAngle": float(sigma_prior_psi),
        "rlnLogLikelihood": float(model.loglik[half]),
        "rlnAveragePmax": float(model.ave_pmax),
    })

    classes = {
        "rlnReferenceImage": [str(n) for n in ref_image_names],
        "rlnClassDistribution": _per_class(model.pdf_class[half], K, "pdf_class"),
        "rlnAccuracyRotations": _per_class(model.acc_rot, K, "acc_rot"),
        "rlnAccuracyTranslationsAngst": _per_class(model.acc_trans_angst, K, "acc_trans_angst"),
        "rlnEstimatedResolution": np.array([estimated_resolution(dvp[c], N, apix) for c in range(K)]),
        "rlnOverallFourierCompleteness": np.array(
            [overall_fourier_completeness(completeness[c], dvp[c]) for c in range(K)]),
    }
    if class_prior_offsets:
        classes["rlnClassPriorOffsetX"] = np.zeros(K)
        classes["rlnClassPriorOffsetY"] = np.zeros(K)
    blocks["model_classes"] = pd.DataFrame(classes)

    inv, ang = _shell_resolution(n_sh, N, apix)
    for c in range(K):
        blocks[f"model_class_{c + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": np.arange(n_sh, dtype=np.int64),
            "rlnResolution": inv,
            "rlnAngstromResolution": ang,
            "rlnSsnrMap": dvp[c],
            "rlnGoldStandardFsc": fsc[c] if fsc.ndim == 2 else np.zeros(n_sh),
            "rlnFourierCompleteness": completeness[c],
            "rlnReferenceSigma2": s2r[c],
            "rlnReferenceTau2": tau2[c],
            "rlnSpectralOrientabilityContribution": orient[c],
        })

    blocks["model_groups"] = pd.DataFrame({
        "rlnGroupNumber": np.arange(1, counts.size + 1, dtype=np.int64),
        "rlnGroupName": [str(n) for n in n_groups_names],
        "rlnGroupNrParticles": counts,
        "rlnGroupScaleCorrection": scales,
    })

    noise = np.asarray(model.sigma2_noise, dtype=np.float64)[half]
    for g in range(noise.shape[0]):
        spec = noise[g]
        keep = np.flatnonzero(spec > 0)  # RELION 4.0 skips shells never used (sigma2 <= 0)
        g_inv, _ = _shell_resolution(spec.size, N, apix)
        blocks[f"model_optics_group_{g + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": keep.astype(np.int64),
            "rlnResolution": g_inv[keep],
            "rlnSigma2Noise": spec[keep],
        })

    pdf_dir = np.asarray(model.pdf_direction, dtype=np.float64)[half].reshape(K, -1)
    for c in range(K):
        blocks[f"model_pdf_orient_class_{c + 1}"] = pd.DataFrame({"rlnOrientationDistribution": pdf_dir[c]})
    return blocks


def write_model_star(path: str | os.PathLike, model: Model, half: int, config: JobConfig, **kwargs: Any) -> Path:
    """Write :func:`model_star_blocks` (same arguments) to ``path`` atomically; returns ``path``."""
    blocks = model_star_blocks(model, half, config, **kwargs)
    return write_star(blocks, path, key_value={"model_general"})


# ----------------------------------------------------------------------------------------------- optimiser.star


def write_optimiser_star(
    path: str | os.PathLike,
    *,
    config: JobConfig,
    schedule: ScheduleState,
    iteration: int,
    output_root: str,
    model_star: str,
    model_star2: str | None,
    data_star: str,
    sampling_star: str,
    acc_rot: float,
    acc_trans_angst: float,
    has_converged: bool,
    extra: dict | None = None,
    particle_diameter: float | None = None,
    command_line: str | None = None,
) -> Path:
    """Write ``optimiser.star``: one key-value block ``optimiser_general`` with RELION 3.1.3's labels, in its order.

    Parameters
    ----------
    path : str or os.PathLike
        Output file.
    config : JobConfig
        Flags of the job (``--ctf``, ``--norm``, ``--incr_size`` ...).
    schedule : ScheduleState
        Counters, changes in hidden variables, the high-FSC flag and the best resolution (1/Å).
    iteration : int
        ``rlnCurrentIteration``.
    output_root : str
        ``rlnOutputRootName`` (``--o``, without ``_itNNN``).
    model_star, model_star2 : str
        ``rlnModelStarFile`` and, when ``config.split_random_halves``, ``rlnModelStarFile2`` (None -> ``""``, as RELION
        writes it in the final, joined iteration).  Without split halves ``rlnModelStarFile2`` is not written.
    data_star, sampling_star : str
        ``rlnExperimentalDataStarFile``, ``rlnOrientSamplingStarFile``.
    acc_rot, acc_trans_angst : float
        ``rlnOverallAccuracyRotations`` (deg), ``rlnOverallAccuracyTranslationsAngst`` (Å).
    has_converged : bool
        ``rlnHasConverged``.
    extra : dict, optional
        More labels; a label already present is replaced (values: bool, int, float or str).
    particle_diameter : float, optional
        ``rlnParticleDiameter`` actually used (Å).  Default ``config.particle_diameter``, or -1 if that is 0 (RELION
        writes the resolved value ``(N - maskedge) * a``; pass it here).
    command_line : str, optional
        Written as a ``# `` comment line after a ``# gerelion_dask optimiser`` line, as RELION writes its command line.

    Notes
    -----
    ``--low_resol_join_halves`` <= 0 is written as -1 (RELION's "off").  ``rlnRefsAreCtfCorrected`` is True from
    iteration 1 on with ``--ctf`` (RELION sets it after the first M-step).  ``rlnSmallestChangesClasses`` is an
    integer label in RELION (it rounds the running minimum).  Features we do not have (SGD, helices, masks,
    external reconstruction) are written with RELION's defaults.  RELION keeps ``rlnTau2FudgeFactor`` in
    model.star, not here (add it through ``extra`` if wanted).
    """
    if config.auto_refine:
        nr_iter = int(config.auto_iter_max)
    else:
        nr_iter = int(config.iter)
    if particle_diameter is None:
        particle_diameter = config.particle_diameter if config.particle_diameter > 0 else -1.0
    join = float(config.low_resol_join_halves) if config.low_resol_join_halves > 0 else -1.0
    best_res = schedule.best_resolution if schedule.best_resolution > 0 else 1.0 / 999.0
    refs_ctf_corrected = bool(config.ctf_corrected_ref or (config.ctf and iteration >= 1))

    v: dict[str, Any] = {"rlnOutputRootName": output_root, "rlnModelStarFile": model_star}
    if config.split_random_halves:
        v["rlnModelStarFile2"] = "" if model_star2 is None else model_star2
    v.update({
        "rlnExperimentalDataStarFile": data_star,
        "rlnOrientSamplingStarFile": sampling_star,
        "rlnCurrentIteration": int(iteration),
        "rlnNumberOfIterations": nr_iter,
        "rlnDoSplitRandomHalves": bool(config.split_random_halves),
        "rlnJoinHalvesUntilThisResolution": join,
        "rlnAdaptiveOversampleOrder": int(config.oversampling),
        "rlnAdaptiveOversampleFraction": float(config.adaptive_fraction),
        "rlnRandomSeed": int(config.random_seed),
        "rlnParticleDiameter": float(particle_diameter),
        "rlnWidthMaskEdge": round(config.maskedge),
        "rlnDoZeroMask": bool(config.zero_mask),
        "rlnDoSolventFlattening": bool(config.flatten_solvent),
        "rlnDoSolventFscCorrection": bool(config.solvent_correct_fsc and config.solvent_mask),
        "rlnSolventMaskName": config.solvent_mask or "None",
        "rlnSolventMask2Name": config.solvent_mask2 or "None",
        "rlnBodyStarFile": "None",
        "rlnTauSpectrumName": "None",
        "rlnMaximumCoarseImageSize": int(config.coarse_size),
        "rlnHighresLimitExpectation": float(config.strict_highres_exp) if config.strict_highres_exp > 0 else -1.0,
        "rlnLowresLimitExpectation": float(config.strict_lowres_exp) if config.strict_lowres_exp > 0 else -1.0,
        "rlnIncrementImageSize": int(config.incr_size),
        "rlnDoMapEstimation": True,
        "rlnDoFastSubsetOptimisation": False,
        "rlnDoExternalReconstruct": False,
        "rlnDoStochasticGradientDescent": False,
        "rlnDoStochasticEM": False,
        "rlnSgdInitialIterations": 50,
        "rlnSgdFinalIterations": 50,
        "rlnSgdInBetweenIterations": 200,
        "rlnSgdInitialResolution": 35.0,
        "rlnSgdFinalResolution": 15.0,
        "rlnSgdInitialSubsetSize": 100,
        "rlnSgdFinalSubsetSize": 500,
        "rlnSgdMuFactor": 0.9,
        "rlnSgdSigma2FudgeInitial": 8.0,
        "rlnSgdSigma2FudgeHalflife": -1,
        "rlnSgdSkipAnneal": False,
        "rlnSgdSubsetSize": -1,
        "rlnSgdWriteEverySubset": 1,
        "rlnSgdStepsize": 0.5,
        "rlnDoAutoRefine": bool(config.auto_refine),
        "rlnAutoLocalSearchesHealpixOrder": int(config.auto_local_healpix_order),
        "rlnNumberOfIterWithoutResolutionGain": int(schedule.n_iter_wo_resol_gain),
        "rlnBestResolutionThusFar": float(best_res),
        "rlnNumberOfIterWithoutChangingAssignments": int(schedule.n_iter_wo_large_changes),
        "rlnDoSkipAlign": bool(config.skip_align),
        "rlnDoSkipRotate": bool(config.skip_rotate),
        "rlnOverallAccuracyRotations": float(acc_rot),
        "rlnOverallAccuracyTranslationsAngst": float(acc_trans_angst),
        "rlnChangesOptimalOrientations": float(schedule.changes_orient),
        "rlnChangesOptimalOffsets": float(schedule.changes_offset),
        "rlnChangesOptimalClasses": float(schedule.changes_class),
        "rlnSmallestChangesOrientations": float(schedule.smallest_changes_orient),
        "rlnSmallestChangesOffsets": float(schedule.smallest_changes_offset),
        "rlnSmallestChangesClasses": round(schedule.smallest_changes_class),
        "rlnLocalSymmetryFile": "None",
        "rlnDoHelicalRefine": False,
        "rlnIgnoreHelicalSymmetry": False,
        "rlnFourierMask": "None",
        "rlnHelicalTwistInitial": 0.0,
        "rlnHelicalRiseInitial": 0.0,
        "rlnHelicalCentralProportion": 0.3,
        "rlnNrHelicalNStart": 1,
        "rlnHelicalMaskTubeInnerDiameter": -1.0,
        "rlnHelicalMaskTubeOuterDiameter": -1.0,
        "rlnHelicalSymmetryLocalRefinement": False,
        "rlnHelicalSigmaDistance": -1.0,
        "rlnHelicalKeepTiltPriorFixed": False,
        "rlnHasConverged": bool(has_converged),
        "rlnHasHighFscAtResolLimit": bool(schedule.high_fsc_at_limit),
        "rlnHasLargeSizeIncreaseIterationsAgo": 0,
        "rlnDoCorrectNorm": bool(config.norm),
        "rlnDoCorrectScale": bool(config.scale),
        "rlnDoCorrectCtf": bool(config.ctf),
        "rlnDoIgnoreCtfUntilFirstPeak": bool(config.ctf_intact_first_peak),
        "rlnCtfDataArePhaseFlipped": bool(config.ctf_phase_flipped),
        "rlnDoOnlyFlipCtfPhases": bool(config.only_flip_phases),
        "rlnRefsAreCtfCorrected": refs_ctf_corrected,
        "rlnFixSigmaNoiseEstimates": bool(config.fix_sigma_noise),
        "rlnFixSigmaOffsetEstimates": bool(config.fix_sigma_offset),
        "rlnMaxNumberOfPooledParticles": int(config.pool),
    })
    if extra:
        v.update(extra)
    blocks = {"optimiser_general": _key_value(v)}
    if command_line is None:
        return write_star(blocks, path, key_value={"optimiser_general"})
    return _write_with_header(blocks, path, ["# gerelion_dask optimiser", "# " + " ".join(command_line.split())])


def _write_with_header(blocks: dict[str, pd.DataFrame], path: str | os.PathLike, header: list[str]) -> Path:
    """write_star, with comment lines before the first block (RELION's optimiser.star starts with two)."""
    path = Path(path)
    with atomic_path(path) as body:
        write_star(blocks, body, key_value=set(blocks))
        text = body.read_text(encoding="utf-8")
        body.write_text("\n".join(header) + "\n" + text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ sampling.star


def write_sampling_star(
    path: str | os.PathLike,
    *,
    schedule: ScheduleState,
    symmetry: str,
    pixel_size: float,
    perturb_factor: float,
    original: ScheduleState,
    directions: bool = True,
    limit_tilt: float = -91.0,
) -> Path:
    """Write ``sampling.star``: ``sampling_general`` (key-value) and, optionally, ``sampling_directions``.

    Parameters
    ----------
    path : str or os.PathLike
        Output file.
    schedule : ScheduleState
        Current sampling: HEALPix order, coarse offset range/step in **pixels**, perturbation instance.
    symmetry : str
        ``rlnSymmetryGroup`` (``--sym``).
    pixel_size : float
        Å per pixel: offsets are written in Å (RELION 3.1+ keeps ``offset_range``/``offset_step`` in Å).
    perturb_factor : float
        ``rlnSamplingPerturbFactor`` (``--perturb``).
    original : ScheduleState
        The sampling the job started with (``rlnHealpixOrderOriginal``, ``rlnPsiStepOriginal``,
        ``rlnOffsetRangeOriginal``, ``rlnOffsetStepOriginal``).
    directions : bool
        Also write ``sampling_directions`` (``rlnAngleRot``, ``rlnAngleTilt`` of the coarse directions in the
        asymmetric unit, unperturbed), as RELION does for 3D sampling.
    limit_tilt : float
        ``rlnTiltAngleLimit`` (``--limit_tilt``; -91: no limit); the directions written are those it keeps.

    Notes
    -----
    ``rlnPsiStep`` is ``360 / (6 * 2**order)``, the coarse in-plane step (RELION sets
    ``psi_step = fine psi step * 2**oversampling``).  ``rlnHelicalOffsetStep`` is -1, RELION's default.
    """
    kv = {
        "rlnIs3DSampling": True,
        "rlnIs3DTranslationalSampling": False,
        "rlnHealpixOrder": int(schedule.healpix_order),
        "rlnSymmetryGroup": str(symmetry),
        "rlnTiltAngleLimit": float(limit_tilt),
        "rlnPsiStep": _angular_step(schedule.healpix_order),
        "rlnOffsetRange": float(schedule.offset_range_px) * pixel_size,
        "rlnOffsetStep": float(schedule.offset_step_px) * pixel_size,
        "rlnHelicalOffsetStep": -1.0,
        "rlnSamplingPerturbInstance": float(schedule.perturb),
        "rlnSamplingPerturbFactor": float(perturb_factor),
        "rlnHealpixOrderOriginal": int(original.healpix_order),
        "rlnPsiStepOriginal": _angular_step(original.healpix_order),
        "rlnOffsetRangeOriginal": float(original.offset_range_px) * pixel_size,
        "rlnOffsetStepOriginal": float(original.offset_step_px) * pixel_size,
    }
    blocks = {"sampling_general": _key_value(kv)}
    if directions:
        d = asymmetric_unit_directions(int(schedule.healpix_order), symmetry, limit_tilt)
        blocks["sampling_directions"] = pd.DataFrame({"rlnAngleRot": d.rot, "rlnAngleTilt": d.tilt})
    return write_star(blocks, path, key_value={"sampling_general"})


# ------------------------------------------------------------------------------------------------------- .bild


def _direction(rot: np.ndarray, tilt: np.ndarray) -> np.ndarray:
    a, b = np.deg2rad(rot), np.deg2rad(tilt)
    return np.stack([np.cos(a) * np.sin(b), np.sin(a) * np.sin(b), np.cos(b)], axis=-1)


def _nearest_neighbour_step(v: np.ndarray) -> float:
    """Median angle (deg) to the nearest other direction: the angular sampling when none is given."""
    if len(v) < 2:
        return 7.5
    best = np.full(len(v), -1.0)
    for s in range(0, len(v), 2048):
        cos = v[s:s + 2048] @ v.T
        cos[np.arange(cos.shape[0]), np.arange(s, s + cos.shape[0])] = -1.0
        best[s:s + 2048] = cos.max(axis=1)
    return float(np.rad2deg(np.median(np.arccos(np.clip(best, -1.0, 1.0)))))


def angdist_bild(
    path: str | os.PathLike,
    rot: np.ndarray,
    tilt: np.ndarray,
    weights: np.ndarray,
    ori_size: int,
    pixel_size: float,
    *,
    angular_step: float | None = None,
    rmax_frac: float = 0.3,
    width_frac: float = 0.5,
) -> Path:
    """Write the ``*_angdist.bild`` file (cylinders per direction, length by weight) as RELION 3.1 does.

    Parameters
    ----------
    path : str or os.PathLike
        Output ``.bild`` file.
    rot, tilt : array (n_dir,)
        Directions (degrees): the coarse HEALPix directions of the model (``pdf_direction`` order) or any binning.
    weights : array (n_dir,)
        ``pdf_direction`` of a class, or particle counts per direction; directions with weight <= 0 get no cylinder.
    ori_size, pixel_size : int, float
        Box and Å/pixel: the sphere has radius ``R = N a / 2`` and is centred at ``(R, R, R)`` Å (the map centre in
        Chimera's coordinates).
    angular_step : float, optional
        Angular sampling (deg) that sets the cylinder width ``width_frac * pi * R * step / 360``; RELION uses
        ``360 / (6 * 2**order)``.  Default: the median nearest-neighbour angle between the given directions.
    rmax_frac, width_frac : float
        RELION's defaults 0.3 (longest cylinder = 0.3 R) and 0.5.

    Notes
    -----
    Each cylinder runs from ``R v`` to ``(R + rmax_frac R w / w_max) v`` (plus the centre offset); colour
    ``.color c 0 1-c`` with ``c = (clip((w - mean)/sigma, -1, 5) + 1) / 6`` (blue = rare, red = frequent).
    ``sigma`` is the population standard deviation, as RELION's ``computeStats`` gives for more than two values
    (its ``N/(N-1)`` factor is an integer division).  Where all weights are equal RELION divides by 0; we use
    ``c = 1/6``.  Cylinders with all end-point differences <= 0.01 Å are skipped (Chimera rejects zero-length
    cylinders).  Numbers are printed with 6 significant digits (C++ stream default).
    """
    rot = np.asarray(rot, dtype=np.float64).reshape(-1)
    tilt = np.asarray(tilt, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if not rot.size == tilt.size == w.size:
        raise ValueError(f"rot ({rot.size}), tilt ({tilt.size}) and weights ({w.size}) differ in length")
    R = ori_size * pixel_size / 2.0
    v = _direction(rot, tilt)
    step = _nearest_neighbour_step(v) if angular_step is None else float(angular_step)
    width = width_frac * math.pi * R * (step / 360.0)
    lines = []
    if w.size:
        mean, wmax = w.mean(), w.max()
        sigma = w.std() if w.size > 2 else (w.std(ddof=1) if w.size == 2 else 0.0)
        for k in np.flatnonzero(w > 0):
            col = (w[k] - mean) / sigma if sigma > 0 else 0.0
            col = (min(max(col, -1.0), 5.0) + 1.0) / 6.0
            rp = R + rmax_frac * R * w[k] / wmax
            a, b = R * v[k] + R, rp * v[k] + R
            if np.all(np.abs((R - rp) * v[k]) <= 0.01):
                continue
            lines.append(f".color {col:g} 0 {1.0 - col:g}")
            lines.append(".cylinder " + " ".join(f"{x:g}" for x in (*a, *b, width)))
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- data.star


def write_data_star(
    path: str | os.PathLike,
    optics: pd.DataFrame,
    particles: pd.DataFrame,
    *,
    float_format: str | None = None,
) -> Path:
    """Write ``data.star`` (``data_optics`` + ``data_particles``) with RELION 3.1 labels and types.

    Integer labels (:data:`INTEGER_PARTICLE_LABELS`: ``rlnClassNumber``, ``rlnRandomSubset``,
    ``rlnNrOfSignificantSamples``, ``rlnOpticsGroup`` ...) are cast to int64 (they must be whole numbers); RELION
    3.0 pixel offsets (``rlnOriginX`` ...) are converted to the Å columns with the optics group's pixel size.  Other
    columns are written unchanged, in their order.  Delegates to :func:`gerelion_dask.io.star.write_particles`.

    Raises
    ------
    ValueError
        A missing ``rlnOpticsGroup`` / ``rlnImagePixelSize``, or a non-integer value in an integer column.
    """
    optics = _integer_columns(optics.reset_index(drop=True), "data_optics")
    particles = _integer_columns(particles.reset_index(drop=True), "data_particles")
    for table, name in ((optics, "data_optics"), (particles, "data_particles")):
        if "rlnOpticsGroup" not in table.columns:
            raise ValueError(f"{name} has no rlnOpticsGroup column")
    pixel_cols = [c for c in _PIXEL_OFFSETS if c in particles.columns]
    if pixel_cols:
        if "rlnImagePixelSize" not in optics.columns:
            raise ValueError("data_optics has no rlnImagePixelSize (needed to convert pixel offsets to Å)")
        apix_of = dict(zip(optics["rlnOpticsGroup"].tolist(), optics["rlnImagePixelSize"].astype(float).tolist()))
        apix = particles["rlnOpticsGroup"].map(apix_of).to_numpy(dtype=np.float64)
        particles = particles.copy()
        for col in pixel_cols:
            new = _PIXEL_OFFSETS[col]
            if new in particles.columns:
                particles = particles.drop(columns=col)
            else:
                particles[col] = particles[col].to_numpy(dtype=np.float64) * apix
                particles = particles.rename(columns={col: new})
    return write_particles(optics, particles, path, float_format=float_format)


def _integer_columns(table: pd.DataFrame, name: str) -> pd.DataFrame:
    cols = [c for c in INTEGER_PARTICLE_LABELS if c in table.columns]
    if not cols:
        return table
    table = table.copy()
    for c in cols:
        values = pd.to_numeric(table[c], errors="coerce").to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise ValueError(f"{name}: column {c} must hold whole numbers")
        table[c] = values.astype(np.int64)
    return table


# ----------------------------------------------------------------------------------------------------- names


def output_names(root: str, iteration: int | None, *, halves: bool, n_classes: int = 1) -> dict[str, Any]:
    """RELION's file names for one iteration (``iteration=None``: the final files without ``_itNNN``).

    Returns a dict with ``data``, ``optimiser``, ``sampling``, ``model`` (list: one per half, or one), ``classes``
    (list per half of lists per class of ``.mrc`` names) and ``bild`` (same shape, ``_angdist.bild``).
    """
    base = root if iteration is None else f"{root}_it{iteration:03d}"
    sets = [f"{base}_half1", f"{base}_half2"] if halves else [base]
    return {
        "data": f"{base}_data.star",
        "optimiser": f"{base}_optimiser.star",
        "sampling": f"{base}_sampling.star",
        "model": [f"{s}_model.star" for s in sets],
        "classes": [[f"{s}_class{c:03d}.mrc" for c in range(1, n_classes + 1)] for s in sets],
        "bild": [[f"{s}_class{c:03d}_angdist.bild" for c in range(1, n_classes + 1)] for s in sets],
    }
