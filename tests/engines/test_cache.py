"""The artifact cache: keyed by content, hit on the same build, miss on any change."""

from __future__ import annotations

import hashlib
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


def test_code_hash_follows_the_source_of_the_model_and_what_it_imports(tmp_path, monkeypatch):
    """An edit to the code that computes a model (its layers' modules, or a regseg module they
    import from, e.g. regseg.spatial) changes the key: the graph exported before is not served."""
    import sys

    from regseg.engines.cache import code_hash
    from regseg.models.registry import build_model

    model = build_model("plcreg", ndim=2, size=(16, 16), channels=(4, 8), heads=2, window=(4, 4),
                        moving_channels=3, fixed_channels=1, shared_encoder=False)
    base = code_hash(model)
    assert base == code_hash(model)  # deterministic
    for name in ("regseg.models.plcreg_blocks", "regseg.spatial"):  # own module, imported one
        module = sys.modules[name]
        edited = tmp_path / f"{name}.py"
        edited.write_bytes(open(module.__file__, "rb").read() + b"\n# an edit\n")
        with monkeypatch.context() as m:
            m.setattr(module, "__file__", str(edited))
            assert code_hash(model) != base, name
    assert code_hash(model) == base
    assert code_hash(_net()) == hashlib.sha256().hexdigest()  # torch layers only: nothing of ours
    cpu = torch.device("cpu")
    keyed, fields = cache_key("abc", {"x": (1,)}, precision="fp32", backend="onnxrt", device=cpu,
                              code=base)
    plain, _ = cache_key("abc", {"x": (1,)}, precision="fp32", backend="onnxrt", device=cpu)
    assert fields["code"] == base and keyed != plain


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


def _fetch(cache, content=b"artifact"):
    key, fields = cache_key("abc", {"x": (1,)}, precision="fp32", backend="onnxrt",
                            device=torch.device("cpu"))
    return cache.fetch("onnxrt", key, fields, "model.onnx", lambda p: p.write_bytes(content))


@pytest.mark.parametrize("tamper", ["changed", "truncated", "removed_extra", "added",
                                    "no_digest"])
def test_entry_whose_files_changed_is_rebuilt_and_says_so(tmp_path, caplog, tamper):
    cache = ArtifactCache(tmp_path)
    path, hit = _fetch(cache)
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert set(manifest["sha256"]) == {"model.onnx"}
    if tamper == "changed":
        path.write_bytes(b"artifacT")  # same size, one byte different
    elif tamper == "truncated":
        path.write_bytes(b"arti")
    elif tamper == "removed_extra":  # an entry that had a second file, now gone
        manifest["sha256"]["model.onnx.data"] = "0" * 64
        manifest_path.write_text(json.dumps(manifest))
    elif tamper == "added":
        (path.parent / "model.onnx.data").write_bytes(b"stray")
    else:
        del manifest["sha256"]
        manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        again, hit = _fetch(cache)
    assert not hit and again.read_bytes() == b"artifact"
    assert cache.last.startswith("rebuilt: ") and cache.rebuilt == 1
    assert "rebuilding it" in caplog.text and caplog.text.count("rebuilding") == 1
    _, hit = _fetch(cache)  # the rebuilt entry is whole again
    assert hit and cache.last == "hit"


def test_tampered_onnx_file_is_rebuilt_not_run(tmp_path):
    """Before: an ONNX file swapped in the cache was run silently (Dice 0.985 -> 0). Here the
    cached file is replaced by another network's export: the engine rebuilds and matches eager."""
    shapes = {"image": (1, 1, 8, 8)}
    first = make_engine(_net(0), shapes, backend="onnxrt", cache_dir=tmp_path, warmup=1)
    other = make_engine(_net(1), shapes, backend="onnxrt", cache_dir=tmp_path, warmup=1)
    artifact = first.info["artifact"]
    with open(other.info["artifact"], "rb") as src, open(artifact, "wb") as dst:
        dst.write(src.read())
    again = make_engine(_net(0), shapes, backend="onnxrt", cache_dir=tmp_path, warmup=1)
    assert again.info["cache"].startswith("rebuilt: model.onnx changed")
    image = torch.randn(shapes["image"])
    with torch.no_grad():
        expected = _net(0)(image)["logits"]
    assert torch.allclose(again({"image": image})["logits"], expected, atol=1e-4)
