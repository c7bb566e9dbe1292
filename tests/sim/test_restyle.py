"""regseg.sim.restyle: family A's scenes in another appearance, for training only."""

import dataclasses

import numpy as np
import pytest

from regseg.sim import phantom as ph
from regseg.sim.restyle import N_CLASSES, RestyledScanner, Style, draw_style, render, scene_classes
from regseg.train.data import open_randomised_scanner, open_restyled_scanner

STYLES = [draw_style(np.random.default_rng(s)) for s in range(200)]


@pytest.fixture(scope="module")
def restyled():
    return open_restyled_scanner(3200, 3200)


def test_styles_are_seeded_and_vary_contrast_itself():
    assert draw_style(np.random.default_rng(3)) == STYLES[3] and STYLES[3] != STYLES[4]
    for style in STYLES:
        assert len(style.level_db) == N_CLASSES and max(style.level_db) == 0.0
        assert style.level_db[ph.URINE] <= -20.0  # fluid stays dark
        assert 30.0 <= style.dynamic_range_db <= 70.0 and 2.5 <= style.speckle_db <= 9.0
    # the gland's zones against the tissue around them: brighter in some cases, darker in others
    contrast = [s.level_db[ph.PERIPHERAL_ZONE] - s.level_db[ph.SOFT_TISSUE] for s in STYLES]
    assert min(contrast) < -10.0 and max(contrast) > 10.0
    assert {s.post > 0 for s in STYLES} == {True, False}  # blur and unsharp both drawn


def test_scene_has_the_gland_exactly_where_the_truth_does(restyled):
    phantom, source = restyled
    frame = source.scanner.random_frame(np.random.default_rng(1))
    classes = scene_classes(phantom, frame)
    gland = np.isin(classes, (ph.PERIPHERAL_ZONE, ph.TRANSITION_ZONE, ph.URETHRA, ph.TUMOUR))
    assert classes.shape == frame.pixels.shape
    assert np.array_equal(gland, frame.truth.labels > 0) and gland.sum() > 200
    assert np.array_equal(classes == ph.TUMOUR, frame.truth.labels == 2)


def test_render_follows_the_levels_inside_the_fan_only():
    classes = np.zeros((120, 100), np.uint8)
    classes[30:80, 25:75] = ph.PERIPHERAL_ZONE
    mask = np.ones_like(classes, bool)
    mask[:, :10] = False
    depth = np.repeat(np.arange(120, dtype=np.float32)[:, None] * 0.2, 100, axis=1)
    levels = [0.0] * N_CLASSES
    bright = dataclasses.replace(STYLES[0], level_db=tuple(levels), edge_db=0.0, texture_db=0.0,
                                 ramp_db_per_mm=0.0, post=0.0)
    levels[ph.SOFT_TISSUE] = -25.0
    dark_around = dataclasses.replace(bright, level_db=tuple(levels))
    flat = render(classes, mask, depth, 0.2, bright, np.random.default_rng(0))
    shown = render(classes, mask, depth, 0.2, dark_around, np.random.default_rng(0))
    assert flat.dtype == np.uint8 and (shown[:, :10] == 0).all() and (flat[:, :10] == 0).all()
    inside, outside = shown[40:70, 35:65].mean(), shown[90:, 20:].mean()
    assert inside - outside > 40.0  # the gland at 0 dB, its surroundings at -25
    assert abs(flat[40:70, 35:65].mean() - flat[90:, 20:].mean()) < 10.0  # one level: no gland
    again = render(classes, mask, depth, 0.2, dark_around, np.random.default_rng(0))
    other = render(classes, mask, depth, 0.2, dark_around, np.random.default_rng(1))
    assert np.array_equal(again, shown) and not np.array_equal(other, shown)


def test_restyled_frames_keep_the_scanners_pose_truth_and_fan(restyled):
    _, source = restyled
    assert isinstance(source, RestyledScanner) and isinstance(source.style, Style)
    _, plain = open_randomised_scanner(3200, 3200)
    frame = source.random_frame(np.random.default_rng(5))
    reference = plain.random_frame(np.random.default_rng(5))
    assert np.array_equal(frame.truth.image_to_mri, reference.truth.image_to_mri)
    assert np.array_equal(frame.truth.labels, reference.truth.labels)
    assert frame.pixels.shape == reference.pixels.shape and frame.pixels.dtype == np.uint8
    assert not np.array_equal(frame.pixels, reference.pixels)
    assert (frame.pixels[~source.scanner.geometry.mask.numpy()] == 0).all()
    assert np.array_equal(source.random_frame(np.random.default_rng(5)).pixels, frame.pixels)
