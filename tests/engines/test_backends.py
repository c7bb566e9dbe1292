"""Every installed backend against eager, within the stated tolerance; errors that say why."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from torch import nn

from regseg.engines.base import TOLERANCES, make_engine, parity_error
from regseg.engines.fusion import FusionEngine
from regseg.errors import EngineError
from regseg.models.registry import build_model

SIZE = 64  # AlignSegNet at 64 x 64 (patch 8 still divides 32): same graph, a quarter the cost


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    # Random weights: equivalence is a property of the backend, not of training. BatchNorm
    # statistics are randomised too, so eval-mode folding is exercised on non-trivial values.
    net = build_model("alignsegnet", size=SIZE)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        # The affine head starts at exactly identity; move it off, so the exported AffineGrid and
        # GridSample are checked on a real rotation/scale/shift, not on the identity.
        head = net.affine.mlp[-1]
        head.weight.normal_(0.0, 0.02)
        head.bias.copy_(torch.tensor([0.05, -0.08, 0.1, 0.07, 0.03, -0.06]))
    return net.eval()


def _inputs(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"trus": torch.rand(1, 1, SIZE, SIZE, generator=g),
            "mri": torch.rand(1, 1, SIZE, SIZE, generator=g),
            "mri_labels": (torch.rand(1, 2, SIZE, SIZE, generator=g) > 0.5).float()}


SHAPES = {"trus": (1, 1, SIZE, SIZE), "mri": (1, 1, SIZE, SIZE), "mri_labels": (1, 2, SIZE, SIZE)}


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                    reason="onnxruntime not installed (pip install 'regseg[onnx]')")
def test_onnxrt_matches_eager(model, tmp_path):
    eager = make_engine(model, SHAPES, backend="eager")
    ort = make_engine(model, SHAPES, backend="onnxrt", cache_dir=tmp_path, threads=1)
    assert ort.output_names == eager.output_names
    x = _inputs()
    ref = {k: v.clone() for k, v in eager(x).items()}
    got = ort(x)
    assert set(got) == set(ref)
    assert all(v.dtype == torch.float32 for v in got.values())
    err = parity_error(ref, got)
    assert max(err.values()) < TOLERANCES["fp32"], err
    assert (ref["theta"] - torch.eye(2, 3)).abs().max() > 0.03  # a real warp was compared
    # Outputs are bound buffers: the same tensors next call, now holding the new frame's values.
    again = ort(_inputs(seed=4))
    assert again["theta"].data_ptr() == got["theta"].data_ptr()
    assert max(parity_error(eager(_inputs(seed=4)), again).values()) < TOLERANCES["fp32"]


def test_onnxrt_keeps_only_asked_outputs(model, tmp_path):
    ort = make_engine(model, SHAPES, backend="onnxrt", cache_dir=tmp_path,
                      outputs=("theta", "logits"))
    assert set(ort(_inputs())) == {"theta", "logits"}
    assert ort.info["threads"] >= 1 and ort.info["precision"] == "fp32"


def test_eager_bf16_within_tolerance(model):
    """The live outputs hold in bf16. (The bilinear warps of the MRI and its label maps do not:
    CPU autocast runs grid_sample in bf16, whose 8-bit grid coordinates move label edges by up to
    a quarter pixel; the live path warps labels itself, in fp32.)"""
    live = ("theta", "logits")
    eager = make_engine(model, SHAPES, backend="eager", outputs=live)
    low = make_engine(model, SHAPES, backend="eager", precision="bf16", outputs=live, warmup=1)
    err = parity_error(eager(_inputs()), low(_inputs()))
    assert max(err.values()) < TOLERANCES["bf16"], err


def test_fusion_engine_with_model(model, tmp_path):
    engine = FusionEngine(model=model, backend="onnxrt", cache_dir=tmp_path)
    out = engine(*_inputs().values())
    assert tuple(out["theta"].shape) == (1, 2, 3)
    assert tuple(out["logits"].shape) == (1, 3, SIZE, SIZE)
    assert engine.info["backend"] == "onnxrt" and engine.size == (SIZE, SIZE)


def test_wrong_input_shape_is_an_error(model):
    eager = make_engine(model, SHAPES)
    bad = _inputs() | {"trus": torch.zeros(1, 1, 32, 32)}
    with pytest.raises(EngineError, match=r"'trus': expected shape \(1, 1, 64, 64\)"):
        eager(bad)


def test_unknown_backend_and_precision(model):
    with pytest.raises(EngineError, match="backend 'tflite' is not known"):
        make_engine(model, SHAPES, backend="tflite")
    with pytest.raises(EngineError, match="precision 'int4'"):
        make_engine(model, SHAPES, precision="int4")


@pytest.mark.parametrize("backend, precision, message", [
    ("tensorrt", "fp32", "needs a CUDA device"),
    ("onnxrt", "fp16", "fp32 only"),
    ("eager", "fp16", "eager fp16 on CPU"),
    ("compiled", "fp16", "compiled fp16 on CPU"),
])
def test_backends_refuse_what_they_cannot_do(model, backend, precision, message, tmp_path):
    with pytest.raises(EngineError, match=message):
        make_engine(model, SHAPES, backend=backend, precision=precision, cache_dir=tmp_path)


def test_named_fallback_is_reported_not_silent(model, caplog):
    engine = make_engine(model, SHAPES, backend="tensorrt", fallback="eager", warmup=1)
    assert engine.backend == "eager"
    assert engine.info["fallback"]["from"] == "tensorrt"
    assert "CUDA" in engine.info["fallback"]["reason"]
    assert "named fallback eager" in caplog.text


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": torch.relu(self.conv(image)).mean(dim=1, keepdim=True)}


def test_compiled_matches_eager_tiny():
    """Cheap check of the compiled path (Inductor on a one-layer net compiles in seconds)."""
    torch.manual_seed(0)
    net = _Tiny().eval()
    shapes = {"image": (1, 1, 16, 16)}
    x = {"image": torch.rand(1, 1, 16, 16)}
    compiled = make_engine(net, shapes, backend="compiled", warmup=1)
    ref = make_engine(net, shapes)(x)
    assert max(parity_error(ref, compiled(x)).values()) < TOLERANCES["fp32"]
    assert compiled.info["cuda_graphs"] is False


@pytest.mark.slow
def test_compiled_matches_eager_alignsegnet(model):
    compiled = make_engine(model, SHAPES, backend="compiled", warmup=1)
    ref = make_engine(model, SHAPES)(_inputs())
    err = parity_error(ref, compiled(_inputs()))
    assert max(err.values()) < TOLERANCES["fp32"], err


def test_compiled_does_not_recompile_on_live_inputs():
    """Issue 17: `--backend compiled` stalled 5-9 s on the first live frame: the live chain's
    inputs (made inside inference mode, views with other strides) failed Dynamo's guards and
    recompiled. Warm-up and live calls must hit the same graph."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = _Tiny().eval()
    compiled = make_engine(net, {"image": (1, 1, 16, 16)}, backend="compiled", warmup=1)
    before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        wide = torch.rand(1, 1, 16, 32)
        live = wide[:, :, :, ::2]  # a strided view, as grid_sample(...)[:, :, 0] gives
        out = compiled({"image": live})
    assert counters["stats"]["unique_graphs"] == before, "recompiled on a live-shaped call"
    ref = make_engine(net, {"image": (1, 1, 16, 16)})({"image": live.contiguous()})
    assert max(parity_error(ref, out).values()) < TOLERANCES["fp32"]


class _Warp(nn.Module):
    """regseg.spatial.warp as a model (the integration and feature warps of PLCReg use it)."""

    def forward(self, image: torch.Tensor, ddf: torch.Tensor) -> dict[str, torch.Tensor]:
        from regseg.spatial import warp

        return {"out": warp(image, ddf, padding_mode="border")}


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                    reason="onnxruntime not installed (pip install 'regseg[onnx]')")
@pytest.mark.parametrize("shape", [(1, 2, 16, 12), (1, 2, 16, 16), (1, 1, 6, 8, 5)])
def test_border_warp_exports_as_clamped_zeros_and_matches_eager(tmp_path, shape):
    import onnx

    g = torch.Generator().manual_seed(0)
    image = torch.rand(shape, generator=g)
    # displacements up to 6 voxels: many points fall outside, where border padding matters
    ddf = 12 * torch.rand(1, len(shape) - 2, *shape[2:], generator=g) - 6
    shapes = {"image": tuple(image.shape), "ddf": tuple(ddf.shape)}
    ort = make_engine(_Warp(), shapes, backend="onnxrt", cache_dir=tmp_path, threads=1)
    got = ort({"image": image, "ddf": ddf})["out"]
    ref = _Warp()(image, ddf)["out"]
    assert (got - ref).abs().max() < 1e-5
    from regseg.spatial import warp

    # the points outside matter: zeros padding proper would differ
    assert (warp(image, ddf, padding_mode="zeros") - ref).abs().max() > 0.1
    graph = onnx.load(ort.info["artifact"]).graph
    modes = [a.s.decode() for n in graph.node if n.op_type == "GridSample"
             for a in n.attribute if a.name == "padding_mode"]
    assert modes == ["zeros"]  # exported as clamped points with zeros padding
    ops = [n.op_type for n in graph.node]
    # the clamp is Clip with scalar bounds, not a Max / Min broadcast along the last axis (which
    # ONNX Runtime runs ~20x slower): one Clip when the sizes are equal, one per axis otherwise
    assert "Max" not in ops and "Min" not in ops
    assert ops.count("Clip") == (1 if len(set(shape[2:])) == 1 else len(shape) - 2)


@pytest.mark.parametrize("sizes", [(64, 64), (48, 64), (37, 11, 5), (48, 64, 48), (3, 3, 3)])
def test_clamp_to_centres_is_the_broadcast_clamp_to_the_bit(sizes):
    from regseg.spatial import clamp_to_centres

    g = torch.Generator().manual_seed(1)
    grid = 3 * torch.rand(2, 7, 5, len(sizes), generator=g) - 1.5
    n = torch.tensor(sizes, dtype=grid.dtype)
    old = torch.minimum(torch.maximum(grid, 1.0 / n - 1.0), 1.0 - 1.0 / n)
    assert torch.equal(clamp_to_centres(grid, sizes), old)
    assert (clamp_to_centres(grid, sizes) != grid).any()  # some points were clamped


@pytest.mark.parametrize("native, warned", [(False, True), (True, False)])
def test_emulated_cpu_bf16_is_said(model, monkeypatch, caplog, native, warned):
    """bf16 on a CPU without bf16 units is allowed (its accuracy can be checked) but never silently
    7-84x slower: building such an engine logs a warning that says so; with the units, nothing."""
    from regseg.engines import eager as eager_backend
    monkeypatch.setattr(eager_backend, "native_bf16_cpu", lambda: native)
    with caplog.at_level(logging.WARNING, logger="regseg.engines.eager"):
        make_engine(model, SHAPES, backend="eager", precision="bf16",
                    outputs=("theta", "logits"), warmup=0)
    said = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert bool(said) is warned, said
    if warned:
        assert "eager bf16" in said[0] and "precision='fp32'" in said[0]
