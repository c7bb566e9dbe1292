"""ASC-Seg's encoder blocks (Adaptive Structure Encoder): IPCB, DCB, PMB, in plain torch.

Shapes and layer order follow ../shared/seeds/ARCHITECTURES.md §3.2. The seed's release needs
``mamba_ssm`` / ``causal_conv1d`` (CUDA kernels) and torchvision's ``DeformConv2d``; here the
Mamba block runs :mod:`regseg.models.selective_scan` and the deformable convolution is one
``grid_sample`` call over all nine taps, so everything runs on CPU and exports to ONNX
(``GridSample``, opset >= 16) with no custom operator.

References:
    ASC-Seg: "Adaptive Structure Alignment and Cross-scale Decoding for Medical Image
    Segmentation" (ICME 2025 / BSPC; seed 002). Gu & Dao, Mamba, arXiv:2312.00752. Dai et al.,
    "Deformable Convolutional Networks", ICCV 2017 (DCNv1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regseg.models.selective_scan import selective_scan


class IPCB(nn.Module):
    """Inverted pyramid conv block: 7x7, 3x3, 1x1 convs (with biases), each BN + ReLU.

    (B, C_in, H, W) -> (B, C_out, H, W).
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for k, ci in ((7, c_in), (3, c_out), (1, c_out)):
            layers += [nn.Conv2d(ci, c_out, k, padding=k // 2), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def deform_conv_depthwise(x: Tensor, offsets: Tensor, weight: Tensor) -> Tensor:
    """Depthwise 3x3 deformable convolution (DCNv1, one offset group, stride 1, padding 1).

    Tap k (row-major over the kernel, base offset (ky, kx) in {-1, 0, 1}^2) of output pixel
    (y, x) reads ``x`` bilinearly at (y + ky + dy_k, x + kx + dx_k), zero outside; channels
    (2k, 2k+1) of ``offsets`` are (dy_k, dx_k) in pixels: torchvision's and ONNX DeformConv's
    layout (checked against ONNX Runtime's DeformConv, research-wave2 §3.2). All nine taps are
    gathered by ONE ``grid_sample`` on a (B, 9H, W, 2) grid, then weighted and summed.

    Args:
        x: (B, C, H, W).
        offsets: (B, 18, H, W) pixel offsets.
        weight: (C, 1, 3, 3) depthwise kernel (``nn.Conv2d(C, C, 3, groups=C).weight`` layout).
    Returns:
        (B, C, H, W).
    """
    b, c, h, w = x.shape
    ky = torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0], device=x.device)
    kx = torch.tensor([-1.0, 0.0, 1.0, -1.0, 0.0, 1.0, -1.0, 0.0, 1.0], device=x.device)
    rows = torch.arange(h, dtype=x.dtype, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, 1, w)
    off = offsets.reshape(b, 9, 2, h, w)
    y = rows + ky.view(1, 9, 1, 1) + off[:, :, 0]  # (B, 9, H, W) sampling rows in pixels
    xx = cols + kx.view(1, 9, 1, 1) + off[:, :, 1]
    # align_corners=True: pixel centres at -1 and +1 for indices 0 and H-1 (W-1).
    gx = xx * (2.0 / max(w - 1, 1)) - 1.0
    gy = y * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1).reshape(b, 9 * h, w, 2)
    taps = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    taps = taps.reshape(b, c, 9, h, w)
    return (taps * weight.reshape(1, c, 9, 1, 1)).sum(dim=2)


class DCB(nn.Module):
    """Deformable conv block: GELU(BN(1x1(DCN(GELU(BN(1x1 x)))))) * x + x. (B, C, H, W) kept.

    Offsets come from BN(3x3 conv(C -> 18)) of the block input. Our choice: the offset BN's
    scale (gamma) starts at 0, so training starts from the regular 3x3 grid; in the seed the
    default conv init plus BN makes the initial offsets random, about +-1 px (ARCHITECTURES §3.2).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels),
                                 nn.GELU())
        self.offset = nn.Sequential(nn.Conv2d(channels, 18, 3, padding=1), nn.BatchNorm2d(18))
        nn.init.zeros_(self.offset[1].weight)
        self.dcn_weight = nn.Parameter(torch.empty(channels, 1, 3, 3))
        nn.init.kaiming_uniform_(self.dcn_weight, a=math.sqrt(5))  # nn.Conv2d's default
        self.post = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        d = deform_conv_depthwise(self.pre(x), self.offset(x), self.dcn_weight)
        return F.gelu(self.post(d)) * x + x


class Mamba(nn.Module):
    """Mamba-1 block (library defaults, ARCHITECTURES §3.5): (B, L, d_model) -> (B, L, d_model).

    in_proj -> causal depthwise conv1d + SiLU -> x_proj (dt, B, C) -> softplus(dt_proj) ->
    selective scan -> gate with SiLU(z) -> out_proj. Initialisation as mamba_ssm: A_log =
    log(1..N) per channel (S4D-real), D = 1, dt_proj bias = softplus^-1(dt), dt log-uniform in
    [1e-3, 1e-1].

    Args:
        scan_mode, scan_chunk: :func:`regseg.models.selective_scan.selective_scan`'s options.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 scan_mode: str = "auto", scan_chunk: int = 0) -> None:
        super().__init__()
        d_inner = expand * d_model
        self.d_inner, self.d_state = d_inner, d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.scan_mode, self.scan_chunk = scan_mode, scan_chunk
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp_min(1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv1d(u.transpose(1, 2))[..., :length].transpose(1, 2))
        dt, b, c = torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], -1)
        delta = F.softplus(self.dt_proj(dt))
        y = selective_scan(u, delta, -torch.exp(self.A_log), b, c, self.D,
                           mode=self.scan_mode, chunk=self.scan_chunk)
        return self.out_proj(y * F.silu(z))


class PMB(nn.Module):
    """Parallel Mamba block (ARCHITECTURES §3.2): (B, C, H, W) -> (B, C, H, W).

    Tokens in raster order; the channels are split into 4 groups that go through ONE shared
    Mamba (d_model = C/4) with a residual each; LN, Linear and the pre-norm input added; LN; then
    a conv FFN (1x1, depthwise 7x7, GELU, 1x1) whose output is the block's (no final residual,
    as the seed). The seed applies one LayerNorm module three times; we keep that sharing.
    The four groups run as one batch of 4B sequences (the same weights, so the same result).
    """

    def __init__(self, channels: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 scan_mode: str = "auto", scan_chunk: int = 0) -> None:
        super().__init__()
        if channels % 4:
            raise ValueError(f"PMB: channels {channels} must be divisible by 4 (4 groups)")
        self.norm = nn.LayerNorm(channels)
        self.mamba = Mamba(channels // 4, d_state, d_conv, expand, scan_mode, scan_chunk)
        self.proj = nn.Linear(channels, channels)
        self.ffn = nn.Sequential(
            nn.Conv2d(channels, channels, 1),
            nn.Conv2d(channels, channels, 7, padding=3, groups=channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, L, C), row-major
        groups = self.norm(tokens).reshape(b, h * w, 4, c // 4).permute(2, 0, 1, 3)
        groups = groups.reshape(4 * b, h * w, c // 4)
        groups = self.mamba(groups) + groups
        merged = groups.reshape(4, b, h * w, c // 4).permute(1, 2, 0, 3).reshape(b, h * w, c)
        z = self.norm(tokens + self.proj(self.norm(merged)))
        return self.ffn(z.transpose(1, 2).reshape(b, c, h, w))


class ASEBlock(nn.Module):
    """One encoder stage: optional 2x max-pool, IPCB, then PMB(x) + DCB(x)."""

    def __init__(self, c_in: int, c_out: int, *, pool: bool, **mamba: object) -> None:
        super().__init__()
        self.pool = pool
        self.ipcb = IPCB(c_in, c_out)
        self.pmb = PMB(c_out, **mamba)  # type: ignore[arg-type]
        self.dcb = DCB(c_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.pool:
            x = F.max_pool2d(x, 2)
        x = self.ipcb(x)
        return self.pmb(x) + self.dcb(x)
