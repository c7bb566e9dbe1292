"""LC2: a similarity of ultrasound to MRI that is not learnt (the score; the search that uses it is
:mod:`regseg.lc2`).

LC2 (linear correlation of linear combination; Wein et al., MedIA 2008, made for ultrasound
against CT; used for ultrasound against MRI by Fuerst et al., MedIA 2014) models the ultrasound
inside each small window as a linear function of the MRI intensity and the MRI gradient
magnitude, ``us ~ a * mri + b * |grad mri| + c``, fitted per window by least squares. The score
is the share of the ultrasound's local variance those fits explain, pooled over the windows and
weighted by that variance: 1 when every window is explained, 0 when none is. It reads where
tissue boundaries and contrasts are, not what a scanner's speckle or grey levels look like, so
it does not depend on a training set's appearance.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg.kernels import lc2_maps

#: Score (and resample the plane slice) on the CPU through OpenCV (faster here); False: the torch
#: path, which CUDA tensors always take (tests compare the two).
OPENCV_ON_CPU = True
#: On that path, the per-pixel work by the compiled kernels (:mod:`regseg.kernels.lc2_maps`, equal
#: to float32 rounding); False: numpy and torch (tests compare the two; REGSEG_LC2_KERNELS=0 in the
#: environment: the path before session 22, with regseg.lc2.RESLICE_INTERIOR)
NUMBA_ON_CPU = os.environ.get("REGSEG_LC2_KERNELS", "1") != "0"


def box_mean(x: Tensor, weight: Tensor, radius: int) -> Tensor:
    """Weighted mean of ``x`` (..., H, W) in (2r+1)^2 windows, by cumulative sums (O(1) per
    pixel whatever the window). ``weight`` (H, W) must already be multiplied into ``x``; this
    divides by the window's weight."""
    return _box_sum(x, radius) / _box_sum(weight, radius).clamp_min(1e-6)


def _box_sum(x: Tensor, r: int) -> Tensor:
    k = 2 * r + 1
    p = F.pad(x, (r + 1, r, r + 1, r))
    c = p.cumsum(-1)
    c = c[..., k:] - c[..., :-k]
    c = c.cumsum(-2)
    return c[..., k:, :] - c[..., :-k, :]


def gradient_magnitude(m: Tensor) -> Tensor:
    """|grad| of (..., H, W) by central differences (one-sided at the border), per pixel."""
    gy = torch.zeros_like(m)
    gx = torch.zeros_like(m)
    gy[..., 1:-1, :] = 0.5 * (m[..., 2:, :] - m[..., :-2, :])
    gx[..., :, 1:-1] = 0.5 * (m[..., :, 2:] - m[..., :, :-2])
    gy[..., 0, :], gy[..., -1, :] = m[..., 1, :] - m[..., 0, :], m[..., -1, :] - m[..., -2, :]
    gx[..., :, 0], gx[..., :, -1] = m[..., :, 1] - m[..., :, 0], m[..., :, -1] - m[..., :, -2]
    return torch.sqrt(gx * gx + gy * gy)


def _window_maps(m, g, w, wu) -> list:
    """The seven maps whose window sums LC2 needs, weighted: m, g, m^2, g^2, m g, m u, g u
    (numpy or torch alike)."""
    mw, gw = m * w, g * w
    return [mw, gw, mw * m, gw * g, mw * g, m * wu, g * wu]


def _share_explained(s, mu, v_u, inside, total):
    """(B,) LC2 from the window means ``s`` (7, B, H, W) of :func:`_window_maps`: per window the
    ultrasound variance explained by the least-squares fit on MRI and gradient, capped at the
    variance, summed inside and divided by the total (numpy or torch alike)."""
    m_m, m_g = s[0], s[1]
    eps = 1e-6  # a flat window explains nothing rather than dividing by zero
    vm = s[2] - m_m * m_m + eps
    vg = s[3] - m_g * m_g + eps
    c_mg = s[4] - m_m * m_g
    c_mu = s[5] - m_m * mu
    c_gu = s[6] - m_g * mu
    det = vm * vg - c_mg * c_mg
    explained = ((vg * c_mu * c_mu - 2.0 * c_mg * c_mu * c_gu + vm * c_gu * c_gu) / det).clip(0.0)
    explained = explained - (explained - v_u).clip(0.0)  # min(explained, v_u)
    return (explained * inside).sum((-2, -1)) / total


class UltrasoundWindows:
    """What LC2 needs of the ultrasound alone, made once per frame: the window weights, the local
    means and variances of the ultrasound, and which windows count."""

    def __init__(self, us: Tensor, weight: Tensor, radius: int) -> None:
        if weight.shape != us.shape:
            raise ValueError(f"lc2: us {tuple(us.shape)} and weight {tuple(weight.shape)} differ")
        self.radius = radius
        self.w = weight.to(us.dtype)
        self.wu = us * self.w
        self.den = _box_sum(self.w, radius).clamp_min(1e-6)
        self.mu = _box_sum(self.wu, radius) / self.den
        self.v_u = (_box_sum(self.wu * us, radius) / self.den - self.mu * self.mu).clamp_min(0.0)
        inside = (self.den > 0.8 * (2 * radius + 1) ** 2) & (self.w > 0)
        self.inside = inside.to(us.dtype)
        self.total = (self.v_u * self.inside).sum().clamp_min(1e-9)
        # numpy views of the same memory for the OpenCV path (CPU only)
        self._host = (None if us.device.type != "cpu" else
                      {k: getattr(self, k).numpy() for k in ("w", "wu", "den", "mu", "v_u",
                                                             "inside")})

    def score(self, mri: Tensor) -> Tensor:
        """(B,) LC2 of the ultrasound against (B, H, W) MRI images."""
        if mri.shape[-2:] != self.w.shape:
            raise ValueError(f"lc2: mri {tuple(mri.shape)} is not on the ultrasound's grid "
                             f"{tuple(self.w.shape)}")
        if OPENCV_ON_CPU and self._host is not None and mri.dtype == torch.float32:
            return torch.from_numpy(self._score_cv2(mri.numpy()))
        maps = torch.stack(_window_maps(mri, gradient_magnitude(mri), self.w, self.wu))
        s = _box_sum(maps, self.radius) / self.den
        return _share_explained(s, self.mu, self.v_u, self.inside, self.total)

    def _score_cv2(self, mri: np.ndarray) -> np.ndarray:
        """:meth:`score` on the CPU: the same sums, each 2-D window sum by OpenCV's box filter
        (faster than the cumulative sums here; equal to float32 rounding, tested); the per-pixel
        work before and after them by :mod:`regseg.kernels.lc2_maps` where numba runs (the same
        bits as the numpy twin, tested)."""
        c = self._host
        fused = NUMBA_ON_CPU and lc2_maps.available()
        if fused:
            maps = lc2_maps.window_maps(mri, c["w"], c["wu"])  # (7, B, H, W)
        else:
            g = gradient_magnitude(torch.from_numpy(mri)).numpy()
            maps = np.stack(_window_maps(mri, g, c["w"], c["wu"]))
        k = 2 * self.radius + 1
        s = np.empty_like(maps)
        for src, dst in zip(maps.reshape(-1, *maps.shape[2:]), s.reshape(-1, *s.shape[2:]),
                            strict=True):
            cv2.boxFilter(src, -1, (k, k), dst=dst, normalize=False,
                          borderType=cv2.BORDER_CONSTANT)
        if fused:
            share = lc2_maps.explained(s, c["den"], c["mu"], c["v_u"], c["inside"])
            return (share.sum((-2, -1)) / float(self.total)).astype(np.float32)
        s /= c["den"]
        return _share_explained(s, c["mu"], c["v_u"], c["inside"],
                                float(self.total)).astype(np.float32)


def lc2(us: Tensor, mri: Tensor, weight: Tensor, radius: int) -> Tensor:
    """LC2 of one ultrasound image against a batch of MRI images on the same grid.

    Args:
        us: (H, W) ultrasound intensities.
        mri: (B, H, W) MRI intensities, one per candidate pose.
        weight: (H, W) 1 inside the imaged area, 0 outside (windows are fitted on it only).
        radius: window half-size in pixels.
    Returns:
        (B,) scores in [0, 1]; 0 when the imaged area holds no window.
    """
    return UltrasoundWindows(us, weight, radius).score(mri)
