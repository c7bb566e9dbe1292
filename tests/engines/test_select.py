"""``auto``: every candidate built, checked against eager and timed; the choice printed and kept."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from regseg.engines.base import make_engine
from regseg.engines.select import select_engine
from regseg.errors import EngineError


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.conv(image)}


SHAPES = {"image": (1, 1, 32, 32)}


def test_auto_on_cpu_builds_checks_times_and_reports(tmp_path):
    torch.manual_seed(0)
    report = io.StringIO()
    engine = select_engine(_Net(), SHAPES, device=torch.device("cpu"), cache_dir=tmp_path,
                           candidates=("eager", "onnxrt", "tensorrt"), repeats=3, report=report)
    selection = engine.info["selection"]
    assert selection["chosen"] == engine.backend in ("eager", "onnxrt")
    assert selection["candidates"]["tensorrt"]["status"] == "failed"
    assert "CUDA" in selection["candidates"]["tensorrt"]["reason"]
    for name in ("eager", "onnxrt"):
        assert selection["candidates"][name]["status"] == "ok"
        assert selection["candidates"][name]["p50_ms"] > 0
    assert f"chose {engine.backend}" in report.getvalue()
    assert "tensorrt failed" in report.getvalue()


def test_auto_through_make_engine(tmp_path):
    engine = make_engine(_Net(), SHAPES, backend="auto", cache_dir=tmp_path, warmup=1)
    assert engine.info["selection"]["chosen"] == engine.backend


def test_auto_with_nothing_that_builds_says_why():
    with pytest.raises(EngineError, match="tensorrt: backend tensorrt needs a CUDA device"):
        select_engine(_Net(), SHAPES, device=torch.device("cpu"), candidates=("tensorrt",),
                      report=None)
