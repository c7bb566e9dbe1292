"""Model inputs for one frame: the TRUS image and the MRI resliced at its plane, model-sized.

The live pipeline and training both build their inputs here, so a model never sees at run time
anything prepared differently from what it was trained on.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg import spatial
from regseg.types import LESION, PROSTATE


def model_to_frame(frame_hw: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(4, 4) map from model-grid pixels (u, v, 0) to frame pixels (i, j, 0).

    Both grids span the same field of view; pixel centres follow align_corners=False, so a
    normalised affine means the same on either grid.
    """
    sy, sx = frame_hw[0] / size[0], frame_hw[1] / size[1]
    m = np.eye(4)
    m[0, 0], m[0, 3] = sx, 0.5 * sx - 0.5
    m[1, 1], m[1, 3] = sy, 0.5 * sy - 0.5
    return m


def model_grid_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) = ``size`` nearest samples of a frame label map (H, W) at the model grid's pixel
    centres (:func:`model_to_frame`: both grids span the frame, pixel-centred)."""
    return cv2.resize(np.ascontiguousarray(labels, np.uint8), size[::-1],
                      interpolation=cv2.INTER_NEAREST_EXACT)


def trus_input(pixels: Tensor, size: tuple[int, int]) -> Tensor:
    """B-mode frame(s) to model input: float in [0, 1], area-resampled to ``size``.

    Args:
        pixels: (H, W) or (B, H, W) uint8.
    Returns:
        (B, 1, h, w) float32.
    """
    x = pixels.reshape(-1, 1, *pixels.shape[-2:]).float() * (1.0 / 255.0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="area")
    return x


def labels_onehot(labels: Tensor) -> Tensor:
    """(B, 1, H, W) integer labels to (B, 2, H, W) float: ch 0 prostate (incl. lesion), 1 lesion.

    Prostate includes the lesion because a lesion lies inside the gland: the registration aligns
    the whole gland.
    """
    lab = labels.long()
    return torch.cat([(lab == PROSTATE) | (lab == LESION), lab == LESION], dim=1).float()


def mri_inputs(
    mri: Tensor,
    labels: Tensor,
    world_to_voxel: np.ndarray,
    image_to_mri: np.ndarray,
    frame_hw: tuple[int, int],
    size: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """MRI and its labels resliced at the frame's plane, on the model grid.

    Args:
        mri: (1, 1, D, H, W) float volume, intensities already normalised to [0, 1].
        labels: (1, 1, D, H, W) uint8 label volume on the same grid.
        world_to_voxel: (4, 4) MRI world mm -> voxel index.
        image_to_mri: (4, 4) frame pixel (i, j, 0) -> MRI world mm (the tracked plane).
        frame_hw: the frame's (H, W).
        size: the model's (h, w).
    Returns:
        mri plane (1, 1, h, w) float and label planes (1, 2, h, w) float (:func:`labels_onehot`),
        the labels sampled nearest then one-hot, so they stay exact.
    """
    plane = image_to_mri @ model_to_frame(frame_hw, size)
    mri_plane = spatial.reslice(mri, world_to_voxel, plane, size)
    lab_plane = spatial.reslice(labels, world_to_voxel, plane, size, mode="nearest")
    return mri_plane, labels_onehot(lab_plane)


def volume_tensor(data: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """A nibabel-ordered array ``data[i, j, k]`` as a (1, 1, D=K, H=J, W=I) tensor for reslice."""
    return torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0)))[None, None].to(device)
