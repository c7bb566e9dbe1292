"""ASC-Seg: the selective scan's three forms agree, the grid_sample deformable conv is a DCN,
shapes, config errors, checkpoints, ONNX Runtime parity; small sizes, seconds on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regseg.errors import InputError
from regseg.models.ascseg import ASCSeg, ASCSegConfig
from regseg.models.ascseg_blocks import DCB, PMB, deform_conv_depthwise
from regseg.models.checkpoint import save_checkpoint
from regseg.models.registry import load_model
from regseg.models.selective_scan import (
    scan_chunked,
    scan_parallel,
    scan_sequential,
    selective_scan,
)

TINY = dict(size=16, channels=(4, 8, 8, 12))


def scan_inputs(length: int, d: int = 3, n: int = 5, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, d, generator=g)
    delta = F.softplus(torch.randn(batch, length, d, generator=g) - 1.0)
    A = -torch.rand(d, n, generator=g) * 4 - 0.1
    B = torch.randn(batch, length, n, generator=g)
    C = torch.randn(batch, length, n, generator=g)
    D = torch.randn(d, generator=g)
    return u, delta, A, B, C, D


@pytest.mark.parametrize("length", [1, 7, 64, 300])
def test_scan_forms_agree(length):
    args = scan_inputs(length)
    ref = scan_sequential(*args)
    scale = ref.abs().max()
    for y in (scan_parallel(*args), scan_chunked(*args, chunk=16), scan_chunked(*args, chunk=5),
              selective_scan(*args)):
        assert y.shape == ref.shape
        assert float((y - ref).abs().max() / scale) <= 1e-5


def test_scan_recurrence_by_hand():
    # One channel, one state: h_t = exp(dt a) h_{t-1} + dt u_t b, y_t = c h_t + d u_t.
    u = torch.tensor([[[1.0], [2.0], [0.0]]])
    delta = torch.full_like(u, 0.5)
    A, B, C, D = torch.tensor([[-2.0]]), torch.ones(1, 3, 1), torch.ones(1, 3, 1), torch.zeros(1)
    decay = torch.exp(torch.tensor(-1.0))
    h1 = 0.5
    h2 = decay * h1 + 1.0
    h3 = decay * h2
    expected = torch.tensor([h1, h2, h3]).reshape(1, 3, 1)
    for fn in (scan_sequential, scan_parallel, scan_chunked):
        assert torch.allclose(fn(u, delta, A, B, C, D), expected, atol=1e-6)


def test_scan_gradients_agree():
    grads = []
    for fn in (scan_sequential, lambda *a: scan_chunked(*a, chunk=8), scan_parallel):
        args = [t.clone().requires_grad_(True) for t in scan_inputs(50)]
        fn(*args).square().sum().backward()
        grads.append([a.grad for a in args])
    for other in grads[1:]:
        for g_ref, g in zip(grads[0], other, strict=True):
            assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_scan_unknown_mode():
    with pytest.raises(ValueError, match="blelloch"):
        selective_scan(*scan_inputs(4), mode="blelloch")


def test_deform_conv_zero_offsets_is_depthwise_conv():
    x, w = torch.randn(2, 3, 9, 11), torch.randn(3, 1, 3, 3)
    out = deform_conv_depthwise(x, torch.zeros(2, 18, 9, 11), w)
    assert torch.allclose(out, F.conv2d(x, w, padding=1, groups=3), atol=1e-5)


def test_deform_conv_integer_offset_shifts_the_input():
    # Every tap moved one pixel right (dx = +1) equals the conv of the input shifted left
    # (away from column 0, where the DCN reads x[0] and the shifted conv its zero padding).
    x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3)
    offsets = torch.zeros(1, 18, 8, 8)
    offsets[:, 1::2] = 1.0
    shifted = F.pad(x[..., 1:], (0, 1))
    expected = F.conv2d(shifted, w, padding=1, groups=2)
    assert torch.allclose(deform_conv_depthwise(x, offsets, w)[..., 1:], expected[..., 1:],
                          atol=1e-5)


def test_deform_conv_matches_onnx_runtime_deformconv(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    c, h, w = 4, 10, 12
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, c, h, w, generator=g)
    offsets = torch.randn(1, 18, h, w, generator=g) * 2.0
    weight = torch.randn(c, 1, 3, 3, generator=g)
    node = helper.make_node("DeformConv", ["x", "w", "offset"], ["y"], group=c,
                            offset_group=1, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "dcn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [c, 1, 3, 3]),
         helper.make_tensor_value_info("offset", TensorProto.FLOAT, [1, 18, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, h, w])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    try:
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # an ORT build without the DeformConv kernel
        pytest.skip(f"ONNX Runtime has no DeformConv here: {exc}")
    (ref,) = session.run(None, {"x": x.numpy(), "w": weight.numpy(),
                                "offset": offsets.numpy()})
    ours = deform_conv_depthwise(x, offsets, weight)
    assert float((ours - torch.from_numpy(ref)).abs().max()) < 1e-4
    del onnx


def test_dcb_starts_on_the_regular_grid():
    block = DCB(4).train()
    offsets = block.offset(torch.randn(2, 4, 8, 8))
    assert float(offsets.abs().max()) == 0.0


def test_pmb_shape_and_channel_check():
    assert PMB(8)(torch.randn(2, 8, 4, 6)).shape == (2, 8, 4, 6)
    with pytest.raises(ValueError, match="divisible by 4"):
        PMB(6)


@pytest.mark.parametrize("in_channels", [1, 4])
def test_ascseg_shapes_and_heads(in_channels):
    torch.manual_seed(0)
    model = ASCSeg(ASCSegConfig(in_channels=in_channels, **TINY)).eval()
    x = torch.rand(2, in_channels, 16, 16)
    with torch.no_grad():
        logits = model(x)["logits"]
        deep = model.forward_deep(x)
    assert logits.shape == (2, 3, 16, 16)
    assert len(deep) == 4 and all(d.shape == (2, 3, 16, 16) for d in deep)
    assert torch.allclose(deep[0], logits, atol=1e-6)


def test_ascseg_scan_mode_does_not_change_the_output():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 16)
    outs = []
    for mode in ("sequential", "chunked", "parallel"):
        torch.manual_seed(1)
        model = ASCSeg(ASCSegConfig(scan_mode=mode, **TINY)).eval()
        with torch.no_grad():
            outs.append(model(x)["logits"])
    assert all(torch.allclose(o, outs[0], atol=1e-5) for o in outs[1:])


def test_seed_sized_model_has_the_papers_parameter_count():
    # ARCHITECTURES §3.6: 0.2186 M at [8, 16, 24, 32] with one output map; ours has 3 classes
    # and BN on the DCB offsets as specified.
    n = sum(p.numel() for p in ASCSeg(ASCSegConfig(in_channels=3)).parameters())
    assert 0.20e6 < n < 0.24e6


@pytest.mark.parametrize(("field", "value", "match"), [
    ("size", 20, "multiple of 8"), ("channels", (8, 6), "divisible by 4"),
    ("scan_mode", "fast", "scan_mode"), ("in_channels", 0, "in_channels")])
def test_config_errors(field, value, match):
    with pytest.raises(InputError, match=match):
        ASCSegConfig(**{**TINY, field: value})


def test_checkpoint_round_trip(tmp_path):
    config = ASCSegConfig(in_channels=4, **TINY)
    model = ASCSeg(config).eval()
    path = save_checkpoint(tmp_path / "a.pt", "ascseg", model, config)
    loaded = load_model(path)
    assert loaded.config == config
    x = torch.rand(1, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x)["logits"], model(x)["logits"])


def test_onnx_runtime_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    from regseg.engines.base import make_engine

    torch.manual_seed(0)
    model = ASCSeg(ASCSegConfig(in_channels=4, **TINY)).eval()
    x = torch.rand(1, 4, 16, 16)
    with torch.no_grad():
        ref = model(x)["logits"]
    engine = make_engine(model, {"image": (1, 4, 16, 16)}, backend="onnxrt",
                         cache_dir=tmp_path, threads=1, warmup=0)
    got = engine({"image": x})["logits"]
    assert float((got - ref).abs().max()) <= 1e-4


@pytest.mark.gpu
def test_parallel_scan_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    args = scan_inputs(4096, d=16, n=16)
    ref = scan_chunked(*args)
    got = selective_scan(*[a.cuda() for a in args]).cpu()  # auto: parallel on CUDA
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
