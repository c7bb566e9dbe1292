"""Instance optimisation (issue 18 item 3): steps on the pair itself lower its dissimilarity."""

import numpy as np
import pytest
import torch

from regseg import spatial
from regseg.engines.refine import refine_velocity
from regseg.models.integrate import scaling_and_squaring
from regseg.models.reg_losses import gradient_loss, mind_loss


def _blob(shape, centre, radius):
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
    return torch.sigmoid(radius - r2.sqrt())[None, None]


@pytest.mark.parametrize(("fast", "sample_coarse", "fraction"),
                         [(True, False, 1.0), (True, True, 1.0), (False, False, 1.0),
                          (True, False, 0.125)],
                         ids=["fast", "fast-sampled", "full", "random-eighth"])
def test_refinement_moves_the_moving_image_onto_the_fixed(fast, sample_coarse, fraction):
    torch.manual_seed(0)
    shape = (18, 18, 18)
    fixed = _blob(shape, (9, 9, 9), 5.0)
    moving = _blob(shape, (9, 11, 9), 5.0)  # 2 voxels off along the second axis
    zero = torch.zeros(1, 3, *shape)
    before = float(mind_loss(fixed, moving))
    v = refine_velocity(fixed, moving, zero, steps=30, lr=0.1, smooth=0.1, fast=fast,
                         sample_coarse=sample_coarse, sample_fraction=fraction)
    ddf = scaling_and_squaring(v, 7)
    after = float(mind_loss(fixed, spatial.warp(moving, ddf)))
    assert after < 0.7 * before
    # The moved blob's centre of mass comes back toward the fixed one (2 voxels off before).
    def centre(img):
        w = img[0, 0]
        return float((w * torch.arange(w.shape[1])[None, :, None]).sum() / w.sum())

    moved = spatial.warp(moving, ddf)
    assert abs(centre(moved) - centre(fixed)) < 0.5 * abs(centre(moving) - centre(fixed))
    assert not v.requires_grad


def test_zero_steps_returns_the_network_field_unchanged():
    v = torch.randn(1, 3, 8, 8, 8)
    out = refine_velocity(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8), v, steps=0)
    assert torch.equal(out, v)


def test_refinement_works_on_inference_tensors():
    """The network's outputs are made under torch.inference_mode(); refinement must still run."""
    with torch.inference_mode():
        v = torch.zeros(1, 3, 8, 8, 8)
        f, m = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)
    for fast in (True, False):
        out = refine_velocity(f, m, v, steps=2, fast=fast)
        assert out.shape == v.shape and np.isfinite(out.numpy()).all()


def test_fast_mode_keeps_the_network_fields_fine_detail():
    """The coarse correction starts at zero: on a pair that is already aligned (moving ==
    fixed, so MIND has no gradient to follow but the diffusion term's), the returned velocity
    keeps the network's voxel-scale detail instead of the coarse grid's blurred copy."""
    torch.manual_seed(1)
    image = torch.rand(1, 1, 12, 14, 10)
    v = 0.3 * torch.randn(1, 3, 12, 14, 10)
    out = refine_velocity(image, image, v, steps=1, lr=1e-4, smooth=0.0, fast=True)
    assert out.shape == v.shape
    # one tiny step: the result is the network's field, voxel detail included
    assert float((out - v).abs().max()) < 1e-2



def test_descriptors_from_finer_images_land_on_the_working_grid():
    """MIND of the finer images, resampled onto the velocity's grid: on the same grid it is MIND
    itself; from a grid 2x finer per axis it has the working grid's shape and differs from MIND
    of the area-averaged copy (which blurs the edges it should see); past DESCRIPTOR_MAX_RATIO
    the images are area-averaged first, with the same output shape."""
    import torch.nn.functional as F

    from regseg.engines.refine import DESCRIPTOR_MAX_RATIO, descriptors_from
    from regseg.models.reg_losses import mind_descriptor

    torch.manual_seed(2)
    f, m = torch.rand(1, 1, 8, 10, 6), torch.rand(1, 1, 8, 10, 6)
    t, d = descriptors_from(f, m, (8, 10, 6))
    assert torch.allclose(t, mind_descriptor(f)) and torch.allclose(d, mind_descriptor(m))
    fine_f, fine_m = torch.rand(1, 1, 16, 20, 12), torch.rand(1, 1, 16, 20, 12)
    t, d = descriptors_from(fine_f, fine_m, (8, 10, 6))
    assert t.shape == d.shape == (1, 6, 8, 10, 6)
    blurred = mind_descriptor(F.interpolate(fine_f, size=(8, 10, 6), mode="area"))
    assert float((t - blurred).abs().mean()) > 0.01
    big = torch.rand(1, 1, 24, 30, 18)  # 27x the voxels of (8, 10, 6) > 16
    assert 27 > DESCRIPTOR_MAX_RATIO
    t, d = descriptors_from(big, big, (8, 10, 6))
    assert t.shape == (1, 6, 8, 10, 6) and torch.equal(t, d)


def test_refinement_with_given_descriptors_uses_them():
    """With ``descriptors`` the images are not read: a pair of identical images but descriptors
    of a shifted blob still moves the field."""
    shape = (18, 18, 18)
    fixed = _blob(shape, (9, 9, 9), 5.0)
    moving = _blob(shape, (9, 11, 9), 5.0)
    from regseg.models.reg_losses import mind_descriptor

    desc = (mind_descriptor(fixed), mind_descriptor(moving))
    zero = torch.zeros(1, 3, *shape)
    same = torch.rand(1, 1, *shape)
    v = refine_velocity(same, same, zero, steps=10, lr=0.1, smooth=0.1, descriptors=desc)
    assert float(v.abs().max()) > 0.05
    v0 = refine_velocity(same, same, zero, steps=10, lr=0.1, smooth=0.1)
    assert float(v0.abs().max()) < float(v.abs().max())


def test_sampled_steps_see_the_field_the_fast_steps_see():
    """At every working-grid voxel, the field a sampled step interpolates from the correction
    grid (plus the network's detail) is the field a fast step builds with resize_ddf: the two
    modes optimise the same objective, one on a subset of its terms."""
    import math

    import torch.nn.functional as F

    from regseg.engines.refine import _coarse
    from regseg.models.integrate import resize_ddf

    torch.manual_seed(3)
    size = (10, 12, 8)
    coarse = _coarse(size)
    v = torch.randn(1, 3, *coarse)
    dense = resize_ddf(v, size)  # what the fast step uses
    scale = torch.tensor([c / n for c, n in zip(coarse, size, strict=True)]).reshape(1, 3, 1, 1, 1)
    points = spatial.identity_grid(size).flatten(1)
    k = math.prod(size)
    extent = torch.tensor(size, dtype=torch.float32).reshape(3, 1)
    grid = ((2.0 * points + 1.0) / extent - 1.0).flip(0).T.reshape(1, k, 1, 1, 3)
    sampled = F.grid_sample(v / scale, grid, mode="bilinear", padding_mode="border",
                            align_corners=False).reshape(1, 3, *size)
    assert torch.allclose(sampled, dense, atol=1e-5)


def test_sampled_steps_are_reproducible_and_differ_from_fast():
    """The random points are seeded: the same input gives the same field; and they are a
    subset, so the result differs from the fast steps' (it is not the same code path)."""
    shape = (18, 18, 18)
    fixed = _blob(shape, (9, 9, 9), 5.0)
    moving = _blob(shape, (9, 11, 9), 5.0)
    zero = torch.zeros(1, 3, *shape)
    a = refine_velocity(fixed, moving, zero, steps=5, lr=0.1, smooth=0.1, sample_fraction=0.125)
    b = refine_velocity(fixed, moving, zero, steps=5, lr=0.1, smooth=0.1, sample_fraction=0.125)
    fast = refine_velocity(fixed, moving, zero, steps=5, lr=0.1, smooth=0.1)
    assert torch.equal(a, b)
    assert float((a - fast).abs().max()) > 1e-4


@pytest.mark.parametrize("fraction", [1.0, 0.125], ids=["fast", "sampled"])
def test_fewer_squarings_in_the_loop_still_register_and_stay_close(fraction):
    """loop_int_steps: the loop integrates with fewer squarings; the default is the model's."""
    torch.manual_seed(0)
    shape = (18, 18, 18)
    fixed = _blob(shape, (9, 9, 9), 5.0)
    moving = _blob(shape, (9, 11, 9), 5.0)
    base = torch.randn(1, 3, *shape) * 0.3
    kwargs = dict(steps=20, lr=0.1, smooth=0.1, sample_fraction=fraction)
    exact = refine_velocity(fixed, moving, base, **kwargs)
    assert torch.equal(refine_velocity(fixed, moving, base, loop_int_steps=7, **kwargs), exact)
    five = refine_velocity(fixed, moving, base, loop_int_steps=5, **kwargs)
    one = refine_velocity(fixed, moving, base, loop_int_steps=1, **kwargs)
    assert not torch.equal(five, exact)  # the loop did integrate differently
    gap = float((five - exact).abs().max())
    assert gap < float((one - exact).abs().max())
    assert gap < 0.1 * float((exact - base).abs().max())
    before = float(mind_loss(fixed, spatial.warp(moving, scaling_and_squaring(base, 7))))
    after = float(mind_loss(fixed, spatial.warp(moving, scaling_and_squaring(five, 7))))
    assert after < before


def test_the_engine_refuses_no_squarings_in_the_loop():
    from regseg.engines.registration import RegistrationEngine

    with pytest.raises(ValueError, match="refine_int_steps 0"):
        RegistrationEngine("plcreg3d", refine_int_steps=0, affine_iterations=0)


@pytest.mark.parametrize("fraction", [1.0, 0.125], ids=["fast", "sampled"])
def test_the_regulariser_on_the_correction_grid_registers_and_smooths(fraction):
    """coarse_regulariser: the penalty on the correction grid still registers the pair, and a
    stronger penalty still gives a smoother correction, as on the working grid."""
    torch.manual_seed(0)
    shape = (18, 18, 18)
    fixed = _blob(shape, (9, 9, 9), 5.0)
    moving = _blob(shape, (9, 11, 9), 5.0)
    zero = torch.zeros(1, 3, *shape)
    kwargs = dict(steps=30, lr=0.1, sample_fraction=fraction, coarse_regulariser=True)
    v = refine_velocity(fixed, moving, zero, smooth=0.1, **kwargs)
    working = refine_velocity(fixed, moving, zero, smooth=0.1, steps=30, lr=0.1,
                              sample_fraction=fraction)
    assert not torch.equal(v, working)
    before = float(mind_loss(fixed, moving))
    after = float(mind_loss(fixed, spatial.warp(moving, scaling_and_squaring(v, 7))))
    assert after < 0.7 * before
    stiff = refine_velocity(fixed, moving, zero, smooth=100.0, **kwargs)
    rough = float(gradient_loss(v)) / float(v.square().mean())
    assert float(gradient_loss(stiff)) / float(stiff.square().mean()) < rough


def test_the_engine_refuses_an_unknown_regulariser_grid():
    from regseg.engines.registration import RegistrationEngine

    with pytest.raises(ValueError, match="refine_regulariser 'fine'"):
        RegistrationEngine("plcreg3d", refine_regulariser="fine", affine_iterations=0)


@pytest.mark.parametrize("fraction", [1.0, 0.125])
def test_the_networks_own_displacement_is_used_as_given(fraction):
    """base_ddf: the network's field already integrated (the engine has it) gives the same steps
    as integrating it again; a different one is really used."""
    torch.manual_seed(0)
    shape = (18, 18, 18)
    fixed = _blob(shape, (9, 9, 9), 5.0)
    moving = _blob(shape, (9, 11, 9), 5.0)
    base = torch.randn(1, 3, *shape) * 0.3
    kwargs = dict(steps=5, lr=0.1, smooth=0.1, sample_fraction=fraction, loop_int_steps=5)
    want = refine_velocity(fixed, moving, base, **kwargs)
    given = refine_velocity(fixed, moving, base, base_ddf=scaling_and_squaring(base, 7), **kwargs)
    assert torch.equal(given, want)
    other = refine_velocity(fixed, moving, base, base_ddf=torch.zeros(1, 3, *shape), **kwargs)
    assert not torch.equal(other, want)
