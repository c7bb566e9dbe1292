"""ASC-Seg, 2-D segmentation of TRUS frames: Mamba + deformable-conv encoder, noise-suppression
decoder, in plain torch (no ``mamba_ssm``, no torchvision).

Two variants share the architecture and differ only in input channels (:class:`ASCSegConfig`):
TRUS-only (1 channel: the frame) and fused (4: the frame, the MRI plane registered by AlignSegNet,
and its two label maps, the same context the AlignSegNet U-Net head gets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from regseg.errors import InputError
from regseg.models.ascseg_blocks import ASEBlock
from regseg.models.ascseg_decoder import CNSD, FAC
from regseg.models.selective_scan import SCAN_MODES

NUM_CLASSES = 3  # 0 background, 1 prostate, 2 lesion (regseg.types)


@dataclass(frozen=True)
class ASCSegConfig:
    """Constructor arguments of :class:`ASCSeg`; stored in every checkpoint.

    Attributes:
        in_channels: 1 (TRUS only) or 4 (TRUS, registered MRI, prostate and lesion label maps).
        size: working height = width in pixels, divisible by 8 (three 2x poolings); the engines'
            fixed input size. The seed trains at 256 x 256; the shipped weights use 48 x 48
            (our choice: a 48 x 48 training step at batch 8 took 10-30 s on one thread of the
            shared 2-core build machine; see train/ascseg.py).
        channels: widths of the four stages, finest first: the seed's trained configuration
            ``[8, 16, 24, 32]`` (its figure's 64..512 lists are unused defaults). Each must be
            divisible by 4 (the parallel Mamba's groups) and by 2 (MSFA's half-width branches).
        num_classes: output classes; the seed has one sigmoid map, we need background,
            prostate and lesion, so the heads give softmax logits.
        d_state, d_conv, expand: Mamba's state size, conv width and inner expansion (seed: 16,
            4, 2).
        scan_mode, scan_chunk: :func:`regseg.models.selective_scan.selective_scan` options;
            ``auto`` is chunked on CPU, parallel on CUDA. They do not change the weights.
    """

    in_channels: int = 1
    size: int = 48
    channels: tuple[int, ...] = (8, 16, 24, 32)
    num_classes: int = NUM_CLASSES
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    scan_mode: str = "auto"
    scan_chunk: int = 0

    def __post_init__(self) -> None:
        # A checkpoint stores the config as plain data, where tuples come back as lists.
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        factor = 2 ** (len(self.channels) - 1)
        if self.size <= 0 or self.size % factor:
            raise InputError(f"ASCSegConfig: size {self.size} must be a positive multiple of "
                             f"{factor} ({len(self.channels) - 1} 2x poolings); e.g. 64.")
        bad = [c for c in self.channels if c % 4]
        if bad or len(self.channels) < 2:
            raise InputError(f"ASCSegConfig: channels {list(self.channels)}: two or more stages "
                             f"expected, each divisible by 4 (bad: {bad}); e.g. [8, 16, 24, 32].")
        if self.scan_mode not in SCAN_MODES:
            raise InputError(f"ASCSegConfig: scan_mode {self.scan_mode!r}; choose one of "
                             f"{list(SCAN_MODES)}")
        if self.in_channels < 1 or self.num_classes < 1:
            raise InputError(f"ASCSegConfig: in_channels {self.in_channels} and num_classes "
                             f"{self.num_classes} must be >= 1")


class ASCSeg(nn.Module):
    """ASC-Seg: ASE encoder (IPCB; PMB + DCB), FAC skips, CNSD decoder, deep-supervision heads.

    ``forward(image)``: (B, in_channels, H, W) float in [0, 1] (channels as
    :class:`ASCSegConfig`), H = W = ``config.size`` for the engines (any multiple of 8 works in
    eager) -> ``{"logits": (B, num_classes, H, W)}`` from the finest decoder stage (the seed's
    pred[0]). :meth:`forward_deep` returns every head's logits for the deep-supervised loss.

    Our deviations from the seed, each for the task: softmax heads with 3 classes instead of one
    sigmoid map; inputs in [0, 1] (the seed min-max rescales to [0, 255]); each head's 1x1 conv
    runs before its bilinear up-sampling (equal, cheaper); the DCB offsets start at zero
    (:class:`regseg.models.ascseg_blocks.DCB`).

    References:
        ASC-Seg: "Adaptive Structure Alignment and Cross-scale Decoding for Medical Image
        Segmentation", ICME 2025 / BSPC (seed 002; ../shared/seeds/ARCHITECTURES.md §3).
    """

    def __init__(self, config: ASCSegConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ASCSegConfig()
        mamba = dict(d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                     scan_mode=config.scan_mode, scan_chunk=config.scan_chunk)
        widths = config.channels
        c_in = (config.in_channels, *widths[:-1])
        pairs = enumerate(zip(c_in, widths, strict=True))
        self.encoder = nn.ModuleList(ASEBlock(ci, co, pool=i > 0, **mamba) for i, (ci, co) in pairs)
        self.decoder = nn.ModuleList(CNSD(c) for c in widths)
        self.connect = nn.ModuleList(FAC(widths[i + 1], widths[i])
                                     for i in range(len(widths) - 1))
        self.heads = nn.ModuleList(nn.Conv2d(c, config.num_classes, 1) for c in widths)

    def _decode(self, image: Tensor) -> list[Tensor]:
        """Decoder features d1 (finest) .. dK, each (B, C_k, H / 2^(k-1), W / 2^(k-1))."""
        skips, x = [], image
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        decoded = [self.decoder[-1](skips[-1])]
        for level in range(len(skips) - 2, -1, -1):
            fused = self.connect[level](decoded[0], skips[level])
            decoded.insert(0, self.decoder[level](fused))
        return decoded

    def forward_deep(self, image: Tensor) -> list[Tensor]:
        """Every head's logits at input size, finest first: K x (B, num_classes, H, W)."""
        size = image.shape[-2:]
        out = []
        for head, d in zip(self.heads, self._decode(image), strict=True):
            logits = head(d)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            out.append(logits)
        return out

    def forward(self, image: Tensor, deep: bool = False) -> dict[str, Tensor | list[Tensor]]:
        """``{"logits": (B, num_classes, H, W)}``; with ``deep`` (training) ``{"deep": every
        head}`` as :meth:`forward_deep` (through ``forward``, as DistributedDataParallel needs)."""
        if deep:
            return {"deep": self.forward_deep(image)}
        return {"logits": self.heads[0](self._decode(image)[0])}
