"""Appearance augmentation for TRUS frames that no simulator setting produces.

Domain randomisation varies what our simulator can render; a real scanner (or a second simulator)
also differs in ways it cannot: its texture filter, log-compression curve, speckle reduction and
edge enhancement. Following single-source domain generalisation practice (random shallow
convolution networks as in GIN, Ouyang et al. 2022 / RandConv, Xu et al. 2021; stacked intensity,
blur and sharpness transforms as in BigAug, Zhang et al. 2020), :func:`augment_appearance` changes
each frame's appearance while leaving its geometry exactly where it was, so the labels and the
true transform still hold. It is written against no particular renderer: nothing here was chosen
by looking at family B.

Each transform is drawn per frame, independently (probabilities in :data:`PROBABILITY`):

- ``texture``: a random 2-4 layer convolution network (kernels 1-5 px, random weights, leaky
  ReLU), its output standardised to the frame's mean and spread and mixed in with weight 0-1;
- ``curve``: a random monotone intensity curve (8 linear pieces, log-normal slopes, sd 0.7);
- ``blur`` (Gaussian, sigma 0.5-1.5 px) or ``sharpen`` (unsharp mask, amount 0.5-1.5);
- ``bias``: a smooth multiplicative field (log-gain sd 0.25 on a 4 x 4 grid, interpolated).

Pixels outside the imaged sector (exactly 0 with their whole 5 x 5 neighbourhood) stay 0.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

#: the ``--augment`` choices of the training recipes: gamma and gain only, or this module first
AUGMENTS = ("gain", "appearance")



def add_augment_argument(parser: argparse.ArgumentParser, what: str = "frame") -> None:
    """``--augment {gain,appearance}``, as every recipe that can use this module offers it."""
    parser.add_argument("--augment", choices=AUGMENTS, default="gain",
                        help=f"{what} augmentation: random gamma and gain (default), or first "
                        "random texture filters, intensity curves, blur/sharpening and bias "
                        "fields (regseg.train.appearance)")


#: chance that each transform is applied to a frame
PROBABILITY = {"texture": 0.5, "curve": 0.5, "blur": 0.25, "sharpen": 0.25, "bias": 0.3}


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.empty(n).uniform_(lo, hi, generator=g)


def _chosen(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def _standardise_like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` shifted and scaled per frame to ``x``'s mean and standard deviation."""
    dims = (1, 2, 3)
    y = (y - y.mean(dims, keepdim=True)) / y.std(dims, keepdim=True).clamp_min(1e-6)
    return y * x.std(dims, keepdim=True) + x.mean(dims, keepdim=True)


def random_texture(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One frame (1, 1, H, W) through a random shallow convolution network (GIN-style)."""
    layers = int(torch.randint(2, 5, (1,), generator=g))
    channels = [1] + [int(torch.randint(2, 9, (1,), generator=g)) for _ in range(layers - 1)] + [1]
    y = x
    for i in range(layers):
        k = int(torch.randint(0, 3, (1,), generator=g)) * 2 + 1  # 1, 3 or 5
        w = torch.randn(channels[i + 1], channels[i], k, k, generator=g)
        y = F.conv2d(y, w / math.sqrt(channels[i] * k * k), padding=k // 2)
        if i < layers - 1:
            y = F.leaky_relu(y, 0.2)
    return _standardise_like(y, x)


def random_curve(x: torch.Tensor, g: torch.Generator, pieces: int = 8) -> torch.Tensor:
    """A random monotone map of [0, 1] onto [0, 1], piecewise linear, applied to ``x``."""
    slopes = torch.exp(0.7 * torch.randn(pieces, generator=g))  # log-normal slopes
    knots = torch.cat([torch.zeros(1), torch.cumsum(slopes, 0) / slopes.sum()])
    pos = x.clamp(0.0, 1.0) * pieces
    i = pos.floor().clamp(max=pieces - 1).long()
    return knots[i] + (pos - i) * (knots[i + 1] - knots[i])


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` (N, 1, H, W) blurred by a separable Gaussian of ``sigma`` pixels (reflect padding)."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def bias_field(shape: tuple[int, int], g: torch.Generator, sd: float = 0.25) -> torch.Tensor:
    """A smooth positive multiplicative field (1, 1, H, W) from a 4 x 4 grid of log-gains."""
    coarse = torch.randn(1, 1, 4, 4, generator=g) * sd
    return torch.exp(F.interpolate(coarse, size=shape, mode="bicubic", align_corners=True))


def sector_mask(x: torch.Tensor) -> torch.Tensor:
    """1 where a pixel or one of its 5 x 5 neighbours is non-zero (the imaged sector), else 0."""
    return (F.max_pool2d(x, 5, stride=1, padding=2) > 0).to(x.dtype)


def augment_appearance(trus: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random appearance changes (module docstring) on (B, 1, H, W) TRUS in [0, 1]; same shape.

    The same generator state gives the same output; geometry is never changed.
    """
    b = trus.shape[0]
    shape = (trus.shape[-2], trus.shape[-1])
    draws = {k: _chosen(b, p, g) for k, p in PROBABILITY.items()}
    alpha = _uniform(b, 0.0, 1.0, g)
    sigma = _uniform(b, 0.5, 1.5, g)
    amount = _uniform(b, 0.5, 1.5, g)
    out = []
    for n in range(b):
        x = trus[n : n + 1]
        inside = sector_mask(x)
        y = x
        if draws["texture"][n]:
            y = alpha[n] * random_texture(y, g) + (1.0 - alpha[n]) * y
        if draws["curve"][n]:
            y = random_curve(y, g)
        if draws["blur"][n]:
            y = gaussian_blur(y, float(sigma[n]))
        elif draws["sharpen"][n]:
            y = y + amount[n] * (y - gaussian_blur(y, 1.0))
        if draws["bias"][n]:
            y = y * bias_field(shape, g)
        out.append((y * inside).clamp(0.0, 1.0))
    return torch.cat(out, 0)
