"""Training losses as plain functions: registration Dice, segmentation Dice+CE, KL, transform.

Each takes model outputs and targets as tensors and returns a scalar tensor; none moves data
between devices.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor


def soft_dice_loss(pred: Tensor, truth: Tensor, *, smooth: float = 1e-5) -> Tensor:
    """1 - soft Dice per channel, pooled over the batch, averaged over channels.

    Sums run over batch and space together (MONAI's ``batch=True``): a lesion absent from most
    frames of a batch then neither vanishes from the loss nor turns every empty frame into a
    full penalty.

    Args:
        pred: (B, C, H, W) soft maps in [0, 1].
        truth: (B, C, H, W) binary maps.
    Returns:
        scalar tensor in [0, 1].
    """
    dims = (0, 2, 3)
    inter = (pred * truth).sum(dims)
    denom = pred.sum(dims) + truth.sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def registration_dice_loss(warped_labels: Tensor, truth_maps: Tensor,
                           *, weights: tuple[float, float] = (1.0, 0.5)) -> Tensor:
    """Label-driven registration loss: 1 - Dice of warped MRI label maps vs the frame's truth.

    Args:
        warped_labels: (B, 2, H, W) MRI label maps through the predicted affine (bilinear, soft),
            channel 0 prostate incl. lesion, 1 lesion.
        truth_maps: (B, 2, H, W) the same maps from the frame's true labels
            (``regseg.planes.labels_onehot``).
        weights: per-channel weights (prostate, lesion); the lesion weighs less by our choice
            because a rigid-ish gland already places it and its Dice is noisy on small areas.
    Returns:
        scalar tensor.

    References:
        Hu et al., "Weakly-supervised convolutional neural networks for multimodal image
        registration", Medical Image Analysis 2018 (label-driven registration); Sang et al.,
        AlignSegNet, MedIA 2025 (registration judged by prostate Dice).
    """
    total = sum(weights)
    return sum(
        w / total * soft_dice_loss(warped_labels[:, c : c + 1], truth_maps[:, c : c + 1])
        for c, w in enumerate(weights)
    )


@lru_cache(maxsize=8)
def _dice_ce(lesion_weight: float) -> DiceCELoss:
    # Built once per weight: the class weights go to both the CE and the Dice terms.
    weight = torch.tensor([1.0, 1.0, lesion_weight])
    return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                      weight=weight)


def segmentation_loss(logits: Tensor, labels: Tensor, *, lesion_weight: float = 3.0) -> Tensor:
    """Soft Dice (foreground classes, batch-pooled) + cross-entropy, lesion up-weighted.

    Args:
        logits: (B, 3, H, W) class logits (0 background, 1 prostate, 2 lesion).
        labels: (B, H, W) or (B, 1, H, W) integer labels.
        lesion_weight: weight of the lesion class in both terms; lesions are small, and the paper
            up-weights them too (ARCHITECTURES §1.3).
    Returns:
        scalar tensor.

    References:
        MONAI ``DiceCELoss``; Sang et al., AlignSegNet, MedIA 2025.
    """
    if labels.ndim == 3:
        labels = labels[:, None]
    loss_fn = _dice_ce(float(lesion_weight))
    if loss_fn.cross_entropy.weight.device != logits.device:
        loss_fn.to(logits.device)  # the cached module follows the data's device once
    return loss_fn(logits, labels.long())


def kl_alignment_loss(trus_latent: Tensor, mri_latent: Tensor) -> Tensor:
    """Symmetric KL between the TRUS and aligned-MRI feature latents (AlignSegNet step ⑩).

    Args:
        trus_latent, mri_latent: (B, K) log-probabilities.
    Returns:
        scalar tensor, ``(KL(p_u || p_m) + KL(p_m || p_u)) / 2`` averaged over the batch.
        Symmetric by our choice: neither modality is the reference, so neither encoder alone is
        pulled towards the other.

    References:
        Sang et al., AlignSegNet, MedIA 2025 (Figure 2, "KL loss"; the exact form is unpublished).
    """
    forward = F.kl_div(mri_latent, trus_latent, log_target=True, reduction="batchmean")
    backward = F.kl_div(trus_latent, mri_latent, log_target=True, reduction="batchmean")
    return 0.5 * (forward + backward)


def transform_loss(theta: Tensor, true_theta: Tensor, points: Tensor | None = None) -> Tensor:
    """Mean squared distance between points mapped by the predicted and by the true affine.

    Our addition to the AlignSegNet recipe: the simulated scanner knows the true in-plane
    correction, so the registration can be supervised directly. Comparing mapped points rather
    than matrix entries weighs rotation and translation in the same units (normalised image
    coordinates, 2 = one field of view), and keeps a gradient where the label Dice is flat
    (no gland overlap at all).

    Args:
        theta: (B, 2, 3) predicted normalised affine.
        true_theta: (B, 2, 3) true normalised affine (``regseg.metrics.true_theta``).
        points: (N, 2) normalised (x, y) sample points; default a 5 x 5 grid over [-0.8, 0.8]^2.
    Returns:
        scalar tensor, squared normalised units.
    """
    if points is None:
        axis = torch.linspace(-0.8, 0.8, 5, device=theta.device, dtype=theta.dtype)
        points = torch.cartesian_prod(axis, axis)
    homogeneous = torch.cat([points, torch.ones_like(points[:, :1])], dim=1)  # (N, 3)
    diff = (theta - true_theta) @ homogeneous.T  # (B, 2, N)
    return diff.square().sum(dim=1).mean()
