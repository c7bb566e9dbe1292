"""A clinical T2 acquisition of a family-A phantom: thick, possibly oblique slices, and labels
drawn on those slices.

The family-A phantom (:func:`regseg.sim.phantom.make_phantom`) holds its MRI and labels on one
isotropic 0.7 mm grid aligned with the patient axes; :mod:`regseg.sim.randomise` varies the MRI's
contrast, noise and blur (``mri_slice_blur_vox``) but never its sampling. A prostate T2 stack is
typically 0.4-0.9 mm in plane with 2-4 mm slices, often tilted off axial to follow the gland, and
its delineation is drawn on those slices, so the labels carry the slices' partial volume. This
module resamples a phantom's MRI and labels onto such a stack, for domain randomisation:
:func:`draw_stack` draws one (or none), :func:`acquire_stack` makes the phantom's MRI side.

Each stack voxel averages ``sub`` samples (trilinear in the phantom grid) spread over its slice
thickness along the slice normal: the MRI intensity is that mean, a label is the one covering at
least half of the voxel (gland: gland or lesion; lesion: lesion). The stack covers the phantom's
field of view; its ``voxel_to_world`` is the oblique, anisotropic grid, world coordinates (mm,
RAS) are unchanged, so planes resliced from it stay comparable with the ultrasound's truth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from regseg.imageio import Volume
from regseg.sim.phantom import Phantom
from regseg.types import LESION, PROSTATE

#: Ranges drawn from (uniform): the chance of a stack, its in-plane pixel and slice thickness
#: (mm), and the tilt of the slice normal away from S-I (degrees).
STACK_RANGES: dict[str, tuple[float, float]] = {
    "stack_fraction": (0.5, 0.5),
    "inplane_mm": (0.4, 0.9),
    "slice_mm": (1.5, 4.0),
    "tilt_deg": (0.0, 25.0),
}


@dataclass(frozen=True)
class MriStack:
    """One MRI acquisition geometry (the stack's axes are the patient's, rotated by the tilt)."""

    inplane_mm: float  # pixel size within a slice
    slice_mm: float  # slice thickness = spacing along the slice normal
    tilt_deg: float  # angle between the slice normal and S-I
    tilt_axis_deg: float  # direction, in the axial plane, of the axis the stack is tilted about


def draw_stack(rng: np.random.Generator) -> MriStack | None:
    """A random stack (see :data:`STACK_RANGES`), or ``None`` (keep the isotropic MRI)."""
    if rng.random() >= STACK_RANGES["stack_fraction"][0]:
        return None
    u = {k: float(rng.uniform(*STACK_RANGES[k])) for k in ("inplane_mm", "slice_mm", "tilt_deg")}
    return MriStack(tilt_axis_deg=float(rng.uniform(0.0, 360.0)), **u)


def stack_rotation(stack: MriStack) -> np.ndarray:
    """(3, 3) rotation whose columns are the stack's axes in world: row, column, slice normal."""
    phi, tilt = np.deg2rad(stack.tilt_axis_deg), np.deg2rad(stack.tilt_deg)
    axis = np.array([np.cos(phi), np.sin(phi), 0.0])
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(tilt) * k + (1.0 - np.cos(tilt)) * (k @ k)  # Rodrigues


def stack_grid(volume: Volume, stack: MriStack) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The stack's ``voxel_to_world`` (4, 4) and shape covering ``volume``'s field of view."""
    rotation = stack_rotation(stack)
    shape_in = np.asarray(volume.data.shape)
    corners = np.array([[i, j, k] for i in (-0.5, shape_in[0] - 0.5)
                        for j in (-0.5, shape_in[1] - 0.5) for k in (-0.5, shape_in[2] - 0.5)])
    world = corners @ volume.voxel_to_world[:3, :3].T + volume.voxel_to_world[:3, 3]
    local = world @ rotation  # coordinates along the stack's axes
    spacing = np.array([stack.inplane_mm, stack.inplane_mm, stack.slice_mm])
    lo, hi = local.min(0), local.max(0)
    shape = tuple(int(n) for n in np.maximum(1, np.ceil((hi - lo) / spacing).astype(int)))
    voxel_to_world = np.eye(4)
    voxel_to_world[:3, :3] = rotation * spacing  # column c = axis c times its spacing
    voxel_to_world[:3, 3] = rotation @ (lo + 0.5 * spacing)  # centre of voxel (0, 0, 0)
    return voxel_to_world, shape


def acquire_stack(phantom: Phantom, stack: MriStack, *, sub: int = 5) -> Phantom:
    """``phantom`` with its MRI and labels resampled onto ``stack`` (tissue unchanged).

    Args:
        phantom: a family-A case (MRI and labels on one grid).
        stack: the acquisition geometry.
        sub: samples per voxel across the slice thickness (partial volume along the normal).
    Returns:
        a :class:`Phantom` whose ``mri`` and ``labels`` are on the stack's grid; the scanner
        must keep rendering (and taking its truth from) the original phantom.
    """
    voxel_to_world, shape = stack_grid(phantom.mri, stack)
    to_phantom = np.linalg.inv(phantom.mri.voxel_to_world) @ voxel_to_world
    ijk = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape),
                               indexing="ij"), 0).reshape(3, -1)
    base = to_phantom[:3, :3] @ ijk + to_phantom[:3, 3:4]
    labels = phantom.labels.data
    fields = {"mri": phantom.mri.data.astype(np.float32),
              "gland": (labels >= PROSTATE).astype(np.float32),
              "lesion": (labels == LESION).astype(np.float32)}
    sums = {name: np.zeros(base.shape[1], np.float64) for name in fields}
    for t in (np.arange(sub) + 0.5) / sub - 0.5:  # offsets in slices, across the thickness
        coords = base + to_phantom[:3, 2:3] * t
        for name, data in fields.items():
            sums[name] += ndimage.map_coordinates(
                data, coords, order=1, mode="nearest" if name == "mri" else "constant", cval=0.0)
    mean = {name: (s / sub).reshape(shape) for name, s in sums.items()}
    stack_labels = np.where(mean["lesion"] >= 0.5, LESION,
                            np.where(mean["gland"] >= 0.5, PROSTATE, 0)).astype(np.uint8)
    return dataclasses.replace(
        phantom, mri=Volume(mean["mri"].astype(np.float32), voxel_to_world),
        labels=Volume(stack_labels, voxel_to_world.copy()))
