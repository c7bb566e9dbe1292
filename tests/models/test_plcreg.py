"""PLCReg and its PoLaCA/ALS blocks: shapes in 2-D and 3-D, initial identity, config errors."""

from __future__ import annotations

import pytest
import torch

from regseg.errors import InputError
from regseg.models.checkpoint import save_checkpoint
from regseg.models.plcreg import PLCReg, PLCRegConfig
from regseg.models.plcreg_blocks import (
    PolarityCorrelationAttention,
    window_merge,
    window_partition,
)
from regseg.models.registry import load_model

TINY_2D = PLCRegConfig(ndim=2, size=(32, 32), moving_channels=3, fixed_channels=1,
                       channels=(4, 8, 8), shared_encoder=False, heads=2, window=(4, 4))
TINY_3D = PLCRegConfig(ndim=3, size=(16, 16, 16), channels=(4, 8, 8), heads=2,
                       window=(2, 4, 2))


@pytest.mark.parametrize(("spatial", "window"), [((8, 12), (4, 4)), ((4, 6, 8), (2, 3, 4))])
def test_window_partition_round_trip(spatial, window):
    x = torch.randn(2, 5, *spatial)
    tokens = window_partition(x, window)
    n_windows = 2 * torch.tensor([s // w for s, w in zip(spatial, window, strict=True)]).prod()
    assert tokens.shape == (n_windows, torch.tensor(window).prod(), 5)
    assert torch.equal(window_merge(tokens, window, spatial), x)


@pytest.mark.parametrize(("spatial", "window"), [
    ((8, 8), (4, 4)), ((7, 9), (4, 4)),  # 2-D, divisible and padded
    ((4, 6, 4), (2, 3, 2)), ((5, 6, 3), (2, 3, 2)),  # 3-D
])
def test_attention_shapes(spatial, window):
    block = PolarityCorrelationAttention(16, 4, window)
    moving, fixed = torch.randn(2, 16, *spatial), torch.randn(2, 16, *spatial)
    out = block(moving, fixed)
    assert out.shape == moving.shape and torch.isfinite(out).all()


def test_attention_als_starts_at_spec_values_and_learns():
    block = PolarityCorrelationAttention(8, 2, (4, 4))
    assert torch.allclose(block.exponent(), torch.full((2, 4), 8.5))  # 1 + 15 * sigmoid(0)
    assert torch.allclose(torch.nn.functional.softplus(block.temperature),
                          torch.full((8,), 0.6931), atol=1e-4)  # ln 2
    out = block(torch.randn(1, 8, 8, 8), torch.randn(1, 8, 8, 8))
    out.square().mean().backward()
    for name in ("temperature", "sharpness", "position"):
        assert getattr(block, name).grad is not None, name


def test_attention_uses_the_fixed_stream():
    # Q comes from the fixed tokens: changing only the fixed input changes the output
    torch.manual_seed(0)
    block = PolarityCorrelationAttention(8, 2, (4, 4)).eval()
    moving = torch.randn(1, 8, 4, 4)
    a = block(moving, torch.randn(1, 8, 4, 4))
    b = block(moving, torch.randn(1, 8, 4, 4))
    assert not torch.allclose(a, b)


def test_attention_rejects_odd_head_width():
    with pytest.raises(ValueError, match="even width"):
        PolarityCorrelationAttention(12, 4, (4, 4))


@pytest.mark.parametrize("config", [TINY_2D, TINY_3D])
@pytest.mark.parametrize("diffeomorphic", [True, False])
def test_plcreg_shapes_and_initial_identity(config, diffeomorphic):
    cfg = PLCRegConfig(**{**config.__dict__, "diffeomorphic": diffeomorphic})
    model = PLCReg(cfg).eval()
    moving = torch.rand(2, cfg.moving_channels, *cfg.size)
    fixed = torch.rand(2, cfg.fixed_channels, *cfg.size)
    with torch.no_grad():
        out = model(moving, fixed)
    assert set(out) == {"ddf", "field", "moved"}
    assert out["ddf"].shape == (2, cfg.ndim, *cfg.size)
    assert out["field"].shape == out["ddf"].shape
    assert out["moved"].shape == moving.shape
    # heads start at N(0, 1e-5): the first registration is (almost) the identity
    assert out["ddf"].abs().max() < 0.05
    assert torch.allclose(out["moved"], moving, atol=0.05)


def test_plcreg_trains_one_step():
    model = PLCReg(TINY_2D)
    moving, fixed = torch.rand(1, 3, 32, 32), torch.rand(1, 1, 32, 32)
    out = model(moving, fixed)
    (out["moved"] - fixed).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"ndim": 4}, "ndim must be 2 or 3"),
    ({"size": (30, 32)}, "divisible by 4"),
    ({"size": (32, 32, 32)}, "need 2 values"),
    ({"channels": (4, 6, 8)}, "even width"),
    ({"shared_encoder": True}, "shared_encoder"),
])
def test_config_errors(overrides, message):
    with pytest.raises(InputError, match=message):
        PLCRegConfig(**{**TINY_2D.__dict__, **overrides})


def test_checkpoint_round_trip(tmp_path):
    model = PLCReg(TINY_3D)
    path = save_checkpoint(tmp_path / "p.pt", "plcreg", model, TINY_3D)
    loaded = load_model(path)
    assert loaded.config == TINY_3D
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, x)["ddf"], loaded(x, x)["ddf"])
