"""LC2 (regseg.lc2_score; the search in regseg.lc2): the score is the share of the ultrasound's
local variance a linear fit of the MRI and its gradient explains; the CPU (OpenCV) and torch paths
agree; the in-plane search finds a known misregistration on a synthetic pair and does not apply a
move beyond its limit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import regseg.lc2 as search
import regseg.lc2_score as score
from regseg import metrics, spatial
from regseg.kernels import lc2_maps
from regseg.lc2 import (
    FrameScorer,
    Lc2Config,
    PlaneSlice,
    UltrasoundWindows,
    _plane_slice,
    box_mean,
    gradient_magnitude,
    in_plane_move,
    lc2,
    refine_in_plane,
)


def smooth_field(shape, seed, sigma=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1, *shape), generator=g)
    k = 2 * sigma + 1
    for _ in range(3):
        x = F.avg_pool3d(x, k, 1, sigma) if len(shape) == 3 else F.avg_pool2d(x, k, 1, sigma)
    return x


def test_box_mean_is_the_windowed_weighted_mean():
    g = torch.Generator().manual_seed(0)
    x, w = torch.rand(9, 11, generator=g), (torch.rand(9, 11, generator=g) > 0.3).float()
    got = box_mean(x * w, w, 2)
    for j, i in ((0, 0), (4, 5), (8, 10), (3, 1)):
        win = (slice(max(0, j - 2), j + 3), slice(max(0, i - 2), i + 3))
        expect = (x[win] * w[win]).sum() / w[win].sum().clamp_min(1e-6)
        assert got[j, i] == pytest.approx(float(expect), abs=1e-5)


def test_lc2_is_one_for_a_local_linear_combination_and_low_for_noise():
    m = smooth_field((64, 64), 1)[0, 0] * 40  # contrast well above the fits' 1e-6 ridge
    g = gradient_magnitude(m)
    us = 0.7 * m + 3.0 * g + 0.2
    w = torch.ones(64, 64)
    assert float(lc2(us, m[None], w, 4)[0]) > 0.999
    # any gain and offset of the ultrasound: the same score (the fits absorb them)
    assert float(lc2(5 * us + 7, m[None], w, 4)[0]) > 0.999
    noise = torch.rand(64, 64, generator=torch.Generator().manual_seed(2))
    assert float(lc2(noise, m[None], w, 4)[0]) < 0.15
    # outside the weight nothing counts: a region of noise masked out leaves the score at 1
    mixed, w2 = us.clone(), w.clone()
    mixed[:, 40:], w2[:, 40:] = noise[:, 40:], 0.0
    assert float(lc2(mixed, m[None], w2, 4)[0]) > 0.999


def test_cpu_and_torch_paths_agree():
    us = smooth_field((40, 50), 3)[0, 0] + 0.1 * torch.rand(40, 50)
    mri = torch.cat([smooth_field((40, 50), s)[0] for s in (4, 5, 6)])
    w = torch.ones(40, 50)
    w[:, :5] = 0
    windows = UltrasoundWindows(us, w, 3)
    fast = windows.score(mri)  # float32 on the CPU: the OpenCV path
    slow = UltrasoundWindows(us.double(), w.double(), 3).score(mri.double())  # torch path
    assert torch.allclose(fast.double(), slow, atol=2e-4)
    with pytest.raises(ValueError, match="grid"):
        windows.score(mri[:, :10])


def synthetic_case():
    """An MRI volume (smooth texture, 1 mm voxels) and a frame that is a local linear combination
    of the MRI and its gradient on a known plane (a fan-shaped imaged area)."""
    vol = smooth_field((40, 96, 96), 7, sigma=2)[0, 0]  # (D, H, W): k, j, i
    mri = (vol - vol.min()) / (vol.max() - vol.min())
    voxel_to_world = np.eye(4)
    world_to_voxel = np.eye(4)
    # frame pixels of 0.5 mm, 128 x 128, on the plane k = 20, centred in the volume
    true = np.eye(4)
    true[:3, 0], true[:3, 1] = [0.5, 0, 0], [0, 0.5, 0]
    true[:3, 3] = [16.0, 16.0, 20.0]
    mri_t = mri[None, None].float()
    m = spatial.reslice(mri_t, world_to_voxel, true, (128, 128))[0, 0]
    us = 0.6 * m + 6.0 * gradient_magnitude(m) + 0.05 * torch.rand(128, 128)
    us = (255 * us / us.max()).clamp(1, 255)
    jj, ii = np.mgrid[:128, :128]
    us[torch.from_numpy(np.hypot(ii - 64, jj + 20) > 150)] = 0  # outside the "fan"
    return mri_t, voxel_to_world, world_to_voxel, true, us.numpy().astype(np.uint8)


def test_search_finds_a_known_in_plane_error():
    mri, _, w2v, true, pixels = synthetic_case()
    centre = np.array([64.0, 64.0])
    wrong = true @ in_plane_move(np.array([1.5, -1.2]), 2.0, centre, (0.5, 0.5))
    pts = np.argwhere(pixels > 0)[::37, ::-1]
    before = metrics.tre_mm(wrong, true, pts)
    found = refine_in_plane(pixels, wrong, mri, w2v, centre)
    after = metrics.tre_mm(found.image_to_mri, true, pts)
    assert before > 1.5
    assert found.applied and found.score > found.score_start
    assert after < 0.4, (before, after, found)
    assert math.isclose(found.move_mm, np.hypot(*found.shift_mm)
                        + math.radians(abs(found.rotation_deg)) * 10.0)


def test_a_move_beyond_the_limit_is_not_applied():
    mri, _, w2v, true, pixels = synthetic_case()
    centre = np.array([64.0, 64.0])
    wrong = true @ in_plane_move(np.array([2.0, 0.0]), 0.0, centre, (0.5, 0.5))
    found = refine_in_plane(pixels, wrong, mri, w2v, centre, Lc2Config(max_move_mm=0.5))
    assert not found.applied
    assert np.array_equal(found.image_to_mri, wrong) and found.score == found.score_start
    assert found.move_mm > 0.5


def test_in_plane_move_is_rigid_in_mm_with_anisotropic_pixels():
    spacing = (0.2, 0.5)
    move = in_plane_move(np.array([1.0, -2.0]), 30.0, np.array([10.0, 20.0]), spacing)
    s = np.diag([spacing[0], spacing[1]])
    lin_mm = s @ move[:2, :2] @ np.linalg.inv(s)
    assert np.allclose(lin_mm.T @ lin_mm, np.eye(2))  # a rotation in mm
    c = move @ np.array([10.0, 20.0, 0.0, 1.0])
    assert np.allclose(s @ (c[:2] - [10.0, 20.0]), [1.0, -2.0])  # the centre moves by the shift


def test_frame_scorer_refuses_a_tiny_frame_and_config_is_checked():
    mri, _, w2v, true, _ = synthetic_case()
    with pytest.raises(ValueError, match="too small"):
        FrameScorer(np.full((6, 6), 9, np.uint8), true, mri, w2v, Lc2Config())
    for bad in ({"grid_mm": 0.0}, {"radius_mm": float("nan")}, {"min_step": 3.0},
                {"max_rounds": 0}, {"slice_margin_mm": -1.0}):
        with pytest.raises(ValueError, match="Lc2Config"):
            Lc2Config(**bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_search_matches_the_cpu_one():
    """On a CUDA device the score takes the torch path (no OpenCV): same search, same answer."""
    mri, _, w2v, true, pixels = synthetic_case()
    centre = np.array([64.0, 64.0])
    wrong = true @ in_plane_move(np.array([1.5, -1.2]), 2.0, centre, (0.5, 0.5))
    cpu = refine_in_plane(pixels, wrong, mri, w2v, centre)
    gpu = refine_in_plane(pixels, wrong, mri.cuda(), w2v, centre)
    assert gpu.applied == cpu.applied
    assert np.allclose(gpu.image_to_mri, cpu.image_to_mri, atol=1e-3)
    assert gpu.score == pytest.approx(cpu.score, abs=1e-3)


def test_the_torch_path_gives_the_same_search(monkeypatch):
    """The path CUDA tensors take (torch's grid_sample, cumulative sums in torch), run on the CPU:
    the same answer."""
    import regseg.lc2 as search_module
    import regseg.lc2_score as lc2_module

    mri, _, w2v, true, pixels = synthetic_case()
    centre = np.array([64.0, 64.0])
    wrong = true @ in_plane_move(np.array([1.5, -1.2]), 2.0, centre, (0.5, 0.5))
    fast = refine_in_plane(pixels, wrong, mri, w2v, centre)
    monkeypatch.setattr(lc2_module, "OPENCV_ON_CPU", False)
    monkeypatch.setattr(search_module, "NUMBA_ON_CPU", False)
    slow = refine_in_plane(pixels, wrong, mri, w2v, centre)
    assert slow.applied == fast.applied and slow.rounds == fast.rounds
    assert np.allclose(slow.image_to_mri, fast.image_to_mri, atol=1e-6)
    assert slow.score == pytest.approx(fast.score, abs=1e-4)


def test_the_compiled_reslice_equals_torchs(monkeypatch):
    """FrameScorer's candidates through regseg.kernels.plane_sample (the CPU default) and
    through torch's grid_sample: the same MRI to float32 rounding, the same search."""
    import regseg.lc2 as search_module
    from regseg.kernels import plane_sample

    if not plane_sample.available():
        pytest.skip("numba not installed")
    mri, _, w2v, true, pixels = synthetic_case()
    centre = np.array([64.0, 64.0])
    planes = [true @ in_plane_move(np.array(s), a, centre, (0.5, 0.5))
              for s, a in (((0.0, 0.0), 0.0), ((1.3, -2.1), 3.0), ((-40.0, 25.0), -6.0))]
    compiled = FrameScorer(pixels, true, mri, w2v, Lc2Config())
    wrong = true @ in_plane_move(np.array([1.5, -1.2]), 2.0, centre, (0.5, 0.5))
    fast = refine_in_plane(pixels, wrong, mri, w2v, centre)
    monkeypatch.setattr(search_module, "NUMBA_ON_CPU", False)
    reference = FrameScorer(pixels, true, mri, w2v, Lc2Config())
    assert compiled._host_volume is not None and reference._host_volume is None
    assert torch.allclose(compiled.resliced(planes), reference.resliced(planes), atol=1e-5)
    slow = refine_in_plane(pixels, wrong, mri, w2v, centre)
    assert slow.applied == fast.applied and slow.rounds == fast.rounds
    assert np.allclose(slow.image_to_mri, fast.image_to_mri, atol=1e-6)


def _slice_and_scorers(margin_mm=12.0):
    mri, _, w2v, true, pixels = synthetic_case()
    config = Lc2Config(plane_slice=True, slice_margin_mm=margin_mm)
    sliced = _plane_slice(pixels, true, mri, w2v, config)
    with_slice = FrameScorer(pixels, true, mri, w2v, config, plane_slice=sliced)
    volume = FrameScorer(pixels, true, mri, w2v, Lc2Config(plane_slice=False))
    return true, with_slice, volume


def test_the_plane_slice_resamples_in_plane_moves_like_the_volume(monkeypatch):
    """In-plane candidates come from the slice (2-D resampling), not the volume: the same MRI
    (here exactly: 1 mm voxels on a voxel-aligned plane are bilinear on a 0.25 mm lattice)."""
    true, with_slice, volume = _slice_and_scorers()
    assert isinstance(with_slice.slice, PlaneSlice) and volume.slice is None
    centre = np.array([64.0, 64.0])
    planes = [true @ in_plane_move(np.array(s), a, centre, (0.5, 0.5))
              for s, a in (((0.0, 0.0), 0.0), ((1.3, -2.1), 3.0), ((-4.0, 2.5), -6.0))]
    b = volume.resliced(planes)

    def no_volume(planes):
        raise AssertionError("an in-plane candidate was resliced from the volume")

    monkeypatch.setattr(with_slice, "_from_volume", no_volume)
    a = with_slice.resliced(planes)
    rms = ((a - b) ** 2).mean((1, 2)).sqrt() / b.std((1, 2))
    assert (rms < 1e-3).all(), rms


def test_out_of_plane_and_far_candidates_are_resliced_from_the_volume():
    true, with_slice, volume = _slice_and_scorers(margin_mm=2.0)
    tilt = np.eye(4)
    tilt[2, 0] = 0.01  # leaves the plane
    far = in_plane_move(np.array([5.0, 0.0]), 0.0, np.zeros(2), (0.5, 0.5))  # beyond 2 mm
    near = in_plane_move(np.array([0.5, 0.0]), 0.0, np.zeros(2), (0.5, 0.5))
    planes = [true @ tilt, true @ far, true @ near]
    got, ref = with_slice.resliced(planes), volume.resliced(planes)
    assert torch.equal(got[:2], ref[:2])  # exactly the volume's
    assert not torch.equal(got[2], ref[2]) and torch.allclose(got[2], ref[2], atol=0.05)


def test_the_opencv_and_torch_resampling_of_the_slice_agree(monkeypatch):
    import regseg.lc2_score as lc2_module

    mri, _, w2v, true, pixels = synthetic_case()
    centre = np.array([64.0, 64.0])
    planes = [true @ in_plane_move(np.array([1.1, 0.4]), 2.5, centre, (0.5, 0.5))]
    sliced = Lc2Config(plane_slice=True)
    fast = FrameScorer(pixels, true, mri, w2v, sliced,
                       plane_slice=_plane_slice(pixels, true, mri, w2v, sliced))
    monkeypatch.setattr(lc2_module, "OPENCV_ON_CPU", False)
    slow = FrameScorer(pixels, true, mri, w2v, sliced,
                       plane_slice=_plane_slice(pixels, true, mri, w2v, sliced))
    assert fast.slice._host is not None and slow.slice._host is None
    assert torch.allclose(fast.resliced(planes), slow.resliced(planes), atol=1e-5)


def test_the_plane_slice_finds_the_known_error_too():
    mri, _, w2v, true, pixels = synthetic_case()
    centre = np.array([64.0, 64.0])
    wrong = true @ in_plane_move(np.array([1.5, -1.2]), 2.0, centre, (0.5, 0.5))
    pts = np.argwhere(pixels > 0)[::37, ::-1]
    assert _plane_slice(pixels, wrong, mri, w2v, Lc2Config()) is None  # not the default
    found = refine_in_plane(pixels, wrong, mri, w2v, centre, Lc2Config(plane_slice=True))
    assert found.applied and metrics.tre_mm(found.image_to_mri, true, pts) < 0.4


def test_on_an_oblique_plane_the_slice_is_within_two_percent_of_the_volume():
    """Off the voxel grid the second interpolation shows: a small difference, bounded."""
    mri, _, w2v, true, pixels = synthetic_case()
    a = math.radians(25.0)
    tilt = np.eye(4)
    tilt[1:3, 1:3] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    oblique = true.copy()
    oblique[:3, :3] = tilt[:3, :3] @ true[:3, :3]
    oblique[:3, 3] = [16.3, 18.7, 10.4]
    config = Lc2Config(plane_slice=True)
    scorer = FrameScorer(pixels, oblique, mri, w2v, config,
                         plane_slice=_plane_slice(pixels, oblique, mri, w2v, config))
    volume = FrameScorer(pixels, oblique, mri, w2v, Lc2Config(plane_slice=False))
    planes = [oblique @ in_plane_move(np.array([0.7, -1.9]), 4.0, np.array([64.0, 64.0]),
                                      (0.5, 0.5))]
    got, ref = scorer.resliced(planes), volume.resliced(planes)
    rms = float(((got - ref) ** 2).mean().sqrt() / ref.std())
    assert 1e-5 < rms < 0.02, rms


def test_the_significance_guard_keeps_a_real_match_and_refuses_speckle():
    """A refinement is applied only when its LC2 clearly beats the MRI displaced by 12 mm: the
    synthetic frame (the MRI's own structure) passes by far; a frame of pure noise, where any
    plane fits about as badly, is refused even though the search found a 'better' pose."""
    mri, _, w2v, true, pixels = synthetic_case()
    centre = np.array([64.0, 64.0])
    wrong = true @ in_plane_move(np.array([1.5, -1.2]), 2.0, centre, (0.5, 0.5))
    found = refine_in_plane(pixels, wrong, mri, w2v, centre)
    assert found.applied and found.significance > 2 * Lc2Config().min_significance
    rng = np.random.default_rng(5)
    noise = np.where(pixels > 0, rng.integers(1, 256, pixels.shape), 0).astype(np.uint8)
    refused = refine_in_plane(noise, wrong, mri, w2v, centre)
    assert refused.score_start > 0 and refused.significance < Lc2Config().min_significance
    assert not refused.applied and np.array_equal(refused.image_to_mri, wrong)
    unguarded = refine_in_plane(noise, wrong, mri, w2v, centre, Lc2Config(min_significance=0.0))
    assert unguarded.applied  # without the guard the noise "match" would have been applied
    assert math.isnan(unguarded.significance)  # not computed when the guard is off
    with pytest.raises(ValueError, match="min_significance"):
        Lc2Config(min_significance=-1.0)


def test_the_six_parameter_search_recovers_an_out_of_plane_error():
    """A pose off by 2 mm along the normal and 3 deg of tilt (plus a little in plane): the in-plane
    search cannot undo it; with ``out_of_plane`` the search moves the plane back to the truth."""
    from regseg.lc2 import rigid_move

    mri, _, w2v, true, pixels = synthetic_case()
    centre = np.array([64.0, 64.0])
    normal = float(np.linalg.norm(true[:3, 2]))
    error = np.array([0.8, -0.6, 1.0, 2.0, 3.0, -2.0])
    wrong = true @ rigid_move(error, centre, (0.5, 0.5), normal)
    pts = np.argwhere(pixels > 0)[::37, ::-1]
    before = metrics.tre_mm(wrong, true, pts)
    flat = refine_in_plane(pixels, wrong, mri, w2v, centre)
    six = refine_in_plane(pixels, wrong, mri, w2v, centre,
                          Lc2Config(out_of_plane=True, max_rounds=40))
    after_flat = metrics.tre_mm(flat.image_to_mri, true, pts)
    after_six = metrics.tre_mm(six.image_to_mri, true, pts)
    assert before > 2.0 and six.applied
    assert after_six < 0.5 < after_flat, (before, after_flat, after_six)
    assert abs(six.out_of_plane[0]) > 1.0 and flat.out_of_plane == (0.0, 0.0, 0.0)


def test_rigid_move_without_out_of_plane_parts_is_the_in_plane_move_and_six_checks_its_input():
    from regseg.lc2 import rigid_move

    p = np.array([1.0, -2.0, 5.0, 0.0, 0.0, 0.0])
    assert np.array_equal(rigid_move(p, np.array([3.0, 4.0]), (0.2, 0.5), 1.0),
                          in_plane_move(p[:2], p[2], np.array([3.0, 4.0]), (0.2, 0.5)))
    mri, _, w2v, true, pixels = synthetic_case()
    six = Lc2Config(out_of_plane=True)
    with pytest.raises(ValueError, match="warm start"):
        refine_in_plane(pixels, true, mri, w2v, np.zeros(2), six, warm=np.zeros(3))
    flat_plane = true.copy()
    flat_plane[:3, 2] = 0.0
    with pytest.raises(ValueError, match="third axis"):
        refine_in_plane(pixels, flat_plane, mri, w2v, np.zeros(2), six)


# --- the compiled per-pixel kernels (regseg.kernels.lc2_maps) against their numpy/torch twin: the
# same maps and shares (to the bit where the twin's arithmetic is numpy's), the same scores to
# float32 rounding, and a search through them that takes the same steps

needs_numba = pytest.mark.skipif(not lc2_maps.available(), reason="numba not installed")


def _images(seed=0, b=3, h=23, w=31):
    rng = np.random.default_rng(seed)
    mri = rng.random((b, h, w), dtype=np.float32)
    weight = (rng.random((h, w)) > 0.25).astype(np.float32)
    wu = (rng.random((h, w), dtype=np.float32) * weight).astype(np.float32)
    return mri, weight, wu


def _numpy_gradient(m: np.ndarray) -> np.ndarray:
    """regseg.lc2_score.gradient_magnitude's formula in numpy float32."""
    gy, gx = np.zeros_like(m), np.zeros_like(m)
    gy[:, 1:-1] = np.float32(0.5) * (m[:, 2:] - m[:, :-2])
    gx[:, :, 1:-1] = np.float32(0.5) * (m[:, :, 2:] - m[:, :, :-2])
    gy[:, 0], gy[:, -1] = m[:, 1] - m[:, 0], m[:, -1] - m[:, -2]
    gx[:, :, 0], gx[:, :, -1] = m[:, :, 1] - m[:, :, 0], m[:, :, -1] - m[:, :, -2]
    return np.sqrt(gx * gx + gy * gy)


@needs_numba
def test_the_maps_are_the_twins():
    mri, weight, wu = _images()
    got = lc2_maps.window_maps(mri, weight, wu)
    assert got.shape == (7, *mri.shape) and got.dtype == np.float32
    # with numpy's square root the same bits; torch's differs from it in the last bit at most
    exact = np.stack(score._window_maps(mri, _numpy_gradient(mri), weight, wu))
    assert np.array_equal(got, exact)
    g = score.gradient_magnitude(torch.from_numpy(mri)).numpy()
    twin = np.stack(score._window_maps(mri, g, weight, wu))
    assert np.allclose(got, twin, rtol=3e-7, atol=0)


@needs_numba
def test_the_share_is_the_twins_to_the_bit():
    """On the window sums of a real frame and its candidates (as _score_cv2 makes them)."""
    import cv2

    mri, _, w2v, true, pixels = synthetic_case()
    scorer = FrameScorer(pixels, true, mri, w2v, Lc2Config())
    planes = [true @ in_plane_move(np.array([s, -s]), s, np.array([64.0, 64.0]), (0.5, 0.5))
              for s in (0.0, 1.0, 3.0)]
    c, k = scorer.windows._host, 2 * scorer.radius + 1
    maps = lc2_maps.window_maps(scorer.resliced(planes).numpy(), c["w"], c["wu"])
    sums = np.empty_like(maps)
    for src, dst in zip(maps.reshape(-1, *maps.shape[2:]), sums.reshape(-1, *sums.shape[2:]),
                        strict=True):
        cv2.boxFilter(src, -1, (k, k), dst=dst, normalize=False, borderType=cv2.BORDER_CONSTANT)
    got = lc2_maps.explained(sums, c["den"], c["mu"], c["v_u"], c["inside"])
    share = score._share_explained(sums / c["den"], c["mu"], c["v_u"], c["inside"], 1.0)
    assert np.isfinite(share).all() and (share > 0).all()
    assert np.array_equal(got.sum((-2, -1)), share)
    assert (got[:, c["inside"] == 0] == 0).all()


@needs_numba
def test_a_nan_window_stays_nan_as_in_the_twin():
    """A window whose fit is 0 / 0 makes the twin's score NaN; the kernel's too."""
    sums = np.zeros((7, 1, 2, 2), np.float32)  # det = eps^2 > 0: finite
    one = np.ones((2, 2), np.float32)
    assert np.isfinite(lc2_maps.explained(sums, one, 0 * one, one, one)).all()
    sums[2, 0, 0, 0] = sums[3, 0, 0, 0] = np.float32(-1e-6)  # vm = vg = 0: det 0, numerator 0
    got = lc2_maps.explained(sums, one, 0 * one, one, one)
    twin = score._share_explained(sums, 0 * one, one, one, 1.0)
    assert np.isnan(got[0, 0, 0]) and np.isnan(twin[0])


@needs_numba
def test_scores_and_search_match_the_twin(monkeypatch):
    mri, _, w2v, true, pixels = synthetic_case()
    centre = np.array([64.0, 64.0])
    planes = [true @ in_plane_move(np.array(s), a, centre, (0.5, 0.5))
              for s, a in (((0.0, 0.0), 0.0), ((1.3, -2.1), 3.0), ((-4.0, 2.5), -6.0))]
    scorer = FrameScorer(pixels, true, mri, w2v, Lc2Config())
    wrong = true @ in_plane_move(np.array([1.5, -1.2]), 2.0, centre, (0.5, 0.5))
    fast_scores = scorer.scores(planes).numpy()
    fast = refine_in_plane(pixels, wrong, mri, w2v, centre)
    monkeypatch.setattr(score, "NUMBA_ON_CPU", False)
    monkeypatch.setattr(search, "RESLICE_INTERIOR", False)  # the whole path before session 22
    assert np.allclose(scorer.scores(planes).numpy(), fast_scores, rtol=1e-6, atol=0)
    slow = refine_in_plane(pixels, wrong, mri, w2v, centre)
    assert slow.applied == fast.applied and slow.rounds == fast.rounds
    assert np.array_equal(slow.image_to_mri, fast.image_to_mri)
    assert slow.significance == pytest.approx(fast.significance, rel=1e-6)
    assert fast.applied  # the case is one the search corrects (tests/test_lc2.py)


def test_the_switch_off_leaves_the_twin(monkeypatch):
    """REGSEG_NUMBA=0 (or no numba): the numpy/torch path, as before session 22."""
    monkeypatch.setenv("REGSEG_NUMBA", "0")
    assert not lc2_maps.available()
    mri, _, w2v, true, pixels = synthetic_case()
    scorer = FrameScorer(pixels, true, mri, w2v, Lc2Config())
    called = []
    monkeypatch.setattr(lc2_maps, "window_maps", lambda *a: called.append(a))
    assert np.isfinite(scorer.scores([true]).numpy()).all() and not called


def test_a_multi_start_from_no_move_is_the_single_search_and_keeps_the_most_significant():
    """``starts``: a full search from each move; [no move] is the cold search to the bit, and a
    start far outside the basin does not displace the one that found the alignment."""
    mri, _, w2v, true, pixels = synthetic_case()
    centre = np.array([64.0, 64.0])
    wrong = true @ in_plane_move(np.array([1.5, -1.2]), 2.0, centre, (0.5, 0.5))
    cold = refine_in_plane(pixels, wrong, mri, w2v, centre)
    one = refine_in_plane(pixels, wrong, mri, w2v, centre, starts=[np.zeros(3)])
    assert np.array_equal(one.image_to_mri, cold.image_to_mri)
    assert one.significance == cold.significance and one.move_mm == cold.move_mm
    two = refine_in_plane(pixels, wrong, mri, w2v, centre,
                          starts=[np.array([14.0, 14.0, 0.0]), np.zeros(3)],
                          config=Lc2Config(max_move_mm=30.0))
    pts = np.argwhere(pixels > 0)[::37, ::-1]
    assert two.applied and metrics.tre_mm(two.image_to_mri, true, pts) < 0.4
    assert two.rounds > cold.rounds  # both were searched
    with pytest.raises(ValueError, match="starts is empty"):
        refine_in_plane(pixels, wrong, mri, w2v, centre, starts=[])
    with pytest.raises(ValueError, match="exclusive"):
        refine_in_plane(pixels, wrong, mri, w2v, centre, starts=[np.zeros(3)],
                        warm=np.zeros(3))


def test_a_multi_start_finds_what_a_start_outside_the_basin_misses():
    mri, _, w2v, true, pixels = synthetic_case()
    centre = np.array([64.0, 64.0])
    wrong = true @ in_plane_move(np.array([9.0, 0.0]), 0.0, centre, (0.5, 0.5))
    pts = np.argwhere(pixels > 0)[::37, ::-1]
    config = Lc2Config(max_move_mm=12.0)
    cold = refine_in_plane(pixels, wrong, mri, w2v, centre, config)
    starts = [np.array([dx, dy, 0.0]) for dx, dy in ((6, 0), (-6, 0), (0, 6), (0, -6))]
    assert not cold.applied and cold.significance < 1.5  # 9 mm is outside its basin here
    multi = refine_in_plane(pixels, wrong, mri, w2v, centre, config, starts=starts)
    assert multi.applied and metrics.tre_mm(multi.image_to_mri, true, pts) < 0.5
    assert multi.significance >= cold.significance
