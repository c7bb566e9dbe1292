"""The appearance augmentation: seeded, in range, geometry and sector kept, and each part real."""

import numpy as np
import pytest
import torch

from regseg.train import appearance as ap
from regseg.train.alignsegnet import train_alignsegnet


def _frames(n=6, size=48, seed=0):
    """Frames in [0, 1]: a bright disc on speckle inside a sector, 0 outside it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size].astype(np.float64)
    sector = np.abs(x - size / 2) < (y + 4) * 0.6
    disc = (x - size / 2) ** 2 + (y - size * 0.6) ** 2 < (size / 5) ** 2
    frames = []
    for _ in range(n):
        img = 0.3 + 0.4 * disc + 0.1 * rng.standard_normal((size, size))
        frames.append(np.clip(img, 0.01, 1.0) * sector)
    return torch.tensor(np.stack(frames)[:, None], dtype=torch.float32), sector


def test_same_generator_state_same_frames_and_shape_and_range_kept():
    x, _ = _frames()
    a = ap.augment_appearance(x, torch.Generator().manual_seed(3))
    b = ap.augment_appearance(x, torch.Generator().manual_seed(3))
    c = ap.augment_appearance(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_outside_the_sector_stays_black_and_most_frames_change():
    x, sector = _frames(n=32)
    y = ap.augment_appearance(x, torch.Generator().manual_seed(0))
    # 3 px from the sector's edge every neighbourhood is all zero: those pixels stay 0
    far = ap.sector_mask(torch.tensor(sector[None, None], dtype=torch.float32))
    far = ap.sector_mask(far) == 0  # two dilations of 2 px each: well outside
    assert float(y[:, :, far[0, 0]].abs().max()) == 0.0
    changed = [(y[n] - x[n]).abs().max() > 1e-3 for n in range(len(x))]
    assert sum(changed) >= 24  # every part is drawn with p 0.25-0.5: P(no change) ~ 0.1


def test_texture_changes_intensities_not_positions():
    """On a clean disc, a random filter's output varies only within its reach (<= 8 px) of the
    disc's edge or the frame's border: the structure stays where it was, so labels still hold."""
    size = 64
    y, x = np.mgrid[:size, :size].astype(np.float64)
    r = np.hypot(x - 32, y - 32)
    disc = torch.tensor((0.3 + 0.4 * (r < 14))[None, None], dtype=torch.float32)
    border = np.minimum.reduce([x, y, size - 1 - x, size - 1 - y])
    inside, outside = (r < 14 - 9), (r > 14 + 9) & (border > 9)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = ap.random_texture(disc, g)[0, 0].numpy()
        assert out.std() > 1e-3  # not flat: the edge is still there
        for region in (inside, outside):
            assert np.ptp(out[region]) < 1e-4 * max(out.std(), 1e-6) + 1e-5


def test_curve_is_monotone_and_maps_the_unit_interval_onto_itself():
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 1, 101)
    for _ in range(10):
        y = ap.random_curve(t, g)
        assert float(y[0]) == 0.0 and float(y[-1]) == pytest.approx(1.0)
        assert bool((y[1:] >= y[:-1]).all())


def test_blur_keeps_the_mean_and_the_bias_field_is_smooth_and_positive():
    x, _ = _frames(n=1)
    blurred = ap.gaussian_blur(x, 1.0)
    assert float(blurred.mean()) == pytest.approx(float(x.mean()), rel=0.02)
    assert float(blurred.std()) < float(x.std())
    field = ap.bias_field((48, 48), torch.Generator().manual_seed(1))
    assert float(field.min()) > 0.0
    assert float((field[..., 1:] - field[..., :-1]).abs().max()) < 0.1


def test_training_rejects_an_unknown_augment_before_any_work(tmp_path):
    from regseg.errors import InputError
    with pytest.raises(InputError, match="--augment 'heavy'"):
        train_alignsegnet(tmp_path, augment="heavy", cache_dir=None)
    assert not (tmp_path / "alignsegnet.json").exists()
