"""Volume reconstruction from tracked frames (issue 11 item 1): analytic cases, a simulated sweep
against the phantom's truth, and `regseg reconstruct` on a recorded sequence file."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from regseg import spatial
from regseg.cli import main
from regseg.errors import InputError
from regseg.reconstruct import VolumeReconstructor, frame_corners, grid_around


def _plane(z_mm: float, hw=(40, 30), px=0.5) -> np.ndarray:
    pose = np.diag([px, px, 1.0, 1.0])
    pose[2, 3] = z_mm
    return pose


BOX = np.array([[0, 0, 0], [14.5, 19.5, 10]], dtype=float)


@pytest.mark.parametrize("method", ["nearest", "linear"])
def test_a_plane_of_known_intensity_lands_where_it_should(method):
    grid = grid_around(np.vstack([frame_corners((40, 30), _plane(5.0)), BOX]), 1.0)
    recon = VolumeReconstructor(grid, method)
    recon.add(np.full((40, 30), 100, np.uint8), _plane(5.0))
    volume, coverage = recon.result(fill_holes=0)
    assert set(np.unique(np.nonzero(coverage)[2])) == {5}  # only the z = 5 mm slice
    assert np.all(volume[coverage > 0] == 100) and np.all(volume[coverage == 0] == 0)
    assert coverage[:, :, 5].sum() == 15 * 20  # 14.5 x 19.5 mm at 1 mm: every voxel reached


def test_between_planes_is_filled_and_outside_stays_empty():
    grid = grid_around(np.vstack([frame_corners((40, 30), _plane(2.0)), BOX]), 1.0)
    recon = VolumeReconstructor(grid, "nearest")
    recon.add(np.full((40, 30), 60, np.uint8), _plane(3.0))
    recon.add(np.full((40, 30), 120, np.uint8), _plane(6.0))  # a 2-voxel gap at z = 4, 5
    volume, coverage = recon.result(fill_holes=2)
    assert np.all(coverage[:, :, 4:6] == 2)
    assert np.allclose(volume[:, :, 4:6][2:-2, 2:-2], 90)  # the mean of the two planes
    assert coverage[:, :, :3].sum() == 0 and coverage[:, :, 7:].sum() == 0  # no skin outside
    _, no_fill = recon.result(fill_holes=0)
    assert no_fill[:, :, 4:6].sum() == 0


def test_bad_grid_and_method_are_refused():
    with pytest.raises(InputError, match="limit is"):
        grid_around(np.array([[0, 0, 0], [500, 500, 500]], float), 0.1)
    with pytest.raises(InputError, match="positive voxel size"):
        grid_around(BOX, 0.0)
    with pytest.raises(InputError, match="nearest, linear"):
        VolumeReconstructor(grid_around(BOX, 1.0), "cubic")


@pytest.fixture(scope="module")
def sweep():
    from regseg.sim.phantom import make_phantom
    from regseg.sim.scanner import ScannerConfig, SimulatedScanner

    torch.set_num_threads(1)
    phantom = make_phantom(3)
    config = ScannerConfig(frame_hw=(96, 96), pixel_mm=0.5, sweep_frames=48, n_depth=96,
                           n_beams=64)
    scanner = SimulatedScanner(phantom, config, seed=1)
    return phantom, scanner, [scanner.frame(i) for i in range(config.sweep_frames)]


def test_a_simulated_sweep_reconstructs_the_phantoms_gland(sweep):
    """The frames' true labels compounded through their true poses give back the phantom's gland
    (Dice within the swept region; tissue deformation and partial volume account for the rest)."""
    phantom, scanner, frames = sweep
    corners = np.vstack([frame_corners(f.pixels.shape, f.truth.image_to_mri) for f in frames])
    grid = grid_around(corners, 1.0)
    labels = VolumeReconstructor(grid, "linear")
    for f in frames:
        labels.add((f.truth.labels > 0).astype(np.float32), f.truth.image_to_mri,
                   scanner.sector_mask)
    fraction, coverage = labels.result(fill_holes=2)
    lab = phantom.labels
    to_phantom = spatial.invert(lab.voxel_to_world) @ grid.voxel_to_world
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
    src = np.rint(ijk @ to_phantom[:3, :3].T + to_phantom[:3, 3]).astype(int)
    inside = ((src >= 0) & (src < lab.data.shape)).all(-1)
    truth = np.zeros(grid.shape, bool)
    truth[inside] = lab.data[tuple(src[inside].T)] > 0
    seen = coverage > 0
    pred = fraction > 0.5
    dice = 2 * (pred & truth & seen).sum() / ((pred & seen).sum() + (truth & seen).sum())
    assert (truth & seen).sum() > 500 and dice > 0.9, dice


def test_cli_reconstructs_a_recorded_sweep_and_refuses_bad_input(sweep, tmp_path, capsys):
    from dataclasses import replace

    from regseg.stream.recorder import Recorder, RecordingSlot

    _, _, frames = sweep
    recorder = Recorder(tmp_path / "sweep.igs.mha")
    slot = RecordingSlot(recorder)
    for i, f in enumerate(frames[:24]):
        slot.put(replace(f, truth=None, image_to_reference=None if i == 3 else
                         f.image_to_reference))
    recorder.close()
    out = tmp_path / "vol.nii.gz"
    assert main(["reconstruct", str(tmp_path / "sweep.igs.mha"), "--out", str(out),
                 "--spacing", "1.0", "--coverage-out", str(tmp_path / "cov.nii.gz"),
                 "--skip-zero", "--no-progress"]) == 0
    report = json.loads((tmp_path / "vol.json").read_text())
    assert report["tracked_frames"] == 23 and report["untracked_frames"] == 1
    volume = nib.load(str(out))
    coverage = np.asarray(nib.load(str(tmp_path / "cov.nii.gz")).dataobj)
    assert volume.shape == tuple(report["grid_shape"]) and coverage.max() >= 1
    assert np.asarray(volume.dataobj)[coverage > 0].mean() > 5  # B-mode, not an empty grid
    capsys.readouterr()
    assert main(["reconstruct", str(tmp_path / "sweep.igs.mha"), "--out",
                 str(tmp_path / "v.nrrd")]) == 2
    assert "a NIfTI file name" in capsys.readouterr().err
    assert main(["reconstruct", str(tmp_path / "sweep.igs.mha"), "--out", str(out),
                 "--transform", "ProbeToTracker"]) == 2
    err = capsys.readouterr().err
    assert "ProbeToTrackerTransform" in err and "a tracked sweep is needed" in err
