"""PLCReg building blocks, 2-D and 3-D: conv blocks and the Polarity Correlation Attention (PoLaCA).

PoLaCA with its Adaptive Learning System (ALS) follows ../shared/seeds/ARCHITECTURES.md §4.2 step by
step; the docstring of :class:`PolarityCorrelationAttention` lists where we depart from the
released code and why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Upper bound on |Q~|, |K~| before the polarity power (our choice, see PoLaCA's docstring).
POWER_INPUT_MAX = 8.0


def conv_nd(ndim: int) -> type[nn.Module]:
    return nn.Conv2d if ndim == 2 else nn.Conv3d


class DualConv(nn.Sequential):
    """[Conv 3^n (bias) -> InstanceNorm (affine=False) -> ReLU] x 2 (ARCHITECTURES §4.2).

    Shapes: (B, C_in, *spatial) -> (B, C_out, *spatial).
    """

    def __init__(self, ndim: int, c_in: int, c_out: int) -> None:
        conv = conv_nd(ndim)
        norm = nn.InstanceNorm2d if ndim == 2 else nn.InstanceNorm3d
        super().__init__(conv(c_in, c_out, 3, padding=1), norm(c_out), nn.ReLU(inplace=True),
                         conv(c_out, c_out, 3, padding=1), norm(c_out), nn.ReLU(inplace=True))


class Deconv(nn.Sequential):
    """Transposed conv (kernel 2, stride 2) -> InstanceNorm -> ReLU: doubles each spatial size."""

    def __init__(self, ndim: int, c_in: int, c_out: int) -> None:
        conv = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
        norm = nn.InstanceNorm2d if ndim == 2 else nn.InstanceNorm3d
        super().__init__(conv(c_in, c_out, 2, stride=2), norm(c_out), nn.ReLU(inplace=True))


def flow_head(ndim: int, c_in: int) -> nn.Module:
    """Conv 3^n (C -> ndim) with weights ~ N(0, 1e-5) and zero bias, so the first flow is ~0."""
    head = conv_nd(ndim)(c_in, ndim, 3, padding=1)
    nn.init.normal_(head.weight, std=1e-5)
    nn.init.zeros_(head.bias)
    return head


def window_partition(x: Tensor, window: Sequence[int]) -> Tensor:
    """(B, C, *spatial) with spatial divisible by ``window`` -> (B * windows, N, C) tokens."""
    b, c, *spatial = x.shape
    ndim = len(spatial)
    shape = [b, c]
    for s, w in zip(spatial, window, strict=True):
        shape += [s // w, w]
    x = x.reshape(shape)
    perm = [0, *(2 + 2 * i for i in range(ndim)), *(3 + 2 * i for i in range(ndim)), 1]
    return x.permute(perm).reshape(-1, math.prod(window), c)


def window_merge(tokens: Tensor, window: Sequence[int], spatial: Sequence[int]) -> Tensor:
    """Inverse of :func:`window_partition`: (B * windows, N, C) -> (B, C, *spatial)."""
    ndim = len(spatial)
    counts = [s // w for s, w in zip(spatial, window, strict=True)]
    c = tokens.shape[-1]
    x = tokens.reshape(-1, *counts, *window, c)
    perm = [0, 2 * ndim + 1]
    for i in range(ndim):
        perm += [1 + i, 1 + ndim + i]
    return x.permute(perm).reshape(-1, c, *spatial)


def _polarity_powers(t: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """``(relu(t).clamp(max=M) ** p, relu(-t).clamp(max=M) ** p)`` with one power, M =
    :data:`POWER_INPUT_MAX` (p >= 1, so 0 ** p = 0 on the other side)."""
    power = t.abs().clamp(max=POWER_INPUT_MAX) ** p
    zero = torch.zeros((), dtype=power.dtype, device=power.device)
    return torch.where(t > 0, power, zero), torch.where(t < 0, power, zero)


class PolarityCorrelationAttention(nn.Module):
    """PoLaCA: windowed cross-attention of warped-moving and fixed features, with ALS.

    Per window of N tokens (ARCHITECTURES §4.2 steps 1-15): shared LayerNorm; one linear map
    W (C -> 4C, no bias) gives Q from the *fixed* tokens and K, V, G from the *moving* tokens (as
    the released code, not the figure); K gets a learnable zero-initialised per-position code P.
    ALS: Q and K are divided by a per-channel temperature softplus(tau) (tau = 0), and raised to a
    per-head, per-channel power p = 1 + alpha * sigmoid(theta) (alpha = 15, theta = 0 -> p = 8.5)
    after the polarity split Q+ = ReLU(Q)^p, Q- = ReLU(-Q)^p (same for K). The positive
    (same-sign) correlation [Q+|Q-][K+|K-]^T aggregates the first half of each head's value
    channels, the negative (opposite-sign) correlation [Q-|Q+][K+|K-]^T the second half, each
    by normalised linear attention ``sum_n (q.k_n) v_n / (sum_n q.k_n + 1e-6 N)``; the halves are
    concatenated, not subtracted. A depthwise conv of V over the window adds a local branch; the
    result is gated by G (no nonlinearity), projected, added to the moving tokens, followed by a
    pre-LN MLP and a final LayerNorm.

    Our choices where the spec marks a flaw or leaves room:

    - **Local branch scramble fixed.** The released code reshapes the depthwise-conv output from
      (windows * heads, N, d) straight to (windows, N, C), adding it at scrambled positions; we
      put heads back in place first (so the released checkpoints would not load; we train ours).
    - **Power overflow.** p reaches 16; we compute the block in float32 (autocast off) and clamp
      |Q~|, |K~| to :data:`POWER_INPUT_MAX` before the power, so 8^16 * N stays far from the
      float32 limit. Tokens are LayerNormed, so the clamp rarely binds.
    - Windows are clipped to the feature size (coarse levels of small inputs would otherwise be
      mostly padding); inputs that do not divide are zero-padded and cropped back.

    Shapes: ``forward(moving, fixed)`` with both (B, C, *spatial) -> (B, C, *spatial).

    References:
        PLCReg, "Correlation-Aware Polar-Linear Attention for Guiding Medical Image
        Registration" (github.com/yd-81/PLCReg); polarity-aware linear attention after Meng et
        al., "PolaFormer: Polarity-aware Linear Attention for Vision Transformers", ICLR 2025.
    """

    def __init__(self, dim: int, heads: int, window: Sequence[int], *, alpha: float = 15.0,
                 local_kernel: int = 3, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"PoLaCA: dim {dim} must split into {heads} heads of even width "
                             "(the values split in a positive and a negative half)")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.window = tuple(int(w) for w in window)
        self.alpha = float(alpha)
        n = math.prod(self.window)
        self.norm1 = nn.LayerNorm(dim)
        self.qkvg = nn.Linear(dim, 4 * dim, bias=False)
        self.position = nn.Parameter(torch.zeros(n, dim))  # P, added to K only
        self.temperature = nn.Parameter(torch.zeros(dim))  # tau: s = softplus(tau)
        self.sharpness = nn.Parameter(torch.zeros(heads, self.head_dim))  # theta
        self.local = conv_nd(len(self.window))(self.head_dim, self.head_dim, local_kernel,
                                               padding=local_kernel // 2, groups=self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm_out = nn.LayerNorm(dim)

    def exponent(self) -> Tensor:
        """ALS sharpening exponent p, (heads, head_dim), in (1, 1 + alpha)."""
        return 1.0 + self.alpha * torch.sigmoid(self.sharpness)

    def attend(self, x_moving: Tensor, x_fixed: Tensor) -> Tensor:
        """One transformer block on window tokens: (B', N, C) x 2 -> (B', N, C)."""
        b, n, c = x_moving.shape
        h, d = self.heads, self.head_dim
        w = self.qkvg.weight  # (4C, C): rows [Q | K | V | G]
        m, f = self.norm1(x_moving), self.norm1(x_fixed)
        q = F.linear(f, w[:c])
        k, v, g = F.linear(m, w[c:]).split(c, dim=-1)
        k = k + self.position
        s = F.softplus(self.temperature)
        q, k = q / s, k / s

        def heads(t: Tensor) -> Tensor:  # (B', N, C) -> (B', h, N, d)
            return t.reshape(b, n, h, d).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        p = self.exponent()[None, :, None, :]  # (1, h, 1, d)
        # relu(t)^p and relu(-t)^p from one power of |t|: the same values to the bit (each is
        # |t|^p on its side of 0 and 0 on the other), half the Pow work (ONNX Runtime's
        # broadcast Pow is one of the graph's slowest ops)
        q_pos, q_neg = _polarity_powers(q, p)
        k_pos, k_neg = _polarity_powers(k, p)
        q_same = torch.cat([q_pos, q_neg], dim=-1)  # (B', h, N, 2d)
        q_opposite = torch.cat([q_neg, q_pos], dim=-1)
        k_cat = torch.cat([k_pos, k_neg], dim=-1)
        v_same, v_opposite = v.split(d // 2, dim=-1)
        k_mean = k_cat.mean(dim=2, keepdim=True)  # (B', h, 1, 2d): the 1/N normalisation

        def linear_attention(q_feat: Tensor, values: Tensor) -> Tensor:
            kv = k_cat.transpose(-2, -1) @ values / n  # (B', h, 2d, d/2)
            z = (q_feat * k_mean).sum(-1, keepdim=True) + 1e-6
            return (q_feat @ kv) / z

        y = torch.cat([linear_attention(q_same, v_same),
                       linear_attention(q_opposite, v_opposite)], dim=-1)  # (B', h, N, d)
        # Local branch: depthwise conv over each window, per head, heads kept in place.
        v_img = v.reshape(b * h, n, d).transpose(1, 2).reshape(b * h, d, *self.window)
        local = self.local(v_img).reshape(b, h, d, n).transpose(2, 3)
        y = (y + local).transpose(1, 2).reshape(b, n, c)
        y = self.proj(y * g)
        z = x_moving + y
        z = z + self.mlp(self.norm2(z))
        return self.norm_out(z)

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        spatial = tuple(moving.shape[2:])
        pad = []
        for s, w in zip(reversed(spatial), reversed(self.window), strict=True):
            pad += [0, (-s) % w]
        padded = [F.pad(t, pad) if any(pad) else t for t in (moving, fixed)]
        padded_spatial = tuple(padded[0].shape[2:])
        with torch.autocast(device_type=moving.device.type, enabled=False):
            tokens_m, tokens_f = (window_partition(t.float(), self.window) for t in padded)
            out = window_merge(self.attend(tokens_m, tokens_f), self.window, padded_spatial)
        out = out.to(moving.dtype)
        if padded_spatial != spatial:
            out = out[(slice(None), slice(None), *(slice(0, s) for s in spatial))]
        return out
