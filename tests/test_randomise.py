"""Domain randomisation of the family-A simulator: valid, seeded, and every extreme renders."""

import dataclasses

import numpy as np
import pytest
import torch

from regseg.sim import bmode
from regseg.sim import phantom as ph
from regseg.sim.probe_path import ARRAYS, ENDFIRE
from regseg.sim.randomise import RANGES, Randomised, randomise
from regseg.sim.scanner import ScannerConfig, SimulatedScanner
from regseg.types import PROSTATE

DRAWS = [randomise(np.random.default_rng(s)) for s in range(300)]


def _within(value: float, key: str) -> bool:
    lo, hi = RANGES[key]
    return lo - 1e-9 <= value <= hi + 1e-9


def test_same_generator_state_gives_the_same_case_and_another_differs():
    a, b = randomise(np.random.default_rng(7)), randomise(np.random.default_rng(7))
    assert isinstance(a, Randomised) and a == b
    assert randomise(np.random.default_rng(8)) != a
    assert len({d.scanner for d in DRAWS}) == len(DRAWS)


def test_scanner_configs_stay_within_the_documented_ranges():
    for d in DRAWS:
        c = d.scanner
        assert all(200 <= n <= 800 for n in c.frame_hw), c.frame_hw
        assert 0.1 - 1e-9 <= c.pixel_mm <= 0.5 + 1e-9
        assert 30.0 <= c.frame_hw[0] * c.pixel_mm <= 100.0  # a prostate-sized view
        assert c.array in ARRAYS
        for key in ("axial_psf_mm", "lateral_psf_beams", "scatterer_mm", "gain_db",
                    "dynamic_range_db", "noise_db", "tgc_slope_db_per_mm", "shadow_scale",
                    "needle_prob", "deform_mm", "pressure_mm", "tracking_rot_deg",
                    "tracking_shift_mm", "tracking_scale", "out_of_plane_mm"):
            assert _within(getattr(c, key), key), (key, getattr(c, key))
        assert c.speckle_shape == 0 or _within(c.speckle_shape, "speckle_shape")
        assert c.reverb_amplitude == 0 or _within(c.reverb_amplitude, "reverb_amplitude")
        assert c.endfire_tilt_deg[0] < c.endfire_tilt_deg[1]
        assert all(0 <= t < len(ph.TISSUE_NAMES) for t, _ in c.echo_offsets_db)
        p = d.phantom
        assert all(0.6 <= s <= 1.5 for s in p.gland_scale)
        assert p.lesion_count[0] >= 1 and p.mri_noise > 0 and p.mri_blur_vox > 0


def test_draws_cover_what_a_real_case_varies():
    scanners = [d.scanner for d in DRAWS]
    arrays = {c.array for c in scanners}
    assert arrays == set(ARRAYS)
    assert any(c.linear_width_mm > 0 for c in scanners)
    assert any(c.linear_width_mm == 0 and c.array == "biplane" for c in scanners)
    pixel = [c.pixel_mm for c in scanners]
    sides = [n for c in scanners for n in c.frame_hw]
    assert min(pixel) < 0.13 and max(pixel) > 0.35 and min(sides) < 260 and max(sides) > 700
    # Tracking errors reach 10 mm / 10 degrees; lesions range from hypo- to iso-echoic.
    assert max(c.tracking_shift_mm for c in scanners) > 9.5
    assert max(c.tracking_rot_deg for c in scanners) > 10.0
    lesion_db = [dict(c.echo_offsets_db)[ph.TUMOUR] for c in scanners]
    iso = bmode.ECHO_DB[ph.PERIPHERAL_ZONE] - bmode.ECHO_DB[ph.TUMOUR]  # offset that matches PZ
    assert min(lesion_db) < -5 and sum(v > iso - 2 for v in lesion_db) > 10
    assert any(c.reverb_amplitude > 0 for c in scanners)
    assert any(c.speckle_shape > 0 for c in scanners)


def test_default_options_leave_the_phantom_unchanged():
    a = ph.make_phantom(3, spacing_mm=1.4)
    b = ph.make_phantom(3, spacing_mm=1.4, options=ph.PhantomOptions())
    for name in ("mri", "labels", "tissue"):
        assert np.array_equal(getattr(a, name).data, getattr(b, name).data)


def test_phantom_options_change_gland_size_and_mri():
    base = ph.make_phantom(3, spacing_mm=1.4)
    big = ph.make_phantom(3, spacing_mm=1.4,
                          options=ph.PhantomOptions(gland_scale=(1.25, 1.25, 1.25),
                                                    mri_noise=40.0, mri_slice_blur_vox=3.0))
    assert (big.labels.data > 0).sum() > 1.5 * (base.labels.data > 0).sum()
    assert not np.array_equal(big.mri.data, base.mri.data)
    # Labels still follow the tissue map exactly.
    assert np.array_equal(big.labels.data, ph.TISSUE_TO_LABEL[big.tissue.data])


@pytest.fixture(scope="module")
def case():
    return ph.make_phantom(5, options=ph.PhantomOptions(gland_scale=(1.3, 1.3, 1.3),
                                                        lesion_count=(3, 4),
                                                        calcifications=(9, 10)))


EXTREMES = {
    "small_coarse": dict(frame_hw=(200, 200), pixel_mm=0.5),
    "large_fine": dict(frame_hw=(800, 800), pixel_mm=0.1, n_depth=320, n_beams=256),
    "wide_sector": dict(sector_half_angle_deg=65.0, probe_radius_mm=6.0, frame_hw=(300, 500),
                        pixel_mm=0.2),
    "linear": dict(linear_width_mm=60.0, frame_hw=(400, 300), pixel_mm=0.15),
    "endfire": dict(array="endfire", endfire_tilt_deg=(40.0, 70.0), probe_radius_mm=4.0,
                    sector_half_angle_deg=80.0, frame_hw=(300, 300), pixel_mm=0.3),
    "harsh_physics": dict(axial_psf_mm=0.4, lateral_psf_beams=4.0, speckle_shape=0.5,
                          texture_scale=2.0, gain_db=-6.0, dynamic_range_db=35.0,
                          noise_db=-35.0, tgc_slope_db_per_mm=0.15, shadow_scale=2.0,
                          reverb_amplitude=0.35, reverb_period_mm=2.0, needle_prob=1.0,
                          echo_offsets_db=((ph.TUMOUR, 9.0), (ph.CAPSULE, -5.0))),
    "soft_physics": dict(axial_psf_mm=0.08, lateral_psf_beams=0.8, gain_db=-22.0,
                         dynamic_range_db=70.0, noise_db=-60.0, tgc_slope_db_per_mm=-0.15,
                         scatterer_mm=0.5),
    "large_motion": dict(tracking_rot_deg=12.0, tracking_shift_mm=10.0, tracking_scale=0.06,
                         out_of_plane_mm=2.0, deform_mm=3.5, deform_modes=6, pressure_mm=5.0,
                         pressure_decay_mm=5.0),
}


@pytest.mark.parametrize("name", sorted(EXTREMES))
def test_extreme_configs_render_valid_frames(case, name):
    cfg = ScannerConfig(**EXTREMES[name])
    scanner = SimulatedScanner(case, cfg, seed=1)
    rng = np.random.default_rng(0)
    gland_seen = 0
    for _ in range(4):
        frame = scanner.random_frame(rng)
        assert frame.pixels.shape == cfg.frame_hw and frame.pixels.dtype == np.uint8
        assert frame.truth.labels.shape == cfg.frame_hw
        inside = frame.pixels[scanner.sector_mask]
        assert (frame.pixels[~scanner.sector_mask] == 0).all()
        assert inside.std() > 3.0, "the fan holds an image, not a flat field"
        assert np.isfinite(frame.image_to_reference).all()
        gland_seen += (frame.truth.labels >= PROSTATE).mean() > 0.02
    assert gland_seen >= 2, "the probe looks at the gland"


def test_endfire_fan_starts_at_the_tip_and_tilts_forward(case):
    cfg = ScannerConfig(array="endfire", endfire_tilt_deg=(55.0, 56.0))
    scanner = SimulatedScanner(case, cfg, seed=0)
    pose = scanner.pose(10)
    assert pose.mode == ENDFIRE and 55.0 <= pose.beam_tilt_deg <= 56.0
    frame = scanner.frame(10)
    rows = frame.truth.image_to_mri[:3, 1] / cfg.pixel_mm  # unit beam-centre direction
    cos_tilt = float(rows @ scanner.axis.direction)
    assert np.degrees(np.arccos(cos_tilt)) == pytest.approx(55.5, abs=1.0)


def test_linear_geometry_has_parallel_beams_and_a_rectangular_field():
    geo = bmode.linear_geometry((100, 120), 0.5, 40.0, 2.0, 64, 32)
    assert torch.allclose(geo.radial_ij[..., 1], torch.ones(64, 32))
    cols = geo.mask.any(0).nonzero()[:, 0]
    assert (cols.max() - cols.min() + 1) * 0.5 == pytest.approx(40.0, abs=1.0)
    assert not geo.mask[:3].any() and geo.mask[-1, 60]  # below the face, to the bottom row


def test_needle_adds_a_bright_line_and_leaves_the_labels(case):
    plain = SimulatedScanner(case, ScannerConfig(), seed=2)
    needled = SimulatedScanner(case, dataclasses.replace(ScannerConfig(), needle_prob=1.0),
                               seed=2)
    a, b = plain.frame(3), needled.frame(3)
    assert np.array_equal(a.truth.labels, b.truth.labels)
    assert (b.pixels.astype(int) - a.pixels > 40).sum() > 50
