"""AlignSegNet: output shapes, identity at initialisation, config validation, and its losses."""

import pytest
import torch

from regseg.errors import InputError
from regseg.models import losses
from regseg.models.alignsegnet import AlignSegNet, AlignSegNetConfig

TINY = AlignSegNetConfig(size=32, enc_channels=8, patch=4, embed_dim=16, depth=1, heads=2,
                         unet_channels=(8, 16), latent_dim=4)


def _inputs(b: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    trus = torch.rand(b, 1, size, size, generator=g)
    mri = torch.rand(b, 1, size, size, generator=g)
    labels = torch.zeros(b, 2, size, size)
    labels[:, 0, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    labels[:, 1, size // 3 : size // 2, size // 3 : size // 2] = 1.0
    return trus, mri, labels


@pytest.mark.parametrize("config", [TINY, AlignSegNetConfig()], ids=["tiny", "default"])
def test_output_shapes(config):
    b, s = 2, config.size
    with torch.no_grad():
        out = AlignSegNet(config).eval()(*_inputs(b, s))
    assert out["theta"].shape == (b, 2, 3)
    assert out["logits"].shape == (b, 3, s, s)
    assert out["warped_mri"].shape == (b, 1, s, s)
    assert out["warped_labels"].shape == (b, 2, s, s)
    assert out["trus_latent"].shape == out["mri_latent"].shape == (b, config.latent_dim)


def test_zero_initialised_head_gives_identity():
    torch.manual_seed(0)
    model = AlignSegNet(TINY).eval()
    trus, mri, labels = _inputs(3, TINY.size)
    with torch.no_grad():
        out = model(trus, mri, labels)
    torch.testing.assert_close(out["theta"], torch.eye(2, 3).expand(3, 2, 3))
    torch.testing.assert_close(out["warped_mri"], mri, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["warped_labels"], labels, atol=1e-5, rtol=0)


def test_gradients_reach_the_affine_head():
    model = AlignSegNet(TINY).train()
    out = model(*_inputs(2, TINY.size))
    target = torch.tensor([[1.0, 0.0, 0.1], [0.0, 1.0, 0.0]]).expand(2, 2, 3)
    losses.transform_loss(out["theta"], target).backward()
    assert model.affine.mlp[-1].weight.grad.abs().sum() > 0


def test_config_rejects_bad_sizes():
    with pytest.raises(InputError, match="size 100 must be even, size/2 divisible by patch 8"):
        AlignSegNetConfig(size=100)
    with pytest.raises(InputError, match="not divisible by heads"):
        AlignSegNetConfig(embed_dim=30, heads=4)


def test_config_accepts_lists_from_checkpoints():
    assert AlignSegNetConfig(unet_channels=[8, 16, 32, 64]).unet_channels == (8, 16, 32, 64)


def test_transform_loss_analytic():
    identity = torch.eye(2, 3)[None]
    shifted = identity.clone()
    shifted[0, 0, 2] = 0.1  # every point moves 0.1 in x
    assert float(losses.transform_loss(identity, identity)) == 0.0
    assert float(losses.transform_loss(shifted, identity)) == pytest.approx(0.01)


def test_registration_and_kl_losses_at_their_optimum():
    _, _, labels = _inputs(2, 16)
    assert float(losses.registration_dice_loss(labels, labels)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.registration_dice_loss(labels, 1.0 - labels)) > 0.9
    latent = torch.log_softmax(torch.randn(2, 5), dim=1)
    assert float(losses.kl_alignment_loss(latent, latent)) == pytest.approx(0.0, abs=1e-7)
    assert float(losses.kl_alignment_loss(latent, latent.flip(1))) > 0.0


def test_segmentation_loss_prefers_the_truth():
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, 4:12, 4:12] = 1
    labels[:, 6:8, 6:8] = 2
    good = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 20.0
    assert float(losses.segmentation_loss(good, labels)) < 0.05
    assert float(losses.segmentation_loss(-good, labels)) > 1.0
