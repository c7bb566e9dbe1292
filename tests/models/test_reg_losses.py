"""The registration losses' fast separable box filter and MIND against their definitions."""

import pytest
import torch
import torch.nn.functional as F

from regseg.models import reg_losses


def reference_box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """The definition: replicate-pad, then the mean over a window^ndim box at every voxel."""
    ndim = x.ndim - 2
    pad = window // 2
    padded = F.pad(x, [pad] * (2 * ndim), mode="replicate")
    return (F.avg_pool2d if ndim == 2 else F.avg_pool3d)(padded, window, stride=1)


def reference_shift(x: torch.Tensor, axis: int, step: int) -> torch.Tensor:
    """The definition: ``x[clamp(i + step)]`` along spatial ``axis`` (replicated edges)."""
    n = x.shape[2 + axis]
    index = (torch.arange(n) + step).clamp(0, n - 1)
    return x.index_select(2 + axis, index)


def reference_mind(image: torch.Tensor, radius: int = 1, dilation: int = 2,
                   eps: float = 1e-6) -> torch.Tensor:
    ndim = image.ndim - 2
    dist = torch.cat([reference_box_mean((image - reference_shift(image, a, s * dilation)) ** 2,
                                         2 * radius + 1)
                      for a in range(ndim) for s in (-1, 1)], dim=1)
    desc = torch.exp(-dist / dist.mean(dim=1, keepdim=True).clamp_min(eps))
    return desc / desc.amax(dim=1, keepdim=True).clamp_min(eps)


SHAPES = [(2, 3, 17, 23), (1, 2, 9, 12, 14)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [3, 9])
def test_box_mean_is_the_box_mean_with_and_without_grad(shape, window):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    want = reference_box_mean(x, window)
    assert torch.allclose(reg_losses._box_mean(x, window), want, atol=1e-6)
    xr = x.clone().requires_grad_(True)
    got = reg_losses._box_mean(xr, window)
    assert torch.allclose(got, want, atol=1e-6)
    weights = torch.rand(*want.shape, generator=torch.Generator().manual_seed(1))
    (got * weights).sum().backward()
    xw = x.clone().requires_grad_(True)
    (reference_box_mean(xw, window) * weights).sum().backward()
    assert torch.allclose(xr.grad, xw.grad, atol=1e-5)
    assert x.equal(xr.detach())  # the input is never written


@pytest.mark.parametrize("shape", [(2, 1, 31, 27), (1, 1, 15, 18, 21)])
def test_mind_matches_its_definition_values_and_gradient(shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(2))
    want = reference_mind(x)
    kept = x.clone()
    assert torch.allclose(reg_losses.mind_descriptor(x), want, atol=1e-5)
    assert x.equal(kept)
    with torch.no_grad():
        assert torch.allclose(reg_losses.mind_descriptor(x), want, atol=1e-5)
    xr = x.clone().requires_grad_(True)
    reg_losses.mind_descriptor(xr).square().sum().backward()
    xw = x.clone().requires_grad_(True)
    reference_mind(xw).square().sum().backward()
    assert torch.allclose(xr.grad, xw.grad, rtol=1e-4, atol=1e-4 * float(xw.grad.abs().max()))
    assert float(xw.grad.abs().max()) > 0


def test_lncc_of_an_image_with_itself_is_minus_one_and_less_for_noise():
    x = torch.rand(1, 1, 12, 14, 16, generator=torch.Generator().manual_seed(3))
    assert float(reg_losses.lncc_loss(x, x)) == pytest.approx(-1.0, abs=5e-3)
    y = torch.rand(1, 1, 12, 14, 16, generator=torch.Generator().manual_seed(4))
    assert float(reg_losses.lncc_loss(x, y)) > -0.5


@pytest.mark.parametrize("shape", [(1, 1, 2, 9, 3), (1, 1, 1, 5, 6), (2, 1, 3, 2)])
def test_mind_and_box_mean_on_axes_shorter_than_their_reach(shape):
    """An axis no longer than the dilation or the box's half width takes the padded path; the
    values are still the definition's."""
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(reg_losses.mind_descriptor(x), reference_mind(x), atol=1e-5)
        assert torch.allclose(reg_losses._box_mean(x, 9), reference_box_mean(x, 9), atol=1e-6)
