"""Contrast transfer function in RELION's convention (ALGORITHM.md §2; RELION ``CTF::getCTF`` in ctf.h).

``CTF(u) = -sin(gamma(u)) * exp(-B u^2 / 4) * scale`` with
``gamma = -pi lambda dz(alpha) u^2 + pi/2 Cs lambda^3 u^4 - phase_shift - atan(Q0 / sqrt(1 - Q0^2))``,
``dz(alpha) = (U + V)/2 + (U - V)/2 cos(2 (alpha - angle))`` (U, V > 0 = underfocus).  So ``CTF(0) = +Q0`` for no
phase shift, and particles are bright.  Verified against ``relion_ctf_toolbox --simulate`` images and
``relion_project --ctf`` of a delta map in ``tests/test_relion_golden.py`` (to 1e-5; the agreement is ~1e-7).

RELION 3.1+ clamps ``|CTF| < 1e-8`` to ``+-1e-8``; we do the same so divisions by the CTF never produce inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import get_xp
from ..conventions import freq_indices_2d

__all__ = ["CtfParams", "electron_wavelength", "ctf_2d", "ctf_rfft"]


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (RELION's formula)."""
    v = voltage_kv * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + 0.978466e-6 * v))


@dataclass(frozen=True)
class CtfParams:
    """Per-particle CTF parameters, as arrays of length n (or scalars).

    Units are in the names: defocus in Å, angles in degrees, Cs in mm, voltage in kV, B in Å^2.
    """

    defocus_u_angst: object
    defocus_v_angst: object
    defocus_angle_deg: object
    voltage_kv: object = 300.0
    cs_mm: object = 2.7
    amplitude_contrast: object = 0.1
    phase_shift_deg: object = 0.0
    bfactor_angst2: object = 0.0
    scale: object = 1.0

    def take(self, rows) -> CtfParams:
        """The parameters of the particles ``rows`` (index array, slice or mask); scalar fields stay scalars."""
        return CtfParams(*(np.asarray(v)[rows] if np.ndim(v) else v
                           for v in (getattr(self, f) for f in self.__dataclass_fields__)))


def _col(xp, v, dtype):
    a = xp.asarray(v, dtype=dtype)
    return a.reshape(a.shape + (1, 1)) if a.ndim else a


def ctf_2d(params: CtfParams, kx, ky, pixel_size_angst: float, box_size: int, *, xp=None,
           intact_first_peak: bool = False, phase_flip: bool = False, abs_ctf: bool = False,
           dtype=np.float64):
    """CTF values at integer frequencies ``(ky, kx)`` (any broadcastable arrays) of an N-pixel box.

    Parameters
    ----------
    params : CtfParams with scalars or length-n arrays (result then has a leading particle axis).
    kx, ky : integer (or fractional) Fourier indices; spatial frequency is ``k / (N a)``.
    pixel_size_angst, box_size : a and N of the *original* images (windowed arrays keep these).
    intact_first_peak : ``--ctf_intact_first_peak``: CTF := 1 where |gamma| < pi/2 (envelope still applied).
    phase_flip : ``--only_flip_phases``: sign(CTF).
    abs_ctf : data already phase flipped (``--ctf_phase_flipped``): |CTF|.
    """
    xp = xp or get_xp(kx, ky)
    kx = xp.asarray(kx, dtype=dtype)
    ky = xp.asarray(ky, dtype=dtype)
    ux = kx / (box_size * pixel_size_angst)
    uy = ky / (box_size * pixel_size_angst)
    u2 = ux * ux + uy * uy
    alpha = xp.arctan2(uy, ux)
    U = _col(xp, params.defocus_u_angst, dtype)
    V = _col(xp, params.defocus_v_angst, dtype)
    ang = xp.deg2rad(_col(xp, params.defocus_angle_deg, dtype))
    volt = _col(xp, params.voltage_kv, dtype)
    lam = 12.2643247 / xp.sqrt(volt * 1e3 * (1.0 + 0.978466e-6 * volt * 1e3))
    cs = _col(xp, params.cs_mm, dtype) * 1e7
    q0 = _col(xp, params.amplitude_contrast, dtype)
    ps = xp.deg2rad(_col(xp, params.phase_shift_deg, dtype))
    bfac = _col(xp, params.bfactor_angst2, dtype)
    scale = _col(xp, params.scale, dtype)
    dz = 0.5 * (U + V) + 0.5 * (U - V) * xp.cos(2.0 * (alpha - ang))
    gamma = -np.pi * lam * dz * u2 + 0.5 * np.pi * cs * lam**3 * u2 * u2 - ps - xp.arctan(q0 / xp.sqrt(1.0 - q0 * q0))
    ctf = -xp.sin(gamma)
    if intact_first_peak:
        ctf = xp.where(xp.abs(gamma) < 0.5 * np.pi, 1.0, ctf)
    ctf = ctf * xp.exp(-bfac * u2 / 4.0) * scale
    if phase_flip:
        ctf = xp.sign(ctf)
    if abs_ctf:
        ctf = xp.abs(ctf)
    tiny = 1e-8
    ctf = xp.where(xp.abs(ctf) < tiny, xp.where(ctf < 0, -tiny, tiny), ctf)
    return ctf


def ctf_rfft(params: CtfParams, n: int, pixel_size_angst: float, box_size: int, *, xp=np, dtype=np.float64,
             **options):
    """CTF on the half-complex window ``[n][n/2+1]`` of an N-pixel box (RELION ``CTF::getFftwImage``)."""
    ky, kx = freq_indices_2d(n, xp)
    return ctf_2d(params, kx, ky, pixel_size_angst, box_size, xp=xp, dtype=dtype, **options)
