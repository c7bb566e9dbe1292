"""Family B B-mode: RF lines in beam coordinates, then envelope, grey map, scan conversion.

Per beam sample: the tissue class at its (deformed) 3-D position gives echo level, impedance,
attenuation and scatterer statistics. Scatterers are a hash of the 3-D position quantised to
``scatter_cell_mm``, so speckle is anchored to tissue; their amplitude is modulated by a
K-distributed density (Wilson-Hilferty gamma of a hashed normal, shape per tissue) on a coarser
cell. Specular reflection comes from impedance steps along the beam (so it depends on incidence),
attenuation accumulates down the beam (bone and calcifications shadow). The reflectivity is
convolved with a Gaussian-modulated cosine pulse axially and a Gaussian whose width grows with
distance from the focus laterally; electronic noise is added; the envelope is the magnitude of
the analytic signal (FFT Hilbert transform); the probe-wall echo reverberates; a slider TGC, log
compression over a dynamic range and a gamma grey map give the display, scan-converted bilinearly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg.sim.family_b.anatomy import Case
from regseg.sim.family_b.probe import Beams
from regseg.spatial import index_to_normalised, invert

SOUND_MM_PER_US = 1.54


@dataclass(frozen=True)
class RenderSettings:
    """Scanner settings of one session (drawn by :func:`draw_settings`)."""

    f0_mhz: float
    cycles: float  # pulse length in carrier cycles (sets the axial resolution)
    lateral_focus_mm: float  # depth of the lateral focus
    lateral_sigma_mm: float  # lateral PSF standard deviation at the focus
    lateral_growth: float  # extra sigma per mm away from the focus
    specular_gain: float
    noise_db: float  # electronic noise re. a 0 dB echo
    tgc_fraction: float  # share of the nominal attenuation the TGC undoes
    tgc_sliders_db: tuple[float, ...]  # operator's slider offsets, top to bottom
    gain_db: float
    dynamic_range_db: float
    gamma: float  # grey map exponent
    reverb_gain: float
    scatter_cell_mm: float
    density_cell_mm: float


def draw_settings(rng: np.random.Generator) -> RenderSettings:
    """Random scanner settings, within what TRUS presets use."""
    return RenderSettings(
        f0_mhz=float(rng.uniform(5.0, 7.5)), cycles=float(rng.uniform(1.5, 2.5)),
        lateral_focus_mm=float(rng.uniform(20, 35)), lateral_sigma_mm=float(rng.uniform(0.3, 0.5)),
        lateral_growth=float(rng.uniform(0.005, 0.015)), specular_gain=float(rng.uniform(3, 6)),
        noise_db=float(rng.uniform(-70, -60)), tgc_fraction=float(rng.uniform(0.8, 1.05)),
        tgc_sliders_db=tuple(float(v) for v in rng.uniform(-3, 3, 8)),
        gain_db=float(rng.uniform(-15, -9)), dynamic_range_db=float(rng.uniform(50, 65)),
        gamma=float(rng.uniform(0.8, 1.3)), reverb_gain=float(rng.uniform(0.1, 0.3)),
        scatter_cell_mm=float(rng.uniform(0.07, 0.1)), density_cell_mm=float(rng.uniform(0.3, 0.6)))


def sample_step_mm(settings: RenderSettings) -> float:
    """RF sample step in depth: a third of the round-trip carrier period (Nyquist, margin)."""
    return SOUND_MM_PER_US / settings.f0_mhz / 2 / 3


def _hash(q: Tensor, salt: int) -> Tensor:
    """Uniform (0, 1) numbers from integer lattice points (..., 3): spatial hash, one mix round."""
    h = (q[..., 0] * 73856093) ^ (q[..., 1] * 19349663) ^ (q[..., 2] * 83492791) ^ salt
    h = (((h >> 15) ^ h) * 0x2C1B3C6D) & 0xFFFFFFFF
    h = (h >> 12) ^ h
    return ((h & 0xFFFFFF).float() + 0.5) * (1.0 / 16777216.0)


def _normal(q: Tensor, salt: int) -> Tensor:
    """Standard normal numbers from lattice points (Box-Muller of two hashes)."""
    u1, u2 = _hash(q, salt), _hash(q, salt + 7919)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * np.pi * u2)


def _upsample_rows(a: Tensor, factor: int, rows: int) -> Tensor:
    """(Rc, B, ...) coarse rows to (rows, B, ...) by linear interpolation (corners aligned)."""
    shape = a.shape
    flat = a.reshape(shape[0], -1).T[None]  # (1, B*..., Rc)
    up = F.interpolate(flat, size=rows, mode="linear", align_corners=True)[0].T
    return up.reshape(rows, *shape[1:])


class BmodeRenderer:
    """Renders frames of one case with one probe and one scanner setting (all fixed at init).

    Args:
        case: the anatomy.
        beams: the probe's beam samples (:func:`regseg.sim.family_b.probe.make_beams`, built with
            ``dz_mm = sample_step_mm(settings)``).
        settings: scanner settings.
        seed: the speckle realisation (the hash salt) and noise.
    """

    def __init__(self, case: Case, beams: Beams, settings: RenderSettings, seed: int) -> None:
        self.beams, self.settings, self.seed = beams, settings, int(seed) & 0x7FFFFFFF
        dev = beams.sample_ij.device
        self.device = dev
        ac = case.acoustics

        def t(a):
            return torch.as_tensor(np.asarray(a, dtype=np.float32), device=dev)

        self._echo = t(10.0 ** (ac.echo_db / 20.0))
        self._tex_db = t(ac.texture_db)
        self._z = t(ac.impedance)
        self._atten = t(ac.atten_db_cm_mhz * settings.f0_mhz / 10.0)  # dB per mm, one way
        self._k = t(ac.k_shape)
        tissue = case.tissue
        self._tissue = t(tissue.data.transpose(2, 1, 0))[None, None]
        self._tissue_w2n = index_to_normalised(tissue.data.shape) @ invert(tissue.voxel_to_world)
        tex = case.texture
        self._texture = t(tex.data.transpose(2, 1, 0))[None, None]
        self._texture_w2n = index_to_normalised(tex.data.shape) @ invert(tex.voxel_to_world)

        dz = beams.dz_mm
        depth = beams.depth_mm
        # Axial pulse: Gaussian-modulated cosine at the round-trip carrier, unit energy.
        period = SOUND_MM_PER_US / settings.f0_mhz / 2
        sigma = settings.cycles * period / 2.355
        zk = torch.arange(-int(3 * sigma / dz), int(3 * sigma / dz) + 1, device=dev) * dz
        pulse = torch.exp(-0.5 * (zk / sigma) ** 2) * torch.cos(2 * np.pi * zk / period)
        pulse = pulse / pulse.norm()
        # Lateral PSF per depth, in beams: sigma grows away from the focus.
        sig_mm = settings.lateral_sigma_mm + settings.lateral_growth * (
            depth - settings.lateral_focus_mm).abs()
        sig_b = (sig_mm / beams.spacing_mm).clamp(0.3, 3.5)
        half = int(np.ceil(3 * float(sig_b.max())))
        taps = torch.arange(-half, half + 1, device=dev, dtype=torch.float32)
        lat = torch.exp(-0.5 * (taps[None] / sig_b[:, None]) ** 2)
        self._lateral = lat / lat.norm(dim=1, keepdim=True)  # (R, K)
        # TGC (dB, two-way) and analytic-signal filter.
        nominal = 2 * 0.6 * settings.f0_mhz / 10.0 * depth * settings.tgc_fraction
        sliders = np.interp(depth.cpu().numpy(), np.linspace(0, float(depth[-1]), 8),
                            settings.tgc_sliders_db)
        self._tgc = 10.0 ** ((nominal + t(sliders) + settings.gain_db) / 20.0)
        n = depth.numel()
        # Axial pulse and analytic-signal (Hilbert) filter as one spectrum: the RF and its
        # envelope come from one FFT pair per frame (zero-padded: no wrap-around).
        self._nfft = 1 << int(np.ceil(np.log2(n + pulse.numel())))
        hfilt = torch.zeros(self._nfft, device=dev)
        hfilt[0] = 1.0
        hfilt[1:self._nfft // 2] = 2.0
        hfilt[self._nfft // 2] = 1.0
        centred = torch.zeros(self._nfft, device=dev)
        taps = torch.arange(pulse.numel(), device=dev) - pulse.numel() // 2
        centred[taps % self._nfft] = pulse
        self._axial = (torch.fft.fft(centred) * hfilt)[:, None]
        self._noise_amp = 10.0 ** (settings.noise_db / 20.0)

    def _lookup(self, volume: Tensor, w2n: np.ndarray, world: Tensor, mode: str) -> Tensor:
        m = torch.as_tensor(w2n, dtype=torch.float32, device=self.device)
        grid = world @ m[:3, :3].T + m[:3, 3]
        return F.grid_sample(volume, grid[None, None], mode=mode, padding_mode="border",
                             align_corners=False)[0, 0, 0]

    def render(self, image_to_mri: np.ndarray, ddf_ij: Tensor | None, noise_seed: int) -> Tensor:
        """(H, W) uint8 frame of the plane ``image_to_mri`` (pixel (i, j, 0) -> world mm).

        ``ddf_ij`` (Rc, B, 2), pixels, at the coarse rows (``beams.coarse_rows``): beam sample p
        images the tissue at ``plane(p + ddf(p))``.
        """
        s, b = self.settings, self.beams
        rows, step = b.sample_ij.shape[0], b.coarse
        pts = b.coarse_rows(b.sample_ij)
        pts = pts if ddf_ij is None else pts + ddf_ij
        m = torch.as_tensor(image_to_mri, dtype=torch.float32, device=self.device)
        world_c = pts[..., :1] * m[:3, 0] + pts[..., 1:] * m[:3, 1] + m[:3, 3]  # (Rc, B, 3)
        # Tissue properties at the coarse rows (the anatomy is 0.6 mm voxels), held per row.
        cls_c = self._lookup(self._tissue, self._tissue_w2n, world_c, "nearest").long()
        tex = self._lookup(self._texture, self._texture_w2n, world_c, "bilinear")
        zd = _normal(torch.floor(world_c / s.density_cell_mm).long(), self.seed ^ 0x5A5A)
        alpha = self._k[cls_c]
        g = (1 - 1 / (9 * alpha) + zd * torch.sqrt(1 / (9 * alpha))).clamp_min(0.0) ** 3
        amp_c = self._echo[cls_c] * 10.0 ** (self._tex_db[cls_c] * tex / 20.0) * torch.sqrt(g)
        loss_c = 2 * torch.cumsum(self._atten[cls_c], 0) * (b.dz_mm * step)

        def fine(a: Tensor) -> Tensor:
            return a.repeat_interleave(step, dim=0)[:rows]

        # Diffuse scattering: hashed scatterers (uniform, unit variance; the PSF sums many, so
        # the RF is Gaussian) anchored to tissue, at every RF sample.
        world = _upsample_rows(world_c, step, rows)
        scat = (_hash(torch.floor(world / s.scatter_cell_mm).long(), self.seed) - 0.5) * 12 ** 0.5
        refl = fine(amp_c) * scat
        # Specular reflection at impedance steps along the beam.
        zp = F.pad(fine(self._z[cls_c]).T[:, None], (1, 1), mode="replicate")[:, 0].T
        refl = refl + s.specular_gain * (zp[2:] - zp[:-2]) / (zp[2:] + zp[:-2])
        # Two-way attenuation accumulated down the beam (shadows behind strong attenuators).
        rf = refl * 10.0 ** (-_upsample_rows(loss_c, step, rows) / 20.0)

        # PSF: depth-dependent lateral Gaussian and electronic noise (band-limited by the pulse
        # like the receiver's filter), then the axial pulse and the analytic signal's magnitude.
        half = (self._lateral.shape[1] - 1) // 2
        padded = F.pad(rf[None], (half, half), mode="replicate")[0]
        rf = (padded.unfold(1, 2 * half + 1, 1) * self._lateral[:, None, :]).sum(-1)
        gen = torch.Generator(device=self.device).manual_seed(int(noise_seed) & (2**63 - 1))
        rf = rf + self._noise_amp * torch.randn(rf.shape, generator=gen, device=self.device)
        spec = torch.fft.fft(rf, n=self._nfft, dim=0) * self._axial
        env = torch.fft.ifft(spec, dim=0)[: rf.shape[0]].abs()
        # Reverberation of the near-field (probe-wall) echo.
        near = int(8.0 / b.dz_mm)
        wall = int(env[:near].mean(1).argmax()) + 1
        echo = env[: 2 * wall].clone()
        for k in (1, 2):
            start = k * wall
            stop = min(env.shape[0], start + echo.shape[0])
            if stop > start:
                env[start:stop] += s.reverb_gain ** k * echo[: stop - start]

        # Display: TGC, log compression, grey map, scan conversion.
        db = 20.0 * torch.log10(env * self._tgc[:, None] + 1e-9)
        grey = ((db + s.dynamic_range_db) / s.dynamic_range_db).clamp(0.0, 1.0) ** s.gamma
        img = F.grid_sample(grey[None, None], b.scan_grid, mode="bilinear",
                            padding_mode="zeros", align_corners=True)[0, 0]
        return (img * 255.0 * b.mask).round().to(torch.uint8)
