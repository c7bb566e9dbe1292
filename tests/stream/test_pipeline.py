"""The live pipeline on the CPU: the frame chain's geometry against regseg.planes/spatial, and
whole frames through eager and ONNX Runtime engines."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from regseg import planes, spatial
from regseg.engines.fusion import FusionEngine
from regseg.errors import EngineError
from regseg.models.registry import build_model
from regseg.sim.phantom import make_phantom
from regseg.sim.scanner import SimulatedScanner
from regseg.stream.context import build_context
from regseg.stream.pipeline import HOST_STAGES, STAGES, Pipeline, plane_matrices


@pytest.fixture(scope="module")
def case():
    phantom = make_phantom(0, spacing_mm=1.4)  # coarse: a fast case with the same geometry
    scanner = SimulatedScanner(phantom, seed=0)
    return build_context(phantom.mri, phantom.labels), [scanner.frame(i) for i in (0, 7)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("alignsegnet").eval()  # random weights: geometry and parity only


@pytest.fixture(scope="module")
def eager(model):
    return FusionEngine(model=model)


def _chain_inputs(pipeline, frame):
    tracked = pipeline.plane(frame)
    mats = torch.from_numpy(plane_matrices(pipeline.context, tracked, frame.pixels.shape,
                                           pipeline.engine.size))
    return pipeline.chain(frame.pixels.shape), tracked, mats


def test_prepare_equals_planes_inputs(case, eager):
    context, frames = case
    pipeline = Pipeline(context, eager)
    frame = frames[0]
    chain, tracked, mats = _chain_inputs(pipeline, frame)
    trus, mri, labels = chain.prepare(torch.from_numpy(frame.pixels), mats)
    mri_ref, labels_ref = planes.mri_inputs(context.mri, context.labels, context.world_to_voxel,
                                            tracked, frame.pixels.shape, eager.size)
    assert torch.equal(trus, planes.trus_input(torch.from_numpy(frame.pixels), eager.size))
    assert torch.allclose(mri, mri_ref, atol=1e-6)
    assert torch.equal(labels, labels_ref)
    assert labels[:, 0].sum() > 0  # the plane cuts the gland: the comparison means something


def test_warp_labels_equals_reslice_through_refined_plane(case, eager):
    context, frames = case
    pipeline = Pipeline(context, eager)
    frame = frames[1]
    chain, tracked, mats = _chain_inputs(pipeline, frame)
    theta = torch.tensor([[[1.03, 0.04, 0.06], [-0.05, 0.97, -0.03]]])
    warped = chain.warp_labels(theta, mats)
    hw = frame.pixels.shape
    image_to_mri = tracked @ spatial.lift_2d(spatial.theta_to_pixel(theta[0].double().numpy(),
                                                                    hw))
    ref = spatial.reslice(context.labels, context.world_to_voxel, image_to_mri, hw,
                          mode="nearest")[0, 0]
    assert warped.dtype == torch.uint8
    # float32 on both sides, composed in a different order: a pixel centre that falls exactly on
    # a voxel boundary may round the other way, nothing more.
    assert (warped != ref).float().mean() < 1e-3


def test_translation_theta_shifts_labels_by_one_pixel(case, eager):
    context, frames = case
    pipeline = Pipeline(context, eager)
    chain, _, mats = _chain_inputs(pipeline, frames[0])
    w = chain.frame_hw[1]
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    shifted = identity.clone()
    shifted[0, 0, 2] = 2.0 / w  # one pixel along i in normalised units (align_corners=False)
    base = chain.warp_labels(identity, mats)
    moved = chain.warp_labels(shifted, mats)
    # output pixel i samples input pixel i + 1
    assert (moved[:, 1:-2] != base[:, 2:-1]).float().mean() < 1e-3
    assert base.sum() > 0


def test_pipeline_result_on_cpu(case, eager):
    context, frames = case
    result = Pipeline(context, eager)(frames[0])
    hw = frames[0].pixels.shape
    assert result.labels.shape == hw and result.labels.dtype == np.uint8
    assert result.warped_labels.shape == hw and result.overlay.shape == (*hw, 3)
    assert set(STAGES) | set(HOST_STAGES) | {"total"} == set(result.timings_ms)
    assert result.timings_ms["total"] >= result.timings_ms["model"] > 0
    assert set(np.unique(result.labels)) <= {0, 1, 2}
    # mri_to_image is the inverse of the plane the labels were warped through: the warped
    # labels' gland maps inside the MRI gland.
    j, i = np.argwhere(result.warped_labels > 0).mean(axis=0)
    world = spatial.apply(spatial.invert(result.mri_to_image), np.array([[i, j, 0.0]]))[0]
    ijk = np.round(spatial.apply(context.world_to_voxel, world[None])[0]).astype(int)
    assert context.labels[0, 0, ijk[2], ijk[1], ijk[0]] > 0


def test_untracked_frame_and_submit(case, eager):
    context, frames = case
    pipeline = Pipeline(context, eager)
    untracked = replace(frames[0], image_to_reference=None)
    results = pipeline.submit(untracked)  # CPU: processed at once
    assert len(results) == 1 and results[0].frame is untracked
    assert pipeline.flush() == []


def test_onnxrt_pipeline_matches_eager(case, model, eager, tmp_path):
    context, frames = case
    ort = FusionEngine(model=model, backend="onnxrt", cache_dir=tmp_path)
    for frame in frames:
        a, b = Pipeline(context, eager)(frame), Pipeline(context, ort)(frame)
        assert np.allclose(a.mri_to_image, b.mri_to_image, atol=1e-4)
        assert (a.labels != b.labels).mean() < 1e-3  # argmax ties flip at most a few pixels
        assert (a.warped_labels != b.warped_labels).mean() < 1e-3


def test_device_ring_needs_cuda(case, eager):
    from regseg.stream.device_ring import DeviceRing

    context, frames = case
    chain = Pipeline(context, eager).chain(frames[0].pixels.shape)
    with pytest.raises(EngineError, match="needs a CUDA device"):
        DeviceRing(chain)
