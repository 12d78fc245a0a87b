"""Estimated accuracies of rotations and translations (RELION ``calculateExpectedAngularErrors``, §5.7).

For up to 100 particles at their current pose: the smallest angular error (about rot, tilt or psi, one chosen at
random per particle) and the smallest shift error (along x or y) for which the CTF-weighted squared difference
between the reference projections, summed over the current window and divided by 2 sigma^2, exceeds ln(100).  The
errors grow in RELION's steps (:func:`error_steps`: 0.05 deg at first, 5 deg from 20 deg on, up to past 30 deg;
0.1 px at first, 2 px from 10 px on) and an error that never reaches the threshold counts as the step past the
limit, as in RELION.  Returns the mean over particles (degrees, Å) for one class's reference; classes with a
distribution below 0.01 get 999 (:data:`EMPTY_CLASS`), and the overall accuracy is the minimum over classes.
"""

from __future__ import annotations

import numpy as np

from ..conventions import euler_to_matrix, shift_phase_2d
from ..ops.ctf import CtfParams, ctf_rfft
from ..ops.fourier import shells_2d
from ..ops.projector import FourierReference, project

__all__ = ["EMPTY_CLASS", "MIN_CLASS_FRACTION", "error_steps", "estimate_accuracies"]

EMPTY_CLASS = 999.0  # RELION's accuracy of a class with pdf_class < 0.01 (not estimated)
MIN_CLASS_FRACTION = 0.01


def error_steps(kind: str) -> np.ndarray:
    """The errors RELION tries in turn, made as it makes them (each step added to the last in float64): angles
    (deg) in steps of 0.05 below 0.2, 0.1 below 1, 0.2 below 2, 0.5 below 5, 1 below 10, 2 below 20, else 5, the
    last one past 30; shifts (px) in steps of 0.1 below 1, 0.2 below 2, 0.5 below 5, 1 below 10, else 2, the last
    one past 10."""
    rules = {"angle": ((0.2, 0.05), (1.0, 0.1), (2.0, 0.2), (5.0, 0.5), (10.0, 1.0), (20.0, 2.0), (np.inf, 5.0)),
             "shift": ((1.0, 0.1), (2.0, 0.2), (5.0, 0.5), (10.0, 1.0), (np.inf, 2.0))}[kind]
    limit = 30.0 if kind == "angle" else 10.0
    out, e = [], 0.0
    while True:
        e += next(step for below, step in rules if e < below)
        out.append(e)
        if e > limit:
            return np.array(out)


_ANGLES = error_steps("angle")
_SHIFTS = error_steps("shift")


def estimate_accuracies(ref: FourierReference, angles, ctf: CtfParams | None, sigma2, current_size: int,
                        ori_size: int, pixel_size: float, rng: np.random.Generator, n_max: int = 100):
    """Mean angular (deg) and translational (Å) accuracy over up to ``n_max`` particles."""
    n = current_size
    shells = shells_2d(n)
    m = (shells >= 1) & (shells <= n // 2)  # RELION sums every window pixel but the DC (kx = 0 twins included)
    sh = shells[m]
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
        ran = rng.uniform()  # one draw per particle picks the angle (rot, tilt, psi) and the shift axis (x, y)
        axis = min(int(ran * 3), 2)
        e = np.zeros((len(_ANGLES), 3))
        e[:, axis] = _ANGLES
        A = euler_to_matrix(np.r_[rot, rot + e[:, 0]], np.r_[tilt, tilt + e[:, 1]], np.r_[psi, psi + e[:, 2]])
        P = project(ref, A, n)[:, m]
        d = (w * c * c * np.abs(P[1:] - P[0]) ** 2).sum(axis=1)
        hit = np.nonzero(d > np.log(100.0))[0]
        acc_r.append(_ANGLES[hit[0]] if hit.size else _ANGLES[-1])
        direction = np.array([1.0, 0.0]) if ran < 0.5 else np.array([0.0, 1.0])
        ph = shift_phase_2d(n, ori_size, _SHIFTS[:, None] * direction[None])[:, m]
        d = (w * c * c * np.abs(P[0]) ** 2 * np.abs(1 - ph) ** 2).sum(axis=1)
        hit = np.nonzero(d > np.log(100.0))[0]
        acc_t.append((_SHIFTS[hit[0]] if hit.size else _SHIFTS[-1]) * pixel_size)
    return float(np.mean(acc_r)), float(np.mean(acc_t))
