"""``regseg train plcreg3d --spacing``: the 3-D recipe at the resolution users register at.

The shipped model is trained at the CPU reduction (3.25 mm); the same command trains on a finer
MNI grid (1.5 mm on a GPU). Checked here: the grid each spacing gives, a short run at another
spacing whose checkpoint registers through the engine, and bad options refused before any work.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from regseg.cli import main as regseg_main
from regseg.engines.registration import RegistrationEngine
from regseg.imageio import Volume
from regseg.sim import mni
from regseg.train.plcreg_mni import (
    CONFIG_3D,
    EPE_3D,
    epe_at_spacing,
    grid_at_spacing,
    model_at_spacing,
    train_3d,
)
from regseg.train.plcreg_recipe import Weights

BOX_MM = np.array([48, 64, 48]) * 3.25  # the shipped model's field of view, (I, J, K)


def test_the_default_spacing_is_the_shipped_model():
    assert model_at_spacing() == CONFIG_3D
    shipped = json.loads((Path(__file__).parents[2] / "models" / "weights" /
                          "plcreg3d.json").read_text())
    assert tuple(shipped["config"]["size"]) == CONFIG_3D.size


@pytest.mark.parametrize("spacing, shape", [(3.25, (48, 64, 48)), (2.0, (80, 104, 80)),
                                            (1.5, (104, 144, 104))])
def test_grid_keeps_the_spacing_and_covers_the_box(spacing, shape):
    grid = grid_at_spacing(spacing, levels=4)
    assert grid.spacing_mm == spacing and grid.shape == shape
    assert all(n % 8 == 0 for n in grid.shape)  # the network pools three times
    extent = np.asarray(grid.shape) * spacing
    assert np.all(extent >= BOX_MM) and np.all(extent - BOX_MM < 8 * spacing)
    cfg = model_at_spacing(spacing)
    assert cfg.size == shape[::-1]  # (K, J, I), array order


def test_the_end_point_weight_keeps_its_pull_per_millimetre():
    assert epe_at_spacing(3.25) == EPE_3D
    # an error of 1 mm is 1 / 1.5 voxels at 1.5 mm and 1 / 3.25 at 3.25 mm: same weighted loss
    assert epe_at_spacing(1.5) / 1.5 == pytest.approx(epe_at_spacing(3.25) / 3.25)
    assert epe_at_spacing(1.5, 0.3) == 0.3  # an explicit weight is kept


def test_other_widths_and_window_change_only_those():
    cfg = model_at_spacing(1.5, channels=(8, 16, 32, 64), window=(5, 7, 6))
    assert cfg.channels == (8, 16, 32, 64) and cfg.window == (5, 7, 6)
    assert dataclasses.replace(cfg, channels=CONFIG_3D.channels, window=CONFIG_3D.window,
                               size=CONFIG_3D.size) == CONFIG_3D


def test_a_cpu_run_on_a_fine_grid_says_it_will_be_slow(tmp_path, capsys, monkeypatch):
    from regseg.train import plcreg_mni

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):  # the warning comes before any data is made
        raise Stop

    monkeypatch.setattr(plcreg_mni.mni, "load_base", stop)
    with pytest.raises(Stop):
        train_3d(tmp_path, minutes=1, seed=0, pool=1, val_pairs=1, lr=1e-3, weights=Weights(),
                 progress=False, cfg=model_at_spacing(1.5), spacing_mm=1.5)
    assert "104 x 144 x 104 grid on the CPU" in capsys.readouterr().err
    with pytest.raises(Stop):
        train_3d(tmp_path, minutes=1, seed=0, pool=1, val_pairs=1, lr=1e-3, weights=Weights(),
                 progress=False)
    assert "on the CPU" not in capsys.readouterr().err  # the shipped grid: no warning


def test_a_run_at_another_spacing_trains_there_and_registers_through_the_engine(tmp_path):
    torch.set_num_threads(1)
    cfg = dataclasses.replace(model_at_spacing(6.5, channels=(4, 8, 8), window=(2, 2, 2)),
                              heads=2)
    assert cfg.size == (24, 32, 24)
    summary = train_3d(tmp_path, minutes=5, seed=0, pool=3, val_pairs=1, lr=1e-3,
                       weights=Weights(dice=0.5, smooth=0.05, epe=0.1), progress=False,
                       steps=2, checkpoint_every=0, cfg=cfg, spacing_mm=6.5)
    assert summary["steps"] == 2
    assert summary["mni_config"]["spacing_mm"] == 6.5
    assert tuple(summary["mni_config"]["shape"]) == (24, 32, 24)
    assert np.isfinite(summary["validation"]["dice_after"])
    saved = json.loads((tmp_path / "plcreg3d.json").read_text())
    assert tuple(saved["config"]["size"]) == cfg.size

    # the checkpoint is an ordinary plcreg3d: the engine registers a 3.25 mm pair with it
    base = mni.load_base(mni.MniConfig())
    pair = mni.make_pair(base, 20_000, other_modality=False)
    engine = RegistrationEngine(tmp_path / "plcreg3d.pt", affine="none", refine=1)
    assert engine.size == cfg.size
    fixed = Volume(pair.fixed, pair.voxel_to_world)
    moving = Volume(pair.moving, pair.voxel_to_world)
    result = engine.register(fixed, moving, Volume(pair.moving_labels, pair.voxel_to_world))
    assert result.ddf.shape == (3, *pair.fixed.shape[::-1])
    assert result.moved.data.shape == pair.fixed.shape
    assert np.isfinite(result.ddf).all()


@pytest.mark.parametrize("flags, needle", [
    (["--spacing", "0.5"], "--spacing"),
    (["--spacing", "nan"], "--spacing"),
    (["--channels", "8", "12"], "width 12"),  # 12 does not split into 4 heads of even width
    (["--window", "3", "4"], "--window"),
])
def test_bad_options_exit_2_before_anything_is_written(tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    try:  # argparse exits; a config the model refuses returns
        code = regseg_main(["train", "plcreg3d", "--out", str(out), *flags])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert not out.exists()
