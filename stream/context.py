"""The patient's MRI and labels, loaded once, normalised, and held on the device for every frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
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
    """MRI (intensities in [0, 1]) and labels as (1, 1, D, H, W) device tensors, and geometry.

    ``labels_float`` is the label volume as float32 (same values), made once here: grid_sample
    takes only floating-point input, and converting the ~2 M-voxel volume on every frame cost
    about 2 ms per reslice on the CPU (twice per frame).
    """

    mri: torch.Tensor
    labels: torch.Tensor
    voxel_to_world: np.ndarray
    world_to_voxel: np.ndarray
    shape_ijk: tuple[int, int, int]
    source: str
    labels_float: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.labels_float is None:
            object.__setattr__(self, "labels_float", self.labels.float())

    @property
    def world_to_normalised(self) -> np.ndarray:
        """(4, 4) world mm -> grid_sample coordinates of the volume (align_corners=False)."""
        return spatial.index_to_normalised(self.shape_ijk) @ self.world_to_voxel

    @property
    def centre_mm(self) -> np.ndarray:
        """World position of the volume centre."""
        centre = (np.asarray(self.shape_ijk, dtype=np.float64) - 1.0) / 2.0
        return spatial.apply(self.voxel_to_world, centre[None])[0]

    def prostate_centre_mm(self) -> np.ndarray:
        """World position of the prostate label's centroid (the volume centre if there is none)."""
        return self._prostate_centre_mm

    @cached_property
    def _prostate_centre_mm(self) -> np.ndarray:
        # Computed once: untracked frames ask for it every frame, and it scans the whole volume.
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


def untracked_plane(context: MriContext, frame_hw: tuple[int, int],
                    spacing_mm: tuple[float, float]) -> np.ndarray:
    """Plane used when a frame has no pose: transverse through the prostate centroid.

    Columns run along +x (R), rows along +y (A: away from a transrectal probe), the frame centre on
    the centroid of the MRI prostate label. Registration then only refines in-plane.
    """
    plane = np.eye(4)
    plane[0, 0], plane[1, 1] = spacing_mm[1], spacing_mm[0]
    centre_px = np.array([(frame_hw[1] - 1) / 2.0, (frame_hw[0] - 1) / 2.0, 0.0])
    plane[:3, 3] = context.prostate_centre_mm() - plane[:3, :3] @ centre_px
    return plane
