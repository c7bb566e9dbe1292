"""SegmentationEngine: bare-tensor networks behind the dict seam, label maps made one way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from regseg.engines.segmentation import SegmentationEngine
from regseg.models.layers import UNet2d


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return UNet2d(1, 3, (4, 8)).eval()


def test_labels_are_argmax_of_logits(net):
    engine = SegmentationEngine(net, (1, 1, 32, 32))
    x = torch.rand(1, 1, 32, 32)
    labels = engine(x)
    assert labels.dtype == torch.uint8 and tuple(labels.shape) == (1, 32, 32)
    with torch.no_grad():
        assert torch.equal(labels, net(x).argmax(1).to(torch.uint8))


def test_out_size_resamples_logits_first(net):
    engine = SegmentationEngine(net, (1, 1, 32, 32))
    labels = engine(torch.rand(1, 1, 32, 32), out_size=(64, 64))
    assert tuple(labels.shape) == (1, 64, 64) and int(labels.max()) <= 2


def test_onnxrt_labels_match_eager(net, tmp_path):
    x = torch.rand(1, 1, 32, 32)
    eager = SegmentationEngine(net, (1, 1, 32, 32))
    ort = SegmentationEngine(net, (1, 1, 32, 32), backend="onnxrt", cache_dir=tmp_path)
    assert torch.allclose(eager.logits(x), ort.logits(x), atol=1e-4)
    assert ort.info["backend"] == "onnxrt"


def test_dict_output_network_uses_key():
    class DictNet(nn.Module):
        def forward(self, image):
            return {"seg": torch.cat([image, 1 - image], dim=1), "other": image}

    engine = SegmentationEngine(DictNet(), (1, 1, 4, 4), key="seg")
    x = torch.zeros(1, 1, 4, 4)
    assert int(engine(x).max()) == 1  # channel 1 (= 1 - 0) wins everywhere


def test_argmax_labels_equals_argmax_with_ties():
    from regseg.engines.segmentation import argmax_labels

    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (2, 4, 16, 16), generator=g).float()  # many exact ties
    assert torch.equal(argmax_labels(logits), logits.argmax(dim=1).to(torch.uint8))
