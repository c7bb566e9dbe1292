"""WarpSeg: a 3-D U-Net encoder shared by a coarse and a fine decoder, and the hierarchical loss.

After WarpSeg (seed 004, ARCHITECTURES.md §5.2): one encoder, two decoders -- coarse classes (e.g.
background / prostate) and fine classes (e.g. background / peripheral zone / transition zone /
lesion) -- where every fine class belongs to one coarse group (``WarpSegConfig.fine_groups``). The
two decoders run in parallel off one encoder pass (the README figure), not in WarpSeg's released
cascade. Our own reduced widths, for CPU training.

The hierarchical loss (research-wave2.md §2, after Fidon et al.'s label-set losses, MICCAI 2021)
marginalises the fine softmax into the coarse groups: the group logit is the log-sum-exp of its
members' logits, so ``softmax(group logits) = sum of the fine probabilities per group``; it gets
cross-entropy and Dice against the coarse target on every volume, including volumes that carry only
coarse labels. Fine targets are *label sets* (the classes allowed at a voxel): one class where the
fine label is known, a whole group where only the coarse label is, and for pseudo-labels whatever
the registration cannot tell apart (an atlas lesion says nothing about the patient's lesions).

``single_decoder`` builds the ablation: the fine decoder alone, trained with plain cross-entropy +
Dice on hard fine labels; its coarse output is the fine softmax summed per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class WarpSegConfig:
    """Constructor config, stored in the checkpoint."""

    size: tuple[int, int, int] = (40, 32, 48)  # working grid (D, H, W) = array order (K, J, I)
    # the working grid's box in world mm (R-L, A-P, S-I), centred on the image's centre: the
    # prostate MRI default covers the gland of every phantom with >= 7 mm to spare (1.5 mm voxels)
    fov_mm: tuple[float, float, float] = (72.0, 48.0, 64.0)
    in_channels: int = 1
    channels: tuple[int, ...] = (8, 16, 32, 64)  # encoder widths per level (level l at 1/2**l)
    fine_groups: tuple[int, ...] = (0, 1, 1, 1)  # coarse group of each fine class
    coarse_names: tuple[str, ...] = ("background", "prostate")
    fine_names: tuple[str, ...] = ("background", "peripheral zone", "transition zone", "lesion")
    single_decoder: bool = False  # the ablation: no coarse decoder, no hierarchical loss

    def __post_init__(self) -> None:
        for name in ("size", "fov_mm", "channels", "fine_groups", "coarse_names", "fine_names"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists from a checkpoint
        levels = len(self.channels) - 1
        if any(s % 2 ** levels for s in self.size):
            raise ValueError(f"WarpSegConfig.size {self.size}: every side must be divisible by "
                             f"2**{levels} (one halving per encoder level after the first)")
        if len(self.fine_names) != len(self.fine_groups):
            raise ValueError(f"{len(self.fine_names)} fine names for {len(self.fine_groups)} "
                             "fine_groups entries")
        if sorted(set(self.fine_groups)) != list(range(len(self.coarse_names))):
            raise ValueError(f"fine_groups {self.fine_groups} must use every coarse class "
                             f"0..{len(self.coarse_names) - 1} at least once")

    @property
    def coarse_classes(self) -> int:
        return len(self.coarse_names)

    @property
    def fine_classes(self) -> int:
        return len(self.fine_groups)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Two 3x3x3 convolutions, instance norm and LeakyReLU (the first may stride by 2)."""
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.1, inplace=True))


class Decoder(nn.Module):
    """Up-sample x2 (trilinear), concatenate the encoder skip, one block; then a 1x1x1 head."""

    def __init__(self, enc: tuple[int, ...], widths: tuple[int, ...], classes: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        cin = enc[-1]
        for skip, w in zip(enc[-2::-1], widths, strict=True):
            self.blocks.append(_block(cin + skip, w))
            cin = w
        self.head = nn.Conv3d(cin, classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, features[-2::-1], strict=True):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.head(x)


def group_logits(fine: Tensor, groups: tuple[int, ...]) -> Tensor:
    """Coarse logits from fine ones: per group, log-sum-exp of its members' logits.

    ``softmax(group_logits(z))[:, g] == softmax(z)[:, groups == g].sum(1)`` exactly.

    Args:
        fine: (B, Kf, *spatial) logits; groups: the coarse group of each fine class.
    Returns:
        (B, Kc, *spatial).
    """
    out = []
    for g in range(max(groups) + 1):
        members = [c for c, gc in enumerate(groups) if gc == g]
        out.append(torch.logsumexp(fine[:, members], dim=1) if len(members) > 1
                   else fine[:, members[0]])
    return torch.stack(out, 1)


def group_logsumexp(fine: Tensor, groups: tuple[int, ...]) -> Tensor:
    """:func:`group_logits` in a few whole-tensor operations, for the training loss: the same
    values and gradients (a test checks both), without one indexed copy per group, whose
    backward pass zero-fills the whole fine tensor once per group (for the brain's 117 classes
    in 7 groups, most of a training step). Each group's maximum is the shift (no gradient
    flows through a logsumexp's shift), so nothing under- or overflows.

    Args:
        fine: (B, Kf, *spatial) logits; groups: the coarse group of each fine class.
    Returns:
        (B, Kc, *spatial).
    """
    g = torch.as_tensor(groups, device=fine.device)
    kc = int(g.max()) + 1
    with torch.no_grad():
        index = g.view(1, -1, *[1] * (fine.ndim - 2)).expand_as(fine)
        top = fine.new_full((fine.shape[0], kc, *fine.shape[2:]), float("-inf")).scatter_reduce(
            1, index, fine, "amax")
    shifted = (fine - top.index_select(1, g)).exp()  # every group's maximum gives exp(0) = 1
    member = F.one_hot(g, kc).to(fine.dtype)  # (Kf, Kc)
    return torch.einsum("bk...,kg->bg...", shifted, member).log() + top


def both_heads_coarse(out: dict[str, Tensor], groups: tuple[int, ...]) -> Tensor:
    """Coarse logits from both decoders: the log of the mean of the coarse head's softmax and
    the fine head's softmax summed per group. Both estimate the same coarse posterior (the
    hierarchical loss trains them to agree), so their mean is a two-member ensemble; where
    the coarse head lags (a briefly trained model with many fine classes) the fine head's
    groups carry it. For a single-decoder model the two are the same.

    Args:
        out: the network's ``{"coarse": (B, Kc, ...), "fine": (B, Kf, ...)}`` logits.
        groups: the coarse group of each fine class.
    Returns:
        (B, Kc, ...) logits (log-probabilities).
    """
    coarse = torch.softmax(out["coarse"].float(), 1)
    fine = torch.softmax(group_logits(out["fine"].float(), groups), 1)
    return torch.log((0.5 * (coarse + fine)).clamp_min(1e-12))


class WarpSeg(nn.Module):
    """``forward(image)`` -> ``{"coarse": (B, Kc, D, H, W), "fine": (B, Kf, D, H, W)}`` logits.

    ``image``: (B, 1, D, H, W) at ``config.size``, intensities normalised to about [0, 1].
    """

    def __init__(self, config: WarpSegConfig) -> None:
        super().__init__()
        self.config = config
        ch = tuple(config.channels)
        self.encoder = nn.ModuleList(
            [_block(config.in_channels, ch[0])]
            + [_block(ch[i - 1], ch[i], stride=2) for i in range(1, len(ch))])
        self.fine = Decoder(ch, ch[-2::-1], config.fine_classes)
        self.coarse = (None if config.single_decoder
                       else Decoder(ch, tuple(max(4, c // 2) for c in ch[-2::-1]),
                                    config.coarse_classes))

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        features, x = [], image
        for block in self.encoder:
            x = block(x)
            features.append(x)
        fine = self.fine(features)
        coarse = (group_logits(fine, self.config.fine_groups) if self.coarse is None
                  else self.coarse(features))
        return {"coarse": coarse, "fine": fine}


def soft_dice_loss(probs: Tensor, target: Tensor) -> Tensor:
    """1 - mean soft Dice over the foreground classes, per volume.

    Args:
        probs: (B, K, *spatial) probabilities; target: (B, K, *spatial) in {0, 1}.
    Returns:
        (B,) losses (classes 1..K-1; smoothing 1 voxel, so an absent class predicted absent
        costs nothing).
    """
    dims = tuple(range(2, probs.ndim))
    inter = (probs[:, 1:] * target[:, 1:]).sum(dims)
    total = probs[:, 1:].sum(dims) + target[:, 1:].sum(dims)
    return 1.0 - ((2 * inter + 1.0) / (total + 1.0)).mean(1)


def one_hot_dice_loss(probs: Tensor, labels: Tensor) -> Tensor:
    """:func:`soft_dice_loss` against ``one_hot(labels)`` without building the one-hot target:
    per class, the probabilities at its voxels are gathered and summed (scatter), which for
    the brain's 117 classes is several times cheaper. The same value and gradient.

    Args:
        probs: (B, K, *spatial); labels: (B, *spatial) int64 in [0, K).
    """
    b, k = probs.shape[:2]
    flat_p, flat_l = probs.flatten(2), labels.flatten(1)
    picked = flat_p.gather(1, flat_l[:, None]).squeeze(1)  # p of each voxel's own class
    inter = probs.new_zeros(b, k).scatter_add(1, flat_l, picked)
    count = probs.new_zeros(b, k).scatter_add(1, flat_l, torch.ones_like(picked))
    total = flat_p.sum(2) + count
    return 1.0 - ((2 * inter[:, 1:] + 1.0) / (total[:, 1:] + 1.0)).mean(1)


def one_hot_labels(allowed: Tensor) -> Tensor | None:
    """The labels of label sets that are all one-hot (exactly one class allowed at every voxel:
    exact labels, hard pseudo-labels), else None."""
    return allowed.to(torch.uint8).argmax(1) if bool((allowed.sum(1) == 1).all()) else None


def set_cross_entropy(logits: Tensor, allowed: Tensor) -> Tensor:
    """Cross-entropy against label sets, per volume: mean over voxels of
    ``-log sum_{c allowed} p_c`` (the usual CE where exactly one class is allowed;
    :func:`warpseg_loss` then takes ``F.cross_entropy``, the same value, several times cheaper
    for many classes).

    Args:
        logits: (B, K, *spatial); allowed: (B, K, *spatial) bool, at least one True per voxel.
    Returns:
        (B,).
    """
    masked = logits.masked_fill(~allowed, float("-inf"))
    nll = torch.logsumexp(logits, 1) - torch.logsumexp(masked, 1)
    return nll.flatten(1).mean(1)


def warpseg_loss(out: dict[str, Tensor], coarse: Tensor, fine_allowed: Tensor,
                 fine_exact: Tensor, weight: Tensor, config: WarpSegConfig
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss and its parts.

    Args:
        out: the model's output.
        coarse: (B, D, H, W) int64 coarse labels.
        fine_allowed: (B, Kf, D, H, W) bool fine label sets (one-hot where the fine label is
            known; see the module docstring).
        fine_exact: (B,) bool: the fine labels are exact (a labelled atlas), so fine Dice applies.
        weight: (B,) per-volume weights (pseudo-label quality; 1 for true labels).
    Returns:
        (weighted mean loss, {part: weighted mean}).
    """
    kc = config.coarse_classes
    coarse_1h = F.one_hot(coarse, kc).movedim(-1, 1).float()
    fine_p = torch.softmax(out["fine"], 1)
    parts: dict[str, Tensor] = {}
    fine_labels = one_hot_labels(fine_allowed)  # None: some voxel allows several classes
    parts["fine_ce"] = (set_cross_entropy(out["fine"], fine_allowed) if fine_labels is None
                        else F.cross_entropy(out["fine"], fine_labels,
                                             reduction="none").flatten(1).mean(1))
    exact = fine_exact.float() if not config.single_decoder else torch.ones_like(weight)
    parts["fine_dice"] = (soft_dice_loss(fine_p, fine_allowed.float()) if fine_labels is None
                          else one_hot_dice_loss(fine_p, fine_labels)) * exact
    if not config.single_decoder:
        parts["coarse_ce"] = F.cross_entropy(out["coarse"], coarse, reduction="none").flatten(
            1).mean(1)
        parts["coarse_dice"] = soft_dice_loss(torch.softmax(out["coarse"], 1), coarse_1h)
        groups = group_logsumexp(out["fine"], config.fine_groups)
        parts["hier_ce"] = F.cross_entropy(groups, coarse, reduction="none").flatten(1).mean(1)
        parts["hier_dice"] = soft_dice_loss(torch.softmax(groups, 1), coarse_1h)
    norm = weight.sum().clamp_min(1e-6)
    means = {k: (v * weight).sum() / norm for k, v in parts.items()}
    return sum(means.values()), means


def predict_labels(out: dict[str, Tensor], config: WarpSegConfig) -> tuple[Tensor, Tensor]:
    """Coarse and fine label maps from logits, consistent with the hierarchy: the coarse argmax,
    then within each voxel's coarse group the most probable fine class of that group.

    Returns:
        (coarse, fine), each (B, *spatial) int64.
    """
    coarse = channel_argmax(out["coarse"])
    groups = torch.as_tensor(config.fine_groups, device=coarse.device)
    logits = out["fine"].flatten(2)  # (B, Kf, N)
    fine = torch.zeros_like(coarse).flatten(1)
    for g in range(config.coarse_classes):  # per group: the best of its members, at its voxels
        members = torch.nonzero(groups == g).flatten()
        for b in range(coarse.shape[0]):
            where = (coarse[b] == g).flatten()
            if len(members) == 1:
                fine[b, where] = members[0]
            elif where.any():  # (voxels, members) rows: a contiguous argmax, ties to the lower
                fine[b, where] = members[logits[b, members][:, where].t().contiguous().argmax(1)]
    return coarse, fine.view(coarse.shape)


def channel_argmax(logits: Tensor) -> Tensor:
    """``logits.argmax(1)`` (ties to the lower class) by K - 1 elementwise comparisons: torch's
    CPU argmax over a short channel axis is a strided reduction, 4 s for 4 x 650k voxels here."""
    best = logits[:, 0]
    labels = torch.zeros(best.shape, dtype=torch.int64, device=logits.device)
    for k in range(1, logits.shape[1]):
        labels.masked_fill_(logits[:, k] > best, k)
        best = torch.maximum(best, logits[:, k])
    return labels
