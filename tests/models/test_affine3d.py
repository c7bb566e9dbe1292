"""Affine3D (issue 18 item 1): centre-of-mass start, strict checkpoints, the engine seam, the
capture range of the shipped weights, and the training recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regseg.engines.affine import AffineStage, optimise_affine, theta_to_voxels
from regseg.errors import EngineError, InputError
from regseg.models.affine3d import Affine3D, Affine3DConfig, centre_of_mass
from regseg.models.checkpoint import save_checkpoint
from regseg.models.registry import WEIGHTS_DIR, load_model

SMALL = Affine3DConfig(size=(16, 16, 16), channels=(4, 8), reduce=4, hidden=8)


def _blob(shift_vox: tuple[float, float, float], size: int = 16) -> torch.Tensor:
    """A bright cube in a dark (1, 1, D, H, W) volume, centre moved by ``shift_vox`` (k, j, i)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3,
                                      indexing="ij"))
    centre = torch.tensor([(size - 1) / 2 + s for s in shift_vox]).reshape(3, 1, 1, 1)
    return ((grid - centre).abs().amax(0) <= 3).float()[None, None]


def test_untrained_model_is_the_centre_of_mass_alignment():
    torch.manual_seed(0)
    model = Affine3D(SMALL).eval()
    fixed, moving = _blob((0, 0, 0)), _blob((2, -1, 3))  # array order (k, j, i)
    out = model(fixed, moving)
    assert torch.equal(out["theta"], out["initial"])  # zero-initialised head
    # normalised (x, y, z) shift = 2 * voxels / size, x <- i, z <- k
    expected = torch.tensor([3.0, -1.0, 2.0]) * 2 / 16
    assert torch.allclose(out["theta"][0, :, 3], expected, atol=1e-5)
    assert torch.allclose(out["theta"][0, :, :3], torch.eye(3))
    # ... and the matrix in voxels moves fixed voxels onto the moving cube
    voxels = theta_to_voxels(out["theta"][0].detach().numpy(), (16, 16, 16))
    assert np.allclose(voxels[:3, 3], [2, -1, 3], atol=1e-4)


def test_centre_of_mass_ignores_dark_voxels():
    x = _blob((0, 0, 0)) + 0.05  # below the threshold everywhere outside the cube
    assert torch.allclose(centre_of_mass(x, 0.1), torch.zeros(1, 3), atol=1e-6)


def test_config_checks_the_grid():
    with pytest.raises(InputError, match="divisible by 8"):
        Affine3DConfig(size=(20, 32, 24), channels=(4, 8, 8, 8))


def test_checkpoint_round_trip_is_strict(tmp_path):
    torch.manual_seed(1)
    model = Affine3D(SMALL)
    torch.nn.init.normal_(model.head[-1].weight, std=0.01)
    path = save_checkpoint(tmp_path / "a.pt", "affine3d", model, SMALL)
    loaded = load_model(path)
    x, y = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    assert torch.equal(loaded(x, y)["theta"], model.eval()(x, y)["theta"])
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["hidden"] = 9  # weights no longer fit the config
    torch.save(checkpoint, tmp_path / "b.pt")
    with pytest.raises(EngineError, match="b.pt: weights do not fit Affine3D"):
        load_model(tmp_path / "b.pt")


def test_affine_stage_modes():
    with pytest.raises(InputError, match="affine mode 'best'"):
        AffineStage("best")
    assert AffineStage("optimise", iterations=0).mode == "none"  # 0: no affine stage
    stage = AffineStage("none")
    assert np.array_equal(stage(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)), np.eye(4))


def test_optimiser_starts_where_it_is_told():
    fixed, moving = _blob((0, 0, 0)), _blob((1, 0, 0))
    start = np.eye(3, 4)
    start[0, 3] = 0.3
    assert np.allclose(optimise_affine(fixed, moving, iterations=0, initial=start), start)


SHIPPED = WEIGHTS_DIR / "affine3d.pt"
needs_weights = pytest.mark.skipif(not SHIPPED.is_file(), reason="affine3d.pt not shipped yet")


@needs_weights
def test_shipped_weights_through_make_engine_equal_the_eager_model():
    stage = AffineStage("learned")
    model = load_model(SHIPPED)
    g = torch.Generator().manual_seed(3)
    fixed, moving = torch.rand(1, 1, 48, 64, 48, generator=g), torch.rand(1, 1, 48, 64, 48,
                                                                            generator=g)
    with torch.inference_mode():
        eager = model(F.avg_pool3d(fixed, 2), F.avg_pool3d(moving, 2))["theta"][0]
    assert np.allclose(stage.learned(fixed, moving), eager.double().numpy(), atol=1e-5)
    meta = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert meta["model"] == "affine3d" and meta["train_s"] <= 25 * 60
    assert SHIPPED.stat().st_size < 1_000_000


@needs_weights
def test_capture_range_learned_recovers_what_the_optimiser_does_not_in_the_same_steps():
    """A pair with a 20 deg rotation and a 20 mm shift (the edge of the 20 deg / 20 mm per axis
    the network was trained on; the evaluation pairs have 5 deg / 5 mm per image). The network
    (one call) brings the TRE after affine under 4 mm; the MIND optimiser from the centre of mass,
    given the 20 steps that ``learned+optimise`` spends after the network, stays above twice that.
    (Given its full 120 steps the optimiser also recovers this pair: see bench/affine_capture.py
    for where each method's capture ends.)"""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from affine_capture import controlled_affine, tre_mm

    from regseg.sim import mni
    from regseg.train.affine3d import brain_points, render

    torch.set_num_threads(1)
    base = mni.load_base()
    shape, spacing = tuple(base.config.shape[::-1]), base.config.spacing_mm
    rng = np.random.default_rng([30_000, 0, 318])  # a stream no training or bench uses
    a_m = controlled_affine(rng, shape, spacing, rotation_deg=20.0, shift_mm=20.0)
    fixed = render(base, np.eye(4), rng, False)
    moving = render(base, a_m, rng, True)  # the other modality
    points = brain_points(base)[::50]
    truth = np.linalg.inv(a_m)
    stage = AffineStage("learned+optimise", iterations=20)
    theta = stage.learned(fixed, moving)
    initial = tre_mm(np.eye(4), truth, points, spacing)
    learned = tre_mm(theta_to_voxels(theta, shape), truth, points, spacing)
    both = tre_mm(stage(fixed, moving), truth, points, spacing)
    optimised = tre_mm(theta_to_voxels(optimise_affine(fixed, moving, iterations=20), shape),
                       truth, points, spacing)
    errors = {"initial": initial, "learned": learned, "learned+optimise": both,
              "optimise20": optimised}
    assert initial > 20.0, errors
    assert learned < 4.0 and both < 4.0, errors
    assert optimised > 2 * learned, errors


@needs_weights
def test_register_cli_runs_the_learned_stage(tmp_path):
    from regseg.cli import main
    from regseg.sim import mni

    pair = mni.make_pair(mni.load_base(), 20_000, other_modality=False)  # a validation pair
    row = mni.write_pair(pair, tmp_path / "pair")
    out = tmp_path / "out"
    assert main(["register", "--fixed", row["fixed"], "--moving", row["moving"],
                 "--moving-labels", row["moving_labels"], "--fixed-labels", row["fixed_labels"],
                 "--affine", "learned", "--refine", "0", "--threads", "1",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dice_mean"] > report["dice_before_mean"] + 0.1
    with pytest.raises(SystemExit) as exc:  # argparse: an unknown mode is a usage error
        main(["register", "--affine", "best", "--out", str(out)])
    assert exc.value.code == 2
