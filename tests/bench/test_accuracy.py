"""bench/accuracy.py: its scoring can fail, its JSON has the promised structure, and the shipped
models keep honest floors on simulator family B (never trained on)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from regseg import metrics

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load_bench():
    sys.path.insert(0, str(BENCH))  # the benches import their sibling ``common``
    try:
        spec = importlib.util.spec_from_file_location("bench_accuracy", BENCH / "accuracy.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


bench = _load_bench()


def _record(tre: float, flagged: bool, estimate: float) -> dict:
    return {"tre_registered_mm": tre, "flagged": flagged, "estimate": estimate}


def test_windows_split_each_run_by_its_frame_number():
    """--windows N: rows of N consecutive scored frames, pooled over the runs of a family and
    level, so the first window is every run's start (how the chain converges)."""
    keys = ("dice_prostate", "dice_lesion", "dice_registered", "dice_lesion_registered",
            "dice_true_plane", "tre_tracked_mm", "tre_tracked_tissue_mm", "total_ms")
    frames = [{**{k: 0.9 for k in keys}, "family": "B", "error_level": 10.0, "phantom": case,
               "seq": seq, "tre_registered_mm": 9.0 if seq < 2 else 1.0,
               "tre_registered_tissue_mm": 9.0 if seq < 2 else 1.0, "flagged": seq < 3,
               "estimate": 1.0} for case in (1, 2) for seq in range(5)]
    rows = bench.window_rows(frames, 2)
    assert [r["name"] for r in rows] == [f"B 10mm/10deg frames {a}-{a + 1}" for a in (0, 2, 4)]
    assert [r["frames"] for r in rows] == [4, 4, 2]
    assert [r["tre_tissue_median_mm"] for r in rows] == [9.0, 1.0, 1.0]
    assert rows[0]["detection"] == 1.0 and rows[1]["false_alarm"] == 0.5
    assert rows[2]["false_alarm"] == 0.0 and rows[0]["first_frame"] == 0


def test_flag_rates_and_roc_count_what_they_say():
    frames = [_record(8.0, True, 0.9), _record(6.0, False, 0.8), _record(1.0, False, 0.1),
              _record(1.5, True, 0.2), _record(3.0, True, 0.5), _record(0.5, False, math.nan)]
    rates = bench.flag_rates(frames)
    assert (rates["n_bad"], rates["n_good"]) == (2, 3)  # 3.0 mm is neither bad nor good
    assert rates["detection"] == 0.5 and rates["false_alarm"] == pytest.approx(1 / 3)
    assert bench.roc(frames)["auc"] == 1.0  # the estimate ranks every bad frame above good ones
    inverted = [{**f, "estimate": -f["estimate"]} for f in frames[:4]]
    assert bench.roc(inverted)["auc"] == 0.0
    assert math.isnan(bench.roc(frames[2:4])["auc"])  # no bad frame: no ROC


def test_flag_reasons_count_which_check_fires_on_bad_and_good_frames():
    frames = [{**_record(8.0, True, 9.0), "family": "B", "flags": ["error_estimate", "jump"]},
              {**_record(1.0, True, 3.0), "family": "B", "flags": ["error_estimate"]},
              {**_record(1.5, True, 1.0), "family": "B", "flags": ["jump"]},
              {**_record(1.2, False, 1.0), "family": "B", "flags": []},
              {**_record(3.0, True, 4.0), "family": "B", "flags": ["disagreement"]},  # neither
              {**_record(0.5, False, 0.4), "family": "A", "flags": []}]
    reasons = bench.flag_reasons(frames)
    assert reasons["B"]["bad"] == {"frames": 1, "error_estimate": 1, "jump": 1}
    assert reasons["B"]["good"] == {"frames": 3, "error_estimate": 1, "jump": 1}
    assert reasons["A"] == {"bad": {"frames": 0}, "good": {"frames": 1}}


def load_trust_bench():
    """bench/trust.py as a module (it imports bench/common.py beside it)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_trust", BENCH / "trust.py")
        trust = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(trust)
    finally:
        sys.path.remove(str(BENCH))
    return trust


def test_trust_bench_rates_name_the_flags_of_good_frames():
    trust = load_trust_bench()
    rows = [{"tre_mm": 9.0, "error_mm": 8.0, "flags": ["error_estimate"], "flagged": True},
            {"tre_mm": 1.0, "error_mm": 3.0, "flags": ["error_estimate"], "flagged": True},
            {"tre_mm": 1.5, "error_mm": 1.0, "flags": [], "flagged": False},
            {"tre_mm": float("nan"), "error_mm": 5.0, "flags": ["jump"], "flagged": True}]
    r = trust.rates(rows)
    assert r["frames"] == 3 and r["detection"] == 1.0 and r["false_alarm_tre_le_2mm"] == 0.5
    assert r["flag_reasons_good"] == {"error_estimate": 1} and r["flag_reasons_bad"] == {
        "error_estimate": 1}
    assert r["estimate_median_bias_good_mm"] == pytest.approx(0.75)  # median of +2.0, -0.5
    # the same frames with the error_estimate flag at another threshold (other flags stay)
    high = trust.rates(trust.at_threshold(rows, 5.0))
    assert high["detection"] == 1.0 and high["false_alarm_tre_le_2mm"] == 0.0
    low = trust.at_threshold(rows, 0.5)
    assert [r["flagged"] for r in low] == [True, True, True, True]
    assert low[3]["flags"] == ["jump", "error_estimate"]


def test_trust_bench_ranks_each_signal_and_the_flags_without_the_estimate():
    trust = load_trust_bench()
    nan = float("nan")
    rows = [  # two bad frames (TRE > 5 mm), three good ones (<= 2 mm)
        {"tre_mm": 9.0, "error_mm": 8.0, "flags": ["error_estimate", "lc2_unsupported"],
         "flagged": True, "lc2_significance": 1.1, "out_of_plane_mm": nan},
        {"tre_mm": 7.0, "error_mm": 2.0, "flags": ["error_estimate"], "flagged": True,
         "lc2_significance": 1.4, "out_of_plane_mm": 4.0},
        {"tre_mm": 1.0, "error_mm": 3.0, "flags": ["error_estimate"], "flagged": True,
         "lc2_significance": 2.5, "out_of_plane_mm": 0.5},
        {"tre_mm": 1.5, "error_mm": 1.0, "flags": [], "flagged": False,
         "lc2_significance": 1.2, "out_of_plane_mm": nan},
        {"tre_mm": 0.5, "error_mm": 0.5, "flags": ["jump"], "flagged": True,
         "lc2_significance": nan, "out_of_plane_mm": 0.2}]
    r = trust.rates(rows)
    assert r["detection_without_estimate"] == 0.5  # lc2_unsupported caught one of the two
    assert r["false_alarm_without_estimate_le_2mm"] == pytest.approx(1 / 3, abs=1e-4)  # jump
    by = r["auc_by_signal"]
    # error_mm: bad 8, 2 vs good 3, 1, 0.5 -> 5 of 6 pairs ordered
    assert by["error_mm"] == {"auc": pytest.approx(5 / 6, abs=1e-4), "bad_frames": 2,
                              "good_frames": 3}
    # lc2_significance, lower is worse, NaN left out: bad 1.1, 1.4 vs good 2.5, 1.2 -> 3 of 4
    assert by["lc2_significance"] == {"auc": 0.75, "bad_frames": 2, "good_frames": 2}
    assert by["out_of_plane_mm"] == {"auc": 1.0, "bad_frames": 1, "good_frames": 2}
    assert by["lc2_move_mm"]["auc"] is None  # not in these rows


def test_trust_bench_warmup_sweep_lies_between_the_scored_frames():
    """--warmup's frames (not scored) are the same session's, half-way between the scored ones."""
    trust = load_trust_bench()
    _, _, scored = trust.open_case("b", 5000, 4)
    _, _, sweep = trust.open_case("b", 5000, 4, halfway=True)
    assert [f.seq for f in scored] == [0, 300, 600, 900]
    assert [f.seq for f in sweep] == [150, 450, 750, 1050]


def test_trust_bench_case_interval_resamples_whole_cases():
    """Pooled detection and false alarms as rates() gives them, with an interval from resampling
    cases: one case that catches nothing against one that catches everything gives a wide one."""
    trust = load_trust_bench()

    def frame(seed, tre, flagged):
        return {"seed": seed, "tre_mm": tre, "flagged": flagged}

    rows = ([frame(1, 8.0, True)] * 4 + [frame(1, 1.0, False)] * 4
            + [frame(2, 8.0, False)] * 4 + [frame(2, 1.0, True)] * 2 + [frame(2, 1.0, False)] * 2
            + [frame(3, float("nan"), True)])
    out = trust.case_interval(rows, draws=300)
    assert out["cases"] == 3 and out["draws"] == 300
    assert out["detection"] == 0.5 and out["false_alarm_tre_le_2mm"] == 0.25
    assert out["detection_lo"] < 0.5 < out["detection_hi"]
    assert out["detection_lo"] <= 0.25 and out["detection_hi"] >= 0.75
    assert out == trust.case_interval(rows, draws=300)  # seeded
    same = [frame(c, 8.0, True) for c in (1, 2)] + [frame(c, 1.0, False) for c in (1, 2)]
    flat = trust.case_interval(same, draws=50)
    assert flat["detection_lo"] == flat["detection_hi"] == 1.0
    assert flat["false_alarm_tre_le_2mm_hi"] == 0.0


def test_noise_twin_keeps_the_pose_and_has_no_gland():
    from regseg.types import Frame, GroundTruth

    pixels = np.zeros((40, 50), np.uint8)
    pixels[5:35, 5:45] = 90
    labels = np.zeros((40, 50), np.uint8)
    labels[10:20, 10:20] = 1
    frame = Frame(seq=3, acquired_ns=0, pixels=pixels, spacing_mm=(0.2, 0.2),
                  image_to_reference=np.eye(4) * 2, truth=GroundTruth(np.eye(4), labels))
    twin = bench.noise_twin(frame, np.random.default_rng(0))
    assert twin.image_to_reference is frame.image_to_reference and twin.seq == 3
    assert (twin.pixels[pixels == 0] == 0).all() and twin.pixels[pixels > 0].std() > 20
    assert not twin.truth.labels.any()


def test_estimate_prefers_error_mm_over_quality():
    class WithError:
        error_mm, quality = 3.5, 0.9

    class QualityOnly:
        quality = 0.75

    class NoGland:
        quality = math.nan

    assert bench.estimate_of(WithError()) == 3.5
    assert bench.estimate_of(QualityOnly()) == 0.25
    assert math.isnan(bench.estimate_of(NoGland()))


@pytest.mark.slow
def test_bench_writes_one_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "acc.json"
    bench.main(["--families", "B", "--phantoms", "1", "--levels", "0,6", "--frames", "2",
                "--deformable", "off", "--backend", "eager", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["bench"] == "accuracy" and "bench/accuracy.py" in data["command"]
    assert data["family_b_seeds"] == [5000] and data["levels"] == [0.0, 6.0]
    rows = {r["name"]: r for r in data["results"]}
    assert set(rows) == {"B 0mm/0deg", "B 6mm/6deg", "B all levels", "B noise frames"}
    for key in ("dice_prostate", "dice_registered", "tre_median_mm", "tre_p90_mm",
                "tre_tracked_median_mm", "tre_tissue_median_mm", "tre_tissue_p90_mm",
                "tre_tissue_tracked_median_mm", "detection", "false_alarm", "frames"):
        assert key in rows["B 0mm/0deg"]
    assert rows["B 0mm/0deg"]["frames"] == 2 and 0 <= rows["B 0mm/0deg"]["dice_prostate"] <= 1
    # the error level is what the frames carry: initial TRE near 0 and near 6 mm
    assert rows["B 0mm/0deg"]["tre_tracked_median_mm"] < 1.0
    assert 4.0 < rows["B 6mm/6deg"]["tre_tracked_median_mm"] < 8.0
    assert set(data["roc"]["B"]) >= {"fpr", "tpr", "auc"}
    assert len(data["frames_detail"]) == 4
    assert rows["B noise frames"]["frames"] == 2 and len(data["noise_detail"]) == 2
    assert 0 <= rows["B noise frames"]["noise_labelled_pct"] <= 100
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "B 6mm/6deg" in capsys.readouterr().out
    # the pooled row: Dice and TRE over every frame of every level, not the tracked error
    pooled, frames = rows["B all levels"], data["frames_detail"]
    assert pooled["frames"] == 4 and pooled["error_level"] is None
    assert pooled["dice_prostate"] == pytest.approx(np.mean([f["dice_prostate"] for f in frames]))
    assert pooled["tre_tissue_median_mm"] == pytest.approx(
        np.median([f["tre_registered_tissue_mm"] for f in frames]))
    assert pooled["tre_tracked_median_mm"] is None  # NaN in the JSON: levels pooled
    assert all(f["out_of_plane_mm"] is None or f["out_of_plane_mm"] >= 0 for f in frames)
    spread = {r["name"]: r for r in data["case_intervals"]}
    assert set(spread) == {"B 0mm/0deg", "B 6mm/6deg", "B all levels"}
    assert spread["B all levels"]["cases"] == 1
    assert spread["B all levels"]["dice_prostate"] == pytest.approx(pooled["dice_prostate"])


def _case_frame(phantom, dice, tre, level=3.0, lesion=float("nan")):
    return {"family": "B", "phantom": phantom, "error_level": level, "dice_prostate": dice,
            "dice_lesion": lesion, "tre_registered_tissue_mm": tre}


def test_case_intervals_resample_whole_cases():
    """The row's value is over all frames; the interval comes from resampling cases (so two
    cases that disagree give a wide one, identical cases none); single cases bound it."""
    records = ([_case_frame(1, 0.9, 1.0) for _ in range(5)]
               + [_case_frame(2, 0.5, 4.0) for _ in range(5)]
               + [_case_frame(3, 0.7, 2.0, lesion=0.4)])
    rows = {r["name"]: r for r in bench.case_intervals(records, draws=400)}
    row = rows["B 3mm/3deg"]
    assert row["cases"] == 3 and row["frames"] == 11 and row["draws"] == 400
    assert row["dice_prostate"] == pytest.approx((5 * 0.9 + 5 * 0.5 + 0.7) / 11)
    assert row["tre_registered_tissue_mm"] == pytest.approx(2.0)  # median of the 11 frames
    assert row["dice_prostate_case_min"] == 0.5 and row["dice_prostate_case_max"] == 0.9
    lo, hi = row["dice_prostate_lo"], row["dice_prostate_hi"]
    assert 0.5 - 1e-9 <= lo < row["dice_prostate"] < hi <= 0.9 + 1e-9
    assert row["dice_prostate_hi"] - row["dice_prostate_lo"] > 0.2
    # only case 3 has a lesion: every draw without it has no lesion Dice and is left out
    assert row["dice_lesion"] == pytest.approx(0.4)
    assert row["dice_lesion_lo"] == pytest.approx(0.4) == row["dice_lesion_hi"]
    assert rows["B all levels"]["dice_prostate"] == row["dice_prostate"]
    same = [_case_frame(c, 0.8, 1.5) for c in (1, 2, 3) for _ in range(4)]
    flat = bench.case_intervals(same, draws=100)[0]
    assert flat["dice_prostate_lo"] == flat["dice_prostate_hi"] == pytest.approx(0.8)
    assert bench.case_intervals(records, draws=50) == bench.case_intervals(records, draws=50)


def test_warmup_runs_a_sweep_before_each_level_and_scores_only_the_level(tmp_path, monkeypatch):
    """--warmup N: N frames spread over the session at the level's tracking error, timed before
    the scored ones, go through the chain first; only the level's frames are scored."""
    sweep = bench.sweep_frames("B", 5090, 3.0, 3)
    assert [f.seq for f in sweep] == [-3, -2, -1] and all(f.acquired_ns < 0 for f in sweep)
    assert len({f.seq for f in sweep}) == 3
    a = bench.sweep_frames("A", 3100, 3.0, 2)
    assert len(a) == 2 and not np.array_equal(a[0].image_to_reference, a[1].image_to_reference)
    ran = []
    real = bench.sweep_frames

    def counting(*args, **kwargs):
        frames = real(*args, **kwargs)
        ran.extend(frames)
        return frames

    monkeypatch.setattr(bench, "sweep_frames", counting)
    out = tmp_path / "acc.json"
    bench.main(["--families", "B", "--b-seeds", "5090", "--levels", "0", "--frames", "1",
                "--deformable", "off", "--backend", "eager", "--warmup", "2",
                "--consensus", "strict", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["warmup"] == 2 and len(ran) == 2
    assert len(data["frames_detail"]) == 1 and data["frames_detail"][0]["seq"] == 0


def test_other_seeds_and_the_chain_options(tmp_path):
    """--b-seeds replaces the evaluation cases (a rule's fresh diagnosis cases); --resegment and
    --consensus reach the chain and the JSON."""
    out = tmp_path / "acc.json"
    bench.main(["--families", "B", "--b-seeds", "5090", "--levels", "0", "--frames", "1",
                "--deformable", "off", "--backend", "eager", "--resegment", "off",
                "--consensus", "on", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["family_b_seeds"] == [5090]
    assert data["resegment"] == "off" and data["consensus"] == "on"
    assert {f["phantom"] for f in data["frames_detail"]} == {5090}


def test_weights_option_runs_every_engine_of_the_chain_on_the_given_alignsegnet(tmp_path,
                                                                                 monkeypatch):
    """--weights (a rule's candidate AlignSegNet): the chain's engine and the capture's extra
    engines load it, and the JSON names it."""
    import shutil

    from regseg.engines import fusion

    weights = tmp_path / "candidate.pt"
    shutil.copy(Path(__file__).resolve().parents[2] / "models" / "weights" / "alignsegnet.pt",
                weights)
    loaded = []
    real = fusion.FusionEngine.__init__

    def spy(self, weights=None, *args, **kwargs):
        loaded.append(str(weights))
        real(self, weights, *args, **kwargs)

    monkeypatch.setattr(fusion.FusionEngine, "__init__", spy)
    out = tmp_path / "acc.json"
    bench.main(["--families", "B", "--b-seeds", "5090", "--levels", "0", "--frames", "1",
                "--deformable", "off", "--backend", "eager", "--weights", str(weights),
                "--json", str(out)])
    assert len(loaded) >= 2 and set(loaded) == {str(weights)}
    assert json.loads(out.read_text())["weights"] == str(weights)


@pytest.mark.slow
def test_family_a_frames_carry_the_set_tracking_error():
    """Family A goes through the same error model: in-plane 6 mm shift and 6 deg rotation about
    a point in the frame, 0.5 mm / 0.5 deg out of plane at most."""
    _, _, frames = bench.family_a_frames(1000, 6.0, 2)
    for frame in frames:
        rel = np.linalg.inv(frame.truth.image_to_mri) @ frame.image_to_reference  # pixel space
        assert abs(abs(np.degrees(np.arctan2(rel[1, 0], rel[0, 0]))) - 6.0) < 0.05
        h, w = frame.pixels.shape
        pts = np.stack(np.meshgrid(np.arange(0, w, 16), np.arange(0, h, 16)), -1).reshape(-1, 2)
        assert 3.0 < metrics.tre_mm(frame.image_to_reference, frame.truth.image_to_mri, pts) < 20


def test_frames_carry_simulated_receipt_times_not_the_wall_clock():
    """The temporal filter resets after a 1 s gap: with wall-clock times a loaded machine
    (slower than 1 s per frame) measured another chain. Frames are STRIDE / 30 s apart."""
    _, _, a = bench.family_a_frames(1000, 3.0, 3)
    _, _, b = bench.family_b_frames(5000, 3.0, 3)
    for frames in (list(a), list(b)):
        assert [f.acquired_ns for f in frames] == [k * bench.FRAME_NS for k in range(3)]
    assert bench.FRAME_NS == bench.STRIDE * 1_000_000_000 // 30


def test_temporal_filter_option_builds_the_capture_it_names():
    """--temporal-filter warm (addendum 27): each frame's networks start from the filtered
    correction; the default is the CLI's capture."""
    from regseg.stream.capture import TEMPORAL_FILTER_DEFAULT

    warm = bench._capture_factory("warm", backend="eager", threads=1)()
    default = bench._capture_factory(backend="eager", threads=1)()
    off = bench._capture_factory("off", backend="eager", threads=1)()
    assert warm.warm_start and warm.temporal is not None and off.temporal is None
    assert default.warm_start == (TEMPORAL_FILTER_DEFAULT == "warm")
    assert default.temporal is not None


def test_stride_one_runs_consecutive_session_frames_33_ms_apart():
    """--stride 1 (for --lc2 async, whose lag costs with the motion between frames): consecutive
    session frames, received as a live 30 fps stream's; the default stride is unchanged."""
    from regseg.sim.family_b.anatomy import make_case
    from regseg.sim.family_b.session import Session, SessionConfig

    case = make_case(5000)
    _, _, one = bench.family_b_frames(5000, 3.0, 3, case, stride=1)
    one = list(one)
    assert [f.acquired_ns for f in one] == [k * (1_000_000_000 // 30) for k in range(3)]
    session = Session(case, SessionConfig(tracking_shift_mm=3.0, tracking_rot_deg=3.0),
                      seed=5000 * 7 + 1)
    start = int(np.random.default_rng([5000, 30, 0xB]).integers(0, 300))
    for k, frame in enumerate(one):  # the session's frames start, start + 1, start + 2
        assert np.array_equal(frame.pixels, session.frame(start + k).pixels)
    _, _, a = bench.family_a_frames(1000, 3.0, 2, stride=1)
    assert [f.acquired_ns for f in a] == [0, bench.frame_ns(1)]
    assert bench.frame_ns(None) == bench.FRAME_NS and bench.frame_ns(1) == bench.FRAME_NS // 4
    with pytest.raises(SystemExit) as exc:
        bench.main(["--stride", "0", "--json", "/nonexistent/x.json"])
    assert exc.value.code == 2


@pytest.fixture(scope="module")
def family_b_results():
    """The default live chain (eager backend: the same numbers as auto's pick) on family-B case
    5000, 6 frames each at tracking errors 0 and 3 mm/deg."""
    from regseg.stream.build import build_deformable, build_engine, build_pipeline
    from regseg.stream.context import build_context

    torch.set_num_threads(1)
    engine = build_engine(backend="eager")
    capture = bench._capture_factory(backend="eager", device="cpu", threads=1)
    out, stage, context = {}, None, None
    for level in (0.0, 3.0):
        mri, labels, frames = bench.family_b_frames(5000, level, 6)
        if context is None:
            context = build_context(mri, labels)
            stage = build_deformable(context, backend="eager")
        pipeline = build_pipeline(context, engine, deformable=stage, capture=capture())
        out[level] = [bench.score_frame(pipeline, r) for f in frames for r in pipeline.submit(f)]
    return out


@pytest.mark.slow
def test_shipped_models_keep_their_family_b_floors(family_b_results):
    """Floors set below what the shipped models and chain of a1b0414 measured here (2026-11-30,
    before the issue-16 work): prostate Dice median 0.88 at 0 mm and 0.80 at 3 mm/3 deg,
    registered prostate Dice 0.88 at 0 mm, registered TRE median 2.74 mm at 3 mm/3 deg (from a
    tracked 2.64 mm: no correction). They catch a broken family B or a broken chain; the issue's
    targets (Dice >= 0.93, TRE <= 1.5 mm at 3 mm/3 deg) are not met by those models.

    The AlignSegNet retrained in session 7 (c823f51) measures on this case: prostate Dice 0.79 at
    0 mm (12 frames: 0.79) and 0.85 at 3 mm; registered Dice 0.80 (12 frames: 0.75) and 0.87;
    registered TRE 2.0 mm at 3 mm. The 0 mm Dice floors are therefore 0.75 and 0.7 (were 0.8):
    on this one case the new network trades 0 mm for 3 mm, while bench/accuracy.py's four
    family-B cases improved at every level (prostate Dice 0.865 -> 0.885 at 0 mm)."""
    def median(level, key):
        v = np.asarray([r[key] for r in family_b_results[level]], dtype=float)
        return float(np.nanmedian(v))

    assert median(0.0, "dice_prostate") > 0.75
    assert median(3.0, "dice_prostate") > 0.7
    assert median(0.0, "dice_registered") > 0.7
    assert 2.0 < median(3.0, "tre_tracked_mm") < 4.0  # the error level is what frames carry
    assert median(3.0, "tre_registered_mm") < 3.5
    # against the moved tissue: from a perfect plane the tissue motion alone is the error
    # (0.41 mm measured here on 2026-12-01), the registration's, field included, stays bounded
    assert median(0.0, "tre_tracked_tissue_mm") > median(0.0, "tre_tracked_mm")
    assert 0.1 < median(0.0, "tre_tracked_tissue_mm") < 1.5
    assert median(3.0, "tre_registered_tissue_mm") < 3.5


def test_tracked_frames_out_of_plane_option_moves_the_plane_along_its_normal():
    """``out_of_plane``: every frame's pose is also off along the normal by ~MM and tilted; without
    it the stream is the one every committed run used (the option draws its sign only when set)."""
    from regseg.sim.phantom import make_phantom
    from regseg.sim.scanner import ScannerConfig

    phantom = make_phantom(3100)
    cfg = ScannerConfig(tracking_rot_deg=0.0, tracking_shift_mm=0.0, tracking_scale=0.0,
                        out_of_plane_mm=0.0)
    plain = list(bench.tracked_frames(phantom, cfg, 3100, 0.0, 2))
    again = list(bench.tracked_frames(phantom, cfg, 3100, 0.0, 2, out_of_plane=None))
    moved = list(bench.tracked_frames(phantom, cfg, 3100, 0.0, 2, out_of_plane=2.0))
    for a, b, c in zip(plain, again, moved, strict=True):
        assert np.array_equal(a.image_to_reference, b.image_to_reference)
        true = a.truth.image_to_mri
        normal = true[:3, 2] / np.linalg.norm(true[:3, 2])
        centre = np.array([cfg.frame_hw[1] / 2, cfg.frame_hw[0] / 2, 0.0, 1.0])
        off_plain = abs(normal @ (a.image_to_reference @ centre - true @ centre)[:3])
        off_moved = abs(normal @ (c.image_to_reference @ centre - true @ centre)[:3])
        assert off_plain < 1.0 and 1.5 < off_moved < 4.0, (off_plain, off_moved)
