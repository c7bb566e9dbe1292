"""The --segmenter stage: ASC-Seg (fused or TRUS-only) replacing the U-Net head's logits in the
live chain; tiny random-weight checkpoints, geometry and wiring only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regseg.engines.fusion import FusionEngine
from regseg.engines.segmentation import argmax_labels
from regseg.errors import InputError
from regseg.models.ascseg import ASCSeg, ASCSegConfig
from regseg.models.checkpoint import save_checkpoint
from regseg.models.registry import build_model
from regseg.sim.phantom import make_phantom
from regseg.sim.scanner import SimulatedScanner
from regseg.spatial import warp_affine
from regseg.stream.context import build_context
from regseg.stream.pipeline import Pipeline, plane_matrices
from regseg.stream.segmenter import Segmenter


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ascseg")
    out = {}
    for name, channels in (("fused", 4), ("trus", 1), ("bad", 3)):
        torch.manual_seed(channels)
        config = ASCSegConfig(in_channels=channels, size=16, channels=(4, 8, 8, 12))
        out[name] = save_checkpoint(folder / f"{name}.pt", "ascseg", ASCSeg(config), config)
    return out


@pytest.fixture(scope="module")
def case():
    phantom = make_phantom(0, spacing_mm=1.4)  # coarse: fast, same geometry
    scanner = SimulatedScanner(phantom, seed=0)
    return build_context(phantom.mri, phantom.labels), scanner.frame(0)


def chain_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    trus, mri = torch.rand(1, 1, 128, 128, generator=g), torch.rand(1, 1, 128, 128, generator=g)
    labels = (torch.rand(1, 2, 128, 128, generator=g) > 0.5).float()
    theta = torch.tensor([[[1.0, 0.1, 0.05], [-0.1, 1.0, 0.0]]])
    return trus, mri, labels, theta


def test_fused_inputs_are_the_registered_mri(checkpoints):
    seg = Segmenter(checkpoints["fused"], backend="eager")
    trus, mri, labels, theta = chain_inputs()
    x = seg.inputs(trus, mri, labels, theta)
    warped = warp_affine(torch.cat([mri, labels], 1), theta)
    expected = F.interpolate(torch.cat([trus, warped], 1), size=(16, 16), mode="area")
    assert seg.fused and x.shape == (1, 4, 16, 16)
    assert torch.allclose(x, expected, atol=1e-6)


def test_trus_only_ignores_the_mri(checkpoints):
    seg = Segmenter(checkpoints["trus"], backend="eager")
    trus, mri, labels, theta = chain_inputs()
    first = seg(trus, mri, labels, theta).clone()
    _, mri2, labels2, _ = chain_inputs(seed=1)
    assert not seg.fused
    assert torch.equal(seg(trus, mri2, labels2, theta * 0.5), first)


def test_pipeline_labels_come_from_the_segmenter(checkpoints, case):
    context, frame = case
    torch.manual_seed(0)
    engine = FusionEngine(model=build_model("alignsegnet").eval())
    seg = Segmenter(checkpoints["trus"], backend="eager")
    pipeline = Pipeline(context, engine, segmenter=seg)
    result = pipeline(frame)
    assert result.labels.shape == frame.pixels.shape and "segment" in result.timings_ms
    chain = pipeline.chain(frame.pixels.shape)
    mats = torch.from_numpy(plane_matrices(context, pipeline.plane(frame), frame.pixels.shape,
                                           engine.size))
    with torch.inference_mode():
        theta, labels, _ = chain.run(torch.from_numpy(frame.pixels), mats)
        inputs = chain.prepare(torch.from_numpy(frame.pixels), mats)
        logits = seg(*inputs, theta)
        up = F.interpolate(logits, size=frame.pixels.shape, mode="bilinear", align_corners=False)
    assert torch.equal(labels, argmax_labels(up)[0])


def test_segmenter_errors(checkpoints, tmp_path):
    with pytest.raises(InputError, match="1 \\(TRUS\\) or 4"):
        Segmenter(checkpoints["bad"], backend="eager")
    with pytest.raises(InputError, match="choose unet"):
        Segmenter("sam", backend="eager")
