"""``--intensity match`` (regseg.stream.intensity.IntensityMatch): each frame's grey levels
mapped onto the training scanner's by a running histogram; the stages read the mapped frame, the
overlay, ``no_content`` and the published Result keep the frame as received."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from regseg.sim.phantom import make_phantom
from regseg.sim.scanner import ScannerConfig, SimulatedScanner
from regseg.stream.build import build_engine, build_pipeline
from regseg.stream.cli_parser import build_parser
from regseg.stream.context import build_context
from regseg.stream.intensity import (
    HISTORY_WEIGHT,
    INTENSITY_DEFAULT,
    MIN_PIXELS,
    QUANTILES,
    IntensityMatch,
    build_intensity,
    load_reference,
)
from regseg.stream.serve.config import SESSION_KEYS

STILL = dict(tracking_rot_deg=0.0, tracking_shift_mm=0.0, tracking_scale=0.0,
             out_of_plane_mm=0.0)


def quantiles_of(pixels, qs=(0.1, 0.5, 0.9)):
    return np.quantile(pixels[pixels > 0], qs)


def test_a_frame_is_mapped_onto_the_reference_distribution():
    rng = np.random.default_rng(0)
    reference = np.quantile(rng.gamma(4.0, 20.0, 200_000).clip(1, 255), np.linspace(0, 1,
                                                                                     QUANTILES))
    match = IntensityMatch(reference)
    frame = np.zeros((200, 300), np.uint8)
    frame[20:, 30:270] = rng.integers(1, 60, (180, 240))  # a dark scanner: greys 1-59
    match.observe(frame)
    out = match.lut[frame]
    assert (out[frame == 0] == 0).all() and (out[frame > 0] >= 1).all()
    expected = np.interp([0.1, 0.5, 0.9], np.linspace(0, 1, QUANTILES), reference)
    assert np.allclose(quantiles_of(out), expected, atol=4.0)  # was 6 / 30 / 54
    assert (np.diff(match.lut.astype(int)) >= 0).all()  # monotone: order of greys kept


def test_the_histogram_is_a_running_average_and_small_frames_leave_it():
    reference = np.linspace(1, 255, QUANTILES)
    match = IntensityMatch(reference)
    assert (match.lut == np.arange(256)).all()  # identity before any frame
    tiny = np.zeros((100, 100), np.uint8)
    tiny[:10, :10] = 50  # 100 imaged pixels < MIN_PIXELS
    assert 100 < MIN_PIXELS
    match.observe(tiny)
    assert match.histogram is None and (match.lut == np.arange(256)).all()
    a = np.full((100, 100), 40, np.uint8)
    b = np.full((100, 100), 200, np.uint8)
    match.observe(a)
    match.observe(b)
    assert match.histogram[40] == pytest.approx(1.0 - HISTORY_WEIGHT)
    assert match.histogram[200] == pytest.approx(HISTORY_WEIGHT)
    assert match.lut[40] < match.lut[200]
    match.reset()
    assert match.histogram is None and (match.lut == np.arange(256)).all()


def test_the_shipped_reference_loads_and_bad_ones_are_refused(tmp_path):
    q = load_reference()
    assert q.shape == (QUANTILES,) and (np.diff(q) >= 0).all() and 0 <= q[0] and q[-1] <= 255
    bad = tmp_path / "ref.json"
    bad.write_text(json.dumps({"quantiles": [3.0, 2.0, 1.0]}))
    with pytest.raises(ValueError, match=f"{bad}.*257 non-decreasing"):
        load_reference(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"{bad}: unreadable"):
        load_reference(bad)
    with pytest.raises(ValueError, match="intensity 'maybe'"):
        build_intensity("maybe")
    assert build_intensity("off") is None and isinstance(build_intensity("match"),
                                                          IntensityMatch)


def test_the_shipped_reference_is_what_its_command_makes():
    """``regseg train intensity-reference`` is deterministic: the shipped file is reproducible."""
    from regseg.train.intensity_reference import make_reference

    shipped = load_reference()
    assert np.allclose(make_reference(8, 12), shipped, atol=1e-3)


def test_the_reference_command_refuses_bad_input_before_any_work(tmp_path, capsys):
    from regseg.cli import main

    assert main(["train", "intensity-reference", "--out", str(tmp_path / "missing")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["train", "intensity-reference", "--out", str(tmp_path), "--phantoms", "0"]) == 2
    assert "--phantoms 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


class Spy:
    """A stand-in for the image-based refinement that records the pixels it was given."""

    def __init__(self):
        self.seen = []

    def __call__(self, pixels, image_to_mri, *, tracked=None):
        self.seen.append(pixels.copy())
        return image_to_mri, 0.0, 3.0

    @staticmethod
    def unsupported(significance):
        return False

    @staticmethod
    def timings():  # the stage protocol's (Lc2Stage, Lc2Lagged): no extra timings
        return {}

    def close(self):  # the stage protocol's: nothing to end
        pass


@pytest.fixture(scope="module")
def case():
    phantom = make_phantom(3100)  # a calibration phantom: never an evaluation one
    context = build_context(phantom.mri, phantom.labels)
    scanner = SimulatedScanner(phantom, ScannerConfig(**STILL), seed=5)
    frames = []
    for index in (40, 44, 48):
        f = scanner.frame(index)
        # another scanner's gain curve: the same image, darker and compressed
        dark = np.where(f.pixels > 0, np.clip((f.pixels / 255.0) ** 1.8 * 140, 1, 255),
                        0).astype(np.uint8)
        frames.append(dataclasses.replace(f, pixels=dark,
                                          image_to_reference=f.truth.image_to_mri))
    return context, frames


def test_the_stages_read_the_mapped_frame_the_user_sees_the_original(case):
    context, frames = case
    engine = build_engine(backend="eager", threads=1)
    spy = Spy()
    pipeline = build_pipeline(context, engine, deformable=None, lc2=spy, intensity="match")
    for frame in frames:
        result = pipeline(frame)
        lut = pipeline.intensity.lut
        assert result.frame is frame  # published as received
        assert np.array_equal(spy.seen[-1], lut[frame.pixels])  # the stages: mapped
        assert not np.array_equal(spy.seen[-1], frame.pixels)
        # the overlay is drawn on the frame as received: where it is grey (nothing drawn),
        # it is the received grey, not the mapped one
        o = result.overlay.astype(int)
        grey = (o[..., 0] == o[..., 1]) & (o[..., 1] == o[..., 2]) & (frame.pixels > 0)
        assert grey.mean() > 0.3
        assert (o[..., 0][grey] == frame.pixels[grey]).mean() > 0.95
        assert (o[..., 0][grey] == lut[frame.pixels][grey]).mean() < 0.2
    # the running histogram brought the dark frames' median grey up to the reference's
    reference_median = load_reference()[QUANTILES // 2]
    assert abs(np.median(spy.seen[-1][spy.seen[-1] > 0]) - reference_median) < 6
    assert np.median(frames[-1].pixels[frames[-1].pixels > 0]) < reference_median - 25
    assert not pipeline.intensity._in_flight  # every mapped frame was handed back


def test_no_content_reads_the_frame_as_received(case):
    """``QualityCheck.assess(content_pixels=...)``: a blank frame stays blank to the check even
    when the stages were given a mapped one."""
    context, frames = case
    engine = build_engine(backend="eager", threads=1)
    pipeline = build_pipeline(context, engine, deformable=None, lc2="off")
    frame = frames[0]
    labels = np.zeros(frame.pixels.shape, np.uint8)
    blank = np.zeros_like(frame.pixels)
    q = pipeline.quality
    rich = q.assess(frame.pixels, frame.spacing_mm, True, labels, labels,
                    frame.image_to_reference)
    assert "no_content" not in rich.flags
    seen_blank = q.assess(frame.pixels, frame.spacing_mm, True, labels, labels,
                          frame.image_to_reference, content_pixels=blank)
    assert "no_content" in seen_blank.flags


def test_with_the_gland_window_results_map_back_to_the_original_whole_frame():
    phantom = make_phantom(3101)
    context = build_context(phantom.mri, phantom.labels)
    scanner = SimulatedScanner(phantom, ScannerConfig(frame_hw=(320, 384), pixel_mm=0.22,
                                                      **STILL), seed=3)
    engine = build_engine(backend="eager", threads=1)
    from regseg.stream.build import build_default_capture

    pipeline = build_pipeline(context, engine, deformable=None, lc2="off", roi="auto",
                              intensity="match",
                              capture=build_default_capture(backend="eager", threads=1))
    cut = 0
    for index in range(100, 112, 3):
        f = scanner.frame(index)
        frame = dataclasses.replace(f, image_to_reference=f.truth.image_to_mri)
        result = pipeline(frame)
        assert result.frame is frame and result.overlay.shape[:2] == frame.pixels.shape
        cut += "roi" in result.timings_ms
    assert cut >= 2  # the later frames ran on the window
    assert not pipeline.intensity._in_flight and not pipeline.roi._in_flight


def test_the_mode_reaches_the_cli_and_serve():
    assert INTENSITY_DEFAULT in ("match", "off")
    assert build_parser().parse_args(["--demo", "--intensity", "match"]).intensity == "match"
    assert build_parser().parse_args(["--demo"]).intensity == INTENSITY_DEFAULT
    assert "intensity" in SESSION_KEYS
