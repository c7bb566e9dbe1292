"""BiRegNet: bi-directional cross-modality 3-D registration (seed 001, ARCHITECTURES.md §2).

One network takes the channel concatenation [atlas (moving) image, target (fixed) image] on a
fixed working grid and predicts two fields from one shared decoder: ``U`` (fixed -> moving:
``moving(p + U(p))`` is the moving image on the fixed grid) and ``V`` (moving -> fixed).

As the spec: residual down blocks (7^3 first kernel; the skip is the block's first conv),
attention-gated up blocks (per-voxel, per-channel gate on the skip; the deeper path acts only
through the gate), and multi-scale zero-initialised 3^3 heads at every decoder level, resized to
the working grid and summed (the identity at the start), one head set per direction.
Ours: instance norm instead of batch norm (batch 1 on a CPU; no running statistics to drift), and
with ``diffeomorphic`` the summed heads are stationary velocities integrated by scaling and
squaring (:mod:`regseg.models.integrate`), so ``U`` and ``V`` are diffeomorphisms.

Training (``regseg train biregnet``, :mod:`regseg.train.biregnet`): label-driven multi-scale soft
Dice in both directions + 0.1 x image round-trip consistency (as the spec) + a small diffusion
smoothness term (ours).

Reference: Ding, Zhuang et al., "Cross-Modality Multi-Atlas Segmentation via Deep Registration
and Label Fusion", IEEE JBHI 2022 (MICCAI 2020).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regseg.models.integrate import scaling_and_squaring


@dataclass(frozen=True)
class BiRegNetConfig:
    size: tuple[int, int, int] = (48, 48, 48)  # working grid (D, H, W), divisible by 16
    # widths of the 5 levels; the spec's are C0 * [1, 2, 4, 8, 16] with C0 = 4. Ours are wider at
    # the top: torch's CPU conv3d takes its fast (oneDNN) path only from 16 channels, so 16-wide
    # is faster here than 4-wide.
    channels: tuple[int, ...] = (16, 16, 16, 32, 32)
    diffeomorphic: bool = True
    int_steps: int = 6
    spacing_mm: float = 4.0 / 3.0  # working-grid voxel size the weights were trained at


def _conv(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    """conv3_block: conv (no bias) -> norm -> ReLU."""
    return nn.Sequential(nn.Conv3d(cin, cout, k, padding=k // 2, bias=False),
                         nn.InstanceNorm3d(cout, affine=True), nn.ReLU(inplace=True))


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int, k0: int) -> None:
        super().__init__()
        self.h0 = _conv(cin, cout, k0)
        self.r1 = _conv(cout, cout)
        self.r2 = nn.Sequential(nn.Conv3d(cout, cout, 3, padding=1, bias=False),
                                nn.InstanceNorm3d(cout, affine=True))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h0 = self.h0(x)
        r2 = F.relu(self.r2(self.r1(h0)) + h0)
        return F.max_pool3d(r2, 2), h0


class _GatedUp(nn.Module):
    """Attention-gated up block: the deeper features gate the skip, per voxel and channel."""

    def __init__(self, c_g: int, c_f: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv3d(c_g, c_f, 1), nn.Conv3d(c_f, c_f, 1)
        self.alpha = nn.Conv3d(c_f, c_f, 1)
        self.r = _conv(c_f, c_f)
        self.out = nn.Sequential(nn.Conv3d(c_f, c_f, 3, padding=1, bias=False),
                                 nn.InstanceNorm3d(c_f, affine=True))

    def forward(self, g: Tensor, f: Tensor) -> Tensor:
        g = F.interpolate(g, size=f.shape[2:], mode="trilinear", align_corners=False)
        q = F.relu(0.5 * (self.a(g) + self.b(f)))
        f_hat = torch.sigmoid(self.alpha(q)) * f
        return F.relu(self.out(self.r(f_hat)) + f_hat)


class BiRegNet(nn.Module):
    """``forward(moving, fixed)`` -> ``{"ddf": U, "ddf_inverse": V}``, each (B, 3, D, H, W) in
    working-grid voxels, array-axis order (regseg.spatial.warp convention)."""

    def __init__(self, config: BiRegNetConfig) -> None:
        super().__init__()
        self.config = config
        nc = list(config.channels)
        self.down = nn.ModuleList([_Down(2, nc[0], 7), _Down(nc[0], nc[1], 3),
                                   _Down(nc[1], nc[2], 3), _Down(nc[2], nc[3], 3)])
        self.deep = _conv(nc[3], nc[4])
        self.up = nn.ModuleList([_GatedUp(nc[4], nc[3]), _GatedUp(nc[3], nc[2]),
                                 _GatedUp(nc[2], nc[1]), _GatedUp(nc[1], nc[0])])
        self.heads = nn.ModuleList([nn.ModuleList([nn.Conv3d(c, 3, 3, padding=1) for c in nc])
                                    for _ in range(2)])
        for heads in self.heads:
            for h in heads:
                nn.init.zeros_(h.weight)
                nn.init.zeros_(h.bias)

    def fields(self, moving: Tensor, fixed: Tensor) -> tuple[Tensor, Tensor]:
        """The two summed multi-scale head outputs (velocities when diffeomorphic)."""
        x = torch.cat([moving, fixed], 1)
        skips = []
        for block in self.down:
            x, skip = block(x)
            skips.append(skip)
        levels = [self.deep(x)]
        for block, skip in zip(self.up, reversed(skips), strict=True):
            levels.append(block(levels[-1], skip))
        levels = levels[::-1]  # full resolution first, as nc
        size = moving.shape[2:]
        out = []
        for heads in self.heads:
            total = 0
            for head, feat in zip(heads, levels, strict=True):
                y = head(feat)
                if y.shape[2:] != size:
                    y = F.interpolate(y, size=size, mode="trilinear", align_corners=False)
                total = total + y
            out.append(total)
        return out[0], out[1]

    def forward(self, moving: Tensor, fixed: Tensor) -> dict[str, Tensor]:
        u, v = self.fields(moving, fixed)
        if self.config.diffeomorphic:
            u = scaling_and_squaring(u, self.config.int_steps)
            v = scaling_and_squaring(v, self.config.int_steps)
        return {"ddf": u, "ddf_inverse": v}
