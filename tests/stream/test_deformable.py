"""The live deformable stage: identity at start, an analytic shift, wrong weights refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regseg import spatial
from regseg.errors import EngineError
from regseg.imageio import Volume
from regseg.models.checkpoint import save_checkpoint
from regseg.models.plcreg import PLCReg, PLCRegConfig
from regseg.stream.context import build_context
from regseg.stream.deformable import DeformableStage

FRAME_HW = (64, 64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("deformable")
    rng = np.random.default_rng(0)
    mri = rng.random((48, 48, 12)).astype(np.float32)
    labels = np.zeros((48, 48, 12), np.uint8)
    labels[10:30, 14:34, 3:9] = 1
    labels[18:24, 20:26, 4:8] = 2
    v2w = np.diag([1.0, 1.0, 2.0, 1.0])
    context = build_context(Volume(mri, v2w), Volume(labels, v2w))
    cfg = PLCRegConfig(ndim=2, size=(32, 32), moving_channels=3, fixed_channels=1,
                       channels=(4, 8), shared_encoder=False, heads=2, window=(4, 4))
    weights = save_checkpoint(d / "tiny2d.pt", "plcreg", PLCReg(cfg), cfg)
    cfg3 = PLCRegConfig(ndim=3, size=(8, 8, 8), channels=(4, 8), heads=2, window=(2, 2, 2))
    weights3 = save_checkpoint(d / "tiny3d.pt", "plcreg", PLCReg(cfg3), cfg3)
    plane = np.diag([0.5, 0.5, 1.0, 1.0])  # frame pixel -> mm, through slice k = 3
    plane[:3, 3] = [4.2, 4.1, 6.0]  # off the voxel boundaries: nearest has no ties
    return context, DeformableStage(context, weights), plane, weights3


def _affine_only(context, plane):
    return spatial.reslice(context.labels, context.world_to_voxel, plane, FRAME_HW,
                           mode="nearest")[0, 0].numpy()


def test_untrained_stage_is_the_identity(setup):
    context, stage, plane, _ = setup
    pixels = np.random.default_rng(1).integers(0, 255, FRAME_HW, dtype=np.uint8)
    labels, ddf = stage(pixels, plane)
    assert labels.shape == FRAME_HW and labels.dtype == np.uint8
    assert ddf.shape == (2, *FRAME_HW) and np.abs(ddf).max() < 0.05
    assert np.array_equal(labels, _affine_only(context, plane))
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_one_pixel_displacement_shifts_labels_by_one_pixel(setup, monkeypatch):
    context, stage, plane, _ = setup
    # half a model pixel along x on a 32-grid is one frame pixel on the 64-grid
    ddf = torch.zeros(1, 2, 32, 32)
    ddf[:, 1] = 0.5
    monkeypatch.setattr(stage.engine, "predict", lambda m, f: {"ddf": ddf, "field": ddf})
    labels, out = stage(np.zeros(FRAME_HW, np.uint8), plane)
    assert np.allclose(out[1], 1.0) and np.allclose(out[0], 0.0)
    reference = _affine_only(context, plane)
    assert np.array_equal(labels[:, :-1], reference[:, 1:])


def test_wrong_weights_refused(setup):
    context, _, _, weights3 = setup
    with pytest.raises(EngineError, match="2-D PLCReg"):
        DeformableStage(context, weights3)


def test_onnxrt_stage_matches_eager(setup, tmp_path):
    # the live CLI builds the stage with --backend (auto picks ONNX Runtime on CPU)
    context, stage, plane, _ = setup
    trained = PLCReg(stage.engine.config)
    torch.manual_seed(3)
    with torch.no_grad():  # a non-zero field: the flow heads start at zero
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = save_checkpoint(tmp_path / "perturbed.pt", "plcreg", trained, trained.config)
    eager = DeformableStage(context, weights)
    ort = DeformableStage(context, weights, backend="onnxrt", threads=1)
    assert ort.engine.backend == "onnxrt"
    pixels = np.random.default_rng(2).integers(0, 255, FRAME_HW, dtype=np.uint8)
    (la, da), (lb, db) = eager(pixels, plane), ort(pixels, plane)
    assert np.abs(da).max() > 0.05  # the comparison is about a real displacement
    assert np.abs(da - db).max() < 1e-3 * max(1.0, np.abs(da).max())
    assert (la == lb).mean() > 0.999
