"""The artifact cache: keyed by content, hit on the same build, miss on any change."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from regseg.engines.base import make_engine
from regseg.engines.cache import ArtifactCache, cache_key, library_versions, weights_hash


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.norm = nn.BatchNorm2d(2)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.norm(self.conv(image))}


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _Net().eval()


def test_weights_hash_follows_content_not_identity():
    a, b = _net(0), _net(0)
    assert weights_hash(a) == weights_hash(b)
    with torch.no_grad():
        b.conv.weight[0, 0, 0, 0] += 1e-6
    assert weights_hash(a) != weights_hash(b)
    c = _net(0)
    c.norm.running_mean += 0.5  # buffers count: they change the outputs
    assert weights_hash(a) != weights_hash(c)


def test_key_covers_shapes_precision_backend_and_versions():
    h = weights_hash(_net())
    cpu = torch.device("cpu")
    base, fields = cache_key(h, {"image": (1, 1, 8, 8)}, precision="fp32", backend="onnxrt",
                             device=cpu)
    assert fields["versions"] == library_versions() and fields["versions"]["torch"]
    for change in ({"input_shapes": {"image": (1, 1, 16, 16)}}, {"precision": "bf16"},
                   {"backend": "tensorrt"}, {"extra": {"opset": 19}}):
        args = {"input_shapes": {"image": (1, 1, 8, 8)}, "precision": "fp32",
                "backend": "onnxrt", "extra": None} | change
        other, _ = cache_key(h, args["input_shapes"], precision=args["precision"],
                             backend=args["backend"], device=cpu, extra=args["extra"])
        assert other != base, change


def test_fetch_builds_once_then_hits(tmp_path):
    cache = ArtifactCache(tmp_path)
    calls = []

    def build(path):
        calls.append(path)
        path.write_bytes(b"artifact")

    key, fields = cache_key("abc", {"x": (1,)}, precision="fp32", backend="onnxrt",
                            device=torch.device("cpu"))
    path, hit = cache.fetch("onnxrt", key, fields, "model.onnx", build)
    assert not hit and path.read_bytes() == b"artifact"
    again, hit = cache.fetch("onnxrt", key, fields, "model.onnx", build)
    assert hit and again == path and len(calls) == 1
    assert (cache.hits, cache.misses) == (1, 1)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["key"] == key and manifest["backend"] == "onnxrt"
    assert not [p for p in tmp_path.rglob(".*") if p.is_dir()]  # no temporary folder left


def test_entry_with_another_key_is_rebuilt(tmp_path):
    cache = ArtifactCache(tmp_path)
    key, fields = cache_key("abc", {"x": (1,)}, precision="fp32", backend="onnxrt",
                            device=torch.device("cpu"))
    folder = cache.entry("onnxrt", key)
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"stale")
    (folder / "manifest.json").write_text(json.dumps({"key": "something else"}))
    path, hit = cache.fetch("onnxrt", key, fields, "model.onnx",
                            lambda p: p.write_bytes(b"fresh"))
    assert not hit and path.read_bytes() == b"fresh"


def test_failed_build_leaves_no_entry(tmp_path):
    cache = ArtifactCache(tmp_path)
    key, fields = cache_key("abc", {"x": (1,)}, precision="fp32", backend="onnxrt",
                            device=torch.device("cpu"))

    def fail(path):
        raise RuntimeError("exporter broke")

    with pytest.raises(RuntimeError, match="exporter broke"):
        cache.fetch("onnxrt", key, fields, "model.onnx", fail)
    assert not cache.entry("onnxrt", key).exists()


def test_onnxrt_engine_miss_then_hit_then_miss_on_new_weights(tmp_path):
    shapes = {"image": (1, 1, 8, 8)}
    first = make_engine(_net(0), shapes, backend="onnxrt", cache_dir=tmp_path, warmup=1)
    second = make_engine(_net(0), shapes, backend="onnxrt", cache_dir=tmp_path, warmup=1)
    third = make_engine(_net(1), shapes, backend="onnxrt", cache_dir=tmp_path, warmup=1)
    assert [e.info["cache"] for e in (first, second, third)] == ["miss", "hit", "miss"]
    assert first.info["artifact"] == second.info["artifact"] != third.info["artifact"]
