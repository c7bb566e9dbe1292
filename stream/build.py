"""The live chain as ``regseg-stream`` builds it: FusionEngine, DeformableStage, Capture, Pipeline.

One place for that composition (stream/cli.py calls it too), so that benches and tests measure what
the command line runs.
Defaults are the command line's defaults (``--backend auto``, ``--precision fp32``,
``--deformable on`` with the shipped ``plcreg2d``, the capture flags' defaults).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from regseg.engines.fusion import FusionEngine
from regseg.stream.context import MriContext
from regseg.stream.pipeline import Pipeline


def build_engine(weights: str | Path | None = None, *, backend: str = "auto",
                 device: torch.device | str = "cpu", precision: str = "fp32",
                 threads: int | None = None) -> FusionEngine:
    """The AlignSegNet engine (case independent: one per process is enough)."""
    return FusionEngine(weights, backend=backend, device=device, precision=precision,
                        threads=threads)


def build_deformable(context: MriContext, weights: str | Path = "plcreg2d", *,
                     backend: str = "auto", precision: str = "fp32", threads: int | None = None,
                     mode: str = "on"):
    """The live deformable stage for a case (:class:`regseg.stream.deformable.DeformableStage`);
    ``mode``: ``--deformable``'s (off: None; async and lag: the stage one frame late,
    :class:`regseg.stream.deformable_lag.DeformableLagged`)."""
    from regseg.stream.deformable import DeformableStage
    from regseg.stream.deformable_lag import DEFORMABLE_MODES, LAG_MODES, DeformableLagged
    from regseg.stream.lag_worker import asynchronous_allowed

    if mode not in (*DEFORMABLE_MODES, *LAG_MODES):
        raise ValueError(f"deformable {mode!r}: expected one of {DEFORMABLE_MODES}")
    if mode == "off":
        return None
    stage = DeformableStage(context, weights, backend=backend, precision=precision,
                            threads=threads)
    if mode in LAG_MODES:
        return DeformableLagged(stage, asynchronous=mode == "async" and asynchronous_allowed())
    return stage


def build_default_capture(**engine_options):
    """The capture stage with ``regseg-stream``'s default flags (``--refine-iterations``,
    ``--multi-start``, ``--temporal-filter``); it keeps per-stream state, so one per Pipeline.
    ``engine_options``: FusionEngine arguments (backend, device, precision, threads)."""
    from regseg.stream.capture import (
        MULTI_START_DEFAULT,
        REFINE_ITERATIONS,
        TEMPORAL_FILTER_DEFAULT,
        build_capture,
    )

    return build_capture(REFINE_ITERATIONS, MULTI_START_DEFAULT == "on", TEMPORAL_FILTER_DEFAULT,
                         **engine_options)


def build_segmenter(name: str = "unet", *, backend: str = "auto",
                    device: torch.device | str = "cpu", threads: int | None = None):
    """The ``--segmenter`` stage: None for ``unet`` (AlignSegNet's own head, no extra stage),
    else a :class:`regseg.stream.segmenter.Segmenter` (``ascseg``, ``ascseg-trus``)."""
    if name == "unet":
        return None
    from regseg.stream.segmenter import Segmenter

    return Segmenter(name, backend=backend, device=device, threads=threads)


def build_pipeline(context: MriContext, engine: FusionEngine, *, deformable=None, capture=None,
                   reference_to_mri: np.ndarray | None = None,
                   cuda_graph: bool = False, segmenter=None, do_no_harm="default",
                   do_no_harm_margin_mm: float | None = None, roi="default",
                   overlap: bool = False, lc2="default", resegment="default",
                   consensus="default", intensity="default", seg_window="default",
                   jump_at="default", seg_tta="default",
                   seg_prior="default", scanner_adapt="default",
                   estimate_check="default", stage_threads="default",
                   seg_fallback="default", lc2_hold="default",
                   lc2_rescue="default") -> Pipeline:
    """The per-stream Pipeline over ``context`` (``deformable``: a stage or None for off;
    ``capture``: a :class:`regseg.stream.capture.Capture` or None for the Pipeline's own;
    ``segmenter``: :func:`build_segmenter`'s stage or None for the U-Net head;
    ``do_no_harm``: ``--do-no-harm``'s mode (off, on, on-skip-deformable; "default": the
    CLI's default) or a :class:`regseg.stream.do_no_harm.CorrectionGate`, with its margin;
    ``roi``: ``--roi``'s mode (auto, off; "default": the CLI's default) or a
    :class:`regseg.stream.roi.GlandRoi`; ``overlap``: ``--overlap on``, the host half of each
    frame on a worker thread, regseg.stream.overlap); ``lc2``: ``--lc2``'s mode (on, off;
    "default": the CLI's default) or a :class:`regseg.stream.lc2_stage.Lc2Stage`;
    ``resegment``: ``--resegment``'s mode (on, off; "default": the CLI's default);
    ``consensus``: ``--consensus``'s mode, the same way, or a PlaneConsensus; ``intensity``:
    ``--intensity``'s mode (match, off; "default") or an IntensityMatch; ``seg_window``:
    ``--seg-window``'s mode (auto, off; "default"), with ``resegment`` only); ``jump_at``:
    ``--jump-at``'s (frame, gland; "default"): where ``capture``'s temporal filter measures
    each frame's jump (gland: :class:`regseg.stream.temporal.GlandPoints` is set on it);
    ``seg_tta``: ``--seg-tta``'s (flip, off; "default"), with ``resegment`` only);
    ``seg_prior``: ``--seg-prior``'s (on, gated, off: with ``resegment`` and without
    ``seg_window``; "default": the default mode where those hold, else off); ``scanner_adapt``:
    ``--scanner-adapt``'s (on, segmentation, off; "default"; on a thread) or a ScannerAdapt;
    ``estimate_check``: ``--estimate-check``'s (on, inform, off; "default") or an
    EstimateCheck, set on the Pipeline's QualityCheck; ``stage_threads``: ``--stage-threads``'
    (1, 2; "default") or a :class:`regseg.stream.stage_threads.StageThreads`; ``seg_fallback``:
    ``--seg-fallback``'s (mri, off; "default"): needs the estimate check, whose verdict decides;
    ``lc2_hold``, ``lc2_rescue``: ``--lc2-hold``'s and ``--lc2-rescue``'s (on, off; "default"),
    for an ``lc2`` given as a mode."""
    from regseg.stream.chain import RESEGMENT_DEFAULT
    from regseg.stream.consensus import CONSENSUS_DEFAULT, build_consensus
    from regseg.stream.do_no_harm import DO_NO_HARM_DEFAULT, MARGIN_MM, build_gate
    from regseg.stream.intensity import INTENSITY_DEFAULT, build_intensity
    from regseg.stream.lc2_stage import (
        LC2_DEFAULT,
        LC2_HOLD_DEFAULT,
        LC2_RESCUE_DEFAULT,
        build_lc2,
    )
    from regseg.stream.resegment import (
        SEG_TTA_DEFAULT,
        SEG_WINDOW_DEFAULT,
        build_seg_window,
        seg_tta_on,
    )
    from regseg.stream.roi import ROI_DEFAULT, ROI_MODES, GlandRoi
    from regseg.stream.seg_prior import SEG_PRIOR_DEFAULT, seg_prior_mode

    if isinstance(roi, str):
        mode = ROI_DEFAULT if roi == "default" else roi
        if mode not in ROI_MODES:
            raise ValueError(f"roi {roi!r}: expected one of {ROI_MODES} or 'default'")
        roi = GlandRoi(context) if mode == "auto" else None

    if isinstance(lc2, str):
        lc2 = build_lc2(context, LC2_DEFAULT if lc2 == "default" else lc2,
                        LC2_HOLD_DEFAULT if lc2_hold == "default" else lc2_hold,
                        LC2_RESCUE_DEFAULT if lc2_rescue == "default" else lc2_rescue)
    if resegment not in ("on", "off", "default"):
        raise ValueError(f"resegment {resegment!r}: expected 'on', 'off' or 'default'")
    resegment = (RESEGMENT_DEFAULT if resegment == "default" else resegment) == "on"
    if isinstance(consensus, str):
        consensus = build_consensus(CONSENSUS_DEFAULT if consensus == "default" else consensus)
    if isinstance(seg_window, str):
        seg_window = build_seg_window(context, SEG_WINDOW_DEFAULT if seg_window == "default"
                                      else seg_window)
    if seg_window is not None and not resegment:
        raise ValueError("seg_window needs resegment on: the window is cut around the gland "
                         "where the published registration puts it")
    seg_tta = seg_tta_on(SEG_TTA_DEFAULT if seg_tta == "default" else seg_tta)
    if seg_tta and not resegment:
        raise ValueError("seg_tta needs resegment on: the mirror pass repeats that segmentation")
    if seg_prior == "default":  # the default prior where the segmentation it pools with runs
        seg_prior = SEG_PRIOR_DEFAULT if resegment and seg_window is None else "off"
    seg_prior = seg_prior_mode(seg_prior)
    if seg_prior and (not resegment or seg_window is not None):
        raise ValueError("seg_prior needs resegment on and seg_window off: it pools that "
                         "segmentation's logits on the whole frame")
    if isinstance(intensity, str):
        intensity = build_intensity(INTENSITY_DEFAULT if intensity == "default" else intensity)
    if isinstance(scanner_adapt, str):
        from regseg.stream.scanner_adapt import SCANNER_ADAPT_DEFAULT, build_scanner_adapt

        scanner_adapt = build_scanner_adapt(SCANNER_ADAPT_DEFAULT if scanner_adapt == "default"
                                            else scanner_adapt)
    if getattr(scanner_adapt, "scope", None) == "segmentation" and not resegment:
        raise ValueError("scanner_adapt segmentation needs resegment on: the adapted network "
                         "runs that segmentation pass")
    from regseg.stream.temporal import JUMP_AT, JUMP_AT_DEFAULT, GlandPoints

    jump_at = JUMP_AT_DEFAULT if jump_at == "default" else jump_at
    if jump_at not in JUMP_AT:
        raise ValueError(f"jump_at {jump_at!r}: expected one of {JUMP_AT} or 'default'")
    if capture is not None:  # one Capture per Pipeline: it is this stream's
        capture.jump_points = GlandPoints(context) if jump_at == "gland" else None
    extra = {} if capture is None else {"capture": capture}
    if isinstance(do_no_harm, str):
        mode = DO_NO_HARM_DEFAULT if do_no_harm == "default" else do_no_harm
        margin = MARGIN_MM if do_no_harm_margin_mm is None else do_no_harm_margin_mm
        do_no_harm = build_gate(mode, margin)
    from regseg.stream.seg_prior import SEG_FALLBACK_DEFAULT, seg_fallback_mode

    seg_fallback = seg_fallback_mode(SEG_FALLBACK_DEFAULT if seg_fallback == "default"
                                     else seg_fallback)
    if isinstance(estimate_check, str):
        from regseg.stream.estimate_check import ESTIMATE_CHECK_DEFAULT, build_estimate_check

        estimate_check = build_estimate_check(ESTIMATE_CHECK_DEFAULT if estimate_check
                                              == "default" else estimate_check)
    if seg_fallback is not None and estimate_check is None:  # off, whichever way it came
        raise ValueError("seg_fallback mri needs the estimate check (inform or on): its verdict "
                         "decides when the MRI labels are published")
    if stage_threads == "default" or isinstance(stage_threads, int):
        from regseg.stream.stage_threads import STAGE_THREADS_DEFAULT, build_stage_threads

        stage_threads = build_stage_threads(STAGE_THREADS_DEFAULT if stage_threads == "default"
                                            else stage_threads)
    pipeline = Pipeline(context, engine, reference_to_mri=reference_to_mri,
                        cuda_graph=cuda_graph, deformable=deformable, segmenter=segmenter,
                        do_no_harm=do_no_harm, roi=roi, overlap=overlap, lc2=lc2,
                        resegment=resegment, consensus=consensus, intensity=intensity,
                        seg_window=seg_window, seg_tta=seg_tta, seg_prior=seg_prior,
                        scanner_adapt=scanner_adapt, stage_threads=stage_threads,
                        seg_fallback=seg_fallback, **extra)
    if estimate_check is not None:  # on the QualityCheck, which every frame's assessment runs
        pipeline.quality.self_check = estimate_check
    return pipeline
