"""The 2-D PLCReg data builder at a working grid other than AlignSegNet's."""

import torch

from regseg.train.plcreg_live import live_frames


def test_live_frames_on_a_grid_other_than_the_affine_models():
    # AlignSegNet registers at its own 128 grid; the deformable set is built at 32 x 32
    data = live_frames([1000], 2, seed=0, size=(32, 32), keep_residual=True, progress=False)
    assert len(data) == 2
    assert data.fixed.shape == (2, 1, 32, 32) and data.moving.shape == (2, 3, 32, 32)
    assert data.target_ddf.shape == (2, 2, 32, 32) and data.residual_mm.shape == (2, 3, 32, 32)
    assert data.fan_mask.shape == (32, 32) and data.fan_mask.any()
    assert torch.isfinite(data.target_ddf.float()).all()
    # the moving label maps and the truth overlap: both show the gland of the same frame
    moving_gland = data.moving[:, 1] > 0.5
    truth_gland = data.label_maps[:, 0] > 0
    assert (moving_gland & truth_gland).sum() > 0.5 * truth_gland.sum()


def test_randomised_refined_frames_carry_one_sector_per_frame():
    """Randomised scanners differ per phantom, so each frame keeps its own sector mask; the
    affine stage refines as the live chain (2 calls); two sets concatenate for training."""
    from regseg.train.plcreg_randomised import concat

    plain = live_frames([1000], 2, seed=0, size=(32, 32), keep_residual=True, progress=False)
    rand = live_frames([1000, 1001], 1, seed=0, size=(32, 32), keep_residual=True,
                       progress=False, scanner="randomised", refine=2)
    assert rand.fan_mask.shape == (2, 32, 32)  # two phantoms, two different probes
    assert not torch.equal(rand.fan_mask[0], rand.fan_mask[1])
    both = concat([plain, rand])
    assert len(both) == 4 and both.fan_mask.shape == (4, 32, 32)
    batch = both.batch([0, 3])
    assert batch["fan_mask"].shape == (2, 32, 32)
    assert torch.equal(batch["fan_mask"][1], rand.fan_mask[1])
    assert torch.isfinite(both.target_ddf.float()).all()
