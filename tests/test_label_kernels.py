"""The compiled label kernels against their torch twins: labels at frame size from the network's
logits (regseg.kernels.labels_up) and the MRI labels on a plane, through a displacement or not
(regseg.kernels.plane_labels)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regseg import spatial
from regseg.engines.segmentation import argmax_labels
from regseg.kernels import labels_up, plane_labels

needs_numba = pytest.mark.skipif(not (labels_up.available() and plane_labels.available()),
                                 reason="numba not installed")


def _smooth_logits(rng, k=3, size=(128, 128), noise=0.3) -> torch.Tensor:
    """Network-like logits: smooth regions of each class with noisy boundaries."""
    low = torch.from_numpy(rng.normal(size=(1, k, 8, 8)).astype(np.float32)) * 6
    up = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return up + torch.from_numpy(rng.normal(size=(1, k, *size)).astype(np.float32)) * noise


def _twin(logits: torch.Tensor, hw) -> tuple[np.ndarray, np.ndarray]:
    """The torch labels and, per pixel, the lead of the best class over the second."""
    up = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
    top = torch.topk(up[0], 2, dim=0).values
    return argmax_labels(up)[0].numpy(), (top[0] - top[1]).numpy()


@needs_numba
@pytest.mark.parametrize("hw", [(480, 640), (256, 256), (128, 128), (100, 90), (617, 820)])
def test_labels_up_equals_the_torch_argmax_of_the_upsampled_logits(hw):
    rng = np.random.default_rng(hw[0])
    for noise, scale in ((0.3, 1.0), (3.0, 1.0), (0.3, 3e3)):  # smooth, ragged, huge logits
        logits = _smooth_logits(rng, noise=noise) * scale
        ref, lead = _twin(logits, hw)
        got = labels_up.labels_up(logits[0].numpy(), hw)
        assert got.dtype == np.uint8 and got.shape == hw
        differ = got != ref
        assert not differ[lead > 1e-4 * scale].any()  # equal wherever the twin's is not a tie
        assert differ.mean() <= 1e-5
        assert len(np.unique(ref)) == 3  # every class present: boundaries were exercised


@needs_numba
def test_labels_up_owned_cells_and_ties():
    logits = np.zeros((3, 4, 4), np.float32)  # a three-way tie everywhere: the lowest class
    assert (labels_up.labels_up(logits, (9, 7)) == 0).all()
    logits[2, :, :2] = 5.0  # class 2 owns the left half of the grid
    got = labels_up.labels_up(logits, (16, 16))
    ref, _ = _twin(torch.from_numpy(logits)[None], (16, 16))
    assert (got == ref).all() and (got[:, :4] == 2).all() and (got[:, -4:] == 0).all()


def _plane_twin(labels: torch.Tensor, m: torch.Tensor, hw, ddf=None) -> np.ndarray:
    i, j = spatial.pixel_axes(*hw)
    if ddf is not None:
        i, j = i + ddf[1, :, :, None], j + ddf[0, :, :, None]
    grid = spatial.axes_grid(m, i, j)
    return F.grid_sample(labels.float()[None, None], grid[None, None], mode="nearest",
                         padding_mode="zeros", align_corners=False)[0, 0, 0].to(
                             torch.uint8).numpy()


@needs_numba
@pytest.mark.parametrize("hw", [(48, 64), (33, 20)])
def test_plane_labels_equal_grid_sample_nearest_with_and_without_a_field(hw):
    rng = np.random.default_rng(7)
    labels = torch.from_numpy(rng.integers(0, 3, (9, 11, 13)).astype(np.uint8))
    for trial in range(12):  # planes across the volume, over its border and outside it
        m = np.zeros((3, 3), np.float32)
        m[:, 0] = rng.normal(0, 2.0 / hw[1], 3)
        m[:, 1] = rng.normal(0, 2.0 / hw[0], 3)
        m[:, 2] = rng.uniform(-1.5, 1.5, 3) if trial % 3 == 2 else rng.uniform(-0.5, 0.5, 3)
        ddf = torch.from_numpy(rng.normal(0, 3.0, (2, *hw)).astype(np.float32))
        for field in (None, ddf):
            ref = _plane_twin(labels, torch.from_numpy(m), hw, field)
            got = plane_labels.labels_on_plane(labels.numpy(), m, hw,
                                               None if field is None else field.numpy())
            assert got.dtype == np.uint8 and (got == ref).all(), (trial, field is None)


@needs_numba
def test_plane_labels_half_voxel_points_nan_and_a_wrong_field():
    labels = np.arange(1, 5, dtype=np.uint8).reshape(1, 1, 4)  # one row of four voxels
    # x = i / 4 - 1: the unnormalised index (i - 1) / 2 hits the .5 ties, which round to even
    m = np.array([[0.25, 0, -1], [0, 0, 0], [0, 0, 0]], np.float32)
    ref = _plane_twin(torch.from_numpy(labels), torch.from_numpy(m), (1, 10))
    got = plane_labels.labels_on_plane(labels, m, (1, 10))
    assert (got == ref).all() and ref.tolist() == [[1, 1, 1, 2, 3, 3, 3, 4, 0, 0]]
    field = np.full((2, 1, 10), np.nan, np.float32)
    assert (plane_labels.labels_on_plane(labels, m, (1, 10), field) == 0).all()
    with pytest.raises(ValueError, match=r"ddf shape \(2, 1, 9\), expected \(2, 1, 10\)"):
        plane_labels.labels_on_plane(labels, m, (1, 10), field[:, :, :9])


@needs_numba
def test_the_label_kernels_switch_off_alone(monkeypatch):
    """REGSEG_NUMBA_LABELS=0 sends the chain to the torch twins (a bench's A/B), and leaves the
    other compiled kernels on; REGSEG_NUMBA=0 turns every kernel off."""
    from regseg.kernels import plane_sample, switched_on

    monkeypatch.setenv("REGSEG_NUMBA_LABELS", "0")
    assert not labels_up.available() and not plane_labels.available()
    assert switched_on() and plane_sample.available() == switched_on("lc2")
    monkeypatch.setenv("REGSEG_NUMBA_LABELS", "1")
    monkeypatch.setenv("REGSEG_NUMBA", "0")
    assert not switched_on("labels") and not switched_on()


@needs_numba
def test_the_chain_segments_and_warps_the_same_with_and_without_the_kernels(monkeypatch):
    """FrameChain.segment and capture.warp_labels (the live chain's callers) give the torch
    twins' labels at a PLUS-sized frame."""
    from regseg.sim.phantom import make_phantom
    from regseg.stream.build import build_engine
    from regseg.stream.capture import warp_labels
    from regseg.stream.chain import FrameChain
    from regseg.stream.context import build_context

    phantom = make_phantom(0)
    context = build_context(phantom.mri, phantom.labels)
    chain = FrameChain(context, build_engine(backend="eager", threads=1), (480, 640))
    rng = np.random.default_rng(5)
    logits = _smooth_logits(rng)
    plane = np.eye(4)
    plane[:3, :3] *= 0.08
    plane[:3, 3] = context.centre_mm - plane[:3, :3] @ np.array([320.0, 240.0, 0.0])
    field = torch.from_numpy(rng.normal(0, 2.0, (1, 2, 480, 640)).astype(np.float32))
    fast = (chain.segment(logits).numpy(), warp_labels(context, plane, (480, 640)),
            warp_labels(context, plane, (480, 640), field))
    monkeypatch.setenv("REGSEG_NUMBA_LABELS", "0")
    slow = (chain.segment(logits).numpy(), warp_labels(context, plane, (480, 640)),
            warp_labels(context, plane, (480, 640), field))
    assert all((a == b).all() for a, b in zip(fast, slow, strict=True))
    assert (slow[1] > 0).mean() > 0.05 and len(np.unique(slow[0])) == 3  # not empty
