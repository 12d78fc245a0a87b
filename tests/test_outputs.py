"""Writers of the RELION 3.1 output files (gerelion_dask.outputs): read back with our reader, and with RELION."""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from conftest import need_golden

from gerelion_dask import outputs as out
from gerelion_dask.config import JobConfig
from gerelion_dask.io.mrc import read_map, write_map
from gerelion_dask.io.star import read_particles, read_star
from gerelion_dask.maximization.model import Model
from gerelion_dask.maximization.schedule import ScheduleState
from gerelion_dask.ops.fsc import fsc
from gerelion_dask.ops.sampling import asymmetric_unit_directions

N, APIX = 32, 3.0
NSH = N // 2 + 1

# optimiser_general labels in the order relion_refine 3.1.3 writes them (read from its run_it001_optimiser.star)
RELION_OPTIMISER_LABELS = [
    "rlnOutputRootName", "rlnModelStarFile", "rlnModelStarFile2", "rlnExperimentalDataStarFile",
    "rlnOrientSamplingStarFile", "rlnCurrentIteration", "rlnNumberOfIterations", "rlnDoSplitRandomHalves",
    "rlnJoinHalvesUntilThisResolution", "rlnAdaptiveOversampleOrder", "rlnAdaptiveOversampleFraction",
    "rlnRandomSeed", "rlnParticleDiameter", "rlnWidthMaskEdge", "rlnDoZeroMask", "rlnDoSolventFlattening",
    "rlnDoSolventFscCorrection", "rlnSolventMaskName", "rlnSolventMask2Name", "rlnBodyStarFile",
    "rlnTauSpectrumName", "rlnMaximumCoarseImageSize", "rlnHighresLimitExpectation", "rlnLowresLimitExpectation",
    "rlnIncrementImageSize", "rlnDoMapEstimation", "rlnDoFastSubsetOptimisation", "rlnDoExternalReconstruct",
    "rlnDoStochasticGradientDescent", "rlnDoStochasticEM", "rlnSgdInitialIterations", "rlnSgdFinalIterations",
    "rlnSgdInBetweenIterations", "rlnSgdInitialResolution", "rlnSgdFinalResolution", "rlnSgdInitialSubsetSize",
    "rlnSgdFinalSubsetSize", "rlnSgdMuFactor", "rlnSgdSigma2FudgeInitial", "rlnSgdSigma2FudgeHalflife",
    "rlnSgdSkipAnneal", "rlnSgdSubsetSize", "rlnSgdWriteEverySubset", "rlnSgdStepsize", "rlnDoAutoRefine",
    "rlnAutoLocalSearchesHealpixOrder", "rlnNumberOfIterWithoutResolutionGain", "rlnBestResolutionThusFar",
    "rlnNumberOfIterWithoutChangingAssignments", "rlnDoSkipAlign", "rlnDoSkipRotate", "rlnOverallAccuracyRotations",
    "rlnOverallAccuracyTranslationsAngst", "rlnChangesOptimalOrientations", "rlnChangesOptimalOffsets",
    "rlnChangesOptimalClasses", "rlnSmallestChangesOrientations", "rlnSmallestChangesOffsets",
    "rlnSmallestChangesClasses", "rlnLocalSymmetryFile", "rlnDoHelicalRefine", "rlnIgnoreHelicalSymmetry",
    "rlnFourierMask", "rlnHelicalTwistInitial", "rlnHelicalRiseInitial", "rlnHelicalCentralProportion",
    "rlnNrHelicalNStart", "rlnHelicalMaskTubeInnerDiameter", "rlnHelicalMaskTubeOuterDiameter",
    "rlnHelicalSymmetryLocalRefinement", "rlnHelicalSigmaDistance", "rlnHelicalKeepTiltPriorFixed",
    "rlnHasConverged", "rlnHasHighFscAtResolLimit", "rlnHasLargeSizeIncreaseIterationsAgo", "rlnDoCorrectNorm",
    "rlnDoCorrectScale", "rlnDoCorrectCtf", "rlnDoIgnoreCtfUntilFirstPeak", "rlnCtfDataArePhaseFlipped",
    "rlnDoOnlyFlipCtfPhases", "rlnRefsAreCtfCorrected", "rlnFixSigmaNoiseEstimates", "rlnFixSigmaOffsetEstimates",
    "rlnMaxNumberOfPooledParticles",
]

have_relion = pytest.mark.skipif(
    shutil.which("relion_star_handler") is None or shutil.which("relion_postprocess") is None,
    reason="RELION binaries not on PATH",
)


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def model():
    rng = np.random.default_rng(7)
    shells = np.arange(NSH)
    dvp = np.stack([50.0 * np.exp(-shells / 4.0), 40.0 * np.exp(-shells / 3.0)])[:, None, :]  # (H, K=1, NSH)
    return Model(
        ori_size=N,
        pixel_size=APIX,
        maps=[[rng.normal(size=(N, N, N))], [rng.normal(size=(N, N, N))]],
        pdf_class=np.array([[1.0], [1.0]]),
        pdf_direction=np.stack([np.full((1, 192), 1.0 / 192), rng.dirichlet(np.ones(192))[None]]),
        sigma2_noise=np.concatenate([rng.uniform(0.5, 1.0, (2, 2, NSH - 1)), np.zeros((2, 2, 1))], axis=2),
        tau2=rng.uniform(0.1, 1.0, (2, 1, NSH)),
        data_vs_prior=dvp,
        fsc=np.clip(1.2 - shells / 10.0, 0, 1)[None, :],
        sigma2_recon=rng.uniform(0.1, 1.0, (2, 1, NSH)),
        sigma_offset_angst=np.array([4.25, 4.5]),
        avg_norm=np.array([0.91, 0.93]),
        scales=np.array([[1.01, 0.98, 1.0], [1.0, 0.97, 1.02]]),
        current_resolution=1.0 / 12.0,
        loglik=np.array([-1.4e6, -1.5e6]),
        ave_pmax=0.42,
        acc_rot=np.array([2.5]),
        acc_trans_angst=np.array([1.25]),
        fourier_coverage=np.stack([np.clip(1.5 - shells / 6.0, 0, 1), np.clip(1.2 - shells / 8.0, 0, 1)])[:, None, :],
    )


@pytest.fixture
def config():
    return JobConfig(i="in.star", o="Refine3D/job001/run", ref="ref.mrc", auto_refine=True, split_random_halves=True,
                     ctf=True, norm=True, scale=True, healpix_order=2, offset_range=5, offset_step=1,
                     flatten_solvent=True, zero_mask=True, random_seed=42, pool=8)


@pytest.fixture
def schedule():
    return ScheduleState(healpix_order=3, offset_range_px=3.0, offset_step_px=0.5, current_size=24,
                         n_iter_wo_resol_gain=1, n_iter_wo_large_changes=0, best_resolution=1.0 / 12.0,
                         smallest_changes_orient=4.2, smallest_changes_offset=0.8, smallest_changes_class=0.0,
                         changes_orient=4.5, changes_offset=0.9, changes_class=0.0, perturb=0.2,
                         high_fsc_at_limit=True)


def _model_kwargs(**over):
    kw = {"n_groups_names": ["mic_a", "mic b", "0003"], "group_counts": [10, 12, 9],
          "ref_image_names": ["Refine3D/job001/run_it004_half2_class001.mrc"], "iteration": 4,
          "orientational_prior_mode": 1, "sigma_prior_rot": 3.75, "sigma_prior_psi": 3.75, "current_size": 24}
    kw.update(over)
    return kw


def _particles(n: int, rng) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A particle table with the columns refinement writes (RELION 3.1 layout)."""
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnMicrographOriginalPixelSize": [1.5],
        "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
        "rlnImagePixelSize": [APIX], "rlnImageSize": [N], "rlnImageDimensionality": [2],
    })
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@Extract/job002/particles.mrcs" for i in range(n)],
        "rlnMicrographName": [f"MotionCorr/mic{i % 3:03d}.mrc" for i in range(n)],
        "rlnDefocusU": rng.uniform(1e4, 2e4, n), "rlnDefocusV": rng.uniform(1e4, 2e4, n),
        "rlnDefocusAngle": rng.uniform(0, 180, n), "rlnCtfBfactor": np.zeros(n), "rlnCtfScalefactor": np.ones(n),
        "rlnPhaseShift": np.zeros(n),
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": rng.uniform(0, 180, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.normal(size=n), "rlnOriginYAngst": rng.normal(size=n),
        "rlnClassNumber": np.ones(n),  # floats on purpose: the writer must make them integers
        "rlnRandomSubset": (np.arange(n) % 2 + 1).astype(np.float64),
        "rlnLogLikeliContribution": rng.normal(1e4, 10, n), "rlnMaxValueProbDistribution": rng.uniform(size=n),
        "rlnNrOfSignificantSamples": np.full(n, 3.0), "rlnNormCorrection": np.ones(n),
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
    })
    return optics, particles


# ---------------------------------------------------------------------------------------------------- model.star


def test_model_star_roundtrip(tmp_path, model, config):
    path = out.write_model_star(tmp_path / "run_it004_half2_model.star", model, 1, config, **_model_kwargs())
    text = path.read_text()
    assert text.count("# version 30001") == 7  # one per block
    blocks = read_star(path)
    assert list(blocks) == ["model_general", "model_classes", "model_class_1", "model_groups",
                            "model_optics_group_1", "model_optics_group_2", "model_pdf_orient_class_1"]

    g = blocks["model_general"].iloc[0]
    assert blocks["model_general"].attrs["star_key_value"]
    assert g["rlnReferenceDimensionality"] == 3 and g["rlnDataDimensionality"] == 2
    assert g["rlnOriginalImageSize"] == N and g["rlnCurrentImageSize"] == 24
    assert g["rlnCurrentResolution"] == pytest.approx(12.0)  # Å, as RELION writes it
    assert g["rlnPixelSize"] == APIX and g["rlnPaddingFactor"] == 2.0 and g["rlnIsHelix"] == 0
    assert (g["rlnNrClasses"], g["rlnNrBodies"], g["rlnNrGroups"], g["rlnNrOpticsGroups"]) == (1, 1, 3, 2)
    assert g["rlnSigmaOffsetsAngst"] == 4.5 and g["rlnNormCorrectionAverage"] == 0.93
    assert g["rlnOrientationalPriorMode"] == 1
    assert g["rlnSigmaPriorRotAngle"] == g["rlnSigmaPriorTiltAngle"] == g["rlnSigmaPriorPsiAngle"] == 3.75
    assert g["rlnLogLikelihood"] == -1.5e6 and g["rlnAveragePmax"] == 0.42
    assert g["rlnFourierSpaceInterpolator"] == 1 and g["rlnMinRadiusNnInterpolation"] == 10

    c = blocks["model_classes"]
    assert c["rlnReferenceImage"].tolist() == ["Refine3D/job001/run_it004_half2_class001.mrc"]
    assert c["rlnClassDistribution"].tolist() == [1.0]
    assert c["rlnAccuracyRotations"].tolist() == [2.5] and c["rlnAccuracyTranslationsAngst"].tolist() == [1.25]
    dvp = model.data_vs_prior[1, 0]  # half index 1 = half 2
    maxres = int(np.flatnonzero(dvp < 1)[0]) - 1
    assert c["rlnEstimatedResolution"].tolist() == [pytest.approx(N * APIX / maxres)]
    cov = model.fourier_coverage[1, 0]
    assert c["rlnOverallFourierCompleteness"].tolist() == [out.overall_fourier_completeness(cov, dvp)]
    assert 0 < c["rlnOverallFourierCompleteness"].iloc[0] < 1
    assert "rlnClassPriorOffsetX" not in c  # 3D references: RELION writes no class prior offsets

    s = blocks["model_class_1"]
    assert s["rlnSpectralIndex"].dtype.kind == "i" and s["rlnSpectralIndex"].tolist() == list(range(NSH))
    np.testing.assert_allclose(s["rlnResolution"], np.arange(NSH) / (N * APIX))
    assert s["rlnAngstromResolution"].iloc[0] == 999.0 and s["rlnAngstromResolution"].iloc[2] == N * APIX / 2
    np.testing.assert_array_equal(s["rlnSsnrMap"], dvp)  # exact: floats are written with repr
    np.testing.assert_array_equal(s["rlnReferenceTau2"], model.tau2[1, 0])
    np.testing.assert_array_equal(s["rlnReferenceSigma2"], model.sigma2_recon[1, 0])
    np.testing.assert_array_equal(s["rlnGoldStandardFsc"], model.fsc[0])
    np.testing.assert_array_equal(s["rlnFourierCompleteness"], cov)  # the model's, half 2's
    np.testing.assert_array_equal(s["rlnSpectralOrientabilityContribution"], np.zeros(NSH))

    groups = blocks["model_groups"]
    assert groups["rlnGroupNumber"].tolist() == [1, 2, 3]
    assert groups["rlnGroupName"].tolist() == ["mic_a", "mic b", "0003"]  # quoted name with a space; "0003" string
    assert groups["rlnGroupNrParticles"].tolist() == [10, 12, 9]
    np.testing.assert_array_equal(groups["rlnGroupScaleCorrection"], model.scales[1])

    noise = blocks["model_optics_group_2"]
    assert len(noise) == NSH - 1  # the zero shell (never used) is left out, as RELION 4.0
    np.testing.assert_array_equal(noise["rlnSigma2Noise"], model.sigma2_noise[1, 1, :-1])
    np.testing.assert_array_equal(blocks["model_pdf_orient_class_1"]["rlnOrientationDistribution"],
                                  model.pdf_direction[1, 0])


def test_model_star_halves_differ_and_options(model, config):
    b0 = out.model_star_blocks(model, 0, config, **_model_kwargs())
    b1 = out.model_star_blocks(model, 1, config, **_model_kwargs())
    assert not np.array_equal(b0["model_class_1"]["rlnSsnrMap"], b1["model_class_1"]["rlnSsnrMap"])
    # each half's other parameters (RELION 3.1 writes two models with their own values)
    g0, g1 = b0["model_general"].iloc[0], b1["model_general"].iloc[0]
    assert (g0["rlnNormCorrectionAverage"], g0["rlnSigmaOffsetsAngst"], g0["rlnLogLikelihood"]) == (0.91, 4.25, -1.4e6)
    assert (g1["rlnNormCorrectionAverage"], g1["rlnSigmaOffsetsAngst"], g1["rlnLogLikelihood"]) == (0.93, 4.5, -1.5e6)
    np.testing.assert_array_equal(b0["model_groups"]["rlnGroupScaleCorrection"], model.scales[0])
    np.testing.assert_array_equal(b0["model_optics_group_1"]["rlnSigma2Noise"], model.sigma2_noise[0, 0, :-1])
    np.testing.assert_array_equal(b0["model_pdf_orient_class_1"]["rlnOrientationDistribution"],
                                  model.pdf_direction[0, 0])
    comp = np.linspace(1.0, 0.0, NSH)[None]
    b = out.model_star_blocks(model, 0, config, **_model_kwargs(fourier_completeness=comp, class_prior_offsets=True,
                                                                 sigma_prior_tilt=1.0))
    np.testing.assert_array_equal(b["model_class_1"]["rlnFourierCompleteness"], comp[0])
    assert 0 < b["model_classes"]["rlnOverallFourierCompleteness"].iloc[0] < 1
    assert b["model_classes"]["rlnClassPriorOffsetX"].tolist() == [0.0]
    assert b["model_general"]["rlnSigmaPriorTiltAngle"].iloc[0] == 1.0
    # a model before any M-step has no coverage: zeros, as RELION's initial model.star
    b = out.model_star_blocks(replace(model, fourier_coverage=None), 0, config, **_model_kwargs())
    assert not b["model_class_1"]["rlnFourierCompleteness"].any()
    assert b["model_classes"]["rlnOverallFourierCompleteness"].tolist() == [0.0]
    with pytest.raises(ValueError, match="half"):
        out.model_star_blocks(model, 2, config, **_model_kwargs())
    with pytest.raises(ValueError, match="group"):
        out.model_star_blocks(model, 0, config, **_model_kwargs(group_counts=[1, 2]))


def test_estimated_resolution_and_completeness_follow_relion():
    # RELION: maxres = last shell before the SSNR first drops below 1; resolution = N a / maxres
    assert out.estimated_resolution(np.array([9.0, 5.0, 2.0, 0.5, 3.0]), 8, 2.0) == 16.0 / 2
    assert out.estimated_resolution(np.array([0.5, 5.0]), 8, 2.0) == math.inf
    assert out.estimated_resolution(np.array([9.0, 5.0, 2.0]), 4, 2.0) == 8.0 / 2
    # overall completeness: voxel-weighted mean of the shell completeness over the sphere up to maxres
    dvp = np.array([9.0, 9.0, 9.0, 0.1])
    assert out.overall_fourier_completeness(np.array([1.0, 1.0, 1.0, 0.0]), dvp) == 1.0
    half = out.overall_fourier_completeness(np.array([1.0, 0.5, 0.0, 0.0]), dvp)
    # cube [-1, 1]^3 (RELION's coverwindow 2*maxres-1): 1 voxel in shell 0, 26 in shell 1 (floor(sqrt(2 or 3)) = 1)
    assert half == pytest.approx((1.0 + 26 * 0.5) / 27)
    assert out.overall_fourier_completeness(np.ones(3), np.array([0.5, 2.0, 2.0])) == 0.0


# ---------------------------------------------------------------------------------------------- optimiser.star


def test_optimiser_star(tmp_path, config, schedule):
    path = out.write_optimiser_star(
        tmp_path / "run_it004_optimiser.star", config=config, schedule=schedule, iteration=4,
        output_root="Refine3D/job001/run", model_star="Refine3D/job001/run_it004_half1_model.star",
        model_star2="Refine3D/job001/run_it004_half2_model.star", data_star="Refine3D/job001/run_it004_data.star",
        sampling_star="Refine3D/job001/run_it004_sampling.star", acc_rot=2.5, acc_trans_angst=1.25,
        has_converged=False, extra={"rlnTau2FudgeFactor": 1.0, "rlnParticleDiameter": 180.0},
        command_line="gerelion refine  --i in.star --o Refine3D/job001/run",
    )
    text = path.read_text()
    assert text.startswith("# gerelion_dask optimiser\n# gerelion refine --i in.star --o Refine3D/job001/run\n")
    blocks = read_star(path)
    assert list(blocks) == ["optimiser_general"]
    o = blocks["optimiser_general"]
    assert list(o.columns) == RELION_OPTIMISER_LABELS + ["rlnTau2FudgeFactor"]
    v = o.iloc[0]
    assert v["rlnModelStarFile2"] == "Refine3D/job001/run_it004_half2_model.star"
    assert v["rlnCurrentIteration"] == 4 and v["rlnNumberOfIterations"] == 999 and v["rlnDoAutoRefine"] == 1
    assert v["rlnDoSplitRandomHalves"] == 1 and v["rlnJoinHalvesUntilThisResolution"] == -1.0
    assert v["rlnParticleDiameter"] == 180.0  # extra overrides
    assert v["rlnRandomSeed"] == 42 and v["rlnMaxNumberOfPooledParticles"] == 8
    assert v["rlnNumberOfIterWithoutResolutionGain"] == 1 and v["rlnNumberOfIterWithoutChangingAssignments"] == 0
    assert v["rlnBestResolutionThusFar"] == pytest.approx(1 / 12.0)
    assert v["rlnOverallAccuracyRotations"] == 2.5 and v["rlnOverallAccuracyTranslationsAngst"] == 1.25
    assert (v["rlnChangesOptimalOrientations"], v["rlnChangesOptimalOffsets"]) == (4.5, 0.9)
    assert v["rlnSmallestChangesClasses"] == 0 and o["rlnSmallestChangesClasses"].dtype.kind == "i"
    assert v["rlnHasConverged"] == 0 and v["rlnHasHighFscAtResolLimit"] == 1
    assert v["rlnDoCorrectCtf"] == 1 and v["rlnRefsAreCtfCorrected"] == 1 and v["rlnDoCorrectNorm"] == 1
    assert v["rlnDoSolventFlattening"] == 1 and v["rlnDoZeroMask"] == 1 and v["rlnSolventMaskName"] == "None"
    assert v["rlnIncrementImageSize"] == 10 and v["rlnAutoLocalSearchesHealpixOrder"] == 4


def test_optimiser_star_classification_and_final(tmp_path, schedule):
    cls = JobConfig(i="in.star", o="Class3D/job003/run", ref="ref.mrc", K=3, iter=25, ctf=True)
    kw = {"schedule": schedule, "output_root": "Class3D/job003/run", "data_star": "d.star", "sampling_star": "s.star",
          "acc_rot": 5.0, "acc_trans_angst": 2.0, "has_converged": False}
    o = read_star(out.write_optimiser_star(tmp_path / "c.star", config=cls, iteration=0, model_star="m.star",
                                           model_star2=None, **kw))["optimiser_general"].iloc[0]
    assert "rlnModelStarFile2" not in o and o["rlnNumberOfIterations"] == 25
    assert o["rlnRefsAreCtfCorrected"] == 0  # iteration 0: the input reference is not CTF-corrected
    final = JobConfig(i="in.star", o="r", ref="ref.mrc", auto_refine=True, split_random_halves=True)
    o = read_star(out.write_optimiser_star(tmp_path / "f.star", config=final, iteration=9, model_star="r_model.star",
                                           model_star2=None, **kw))["optimiser_general"].iloc[0]
    assert o["rlnModelStarFile2"] == ""  # RELION writes "" in the final (joined) iteration


# ----------------------------------------------------------------------------------------------- sampling.star


def test_sampling_star(tmp_path, schedule):
    original = ScheduleState(healpix_order=2, offset_range_px=5.0, offset_step_px=1.0)
    path = out.write_sampling_star(tmp_path / "run_it004_sampling.star", schedule=schedule, symmetry="C1",
                                   pixel_size=APIX, perturb_factor=0.5, original=original)
    blocks = read_star(path)
    s = blocks["sampling_general"].iloc[0]
    assert s["rlnIs3DSampling"] == 1 and s["rlnIs3DTranslationalSampling"] == 0
    assert s["rlnHealpixOrder"] == 3 and s["rlnSymmetryGroup"] == "C1" and s["rlnTiltAngleLimit"] == -91.0
    assert s["rlnPsiStep"] == 7.5 and s["rlnPsiStepOriginal"] == 15.0
    assert s["rlnOffsetRange"] == 3.0 * APIX and s["rlnOffsetStep"] == 0.5 * APIX  # Å (RELION 3.1+)
    assert s["rlnOffsetRangeOriginal"] == 5.0 * APIX and s["rlnOffsetStepOriginal"] == 1.0 * APIX
    assert s["rlnHealpixOrderOriginal"] == 2
    assert s["rlnSamplingPerturbInstance"] == 0.2 and s["rlnSamplingPerturbFactor"] == 0.5
    d = blocks["sampling_directions"]
    assert list(d.columns) == ["rlnAngleRot", "rlnAngleTilt"] and len(d) == 768  # order 3, C1
    blocks = read_star(out.write_sampling_star(tmp_path / "s.star", schedule=original, symmetry="D2",
                                               pixel_size=APIX, perturb_factor=0.5, original=original,
                                               directions=False))
    assert list(blocks) == ["sampling_general"]


# ------------------------------------------------------------------------------------------------------ .bild

# relion_refine 3.1.3 --K 1 --iter 1 --healpix_order 1 on box 32, 6 Å/px: run_it001_class001_angdist.bild, made from
# a pdf_direction that is zero except at these directions (values as written in its model.star)
_RELION_PDF = {4: 0.003018, 18: 0.497323, 26: 0.497547, 47: 0.002112}
_RELION_BILD = """\
.color 0.136789 0 0.863211
.cylinder 32 160 128 31.8835 160.116 128.058 12.5664
.color 0.965773 0 0.0342266
.cylinder 184.692 59.2624 96 211.288 48.2461 96 12.5664
.color 0.966148 0 0.0338515
.cylinder 7.30756 132.738 96 -19.3002 143.759 96 12.5664
.color 0.135269 0 0.864731
.cylinder 160 32 64 160.081 31.9185 63.9593 12.5664
"""


def test_angdist_bild_matches_relion(tmp_path):
    d = asymmetric_unit_directions(1, "C1")
    pdf = np.zeros(len(d.pix))
    pdf[list(_RELION_PDF)] = list(_RELION_PDF.values())
    path = out.angdist_bild(tmp_path / "run_class001_angdist.bild", d.rot, d.tilt, pdf, 32, 6.0, angular_step=30.0)
    ours = path.read_text().splitlines()
    ref = _RELION_BILD.splitlines()
    assert [line.split()[0] for line in ours] == [line.split()[0] for line in ref]
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose([float(x) for x in a.split()[1:]], [float(x) for x in b.split()[1:]], atol=2e-3)


def test_angdist_bild_counts_and_edge_cases(tmp_path):
    d = asymmetric_unit_directions(2, "C1")
    counts = np.random.default_rng(0).poisson(3.0, len(d.pix)).astype(float)
    lines = out.angdist_bild(tmp_path / "a.bild", d.rot, d.tilt, counts, N, APIX).read_text().splitlines()
    assert len(lines) == 2 * int((counts > 0).sum())
    cyl = np.array([[float(x) for x in line.split()[1:]] for line in lines[1::2]])
    R = N * APIX / 2
    np.testing.assert_allclose(np.linalg.norm(cyl[:, :3] - R, axis=1), R, rtol=1e-5)  # start on the sphere
    outer = np.linalg.norm(cyl[:, 3:6] - R, axis=1)
    assert outer.max() == pytest.approx(1.3 * R, rel=1e-5)  # longest cylinder = 0.3 R
    assert np.all(cyl[:, 6] == cyl[0, 6]) and 0 < cyl[0, 6] < R
    # equal weights: RELION divides by a zero sigma; we colour them all at 1/6
    flat = out.angdist_bild(tmp_path / "f.bild", d.rot, d.tilt, np.ones(len(d.pix)), N, APIX).read_text()
    assert flat.splitlines()[0] == ".color 0.166667 0 0.833333"
    assert out.angdist_bild(tmp_path / "z.bild", d.rot, d.tilt, np.zeros(len(d.pix)), N, APIX).read_text() == ""
    with pytest.raises(ValueError, match="length"):
        out.angdist_bild(tmp_path / "bad.bild", d.rot, d.tilt[:-1], counts, N, APIX)


# --------------------------------------------------------------------------------------------------- data.star


def test_data_star_types_and_roundtrip(tmp_path):
    optics, particles = _particles(9, np.random.default_rng(2))
    path = out.write_data_star(tmp_path / "run_data.star", optics, particles)
    o, p, version = read_particles(path)
    assert version == 30001 and len(p) == 9
    for col in ("rlnClassNumber", "rlnRandomSubset", "rlnNrOfSignificantSamples", "rlnOpticsGroup"):
        assert p[col].dtype.kind == "i", col
    assert p["rlnRandomSubset"].tolist() == [1, 2] * 4 + [1]
    np.testing.assert_array_equal(p["rlnAngleRot"], particles["rlnAngleRot"])
    assert o["rlnImageSize"].tolist() == [N]
    rows = [line.split() for line in path.read_text().split("data_particles")[1].splitlines() if "@" in line]
    assert len(rows) == 9 and {r[13] for r in rows} == {"1"} and {r[17] for r in rows} == {"3"}  # written as integers


def test_data_star_converts_pixel_offsets_and_rejects_fractions(tmp_path):
    optics, particles = _particles(4, np.random.default_rng(3))
    px = particles.drop(columns=["rlnOriginXAngst", "rlnOriginYAngst"]).assign(rlnOriginX=[1.0, -2.0, 0.5, 0.0],
                                                                                rlnOriginY=0.0)
    _, p, _ = read_particles(out.write_data_star(tmp_path / "px.star", optics, px))
    assert p["rlnOriginXAngst"].tolist() == [3.0, -6.0, 1.5, 0.0] and "rlnOriginX" not in p
    bad = particles.assign(rlnClassNumber=[1.0, 1.5, 2.0, 1.0])
    with pytest.raises(ValueError, match="rlnClassNumber"):
        out.write_data_star(tmp_path / "bad.star", optics, bad)


def test_output_names():
    names = out.output_names("Refine3D/job001/run", 3, halves=True)
    assert names["data"] == "Refine3D/job001/run_it003_data.star"
    assert names["model"] == ["Refine3D/job001/run_it003_half1_model.star",
                              "Refine3D/job001/run_it003_half2_model.star"]
    assert names["classes"][1] == ["Refine3D/job001/run_it003_half2_class001.mrc"]
    assert names["bild"][0] == ["Refine3D/job001/run_it003_half1_class001_angdist.bild"]
    final = out.output_names("Class3D/job002/run", None, halves=False, n_classes=2)
    assert final["model"] == ["Class3D/job002/run_model.star"]
    assert final["classes"] == [["Class3D/job002/run_class001.mrc", "Class3D/job002/run_class002.mrc"]]


# ----------------------------------------------------------------------------------------------- with RELION


@pytest.mark.relion
@have_relion
def test_relion_star_handler_reads_data_star(tmp_path):
    optics, particles = _particles(11, np.random.default_rng(4))
    out.write_data_star(tmp_path / "run_data.star", optics, particles)
    res = subprocess.run(["relion_star_handler", "--i", "run_data.star", "--o", "out.star"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    o, p, _ = read_particles(tmp_path / "out.star")
    assert len(p) == 11 and list(p.columns) == list(particles.columns)
    assert p["rlnRandomSubset"].tolist() == particles["rlnRandomSubset"].astype(int).tolist()
    assert p["rlnImageName"].tolist() == particles["rlnImageName"].tolist()
    np.testing.assert_allclose(p["rlnAngleTilt"], particles["rlnAngleTilt"], atol=1e-5)  # RELION writes %12.6f
    assert o["rlnImagePixelSize"].tolist() == [APIX]


def _postprocess_golden_halves(tmp_path, noise: float, seed: int, r_in: float, r_out: float, *flags):
    """Two half maps (the golden box-64 reconstruction plus independent noise of ``noise`` times its std) and a soft
    sphere mask (1 inside ``r_in`` px, raised cosine to 0 at ``r_out``) written in ``tmp_path``, and
    ``relion_postprocess`` run on them with ``flags``: ``(halves, apix, mask, postprocess.star's blocks)``."""
    vol, apix = read_map(need_golden() / "recon_box64_ctf.mrc")
    vol = vol.astype(np.float64)
    rng = np.random.default_rng(seed)
    halves = [vol + noise * vol.std() * rng.normal(size=vol.shape) for _ in range(2)]
    for h, m in enumerate(halves, 1):
        write_map(tmp_path / f"run_half{h}_class001_unfil.mrc", m, apix)
    n = vol.shape[0]
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    r = np.sqrt(x * x + y * y + z * z)
    mask = np.where(r < r_in, 1.0, np.where(r < r_out, 0.5 + 0.5 * np.cos(np.pi * (r - r_in) / (r_out - r_in)), 0.0))
    write_map(tmp_path / "mask.mrc", mask, apix)
    (tmp_path / "PostProcess").mkdir()  # RELION 3.1 writes logfile.pdf next to --o: its folder must exist
    res = subprocess.run(
        ["relion_postprocess", "--i", "run_half1_class001_unfil.mrc", "--o", "PostProcess/postprocess",
         "--angpix", str(apix), "--mask", "mask.mrc", *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return halves, apix, read_map(tmp_path / "mask.mrc")[0], read_star(tmp_path / "PostProcess" / "postprocess.star")


@pytest.mark.relion
@have_relion
def test_relion_postprocess_reads_half_maps(tmp_path):
    halves, apix, _, blocks = _postprocess_golden_halves(tmp_path, 5.0, 5, 20, 26, "--auto_bfac")
    general = blocks["general"].iloc[0]
    assert general["rlnUnfilteredMapHalf2"] == "run_half2_class001_unfil.mrc"  # found from the half-1 name
    assert 2 * apix <= general["rlnFinalResolution"] < 30.0
    # RELION's unmasked FSC of our two files equals ours: same voxel order, origin and pixel size
    ours = fsc(halves[0], halves[1])
    np.testing.assert_allclose(blocks["fsc"]["rlnFourierShellCorrelationUnmaskedMaps"], ours, atol=1e-4)


@pytest.mark.relion
@have_relion
def test_solvent_corrected_fsc_follows_relion_postprocess(tmp_path):
    # oracle: relion_postprocess 3.1.3 on the same half maps and mask -- the unmasked and masked FSC, the shell
    # where phases are randomised (the unmasked FSC's first value below 0.8), and, below two shells past it, the
    # corrected FSC of --solvent_correct_fsc exactly; beyond, the phase-randomised FSC is random (RELION's generator
    # against ours): RELION's curve must lie within 3 standard deviations of the mean of 12 of our draws
    from gerelion_dask.ops.fsc import solvent_corrected_fsc

    halves, _, m, blocks = _postprocess_golden_halves(tmp_path, 2.0, 7, 14, 17, "--adhoc_bfac", "0")
    t = blocks["fsc"]
    n = m.shape[0]
    draws = [solvent_corrected_fsc(halves[0], halves[1], m, np.random.default_rng(seed)) for seed in range(12)]
    true, at, unmasked, masked, rand = draws[0]
    assert 2 < at < n // 2 - 4  # the unmasked FSC falls below 0.8 inside the box
    assert all(d[1] == at for d in draws)
    np.testing.assert_allclose(t["rlnFourierShellCorrelationMaskedMaps"], masked, atol=1e-4)
    np.testing.assert_allclose(t["rlnFourierShellCorrelationUnmaskedMaps"], unmasked, atol=1e-4)
    rel_true = t["rlnFourierShellCorrelationCorrected"].to_numpy()
    np.testing.assert_allclose(rel_true[: at + 2], true[: at + 2], atol=1e-4)
    for column, k in (("rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps", 4),
                      ("rlnFourierShellCorrelationCorrected", 0)):
        ours = np.array([d[k] for d in draws])[:, at + 2:]
        rel = t[column].to_numpy()[at + 2:]
        assert (np.abs(rel - ours.mean(axis=0)) <= 3 * ours.std(axis=0) + 0.01).all(), column
    assert np.abs(masked[at + 2:] - true[at + 2:]).max() > 0.02  # the correction acted (the mask is a tight sphere)
