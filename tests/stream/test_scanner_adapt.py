"""--scanner-adapt (regseg.stream.scanner_adapt): the TRUS encoder's batch-norm statistics taken
from the stream's own frames with content, nothing else changed, the adapted engines swapped in at
a frame boundary (at once or from a background build), a failed build leaving the shipped network,
and the CLI's flag and summary."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from regseg import planes
from regseg.models.registry import load_model
from regseg.stream import scanner_adapt as sa
from regseg.stream.scanner_adapt import (
    SCANNER_ADAPT_DEFAULT,
    SCANNER_ADAPT_MODES,
    ScannerAdapt,
    adapted_model,
    build_scanner_adapt,
)


@pytest.fixture(scope="module")
def case():
    from regseg.sim.phantom import make_phantom
    from regseg.sim.scanner import ScannerConfig, SimulatedScanner
    from regseg.stream.context import build_context

    phantom = make_phantom(3100)  # a calibration phantom: never an evaluation one
    scanner = SimulatedScanner(phantom, ScannerConfig(), seed=5)
    return build_context(phantom.mri, phantom.labels), [scanner.frame(8 * k) for k in range(8)]


def pipeline_of(context, adapt):
    from regseg.stream.build import build_default_capture, build_engine, build_pipeline

    engine = build_engine(backend="eager", threads=1)
    return build_pipeline(context, engine, capture=build_default_capture(backend="eager",
                                                                         threads=1),
                          lc2="off", scanner_adapt=adapt)


def test_only_the_trus_encoder_statistics_change_and_they_are_the_batch_s():
    model = load_model("alignsegnet").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trus = torch.rand(5, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    out = adapted_model(model, trus)
    for key, value in model.state_dict().items():  # the shipped model is left as it was
        assert torch.equal(value, before[key]), key
    changed = {k for k, v in out.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("trus_encoder.") and
                           k.rsplit(".", 1)[1] in ("running_mean", "running_var",
                                                   "num_batches_tracked") for k in changed)
    # the first layer's statistics are the mean and unbiased variance of its conv's output
    first_conv, first_norm = out.trus_encoder.convs[0][0], out.trus_encoder.convs[0][1]
    assert isinstance(first_norm, nn.BatchNorm2d) and not out.training
    with torch.no_grad():
        y = first_conv(trus).transpose(0, 1).flatten(1)
    torch.testing.assert_close(first_norm.running_mean, y.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first_norm.running_var, y.var(1), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        adapted_model(_with_encoder(nn.Conv2d(1, 1, 1)), trus)


def _with_encoder(encoder):
    holder = nn.Module()
    holder.trus_encoder = encoder
    return holder


def test_the_pipeline_runs_the_adapted_network_from_the_frame_after_the_set(case):
    """Frames without content are not taken; the frame completing the set builds the adapted
    engines (here at once) and the next frame runs them, chains and the capture's engine too."""
    context, frames = case
    adapt = ScannerAdapt(frames=3, background=False)
    pipeline = pipeline_of(context, adapt)
    shipped = pipeline.engine
    blank = replace(frames[0], pixels=np.zeros_like(frames[0].pixels))
    for frame in (blank, *frames[:3]):
        pipeline(frame)
    assert pipeline.engine is shipped and not adapt.applied  # built, not yet swapped
    result = pipeline(frames[3])
    assert pipeline.engine is not shipped and adapt.applied
    assert adapt.info()["applied_from_seq"] == frames[3].seq and adapt.info()["error"] is None
    assert pipeline.capture.theta_engine.model is pipeline.engine.model  # refinement's too
    assert "untracked" not in result.flags and math.isfinite(result.error_mm)
    # its statistics are those of the three frames with content, as the network saw them
    trus = torch.cat([planes.trus_input(torch.from_numpy(f.pixels), shipped.size)
                      for f in frames[:3]])
    expected = adapted_model(shipped.model, trus)
    for got, want in zip(pipeline.engine.model.trus_encoder.modules(),
                         expected.trus_encoder.modules(), strict=True):
        if isinstance(got, nn.BatchNorm2d):
            torch.testing.assert_close(got.running_mean, want.running_mean)
            torch.testing.assert_close(got.running_var, want.running_var)
    for name, value in pipeline.engine.model.state_dict().items():  # the rest is shipped
        if not name.startswith("trus_encoder."):
            assert torch.equal(value, shipped.model.state_dict()[name]), name
    # a new registration keeps the scanner's adaptation
    pipeline.set_reference_to_mri(np.eye(4))
    adapted = pipeline.engine
    pipeline(frames[4])
    assert pipeline.engine is adapted and math.isfinite(pipeline(frames[5]).quality)


def test_a_background_build_is_swapped_in_at_a_frame_boundary(case):
    context, frames = case
    adapt = ScannerAdapt(frames=2, background=True)
    pipeline = pipeline_of(context, adapt)
    shipped = pipeline.engine
    pipeline(frames[0])
    pipeline(frames[1])  # the set is complete: the build starts on its thread
    adapt.wait()
    assert pipeline.engine is shipped  # nothing changes mid-frame
    pipeline(frames[2])
    assert pipeline.engine is not shipped and adapt.applied and adapt.info()["build_s"] >= 0


def test_a_failed_build_keeps_the_shipped_network_and_says_why(case, monkeypatch):
    context, frames = case

    def broken(model, trus):
        raise RuntimeError("no memory left")

    monkeypatch.setattr(sa, "adapted_model", broken)
    adapt = ScannerAdapt(frames=2, background=False)
    pipeline = pipeline_of(context, adapt)
    shipped = pipeline.engine
    for frame in frames[:4]:
        result = pipeline(frame)
    assert pipeline.engine is shipped and not adapt.applied
    assert adapt.info()["error"] == "RuntimeError: no memory left"
    assert math.isfinite(result.quality)


def test_modes_and_the_cli():
    from regseg.stream.cli_parser import build_parser

    assert SCANNER_ADAPT_MODES == ("on", "segmentation", "off") and SCANNER_ADAPT_DEFAULT == "off"
    assert build_scanner_adapt("off") is None
    assert isinstance(build_scanner_adapt("on"), ScannerAdapt)
    with pytest.raises(ValueError, match="scanner_adapt 'maybe'"):
        build_scanner_adapt("maybe")
    with pytest.raises(ValueError, match="whole number >= 2"):
        ScannerAdapt(frames=1)
    assert build_parser().parse_args(["--demo", "--scanner-adapt", "on"]).scanner_adapt == "on"
    assert build_parser().parse_args(["--demo"]).scanner_adapt == SCANNER_ADAPT_DEFAULT


def test_the_cli_reports_the_adaptation_in_its_summary(tmp_path, capsys):
    from regseg.stream.cli import main

    stats_path = tmp_path / "stats.json"
    code = main(["--demo", "--serve", "none", "--zmq", "none", "--device", "cpu", "--quiet",
                 "--threads", "1", "--backend", "eager", "--max-frames", "40",
                 "--scanner-adapt", "on", "--stats-json", str(stats_path)])
    assert code == 0, capsys.readouterr().err
    info = json.loads(stats_path.read_text())["scanner_adapt"]
    assert info["frames"] == 12 and info["error"] is None
    assert info["applied"] and info["applied_from_seq"] >= 12


def test_segmentation_scope_adapts_the_segmentation_pass_only(case):
    """--scanner-adapt segmentation: the registration engines stay the shipped ones; the
    segmentation at the published plane runs the adapted network (logits only)."""
    from regseg.stream.build import build_default_capture, build_engine, build_pipeline

    context, frames = case
    adapt = build_scanner_adapt("segmentation", background=False)
    adapt.frames = 3
    pipeline = pipeline_of(context, adapt)
    shipped, theta = pipeline.engine, pipeline.capture.theta_engine
    for frame in frames[:3]:
        pipeline(frame)
    before = pipeline(frames[3])  # runs the adapted segmentation
    assert adapt.applied and pipeline.engine is shipped and pipeline.capture.theta_engine is theta
    assert pipeline.seg_engine is not None and pipeline.seg_engine.model is not shipped.model
    chain = pipeline.chain(frames[3].pixels.shape)
    assert chain.seg_engine is pipeline.seg_engine and chain.engine is shipped
    plain = pipeline_of(context, None)
    for frame in frames[:3]:
        plain(frame)
    again = plain(frames[3])  # the same registration, the shipped segmentation
    np.testing.assert_allclose(before.mri_to_image, again.mri_to_image, atol=1e-9)
    np.testing.assert_array_equal(before.warped_labels, again.warped_labels)
    with pytest.raises(ValueError, match="needs resegment on"):
        build_pipeline(context, build_engine(backend="eager", threads=1),
                       capture=build_default_capture(backend="eager", threads=1),
                       resegment="off", scanner_adapt="segmentation")
    with pytest.raises(ValueError, match="scope 'both'"):
        ScannerAdapt(scope="both")


def test_the_swap_happens_with_the_cpu_overlap_worker_busy(case):
    """--overlap on: a frame's second half is nearly always on the worker when the next one is
    submitted; the swap must not wait for an idle pipeline that never comes."""
    from regseg.stream.build import build_default_capture, build_engine, build_pipeline

    context, frames = case
    adapt = ScannerAdapt(frames=2, background=False)
    pipeline = build_pipeline(context, build_engine(backend="eager", threads=1),
                              capture=build_default_capture(backend="eager", threads=1),
                              lc2="off", overlap=True, scanner_adapt=adapt)
    shipped, results = pipeline.engine, []
    try:
        for frame in frames[:5]:
            results += pipeline.submit(frame)
        results += pipeline.flush()
    finally:
        pipeline.close()
    assert adapt.applied and pipeline.engine is not shipped
    assert [r.frame.seq for r in results] == [f.seq for f in frames[:5]]
