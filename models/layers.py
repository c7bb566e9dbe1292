"""Small building blocks of the 2-D networks: conv blocks, a U-Net, a pre-LN transformer layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvBNReLU(nn.Sequential):
    """3x3 (or k x k) convolution, batch norm, ReLU: (B, C_in, H, W) -> (B, C_out, H/s, W/s).

    The convolution has no bias because batch norm adds one; eval-mode BN folds into the conv
    when a backend exports the graph.
    """

    def __init__(self, c_in: int, c_out: int, *, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """Two :class:`ConvBNReLU`, the U-Net level block: (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(ConvBNReLU(c_in, c_out), ConvBNReLU(c_out, c_out))


class UNet2d(nn.Module):
    """A plain 2-D U-Net: max-pool down, transposed-conv up, skip concatenation.

    Args:
        c_in: input channels.
        c_out: output channels (logits, no activation).
        channels: per-level widths, finest first, e.g. (16, 32, 64, 128): ``len - 1``
            down-samplings, so H and W must be divisible by ``2 ** (len(channels) - 1)``.

    Shapes: (B, c_in, H, W) -> (B, c_out, H, W).

    References:
        Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image
        Segmentation", MICCAI 2015.
    """

    def __init__(self, c_in: int, c_out: int, channels: Sequence[int]) -> None:
        super().__init__()
        channels = tuple(channels)
        self.down = nn.ModuleList(
            [DoubleConv(c_in, channels[0])]
            + [DoubleConv(a, b) for a, b in zip(channels[:-1], channels[1:], strict=True)]
        )
        # Coarse to fine: upsample level l+1 to level l's width, then merge with its skip.
        self.up = nn.ModuleList(
            [nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(channels[:-1], channels[1:],
                                                                   strict=True)][::-1]
        )
        self.merge = nn.ModuleList([DoubleConv(2 * a, a) for a in channels[:-1]][::-1])
        self.head = nn.Conv2d(channels[0], c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for up, merge in zip(self.up, self.merge, strict=True):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


class TransformerLayer(nn.Module):
    """Pre-LN transformer encoder layer: x + MHSA(LN(x)), then x + MLP(LN(x)).

    Written out rather than ``nn.TransformerEncoderLayer`` so the graph is the same in training,
    inference and export (the stock layer switches to a fused fast path at inference).

    Shapes: (B, N, E) -> (B, N, E).

    References:
        Vaswani et al., "Attention Is All You Need", NeurIPS 2017; pre-LN placement from
        Xiong et al., "On Layer Normalization in the Transformer Architecture", ICML 2020.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, n, e = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, e // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, E/heads)
        att = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, e))
        return x + self.mlp(self.norm2(x))
