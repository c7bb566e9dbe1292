"""The compiled trilinear sampler (regseg.kernels.trilinear) against torch's F.grid_sample."""

import threading

import pytest
import torch
import torch.nn.functional as F

from regseg import spatial
from regseg.kernels import trilinear

pytestmark = pytest.mark.skipif(not trilinear.available(), reason="numba not installed")


def _grid(shape, count, spread, seed):
    g = torch.Generator().manual_seed(seed)
    if count is None:  # near the identity, as squarings and warps sample
        axes = [torch.linspace(-1 + 1 / n, 1 - 1 / n, n) for n in shape]
        ident = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).flip(-1)[None]
        return ident + spread * torch.randn(ident.shape, generator=g)
    return (torch.rand(1, count, 1, 1, 3, generator=g) * 2 - 1) * spread


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize(("channels", "shape", "count", "spread"),
                         [(3, (6, 8, 5), None, 0.2), (2, (7, 5, 9), 300, 1.3),
                          (6, (4, 6, 5), 64, 0.9)])
def test_values_and_both_gradients_equal_torchs(padding, channels, shape, count, spread):
    image = torch.randn(1, channels, *shape, generator=torch.Generator().manual_seed(1))
    grid = _grid(shape, count, spread, 2)
    weights = torch.randn(F.grid_sample(image, grid, align_corners=False).shape,
                          generator=torch.Generator().manual_seed(3))
    got, want = [], []
    for sink, compiled in ((got, True), (want, False)):
        x, g = image.clone().requires_grad_(True), grid.clone().requires_grad_(True)
        with trilinear.enabled(compiled):
            out = spatial.grid_sample(x, g, mode="bilinear", padding_mode=padding,
                                      align_corners=False)
        (out * weights).sum().backward()
        sink.extend([out.detach(), x.grad, g.grad])
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())
    assert spread < 1 or padding == "zeros" or (got[2] == 0).any()  # clipped points: no gradient


def test_only_eligible_calls_and_only_when_enabled_use_the_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr(trilinear, "sample", lambda *a: calls.append(a) or torch.zeros(1))
    image, grid = torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 2, 2, 2, 3)
    spatial.grid_sample(image, grid, align_corners=False)
    assert not calls  # not enabled
    with trilinear.enabled():
        spatial.grid_sample(image, grid, mode="nearest", align_corners=False)
        spatial.grid_sample(image, grid, align_corners=True)
        spatial.grid_sample(image.double(), grid.double(), align_corners=False)
        spatial.grid_sample(image[:, :, 0], grid[:, 0, :, :, :2], align_corners=False)  # 2-D
        assert not calls
        spatial.grid_sample(image, grid, padding_mode="border", align_corners=False)
    assert len(calls) == 1
    with trilinear.enabled():
        assert trilinear.eligible(image, grid, "bilinear", "zeros", False)
    assert not trilinear.eligible(image, grid, "bilinear", "zeros", False)  # left the block


def test_another_thread_meanwhile_runs_torchs_sampler():
    """One launch at a time: a thread that finds the kernels busy samples through torch, with the
    same values."""
    image, grid = torch.rand(1, 2, 5, 6, 7), _grid((5, 6, 7), 100, 1.0, 4)
    want = F.grid_sample(image, grid, padding_mode="border", align_corners=False)
    results = []
    trilinear._LAUNCH.acquire()
    try:
        def worker():
            with trilinear.enabled():
                results.append(spatial.grid_sample(image, grid, padding_mode="border",
                                                   align_corners=False))
        t = threading.Thread(target=worker)
        t.start()
        t.join(30)
    finally:
        trilinear._LAUNCH.release()
    assert len(results) == 1 and torch.equal(results[0], want)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("REGSEG_NUMBA", "0")
    assert not trilinear.available()
    with trilinear.enabled():
        assert not trilinear.eligible(torch.rand(1, 1, 2, 2, 2), torch.zeros(1, 1, 1, 1, 3),
                                      "bilinear", "zeros", False)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_launch_leaves_torchs_thread_count_as_it_was(threads):
    """numba's OpenMP pool shares the runtime with torch: starting it once set torch's count to
    numba's (a live process at 1 thread found itself at 2, its chain twice as slow)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        image = torch.rand(1, 1, 4, 5, 6, requires_grad=True)
        grid = (2 * torch.rand(1, 7, 1, 1, 3) - 1).requires_grad_(True)
        with trilinear.enabled():
            spatial.grid_sample(image, grid, mode="bilinear", padding_mode="border",
                                align_corners=False).sum().backward()
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_a_2d_registration_engine_leaves_the_sampler_off(tmp_path):
    """The live deformable stage (a 2-D PLCReg) never registers volumes: no numba there."""
    from regseg.engines.registration import RegistrationEngine
    from regseg.models.checkpoint import save_checkpoint
    from regseg.models.plcreg import PLCReg, PLCRegConfig

    cfg = PLCRegConfig(ndim=2, size=(16, 16), channels=(4, 8), heads=2, window=(4, 4))
    weights = save_checkpoint(tmp_path / "tiny2d.pt", "plcreg", PLCReg(cfg), cfg)
    assert not RegistrationEngine(weights, affine_iterations=0).fast_sampler
