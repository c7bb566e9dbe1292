"""Trilinear sampling of one 3-D volume on CPU, forward and backward, compiled with numba.

torch's CPU ``grid_sample`` in 3-D is scalar code that runs the backward for one volume on one
thread (``regseg.spatial.grid_sample`` splits it across threads by batching copies). Offline
registration spends most of its time there: the refinement steps' squarings and point samples
(forward and backward), the network's squarings and the output resampling. These kernels do the
same arithmetic per point, in parallel over the points, with the input gradient accumulated in one
buffer per thread and summed: forward 2x, forward and backward about 1.5x faster on the shapes of a
1.5 mm registration (session 13; ``tests/test_trilinear_kernel.py`` checks values and both
gradients against ``F.grid_sample``).

Scope (else :func:`sample` is not used and torch's sampler runs): float32 CPU tensors, one
(1, C, D, H, W) volume, ``mode="bilinear"``, ``padding_mode`` ``"border"`` or ``"zeros"``,
``align_corners=False``. The kernels are used only inside :func:`enabled` (a thread-local opt-in the
registration engine takes around a registration) and one launch at a time in the process: numba's
portable thread pool must not be entered from two threads at once, so a second thread simply runs
torch's sampler meanwhile. Coordinates are unnormalised in float64 (torch's in float32): values
equal to ~1e-5 of the input's range.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

_LOCAL = threading.local()
_LAUNCH = threading.Lock()
_COMPILED: dict[str, object] = {}
#: numba's parallel range once :func:`_kernels` has imported numba (numba resolves it when it
#: compiles the kernels); plain ``range`` until then.
prange = range


def available() -> bool:
    """Whether the kernels can run here: numba importable (imported on first ask, so importing
    regseg does not pay for it) and not switched off by ``REGSEG_NUMBA=0``."""
    return os.environ.get("REGSEG_NUMBA", "1") != "0" and _kernels() is not None


def _kernels() -> dict[str, object] | None:
    """The compiled kernels (numba compiles them on first use, then loads them from its cache),
    or None without numba."""
    global prange
    if not _COMPILED:
        try:
            import numba
        except ImportError:  # pragma: no cover - exercised where numba is not installed
            _COMPILED["missing"] = True
            return None
        prange = numba.prange
        jit = numba.njit(parallel=True, cache=True)
        _COMPILED.update(numba=numba, forward=jit(_forward), backward=jit(_backward))
    return None if "missing" in _COMPILED else _COMPILED


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Within this block (this thread only), eligible ``regseg.spatial.grid_sample`` calls use the
    compiled kernels."""
    before = getattr(_LOCAL, "on", False)
    _LOCAL.on = bool(on) and available()
    try:
        yield
    finally:
        _LOCAL.on = before


def eligible(image: Tensor, grid: Tensor, mode: str, padding_mode: str,
             align_corners: bool | None) -> bool:
    """Whether :func:`sample` serves this ``grid_sample`` call (see the module docstring)."""
    return (getattr(_LOCAL, "on", False) and image.device.type == "cpu"
            and image.dtype == torch.float32 and grid.dtype == torch.float32
            and image.dim() == 5 and image.shape[0] == 1 and grid.shape[0] == 1
            and grid.shape[-1] == 3 and mode == "bilinear"
            and padding_mode in ("border", "zeros") and align_corners is False
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def warm_up() -> None:
    """Compile (or load from numba's cache) both kernels now, outside any timed work."""
    if not available():
        return
    with enabled():
        # both point layouts numba specialises on: a moved view of a (1, 3, ...) tensor (warps,
        # squarings: contiguous points) and a (1, n, 1, 1, 3) grid (point samples: strided)
        moved_view = torch.zeros(1, 3, 2, 2, 2).movedim(1, -1)
        for grid in (moved_view, torch.zeros(1, 4, 1, 1, 3)):
            for image_grad in (True, False):
                image = torch.zeros(1, 1, 2, 2, 2, requires_grad=image_grad)
                sample(image, grid.clone().requires_grad_(True), "border").sum().backward()


def sample(image: Tensor, grid: Tensor, padding_mode: str) -> Tensor:
    """``F.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode,
    align_corners=False)`` for an eligible call, through the compiled kernels when the launch lock
    is free, else through torch."""
    if not _LAUNCH.acquire(blocking=False):
        return torch.nn.functional.grid_sample(image, grid, mode="bilinear",
                                               padding_mode=padding_mode, align_corners=False)
    try:
        return _Trilinear.apply(image, grid, padding_mode == "border")
    finally:
        _LAUNCH.release()


class _Trilinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: Tensor, grid: Tensor, border: bool) -> Tensor:
        channels = image.shape[1]
        # (3, N) without a copy where the grid is a moved view of a (1, 3, ...) tensor, as
        # regseg.spatial.warp makes it
        points = grid.detach().movedim(-1, 1)[0].reshape(3, -1)
        volume = image.detach()[0].contiguous()
        out = torch.empty(channels, points.shape[1], dtype=torch.float32)
        _launch("forward", volume.numpy(), points.numpy(), border, out.numpy())
        ctx.save_for_backward(volume, points)
        ctx.border, ctx.grid_shape = border, tuple(grid.shape)
        return out.reshape(1, channels, *grid.shape[1:-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        volume, points = ctx.saved_tensors
        channels = volume.shape[0]
        want_image, want_grid = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # the points in one slab per thread; each thread its own input-gradient buffer
        parts = max(1, min(torch.get_num_threads(), 8))
        voxels = volume[0].numel()
        grad_image = torch.zeros((parts, channels, voxels) if want_image else (1, 1, 1),
                                 dtype=torch.float32)
        grad_grid = torch.empty(points.shape[1], 3, dtype=torch.float32)
        with _LAUNCH:  # autograd runs this outside sample()'s lock: one launch at a time here too
            _launch("backward", volume.numpy(), points.numpy(), ctx.border,
                    grad_out.reshape(channels, -1).contiguous().numpy(), want_image, parts,
                    grad_image.numpy(), grad_grid.numpy())
        image_grad = grad_image.sum(0).reshape(1, *volume.shape) if want_image else None
        return image_grad, (grad_grid.reshape(ctx.grid_shape) if want_grid else None), None


def _launch(name: str, *args) -> None:
    """Run kernel ``name`` on torch's thread count, and leave torch's thread count as it was.

    numba's OpenMP layer shares the process's OpenMP runtime with torch: starting its pool set
    the runtime's thread count to numba's, which torch then used too. A live process at
    ``--threads 1`` found its torch ops on two threads next to ONNX Runtime's, and its chain
    took twice as long per frame (59.5 -> 109.6 ms on this 2-core CPU)."""
    kernels = _kernels()
    numba = kernels["numba"]
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        kernels[name](*args)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _forward(volume, points, border, out):  # pragma: no cover - compiled by _kernels
    channels, depth, height, width = volume.shape
    for n in prange(points.shape[1]):
        x = ((points[0, n] + 1.0) * width - 1.0) / 2.0
        y = ((points[1, n] + 1.0) * height - 1.0) / 2.0
        z = ((points[2, n] + 1.0) * depth - 1.0) / 2.0
        if border:
            x = min(max(x, 0.0), width - 1.0)
            y = min(max(y, 0.0), height - 1.0)
            z = min(max(z, 0.0), depth - 1.0)
        x0, y0, z0 = math.floor(x), math.floor(y), math.floor(z)
        fx, fy, fz = x - x0, y - y0, z - z0
        ix, iy, iz = int(x0), int(y0), int(z0)
        for c in range(channels):
            acc = 0.0
            for dz in range(2):
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
                        acc += wx * wy * wz * volume[c, zz, yy, xx]
            out[c, n] = acc


def _backward(volume, points, border, grad_out, want_image, parts, grad_image,
              grad_grid):  # pragma: no cover - compiled by _kernels
    channels, depth, height, width = volume.shape
    count = points.shape[1]
    chunk = (count + parts - 1) // parts
    for p in prange(parts):
        for n in range(p * chunk, min(count, (p + 1) * chunk)):
            x = ((points[0, n] + 1.0) * width - 1.0) / 2.0
            y = ((points[1, n] + 1.0) * height - 1.0) / 2.0
            z = ((points[2, n] + 1.0) * depth - 1.0) / 2.0
            # d(voxel coordinate)/d(normalised); zero where the border clips (torch counts the
            # border itself as clipped)
            sx, sy, sz = width / 2.0, height / 2.0, depth / 2.0
            if border:
                if x <= 0.0:
                    x, sx = 0.0, 0.0
                elif x >= width - 1.0:
                    x, sx = width - 1.0, 0.0
                if y <= 0.0:
                    y, sy = 0.0, 0.0
                elif y >= height - 1.0:
                    y, sy = height - 1.0, 0.0
                if z <= 0.0:
                    z, sz = 0.0, 0.0
                elif z >= depth - 1.0:
                    z, sz = depth - 1.0, 0.0
            x0, y0, z0 = math.floor(x), math.floor(y), math.floor(z)
            fx, fy, fz = x - x0, y - y0, z - z0
            ix, iy, iz = int(x0), int(y0), int(z0)
            gx, gy, gz = 0.0, 0.0, 0.0
            for dz in range(2):
                zz = iz + dz
                if zz < 0 or zz >= depth:
                    continue
                wz, dwz = (fz, 1.0) if dz else (1.0 - fz, -1.0)
                for dy in range(2):
                    yy = iy + dy
                    if yy < 0 or yy >= height:
                        continue
                    wy, dwy = (fy, 1.0) if dy else (1.0 - fy, -1.0)
                    for dx in range(2):
                        xx = ix + dx
                        if xx < 0 or xx >= width:
                            continue
                        wx, dwx = (fx, 1.0) if dx else (1.0 - fx, -1.0)
                        weight = wx * wy * wz
                        at = (zz * height + yy) * width + xx
                        for c in range(channels):
                            g = grad_out[c, n]
                            v = volume[c, zz, yy, xx] * g
                            gx += dwx * wy * wz * v
                            gy += wx * dwy * wz * v
                            gz += wx * wy * dwz * v
                            if want_image:
                                grad_image[p, c, at] += weight * g
            grad_grid[n, 0] = gx * sx
            grad_grid[n, 1] = gy * sy
            grad_grid[n, 2] = gz * sz
