"""BiRegNet (models/biregnet.py): the identity at initialisation, the spec's two fields, trained by
``regseg train biregnet`` into a checkpoint that loads through the registry and runs through
make_engine (regseg.crossmodal's deformable stage)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from regseg.cli import main
from regseg.crossmodal import biregnet_engine, deformable_stage
from regseg.models.biregnet import BiRegNet, BiRegNetConfig
from regseg.models.registry import load_model
from regseg.sim.sweep import TRAIN_SEEDS
from regseg.train.biregnet import multiscale_dice


def test_zero_initialised_heads_give_the_identity_both_ways():
    torch.manual_seed(0)
    model = BiRegNet(BiRegNetConfig(size=(32, 32, 32))).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32))
    assert set(out) == {"ddf", "ddf_inverse"}
    for field in out.values():
        assert field.shape == (1, 3, 32, 32, 32)
        assert float(field.abs().max()) == 0.0


def test_multiscale_dice_is_highest_for_equal_labels():
    a = torch.zeros(1, 2, 24, 24, 24)
    a[:, :, 6:18, 6:18, 6:18] = 1
    same = float(multiscale_dice(a, a))
    assert 0.5 < same <= 1.0  # soft Dice of blurred maps: below 1 even for equal labels
    assert float(multiscale_dice(a, a.roll(3, dims=2))) < same - 0.05


def test_train_recipe_writes_weights_that_run_through_make_engine(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    code = main(["train", "biregnet", "--out", str(out), "--steps", "2", "--cases", "2",
                 "--val-cases", "1", "--val-pairs", "1", "--size", "32", "--spacing", "3",
                 "--cache", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "biregnet.json").read_text())
    assert summary["steps"] == 2 and "gland_dice_after" in summary["validation"]
    model = load_model(out / "biregnet.pt")
    assert isinstance(model, BiRegNet) and tuple(model.config.size) == (32, 32, 32)
    engine = biregnet_engine(str(out / "biregnet.pt"))
    assert engine.input_shapes["fixed"] == (1, 1, 32, 32, 32)
    case = pickle.loads((tmp_path / "cache" / f"case_{TRAIN_SEEDS[200]}.pkl").read_bytes())
    ddf = deformable_stage(case.mri, case.mri_labels, case.trus, case.reference_to_mri_true,
                           weights=str(out / "biregnet.pt"))
    assert ddf.shape == (3, *case.trus.data.shape)
    assert np.isfinite(ddf).all() and float(np.abs(ddf).max()) < 20.0


def test_bad_size_is_refused(tmp_path, capsys):
    assert main(["train", "biregnet", "--out", str(tmp_path), "--size", "24", "--no-progress"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


@pytest.mark.parametrize("n", [1])
def test_shipped_weights_load(n):
    from regseg.models.registry import WEIGHTS_DIR

    path = WEIGHTS_DIR / "biregnet.pt"
    if not path.is_file():
        pytest.skip("biregnet.pt not shipped in this checkout")
    model = load_model("biregnet")
    meta = json.loads((WEIGHTS_DIR / "biregnet.json").read_text())
    assert tuple(model.config.size) == tuple(meta["config"]["size"])
    assert path.stat().st_size < 2_500_000
