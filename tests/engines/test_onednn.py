"""3-D convolutions routed to oneDNN give torch's own results, and only where they may."""

import pytest
import torch
from torch import nn

from regseg.engines import onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch has no oneDNN")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv3d(8, 8, 3, padding=1, groups=4),
                         nn.Conv3d(8, 4, 3, stride=2, padding=1, dilation=1),
                         nn.Conv3d(4, 4, 3, padding=1, padding_mode="replicate"),
                         nn.Conv2d(4, 4, 1)).eval()


def test_routed_convolutions_match_torch_and_state_dict_is_untouched():
    reference, routed = _net(), _net()
    assert onednn.prefer_onednn(routed) == 3  # zero-padded Conv3d only: not replicate, not 2-D
    assert list(routed.state_dict()) == list(reference.state_dict())
    x = torch.rand(1, 2, 12, 14, 10)
    body = nn.Sequential(*list(reference)[:5]), nn.Sequential(*list(routed)[:5])
    with torch.inference_mode():
        want, got = body[0](x), body[1](x)
    assert got.shape == want.shape == (1, 4, 6, 7, 5)
    assert torch.allclose(got, want, atol=1e-5)


def test_gradients_and_autocast_take_torchs_path():
    conv = nn.Conv3d(1, 2, 3, padding=1)
    onednn.prefer_onednn(conv)
    x = torch.rand(1, 1, 6, 6, 6, requires_grad=True)
    conv(x).sum().backward()  # oneDNN's op has no backward here: torch's own path must run
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x.detach()).dtype == torch.bfloat16


def test_the_eager_engine_routes_3d_models_on_cpu_fp32():
    from regseg.engines.eager import EagerEngine

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 3, 3, padding=1)

        def forward(self, image):
            return {"out": self.conv(image)}

    engine = EagerEngine(Model(), {"image": (1, 1, 8, 8, 8)}, device=torch.device("cpu"))
    assert engine.info["onednn_conv3d"] == 1
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        want = nn.functional.conv3d(x, engine.model.conv.weight, engine.model.conv.bias, padding=1)
    assert torch.allclose(engine({"image": x})["out"], want, atol=1e-5)


def test_routing_survives_copies_and_is_idempotent():
    import copy

    net = _net()
    assert onednn.prefer_onednn(net) == 3
    assert onednn.prefer_onednn(net) == 0  # already routed
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin[0].weight.mul_(2.0)
    x = torch.rand(1, 2, 6, 7, 5)
    with torch.inference_mode():
        want = nn.functional.conv3d(x, twin[0].weight, twin[0].bias, padding=1)
        assert torch.allclose(twin[0](x), want, atol=1e-5)  # the copy's own weights
        assert not torch.allclose(net[0](x), want, atol=1e-3)
