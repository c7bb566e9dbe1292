"""The MRI resliced at a batch of planes on a pixel lattice, compiled with numba: the LC2 search's
inner loop (:class:`regseg.lc2.FrameScorer`).

torch's CPU ``grid_sample`` needs the (B, H, W, 3) grid of points made first, as tensors, and its
3-D bilinear path is scalar code; here each point is computed from its plane's (4, 3) map as it is
sampled, in float64 (torch's in float32: values equal to ~1e-5 of the volume's range, tested). One
thread, no parallel pool: it runs on the live chain's thread and shares nothing with torch's or
ONNX Runtime's threads. Used on the CPU with float32 volumes when numba is importable and
``REGSEG_NUMBA`` is not ``0``; elsewhere the torch twin runs.
"""

from __future__ import annotations

import math

import numpy as np

from regseg.kernels import compiled, switched_on

_COMPILED: dict[str, object] = {}


def available() -> bool:
    """Whether the kernel can run here (numba importable, not switched off by REGSEG_NUMBA=0)."""
    return switched_on() and _kernel() is not None


def _kernel():
    kernels = compiled(_COMPILED, {"planes": _planes})
    return None if kernels is None else kernels["planes"]


def sample_planes(volume: np.ndarray, maps: np.ndarray, hw: tuple[int, int], *,
                  interior: bool = True) -> np.ndarray:
    """(B, H, W) float32: ``F.grid_sample(volume, grid, "bilinear", "zeros",
    align_corners=False)`` at the points ``[i, j, 0, 1] @ maps[b]`` of pixel (i = column, j = row)
    of an (H, W) lattice, for each (4, 3) map to normalised (x, y, z) coordinates.

    Args:
        volume: (D, H, W) float32, C-contiguous.
        maps: (B, 4, 3) float64: rows are what pixel i, pixel j, 0 and 1 add to the point.
        hw: the lattice's (H, W).
        interior: points whose eight neighbours are all inside the volume skip the bounds tests
            (the same sum in the same order: the same bits, tested; False: every point tests
            each neighbour, the kernel before session 22, kept for that test and for
            bench/lc2_kernels.py)
    """
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("regseg.kernels.plane_sample: numba is not installed")
    out = np.empty((len(maps), int(hw[0]), int(hw[1])), np.float32)
    kernel(np.ascontiguousarray(volume, np.float32), np.ascontiguousarray(maps, np.float64), out,
           bool(interior))
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now, outside any timed work."""
    if available():
        sample_planes(np.zeros((2, 2, 2), np.float32), np.zeros((1, 4, 3)), (2, 2))


def _planes(volume, maps, out, interior):  # pragma: no cover - compiled by _kernel
    depth, height, width = volume.shape
    for b in range(maps.shape[0]):
        m00, m01, m02 = maps[b, 0, 0], maps[b, 0, 1], maps[b, 0, 2]
        m10, m11, m12 = maps[b, 1, 0], maps[b, 1, 1], maps[b, 1, 2]
        m30, m31, m32 = maps[b, 3, 0], maps[b, 3, 1], maps[b, 3, 2]
        for r in range(out.shape[1]):
            for c in range(out.shape[2]):
                px = m00 * c + m10 * r + m30
                py = m01 * c + m11 * r + m31
                pz = m02 * c + m12 * r + m32
                x = ((px + 1.0) * width - 1.0) / 2.0  # align_corners=False
                y = ((py + 1.0) * height - 1.0) / 2.0
                z = ((pz + 1.0) * depth - 1.0) / 2.0
                x0, y0, z0 = math.floor(x), math.floor(y), math.floor(z)
                fx, fy, fz = x - x0, y - y0, z - z0
                ix, iy, iz = int(x0), int(y0), int(z0)
                if (interior and 0 <= ix and ix + 1 < width and 0 <= iy and iy + 1 < height
                        and 0 <= iz and iz + 1 < depth):
                    # all eight corners inside: the loop below without its bounds tests, the
                    # same products added in the same order (so the same float64 sum)
                    gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
                    acc = 0.0
                    acc += gx * gy * gz * volume[iz, iy, ix]
                    acc += fx * gy * gz * volume[iz, iy, ix + 1]
                    acc += gx * fy * gz * volume[iz, iy + 1, ix]
                    acc += fx * fy * gz * volume[iz, iy + 1, ix + 1]
                    acc += gx * gy * fz * volume[iz + 1, iy, ix]
                    acc += fx * gy * fz * volume[iz + 1, iy, ix + 1]
                    acc += gx * fy * fz * volume[iz + 1, iy + 1, ix]
                    acc += fx * fy * fz * volume[iz + 1, iy + 1, ix + 1]
                    out[b, r, c] = acc
                    continue
                acc = 0.0
                for dz in range(2):  # zeros padding: corners outside add nothing
                    zz = iz + dz
                    if zz < 0 or zz >= depth:
                        continue
                    wz = fz if dz else 1.0 - fz
                    for dy in range(2):
                        yy = iy + dy
                        if yy < 0 or yy >= height:
                            continue
                        wy = fy if dy else 1.0 - fy
                        for dx in range(2):
                            xx = ix + dx
                            if xx < 0 or xx >= width:
                                continue
                            wx = fx if dx else 1.0 - fx
                            acc += wx * wy * wz * volume[zz, yy, xx]
                out[b, r, c] = acc
