"""Capture range (regseg.stream.capture): composed refinement, multi-start, temporal filter.

A stand-in engine with a known, limited behaviour replaces AlignSegNet: it moves the MRI gland's
centroid a fixed fraction of the way to the gland on the frame (the frame is the true label plane
drawn as an image), and optionally sees nothing beyond a reach. So what refinement and multi-start
must achieve is known exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from regseg import spatial
from regseg.sim.phantom import make_phantom
from regseg.stream.capture import (
    Capture,
    MultiStart,
    TemporalFilter,
    compose_thetas,
    start_thetas,
)
from regseg.stream.context import build_context, untracked_plane
from regseg.stream.pipeline import FrameChain, plane_matrices
from regseg.types import Frame

HW = (128, 128)
SPACING = (0.4, 0.4)


class CentroidEngine:
    """FusionEngine stand-in: theta translates by ``gain`` x (MRI gland centroid - frame gland
    centroid), normalised; nothing (identity) when that offset exceeds ``reach``. Logits segment
    the frame: bright is gland."""

    def __init__(self, size: tuple[int, int] = (64, 64), gain: float = 0.5,
                 reach: float | None = None, batch: int = 1) -> None:
        self.size, self.gain, self.reach, self.batch = size, gain, reach, batch
        self.device = torch.device("cpu")
        self.calls = 0

    def _centroid(self, mask: torch.Tensor) -> torch.Tensor:  # (B, h, w) -> (B, 2) as (x, y)
        h, w = mask.shape[-2:]
        x = (2 * torch.arange(w) + 1) / w - 1
        y = (2 * torch.arange(h) + 1) / h - 1
        total = mask.sum((1, 2)).clamp(min=1e-6)
        return torch.stack([(mask * x).sum((1, 2)) / total,
                            (mask * y[:, None]).sum((1, 2)) / total], 1)

    def __call__(self, trus, mri, mri_labels):
        self.calls += 1
        assert trus.shape[0] == mri.shape[0] == mri_labels.shape[0] == self.batch
        gland = (trus[:, 0] > 0.5).float()
        d = self._centroid(mri_labels[:, 0]) - self._centroid(gland)
        if self.reach is not None:
            d = torch.where(d.norm(dim=1, keepdim=True) <= self.reach, d, torch.zeros_like(d))
        theta = torch.eye(2, 3).repeat(self.batch, 1, 1)
        theta[:, :, 2] = self.gain * d
        t = trus[:, 0]
        logits = torch.stack([1 - 2 * t, 2 * t - 1, torch.full_like(t, -10.0)], 1)
        return {"theta": theta, "logits": logits}


@pytest.fixture(scope="module")
def case():
    """Context, the true plane and a frame showing the true label plane as a bright gland."""
    phantom = make_phantom(0, spacing_mm=1.4)
    context = build_context(phantom.mri, phantom.labels)
    true = untracked_plane(context, HW, SPACING)
    lab = spatial.reslice(context.labels, context.world_to_voxel, true, HW, mode="nearest")
    pixels = ((lab[0, 0] > 0).numpy() * 255).astype(np.uint8)
    assert pixels.mean() > 10  # the plane cuts the gland
    return context, true, pixels


def shifted(true: np.ndarray, di: float, dj: float) -> np.ndarray:
    """A tracked plane off by (di, dj) pixels in plane: pixel p shows the truth at p + d."""
    e = np.eye(4)
    e[:2, 3] = (di, dj)
    return true @ e


def register(context, engine, pixels, tracked, k, multi_start=None):
    """(registered image_to_mri, theta) through a FrameChain with K iterations."""
    chain = FrameChain(context, engine, HW, refine_iterations=k, multi_start=multi_start)
    mats = torch.from_numpy(plane_matrices(context, tracked, HW, engine.size))
    with torch.inference_mode():
        theta, _ = chain.model(*chain.prepare(torch.from_numpy(pixels), mats), mats)
    theta = theta.double().numpy().reshape(2, 3)
    return tracked @ spatial.lift_2d(spatial.theta_to_pixel(theta, HW)), theta


def error_px(registered: np.ndarray, true: np.ndarray) -> float:
    """In-plane distance (frame pixels) between two planes at the frame centre."""
    c = np.array([[(HW[1] - 1) / 2, (HW[0] - 1) / 2, 0.0]])
    return float(np.linalg.norm(spatial.apply(registered, c) - spatial.apply(true, c))
                 / SPACING[0])


def test_compose_thetas_analytic():
    a = np.array([[1.0, 0.0, 0.1], [0.0, 1.0, -0.2]])
    r = math.radians(10.0)
    b = np.array([[math.cos(r), -math.sin(r), 0.05], [math.sin(r), math.cos(r), 0.0]])
    # shifts add
    assert np.allclose(compose_thetas(a, a), [[1, 0, 0.2], [0, 1, -0.4]])
    # output p of b's call shows a's plane at b p, which shows the tracked plane at a b p
    p = np.array([0.3, -0.4, 1.0])
    a3, b3 = np.vstack([a, [0, 0, 1]]), np.vstack([b, [0, 0, 1]])
    assert np.allclose(compose_thetas(a, b) @ p, (a3 @ (b3 @ p))[:2])
    # in frame pixels the composition is the same product (theta_to_pixel is a similarity)
    px = spatial.theta_to_pixel(compose_thetas(a, b), HW)
    assert np.allclose(px, spatial.theta_to_pixel(a, HW) @ spatial.theta_to_pixel(b, HW))


def test_refined_equals_registering_once_at_the_moved_plane(case):
    context, true, pixels = case
    tracked = shifted(true, 12.0, -8.0)
    engine = CentroidEngine(gain=0.5)
    twice, theta2 = register(context, engine, pixels, tracked, 2)
    once, theta1 = register(context, engine, pixels, tracked, 1)
    again, theta_b = register(context, engine, pixels, once, 1)  # a new call at the moved plane
    assert np.allclose(theta2, compose_thetas(theta1, theta_b), atol=1e-5)
    assert np.allclose(twice, again, atol=1e-3)


def test_refinement_converges_with_iterations(case):
    context, true, pixels = case
    tracked = shifted(true, 15.0, 10.0)  # 18 px = 7.2 mm
    start = error_px(tracked, true)
    errors = []
    for k in (1, 2, 3, 5):
        engine = CentroidEngine(gain=0.5)
        registered, _ = register(context, engine, pixels, tracked, k)
        assert engine.calls == k
        errors.append(error_px(registered, true))
    # each call halves the offset: 1/2, 1/4, 1/8, 1/32 of it (centroids on a 64-px grid)
    for e, k in zip(errors, (1, 2, 3, 5), strict=True):
        assert e == pytest.approx(start / 2**k, abs=1.0)
    assert errors[-1] < 1.5 < start / 8


def test_calls_before_the_last_use_the_theta_engine(case):
    context, true, pixels = case
    tracked = shifted(true, 15.0, 10.0)
    full, fast = CentroidEngine(gain=0.5), CentroidEngine(gain=0.5)
    chain = FrameChain(context, full, HW, refine_iterations=3, theta_engine=fast)
    mats = torch.from_numpy(plane_matrices(context, tracked, HW, full.size))
    with torch.inference_mode():
        theta, _ = chain.model(*chain.prepare(torch.from_numpy(pixels), mats), mats)
    assert (fast.calls, full.calls) == (2, 1)
    _, ref = register(context, CentroidEngine(gain=0.5), pixels, tracked, 3)
    assert np.allclose(theta.numpy().reshape(2, 3), ref, atol=1e-6)


def test_multi_start_recovers_beyond_reach(case):
    context, true, pixels = case
    # the tracked plane is 20 px (8 mm) off; the engine sees only offsets < 0.15 (4.8 px)
    tracked = shifted(true, 20.0, 0.0)
    single = CentroidEngine(gain=1.0, reach=0.15)
    registered, _ = register(context, single, pixels, tracked, 2)
    assert error_px(registered, true) > 15.0  # out of reach: nothing moves
    starts = start_thetas(shift=0.3)  # 0.3 normalised = 19.2 px: one start lands in reach
    multi = MultiStart(CentroidEngine(gain=1.0, reach=0.15, batch=len(starts)), starts)
    registered, _ = register(context, single, pixels, tracked, 2, multi_start=multi)
    assert error_px(registered, true) < 1.5


def test_multi_start_keeps_identity_when_it_is_right(case):
    context, true, pixels = case
    starts = start_thetas(shift=0.3)
    multi = MultiStart(CentroidEngine(gain=1.0, reach=0.15, batch=len(starts)), starts)
    registered, _ = register(context, CentroidEngine(gain=1.0, reach=0.15), pixels,
                             shifted(true, 2.0, 1.0), 1, multi_start=multi)
    assert error_px(registered, true) < 1.0


def test_multi_start_checks_its_starts():
    with pytest.raises(Exception, match="identity"):
        MultiStart(CentroidEngine(batch=2), start_thetas()[1:3])
    with pytest.raises(Exception, match="batch"):
        MultiStart(CentroidEngine(batch=3), start_thetas())


def _frame(tracked: np.ndarray | None, t_ms: float) -> Frame:
    return Frame(seq=0, acquired_ns=int(t_ms * 1e6), pixels=np.zeros(HW, np.uint8),
                 spacing_mm=SPACING, image_to_reference=tracked)


def _translation(di: float, dj: float) -> np.ndarray:
    c = np.eye(3)
    c[:2, 2] = (di, dj)
    return c


def test_temporal_filter_steady_then_jump_then_reset():
    f = TemporalFilter(window=5, reset_mm=5.0)
    tracked = np.eye(4)
    rng = np.random.default_rng(0)
    jumps = []
    for i in range(20):  # a steady correction of (10, 0) px with 0.5 px of noise
        assert f.prior(tracked, HW, i / 30).shape == (3, 3)
        c = _translation(10 + rng.normal(0, 0.5), rng.normal(0, 0.5))
        filtered, jump = f.update(tracked, c, HW, SPACING, i / 30)
        jumps.append(jump)
    assert math.isnan(jumps[0])  # no history
    assert max(jumps[1:]) < 0.8  # 0.5 px noise = 0.2 mm per axis
    assert filtered[0, 2] == pytest.approx(10, abs=0.5)
    # one frame 25 px (10 mm) away: a large jump, and the filter barely moves (median)
    prior = f.prior(tracked, HW, 20 / 30)
    assert prior[0, 2] == pytest.approx(filtered[0, 2])
    filtered_after, jump = f.update(tracked, _translation(35, 0), HW, SPACING, 20 / 30)
    assert jump == pytest.approx(10.0, abs=0.5)
    assert abs(filtered_after[0, 2] - filtered[0, 2]) < 1.0
    # the probe moved 20 mm between frames: reset, prior identity, next jump NaN
    moved = np.eye(4)
    moved[0, 3] = 20.0
    assert np.allclose(f.prior(moved, HW, 21 / 30), np.eye(3))
    assert f.resets == 1
    _, jump = f.update(moved, _translation(3, 0), HW, SPACING, 21 / 30)
    assert math.isnan(jump)
    # no pose: reset too
    assert np.allclose(f.prior(None, HW, 22 / 30), np.eye(3))
    # a long gap: reset
    f.update(moved, _translation(3, 0), HW, SPACING, 23 / 30)
    assert np.allclose(f.prior(moved, HW, 5.0), np.eye(3))


def test_temporal_filter_follows_a_real_change_and_ignores_a_bad_first_frame():
    f = TemporalFilter(window=5)
    tracked = np.eye(4)
    corrections = [_translation(35, 0)] + [_translation(10, 0)] * 4 + [_translation(22.5, 0)] * 3
    out = []
    for i, c in enumerate(corrections):
        f.prior(tracked, HW, i / 30)
        out.append(f.update(tracked, c, HW, SPACING, i / 30))
    assert out[2][0][0, 2] == pytest.approx(10)  # median of 35, 10, 10
    assert out[4][1] == pytest.approx(0.0)  # steady again
    assert out[5][1] == pytest.approx(5.0)  # 12.5 px = 5 mm: this frame jumped
    assert out[6][0][0, 2] == pytest.approx(10)  # two changed frames of five: not yet
    assert out[7][0][0, 2] == pytest.approx(22.5)  # three: followed


def test_capture_without_warm_start_filters_but_starts_at_the_tracked_plane():
    cap = Capture(temporal=TemporalFilter(window=2))
    tracked = np.eye(4)
    registered = tracked @ spatial.lift_2d(_translation(5, -2))
    cap.start(_frame(tracked, 0), tracked)
    cap.finish(_frame(tracked, 0), tracked, registered)
    assert np.allclose(cap.start(_frame(tracked, 33), tracked), np.eye(3))
    out, jump = cap.finish(_frame(tracked, 33), tracked,
                           tracked @ spatial.lift_2d(_translation(7, -2)))
    assert out[0, 3] == pytest.approx(6.0) and jump == pytest.approx(2 * SPACING[1])


def test_capture_warm_start_and_finish():
    cap = Capture(temporal=TemporalFilter(window=1), warm_start=True)
    tracked = np.eye(4)
    tracked[:3, :3] *= 0.4
    assert np.allclose(cap.start(_frame(tracked, 0), tracked), np.eye(3))
    registered = tracked @ spatial.lift_2d(_translation(5, -2))
    out, jump = cap.finish(_frame(tracked, 0), tracked, registered)
    assert np.allclose(out, registered) and math.isnan(jump)
    # the next frame starts where this one ended (alpha 1: no smoothing)
    assert np.allclose(cap.start(_frame(tracked, 33), tracked), _translation(5, -2))
    out, jump = cap.finish(_frame(tracked, 33), tracked, registered)
    assert jump == pytest.approx(0.0, abs=1e-9)
    # an untracked frame: nothing filtered, state dropped
    out, jump = cap.finish(_frame(None, 66), tracked, registered)
    assert math.isnan(jump)
    assert np.allclose(cap.start(_frame(tracked, 99), tracked), np.eye(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refinement_on_cuda_matches_cpu_and_runs_in_a_graph(case):
    from regseg.stream.device_ring import DeviceRing

    context, true, pixels = case
    tracked = shifted(true, 15.0, 10.0)
    cpu, _ = register(context, CentroidEngine(gain=0.5), pixels, tracked, 3)
    dev = torch.device("cuda")
    gpu_ctx = build_context_on(context, dev)
    engine = CentroidEngine(gain=0.5)
    engine.device = dev
    chain = FrameChain(gpu_ctx, _OnDevice(engine, dev), HW, refine_iterations=3)
    ring = DeviceRing(chain, slots=2, cuda_graph=True)
    frame = Frame(seq=0, acquired_ns=0, pixels=pixels, spacing_mm=SPACING,
                  image_to_reference=tracked)
    ring.push(frame, tracked, plane_matrices(gpu_ctx, tracked, HW, engine.size))
    (_, _, theta, _, _, _, _), = ring.flush()
    gpu = tracked @ spatial.lift_2d(spatial.theta_to_pixel(theta.reshape(2, 3).astype(float), HW))
    assert np.allclose(gpu, cpu, atol=1e-3)


def build_context_on(context, device):
    from dataclasses import replace

    return replace(context, mri=context.mri.to(device), labels=context.labels.to(device),
                   labels_float=context.labels_float.to(device))


class _OnDevice:
    """CentroidEngine on a CUDA device (its tensors made there); graph-capturable."""

    def __init__(self, engine: CentroidEngine, device: torch.device) -> None:
        self.inner, self.device, self.size, self.batch = engine, device, engine.size, 1
        self.engine = type("E", (), {"info": {}})()

    def __call__(self, trus, mri, mri_labels):
        h, w = trus.shape[-2:]
        x = (2 * torch.arange(w, device=self.device) + 1) / w - 1
        y = (2 * torch.arange(h, device=self.device) + 1) / h - 1

        def centroid(m):
            total = m.sum((1, 2)).clamp(min=1e-6)
            return torch.stack([(m * x).sum((1, 2)) / total,
                                (m * y[:, None]).sum((1, 2)) / total], 1)

        d = centroid(mri_labels[:, 0]) - centroid((trus[:, 0] > 0.5).float())
        theta = torch.cat([torch.eye(2, device=self.device)[None],
                           (self.inner.gain * d)[:, :, None]], 2)
        t = trus[:, 0]
        return {"theta": theta,
                "logits": torch.stack([1 - 2 * t, 2 * t - 1, torch.zeros_like(t)], 1)}


def test_build_capture_checks_iterations():
    from regseg.errors import InputError
    from regseg.stream.capture import build_capture

    with pytest.raises(InputError, match="--refine-iterations 0"):
        build_capture(0)
    with pytest.raises(InputError, match="--temporal-filter"):
        build_capture(1, temporal_filter="sometimes")
    cap = build_capture(1, temporal_filter="warm")
    assert cap.refine_iterations == 1 and cap.temporal is not None and cap.multi_start is None
    assert cap.warm_start and cap.theta_engine is None


def test_pipeline_publishes_the_refined_filtered_registration(case):
    """Through the Pipeline (CPU): K = 3 gives the chain's composed correction; the temporal
    filter reports jump_mm (NaN on the first frame) and the warm start moves the next frame's
    start."""
    from regseg.stream.pipeline import Pipeline

    context, true, pixels = case
    tracked = shifted(true, 15.0, 10.0)
    frames = [Frame(seq=i, acquired_ns=int(i * 33e6), pixels=pixels, spacing_mm=SPACING,
                    image_to_reference=tracked) for i in range(3)]
    ref, _ = register(context, CentroidEngine(gain=0.5), pixels, tracked, 3)
    pipe = Pipeline(context, CentroidEngine(gain=0.5),
                    capture=Capture(refine_iterations=3, temporal=TemporalFilter(window=1),
                                    warm_start=True))
    results = [pipe(f) for f in frames]
    assert np.allclose(spatial.invert(results[0].mri_to_image), ref, atol=1e-3)
    assert math.isnan(results[0].jump_mm) and math.isfinite(results[1].jump_mm)
    # warm: frame 2 started where frame 1 ended, so it is closer to the truth than frame 1
    errors = [error_px(spatial.invert(r.mri_to_image), true) for r in results]
    assert errors[2] < errors[0] - 1.0
    assert results[0].warped_labels.shape == HW
