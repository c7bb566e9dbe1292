"""The patient's MRI and labels, loaded once, normalised, and held on the device for every frame."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from regseg import spatial
from regseg.errors import InputError
from regseg.imageio import Volume, check_same_grid, load_labels, load_mri, normalise_intensity
from regseg.planes import volume_tensor
from regseg.types import LESION, PROSTATE


@dataclass(frozen=True)
class MriContext:
    """MRI (intensities in [0, 1]) and labels as (1, 1, D, H, W) device tensors, and geometry."""

    mri: torch.Tensor
    labels: torch.Tensor
    voxel_to_world: np.ndarray
    world_to_voxel: np.ndarray
    shape_ijk: tuple[int, int, int]
    source: str

    @property
    def centre_mm(self) -> np.ndarray:
        """World position of the volume centre."""
        centre = (np.asarray(self.shape_ijk, dtype=np.float64) - 1.0) / 2.0
        return spatial.apply(self.voxel_to_world, centre[None])[0]

    def prostate_centre_mm(self) -> np.ndarray:
        """World position of the prostate label's centroid (the volume centre if there is none)."""
        lab = self.labels[0, 0].cpu().numpy()  # (K, J, I)
        kji = np.argwhere((lab == PROSTATE) | (lab == LESION))
        if len(kji) == 0:
            return self.centre_mm
        return spatial.apply(self.voxel_to_world, kji.mean(axis=0)[::-1][None])[0]


def build_context(mri: Volume, labels: Volume, device: torch.device | str = "cpu") -> MriContext:
    """Normalise and upload an MRI and its labels (checked to share a grid)."""
    check_same_grid(mri, labels)
    if not np.any(labels.data == PROSTATE) and not np.any(labels.data == LESION):
        raise InputError(f"{labels.path or 'labels'}: no prostate (1) or lesion (2) voxels; the "
                         "label volume must outline the gland to register against.")
    return MriContext(
        mri=volume_tensor(normalise_intensity(mri.data), device),
        labels=volume_tensor(labels.data.astype(np.uint8), device),
        voxel_to_world=mri.voxel_to_world,
        world_to_voxel=spatial.invert(mri.voxel_to_world),
        shape_ijk=tuple(int(s) for s in mri.data.shape),
        source=mri.path or "in-memory",
    )


def load_context(mri_path: str | Path, labels_path: str | Path,
                 device: torch.device | str = "cpu") -> MriContext:
    """Load, validate, normalise and upload a case: the MRI and its prostate/lesion labels."""
    mri = load_mri(mri_path)
    return build_context(mri, load_labels(labels_path, like=mri), device)
