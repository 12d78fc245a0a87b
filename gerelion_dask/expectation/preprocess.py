"""Per-pool preprocessing of particle images (RELION ``getFourierTransformsAndCtfs``, ALGORITHM.md §4.1).

For a pool of images: ``--norm`` rescaling, integer pre-shift by the rounded previous offset (zero fill), the
unmasked transform (for back-projection only), the soft-masked transform (``--zero_mask``: mean background; else
coloured noise with the current noise spectrum), windowing to the current size, the per-shell power beyond it, and
the CTF on the window.  Everything is batched over the pool; the array backend follows the images.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from ..backend import get_xp
from ..conventions import centred_irfft2, centred_rfft2, window_rfft2
from ..ops.ctf import CtfParams, ctf_rfft
from ..ops.fourier import shells_2d
from ..ops.masks import noise_fill_background, soft_mask_outside

__all__ = ["PoolParticles", "PreprocessSettings", "PreprocessedPool", "integer_shift", "preprocess_pool",
           "coloured_noise"]


@dataclass(frozen=True)
class PoolParticles:
    """What the E-step needs of each particle of a pool (arrays of length B; host NumPy)."""

    index: np.ndarray  # row in the data set
    optics_group: np.ndarray  # 0-based
    group: np.ndarray  # 0-based scale group (micrograph group)
    half: int  # 1 or 2 (0 = no halves: classification)
    ctf: CtfParams
    offset_px: np.ndarray  # (B, 2) previous origin offsets in pixels (x, y)
    angles: np.ndarray  # (B, 3) previous rot, tilt, psi (deg)
    class_index: np.ndarray  # (B,) previous class, 0-based
    norm: np.ndarray  # (B,) rlnNormCorrection
    offset_prior_px: np.ndarray  # (B, 2) prior centre of the offsets (pixels)
    seed_class: np.ndarray | None = None  # classification seed iteration: the one class (0-based) each may take

    def take(self, rows) -> PoolParticles:
        """The particles ``rows`` (an index array or a slice) of this pool, as a pool of their own."""
        kw = {f.name: getattr(self, f.name)[rows] for f in fields(self)
              if isinstance(getattr(self, f.name), np.ndarray)}
        return replace(self, ctf=self.ctf.take(rows), **kw)


@dataclass(frozen=True)
class PreprocessSettings:
    ori_size: int
    pixel_size: float
    current_size: int
    particle_diameter_angst: float
    width_mask_edge: float = 5.0
    zero_mask: bool = True
    do_norm: bool = True
    avg_norm: float = 1.0
    do_ctf: bool = True
    ctf_intact_first_peak: bool = False
    ctf_phase_flipped: bool = False
    only_flip_phases: bool = False
    random_seed: int = 0
    # per optics group (0-based rows of the optics table): the last shell its images hold data in, for groups
    # coarser than the model's grid (ParticleSet.band_shells); () or N: every shell of the window, corners included
    band_shells: tuple = ()


@dataclass(frozen=True)
class PreprocessedPool:
    """Transforms of a pool, windowed to ``current_size`` (``[n][n/2+1]`` layout)."""

    fimg: object  # (B, n, n/2+1) complex, masked
    fimg_nomask: object  # (B, n, n/2+1) complex, unmasked
    ctf: object  # (B, n, n/2+1) real
    power_highres: object  # (B, N/2+1) per-shell power beyond current_size (0 below)
    highres_xi2: object  # (B,) total of power_highres
    int_offset_px: np.ndarray  # (B, 2) rounded previous offsets applied to the images


def integer_shift(images, shifts):
    """Translate images ``(B, N, N)`` by integer pixels ``(B, 2)`` (x, y), filling with zeros (no wrap)."""
    xp = get_xp(images)
    b, n, _ = images.shape
    s = xp.asarray(shifts, dtype=np.int64)
    y = xp.arange(n)[None, :, None] - s[:, 1, None, None]
    x = xp.arange(n)[None, None, :] - s[:, 0, None, None]
    ok = (y >= 0) & (y < n) & (x >= 0) & (x < n)
    bi = xp.arange(b)[:, None, None]
    out = images[bi, xp.clip(y, 0, n - 1), xp.clip(x, 0, n - 1)]
    return xp.where(ok, out, 0)


_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment


def _mix64(z):
    """splitmix64's output function on uint64 arrays (arithmetic mod 2^64, the same on NumPy and CuPy)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def counter_normals(seeds, m: int, xp=np):
    """``(len(seeds), m)`` pairs of independent standard normals as complex numbers (real and imaginary parts).

    Element ``j`` of row ``i`` is a pure function of ``(seeds[i], j)``: word ``j`` of the splitmix64 stream of the
    seed (state ``mix(seed) + (j + 1) * golden``), split into two 32-bit uniforms for the Box-Muller transform (so
    the normals reach 6.6 sigma at most).  Computed where ``xp`` lives, with no per-row host loop; a particle's
    numbers do not depend on the rows beside it.
    """
    key = _mix64(xp.asarray(np.asarray(seeds, dtype=np.int64).astype(np.uint64) ^ np.uint64(0x5851F42D4C957F2D)))
    z = _mix64(key[:, None] + xp.arange(1, m + 1, dtype=np.uint64)[None] * np.uint64(_GOLDEN))  # (B, m)
    u1 = ((z >> np.uint64(32)).astype(np.float64) + 0.5) * (1.0 / 2.0**32)  # (0, 1)
    u2 = (z & np.uint64(0xFFFFFFFF)).astype(np.float64) * (2.0 * np.pi / 2.0**32)
    r = xp.sqrt(-2.0 * xp.log(u1))
    return r * xp.cos(u2) + 1j * (r * xp.sin(u2))


def coloured_noise(shape_b: int, n: int, sigma2_per_shell, seeds, xp=np):
    """Real-space noise images whose transform has variance ``sigma2(shell)`` per real/imag part.

    ``sigma2_per_shell``: one spectrum ``(nsh,)`` for all images or one per image ``(B, nsh)``.  One random stream
    per particle (``seeds[i]``, :func:`counter_normals`), so a particle gets the same noise whatever its pool; the
    numbers are drawn, scaled and inverse-transformed for the whole batch on ``xp``'s device.
    """
    sh = shells_2d(n)
    s2 = np.atleast_2d(np.asarray(sigma2_per_shell, dtype=np.float64))
    # gathered on the device: built on the host, this (B, n, n/2+1) block was 90 % of a GPU pool's preprocessing
    sig = xp.sqrt(xp.asarray(s2))[:, xp.asarray(np.minimum(sh, s2.shape[1] - 1))]  # (1 or B, n, n/2+1)
    out = counter_normals(seeds, sh.size, xp).reshape(shape_b, *sh.shape) * sig
    out[:, 0, 0] = 0
    return centred_irfft2(out, n)


_NOISE_BATCH = 256  # images per batch of background noise (bounds its temporaries: 256 x N (N/2+1) values each)


def preprocess_pool(images, particles: PoolParticles, settings: PreprocessSettings, sigma2_noise=None):
    """Preprocess a pool of raw images ``(B, N, N)`` float (backend of ``images``).

    ``sigma2_noise`` ``(n_optics, N/2+1)`` is needed only without ``--zero_mask`` (noise-filled background).
    """
    xp = get_xp(images)
    N = settings.ori_size
    n = settings.current_size
    x = images.astype(np.float64) if images.dtype != np.float64 and xp is np else images
    if settings.do_norm:
        scale = settings.avg_norm / np.where(particles.norm > 0, particles.norm, 1.0)
        x = x * xp.asarray(scale, dtype=x.dtype)[:, None, None]
    int_off = np.rint(particles.offset_px).astype(np.int64)
    x = integer_shift(x, xp.asarray(int_off))
    fnomask = window_rfft2(centred_rfft2(x), n)
    radius = settings.particle_diameter_angst / (2.0 * settings.pixel_size)
    if settings.zero_mask or sigma2_noise is None:
        xm = soft_mask_outside(x, radius=radius, width=settings.width_mask_edge, batch_2d=True)
    else:
        sig = np.asarray(sigma2_noise)[np.asarray(particles.optics_group)]
        seeds = settings.random_seed + np.asarray(particles.index, dtype=np.int64)
        noise = xp.empty_like(x)  # filled a batch at a time (the batches' float64 never all at once)
        for s in range(0, len(seeds), _NOISE_BATCH):
            e = min(s + _NOISE_BATCH, len(seeds))
            noise[s:e] = coloured_noise(e - s, N, sig[s:e], seeds[s:e], xp)
        xm = noise_fill_background(x, noise, radius, settings.width_mask_edge)
        del noise
    del x  # the pool's own copies go before its transform: only the caller's images and xm stay
    ffull = centred_rfft2(xm)
    del xm
    band = _band_limits(particles, settings)
    if band is not None:  # coarser optics groups: no data beyond their band (images, and CTFs below, 0 there)
        ffull = ffull * band_mask(N, band, xp)
        band_n = band_mask(n, band, xp)
        fnomask = fnomask * band_n
    # per-shell power beyond the current size (half plane, k != 0), RELION's highres_Xi2
    sh = xp.asarray(shells_2d(N))
    from ..ops.fourier import likelihood_pixels

    hp = xp.asarray(likelihood_pixels(N))
    beyond = hp & (sh > n // 2)
    nsh = N // 2 + 1
    p2 = (xp.abs(ffull) ** 2)[:, beyond]
    shell_idx = sh[beyond]
    power = xp.zeros((ffull.shape[0], nsh), dtype=np.float64)
    if int(beyond.sum()) > 0:
        onehot = (shell_idx[:, None] == xp.arange(nsh)[None, :]).astype(np.float64)
        power = p2.astype(np.float64) @ onehot
    fimg = window_rfft2(ffull, n)
    if settings.do_ctf:
        ctf = ctf_rfft(_to_xp_ctf(particles.ctf, xp), n, settings.pixel_size, N, xp=xp,
                       intact_first_peak=settings.ctf_intact_first_peak, phase_flip=settings.only_flip_phases,
                       abs_ctf=settings.ctf_phase_flipped)
    else:
        ctf = xp.ones(fimg.shape, dtype=np.float64)
    if band is not None:
        ctf = ctf * band_n
    return PreprocessedPool(fimg, fnomask, ctf, power, power.sum(axis=1), int_off)


def band_mask(n: int, last_shell, xp=np):
    """``(B, n, n/2+1)`` bool: the pixels of an ``n``-pixel half-complex window at or below each image's last shell
    of data ``last_shell (B,)`` (RELION's ROUND shells; a value of the box or more keeps the corners too)."""
    return xp.asarray(shells_2d(n))[None] <= xp.asarray(last_shell)[:, None, None]


def _band_limits(particles: PoolParticles, settings: PreprocessSettings):
    """Each particle's last shell of data ``(B,)`` where a particle of the pool belongs to an optics group coarser
    than the model's grid (:attr:`PreprocessSettings.band_shells`), else None."""
    if not settings.band_shells:
        return None
    lim = np.asarray(settings.band_shells, dtype=np.int64)[np.asarray(particles.optics_group)]
    return lim if (lim < settings.ori_size).any() else None


def _to_xp_ctf(p: CtfParams, xp) -> CtfParams:
    if xp is np:
        return p
    return CtfParams(*(xp.asarray(getattr(p, f)) for f in p.__dataclass_fields__))
