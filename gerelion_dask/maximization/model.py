"""The model of one iteration (RELION ``MlModel``): a new immutable instance per iteration.

``maps[h][c]`` is the real-space map of class c for half set h (two halves in auto-refine, one set in
classification).  Spectra are float64 arrays over shells 0..N/2.

Every parameter is kept per half set, as RELION 3.1's gold-standard auto-refine keeps two models (ALGORITHM.md §6.2
step 10; its MPI followers add the weighted sums of their own half set only, and each half's model.star differs):
the maps, tau^2, sigma2_recon, and also the "other parameters" -- class fractions, direction priors, noise spectra,
the offset prior, the average norm correction, the scale corrections and the log-likelihood -- come from that half's
particles alone (the final iteration joins the halves' sums, so both are then equal).  Two things are shared as in
RELION: data_vs_prior (half 1's, also used by half 2, so the resolution and image size agree) and the average Pmax
(half 1's, which the image-size rule reads).  Per-half arrays have the half index first.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..backend import SizedByArrays

__all__ = ["Model", "replace"]


@dataclass(frozen=True)
class Model(SizedByArrays):
    ori_size: int
    pixel_size: float
    maps: list  # [half][class] -> (N, N, N) float64 host arrays (None = empty class)
    pdf_class: np.ndarray  # (H, K)
    pdf_direction: np.ndarray  # (H, K, n_dir)
    sigma2_noise: np.ndarray  # (H, n_optics, N/2+1)
    tau2: np.ndarray  # (H, K, N/2+1)
    data_vs_prior: np.ndarray  # (H, K, N/2+1)
    fsc: np.ndarray  # (K, N/2+1) gold-standard FSC between halves (zeros in classification)
    sigma2_recon: np.ndarray  # (H, K, N/2+1)
    sigma_offset_angst: np.ndarray  # (H,)
    avg_norm: np.ndarray  # (H,)
    scales: np.ndarray  # (H, n_groups)
    current_resolution: float  # 1/Å
    loglik: np.ndarray = field(default_factory=lambda: np.zeros(1))  # (H,)
    ave_pmax: float = 0.0  # half 1's (RELION broadcasts it to half 2)
    tau2_fudge: float = 1.0
    acc_rot: np.ndarray = field(default_factory=lambda: np.zeros(1))
    acc_trans_angst: np.ndarray = field(default_factory=lambda: np.zeros(1))
    # (H, K, N/2+1): per shell, the fraction of the reconstruction's voxels whose evidence outweighs the prior (RELION's
    # fourier_coverage, model.star's rlnFourierCompleteness); None before the first M-step and in checkpoints of
    # gerelion versions that did not keep it
    fourier_coverage: np.ndarray | None = None

    @property
    def n_classes(self) -> int:
        return len(self.maps[0])

    @property
    def n_halves(self) -> int:
        return len(self.maps)

    def overall_accuracy(self) -> tuple[float, float]:
        """The run's accuracy (RELION's overall one: the best class's), ``(rotations deg, translations Å)``: what
        auto-sampling uses and optimiser.star reports."""
        return float(np.min(self.acc_rot)), float(np.min(self.acc_trans_angst))

    def class_fractions(self) -> np.ndarray:
        """The run's class fractions (half 1's, as RELION's run reports them): ``(K,)``."""
        return np.asarray(self.pdf_class[0])

    def resolution_angst(self) -> float:
        return 1.0 / self.current_resolution if self.current_resolution > 0 else float("inf")
