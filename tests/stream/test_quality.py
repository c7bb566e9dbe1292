"""Trust: flags fire on no pose, no image and a large misregistration, and not on good frames;
what a flagged frame publishes (overlay marked, no MRI labels, no transform); the target outputs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyigtl
import pytest
import torch

from regseg.engines.fusion import FusionEngine
from regseg.sim.phantom import make_phantom
from regseg.sim.scanner import SimulatedScanner
from regseg.stream.context import build_context
from regseg.stream.igtl.codec import HEADER_SIZE
from regseg.stream.igtl.polydata import unpack_polydata_content
from regseg.stream.igtl.sink import pack_result
from regseg.stream.overlay import FLAG_RGB, TARGET_RGB, compose_overlay
from regseg.stream.pipeline import Pipeline
from regseg.stream.quality import content_score, lesion_target, seg_confidence
from regseg.types import LESION, PROSTATE

# Held-out family-A phantom (never trained on by AlignSegNet or QualityNet).
SEED = 1001


@pytest.fixture(scope="module")
def case():
    phantom = make_phantom(SEED)
    scanner = SimulatedScanner(phantom, seed=SEED)
    frames = [scanner.frame(k * 50) for k in range(12)]
    return build_context(phantom.mri, phantom.labels), frames


@pytest.fixture(scope="module")
def pipeline(case):
    torch.set_num_threads(1)
    return Pipeline(case[0], FusionEngine("alignsegnet", backend="eager"))


def noise(kind: str, rng: np.random.Generator, hw=(256, 256)) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(0, 256, hw, dtype=np.uint8)
    if kind == "gaussian":
        return np.clip(rng.normal(120, 40, hw), 0, 255).astype(np.uint8)
    return np.zeros(hw, np.uint8) + np.uint8(rng.integers(0, 30))  # blank


def unpack(message: bytes):
    fields = pyigtl.MessageBase.parse_header(message[:HEADER_SIZE])
    # pyigtl cannot read POLYDATA (see regseg.stream.igtl.polydata): its header and metadata only
    msg = pyigtl.MessageBase.create_message(fields["message_type"]) or pyigtl.MessageBase()
    msg.unpack(fields, message[HEADER_SIZE:])
    return msg


def polydata_of(message: bytes):
    ext, meta_header, meta_size, _ = np.frombuffer(message[HEADER_SIZE:HEADER_SIZE + 12],
                                                   dtype=">u2,>u2,>u4,>u4")[0]
    return unpack_polydata_content(message[HEADER_SIZE + ext:len(message) - meta_header
                                           - meta_size])


def devices(messages: list[bytes]) -> list[str]:
    return [m[14:34].rstrip(b"\0").decode() for m in messages]


def test_content_score_separates_bmode_from_noise(case):
    _, frames = case
    rng = np.random.default_rng(0)
    assert min(content_score(f.pixels) for f in frames) > 0.2
    for kind in ("uniform", "gaussian", "blank"):
        assert content_score(noise(kind, rng)) < 0.1, kind


def test_good_frames_are_not_flagged(case, pipeline):
    _, frames = case
    pipeline.set_reference_to_mri(np.eye(4))
    results = [pipeline(f) for f in frames]
    flagged = [r.flags for r in results if r.flagged]
    # This Pipeline registers once per frame (K1/deformable-off). Its threshold, calibrated on 40
    # phantoms since session 29 (addendum 32), is 2.22 mm (2.82 on 8 before): 3 of these 12
    # frames, true TRE 0.8-1.5 mm, have estimates of 2.22-3.44 mm and are flagged (2 before).
    assert len(flagged) <= 3, flagged
    assert all(np.isfinite(r.error_mm) and 0 <= r.seg_confidence <= 1 for r in results)
    good = next(r for r in results if not r.flagged)
    assert "MRIToImage" in devices(pack_result(good))


def test_large_misregistration_is_flagged(case, pipeline):
    _, frames = case
    error = np.eye(4)
    error[:3, 3] = np.array([2.0, -1.0, 2.0]) / 3.0 * 15.0  # 15 mm
    pipeline.set_reference_to_mri(error)
    try:
        results = [pipeline(f) for f in frames]
    finally:
        pipeline.set_reference_to_mri(np.eye(4))
    assert sum("error_estimate" in r.flags for r in results) >= 0.75 * len(results)
    for r in results:
        if r.flagged:
            assert "MRIToImage" not in devices(pack_result(r))


def test_invalid_pose_is_never_published_as_tracked(case, pipeline):
    _, frames = case
    result = pipeline(replace(frames[3], image_to_reference=None))
    assert "untracked" in result.flags and result.flagged
    assert not result.labels.any()  # no labels from a registration on an invented plane
    messages = pack_result(result)
    assert "MRIToImage" not in devices(messages)
    mri_labels = unpack(messages[devices(messages).index("MRILabels")])
    assert not mri_labels.image.any()
    assert (result.overlay[0, :, :] == FLAG_RGB).all(axis=-1).mean() > 0.9  # red border


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "blank"])
def test_pure_noise_publishes_no_labels(case, pipeline, kind):
    _, frames = case
    rng = np.random.default_rng(len(kind))
    result = pipeline(replace(frames[2], pixels=noise(kind, rng)))
    assert "no_content" in result.flags and result.flagged
    assert not result.labels.any()
    assert "MRIToImage" not in devices(pack_result(result))


def test_target_outputs_round_trip(case, pipeline):
    _, frames = case
    results = [pipeline(f) for f in frames]
    result = next(r for r in results if not r.flagged and r.target_ij is not None)
    messages = pack_result(result)
    names = devices(messages)
    assert names[:3] == ["Overlay", "Labels", "MRILabels"] and names[-1] == "MRIToImage"
    mri_labels = unpack(messages[names.index("MRILabels")])
    np.testing.assert_array_equal(mri_labels.image[0], result.warped_labels)
    np.testing.assert_allclose(mri_labels.ijk_to_world_matrix,
                               result.frame.image_to_reference, atol=1e-5)
    target = messages[names.index("TargetContour")]
    poly = polydata_of(target)
    assert len(poly.lines) >= 1
    meta = unpack(target).metadata
    centroid = result.frame.image_to_reference @ [*result.target_ij, 0, 1]
    np.testing.assert_allclose([float(v) for v in meta["TargetMm"].split()], centroid[:3],
                               atol=1e-3)
    assert float(meta["TargetMarginMm"]) == pytest.approx(result.target_margin_mm, abs=1e-3)
    assert float(meta["ErrorMm"]) == pytest.approx(result.error_mm, abs=1e-3)
    # the outline lies around the target, on the image plane
    assert np.linalg.norm(poly.points.mean(0) - centroid[:3]) < 10.0
    # the deformable part: a displacement IMAGE, when the deformable stage ran
    ddf = np.zeros((2, *result.labels.shape), np.float32)
    ddf[1] = 2.0  # dx = 2 px everywhere
    messages = pack_result(replace(result, ddf=ddf))
    disp = unpack(messages[devices(messages).index("MRIToImageDeformable")])
    expected = result.frame.image_to_reference[:3, 0] * 2.0
    np.testing.assert_allclose(disp.image[0, 5, 5], expected, atol=1e-4)


def test_flagged_frame_sends_no_mri_labels_and_marks_overlay(case, pipeline):
    _, frames = case
    result = pipeline(frames[0])
    flagged = replace(result, flagged=True, flags=("error_estimate",))
    messages = pack_result(flagged)
    names = devices(messages)
    assert "MRIToImage" not in names and "MRIToImageDeformable" not in names
    assert not unpack(messages[names.index("MRILabels")]).image.any()
    assert len(polydata_of(messages[names.index("TargetContour")]).points) == 0
    assert "TargetMm" not in unpack(messages[names.index("TargetContour")]).metadata


def test_overlay_draws_the_target_and_marks_flags():
    pixels = np.full((64, 64), 80, np.uint8)
    warped = np.zeros((64, 64), np.uint8)
    warped[10:50, 10:50] = PROSTATE
    warped[25:35, 25:35] = LESION
    target = lesion_target(warped)
    assert target == pytest.approx((29.5, 29.5))
    plain = compose_overlay(pixels, np.zeros_like(warped), warped, target_ij=target,
                            margin_px=8.0)
    assert (plain == TARGET_RGB).all(axis=-1).sum() > 20
    marked = compose_overlay(pixels, np.zeros_like(warped), warped, flags=("no_gland",),
                             target_ij=target, margin_px=8.0)
    assert (marked == TARGET_RGB).all(axis=-1).sum() == 0  # no MRI target as truth
    assert (marked[:, 0] == FLAG_RGB).all(axis=-1).mean() > 0.9


def test_seg_confidence_is_high_when_sure_and_low_when_not():
    sure = torch.zeros(1, 3, 8, 8)
    sure[:, 1, 2:6, 2:6] = 20.0
    sure[:, 0] = 20.0 * (sure[:, 1] == 0)
    assert seg_confidence(sure) > 0.99
    assert seg_confidence(torch.zeros(1, 3, 8, 8)) < 0.01


def test_overlay_says_tracking_only_when_the_registration_was_withheld():
    """--do-no-harm publishing the tracked plane is written in the overlay's corner (bright text
    where the plain overlay has none), and a flagged frame keeps only its UNVERIFIED mark."""
    pixels = np.full((256, 256), 40, np.uint8)
    empty = np.zeros_like(pixels)

    def bright(rgb):  # text pixels in the bottom corner
        return int((rgb[220:, :].min(axis=-1) > 150).sum())

    assert bright(compose_overlay(pixels, empty, empty)) == 0
    assert bright(compose_overlay(pixels, empty, empty, tracking_only=True)) > 20
    assert bright(compose_overlay(pixels, empty, empty, flags=("error_estimate",),
                                  tracking_only=True)) == 0
