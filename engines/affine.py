"""The affine stage of offline 3-D registration: learned (Affine3D), optimised (MIND), or both.

Every estimate is a ``theta`` (3, 4) in grid_sample's normalised (x, y, z) coordinates
(align_corners=False), fixed -> moving, which does not depend on the grid's resolution; it becomes
an array-order voxel matrix of a given grid by :func:`theta_to_voxels`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg import spatial
from regseg.engines.affine_modes import AFFINE_DEFAULT, AFFINE_MODES, DEFAULT_ITERATIONS
from regseg.engines.base import Engine, make_engine
from regseg.errors import InputError
from regseg.models.affine3d import centre_of_mass
from regseg.models.reg_losses import mind_descriptor
from regseg.models.registry import WEIGHTS_DIR, load_model

#: The shipped learned affine weights.
SHIPPED_AFFINE = "affine3d"


def theta_to_voxels(theta: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(3, 4) or (4, 4) normalised fixed -> moving map -> (4, 4) array-order voxel map (k, j, i)
    of a grid of array shape ``shape`` (D, H, W)."""
    theta4 = np.eye(4)
    theta4[:3] = np.asarray(theta, dtype=np.float64)[:3]
    norm = spatial.index_to_normalised(tuple(shape[::-1]))
    xyz = np.linalg.inv(norm) @ theta4 @ norm  # voxel (i, j, k) -> voxel (i, j, k)
    flip = np.eye(4)[[2, 1, 0, 3]]
    return flip @ xyz @ flip


def to_affine_grid(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """(1, 1, D, H, W) -> ``size``: average pooling when ``size`` divides the grid evenly (as the
    training data and the optimiser do), else trilinear."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    factors = [n // s for n, s in zip(x.shape[2:], size, strict=True)]
    if len(set(factors)) == 1 and all(n == f * s for n, f, s in
                                      zip(x.shape[2:], factors, size, strict=True)):
        return F.avg_pool3d(x, factors[0])
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def optimise_affine(fixed: Tensor, moving: Tensor, *, iterations: int = 120, lr: float = 0.01,
                    downsample: int = 2, initial: np.ndarray | None = None) -> np.ndarray:
    """Affine instance optimisation: 12 parameters, MIND similarity, Adam.

    Our choice for the iterative affine stage: a short optimisation of a modality-independent
    loss on a coarse grid handles the "other modality" pairs that NCC cannot.

    Args:
        fixed, moving: (1, 1, D, H, W) on one grid, intensities in [0, 1].
        downsample: optimise on a grid this many times coarser (average pooled).
        initial: the start, a normalised (3, 4) ``theta`` (e.g. Affine3D's); default the
            centre-of-mass alignment.
    Returns:
        (3, 4) ``theta``, normalised fixed -> moving (see the module docstring).

    References:
        Heinrich et al., MIND, MedIA 2012 (the similarity).
    """
    f = F.avg_pool3d(fixed, downsample) if downsample > 1 else fixed
    m = F.avg_pool3d(moving, downsample) if downsample > 1 else moving
    if initial is None:
        start = torch.eye(3, 4)
        start[:, 3] = centre_of_mass(m, 0.1)[0] - centre_of_mass(f, 0.1)[0]
    else:
        start = torch.as_tensor(np.asarray(initial)[:3], dtype=torch.float32)
    linear = (start[:, :3] - torch.eye(3)).clone().requires_grad_(True)
    shift = start[:, 3].clone().requires_grad_(True)
    optimiser = torch.optim.Adam([linear, shift], lr=lr)
    target = mind_descriptor(f)  # the fixed image's MIND, once (mind_loss would redo it per step)
    with torch.enable_grad():
        for _ in range(iterations):
            theta = torch.cat([torch.eye(3) + linear, shift[:, None]], 1)[None]
            grid = F.affine_grid(theta, list(f.shape), align_corners=False)
            warped = spatial.grid_sample(m, grid, padding_mode="zeros", align_corners=False)
            loss = (mind_descriptor(warped) - target).square().mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return torch.cat([torch.eye(3) + linear, shift[:, None]], 1).detach().double().numpy()


class AffineStage:
    """The affine stage: ``stage(fixed, moving)`` -> (4, 4) array-order voxel map of their grid.

    Args:
        mode: one of :data:`AFFINE_MODES`.
        iterations: MIND optimisation steps (``optimise``: from the centre of mass;
            ``learned+optimise``: from the network's estimate); None: :data:`DEFAULT_ITERATIONS`.
            0 means no affine stage at all, whatever the mode (the historical meaning).
        weights: Affine3D checkpoint path or ``affine3d`` (the shipped weights).
        backend, device, precision, threads, cache_dir: :func:`regseg.engines.base.make_engine`.
    Raises:
        InputError: an unknown mode.
    """

    def __init__(self, mode: str = AFFINE_DEFAULT, *, iterations: int | None = None,
                 weights: str | Path = SHIPPED_AFFINE, backend: str = "eager",
                 device: torch.device | str = "cpu", precision: str = "fp32",
                 threads: int | None = None, cache_dir: str | Path | None = None) -> None:
        if mode not in AFFINE_MODES:
            raise InputError(f"affine mode {mode!r}: choose one of {list(AFFINE_MODES)}")
        self.iterations = DEFAULT_ITERATIONS[mode] if iterations is None else int(iterations)
        self.mode = "none" if iterations == 0 else mode
        self.engine: Engine | None = None
        if self.mode in ("optimise", "learned+optimise"):
            # torch.optim's first use imports its compiler machinery (seconds; 20 s on a loaded
            # 2-core machine): pay it here, at load, not in the first pair's time
            torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        if self.mode.startswith("learned"):
            path = WEIGHTS_DIR / f"{weights}.pt" if str(weights) == SHIPPED_AFFINE else weights
            model = load_model(path)
            self.size = tuple(model.config.size)
            shape = (1, 1, *self.size)
            self.engine = make_engine(model, {"fixed": shape, "moving": shape}, backend=backend,
                                      device=device, precision=precision, threads=threads,
                                      cache_dir=cache_dir, outputs=("theta",))

    def learned(self, fixed: Tensor, moving: Tensor) -> np.ndarray:
        """The network's (3, 4) normalised ``theta`` for (1, 1, D, H, W) images in [0, 1]."""
        assert self.engine is not None
        dev = self.engine.device
        out = self.engine({"fixed": to_affine_grid(fixed, self.size).to(dev),
                           "moving": to_affine_grid(moving, self.size).to(dev)})
        return out["theta"][0].detach().double().cpu().numpy()

    def __call__(self, fixed: Tensor, moving: Tensor) -> np.ndarray:
        """(4, 4) array-order voxel map, fixed (k, j, i, 1) -> moving, of the inputs' grid."""
        if self.mode == "none":
            return np.eye(4)
        theta = self.learned(fixed, moving) if self.engine is not None else None
        if self.mode != "learned" and self.iterations > 0:
            theta = optimise_affine(fixed.cpu(), moving.cpu(), iterations=self.iterations,
                                    initial=theta)
        return theta_to_voxels(theta, tuple(fixed.shape[2:]))
