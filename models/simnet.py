"""SimNet: a per-voxel trust map for one registered atlas (Ding et al., JBHI 2022; seed 001).

ARCHITECTURES.md §2.2 (``LabIntSimNet``), at a reduced size for CPU training:

- input: the target image (z-scored), the warped atlas image (z-scored; an addition to the seed,
  whose input is the target and the warped label only: across modalities the pair of images is
  what tells a misregistered atlas from a good one) and the warped atlas foreground probability
  (the sum of its non-background one-hot channels, so one network serves any label set);
- encoder: down residual blocks (conv3_block -> conv3_block -> conv + BN + skip, max-pool; the
  skip passed on is h0, the first kernel 7^3 here 5^3), widths ``channels`` (the seed's
  16..256 scaled to 8..64);
- decoder: plain up blocks (transposed conv + additive up-sampling, residual);
- multi-scale head: a zero-initialised 3^3 conv to one channel at every decoder level, resized to
  the input size and summed into a logit z; the weight is sigmoid(z).

Trained (train/simnet.py) against the seed's target: the fraction of voxels in the 3^3 cube
around x where the warped atlas label equals the target's true label.
Frames: every tensor is (B, C, D, H, W) on the target's grid resampled to ``size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class SimNetConfig:
    """SimNet's shape. ``size`` is the working grid (D, H, W): divisible by 2^(levels-1)."""

    channels: tuple[int, ...] = (8, 16, 32, 64)
    size: tuple[int, int, int] = (40, 32, 32)
    first_kernel: int = 5
    use_atlas_image: bool = True

    def __post_init__(self) -> None:
        if any(b != 2 * a for a, b in zip(self.channels[:-1], self.channels[1:], strict=True)):
            raise ValueError(f"SimNetConfig.channels {self.channels}: each level must double "
                             "the previous one (the additive up-sampling halves them)")
        step = 2 ** (len(self.channels) - 1)
        if any(s % step for s in self.size):
            raise ValueError(f"SimNetConfig.size {self.size}: each side must be divisible by "
                             f"{step} (2^(levels-1) for channels {self.channels})")


def _bn(c: int) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(c, eps=1e-3, momentum=0.1)  # TF defaults (ARCHITECTURES §2.2)


class ConvBlock(nn.Sequential):
    """conv (no bias, Glorot) -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int, k: int = 3) -> None:
        conv = nn.Conv3d(cin, cout, k, padding=k // 2, bias=False)
        nn.init.xavier_uniform_(conv.weight)
        super().__init__(conv, _bn(cout), nn.ReLU(inplace=True))


class DownBlock(nn.Module):
    """Residual down block; returns (pooled output, skip h0)."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.h0 = ConvBlock(cin, cout, k)
        self.r1 = ConvBlock(cout, cout)
        self.conv = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.bn = _bn(cout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h0 = self.h0(x)
        r2 = F.relu(self.bn(self.conv(self.r1(h0))) + h0)
        return F.max_pool3d(r2, 2), h0


class UpBlock(nn.Module):
    """Plain up block: transposed conv + additive up-sampling of the deeper features, residual."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cout, 3, stride=2, padding=1, output_padding=1,
                                     bias=False)
        self.up_bn = _bn(cout)
        self.r2 = ConvBlock(cout, cout)
        self.conv = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.bn = _bn(cout)

    def forward(self, g: Tensor, f: Tensor) -> Tensor:
        resized = F.interpolate(g, size=f.shape[2:], mode="trilinear", align_corners=False)
        additive = resized.reshape(g.shape[0], 2, -1, *f.shape[2:]).sum(1)  # cin -> cin / 2
        h0 = F.relu(self.up_bn(self.up(g))) + additive
        r1 = h0 + f
        return F.relu(self.bn(self.conv(self.r2(h0))) + r1)


class SimNet(nn.Module):
    """``forward(target, atlas_image, atlas_foreground)`` -> ``{"logit", "weight"}``, each
    (B, 1, D, H, W); inputs (B, 1, D, H, W) at ``config.size`` (``atlas_image`` is ignored when
    ``config.use_atlas_image`` is False)."""

    def __init__(self, config: SimNetConfig = SimNetConfig()) -> None:
        super().__init__()
        self.config = config
        nc = config.channels
        cin = 3 if config.use_atlas_image else 2
        self.down = nn.ModuleList(
            DownBlock(c_in, c_out, config.first_kernel if i == 0 else 3)
            for i, (c_in, c_out) in enumerate(zip((cin, *nc[:-2]), nc[:-1], strict=True)))
        self.bottleneck = ConvBlock(nc[-2], nc[-1])
        self.up = nn.ModuleList(UpBlock(nc[i + 1], nc[i]) for i in reversed(range(len(nc) - 1)))
        self.heads = nn.ModuleList(nn.Conv3d(c, 1, 3, padding=1) for c in nc)
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, target: Tensor, atlas_image: Tensor, atlas_foreground: Tensor
                ) -> dict[str, Tensor]:
        parts = [target, atlas_image, atlas_foreground] if self.config.use_atlas_image else [
            target, atlas_foreground]
        x = torch.cat(parts, dim=1)
        size = x.shape[2:]
        skips = []
        for block in self.down:
            x, skip = block(x)
            skips.append(skip)
        x = self.bottleneck(x)
        levels = [x]
        for block, skip in zip(self.up, reversed(skips), strict=True):
            x = block(x, skip)
            levels.append(x)
        logit = sum(F.interpolate(head(level), size=size, mode="trilinear", align_corners=False)
                    for head, level in zip(self.heads, reversed(levels), strict=True))
        return {"logit": logit, "weight": torch.sigmoid(logit)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
