"""QualityNet: a tiny CNN that estimates a frame's registration error (mm) from the registered pair.

Input, on a small model grid (64 x 64 by default), 4 channels: the TRUS frame, the MRI resliced at
the registered plane, and the registered MRI labels as two maps (gland incl. lesion, lesion) —
exactly what the live path has after registration. Output: ``log(1 + error_mm)``; the error is the
mean distance (mm) over the prostate between where the registration says and where the anatomy
truly is (the TRE of the registration), so a mismatch between TRUS appearance and the MRI plane
shows as a large estimate. Trained by :mod:`regseg.train.quality` on simulated frames with known
random misregistrations; about 3 MFLOP per frame (well under 1 ms on one CPU core).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from regseg.errors import EngineError

WEIGHTS = Path(__file__).parent / "weights" / "qualitynet.pt"


@dataclass(frozen=True)
class QualityNetConfig:
    size: int = 64  # model grid (size x size)
    in_channels: int = 4  # trus, mri plane, gland map, lesion map
    width: int = 16  # channels of the first stage; doubles twice
    # Standardise the TRUS and MRI channels per frame (mean 0, std 1 over their non-zero
    # pixels): a scanner's gain, dynamic range and an MRI's contrast no longer shift the input.
    # False in checkpoints made before it existed.
    normalise: bool = False


class QualityNet(nn.Module):
    """Four stride-2 3x3 convolutions (64 -> 4 px), global average pool, two linear layers."""

    def __init__(self, config: QualityNetConfig = QualityNetConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        chans = [config.in_channels, w, 2 * w, 2 * w, 4 * w]
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b),
                       nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(4 * w, 32), nn.ReLU(inplace=True), nn.Linear(32, 1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, size, size) -> (B,) ``log(1 + error_mm)``."""
        if self.config.normalise:
            x = torch.cat([standardise(x[:, :2]), x[:, 2:]], dim=1)
        return self.head(self.features(x).mean(dim=(2, 3)))[:, 0]


def standardise(x: Tensor, eps: float = 1e-3) -> Tensor:
    """Each (sample, channel) image to mean 0 and std 1 over its non-zero pixels (the imaged
    area: outside the fan, or outside the MRI, stays 0)."""
    inside = (x > 0).to(x.dtype)
    n = inside.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    mean = (x * inside).sum(dim=(2, 3), keepdim=True) / n
    var = (((x - mean) * inside) ** 2).sum(dim=(2, 3), keepdim=True) / n
    return (x - mean) / (var.sqrt() + eps) * inside


def chain_key(refine_iterations: int, deformable: bool, multi_start: bool,
              lc2: bool = False) -> str:
    """The name of a live chain as far as it changes what QualityNet is given: the registration
    iterations K (``--refine-iterations``), the deformable stage (``--deformable``), the
    multi-start (``--multi-start``) and the image-based refinement (``--lc2``, named only when
    on, so the keys of chains without it are those calibrated before it existed), e.g.
    ``"K2/deformable-on/multi-start-off"``, ``"K2/deformable-on/multi-start-off/lc2-on"``."""
    return (f"K{int(refine_iterations)}/deformable-{'on' if deformable else 'off'}"
            f"/multi-start-{'on' if multi_start else 'off'}" + ("/lc2-on" if lc2 else ""))


def save_qualitynet(path: str | Path, model: QualityNet, calibration: dict) -> None:
    """Checkpoint: config, weights and the calibration together.

    ``calibration``: ``threshold_mm`` and ``margin_factor`` of the chain the command line runs
    by default, ``chain`` (its :func:`chain_key`) and ``by_chain`` ({chain_key: {threshold_mm,
    margin_factor, ...}}: one calibration per live chain it was measured on). Checkpoints made
    before chains were recorded have neither ``chain`` nor ``by_chain``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"name": "qualitynet", "config": asdict(model.config),
                "state_dict": model.state_dict(), "calibration": calibration}, path)


def load_qualitynet(path: str | Path = WEIGHTS, *, fold: bool = True
                    ) -> tuple[QualityNet, dict]:
    """(model in eval mode, calibration dict) from a :func:`save_qualitynet` checkpoint;
    ``fold``: BatchNorm folded into the convolutions (for inference; False to train on).

    Raises:
        EngineError: the file is missing or is not a QualityNet checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: no QualityNet weights; train them with "
                          "`python -m regseg.train.quality --out models/weights`")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("name") != "qualitynet":
        raise EngineError(f"{path}: not a QualityNet checkpoint (name {data.get('name')!r})"
                          if isinstance(data, dict) else f"{path}: not a QualityNet checkpoint")
    model = QualityNet(QualityNetConfig(**data["config"]))
    model.load_state_dict(data["state_dict"])
    model.eval()
    return fold_batchnorm(model) if fold else model, dict(data.get("calibration", {}))


def fold_batchnorm(model: QualityNet) -> QualityNet:
    """The same eval-mode net with each BatchNorm folded into its convolution (fewer ops per
    frame). For inference only: the folded net has no BatchNorm to train."""
    layers = list(model.features)
    fused: list[nn.Module] = []
    for k, layer in enumerate(layers):
        if isinstance(layer, nn.BatchNorm2d):
            continue
        if isinstance(layer, nn.Conv2d) and isinstance(layers[k + 1], nn.BatchNorm2d):
            layer = fuse_conv_bn_eval(layer, layers[k + 1])
        fused.append(layer)
    model.features = nn.Sequential(*fused)
    return model
