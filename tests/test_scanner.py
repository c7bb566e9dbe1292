"""Tests of the simulated TRUS scanner: frames, determinism, geometry, errors and ground truth."""

import dataclasses
import time

import numpy as np
import pytest
import torch

from regseg import spatial
from regseg.sim.bmode import convolve_along, psf_kernels
from regseg.sim.phantom import make_phantom
from regseg.sim.probe_path import SAGITTAL, TRANSVERSE, probe_plane, tracking_error
from regseg.sim.scanner import ScannerConfig, SimulatedScanner
from regseg.sim.volume_atlas import build_atlas, sample_atlas
from regseg.types import LESION, PROSTATE

EXACT = ScannerConfig(tracking_rot_deg=0.0, tracking_shift_mm=0.0, tracking_scale=0.0,
                      out_of_plane_mm=0.0, deform_mm=0.0, pressure_mm=0.0)


@pytest.fixture(scope="module")
def case():
    return make_phantom(0)


@pytest.fixture(scope="module")
def scanner(case):
    return SimulatedScanner(case, seed=0)


def _label_volume(case) -> torch.Tensor:
    return torch.from_numpy(case.labels.data.transpose(2, 1, 0).copy())[None, None]


def test_frame_fields_shapes_and_dtypes(scanner):
    f = scanner.frame(5)
    assert f.pixels.shape == (256, 256) and f.pixels.dtype == np.uint8
    assert f.spacing_mm == (0.2, 0.2)
    # The scanner's clock, seconds since 1970, as a real scanner stamps frames (frame 0 is not 0:
    # a 0 made the sinks fall back to the wall clock for frame 0 only, and the stream jumped).
    assert f.seq == 5 and f.source_ts - scanner.clock_origin_s == pytest.approx(5 / 30.0)
    assert abs(scanner.frame(0).source_ts - time.time()) < 3600
    assert f.image_to_reference.shape == (4, 4)
    assert f.truth.image_to_mri.shape == (4, 4)
    assert f.truth.labels.shape == (256, 256) and f.truth.labels.dtype == np.uint8
    assert set(np.unique(f.truth.labels)) <= {0, PROSTATE, LESION}
    assert scanner.frame(6).acquired_ns >= f.acquired_ns


def test_frames_are_deterministic_per_seed_and_index(case, scanner):
    twin = SimulatedScanner(case, seed=0)
    a, b = scanner.frame(17), twin.frame(17)
    assert np.array_equal(a.pixels, b.pixels)
    assert np.array_equal(a.truth.labels, b.truth.labels)
    assert np.array_equal(a.image_to_reference, b.image_to_reference)
    assert np.array_equal(a.truth.image_to_mri, b.truth.image_to_mri)
    assert not np.array_equal(a.pixels, scanner.frame(18).pixels)
    other = SimulatedScanner(case, seed=1).frame(17)
    assert not np.array_equal(a.pixels, other.pixels)
    assert not np.allclose(a.image_to_reference, other.image_to_reference)


def test_pixels_outside_the_fan_are_zero(scanner):
    mask = scanner.sector_mask
    assert mask.shape == (256, 256) and 0.4 < mask.mean() < 0.95
    assert not mask[0, 0] and not mask[0, -1] and mask[128, 128]
    for index in (0, 150, 400):
        pixels = scanner.frame(index).pixels
        assert np.all(pixels[~mask] == 0)
        assert np.mean(pixels[mask] > 0) > 0.8  # the fan is imaged, not blank


@pytest.mark.parametrize("index", [0, 80, 350, 520])
def test_without_errors_or_motion_truth_is_the_resliced_labels(case, index):
    scanner = SimulatedScanner(case, EXACT, seed=3)
    f = scanner.frame(index)
    assert np.array_equal(f.image_to_reference, f.truth.image_to_mri)
    expected = spatial.reslice(_label_volume(case), spatial.invert(case.labels.voxel_to_world),
                               f.truth.image_to_mri, (256, 256), mode="nearest")[0, 0].numpy()
    assert np.array_equal(f.truth.labels, expected)
    assert (f.truth.labels > 0).any()


def test_random_frame_without_errors_is_exact_too(case):
    f = SimulatedScanner(case, EXACT, seed=0).random_frame(np.random.default_rng(2))
    assert np.array_equal(f.image_to_reference, f.truth.image_to_mri)


def test_true_plane_is_rigid_with_the_fan_apex_on_the_probe_axis(scanner):
    cfg = scanner.config
    axis = scanner.axis
    for index in (0, 100, 320, 450):
        plane = scanner.frame(index).truth.image_to_mri
        cols = plane[:3, :3] / cfg.pixel_mm
        assert np.allclose(cols.T @ cols, np.eye(3), atol=1e-9)
        apex_px = np.array([127.5, (cfg.face_row_mm - cfg.probe_radius_mm) / cfg.pixel_mm, 0, 1])
        apex = (plane @ apex_px)[:3] - axis.origin
        off_axis = apex - (apex @ axis.direction) * axis.direction
        assert np.linalg.norm(off_axis) < 2.0  # only the small probe tilt moves it
        assert cols[:, 1] @ axis.anterior > np.cos(np.deg2rad(cfg.sweep_angle_deg + 5))


def test_session_sweeps_smoothly_and_alternates_modes(scanner):
    n = scanner.config.sweep_frames
    modes = [scanner.pose(i).mode for i in (0, n - 1, n, 2 * n - 1, 2 * n)]
    assert modes == [SAGITTAL, SAGITTAL, TRANSVERSE, TRANSVERSE, SAGITTAL]
    cfg = scanner.config
    corners = np.array([[0, 0, 0, 1], [255, 0, 0, 1], [0, 255, 0, 1], [255, 255, 0, 1]]).T

    def plane(i):
        return probe_plane(scanner.axis, scanner.pose(i), frame_hw=cfg.frame_hw,
                           pixel_mm=cfg.pixel_mm,
                           apex_to_top_mm=cfg.probe_radius_mm - cfg.face_row_mm)

    for i in range(0, 2 * n - 1):
        if i == n - 1:
            continue  # the switch from the sagittal to the transverse array
        step = np.linalg.norm((plane(i + 1) - plane(i)) @ corners, axis=0).max()
        assert step < 1.5, f"frame {i} -> {i + 1} moves {step:.2f} mm"
    angles = [scanner.pose(i).angle_deg for i in range(n)]
    assert max(angles) > 25.0 and min(angles) < -25.0


def _decompose(error: np.ndarray, hw=(256, 256)):
    """Rotation (deg), scales, centre shift (px) and out-of-plane shift (px) of a pixel error."""
    lin = error[:2, :2]
    rot = np.degrees(np.arctan2(lin[1, 0] - lin[0, 1], lin[0, 0] + lin[1, 1]))
    scales = np.linalg.svd(lin, compute_uv=False)
    c = np.array([(hw[1] - 1) / 2, (hw[0] - 1) / 2])
    shift = lin @ c + error[:2, 3] - c
    return rot, scales, shift, error[2, 3]


def test_tracking_error_stays_within_the_configured_bounds(scanner):
    cfg = scanner.config
    rots, shifts = [], []
    for index in range(0, 3000, 7):
        error = tracking_error(scanner.pose(index), cfg.frame_hw, cfg.pixel_mm)
        rot, scales, shift, normal = _decompose(error)
        assert abs(rot) <= cfg.tracking_rot_deg + 1e-9
        assert np.all(np.abs(scales - 1) <= cfg.tracking_scale + 1e-9)
        assert np.all(np.abs(shift) * cfg.pixel_mm <= cfg.tracking_shift_mm + 1e-9)
        assert abs(normal) * cfg.pixel_mm <= cfg.out_of_plane_mm + 1e-9
        assert np.allclose(error[2, :2], 0) and np.allclose(error[:2, 2], 0)
        rots.append(rot)
        shifts.append(np.abs(shift).max() * cfg.pixel_mm)
    assert np.ptp(rots) > 0.1 * cfg.tracking_rot_deg  # it drifts, it is not a constant
    assert max(shifts) > 0.1 * cfg.tracking_shift_mm
    # and the frames report it: image_to_reference = image_to_mri @ error
    f = scanner.frame(42)
    expected = tracking_error(scanner.pose(42), cfg.frame_hw, cfg.pixel_mm)
    assert np.allclose(np.linalg.inv(f.truth.image_to_mri) @ f.image_to_reference, expected)


def test_random_frame_errors_stay_within_bounds(scanner):
    rng = np.random.default_rng(0)
    cfg = scanner.config
    for _ in range(50):
        rot, scales, shift, normal = _decompose(
            tracking_error(scanner.path.random_pose(rng), cfg.frame_hw, cfg.pixel_mm))
        assert abs(rot) <= cfg.tracking_rot_deg and np.all(np.abs(scales - 1) <= cfg.tracking_scale)
        assert np.all(np.abs(shift) * cfg.pixel_mm <= cfg.tracking_shift_mm + 1e-9)


def test_prostate_is_in_view_in_most_frames(scanner):
    def seen(i: int) -> bool:
        return (scanner.frame(i).truth.labels[scanner.sector_mask] > 0).mean() > 0.02

    assert np.mean([seen(i) for i in range(0, 300, 10)]) > 0.8  # the first sagittal sweep
    assert np.mean([seen(i) for i in range(300, 600, 15)]) > 0.6  # the first transverse sweep


def test_random_frame_is_reproducible_for_an_rng_seed(scanner):
    a = scanner.random_frame(np.random.default_rng(11))
    b = scanner.random_frame(np.random.default_rng(11))
    c = scanner.random_frame(np.random.default_rng(12))
    assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.truth.labels, b.truth.labels)
    assert np.array_equal(a.image_to_reference, b.image_to_reference)
    assert not np.array_equal(a.pixels, c.pixels)


def test_lesion_is_hypoechoic_and_gland_brighter_than_urine(scanner):
    for index in range(0, 600, 10):
        f = scanner.frame(index)
        lesion = (f.truth.labels == LESION) & scanner.sector_mask
        if lesion.sum() > 200:
            gland = (f.truth.labels == PROSTATE) & scanner.sector_mask
            assert f.pixels[lesion].mean() < f.pixels[gland].mean() - 10
            return
    pytest.fail("no frame in the first 600 shows the lesion")


def test_probe_pressure_pushes_tissue_away_from_the_probe(case):
    still = SimulatedScanner(case, EXACT, seed=0).frame(0).truth.labels
    pressed = SimulatedScanner(case, dataclasses.replace(EXACT, pressure_mm=2.5),
                               seed=0).frame(0).truth.labels
    column = slice(120, 136)
    top_still = np.argmax((still[:, column] > 0).any(1))
    top_pressed = np.argmax((pressed[:, column] > 0).any(1))
    shift_mm = (top_pressed - top_still) * 0.2
    assert 0.2 < shift_mm <= 2.5


def test_convolve_along_matches_a_direct_convolution():
    axial, _ = psf_kernels(1.5, 2.0)
    x = torch.zeros(2, 21, 9)
    x[0, 10, 4] = 1.0
    out = convolve_along(x, axial, 1)
    assert torch.allclose(out[0, 10 - len(axial) // 2: 11 + len(axial) // 2, 4],
                          torch.tensor(axial, dtype=torch.float32))
    assert float(torch.tensor(axial).square().sum()) == pytest.approx(1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_frames_match_cpu(case):
    cpu = SimulatedScanner(case, seed=0).frame(30)
    gpu = SimulatedScanner(case, seed=0, device="cuda").frame(30)
    assert np.mean(cpu.truth.labels == gpu.truth.labels) > 0.999
    assert np.abs(cpu.pixels.astype(float) - gpu.pixels).mean() < 2.0


@pytest.mark.parametrize("wrap", [False, True])
def test_slice_atlas_matches_3d_grid_sample(wrap):
    torch.manual_seed(0)
    volume = torch.randn(2, 7, 9, 11)  # (C, D, H, W)
    atlas = build_atlas(volume, wrap=wrap)
    size = torch.tensor([11.0, 9.0, 7.0])
    # inside the volume (and, unwrapped, beyond it, where "border" padding holds)
    index = torch.rand(200, 3) * (size - 1) if wrap else torch.rand(200, 3) * (size + 4) - 2
    to_norm = torch.as_tensor(spatial.index_to_normalised((11, 9, 7)), dtype=torch.float32)
    grid = index @ to_norm[:3, :3].T + to_norm[:3, 3]
    expected = torch.nn.functional.grid_sample(
        volume[None], grid[None, None, None], mode="bilinear", padding_mode="border",
        align_corners=False)[0, :, 0, 0]
    assert torch.allclose(sample_atlas(atlas, index), expected, atol=1e-4)
    if wrap:  # periodic: a whole number of periods away gives the same value
        shifted = index + size * torch.tensor([2.0, -1.0, 3.0])
        assert torch.allclose(sample_atlas(atlas, shifted), expected, atol=1e-4)


def _labels_at_moved_tissue(volume, frame) -> np.ndarray:
    """The label volume sampled at image_to_mri (p + d(p)) with the frame's truth displacement."""
    h, w = frame.pixels.shape
    jj, ii = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    d = frame.truth.displacement_px
    pts = np.stack([ii + d[..., 0], jj + d[..., 1], np.zeros((h, w))], -1).reshape(-1, 3)
    vox = spatial.apply(spatial.invert(volume.voxel_to_world) @ frame.truth.image_to_mri, pts)
    idx = np.floor(vox + 0.5).astype(int)  # nearest voxel centre
    inside = np.all((idx >= 0) & (idx < np.array(volume.data.shape)), axis=1)
    out = np.zeros(len(idx), np.uint8)
    out[inside] = volume.data[tuple(idx[inside].T)]
    return out.reshape(h, w)


def test_truth_carries_the_tissue_motion_that_moved_its_labels(case, scanner):
    for index in (0, 150, 400):
        f = scanner.frame(index)
        d = f.truth.displacement_px
        assert d.shape == (256, 256, 2) and d.dtype == np.float32
        assert np.abs(d).max() > 0.5  # pressure and modes move tissue by pixels here
        moved = _labels_at_moved_tissue(case.labels, f)
        assert (moved == f.truth.labels).mean() > 0.995
        assert (moved != f.truth.labels).sum() < (f.truth.labels != _labels_at_moved_tissue(
            case.labels, dataclasses.replace(f, truth=dataclasses.replace(
                f.truth, displacement_px=np.zeros_like(d))))).sum()
    still = SimulatedScanner(case, EXACT, seed=3).frame(80)
    assert np.abs(still.truth.displacement_px).max() == 0.0
