"""Thick, oblique MRI stacks for domain randomisation (regseg.sim.mri_stack): the geometry, the
partial-volume labels, and the trainer's --mri-stacks wiring."""


import numpy as np
import pytest

from regseg.errors import InputError
from regseg.imageio import Volume
from regseg.sim.mri_stack import (
    STACK_RANGES,
    MriStack,
    acquire_stack,
    draw_stack,
    stack_grid,
    stack_rotation,
)
from regseg.sim.phantom import Phantom
from regseg.types import LESION, PROSTATE


def _sphere_phantom(spacing: float = 1.0, n: int = 60) -> Phantom:
    """A 30 mm gland sphere with a 12 mm lesion sphere inside, centred on world (0, 0, 0)."""
    v2w = np.diag([spacing] * 3 + [1.0])
    v2w[:3, 3] = -0.5 * (n - 1) * spacing
    axis = (np.arange(n) - 0.5 * (n - 1)) * spacing
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    lesion = np.sqrt((x - 6) ** 2 + y**2 + z**2) < 6.0
    labels = np.where(lesion, LESION, np.where(r < 15.0, PROSTATE, 0)).astype(np.uint8)
    mri = np.where(r < 15.0, 600.0, 200.0).astype(np.float32) + 100.0 * lesion
    return Phantom(mri=Volume(mri, v2w), labels=Volume(labels, v2w.copy()),
                   tissue=Volume(labels.copy(), v2w.copy()), seed=0)


def _label_at(volume: Volume, world: np.ndarray) -> np.ndarray:
    ijk = (world - volume.voxel_to_world[:3, 3]) @ np.linalg.inv(volume.voxel_to_world[:3, :3]).T
    idx = np.clip(np.round(ijk).astype(int), 0, np.asarray(volume.data.shape) - 1)
    return volume.data[idx[:, 0], idx[:, 1], idx[:, 2]]


def test_draws_are_seeded_within_range_and_about_half_are_stacks():
    draws = [draw_stack(np.random.default_rng(s)) for s in range(400)]
    assert draws[:20] == [draw_stack(np.random.default_rng(s)) for s in range(20)]
    stacks = [d for d in draws if d is not None]
    assert 0.4 < len(stacks) / len(draws) < 0.6
    for d in stacks:
        for key in ("inplane_mm", "slice_mm", "tilt_deg"):
            lo, hi = STACK_RANGES[key]
            assert lo <= getattr(d, key) <= hi


def test_stack_grid_is_tilted_anisotropic_and_covers_the_field_of_view():
    phantom = _sphere_phantom()
    stack = MriStack(inplane_mm=0.5, slice_mm=3.0, tilt_deg=20.0, tilt_axis_deg=30.0)
    rotation = stack_rotation(stack)
    assert np.allclose(rotation.T @ rotation, np.eye(3)) and np.isclose(np.linalg.det(rotation), 1)
    assert np.isclose(np.degrees(np.arccos(rotation[2, 2])), 20.0)  # normal 20 deg off S-I
    v2w, shape = stack_grid(phantom.mri, stack)
    assert np.allclose(np.linalg.norm(v2w[:3, :3], axis=0), [0.5, 0.5, 3.0])
    corners = np.array([[a, b, c] for a in (-29.5, 29.5) for b in (-29.5, 29.5)
                        for c in (-29.5, 29.5)])
    ijk = (corners - v2w[:3, 3]) @ np.linalg.inv(v2w[:3, :3]).T
    assert (ijk >= -0.5 - 1e-6).all() and (ijk <= np.asarray(shape) - 0.5 + 1e-6).all()


def test_stack_keeps_world_positions_and_gland_volume_with_partial_volume_labels():
    phantom = _sphere_phantom()
    stack = MriStack(inplane_mm=0.6, slice_mm=3.5, tilt_deg=15.0, tilt_axis_deg=100.0)
    out = acquire_stack(phantom, stack)
    assert out.tissue is phantom.tissue  # the scanner's side is untouched
    assert np.allclose(out.mri.spacing_mm, [0.6, 0.6, 3.5])
    voxel_mm3 = 0.6 * 0.6 * 3.5
    gland = (out.labels.data >= PROSTATE).sum() * voxel_mm3
    assert gland == pytest.approx(4 / 3 * np.pi * 15.0**3, rel=0.05)
    lesion = (out.labels.data == LESION).sum() * voxel_mm3
    assert lesion == pytest.approx(4 / 3 * np.pi * 6.0**3, rel=0.15)
    rng = np.random.default_rng(0)
    inside = rng.normal(size=(200, 3))
    inside = inside / np.linalg.norm(inside, axis=1, keepdims=True) * rng.uniform(0, 11, (200, 1))
    inside = inside[np.linalg.norm(inside - [6, 0, 0], axis=1) > 8.0]  # clear of the lesion
    assert (_label_at(out.labels, inside) == PROSTATE).all()
    assert (_label_at(out.labels, np.array([[6.0, 0.0, 0.0]])) == LESION).all()
    outside = inside / np.linalg.norm(inside, axis=1, keepdims=True) * 20.0
    assert (_label_at(out.labels, outside) == 0).all()
    # The MRI is the slice average: between the gland (600) and outside (200) at the border,
    # the same levels well inside and outside.
    assert np.allclose(_label_at(out.mri, inside[:5]), 600.0, atol=1.0)
    assert np.allclose(_label_at(out.mri, outside[:5]), 200.0, atol=1.0)
    values = out.mri.data[(out.mri.data > 210) & (out.mri.data < 590)]
    assert values.size > 0  # partial volume at the border


def test_trainer_needs_randomise_for_mri_stacks(tmp_path):
    from regseg.train.alignsegnet import train_alignsegnet

    with pytest.raises(InputError, match="--mri-stacks"):
        train_alignsegnet(tmp_path, mri_stacks=True, randomise=False, cache_dir=None,
                          progress=False)
    assert not any(tmp_path.iterdir())  # nothing written
