"""The model of one iteration (RELION ``MlModel``): a new immutable instance per iteration.

``maps[h][c]`` is the real-space map of class c for half set h (two halves in auto-refine, one set in
classification).  Spectra are float64 arrays over shells 0..N/2.  Parameters that carry no structural information
(noise spectra, offsets prior, norm, scales, direction priors) are estimated from both halves together; the maps,
tau^2, the SSNR and the FSC stay per half (gold standard).
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
    pdf_class: np.ndarray  # (K,)
    pdf_direction: np.ndarray  # (K, n_dir)
    sigma2_noise: np.ndarray  # (n_optics, N/2+1)
    tau2: np.ndarray  # (H, K, N/2+1)
    data_vs_prior: np.ndarray  # (H, K, N/2+1)
    fsc: np.ndarray  # (K, N/2+1) gold-standard FSC between halves (zeros in classification)
    sigma2_recon: np.ndarray  # (H, K, N/2+1)
    sigma_offset_angst: float
    avg_norm: float
    scales: np.ndarray  # (n_groups,)
    current_resolution: float  # 1/Å
    loglik: float = 0.0
    ave_pmax: float = 0.0
    tau2_fudge: float = 1.0
    acc_rot: np.ndarray = field(default_factory=lambda: np.zeros(1))
    acc_trans_angst: np.ndarray = field(default_factory=lambda: np.zeros(1))

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

    def resolution_angst(self) -> float:
        return 1.0 / self.current_resolution if self.current_resolution > 0 else float("inf")
