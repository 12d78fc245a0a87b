"""Estimated accuracies of rotations and translations (RELION ``calculateExpectedAngularErrors``, §5.7).

For up to 100 particles at their current pose: the smallest angular error (about rot, tilt or psi, chosen at
random per particle) and the smallest shift error for which the CTF-weighted squared difference between the
reference projections, summed over the current window and divided by 2 sigma^2, exceeds ln(100).  Returns the mean
over particles (degrees, Å).
"""

from __future__ import annotations

import numpy as np

from ..conventions import euler_to_matrix, shift_phase_2d
from ..ops.ctf import CtfParams, ctf_rfft
from ..ops.fourier import likelihood_pixels, shells_2d
from ..ops.projector import FourierReference, project

__all__ = ["estimate_accuracies"]

_ANGLES = np.concatenate([np.arange(0.05, 1.0, 0.05), np.arange(1.0, 5.0, 0.25), np.arange(5.0, 30.01, 1.0)])
_SHIFTS = np.concatenate([np.arange(0.1, 2.0, 0.1), np.arange(2.0, 10.01, 0.5)])


def estimate_accuracies(ref: FourierReference, angles, ctf: CtfParams | None, sigma2, current_size: int,
                        ori_size: int, pixel_size: float, rng: np.random.Generator, n_max: int = 100):
    """Mean angular (deg) and translational (Å) accuracy over up to ``n_max`` particles."""
    n = current_size
    m = likelihood_pixels(n)
    sh = shells_2d(n)[m]
    w = 1.0 / (2.0 * np.asarray(sigma2)[sh])
    k = min(n_max, len(angles))
    pick = rng.choice(len(angles), size=k, replace=False) if len(angles) > k else np.arange(k)
    acc_r, acc_t = [], []
    for i in pick:
        rot, tilt, psi = angles[i]
        if ctf is not None:
            c = ctf_rfft(ctf.take([i]), n, pixel_size, ori_size)[0][m]
        else:
            c = np.ones(m.sum())
        axis = rng.integers(3)
        e = np.zeros((len(_ANGLES), 3))
        e[:, axis] = _ANGLES
        A = euler_to_matrix(np.r_[rot, rot + e[:, 0]], np.r_[tilt, tilt + e[:, 1]], np.r_[psi, psi + e[:, 2]])
        P = project(ref, A, n)[:, m]
        d = (w * c * c * np.abs(P[1:] - P[0]) ** 2).sum(axis=1)
        hit = np.nonzero(d > np.log(100.0))[0]
        acc_r.append(_ANGLES[hit[0]] if hit.size else _ANGLES[-1])
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction)
        ph = shift_phase_2d(n, ori_size, _SHIFTS[:, None] * direction[None])[:, m]
        d = (w * c * c * np.abs(P[0]) ** 2 * np.abs(1 - ph) ** 2).sum(axis=1)
        hit = np.nonzero(d > np.log(100.0))[0]
        acc_t.append((_SHIFTS[hit[0]] if hit.size else _SHIFTS[-1]) * pixel_size)
    return float(np.mean(acc_r)), float(np.mean(acc_t))
