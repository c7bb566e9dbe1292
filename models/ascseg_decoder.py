"""ASC-Seg's Cross-scale Noise Suppression Decoder (CNSD) and Feature Alignment Connector (FAC).

Layer by layer as ../shared/seeds/ARCHITECTURES.md §3.2: MSFA (multi-scale feature aggregation),
then SFM = DFB (denoising focus) -> SAB (spatial attention) -> CAB (channel attention); a CNSD
stage is ReLU(SFM(MSFA(x)) + x). Every block maps (B, C, H, W) -> (B, C, H, W).

References:
    ASC-Seg (seed 002), ICME 2025 / BSPC; see :mod:`regseg.models.ascseg`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _up2(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


class MSFABranch(nn.Module):
    """Conv3x3(C -> C/2, dilation d) -> BN -> ReLU -> Conv1x1 -> BN, optionally inside a
    resampling: ``"up"`` = bilinear x2 first and max-pool after, ``"down"`` = the reverse."""

    def __init__(self, channels: int, dilation: int, around: str | None = None) -> None:
        super().__init__()
        half = channels // 2
        self.around = around
        self.body = nn.Sequential(
            nn.Conv2d(channels, half, 3, padding=dilation, dilation=dilation),
            nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 1), nn.BatchNorm2d(half))

    def forward(self, x: Tensor) -> Tensor:
        if self.around == "up":
            return F.max_pool2d(self.body(_up2(x)), 2)
        if self.around == "down":
            return _up2(self.body(F.max_pool2d(x, 2)))
        return self.body(x)


class MSFA(nn.Module):
    """Eight branches (dilations 1-4; up/down-sampled at dilations 1 and 3), concatenated (4C),
    then grouped Conv3x3(4C -> C, groups C) -> BN -> ReLU -> Conv1x1 -> BN."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        specs = [(1, None), (2, None), (3, None), (4, None),
                 (1, "up"), (3, "up"), (1, "down"), (3, "down")]
        self.branches = nn.ModuleList(MSFABranch(channels, d, a) for d, a in specs)
        self.fuse = nn.Sequential(
            nn.Conv2d(4 * channels, channels, 3, padding=1, groups=channels),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))


class DFB(nn.Module):
    """Denoising focus block: depthwise 7/5/3 branches summed, high-pass gate s * w + s."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels),
                          nn.BatchNorm2d(channels), nn.GELU(),
                          nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
            for k in (7, 5, 3))
        self.sum_norm = nn.BatchNorm2d(channels)
        self.gate = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        xn = self.norm(x)
        s = self.sum_norm(sum(branch(xn) for branch in self.branches))
        high = s - F.avg_pool2d(s, 3, stride=1, padding=1, count_include_pad=True)
        return s * torch.sigmoid(self.gate(high)) + s


class SAB(nn.Module):
    """Spatial attention: average- and max-pooled (3x3, stride 1) branches to one map each, a
    7x7 conv over the pair, sigmoid; x * a + x."""

    def __init__(self, channels: int) -> None:
        super().__init__()

        def branch() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels),
                                 nn.GELU(), nn.Conv2d(channels, 1, 1), nn.BatchNorm2d(1))

        self.avg_branch, self.max_branch = branch(), branch()
        self.mix = nn.Sequential(nn.Conv2d(2, 1, 7, padding=3), nn.BatchNorm2d(1))

    def forward(self, x: Tensor) -> Tensor:
        a = self.avg_branch(F.avg_pool2d(x, 3, stride=1, padding=1))
        m = self.max_branch(F.max_pool2d(x, 3, stride=1, padding=1))
        return x * torch.sigmoid(self.mix(torch.cat([a, m], dim=1))) + x


class CAB(nn.Module):
    """Channel attention: s = global max + global mean, a = sigmoid(BN(1x1(GELU(BN(1x1 s))))),
    x * a + x. The BNs see a 1x1 map: training needs batch > 1 (as the seed)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels),
                                 nn.GELU(), nn.Conv2d(channels, channels, 1),
                                 nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        s = torch.amax(x, dim=(2, 3), keepdim=True) + x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.mlp(s)) + x


class CNSD(nn.Module):
    """One decoder stage: ReLU(SFM(MSFA(x)) + x) with SFM = DFB -> SAB -> CAB."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.msfa = MSFA(channels)
        self.sfm = nn.Sequential(DFB(channels), SAB(channels), CAB(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.sfm(self.msfa(x)) + x)


class FAC(nn.Module):
    """Feature alignment connector: sigmoid(BN(1x1(Up2(deep)))) * sigmoid(skip) + skip.

    ``deep`` (B, C_deep, H/2, W/2), ``skip`` (B, C, H, W) -> (B, C, H, W). The 1x1 conv runs
    before the up-sampling (bilinear up-sampling is linear and keeps constants, so the result is
    the same at a quarter of the cost), then BN.
    """

    def __init__(self, c_deep: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c_deep, channels, 1)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        gate = torch.sigmoid(self.norm(_up2(self.proj(deep))))
        return gate * torch.sigmoid(skip) + skip
