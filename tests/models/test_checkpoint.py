"""Checkpoints and the registry: round trips, strict loading, clear errors, shipped weights."""

import pytest
import torch

from regseg.errors import EngineError, InputError
from regseg.models.alignsegnet import AlignSegNet, AlignSegNetConfig
from regseg.models.checkpoint import read_checkpoint, save_checkpoint
from regseg.models.registry import build_model, default_weights_path, load_model

TINY = dict(size=32, enc_channels=8, patch=4, embed_dim=16, depth=1, heads=2,
            unet_channels=(8, 16), latent_dim=4)


def _inputs(size: int):
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(1, 2, size, size, generator=g) > 0.5).float()
    return (torch.rand(1, 1, size, size, generator=g), torch.rand(1, 1, size, size, generator=g),
            labels)


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    # Non-default weights everywhere (the zero-initialised head too) so the round trip means
    # something.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def test_round_trip_gives_equal_outputs(tmp_path):
    torch.manual_seed(0)
    model = _trained_like(build_model("alignsegnet", **TINY))
    path = save_checkpoint(tmp_path / "m.pt", "alignsegnet", model, model.config,
                           meta={"note": "test"})
    loaded = load_model(path)
    assert isinstance(loaded, AlignSegNet) and loaded.config == model.config
    assert not loaded.training
    with torch.no_grad():
        a, b = model(*_inputs(32)), loaded(*_inputs(32))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert read_checkpoint(path)["meta"] == {"note": "test"}


def test_strict_load_names_the_file_and_the_key(tmp_path):
    model = build_model("alignsegnet", **TINY)
    path = save_checkpoint(tmp_path / "m.pt", "alignsegnet", model, model.config)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"]["affine.bogus"] = torch.zeros(1)
    torch.save(checkpoint, path)
    expected = r"(?s)m\.pt: weights do not fit AlignSegNet.*affine\.bogus"
    with pytest.raises(EngineError, match=expected):
        load_model(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(EngineError, match=r"nope\.pt: checkpoint not found"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EngineError, match=r"bad\.pt: cannot read checkpoint"):
        load_model(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(EngineError, match=r"other\.pt: not a regseg checkpoint"):
        load_model(other)


def test_unknown_model_or_config_in_checkpoint(tmp_path):
    model = build_model("alignsegnet", **TINY)
    path = save_checkpoint(tmp_path / "m.pt", "nosuchnet", model, model.config)
    with pytest.raises(EngineError, match=r"m\.pt: .*unknown model 'nosuchnet'"):
        load_model(path)


def test_registry_errors():
    with pytest.raises(InputError, match="unknown model 'nosuchnet'"):
        build_model("nosuchnet")
    with pytest.raises(InputError, match=r"unknown config field\(s\) \['width'\]"):
        build_model("alignsegnet", width=3)


def test_shipped_weights_load_with_weights_only():
    path = default_weights_path("alignsegnet")
    assert path.name == "alignsegnet.pt" and path.parent.name == "weights"
    assert path.is_file(), f"shipped weights missing at {path}; run `regseg train alignsegnet`"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["model"] == "alignsegnet"
    model = load_model("alignsegnet")
    assert model.config == AlignSegNetConfig(**checkpoint["config"])
    size = model.config.size
    with torch.no_grad():
        out = model(*_inputs(size))
    assert out["logits"].shape == (1, 3, size, size)
    assert path.stat().st_size < 8 * 2**20  # small enough to live in the repo
