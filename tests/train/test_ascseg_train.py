"""The ASC-Seg recipe (train/ascseg.py) at toy sizes: inputs, scores, a few steps, checkpoints of
every architecture, argument errors."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from regseg.errors import InputError
from regseg.models.checkpoint import save_checkpoint
from regseg.train import ascseg as recipe


def toy_data(n: int = 6, size: int = 16, channels: int = 1) -> recipe.SegData:
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(n, 32, 32, dtype=torch.uint8)
    labels[:, 8:24, 8:24] = 1
    labels[:, 12:16, 12:16] = 2
    x = torch.rand(n, channels, 32, 32, generator=g) * 0.2 + (labels[:, None] > 0).float() * 0.5
    small = torch.nn.functional.interpolate(labels[:, None].float(), size=(size, size),
                                            mode="nearest-exact")[:, 0].long()
    return recipe.SegData(recipe.segmenter_inputs(x, None, size), small, labels)


def test_segmenter_inputs_area_resample_and_concatenate():
    trus, context = torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32)
    x = recipe.segmenter_inputs(trus, context, 16)
    assert x.shape == (2, 4, 16, 16)
    assert torch.allclose(x[:, :1], torch.nn.functional.avg_pool2d(trus, 2), atol=1e-6)
    assert recipe.segmenter_inputs(trus, None, 32).shape == (2, 1, 32, 32)


def test_dice_scores_skip_absent_structures():
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0, :2] = 1
    pred = truth.copy()
    pred[0, 0, 0] = 2  # a lesion pixel in frame 0 only: lesion Dice 0 there, NaN in frame 1
    scores = recipe.dice_scores(pred, truth)
    assert scores["prostate_dice"] == pytest.approx(1.0)  # the prostate mask includes the lesion
    assert scores["lesion_dice"] == pytest.approx(0.0)


@pytest.mark.parametrize("arch", ["ascseg", "monai_unet"])
def test_fit_runs_and_checkpoints_reload(arch, tmp_path):
    torch.manual_seed(0)
    net, config = recipe.build_net(arch, 1, 16)
    if arch == "ascseg":  # the smallest legal widths keep this test to a second
        net, config = recipe.ASCSeg(recipe.ASCSegConfig(size=16, channels=(4, 4, 4, 4))), None
        config = net.config
    data = toy_data()
    history, rows, steps = recipe.fit(net, data, data, seconds=1e9, batch_size=2,
                                      progress=False, max_steps=2)
    assert steps == 2 and len(history) == 2 and np.isfinite(history).all()
    assert set(rows[-1]) >= {"step", "prostate_dice", "lesion_dice"}
    path = save_checkpoint(tmp_path / "n.pt", arch, net, config)
    loaded = recipe.load_net(path)
    x = data.inputs[:2]
    net.eval()
    with torch.no_grad():
        a, b = recipe.logits_of(net)(x), recipe.logits_of(loaded)(x)
    assert torch.equal(a, b)


def test_unknown_arch():
    with pytest.raises(InputError, match="--arch"):
        recipe.build_net("sam", 1, 16)


@pytest.mark.parametrize(("flag", "value", "match"), [
    ("batch_size", 1, "--batch-size"), ("minutes", 0.0, "--minutes"), ("size", 20, "size 20")])
def test_run_refuses_bad_arguments(flag, value, match, tmp_path):
    parser = argparse.ArgumentParser()
    recipe.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path)])
    setattr(args, flag, value)
    with pytest.raises(InputError, match=match):
        recipe.run(args)
