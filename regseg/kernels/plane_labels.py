"""The MRI labels on a frame's plane, optionally through an in-plane displacement, compiled with
numba: the live chain's nearest-neighbour label warps at frame size.

Its torch twin builds the (H, W, 3) grid of normalised points (:func:`regseg.spatial.axes_grid`,
with the pixel axes shifted by the displacement) and runs ``F.grid_sample(labels_float, grid,
"nearest", "zeros", align_corners=False)`` on the float copy of the label volume: at a PLUS
server's usual 640 x 480 about 4-8 ms a call on one core of this CPU, and the chain warps the
labels once or twice a frame (the temporal filter's plane, the deformable stage). Here each point
is computed as it is looked up, in the same float32 operations in the same order as the twin
(``i * m0 + (j * m1 + m2)``, then ``((x + 1) * size - 1) / 2`` and round half to even, torch's
3-D nearest path), straight from the uint8 labels: the same labels (tested). One thread, no
parallel pool. Used on the CPU when numba is importable and neither ``REGSEG_NUMBA`` nor
``REGSEG_NUMBA_LABELS`` is ``0``.
"""

from __future__ import annotations

import numpy as np

from regseg.kernels import compiled, switched_on

_COMPILED: dict[str, object] = {}


def available() -> bool:
    """Whether the kernel can run here (numba importable, not switched off by REGSEG_NUMBA=0 or
    REGSEG_NUMBA_LABELS=0)."""
    return switched_on("labels") and _kernel() is not None


def _kernel():
    kernels = compiled(_COMPILED, {"warp": _warp})
    return None if kernels is None else kernels["warp"]


def _warp(labels, m, ddf, use_ddf, out):
    """Per pixel: the normalised point, then torch's 3-D nearest with ``align_corners=False``
    and zeros padding: ((x + 1) * size - 1) / 2, round half to even, 0 outside."""
    depth, height, width = labels.shape
    one, two = np.float32(1.0), np.float32(2.0)
    fw, fh, fd = np.float32(width), np.float32(height), np.float32(depth)
    rows, cols = out.shape
    for r in range(rows):
        for c in range(cols):
            fi, fj = np.float32(c), np.float32(r)
            if use_ddf:
                fi = fi + ddf[1, r, c]
                fj = fj + ddf[0, r, c]
            ux = ((fi * m[0, 0] + (fj * m[0, 1] + m[0, 2]) + one) * fw - one) / two
            uy = ((fi * m[1, 0] + (fj * m[1, 1] + m[1, 2]) + one) * fh - one) / two
            uz = ((fi * m[2, 0] + (fj * m[2, 1] + m[2, 2]) + one) * fd - one) / two
            out[r, c] = 0
            # False for NaN; within these bounds the rounding below cannot overflow
            if -one < ux < fw and -one < uy < fh and -one < uz < fd:
                xi, yi, zi = int(np.rint(ux)), int(np.rint(uy)), int(np.rint(uz))
                if 0 <= xi < width and 0 <= yi < height and 0 <= zi < depth:
                    out[r, c] = labels[zi, yi, xi]


def labels_on_plane(labels: np.ndarray, m: np.ndarray, hw: tuple[int, int],
                    ddf: np.ndarray | None = None) -> np.ndarray:
    """(H, W) uint8: the label volume at plane pixel (i, j) + ``ddf``'s (dx, dy) there, nearest.

    Args:
        labels: (D, H, W) uint8, the volume's label tensor's data.
        m: (3, 3) float32, columns: what pixel i, pixel j and 1 add to the normalised (x, y, z)
            point (columns 0, 1 and 3 of the plane-pixel -> normalised 4x4 map, as
            :func:`regseg.spatial.axes_grid` takes it).
        hw: the frame's (H, W).
        ddf: None, or (2, H, W) float32 frame-pixel displacements (dy, dx).
    """
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("regseg.kernels.plane_labels: numba is not installed")
    out = np.empty((int(hw[0]), int(hw[1])), np.uint8)
    use_ddf = ddf is not None
    field = (np.ascontiguousarray(ddf, np.float32) if use_ddf
             else np.zeros((2, 1, 1), np.float32))
    if use_ddf and field.shape != (2, out.shape[0], out.shape[1]):
        raise ValueError(f"labels_on_plane: ddf shape {field.shape}, expected (2, {hw[0]}, "
                         f"{hw[1]})")
    kernel(np.ascontiguousarray(labels, np.uint8), np.ascontiguousarray(m, np.float32), field,
           use_ddf, out)
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now, outside any timed work."""
    if available():
        labels_on_plane(np.zeros((2, 2, 2), np.uint8), np.eye(3, dtype=np.float32), (2, 2))
        labels_on_plane(np.zeros((2, 2, 2), np.uint8), np.eye(3, dtype=np.float32), (2, 2),
                        np.zeros((2, 2, 2), np.float32))
