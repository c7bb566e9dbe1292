"""Labels at frame size from logits on the network's grid, compiled with numba: the argmax of the
bilinearly up-sampled logits, without up-sampling most of the frame.

The live chain segments at 128 x 128 and publishes labels at the frame's size. Its torch twin,
``argmax_labels(F.interpolate(logits, (H, W), "bilinear", align_corners=False))``, interpolates
every class at every frame pixel: at a PLUS server's usual 640 x 480 about 4 ms per call on one core
of this CPU, and the chain calls it twice a frame. A bilinear value is a convex combination of a
grid cell's four corners, so where one class leads every other by more than :data:`MARGIN` at all
four corners, it leads everywhere in the cell, and the cell's pixels take it with no arithmetic.
Only the cells along a class boundary are interpolated (source index and weights as torch computes
them, ``align_corners=False``), with ties to the lower class as ``argmax_labels``. The labels equal
the twin's except where two classes' interpolated logits are within float rounding of each other
(tested: equal wherever the twin's margin exceeds 1e-4). One thread, no parallel pool. Used on the
CPU with float32 logits when numba is importable and neither ``REGSEG_NUMBA`` nor
``REGSEG_NUMBA_LABELS`` is ``0``.
"""

from __future__ import annotations

import numpy as np

from regseg.kernels import compiled, switched_on

#: a class that leads every other by more than this (times 1 + |its logit|) at a cell's four
#: corners owns the cell
MARGIN = 1e-3
UNSURE = 255  # a cell no class owns

_COMPILED: dict[str, object] = {}


def available() -> bool:
    """Whether the kernel can run here (numba importable, not switched off by REGSEG_NUMBA=0 or
    REGSEG_NUMBA_LABELS=0)."""
    return switched_on("labels") and _kernels() is not None


def _kernels():
    return compiled(_COMPILED, {"owners": _owners, "labels": _labels})


def source_index(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: the lower source index, the upper one and the upper one's weight, as
    torch's bilinear up-sampling computes them with ``align_corners=False`` (float32 arithmetic:
    scale = in / out, source = scale * (out + 0.5) - 0.5, clamped at 0)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    lo = src.astype(np.int64)
    hi = lo + (lo < in_size - 1)
    return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def _owners(logits, margin, out):
    """out[y, x]: the class that leads every other by > margin (1 + |logit|) at grid point (y, x),
    else UNSURE (255); then each cell (y, x) keeps it only if its right, lower and diagonal
    neighbours agree."""
    k, h, w = logits.shape
    point = np.empty((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            best, second, c = logits[0, y, x], -np.inf, 0
            for j in range(1, k):
                v = logits[j, y, x]
                if v > best:
                    second, best, c = best, v, j
                elif v > second:
                    second = v
            # relative to the logit's size, so float rounding (a few ulp) can never close it
            point[y, x] = c if best - second > margin * (np.float32(1.0) + abs(best)) else UNSURE
    for y in range(h):
        y1 = min(y + 1, h - 1)
        for x in range(w):
            x1 = min(x + 1, w - 1)
            c = point[y, x]
            if c != UNSURE and point[y, x1] == c and point[y1, x] == c and point[y1, x1] == c:
                out[y, x] = c
            else:
                out[y, x] = UNSURE


def _labels(logits, owners, ylo, yhi, yw, xlo, xhi, xw, out):
    k = logits.shape[0]
    height, width = out.shape
    for oy in range(height):
        y0, y1 = ylo[oy], yhi[oy]
        wy1 = yw[oy]
        wy0 = np.float32(1.0) - wy1
        for ox in range(width):
            x0 = xlo[ox]
            c = owners[y0, x0]
            if c != UNSURE:
                out[oy, ox] = c
                continue
            x1 = xhi[ox]
            wx1 = xw[ox]
            wx0 = np.float32(1.0) - wx1
            best = wy0 * (wx0 * logits[0, y0, x0] + wx1 * logits[0, y0, x1]) + \
                wy1 * (wx0 * logits[0, y1, x0] + wx1 * logits[0, y1, x1])
            label = 0
            for j in range(1, k):
                v = wy0 * (wx0 * logits[j, y0, x0] + wx1 * logits[j, y0, x1]) + \
                    wy1 * (wx0 * logits[j, y1, x0] + wx1 * logits[j, y1, x1])
                if v > best:
                    best, label = v, j
            out[oy, ox] = label


def labels_up(logits: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8: the argmax over classes of ``logits`` (K, h, w) float32 up-sampled
    bilinearly to ``hw`` (``align_corners=False``), ties to the lower class."""
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("regseg.kernels.labels_up: numba is not installed")
    logits = np.ascontiguousarray(logits, np.float32)
    k, h, w = logits.shape
    owners = np.empty((h, w), np.uint8)
    kernels["owners"](logits, np.float32(MARGIN), owners)
    out = np.empty((int(hw[0]), int(hw[1])), np.uint8)
    ylo, yhi, yw = source_index(h, out.shape[0])
    xlo, xhi, xw = source_index(w, out.shape[1])
    kernels["labels"](logits, owners, ylo, yhi, yw, xlo, xhi, xw, out)
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels now, outside any timed work."""
    if available():
        labels_up(np.zeros((3, 2, 2), np.float32), (3, 3))
