"""Simulator family B: deterministic, truthful about its frames, unlike family A, apart from it."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from regseg import metrics, spatial
from regseg.errors import InputError
from regseg.sim.family_b import EVAL_SEEDS
from regseg.sim.family_b.anatomy import LESION0, make_case
from regseg.sim.family_b.probe import ENDFIRE, SIDEFIRE, ProbeGeometry
from regseg.sim.family_b.session import Session, SessionConfig
from regseg.types import LESION, PROSTATE

FAMILY_B = Path(__file__).resolve().parents[2] / "regseg" / "sim" / "family_b"
pytestmark = pytest.mark.slow  # a case takes ~4 s, a frame ~0.1-0.2 s on the 2-core CPU
STILL = dict(pressure_mm=0.0, bulge_mm=0.0, out_of_plane_mm=0.0, tilt_deg=0.0)


@pytest.fixture(scope="module")
def case():
    return make_case(5003, gland_mm=(20.0, 24.0))  # small gland: small volumes, quick


def _labels_volume(volume):
    return torch.from_numpy(volume.data.transpose(2, 1, 0).astype(np.float32))[None, None]


def test_case_is_what_the_live_path_loads(case):
    assert case.mri.data.ndim == 3 and case.mri.data.dtype == np.float32
    assert case.labels.data.shape == case.mri.data.shape
    np.testing.assert_allclose(case.labels.voxel_to_world, case.mri.voxel_to_world)
    np.testing.assert_allclose(case.mri.spacing_mm, (0.5, 0.5, 3.0), atol=1e-9)
    assert set(np.unique(case.labels.data)) <= {0, PROSTATE, LESION}
    assert set(np.unique(case.truth_labels.data)) == {0, PROSTATE, LESION}
    assert np.isfinite(case.mri.data).all() and case.mri.data.max() > 0
    # every lesion class lies inside the gland, and lesions have a TRUS echogenicity each
    assert len(case.lesion_kinds) == int(case.tissue.data.max()) - LESION0 + 1
    extent = np.ptp(np.argwhere(case.truth_labels.data > 0), axis=0) * 0.6
    assert 15.0 < extent.max() < 40.0  # a 20-24 mm gland (plus shape perturbation)


def test_case_and_frames_are_deterministic(case):
    again = make_case(5003, gland_mm=(20.0, 24.0))
    np.testing.assert_array_equal(again.tissue.data, case.tissue.data)
    np.testing.assert_array_equal(again.mri.data, case.mri.data)
    a, b = Session(case, seed=3).frame(7), Session(case, seed=3).frame(7)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.image_to_reference, b.image_to_reference)
    np.testing.assert_array_equal(a.truth.labels, b.truth.labels)
    assert not np.array_equal(Session(case, seed=4).frame(7).pixels, a.pixels) or \
        Session(case, seed=4).geometry != Session(case, seed=3).geometry


@pytest.mark.parametrize("probe", [ENDFIRE, SIDEFIRE])
def test_truth_labels_are_the_label_volume_on_the_true_plane(case, probe):
    still = Session(case, SessionConfig(probe=probe, **STILL), seed=1)
    for index in (0, 40):
        frame = still.frame(index)
        assert frame.truth.labels.shape == frame.pixels.shape
        assert (frame.truth.labels > 0).sum() > 500, "the probe should look at the gland"
        resliced = spatial.reslice(_labels_volume(case.truth_labels),
                                   spatial.invert(case.truth_labels.voxel_to_world),
                                   frame.truth.image_to_mri, frame.pixels.shape,
                                   mode="nearest")[0, 0].numpy()
        assert (resliced == frame.truth.labels).mean() > 0.999
        # the MRI labels (3 mm slices) agree with the truth up to partial volume: measured 0.72
        # (side-fire, sagittal through the slices of a 20 mm gland) to 0.9 (end-fire)
        mri = spatial.reslice(_labels_volume(case.labels),
                              spatial.invert(case.labels.voxel_to_world),
                              frame.truth.image_to_mri, frame.pixels.shape,
                              mode="nearest")[0, 0].numpy()
        assert metrics.dice(mri, frame.truth.labels, PROSTATE) > 0.6
    # with tissue motion on, truth moves with the tissue: close to, not equal to, the still one
    moving = Session(case, SessionConfig(probe=probe), seed=1).frame(0)
    dice = metrics.dice(moving.truth.labels, still.frame(0).truth.labels, PROSTATE)
    assert 0.8 < dice < 1.0


def test_tracking_error_has_the_set_magnitude(case):
    s = Session(case, SessionConfig(tracking_shift_mm=6.0, tracking_rot_deg=0.0, **STILL), seed=2)
    frame = s.frame(11)
    h, w = frame.pixels.shape
    pts = np.stack(np.meshgrid(np.arange(0, w, 17), np.arange(0, h, 13)), -1).reshape(-1, 2)
    pts3 = np.concatenate([pts, np.zeros((len(pts), 1))], 1)
    d = spatial.apply(frame.image_to_reference, pts3) - spatial.apply(frame.truth.image_to_mri,
                                                                      pts3)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 6.0, atol=1e-6)
    s = Session(case, SessionConfig(tracking_rot_deg=10.0, **STILL), seed=2)
    frame = s.frame(11)
    rel = spatial.invert(frame.truth.image_to_mri) @ frame.image_to_reference  # pixel space
    assert abs(abs(np.degrees(np.arctan2(rel[1, 0], rel[0, 0]))) - 10.0) < 1e-6
    assert metrics.tre_mm(frame.image_to_reference, frame.truth.image_to_mri, pts) > 1.0
    zero = Session(case, SessionConfig(**STILL), seed=2).frame(11)
    np.testing.assert_allclose(zero.image_to_reference, zero.truth.image_to_mri, atol=1e-9)


def test_frames_look_unlike_family_a(case):
    """Family A frames are 256 x 256 at 0.2 mm with an in-fan grey std of 42-46 (measured on
    phantom 1000); family B's frame geometry differs and its grey levels spread far wider."""
    for seed in (1, 2, 3):
        s = Session(case, seed=seed)
        frame = s.frame(0)
        assert frame.pixels.dtype == np.uint8
        assert frame.pixels.shape != (256, 256) or frame.spacing_mm != (0.2, 0.2)
        inside = frame.pixels[s.beams.mask.numpy()]
        assert inside.std() > 55.0
        assert (frame.pixels[~s.beams.mask.numpy()] == 0).all()


def test_configuration_errors_say_what_is_wrong(case):
    with pytest.raises(InputError, match="probe"):
        SessionConfig(probe="transverse")
    with pytest.raises(InputError, match="tracking_shift_mm"):
        SessionConfig(tracking_shift_mm=-1.0)
    with pytest.raises(InputError, match="sector_deg"):
        ProbeGeometry(ENDFIRE, (200, 200), 0.2, 50.0, radius_mm=8.0, sector_deg=200.0)
    with pytest.raises(InputError, match="width_mm"):
        ProbeGeometry(SIDEFIRE, (200, 200), 0.2, 50.0)
    with pytest.raises(InputError, match="mri_spacing_mm"):
        make_case(1, mri_spacing_mm=(0.5, 0.0, 3.0))
    with pytest.raises(InputError, match="frame indices"):
        Session(case, seed=0).frame(-1)


def test_family_b_is_written_apart_from_family_a():
    forbidden = {"regseg.sim.phantom", "regseg.sim.bmode", "regseg.sim.scanner",
                 "regseg.sim.probe_path", "regseg.sim.volume_atlas"}
    for path in FAMILY_B.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not forbidden & set(names), f"{path.name} imports family A: {names}"
    assert min(EVAL_SEEDS) >= 5000  # family A uses 0.. for training and 1000.. for validation


def test_truth_carries_the_tissue_motion_that_moved_its_labels(case):
    s = Session(case, SessionConfig(probe=ENDFIRE), seed=1)
    vol = _labels_volume(case.truth_labels)
    w2v = spatial.invert(case.truth_labels.voxel_to_world)
    for index in (0, 40):
        frame = s.frame(index)
        d = frame.truth.displacement_px
        assert d.shape == (*frame.pixels.shape, 2) and d.dtype == np.float32
        assert np.abs(d).max() > 0.5
        # the truth labels are the label volume at plane(p + d(p)), and not at plane(p)
        h, w = frame.pixels.shape
        jj, ii = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        pts = np.stack([ii + d[..., 0], jj + d[..., 1], np.zeros((h, w))], -1).reshape(-1, 3)
        vox = spatial.apply(w2v @ frame.truth.image_to_mri, pts)
        idx = np.floor(vox + 0.5).astype(int)
        data = case.truth_labels.data
        inside = np.all((idx >= 0) & (idx < np.array(data.shape)), axis=1)
        moved = np.zeros(len(idx), np.uint8)
        moved[inside] = data[tuple(idx[inside].T)]
        moved = moved.reshape(h, w)
        plain = spatial.reslice(vol, w2v, frame.truth.image_to_mri, frame.pixels.shape,
                                mode="nearest")[0, 0].numpy()
        assert (moved == frame.truth.labels).mean() > 0.995
        assert (moved != frame.truth.labels).sum() < (plain != frame.truth.labels).sum()
    assert np.abs(Session(case, SessionConfig(**STILL), seed=1).frame(3)
                  .truth.displacement_px).max() == 0.0
