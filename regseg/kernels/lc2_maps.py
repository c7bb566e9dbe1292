"""LC2's per-pixel work on the CPU, compiled with numba: the seven weighted maps whose window sums
the score needs, and the share of the ultrasound's variance the windows' fits explain
(:meth:`regseg.lc2_score.UltrasoundWindows.score`, between OpenCV's box filters).

The numpy/torch twin (``regseg.lc2_score._window_maps``, ``gradient_magnitude`` and
``_share_explained``) makes a temporary array per operation over the (7, B, H, W) maps; these make
each pixel's values in one pass. Every operation is the twin's, in float32 and in the same order,
so the results are the same bits (tested), and a search through them takes the same steps. One
thread, like :mod:`regseg.kernels.plane_sample`. Used on the CPU with float32 images when numba
is importable and ``REGSEG_NUMBA`` is not ``0``; elsewhere the twin runs.
"""

from __future__ import annotations

import math

import numpy as np

from regseg.kernels import compiled, switched_on

_COMPILED: dict[str, object] = {}
_EPS = np.float32(1e-6)  # the twin's: a flat window explains nothing rather than dividing by zero
_HALF = np.float32(0.5)
_TWO = np.float32(2.0)
_ZERO = np.float32(0.0)


def available() -> bool:
    """Whether the kernels can run here (numba importable, not switched off by REGSEG_NUMBA=0)."""
    return switched_on() and _kernels() is not None


def _kernels():
    # IEEE division, as numpy's: no division-by-zero test per division, so the loops vectorise
    return compiled(_COMPILED, {"maps": _maps, "explained": _explained}, error_model="numpy")


def window_maps(mri: np.ndarray, w: np.ndarray, wu: np.ndarray) -> np.ndarray:
    """(7, B, H, W) float32: ``m w, g w, m^2 w, g^2 w, m g w, m wu, g wu`` for each (H, W) MRI image
    ``m`` of ``mri`` (B, H, W) and its gradient magnitude ``g`` (central differences, one-sided at
    the border), ``w`` the window weights and ``wu`` the weighted ultrasound, both (H, W)."""
    b, h, wid = mri.shape
    out = np.empty((7, b, h, wid), np.float32)
    _kernels()["maps"](np.ascontiguousarray(mri, np.float32), np.ascontiguousarray(w, np.float32),
                       np.ascontiguousarray(wu, np.float32), out)
    return out


def explained(sums: np.ndarray, den: np.ndarray, mu: np.ndarray, v_u: np.ndarray,
              inside: np.ndarray) -> np.ndarray:
    """(B, H, W) float32: per window, the ultrasound variance its least-squares fit on MRI and
    gradient explains (capped at the variance), times ``inside``; ``sums`` (7, B, H, W) are the
    window sums of :func:`window_maps`' maps, ``den`` the windows' weights, ``mu`` and ``v_u`` the
    ultrasound's window means and variances (all (H, W))."""
    out = np.empty(sums.shape[1:], np.float32)
    _kernels()["explained"](sums, den, mu, v_u, inside, out)
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels now, outside any timed work."""
    if available():
        m = np.zeros((1, 3, 3), np.float32)
        one = np.ones((3, 3), np.float32)
        explained(window_maps(m, one, one), one, one, one, one)


def _maps(mri, w, wu, out):  # pragma: no cover - compiled by _kernels
    nb, h, wid = mri.shape
    for b in range(nb):
        for r in range(h):
            for c in range(wid):
                m = mri[b, r, c]
                if r == 0:
                    gy = mri[b, 1, c] - mri[b, 0, c]
                elif r == h - 1:
                    gy = mri[b, h - 1, c] - mri[b, h - 2, c]
                else:
                    gy = _HALF * (mri[b, r + 1, c] - mri[b, r - 1, c])
                if c == 0:
                    gx = mri[b, r, 1] - mri[b, r, 0]
                elif c == wid - 1:
                    gx = mri[b, r, wid - 1] - mri[b, r, wid - 2]
                else:
                    gx = _HALF * (mri[b, r, c + 1] - mri[b, r, c - 1])
                g = np.float32(math.sqrt(gx * gx + gy * gy))
                mw = m * w[r, c]
                gw = g * w[r, c]
                out[0, b, r, c] = mw
                out[1, b, r, c] = gw
                out[2, b, r, c] = mw * m
                out[3, b, r, c] = gw * g
                out[4, b, r, c] = mw * g
                out[5, b, r, c] = m * wu[r, c]
                out[6, b, r, c] = g * wu[r, c]


def _explained(sums, den, mu, v_u, inside, out):  # pragma: no cover - compiled by _kernels
    nb, h, wid = out.shape
    for b in range(nb):
        for r in range(h):
            for c in range(wid):
                d = den[r, c]
                m_m = sums[0, b, r, c] / d
                m_g = sums[1, b, r, c] / d
                vm = sums[2, b, r, c] / d - m_m * m_m + _EPS
                vg = sums[3, b, r, c] / d - m_g * m_g + _EPS
                c_mg = sums[4, b, r, c] / d - m_m * m_g
                c_mu = sums[5, b, r, c] / d - m_m * mu[r, c]
                c_gu = sums[6, b, r, c] / d - m_g * mu[r, c]
                det = vm * vg - c_mg * c_mg
                e = (vg * c_mu * c_mu - _TWO * c_mg * c_mu * c_gu + vm * c_gu * c_gu) / det
                if e < _ZERO:  # clip(0): a NaN stays NaN, as numpy's does
                    e = _ZERO
                over = e - v_u[r, c]
                if over > _ZERO:  # e - clip(e - v_u, 0): min(e, v_u), as the twin computes it
                    e = e - over
                out[b, r, c] = e * inside[r, c]
