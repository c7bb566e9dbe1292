"""The CUDA device ring against the CPU path (marked ``gpu``; skipped without CUDA)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from regseg.engines.base import TOLERANCES, make_engine, parity_error
from regseg.engines.fusion import FusionEngine
from regseg.models.registry import build_model
from regseg.sim.phantom import make_phantom
from regseg.sim.scanner import SimulatedScanner
from regseg.stream.context import build_context
from regseg.stream.pipeline import Pipeline

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# GPU convolutions may use TF32 and other kernels: argmax ties and nearest-label boundaries may
# flip on a few pixels, and theta agrees to ~1e-3.
LABEL_AGREEMENT = 0.995
THETA_ATOL = 5e-3


@pytest.fixture(scope="module")
def case():
    phantom = make_phantom(0, spacing_mm=1.4)
    scanner = SimulatedScanner(phantom, seed=0)
    frames = [scanner.frame(i) for i in range(8)]
    torch.manual_seed(0)
    model = build_model("alignsegnet").eval()
    cpu = Pipeline(build_context(phantom.mri, phantom.labels), FusionEngine(model=model))
    return phantom, frames, model, [cpu(f) for f in frames]


def _gpu_pipeline(case, **options):
    phantom, _, model, _ = case
    context = build_context(phantom.mri, phantom.labels, "cuda")
    return Pipeline(context, FusionEngine(model=model, device="cuda"), **options)


def _assert_close(results, reference):
    assert len(results) == len(reference)
    for got, ref in zip(results, reference, strict=True):
        assert got.frame is ref.frame
        assert (got.labels == ref.labels).mean() >= LABEL_AGREEMENT
        assert (got.warped_labels == ref.warped_labels).mean() >= LABEL_AGREEMENT
        # theta off by THETA_ATOL moves a 256-pixel frame's corner by ~0.6 px: compare in px/mm
        assert np.allclose(got.mri_to_image, ref.mri_to_image, rtol=THETA_ATOL, atol=1.0)


@pytest.mark.parametrize("slots", [2, 3])
def test_ring_matches_cpu_frame_by_frame(case, slots):
    pipeline = _gpu_pipeline(case, ring_slots=slots)
    _assert_close([pipeline(f) for f in case[1]], case[3])


def test_ring_overlapped_keeps_order(case):
    pipeline = _gpu_pipeline(case, ring_slots=3)
    results = []
    for frame in case[1]:
        results += pipeline.submit(frame)
    assert len(results) == len(case[1]) - 3  # a full 3-slot ring holds the last three
    results += pipeline.flush()
    _assert_close(results, case[3])
    assert {"upload", "prepare", "model", "download", "overlay"} <= set(results[-1].timings_ms)


def test_ring_poll_returns_finished_frames_without_waiting(case):
    pipeline = _gpu_pipeline(case, ring_slots=3)
    assert pipeline.submit(case[1][0]) == [] and pipeline.in_flight == 1
    torch.cuda.synchronize()  # the frame's download is done: poll must hand it back now
    results = pipeline.poll()
    assert pipeline.in_flight == 0
    _assert_close(results, case[3][:1])
    assert pipeline.poll() == []


def test_ring_cuda_graph_matches_cpu(case):
    pipeline = _gpu_pipeline(case, cuda_graph=True)
    results = [pipeline(f) for f in case[1]]
    _assert_close(results, case[3])
    assert "chain" in results[0].timings_ms


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs cupy")
def test_ring_cupy_preprocessing_matches_cpu(case):
    pipeline = _gpu_pipeline(case, preprocess="cupy")
    _assert_close([pipeline(f) for f in case[1]], case[3])


@pytest.mark.parametrize("backend, precision", [("eager", "fp16"), ("eager", "bf16"),
                                                ("compiled", "fp32")])
def test_gpu_engines_match_eager(case, backend, precision):
    model = case[2]
    shapes = {"trus": (1, 1, 128, 128), "mri": (1, 1, 128, 128), "mri_labels": (1, 2, 128, 128)}
    x = {k: torch.rand(s, device="cuda") for k, s in shapes.items()}
    ref = make_engine(model, shapes, device="cuda")(x)
    ref = {k: v.clone() for k, v in ref.items()}
    got = make_engine(model, shapes, backend=backend, device="cuda", precision=precision)(x)
    assert max(parity_error(ref, got).values()) < TOLERANCES[precision]


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None,
                    reason="needs torch-tensorrt")
def test_tensorrt_matches_eager(case, tmp_path):
    model = case[2]
    shapes = {"trus": (1, 1, 128, 128), "mri": (1, 1, 128, 128), "mri_labels": (1, 2, 128, 128)}
    x = {k: torch.rand(s, device="cuda") for k, s in shapes.items()}
    ref = {k: v.clone() for k, v in make_engine(model, shapes, device="cuda")(x).items()}
    got = make_engine(model, shapes, backend="tensorrt", device="cuda", cache_dir=tmp_path)(x)
    assert max(parity_error(ref, got).values()) < TOLERANCES["fp32"]
