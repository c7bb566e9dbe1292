"""PLCReg: coarse-to-fine deformable registration with polarity correlation attention, 2-D or 3-D.

One config builds either dimensionality: the 2-D model refines the live MRI-to-TRUS registration
after the affine stage, the 3-D model registers volumes offline. The network follows
../shared/seeds/ARCHITECTURES.md §4.1-4.2; :class:`PLCRegConfig` says what is ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from regseg.errors import InputError
from regseg.models.integrate import scaling_and_squaring, upsample_ddf
from regseg.models.plcreg_blocks import (
    Deconv,
    DualConv,
    PolarityCorrelationAttention,
    flow_head,
)
from regseg.spatial import warp


@dataclass(frozen=True)
class PLCRegConfig:
    """Constructor arguments of :class:`PLCReg`; stored in every checkpoint.

    Our sizing and choices (the spec is OASIS 160x224x192, widths 16..256, 5 levels, 8 heads,
    window 5x7x6, MLP ratio 4; ~0.3 s per pair on a GPU): the defaults are the 2-D live model.

    Attributes:
        ndim: 2 (live frames) or 3 (volumes).
        size: working grid, (H, W) or (D, H, W); divisible by ``2 ** (len(channels) - 1)``.
            Engines resample to it, so the model always sees one shape.
        moving_channels: moving-image channels. The live model takes the MRI plane plus its two
            label maps (prostate, lesion), our addition: the gland outline is the cleanest cue.
        fixed_channels: fixed-image channels.
        channels: encoder widths per level, finest first (one DualConv and one average pool
            per level).
        shared_encoder: one encoder for both images, as the spec. For cross-modal pairs with
            different channel counts (MRI + labels vs TRUS) two encoders are needed: set False.
        heads: PoLaCA heads (spec 8); every attention level's width / heads must be even.
        window: PoLaCA window per axis, clipped per level to the feature size.
        alpha: ALS exponent range, p in (1, 1 + alpha) (spec 15).
        local_kernel: depthwise local-branch kernel (spec 3).
        mlp_ratio: PoLaCA MLP hidden width / C (spec 4; 2 here to halve its cost).
        diffeomorphic: our option: the estimated field is a stationary velocity, integrated by
            scaling and squaring (7 steps) into the output displacement, which is then invertible
            (``regseg.models.integrate.invert_velocity``). Internal feature warps use the
            integrated field of each level. The released PLCReg adds displacements (False).
        int_steps: scaling-and-squaring steps when ``diffeomorphic``.
    """

    ndim: int = 2
    size: tuple[int, ...] = (128, 128)
    moving_channels: int = 1
    fixed_channels: int = 1
    channels: tuple[int, ...] = (8, 16, 32, 64)
    shared_encoder: bool = True
    heads: int = 4
    window: tuple[int, ...] = (8, 8)
    alpha: float = 15.0
    local_kernel: int = 3
    mlp_ratio: float = 2.0
    diffeomorphic: bool = True
    int_steps: int = 7

    def __post_init__(self) -> None:
        # Checkpoints store the config as plain data, where tuples may come back as lists.
        for name in ("size", "channels", "window"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.ndim not in (2, 3):
            raise InputError(f"PLCRegConfig: ndim must be 2 or 3, got {self.ndim}")
        if len(self.size) != self.ndim or len(self.window) != self.ndim:
            raise InputError(f"PLCRegConfig: size {self.size} and window {self.window} need "
                             f"{self.ndim} values (ndim={self.ndim})")
        factor = 2 ** (len(self.channels) - 1)
        if len(self.channels) < 2 or any(s % factor for s in self.size):
            raise InputError(f"PLCRegConfig: size {self.size} must be divisible by {factor} "
                             f"(2 ** (levels - 1) for channels {self.channels}), with >= 2 levels")
        for c in self.channels[1:]:
            if c % self.heads or (c // self.heads) % 2:
                raise InputError(f"PLCRegConfig: width {c} must split into {self.heads} heads "
                                 "of even width")
        if self.shared_encoder and self.moving_channels != self.fixed_channels:
            raise InputError("PLCRegConfig: shared_encoder needs moving_channels == "
                             f"fixed_channels (got {self.moving_channels} and "
                             f"{self.fixed_channels}); set shared_encoder=False")


class Encoder(nn.Module):
    """Per level DualConv then average pool: (B, C_in, *S) -> features finest first."""

    def __init__(self, ndim: int, c_in: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        widths = (c_in, *channels)
        self.blocks = nn.ModuleList(
            DualConv(ndim, a, b) for a, b in zip(widths[:-1], channels, strict=True))
        self.pool = nn.AvgPool2d(2) if ndim == 2 else nn.AvgPool3d(2)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else self.pool(x))
            features.append(x)
        return features


class PLCReg(nn.Module):
    """Coarse-to-fine deformable registration, PoLaCA + ALS at every level but the finest.

    Level L (coarsest): X = PoLaCA(F_m, F_f); c = DualConv([F_m, X, F_f]); phi = RegHead(c).
    Finer levels: phi_up = 2 * up(phi); F~_m = F_m o (Id + phi_up); X = PoLaCA(F~_m, F_f)
    (none at the finest level); c = DualConv([F~_m, X, F_f]); phi = RegHead(c) + phi_up;
    g = DualConv([phi, c, Deconv(g_prev or c_coarsest)]); phi += FineHead(g). Levels combine
    by addition, as the released code (in diffeomorphic mode, of velocities).

    Forward (tensors on the working grid ``config.size``):

    - ``moving``: (B, moving_channels, *size); ``fixed``: (B, fixed_channels, *size), each
      intensity-normalised to about [0, 1].

    Returns a dict (always the same keys):

    - ``ddf``: (B, ndim, *size) displacement in voxels, array-axis order, moving -> fixed:
      ``warp(moving, ddf)`` is aligned with ``fixed``.
    - ``field``: the estimated field: the stationary velocity when ``diffeomorphic`` (invert
      with ``regseg.models.integrate.invert_velocity``), else the same tensor as ``ddf``.
    - ``moved``: (B, moving_channels, *size), ``warp(moving, ddf)`` (bilinear, border).

    Internal warps use ``regseg.spatial.warp`` (align_corners=False voxel geometry) everywhere,
    which removes the half-voxel inconsistency of the released final STN (§4.3).

    References:
        PLCReg (github.com/yd-81/PLCReg), ARCHITECTURES §4; coarse-to-fine residual flows after
        Mok & Chung, "Large Deformation Diffeomorphic Image Registration with Laplacian Pyramid
        Networks", MICCAI 2020.
    """

    def __init__(self, config: PLCRegConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or PLCRegConfig()
        n, ch = cfg.ndim, cfg.channels
        levels = len(ch)
        self.encoder_moving = Encoder(n, cfg.moving_channels, ch)
        self.encoder_fixed = None if cfg.shared_encoder else Encoder(n, cfg.fixed_channels, ch)
        self.attention = nn.ModuleList()
        for level in range(1, levels):
            spatial = [s // 2**level for s in cfg.size]
            window = [min(w, s) for w, s in zip(cfg.window, spatial, strict=True)]
            self.attention.append(PolarityCorrelationAttention(
                ch[level], cfg.heads, window, alpha=cfg.alpha, local_kernel=cfg.local_kernel,
                mlp_ratio=cfg.mlp_ratio))
        # conv[l]: [F_m, X, F_f] -> C_l (level 0: [F_m, F_f] -> C_0)
        self.conv = nn.ModuleList(
            [DualConv(n, 2 * ch[0], ch[0])] + [DualConv(n, 3 * c, c) for c in ch[1:]])
        self.reg_head = nn.ModuleList(flow_head(n, c) for c in ch)
        self.deconv = nn.ModuleList(Deconv(n, ch[i + 1], ch[i]) for i in range(levels - 1))
        self.fine_conv = nn.ModuleList(DualConv(n, 2 * c + n, c) for c in ch[:-1])
        self.fine_head = nn.ModuleList(flow_head(n, c) for c in ch[:-1])

    def displacement(self, field: Tensor) -> Tensor:
        """The displacement a level's estimated field stands for (integrated if diffeomorphic)."""
        if self.config.diffeomorphic:
            return scaling_and_squaring(field, self.config.int_steps)
        return field

    def forward(self, moving: Tensor, fixed: Tensor) -> dict[str, Tensor]:
        f_moving = self.encoder_moving(moving)
        f_fixed = (self.encoder_moving if self.encoder_fixed is None else self.encoder_fixed)(
            fixed)
        top = len(f_moving) - 1
        x = self.attention[top - 1](f_moving[top], f_fixed[top])
        context = self.conv[top](torch.cat([f_moving[top], x, f_fixed[top]], dim=1))
        field = self.reg_head[top](context)
        for level in range(top - 1, -1, -1):
            up = upsample_ddf(field)
            warped = warp(f_moving[level], self.displacement(up))
            if level > 0:
                x = self.attention[level - 1](warped, f_fixed[level])
                c = self.conv[level](torch.cat([warped, x, f_fixed[level]], dim=1))
            else:
                c = self.conv[0](torch.cat([warped, f_fixed[0]], dim=1))
            field = self.reg_head[level](c) + up
            g = self.fine_conv[level](torch.cat([field, c, self.deconv[level](context)], dim=1))
            field = field + self.fine_head[level](g)
            context = g
        ddf = self.displacement(field)
        return {"ddf": ddf, "field": field, "moved": warp(moving, ddf)}


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters of a model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

