"""SimNet: shapes, zero-initialised heads, the training target, registry + engine round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regseg.engines.label_fusion import LabelFusionEngine
from regseg.models.checkpoint import save_checkpoint
from regseg.models.registry import default_weights_path, load_model
from regseg.models.simnet import SimNet, SimNetConfig
from regseg.train.simnet import _shift, agreement, loss_of

SMALL = SimNetConfig(channels=(4, 8, 16), size=(16, 16, 16))


def test_forward_shapes_and_identity_start():
    model = SimNet(SMALL).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    out = model(x, x, x)
    assert out["weight"].shape == (2, 1, 16, 16, 16)
    torch.testing.assert_close(out["weight"], torch.full_like(out["weight"], 0.5))  # zero heads
    with pytest.raises(ValueError, match="divisible by 4"):
        SimNetConfig(channels=(4, 8, 16), size=(18, 16, 16))
    with pytest.raises(ValueError, match="double"):
        SimNetConfig(channels=(4, 8, 8))


def test_agreement_target_is_the_local_label_match():
    truth = torch.zeros(1, 9, 9, 9, dtype=torch.long)
    truth[:, 2:7, 2:7, 2:7] = 1
    assert torch.equal(agreement(truth, truth), torch.ones(1, 1, 9, 9, 9))
    shifted = torch.roll(truth, 1, dims=1)
    s = agreement(shifted, truth)
    assert s[0, 0, 0, 0, 0] == 1.0 and s[0, 0, 4, 4, 4] == 1.0  # far away; deep inside both
    assert s[0, 0, 2, 4, 4] < 1.0 and s.min() >= 0.0


def test_shift_moves_content_without_wrapping():
    x = torch.zeros(1, 6, 6, 6)
    x[0, 0] = 1.0
    assert torch.equal(_shift(x, [2, 0, 0])[0, 2], torch.ones(6, 6))
    assert torch.equal(_shift(x, [-2, 0, 0])[0, 5], torch.zeros(6, 6))


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = SimNet(SMALL)
    x = torch.randn(2, 3, 16, 16, 16)
    truth = (torch.rand(2, 16, 16, 16) > 0.5).long()
    labels = truth.clone()  # every atlas label right: s* = 1, the logits must rise
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = loss_of(model(x[:, :1], x[:, 1:2], x[:, 2:3])["logit"], labels, truth)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_checkpoint_round_trip_through_the_engine(tmp_path):
    model = SimNet(SMALL)
    for head in model.heads:  # a non-trivial map: trust follows the atlas image's intensity
        torch.nn.init.normal_(head.weight, std=0.1)
    path = save_checkpoint(tmp_path / "s.pt", "simnet", model, SMALL)
    rng = np.random.default_rng(0)
    shape = (20, 18, 16)
    labels = (rng.random((3, *shape)) > 0.5).astype(np.int64)
    onehot = np.eye(3, dtype=np.float32)[labels].transpose(0, 4, 1, 2, 3)
    engine = LabelFusionEngine("simnet", simnet_weights=path)
    out = engine(rng.random(shape, dtype=np.float32), rng.random((3, *shape), dtype=np.float32),
                 onehot)
    assert out.labels.shape == shape and out.probabilities.shape == (3, *shape)
    np.testing.assert_allclose(out.atlas_weights.sum(), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.probabilities.sum(0), 1.0, atol=1e-5)
def test_shipped_weights_load():
    path = default_weights_path("simnet")
    assert path.is_file() and path.stat().st_size < 2.5e6
    model = load_model("simnet")
    assert isinstance(model, SimNet)
