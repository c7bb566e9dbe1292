"""Affine3D: a small 3-D CNN that predicts the affine aligning a moving volume to a fixed one.

The learned first stage of offline registration (issue 18): the pair, both images on one coarse
grid, goes in as two channels; 12 affine parameters come out. Before the network, the moving image
is translated so its centre of mass meets the fixed image's (the start the MIND optimiser of
``regseg.engines.affine.optimise_affine`` also uses); the network predicts the residual, and its
last layer is zero-initialised, so an untrained model is exactly that centre-of-mass alignment.

Our design (no paper is followed to the letter): strided 3x3x3 convolutions with InstanceNorm
and LeakyReLU, as the encoders of learned affine stages do (e.g. de Vos et al., "A deep learning
framework for unsupervised affine and deformable image registration", MedIA 52, 2019, and the
affine networks of Learn2Reg entries), then a 1x1x1 reduction and a fully connected head over the
coarsest feature map (it keeps where features are, which translation and rotation need; global
pooling would discard it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regseg.errors import InputError


@dataclass(frozen=True)
class Affine3DConfig:
    """Constructor arguments of :class:`Affine3D`; stored in every checkpoint.

    Attributes:
        size: input grid (D, H, W), array order; each divisible by ``2 ** len(channels[1:])``.
            The shipped model works at the PLCReg 3-D working grid halved (24 x 32 x 24 voxels of
            6.5 mm), average-pooled, as the optimiser does.
        channels: widths; the first convolution keeps the resolution, each later one halves it.
        reduce: channels of the 1x1x1 reduction before the fully connected head.
        hidden: width of the hidden fully connected layer.
        threshold: intensity above which voxels count for the centre of mass (inputs in [0, 1]).
    """

    size: tuple[int, int, int] = (24, 32, 24)
    channels: tuple[int, ...] = (16, 32, 32, 64)
    reduce: int = 16
    hidden: int = 64
    threshold: float = 0.1

    def __post_init__(self) -> None:
        factor = 2 ** (len(self.channels) - 1)
        if len(self.size) != 3 or any(s % factor for s in self.size):
            raise InputError(f"Affine3DConfig.size {self.size}: three sizes, each divisible by "
                             f"{factor} (2 ** (len(channels) - 1)), are expected")


def centre_of_mass(image: Tensor, threshold: float) -> Tensor:
    """Normalised (x, y, z) centre of the voxels brighter than ``threshold``, intensity-weighted.

    Args:
        image: (B, 1, D, H, W).
    Returns:
        (B, 3) in grid_sample's normalised coordinates (align_corners=False).
    """
    w = (image[:, 0] > threshold).float() * image[:, 0]
    total = w.sum((1, 2, 3)).clamp_min(1e-6)
    centres = []
    for axis, n in enumerate(image.shape[2:]):  # array order (z, y, x)
        coord = (2 * torch.arange(n, dtype=image.dtype, device=image.device) + 1) / n - 1
        shape = [1, 1, 1]
        shape[axis] = n
        centres.append((w * coord.reshape(1, *shape)).sum((1, 2, 3)) / total)
    return torch.stack(centres[::-1], 1)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1),
                         nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.2))


class Affine3D(nn.Module):
    """fixed, moving (B, 1, *size) in [0, 1] -> ``theta`` (B, 3, 4), the fixed -> moving map.

    ``theta`` is in grid_sample's normalised (x, y, z) coordinates (align_corners=False), as
    ``F.affine_grid`` takes it: fixed point p corresponds to the moving point ``theta @ (p, 1)``.
    """

    def __init__(self, config: Affine3DConfig) -> None:
        super().__init__()
        self.config = config
        layers, cin = [], 2
        for n, cout in enumerate(config.channels):
            layers.append(_block(cin, cout, 1 if n == 0 else 2))
            cin = cout
        self.encoder = nn.Sequential(*layers)
        self.reduce = nn.Sequential(nn.Conv3d(cin, config.reduce, 1), nn.LeakyReLU(0.2))
        factor = 2 ** (len(config.channels) - 1)
        cells = int(torch.tensor([s // factor for s in config.size]).prod())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(config.reduce * cells, config.hidden),
                                  nn.LeakyReLU(0.2), nn.Linear(config.hidden, 12))
        nn.init.zeros_(self.head[-1].weight)  # start at the centre-of-mass alignment
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, fixed: Tensor, moving: Tensor) -> dict[str, Tensor]:
        """Returns ``theta`` (B, 3, 4) and ``initial`` (B, 3, 4), the centre-of-mass start."""
        b = fixed.shape[0]
        eye = torch.eye(3, 4, dtype=fixed.dtype, device=fixed.device).expand(b, 3, 4)
        shift = centre_of_mass(moving, self.config.threshold) - centre_of_mass(
            fixed, self.config.threshold)
        initial = eye + F.pad(shift[:, :, None], (3, 0))
        grid = F.affine_grid(initial, list(moving.shape), align_corners=False)
        moving_com = F.grid_sample(moving, grid, padding_mode="zeros", align_corners=False)
        features = self.reduce(self.encoder(torch.cat([fixed, moving_com], 1)))
        residual = self.head(features).reshape(b, 3, 4)
        # fixed p -> moving_com at (I + L) p + t -> moving at (I + L) p + t + shift
        theta = initial + residual
        return {"theta": theta, "initial": initial}


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters of a model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
