"""AlignSegNet, 2-D live variant: affine MRI->TRUS registration and MRI-guided TRUS segmentation.

The numbered steps follow ../shared/seeds/ARCHITECTURES.md §1.1 (the circled numbers of the
paper's Figure 2). The paper released no code; widths and depths here are our own, sized for a
2-core CPU at 128 x 128 (see :class:`AlignSegNetConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regseg.errors import InputError
from regseg.models.layers import ConvBNReLU, TransformerLayer, UNet2d
from regseg.spatial import warp_affine

NUM_CLASSES = 3  # 0 background, 1 prostate, 2 lesion (regseg.types)
NUM_LABEL_MAPS = 2  # MRI label planes: 0 prostate incl. lesion, 1 lesion (regseg.planes)


@dataclass(frozen=True)
class AlignSegNetConfig:
    """Constructor arguments of :class:`AlignSegNet`; stored in every checkpoint.

    The defaults are the shipped live model (our sizing): about 0.35 M parameters and ~9 ms per
    128 x 128 frame on 2 CPU threads. Widths are a quarter to an eighth of the spec's
    (ARCHITECTURES §1.2: C=64, E=256, U-Net 32..512), which would cost several times that.

    Attributes:
        size: model input height = width in pixels (frames are area-resampled to it).
        enc_channels: C, feature channels at half resolution.
        patch: token patch size on the half-resolution features.
        embed_dim: E, transformer width.
        depth: number of transformer layers.
        heads: attention heads.
        mlp_ratio: transformer MLP hidden width / E.
        unet_channels: segmentation U-Net widths, finest first.
        latent_dim: width of the KL alignment latent (step ⑩).
        readout_dim: values per token kept by the affine head's read-out (see :class:`AffineHead`).
    """

    size: int = 128
    enc_channels: int = 16
    patch: int = 8
    embed_dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    unet_channels: tuple[int, ...] = (8, 16, 32, 64)
    latent_dim: int = 16
    readout_dim: int = 8

    def __post_init__(self) -> None:
        # A checkpoint stores the config as plain data, where tuples may come back as lists.
        object.__setattr__(self, "unet_channels", tuple(int(c) for c in self.unet_channels))
        half = self.size // 2
        unet_factor = 2 ** (len(self.unet_channels) - 1)
        if self.size % 2 or half % self.patch or self.size % unet_factor:
            raise InputError(
                f"AlignSegNetConfig: size {self.size} must be even, size/2 divisible by patch "
                f"{self.patch} and size divisible by {unet_factor} (the U-Net's "
                f"{len(self.unet_channels) - 1} down-samplings); e.g. size=128, patch=8."
            )
        if self.embed_dim % self.heads:
            raise InputError(f"AlignSegNetConfig: embed_dim {self.embed_dim} is not divisible by "
                             f"heads {self.heads}.")


class ModalityEncoder(nn.Module):
    """Steps ① and ②: image to features at half resolution, plus a down-sampling shortcut.

    (B, C_in, H, W) -> (B, C, H/2, W/2). Our lighter layout (one full-resolution conv at C/2, a
    stride-2 conv, one half-resolution conv) replaces the spec's two full-resolution convs at C:
    the full-resolution convolutions dominate CPU time.
    """

    def __init__(self, c_in: int, channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            ConvBNReLU(c_in, channels // 2),
            ConvBNReLU(channels // 2, channels, stride=2),
            ConvBNReLU(channels, channels),
        )
        self.shortcut = nn.Conv2d(c_in, channels, 1)

    def forward(self, image: Tensor) -> Tensor:
        return self.convs(image) + self.shortcut(F.avg_pool2d(image, 2))


class AffineHead(nn.Module):
    """Step ④: transformer on co-located TRUS/MRI feature patches -> residual 2x3 affine.

    (B, 2C, h, w) -> theta (B, 2, 3) = [I | 0] + delta, in normalised grid_sample coordinates
    (align_corners=False). The last linear layer starts at zero, so training starts at identity.

    Our change to the read-out: instead of mean-pooling the tokens, each token is projected to
    ``readout_dim`` values and the tokens are flattened in grid order before the MLP. A mean pool
    is nearly blind to *where* the gland is, which is what a translation depends on; with a
    position-aware read-out a centroid difference is a linear function of the tokens. In our runs
    the mean-pooled head stayed at the mean transform for 400 steps; this one learns at once.
    """

    def __init__(self, config: AlignSegNetConfig) -> None:
        super().__init__()
        c, e = 2 * config.enc_channels, config.embed_dim
        tokens = (config.size // 2 // config.patch) ** 2
        # Patch merging: one strided conv over the concatenated features embeds each TRUS patch
        # together with its co-located MRI patch.
        self.embed = nn.Conv2d(c, e, config.patch, stride=config.patch)
        self.position = nn.Parameter(torch.zeros(1, tokens, e))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.layers = nn.Sequential(
            *[TransformerLayer(e, config.heads, config.mlp_ratio) for _ in range(config.depth)]
        )
        self.norm = nn.LayerNorm(e)
        self.readout = nn.Linear(e, config.readout_dim)
        self.mlp = nn.Sequential(nn.Linear(tokens * config.readout_dim, e // 2), nn.GELU(),
                                 nn.Linear(e // 2, 6))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.register_buffer("identity", torch.eye(2, 3).reshape(1, 6), persistent=False)

    def forward(self, features: Tensor) -> Tensor:
        tokens = self.embed(features).flatten(2).transpose(1, 2) + self.position  # (B, N, E)
        tokens = self.readout(self.norm(self.layers(tokens)))  # (B, N, readout_dim)
        return (self.identity + self.mlp(tokens.flatten(1))).reshape(-1, 2, 3)


class AlignSegNet(nn.Module):
    """Joint affine registration (MRI to TRUS) and 3-class TRUS segmentation with MRI context.

    Forward, all inputs on the model grid (``regseg.planes.trus_input`` / ``mri_inputs``):

    - ``trus``: (B, 1, H, W) float in [0, 1].
    - ``mri``: (B, 1, H, W) float in [0, 1], the MRI resliced at the tracked plane.
    - ``mri_labels``: (B, 2, H, W) float one-hot, channel 0 prostate incl. lesion, 1 lesion.

    Returns a dict of tensors (always the same keys, no flags):

    - ``theta``: (B, 2, 3) normalised affine; ``warp_affine(mri, theta)`` aligns MRI to TRUS.
    - ``logits``: (B, 3, H, W) segmentation logits (0 background, 1 prostate, 2 lesion).
    - ``warped_mri``: (B, 1, H, W) MRI through theta.
    - ``warped_labels``: (B, 2, H, W) MRI label maps through theta, bilinear (soft, for Dice).
    - ``trus_latent``, ``mri_latent``: (B, latent_dim) log-probabilities of the TRUS features
      and the aligned MRI features, for the KL alignment loss (step ⑩).

    References:
        Sang et al., "AlignSegNet: Registration-Enhanced Segmentation of Prostate Cancer in
        B-mode Ultrasound Images", Medical Image Analysis, 2025 (arXiv:2502.00712).
    """

    def __init__(self, config: AlignSegNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or AlignSegNetConfig()
        c = config.enc_channels
        self.trus_encoder = ModalityEncoder(1, c)  # ① ②, separate weights per modality
        # Our addition: the MRI encoder also sees the MRI label maps. The gland outline is the
        # cleanest thing to match against the TRUS gland, and the live path has it for free.
        self.mri_encoder = ModalityEncoder(1 + NUM_LABEL_MAPS, c)
        self.affine = AffineHead(config)  # ③ ④
        # ⑦ as a 1x1 conv at half resolution, then up-sampling: bilinear up-sampling is linear
        # and keeps constants, so this equals the spec's up-sample-then-1x1-conv at 1/4 the cost.
        self.trus_to_image = nn.Conv2d(c, 1, 1)
        self.mri_to_image = nn.Conv2d(c, 1, 1)
        # ⑩ one projection shared by both modalities (our choice), so two projections cannot
        # learn to cancel a difference between the features. It can still shrink towards a
        # uniform latent; at weight 0.1 the term is a weak regulariser (it fell to ~1e-4 in the
        # shipped run) and the registration is driven by the Dice and transform losses.
        self.project = nn.Conv2d(c, config.latent_dim, 1)
        # ⑨ our addition: the warped MRI label maps are U-Net inputs too, the strongest prior
        # for where gland and lesion lie on the frame.
        self.unet = UNet2d(2 + NUM_LABEL_MAPS, NUM_CLASSES, config.unet_channels)

    def latent(self, features: Tensor) -> Tensor:
        """(B, C, h, w) features -> (B, latent_dim) log-probabilities over latent channels."""
        return F.log_softmax(self.project(features).mean(dim=(2, 3)), dim=1)

    def forward(self, trus: Tensor, mri: Tensor, mri_labels: Tensor) -> dict[str, Tensor]:
        f_trus = self.trus_encoder(trus)
        f_mri = self.mri_encoder(torch.cat([mri, mri_labels], dim=1))
        theta = self.affine(torch.cat([f_trus, f_mri], dim=1))
        f_mri_warped = warp_affine(f_mri, theta)  # ⑤
        warped_mri = warp_affine(mri, theta)  # ⑥
        warped_labels = warp_affine(mri_labels, theta)
        size = trus.shape[-2:]
        trus_enh = trus + F.interpolate(self.trus_to_image(f_trus), size=size, mode="bilinear",
                                        align_corners=False)
        mri_enh = warped_mri + F.interpolate(self.mri_to_image(f_mri_warped), size=size,
                                             mode="bilinear", align_corners=False)
        logits = self.unet(torch.cat([trus_enh, mri_enh, warped_labels], dim=1))  # ⑧ ⑨
        return {
            "theta": theta,
            "logits": logits,
            "warped_mri": warped_mri,
            "warped_labels": warped_labels,
            "trus_latent": self.latent(f_trus),
            "mri_latent": self.latent(f_mri_warped),
        }
