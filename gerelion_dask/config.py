"""Validated settings of a refinement or classification job, named after ``relion_refine``'s flags.

A :class:`JobConfig` is frozen; :func:`JobConfig.validate` turns impossible combinations into one-line
:class:`~gerelion_dask.errors.InputError` messages (the command line exits with code 2 on them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from .errors import InputError

__all__ = ["COARSE_PRECISIONS", "JobConfig", "local_widths"]

# --coarse_precision: the coarse pass's products (auto: float64 on a CPU and on GPUs with fast double precision)
COARSE_PRECISIONS = ("auto", "float32", "float64")


def local_widths(cfg) -> tuple[float, float]:
    """``(direction, psi)`` widths (degrees) of a job's local searches from its first iteration, or ``(0, 0)``:
    ``--sigma_ang`` for all three angles; else ``--sigma_rot`` / ``--sigma_tilt`` (the larger, as RELION's
    ``selectOrientationsWithNonZeroPriorProbability`` takes it when both are set) and ``--sigma_psi`` (<= 0: every
    psi).  Works on a :class:`JobConfig` or any object with those attributes."""
    ang = float(getattr(cfg, "sigma_ang", 0.0) or 0.0)
    if ang > 0:
        return ang, ang
    rot, tilt, psi = (float(getattr(cfg, k, -1.0)) for k in ("sigma_rot", "sigma_tilt", "sigma_psi"))
    d = max(rot, tilt)
    return (d, max(psi, 0.0)) if d > 0 else (0.0, 0.0)


@dataclass(frozen=True)
class JobConfig:
    i: str  # particles STAR
    o: str  # output root, e.g. Refine3D/job001/run
    ref: str  # initial reference MRC
    auto_refine: bool = False
    split_random_halves: bool = False
    K: int = 1
    iter: int = 25  # classification iterations (RELION CLI default 50; GUI Class3D 25)
    ini_high: float = 0.0
    particle_diameter: float = 0.0  # Å, 0 = box * pixel size
    ctf: bool = False
    ctf_corrected_ref: bool = False
    ctf_intact_first_peak: bool = False
    ctf_phase_flipped: bool = False
    only_flip_phases: bool = False
    firstiter_cc: bool = False
    healpix_order: int = 2
    oversampling: int = 1
    offset_range: float = 6.0  # pixels
    offset_step: float = 2.0  # pixels
    sym: str = "C1"
    tau2_fudge: float = 1.0
    low_resol_join_halves: float = 0.0
    auto_local_healpix_order: int = 4
    flatten_solvent: bool = False
    solvent_mask: str = ""  # map (values in [0, 1]) that --flatten_solvent multiplies the references by; "": a sphere
    solvent_mask2: str = ""  # map (values in [0, 1]) whose region --flatten_solvent sets to its own average density
    lowpass_mask: str = ""  # map (values in [0, 1]) whose region --flatten_solvent keeps, low-pass filtered at lowpass
    lowpass: float = 0.0  # Å: that filter's resolution (RELION's --lowpass; needed with lowpass_mask)
    solvent_correct_fsc: bool = False  # auto-refine: gold-standard FSC of half maps masked by solvent_mask, corrected
    trust_ref_size: bool = False  # a reference whose header voxel size differs from the particles' is used as it is
    ref_angpix: float = -1.0  # Å > 0: the reference's voxel size instead of its header's (RELION's --ref_angpix)
    dont_check_norm: bool = False  # no warning about images whose background is not normalised (RELION's flag)
    skip_align: bool = False  # classification without alignment: the particles keep their poses (RELION)
    limit_tilt: float = -91.0  # degrees: > 0 keeps side views (|tilt| >= it), < 0 top views; |limit| >= 90: all
    skip_rotate: bool = False  # classification with translational searches only: the particles keep their angles
    coarse_size: int = -1  # pixels > 0: the most the coarse pass's image size may be (RELION's --coarse_size)
    strict_highres_exp: float = -1.0  # Å > 0: the E-step's probabilities from frequencies up to this resolution
    strict_lowres_exp: float = -1.0  # Å > 0: the E-step's references carry no frequencies up to this resolution
    zero_mask: bool = False
    norm: bool = False
    scale: bool = False
    random_seed: int = -1
    pad: float = 2.0
    adaptive_fraction: float = 0.999
    maxsig: int = -1
    coarse_precision: str = "auto"  # the coarse pass's GEMMs: one of COARSE_PRECISIONS (auto: fine.fine_limits)
    offset: float = 10.0  # sigma of the offset prior, Å
    perturb: float = 0.5
    incr_size: int = 10
    maskedge: float = 5.0
    sigma_ang: float = 0.0  # local angular searches in classification
    sigma_rot: float = -1.0  # RELION's per-angle widths (without --sigma_ang): directions take max(rot, tilt) ...
    sigma_tilt: float = -1.0
    sigma_psi: float = -1.0  # ... and psi its own (<= 0: every psi)
    auto_iter_max: int = 999
    pool: int = 0  # particles per E-step task (0: chosen for the device, plan.task_pool_size)
    dont_skip_gridding: bool = False
    fix_sigma_noise: bool = False
    fix_sigma_offset: bool = False
    overwrite: bool = False

    def validate(self) -> JobConfig:
        if self.K < 1:
            raise InputError(None, f"--K {self.K}: the number of classes must be at least 1", "use --K 1 or more")
        if self.auto_refine and self.K != 1:
            raise InputError(None, f"--auto_refine with --K {self.K}: auto-refine refines one class", "use --K 1")
        if self.skip_align and self.auto_refine:
            raise InputError(None, "--skip_align is for classification without alignment (gerelion classify), not "
                             "for auto-refine")
        if self.sigma_ang <= 0 and max(self.sigma_rot, self.sigma_tilt, self.sigma_psi) > 0:
            if (self.sigma_rot > 0) != (self.sigma_tilt > 0):
                raise InputError(None, "--sigma_rot or --sigma_tilt alone: RELION's rot-only and tilt-only priors "
                                 "are not implemented", "give both (the directions take the larger) or --sigma_ang")
            if self.sigma_rot <= 0:
                raise InputError(None, "--sigma_psi without --sigma_rot and --sigma_tilt (local psi, every "
                                 "direction) is not implemented", "add --sigma_rot and --sigma_tilt, or use --sigma_ang")
        if self.coarse_size > 0 and self.coarse_size % 2:
            raise InputError(None, f"--coarse_size {self.coarse_size} must be even (an image size)",
                             f"use --coarse_size {self.coarse_size + 1}")
        if self.skip_rotate and self.auto_refine:
            raise InputError(None, "--skip_rotate is for classification with translational searches only (gerelion "
                             "classify), not for auto-refine")
        if self.auto_refine and not self.split_random_halves:
            raise InputError(None, "--auto_refine needs --split_random_halves (gold-standard refinement)",
                             "add --split_random_halves")
        if not 0 <= self.healpix_order <= 8:
            raise InputError(None, f"--healpix_order {self.healpix_order} is out of range", "use 0..8")
        if self.oversampling != 1:
            raise InputError(None, f"--oversampling {self.oversampling} is not supported", "use --oversampling 1")
        if self.offset_range < 0 or self.offset_step <= 0:
            raise InputError(None, f"--offset_range {self.offset_range} / --offset_step {self.offset_step}: the range "
                             "must be >= 0 and the step > 0 (pixels)", "e.g. --offset_range 5 --offset_step 1")
        if self.tau2_fudge <= 0:
            raise InputError(None, f"--tau2_fudge {self.tau2_fudge} must be positive")
        if self.coarse_precision not in COARSE_PRECISIONS:
            raise InputError(None, f"--coarse_precision {self.coarse_precision} is not one of "
                             f"{', '.join(COARSE_PRECISIONS)}")
        if not 0 < self.adaptive_fraction <= 1:
            raise InputError(None, f"--adaptive_fraction {self.adaptive_fraction} must be in (0, 1]")
        if self.iter < 1 and not self.auto_refine:
            raise InputError(None, f"--iter {self.iter} must be at least 1")
        if self.pool < 0:
            raise InputError(None, f"--pool {self.pool} must be at least 1 (or 0: chosen for the device)")
        if self.particle_diameter < 0:
            raise InputError(None, f"--particle_diameter {self.particle_diameter} must be positive (Å)")
        if self.pad < 1:
            raise InputError(None, f"--pad {self.pad} must be >= 1")
        from .ops.symmetry import symmetry_operators

        try:
            symmetry_operators(self.sym)
        except InputError as e:  # name the flag: the message of ops.symmetry names only the group
            raise InputError(None, f"--sym {self.sym}: {e.problem}", e.hint) from None
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @staticmethod
    def from_dict(d: dict) -> JobConfig:
        names = {f.name for f in fields(JobConfig)}
        return JobConfig(**{k: v for k, v in d.items() if k in names})
