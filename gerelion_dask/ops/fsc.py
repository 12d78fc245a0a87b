"""Fourier shell correlation and resolution (ALGORITHM.md §6.3, §8).

Shells are 1 Fourier pixel wide with the radius rounded to the nearest integer (``round(|k|)``), as in RELION's
``getFSC`` and in golden/checks.json.  ``FSC(0)`` is 1 by definition.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_xp
from .reconstruct import shell_index

__all__ = ["fsc", "fsc_fourier", "fsc_from_backprojections", "randomize_phases_beyond", "resolution_at",
           "shell_resolution_angst", "shell_of_resolution", "solvent_corrected_fsc"]

# the unmasked FSC below which phases are randomised for the solvent correction (RELION's postprocessing and
# --solvent_correct_fsc)
RANDOMIZE_BELOW = 0.8


def _shells_full(n: int, xp):
    c = xp.fft.fftfreq(n) * n
    r = xp.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, : n // 2 + 1] ** 2)
    return xp.floor(r + 0.5).astype(np.int64)


def fsc_fourier(F1, F2, shells, n_shells: int):
    """FSC of two transforms given the shell index of every element (elements with shell >= n_shells ignored)."""
    xp = get_xp(F1, F2)
    sel = shells < n_shells
    s = shells[sel]
    a, b = F1[sel], F2[sel]
    num = xp.bincount(s, weights=(a * xp.conj(b)).real.astype(np.float64), minlength=n_shells)
    d1 = xp.bincount(s, weights=(xp.abs(a) ** 2).astype(np.float64), minlength=n_shells)
    d2 = xp.bincount(s, weights=(xp.abs(b) ** 2).astype(np.float64), minlength=n_shells)
    den = xp.sqrt(d1 * d2)
    out = xp.where(den > 0, num / xp.where(den > 0, den, 1.0), 0.0)
    out[0] = 1.0
    return out


def fsc(map1, map2):
    """FSC of two real maps ``(N, N, N)``, shells 0..N/2 (shape ``(N//2 + 1,)``)."""
    xp = get_xp(map1, map2)
    n = map1.shape[-1]
    F1 = xp.fft.rfftn(map1)
    F2 = xp.fft.rfftn(map2)
    return fsc_fourier(F1, F2, _shells_full(n, xp), n // 2 + 1)


def randomize_phases_beyond(vol, shell: int, rng):
    """``vol`` with a uniformly random phase for every Fourier component at ``|k|^2 >= shell^2`` (amplitudes kept;
    RELION's ``randomizePhasesBeyond``).  ``rng``: a NumPy ``Generator`` (the phases are drawn on the host, so
    NumPy and CuPy give the same map)."""
    xp = get_xp(vol)
    n = vol.shape[-1]
    F = xp.fft.rfftn(vol)
    c = xp.fft.fftfreq(n) * n
    k2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + (xp.arange(n // 2 + 1, dtype=np.float64) ** 2)[None, None]
    sel = k2 >= shell * shell
    phase = xp.asarray(rng.uniform(0.0, 2.0 * np.pi, int(sel.sum())))
    F[sel] = xp.abs(F[sel]) * xp.exp(1j * phase)
    return xp.fft.irfftn(F, s=vol.shape, axes=(0, 1, 2))


def solvent_corrected_fsc(map1, map2, mask, rng):
    """Gold-standard FSC of two unregularised half maps corrected for the convolution of a solvent mask by phase
    randomisation (RELION's postprocessing and ``--solvent_correct_fsc``, ALGORITHM.md §6.3, §8): beyond the first
    shell where the unmasked FSC falls below 0.8 (``randomize_at``) both maps get random phases, are masked, and
    ``FSC_true = (FSC_masked - FSC_random) / (1 - FSC_random)`` (0 where the random one is higher) from two shells
    past that point; below it the masked FSC.  Without such a shell the unmasked FSC is returned (``randomize_at``
    -1).  Returns ``(fsc_true, randomize_at, fsc_unmasked, fsc_masked, fsc_random)`` as host arrays."""
    from ..backend import to_host

    xp = get_xp(map1, map2)
    mask = xp.asarray(mask)
    unmasked = to_host(fsc(map1, map2))
    masked = to_host(fsc(map1 * mask, map2 * mask))
    below = np.flatnonzero((np.arange(len(unmasked)) > 0) & (unmasked < RANDOMIZE_BELOW))
    if not len(below):
        return unmasked, -1, unmasked, masked, np.zeros_like(unmasked)
    at = int(below[0])
    r1 = randomize_phases_beyond(map1, at, rng) * mask
    r2 = randomize_phases_beyond(map2, at, rng) * mask
    rand = to_host(fsc(r1, r2))
    i = np.arange(len(masked))
    with np.errstate(divide="ignore", invalid="ignore"):
        corrected = np.where((rand > masked) | (rand >= 1.0), 0.0, (masked - rand) / (1.0 - rand))
    return np.where(i < at + 2, masked, corrected), at, unmasked, masked, rand


def fsc_from_backprojections(bp1, bp2):
    """Gold-standard FSC during refinement from the accumulated half-set arrays (RELION ``getDownsampledAverage``).

    Each half is down-sampled to the original grid by summing padded voxels into ``round(q/p)`` (data and weight
    separately), then ``Z = sum D / sum W`` (0 where no weight).  Shells ``0..r_max``.
    """
    xp = get_xp(bp1.data)
    grid = bp1.grid
    shell, inside, r = shell_index(grid, xp)
    from .fourier import layout_coordinates

    kz, ky, kx = layout_coordinates(grid.r_pad, xp)
    p = grid.padding
    r_max = grid.r_max
    dz = xp.floor(kz / p + 0.5).astype(np.int64)
    dy = xp.floor(ky / p + 0.5).astype(np.int64)
    dx = xp.floor(kx / p + 0.5).astype(np.int64)
    m = 2 * r_max + 3
    flat = ((dz + r_max + 1) * m + (dy + r_max + 1)) * (r_max + 2) + dx
    flat = xp.broadcast_to(flat, bp1.data.shape)
    sel = inside & (shell <= r_max)
    idx = flat[sel]
    size = m * m * (r_max + 2)

    def down(bp):
        d = bp.data[sel]
        dr = xp.bincount(idx, weights=d.real, minlength=size)
        di = xp.bincount(idx, weights=d.imag, minlength=size)
        w = xp.bincount(idx, weights=bp.weight[sel].astype(np.float64), minlength=size)
        return xp.where(w > 0, (dr + 1j * di) / xp.where(w > 0, w, 1.0), 0)

    z1, z2 = down(bp1), down(bp2)
    c = xp.arange(m) - (r_max + 1)
    rr = xp.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + xp.arange(r_max + 2)[None, None, :] ** 2)
    sh = xp.floor(rr + 0.5).astype(np.int64).reshape(-1)
    return fsc_fourier(z1, z2, sh, r_max + 1)


def shell_resolution_angst(shell, box_size: int, pixel_size: float):
    """Resolution in Å of Fourier shell ``shell`` of an N-box (``N a / shell``; inf for shell 0)."""
    shell = np.asarray(shell, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(shell > 0, box_size * pixel_size / np.where(shell > 0, shell, 1), np.inf)


def shell_of_resolution(resolution_angst: float, box_size: int, pixel_size: float) -> int:
    """Nearest shell of a resolution in Å (``round(N a / res)``)."""
    return int(round(box_size * pixel_size / resolution_angst))


def resolution_at(curve, threshold: float, box_size: int, pixel_size: float) -> float:
    """Resolution (Å) of the last shell before the FSC first drops below ``threshold`` (Nyquist if it never does)."""
    c = np.asarray(curve, dtype=np.float64)
    below = np.nonzero(c[1:] < threshold)[0]
    shell = (below[0] + 1 - 1) if below.size else len(c) - 1
    shell = max(shell, 1)
    return float(box_size * pixel_size / shell)
