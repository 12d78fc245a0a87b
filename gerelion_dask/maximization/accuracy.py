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

from ..backend import get_xp, to_host
from ..conventions import euler_to_matrix, shift_phase_2d
from ..expectation.fine import project_row_bytes
from ..ops.ctf import CtfParams, ctf_rfft
from ..ops.fourier import shells_2d
from ..ops.projector import FourierReference, project

__all__ = ["EMPTY_CLASS", "MIN_CLASS_FRACTION", "class_accuracies", "error_steps", "estimate_accuracies"]

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
                        ori_size: int, pixel_size: float, rng: np.random.Generator, n_max: int = 100,
                        chunk_bytes: int = 8 << 20):
    """Mean angular (deg) and translational (Å) accuracy over up to ``n_max`` particles.

    Computed on the reference's backend (NumPy or CuPy).  The particles' projections (their pose and each angular
    error) are made in chunks of particles whose slices hold at most ``chunk_bytes`` of the projector's working
    memory (at least one particle a chunk); chunks change nothing but the speed (NumPy, 100 particles at 42 px:
    0.49 s in chunks of 8 MiB or less, 0.65 s in one chunk or a loop over particles)."""
    xp = get_xp(ref.data)
    n = current_size
    shells = shells_2d(n)
    m = (shells >= 1) & (shells <= n // 2)  # RELION sums every window pixel but the DC (kx = 0 twins included)
    mx = xp.asarray(m)
    w = xp.asarray(1.0 / (2.0 * np.asarray(sigma2, dtype=np.float64)[shells[m]]))
    k = min(n_max, len(angles))
    pick = rng.choice(len(angles), size=k, replace=False) if len(angles) > k else np.arange(k)
    ran = rng.uniform(size=k)  # one draw per particle picks the angle (rot, tilt, psi) and the shift axis (x, y)
    axis = np.minimum((ran * 3).astype(np.int64), 2)
    ang = np.asarray(angles, dtype=np.float64)[pick]  # (k, 3)
    wc = w[None, :] * (ctf_rfft(ctf.take(pick), n, pixel_size, ori_size, xp=xp)[:, mx] ** 2 if ctf is not None
                       else xp.ones((k, int(m.sum()))))  # (k, M)
    # |1 - phase|^2 of the shift errors along x and along y, (2, S, M)
    shifted = xp.stack([xp.abs(1.0 - shift_phase_2d(n, ori_size, xp.asarray(_SHIFTS[:, None] * d[None]))[:, mx]) ** 2
                        for d in (np.array([1.0, 0.0]), np.array([0.0, 1.0]))])
    along_y = xp.asarray((ran >= 0.5).astype(np.int64))
    E = len(_ANGLES) + 1  # each particle's pose, then its pose with every angular error
    per = max(1, int(chunk_bytes // (E * project_row_bytes(n, xp is not np))))
    d_rot, d_shift = [], []
    for lo in range(0, k, per):
        J = np.arange(lo, min(k, lo + per))
        e = np.zeros((len(J), E, 3))
        e[np.arange(len(J))[:, None], np.arange(1, E)[None, :], axis[J][:, None]] = _ANGLES[None, :]
        a = ang[J][:, None, :] + e  # (b, E, 3)
        A = euler_to_matrix(a[..., 0].ravel(), a[..., 1].ravel(), a[..., 2].ravel())
        P = project(ref, A, n)[:, mx].reshape(len(J), E, -1)
        Jx = xp.asarray(J)
        d_rot.append(to_host((wc[Jx][:, None, :] * xp.abs(P[:, 1:] - P[:, :1]) ** 2).sum(axis=2)))
        d_shift.append(to_host((wc[Jx][:, None, :] * xp.abs(P[:, 0])[:, None, :] ** 2 * shifted[along_y[Jx]])
                               .sum(axis=2)))
        del P
    acc_r = _first_past(np.concatenate(d_rot), _ANGLES)
    acc_t = _first_past(np.concatenate(d_shift), _SHIFTS) * pixel_size
    return float(np.mean(acc_r)), float(np.mean(acc_t))


def _first_past(d: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Per row of ``d (b, S)``: the first of ``steps`` whose value exceeds ln(100), else the last step."""
    hit = d > np.log(100.0)
    return np.where(hit.any(axis=1), steps[np.argmax(hit, axis=1)], steps[-1])


def class_accuracies(specs, angles, ctf: CtfParams | None, sigma2, current_size: int, ori_size: int,
                     pixel_size: float, seeds, xp=np) -> list[tuple[float, float]]:
    """:func:`estimate_accuracies` of every class, ``(rotation deg, translation Å)`` each, on ``xp``: ``specs`` are
    the classes' :class:`~gerelion_dask.ops.projector.ReferenceSpec` (built on ``xp`` here; ``None``: a class that
    is not estimated, :data:`EMPTY_CLASS`), ``seeds`` their random generators' seeds."""
    return [(EMPTY_CLASS, EMPTY_CLASS) if spec is None else
            estimate_accuracies(spec.build(xp), angles, ctf, sigma2, current_size, ori_size, pixel_size,
                                np.random.default_rng(seed))
            for spec, seed in zip(specs, seeds, strict=True)]
