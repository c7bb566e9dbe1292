"""Accuracy of the live chain on both simulator families, across tracking errors 0-15 mm / 15 deg.

Family A (``regseg.sim``: what the models were trained on) on its held-out phantoms 1000..; family
B (``regseg.sim.family_b``: written separately, never trained on) on its evaluation seeds 5000...
For every phantom and tracking-error level (an in-plane rigid error of exactly L mm and L deg,
plus 0.5 mm / 0.5 deg out of plane, the same model for both families) a fresh live chain, built
as ``regseg-stream`` builds it (``regseg.stream.build``), runs on a stretch of the session. Per
frame: prostate and lesion Dice of the predicted labels, prostate and lesion Dice of the
registered MRI labels (the lesion there is the biopsy target carried from the MRI), TRE (mm,
tracked and registered plane vs the true one, over the true prostate pixels:
``regseg.stream.runner.frame_accuracy``), the *tissue* TRE (where the published map -- plane
and deformable field -- puts the MRI under each true prostate pixel vs where the simulator's
moved tissue truly lies: ``regseg.metrics.tissue_tre_mm``), the flag, and the per-frame error
estimate (``Result.error_mm`` where the Result has it, else ``1 - quality``).

Reported per family and level: Dice means (and the prostate and lesion Dice of the MRI labels on the
TRUE plane: the ceiling of a perfect rigid registration), the biopsy target's error (the published
MRI lesion centroid vs the true lesion's, mm: median and p90; how often the truth lies within the
published margin on frames that show a target; the same error at the true plane), TRE median and
p90, the capture curve (final TRE vs initial error), the flag's detection rate (frames with true
registered TRE > 5 mm that are flagged) and false-alarm rate (frames with TRE <= 2 mm that are
flagged), per family the ROC of the per-frame error estimate for the same two classes, and on a
pure-speckle twin of every frame of the first level (same pose) how often a gland over 1 cm^2 is
labelled and how often it is published (labelled and not flagged). One JSON, one table, one PNG.

``python bench/accuracy.py [--quick] [--json F] [--plot F.png]``; ``--quick`` (2 phantoms per
family, levels 0/3/10, 10 frames each) stays under ~5 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_plot import plot  # noqa: E402
from accuracy_scoring import (  # noqa: E402,F401  (re-exported: other benches and tests)
    BAD_MM,
    BOOTSTRAP_DRAWS,
    GOOD_MM,
    NOISE_GLAND_MM2,
    _nan,
    case_intervals,
    estimate_check_verdicts,
    estimate_of,
    flag_rates,
    flag_reasons,
    labels_sources,
    noise_row,
    pooled_row,
    roc,
    score_frame,
    score_noise,
    summarise,
    true_plane_labels,
    window_rows,
)
from common import device_name, print_table, write_json  # noqa: E402

from regseg.types import Frame  # noqa: E402

FAMILY_A_SEEDS = range(1000, 1100)  # held out from training (train/alignsegnet.py VAL_SEED0)
STRIDE = 4  # session frames between evaluated frames (a smooth, real-time-like stretch)
#: Receipt time between evaluated frames: STRIDE frames at 30 fps, simulated, not the wall clock
#: (the temporal filter resets after a 1 s gap: with the wall clock a loaded machine, slower
#: than 1 s per frame, reset it on every frame and measured another chain)
FRAME_NS = STRIDE * 1_000_000_000 // 30


def frame_ns(stride: int | None) -> int:
    """Receipt time between evaluated frames ``stride`` session frames apart (None: STRIDE)."""
    return (STRIDE if stride is None else stride) * 1_000_000_000 // 30


# ------------------------------------------------------------------------------ frames
def family_a_frames(seed: int, level: float, n: int, stride: int | None = None):
    """(mri, labels, frames) of family-A phantom ``seed`` with tracking error ``level``
    (``stride``: session frames between them; None: STRIDE)."""
    from regseg.sim.phantom import make_phantom
    from regseg.sim.scanner import ScannerConfig

    phantom = make_phantom(seed)
    cfg = ScannerConfig(tracking_rot_deg=0.0, tracking_shift_mm=0.0, tracking_scale=0.0,
                        out_of_plane_mm=0.0)
    return phantom.mri, phantom.labels, tracked_frames(phantom, cfg, seed, level, n,
                                                       stride=stride)


def tracked_frames(phantom, cfg, seed: int, level: float, n: int,
                   out_of_plane: float | None = None, indices=None, stride: int | None = None):
    """``n`` frames of a family-A ``phantom`` through scanner ``cfg`` (its own tracking error
    off), STRIDE apart, with an in-plane error of exactly ``level`` mm and deg about a point in
    the frame (direction drifting slowly) plus 0.5 mm / 0.5 deg out of plane (oscillating about
    0); ``out_of_plane``: instead ``out_of_plane`` mm along the normal and deg of tilt (sign per
    phantom and level, +-10 % drift); ``indices``: these session frames instead (the same
    error model, e.g. :func:`sweep_frames`'); ``stride``: instead of STRIDE."""
    from regseg.sim.family_b.session import tracking_error_matrix
    from regseg.sim.scanner import SimulatedScanner

    scanner = SimulatedScanner(phantom, cfg, seed=99_000 + seed)
    rng = np.random.default_rng([seed, int(level * 10), 0xA])
    start = int(rng.integers(0, 2 * cfg.sweep_frames))
    direction, sign = rng.uniform(0, 2 * np.pi), rng.choice([-1.0, 1.0])
    h, w = cfg.frame_hw
    centre = np.array([w, h]) * (0.5 + rng.uniform(-0.15, 0.15, 2))
    normal_sign = rng.choice([-1.0, 1.0]) if out_of_plane is not None else 0.0
    for k, index in enumerate(list(indices) if indices is not None else
                              [start + k * (stride or STRIDE) for k in range(n)]):
        f = scanner.frame(index)
        t = float(index)
        if out_of_plane is None:
            normal, tilt = 0.5 * np.sin(t / 80), 0.5 * np.sin(t / 56)
        else:
            normal = normal_sign * out_of_plane * (1 + 0.1 * np.sin(t / 80))
            tilt = out_of_plane * (1 + 0.1 * np.sin(t / 56))
        err = tracking_error_matrix(
            level, sign * level, direction_rad=direction + 0.3 * np.sin(t / 64),
            centre_ij=centre, pixel_mm=cfg.pixel_mm, normal_mm=normal, tilt_deg=tilt)
        yield dataclasses.replace(f, seq=k, acquired_ns=k * frame_ns(stride),
                                  image_to_reference=f.truth.image_to_mri @ err)


def family_b_frames(seed: int, level: float, n: int, case=None, stride: int | None = None):
    """(mri, labels, frames) of family-B case ``seed`` with tracking error ``level``
    (``stride``: session frames between them; None: STRIDE)."""
    from regseg.sim.family_b.anatomy import make_case
    from regseg.sim.family_b.session import Session, SessionConfig

    case = case if case is not None else make_case(seed)
    session = Session(case, SessionConfig(tracking_shift_mm=level, tracking_rot_deg=level),
                      seed=seed * 7 + 1)
    start = int(np.random.default_rng([seed, int(level * 10), 0xB]).integers(0, 300))

    def frames():
        for k in range(n):
            yield dataclasses.replace(session.frame(start + k * (stride or STRIDE)), seq=k,
                                      acquired_ns=k * frame_ns(stride))

    return case.mri, case.labels, frames()


def sweep_frames(family: str, seed: int, level: float, n: int, case=None) -> list[Frame]:
    """``--warmup``: ``n`` frames spread over the whole session with the same tracking error as
    the level's scored frames, timed just before them: the sweep an operator makes after a
    registration (which the 3-D consensus needs), run through the chain but not scored."""
    if family == "A":
        from regseg.sim.phantom import make_phantom
        from regseg.sim.scanner import ScannerConfig

        cfg = ScannerConfig(tracking_rot_deg=0.0, tracking_shift_mm=0.0, tracking_scale=0.0,
                            out_of_plane_mm=0.0)
        spread = np.linspace(0, 2 * cfg.sweep_frames, n, endpoint=False).astype(int)
        frames = list(tracked_frames(make_phantom(seed), cfg, seed, level, n, indices=spread))
    else:
        from regseg.sim.family_b.anatomy import make_case
        from regseg.sim.family_b.session import Session, SessionConfig

        session = Session(case if case is not None else make_case(seed),
                          SessionConfig(tracking_shift_mm=level, tracking_rot_deg=level),
                          seed=seed * 7 + 1)
        frames = [session.frame(int(i)) for i in np.linspace(0, 1200, n, endpoint=False)]
    return [dataclasses.replace(f, seq=k - n, acquired_ns=(k - n) * FRAME_NS)
            for k, f in enumerate(frames)]


# ------------------------------------------------------------------------------ run
def noise_twin(frame: Frame, rng: np.random.Generator) -> Frame:
    """The frame with its image replaced by pure speckle noise (log-compressed Rayleigh, mid-grey)
    inside its non-zero area: same pose, same size. Nothing in it is a gland."""
    db = 20.0 * np.log10(rng.rayleigh(1.0, frame.pixels.shape) + 1e-6)
    grey = np.clip((db + 25.0) / 50.0, 0.0, 1.0) * 255.0
    pixels = np.where(frame.pixels > 0, grey, 0.0).round().astype(np.uint8)
    truth = dataclasses.replace(frame.truth, labels=np.zeros_like(frame.truth.labels))
    return dataclasses.replace(frame, pixels=pixels, truth=truth)


def run(families: list[str], phantoms: int, levels: list[float], frames_per_run: int, *,
        deformable: bool | str, backend: str, device: str, threads: int | None,
        progress: bool = True, deformable_weights: str | None = None,
        quality_weights: str | None = None, roi: str = "default", lc2: str = "default",
        resegment: str = "default", consensus: str = "default", intensity: str = "default",
        seg_window: str = "default", jump_at: str = "default", seg_tta: str = "default",
        seg_prior: str = "default", seeds: dict[str, list[int]] | None = None,
        warmup: int = 0, scanner_adapt: str = "default", estimate_check: str = "default",
        seg_fallback: str = "default", temporal_filter: str = "default",
        stride: int | None = None, lc2_hold: str = "default", lc2_rescue: str = "default",
        weights: str | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """Every (family, phantom, level) run, and a noise twin of every frame of the first level
    (same pose, pure speckle) through a fresh chain; returns (rows, records, noise records).

    ``weights`` / ``deformable_weights`` / ``quality_weights``: other AlignSegNet / PLCReg 2-D /
    QualityNet weights than the shipped ones (to compare a retrained model with the same chain);
    None: the shipped.
    ``seeds``: per family, other phantoms than the evaluation ones (calibration phantoms or
    diagnosis cases, for a rule that must not choose on the evaluation cases). ``warmup``:
    :func:`sweep_frames` run (not scored) before each level's frames. ``scanner_adapt``:
    ``--scanner-adapt``'s mode, built without the background thread (the swap then happens at the
    same frame in every run). ``estimate_check``: ``--estimate-check``'s mode; ``seg_fallback``:
    ``--seg-fallback``'s; ``temporal_filter``: ``--temporal-filter``'s; ``stride``: session frames
    between a run's frames (None: STRIDE); ``lc2_hold``, ``lc2_rescue``: ``--lc2-hold``'s and
    ``--lc2-rescue``'s; ``deformable``: on (True), off (False), or a ``--deformable`` mode
    (``async`` and ``lag``: each chain gets its own DeformableLagged, in order)."""
    from regseg.stream.build import build_deformable, build_engine, build_pipeline
    from regseg.stream.context import build_context
    from regseg.stream.deformable_lag import bench_stage
    from regseg.stream.lc2_lag import in_order

    deformable_mode = {True: "on", False: "off"}.get(deformable, deformable)

    def make_pipeline(context, stage):
        stage = bench_stage(stage, deformable_mode)  # lag: a DeformableLagged per chain
        extra = {}
        if scanner_adapt != "default" or _tree_has("scanner_adapt"):
            from regseg.stream.scanner_adapt import SCANNER_ADAPT_DEFAULT, build_scanner_adapt

            mode = SCANNER_ADAPT_DEFAULT if scanner_adapt == "default" else scanner_adapt
            extra["scanner_adapt"] = build_scanner_adapt(mode, background=False)
        if estimate_check != "default":
            extra["estimate_check"] = estimate_check
        if seg_fallback != "default":
            extra["seg_fallback"] = seg_fallback
        extra["lc2"] = in_order(lc2)  # async as lag (regseg.stream.lc2_lag)
        for name, value in (("lc2_hold", lc2_hold), ("lc2_rescue", lc2_rescue)):
            if value != "default":
                extra[name] = value
        pipeline = build_pipeline(context, engine, deformable=stage, capture=capture(), roi=roi,
                                  **extra, **{k: v for k, v in (("resegment", resegment),
                                                                 ("consensus", consensus),
                                                                 ("intensity", intensity),
                                                                 ("seg_window", seg_window),
                                                                 ("jump_at", jump_at),
                                                                 ("seg_tta", seg_tta),
                                                                 ("seg_prior", seg_prior))
                                              if v != "default"})
        if quality_weights is not None:  # the Pipeline makes the shipped one on first use
            from regseg.stream.quality import QualityCheck, QualityConfig

            check = pipeline.quality.self_check if _tree_has("estimate_check") else None
            pipeline._quality = QualityCheck(context, QualityConfig(weights=quality_weights))
            pipeline._quality.self_check = check
        return pipeline

    engine = build_engine(weights, backend=backend, device=device, threads=threads)
    capture = _capture_factory(backend=backend, device=device, threads=threads,
                               temporal_filter=temporal_filter,
                               **({"weights": weights} if weights else {}))
    records: list[dict] = []
    noise_records: list[dict] = []
    for family in families:
        chosen = (seeds or {}).get(family) or (FAMILY_A_SEEDS if family == "A"
                                                else _family_b_seeds())
        for seed in list(chosen)[:phantoms]:
            case = None
            if family == "B":
                from regseg.sim.family_b.anatomy import make_case
                case = make_case(seed)
            context = stage = None
            twins: list[Frame] = []
            rng = np.random.default_rng([seed, 0xE0])
            for level in levels:
                mri, labels, frames = (family_a_frames(seed, level, frames_per_run, stride)
                                       if family == "A" else
                                       family_b_frames(seed, level, frames_per_run, case,
                                                       stride))
                if context is None:
                    context = build_context(mri, labels, device)
                    stage = (build_deformable(context, deformable_weights or "plcreg2d",
                                              backend=backend, threads=threads)
                             if deformable_mode != "off" else None)
                pipeline = make_pipeline(context, stage)
                for frame in (sweep_frames(family, seed, level, warmup, case) if warmup else []):
                    pipeline.submit(frame)
                    pipeline.flush()
                t0 = time.perf_counter()
                for frame in frames:
                    if level == levels[0]:
                        twins.append(noise_twin(frame, rng))
                    for result in pipeline.submit(frame) + pipeline.flush():
                        records.append({"family": family, "phantom": seed, "error_level": level,
                                        "seq": result.frame.seq,
                                        **score_frame(pipeline, result)})
                if progress:
                    mine = [r for r in records if r["family"] == family and r["phantom"] == seed
                            and r["error_level"] == level]
                    s = summarise(family, level, mine)
                    print(f"  {family} phantom {seed} error {level:g}: dice "
                          f"{s['dice_prostate']:.3f} lesion {s['dice_lesion']:.3f} reg "
                          f"{s['dice_registered']:.3f} TRE "
                          f"{s['tre_tracked_median_mm']:.2f} -> {s['tre_median_mm']:.2f} mm "
                          f"(tissue {s['tre_tissue_median_mm']:.2f}) "
                          f"flagged {s['flagged_pct']:.0f}% ({time.perf_counter() - t0:.1f} s)",
                          flush=True)
            pipeline = make_pipeline(context, stage)
            for frame in twins:
                for result in pipeline.submit(frame) + pipeline.flush():
                    noise_records.append({"family": family, "phantom": seed,
                                          **score_noise(result)})
    rows = [summarise(fam, lv, [r for r in records
                                if r["family"] == fam and r["error_level"] == lv])
            for fam in families for lv in levels]
    rows += [noise_row(fam, [r for r in noise_records if r["family"] == fam]) for fam in families]
    return rows, records, noise_records


def _tree_has(stage: str) -> bool:
    """Whether the tree has the live stage ``regseg.stream.<stage>`` (a baseline tree may
    predate it, e.g. scanner_adapt, estimate_check)."""
    import importlib.util

    return importlib.util.find_spec(f"regseg.stream.{stage}") is not None


def _capture_factory(temporal_filter: str = "default", **engine_options):
    """A maker of the CLI's default capture stage (one per run: it keeps temporal state), or of
    None on a tree that predates ``regseg.stream.capture`` (the baseline); ``temporal_filter``:
    ``--temporal-filter``'s mode instead of the CLI's default."""
    try:
        import regseg.stream.capture  # noqa: F401
        from regseg.stream.build import build_default_capture
    except ImportError:
        return lambda: None
    if temporal_filter == "default":
        return lambda: build_default_capture(**engine_options)
    from regseg.stream.capture import MULTI_START_DEFAULT, REFINE_ITERATIONS, build_capture

    return lambda: build_capture(REFINE_ITERATIONS, MULTI_START_DEFAULT == "on", temporal_filter,
                                 **engine_options)


def chain_description() -> dict[str, Any]:
    """What chain ran: capture defaults if the tree has them, and the git commit."""
    import subprocess

    out: dict[str, Any] = {}
    try:
        from regseg.stream import capture

        out["capture"] = {"refine_iterations": capture.REFINE_ITERATIONS,
                          "multi_start": capture.MULTI_START_DEFAULT,
                          "temporal_filter": capture.TEMPORAL_FILTER_DEFAULT}
    except ImportError:
        out["capture"] = None
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                       text=True, cwd=Path(__file__).parent,
                                       check=False).stdout.strip() or None
    except OSError:
        out["commit"] = None
    return out


def _family_b_seeds():
    from regseg.sim.family_b import EVAL_SEEDS

    return EVAL_SEEDS


COLUMNS = (("name", "run", ""), ("frames", "frames", "d"), ("dice_prostate", "dice", ".3f"),
           ("dice_lesion", "lesion", ".3f"), ("dice_registered", "reg_dice", ".3f"),
           ("dice_lesion_registered", "reg_les", ".3f"), ("dice_true_plane", "true_pl", ".3f"),
           ("dice_lesion_true_plane", "true_les", ".3f"),
           ("target_error_median_mm", "tgt_mm", ".2f"), ("target_in_margin", "tgt_in_m", ".2f"),
           ("target_error_true_plane_median_mm", "tgt_true", ".2f"),
           ("tre_tracked_median_mm", "TRE_in", ".2f"), ("tre_median_mm", "TRE_med", ".2f"),
           ("tre_p90_mm", "TRE_p90", ".2f"), ("tre_tissue_median_mm", "TREt_med", ".2f"),
           ("tre_tissue_p90_mm", "TREt_p90", ".2f"), ("detection", "detect", ".2f"),
           ("n_bad", "n_bad", "d"), ("false_alarm", "false_al", ".2f"), ("n_good", "n_good", "d"),
           ("flagged_pct", "flag%", ".0f"), ("noise_labelled_pct", "noise_lab%", ".0f"),
           ("noise_published_pct", "noise_pub%", ".0f"))
INTERVAL_COLUMNS = (
    ("name", "run", ""), ("cases", "cases", "d"), ("dice_prostate", "dice", ".3f"),
    ("dice_prostate_lo", "lo", ".3f"), ("dice_prostate_hi", "hi", ".3f"),
    ("dice_prostate_case_min", "case min", ".3f"), ("dice_prostate_case_max", "case max", ".3f"),
    ("dice_lesion", "lesion", ".3f"), ("dice_lesion_lo", "lo", ".3f"),
    ("dice_lesion_hi", "hi", ".3f"), ("tre_registered_tissue_mm", "TREt_med", ".2f"),
    ("tre_registered_tissue_mm_lo", "lo", ".2f"), ("tre_registered_tissue_mm_hi", "hi", ".2f"),
    ("tre_registered_tissue_mm_case_max", "case max", ".2f"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 phantoms per family, levels 0,3,10, "
                   "10 frames each: < ~5 min on a 2-core CPU")
    p.add_argument("--families", default="A,B", help="A, B or A,B (default both)")
    p.add_argument("--phantoms", type=int, default=None, help="per family (quick 2, full 4)")
    p.add_argument("--levels", default=None,
                   help="tracking-error levels, mm = deg (quick 0,3,10; full 0,3,6,10,15)")
    p.add_argument("--frames", type=int, default=None, help="frames per run (quick 10, full 20)")
    p.add_argument("--deformable", choices=["default", "on", "off", "async", "lag"],
                   default="default",
                   help="live deformable stage, as regseg-stream --deformable (default: the "
                   "CLI's); async runs as lag, the same arithmetic in order")
    p.add_argument("--backend", default="auto", help="engine backend (default auto, as the CLI)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CLI default on CPU: 1)")
    p.add_argument("--json", default=None, help="write rows, ROC and per-frame records here")
    p.add_argument("--plot", default=None, help="PNG (default: next to --json)")
    p.add_argument("--weights", default=None,
                   help="AlignSegNet weights (default: the shipped models/weights/alignsegnet.pt)")
    p.add_argument("--quality-weights", default=None,
                   help="QualityNet weights (default: the shipped models/weights/qualitynet.pt)")
    p.add_argument("--deformable-weights", default=None,
                   help="PLCReg 2-D weights (default: the shipped models/weights/plcreg2d.pt)")
    from regseg.stream.roi import ROI_MODES

    p.add_argument("--roi", choices=["default", *ROI_MODES], default="default",
                   help="the gland-centred window, as regseg-stream --roi (default: its default)")
    from regseg.stream.lc2_lag import LAG_MODES
    from regseg.stream.lc2_stage import BENCH_MODES, LC2_MODES

    p.add_argument("--lc2", choices=["default", *dict.fromkeys([*LC2_MODES, *BENCH_MODES,
                                                                *LAG_MODES])], default="default",
                   help="the image-based refinement, as regseg-stream --lc2 (default: its "
                   "default; async is run as lag, the same one frame late in order), or a bench "
                   "mode (regseg.stream.lc2_stage.BENCH_MODES)")
    from regseg.stream.lc2_stage import LC2_HOLD, LC2_RESCUE

    p.add_argument("--lc2-hold", choices=["default", *LC2_HOLD], default="default",
                   help="keep a registration LC2 found over its cap, as regseg-stream --lc2-hold "
                   "(default: its default)")
    p.add_argument("--lc2-rescue", choices=["default", *LC2_RESCUE], default="default",
                   help="search LC2 again from other starts when the first applies nothing, as "
                   "regseg-stream --lc2-rescue (default: its default)")
    p.add_argument("--resegment", choices=["default", "on", "off"], default="default",
                   help="segment again at the published plane, as regseg-stream --resegment "
                   "(default: its default)")
    from regseg.stream.consensus import BENCH_MODES as CONSENSUS_BENCH_MODES
    from regseg.stream.consensus import CONSENSUS_MODES

    p.add_argument("--consensus", choices=["default", *CONSENSUS_MODES, *CONSENSUS_BENCH_MODES],
                   default="default",
                   help="the 3-D consensus and its out_of_plane flag, as regseg-stream "
                   "--consensus (default: its default), or a bench mode "
                   "(regseg.stream.consensus.BENCH_MODES)")
    p.add_argument("--intensity", choices=["default", "match", "off"], default="default",
                   help="grey levels matched to the training scanner's, as regseg-stream "
                   "--intensity (default: its default)")
    p.add_argument("--seg-window", choices=["default", "auto", "off"], default="default",
                   help="segment on a gland window, as regseg-stream --seg-window (default: its "
                   "default)")
    p.add_argument("--seg-tta", choices=["default", "flip", "off"], default="default",
                   help="segment the frame and its mirror image and average, as regseg-stream "
                   "--seg-tta (default: its default)")
    p.add_argument("--seg-prior", choices=["default", "on", "gated", "off"], default="default",
                   help="pool the segmentation with the registered MRI labels, as regseg-stream "
                   "--seg-prior (default: its default)")
    p.add_argument("--seg-fallback", choices=["default", "mri", "off"], default="default",
                   help="publish the registered MRI labels after a failed estimate check, as "
                   "regseg-stream --seg-fallback (default: its default)")
    p.add_argument("--scanner-adapt", choices=["default", "on", "segmentation", "off"],
                   default="default",
                   help="adapt the TRUS encoder's normalisation to the case's frames, as "
                   "regseg-stream --scanner-adapt (default: its default)")
    p.add_argument("--estimate-check", choices=["default", "on", "inform", "off"],
                   default="default",
                   help="check the error estimate on each run's first frames against a known "
                   "4 mm displacement, as regseg-stream --estimate-check (default: its default)")
    p.add_argument("--jump-at", choices=["default", "frame", "gland"], default="default",
                   help="where the jump flag measures, as regseg-stream --jump-at (default: its "
                   "default)")
    p.add_argument("--a-seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="family-A phantoms instead of the held-out 1000.. (e.g. calibration "
                   "phantoms for a predeclared rule)")
    p.add_argument("--b-seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="family-B cases instead of the evaluation 5000.. (e.g. diagnosis cases)")
    p.add_argument("--warmup", type=int, default=0,
                   help="frames run (not scored) before each level's, spread over the session at "
                   "the same tracking error: the sweep after a registration, which the 3-D "
                   "consensus (--consensus) needs (default 0)")
    p.add_argument("--temporal-filter", choices=["default", "on", "off", "warm"],
                   default="default", help="the capture's temporal filter, as regseg-stream "
                   "--temporal-filter (default: its default)")
    p.add_argument("--stride", type=int, default=None, metavar="N",
                   help=f"session frames between a run's frames (default {STRIDE}; 1: "
                   "consecutive frames, as a live stream's, e.g. for --lc2 async)")
    p.add_argument("--windows", type=int, default=None, metavar="N",
                   help="also rows per N consecutive scored frames of every run (JSON 'windows'): "
                   "how the chain converges after a start, e.g. with --stride 1 --frames 120")
    p.add_argument("--label", default=None,
                   help="free text stored in the JSON to name the chain, e.g. 'baseline a1b0414'")
    args = p.parse_args(argv)
    families = [f.strip().upper() for f in args.families.split(",") if f.strip()]
    if not families or any(f not in ("A", "B") for f in families):
        p.error(f"--families {args.families!r}: A, B or A,B expected")
    if args.windows is not None and args.windows < 1:
        p.error(f"--windows {args.windows}: a whole number of frames >= 1 expected")
    if args.stride is not None and args.stride < 1:
        p.error(f"--stride {args.stride}: a whole number of session frames >= 1 expected")
    levels = ([float(v) for v in args.levels.split(",")] if args.levels else
              [0.0, 3.0, 10.0] if args.quick else [0.0, 3.0, 6.0, 10.0, 15.0])
    seeds = {"A": args.a_seeds, "B": args.b_seeds}
    phantoms = args.phantoms or max(2 if args.quick else 4, *(len(v or ()) for v in
                                                               seeds.values()))
    frames = args.frames or (10 if args.quick else 20)
    torch.set_num_threads(args.threads)
    from regseg.stream.deformable_lag import in_order as deformable_in_order

    t0 = time.perf_counter()
    args.deformable = deformable_in_order(args.deformable)  # async as lag
    rows, records, noise = run(families, phantoms, levels, frames,
                               deformable=args.deformable,
                               backend=args.backend, device=args.device,
                               threads=args.threads, deformable_weights=args.deformable_weights,
                               quality_weights=args.quality_weights, roi=args.roi,
                               lc2=args.lc2, resegment=args.resegment,
                               consensus=args.consensus, intensity=args.intensity,
                               seg_window=args.seg_window, jump_at=args.jump_at,
                               seg_tta=args.seg_tta, seg_prior=args.seg_prior,
                               seeds=seeds, warmup=args.warmup,
                               scanner_adapt=args.scanner_adapt,
                               estimate_check=args.estimate_check,
                               seg_fallback=args.seg_fallback,
                               temporal_filter=args.temporal_filter, stride=args.stride,
                               lc2_hold=args.lc2_hold, lc2_rescue=args.lc2_rescue,
                               weights=args.weights)
    rocs = {fam: roc([r for r in records if r["family"] == fam]) for fam in families}
    rows += [pooled_row(fam, [r for r in records if r["family"] == fam], rocs[fam]["auc"])
             for fam in families]
    wall = time.perf_counter() - t0
    print(f"\naccuracy: live chain (deformable {args.deformable}), {phantoms} phantoms per "
          f"family x {frames} frames, {device_name(args.device)}; bad = TRE > {BAD_MM:g} mm, "
          f"good = TRE <= {GOOD_MM:g} mm")
    print_table(rows, COLUMNS)
    print("estimate ROC AUC: " + ", ".join(f"{f} {rocs[f]['auc']:.3f}" for f in families)
          + f"; wall {wall:.0f} s")
    intervals = case_intervals(records)
    print(f"\nacross cases: the row's value, a 95 % interval from resampling whole cases "
          f"({BOOTSTRAP_DRAWS} draws), and the lowest and highest single case")
    print_table(intervals, INTERVAL_COLUMNS)
    windows = window_rows(records, args.windows) if args.windows else None
    if windows:
        print(f"\nper {args.windows} consecutive scored frames of every run")
        print_table(windows, COLUMNS)
    for fam, by in flag_reasons(records).items():
        print(f"flag reasons, family {fam}: " + "; ".join(
            f"{k} frames {v['frames']}: " + ", ".join(f"{r} {n}" for r, n in v.items()
                                                      if r != "frames") for k, v in by.items()))
    for fam, counts in estimate_check_verdicts(records).items():
        print(f"--estimate-check, family {fam}, runs ending: "
              + ", ".join(f"{k} {n}" for k, n in counts.items()))
    for fam, counts in labels_sources(records).items():
        print(f"published labels, family {fam}: "
              + ", ".join(f"{k} {n}" for k, n in counts.items()))
    if args.json:
        write_json(args.json, "accuracy", rows, argv, device=device_name(args.device),
                   quick=args.quick, deformable=args.deformable, backend=args.backend,
                   phantoms_per_family=phantoms, frames_per_run=frames, levels=levels,
                   family_a_seeds=list(args.a_seeds or FAMILY_A_SEEDS)[:phantoms],
                   family_b_seeds=list(args.b_seeds or _family_b_seeds())[:phantoms],
                   resegment=args.resegment, consensus=args.consensus,
                   intensity=args.intensity, seg_window=args.seg_window, jump_at=args.jump_at,
                   seg_tta=args.seg_tta, seg_prior=args.seg_prior,
                   scanner_adapt=args.scanner_adapt, estimate_check=args.estimate_check,
                   estimate_check_verdicts=estimate_check_verdicts(records),
                   seg_fallback=args.seg_fallback, labels_sources=labels_sources(records),
                   bad_mm=BAD_MM,
                   good_mm=GOOD_MM, roc=rocs, wall_s=wall, label=args.label,
                   chain=chain_description(), noise_gland_mm2=NOISE_GLAND_MM2,
                   quality_weights=args.quality_weights, weights=args.weights,
                   deformable_weights=args.deformable_weights, roi=args.roi, lc2=args.lc2,
                   lc2_hold=args.lc2_hold, lc2_rescue=args.lc2_rescue,
                   flag_reasons=flag_reasons(records), case_intervals=intervals,
                   warmup=args.warmup, stride=args.stride or STRIDE,
                   temporal_filter=args.temporal_filter,
                   **({"windows": windows} if windows else {}),
                   frames_detail=records, noise_detail=noise)
    plot_path = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot_path:
        plot(plot_path, rows, rocs, records, bad_mm=BAD_MM, good_mm=GOOD_MM)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
