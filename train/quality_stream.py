"""The default chain's threshold calibrated on the chain as it runs, for the flag (addendum 33).

The unrelated-frame calibration (:mod:`regseg.train.quality_calibrate`) asks QualityNet's estimate
alone to flag >= 95 % of frames with TRE > 5 mm, on frames registered one at a time without the
temporal filter. A user is promised something else: the flag's detection on a stream, where the
temporal filter, the lagged stages and the other checks (``lc2_unsupported``, ``no_gland``,
``jump``, ``disagreement``, ``out_of_plane``) run too. This module makes those frames: per
calibration phantom, :data:`SEQUENCES` sequences of :data:`LENGTH` consecutive session frames
(every 1, 2 or 4 frames), each with one constant ``reference_to_mri`` error drawn as the
calibration draws it (:func:`regseg.train.quality.draw_error`), through the pipeline
``regseg-stream`` builds by default (its ``async`` stages in order, as the benches run them).
Per frame it keeps QualityNet's input, the true TRE of the published plane over the gland and
whether any flag other than ``error_estimate`` fired (none depends on the threshold); then
:func:`flag_threshold` is the largest threshold at which the whole flag catches >= 95 %.

Calibration phantoms only (:mod:`regseg.train.quality_sets`); cached per phantom.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from regseg import metrics, spatial
from regseg.lc2 import LC2_REVISION
from regseg.train.quality import BAD_MM, GOOD_MM, MAX_ERROR_MM, draw_error, random_rigid

SEQUENCES, LENGTH, STRIDES = 4, 30, (1, 2, 4)
STREAM_VERSION = 1
_START_RANGE = 2000  # session frames a sequence may start at


def flag_threshold(estimate: np.ndarray, tre: np.ndarray, other: np.ndarray,
                   share: float = 0.95) -> float:
    """The largest error-estimate threshold at which ``estimate > threshold`` or ``other`` (any
    other flag) flags >= ``share`` of the frames with TRE > 5 mm; :data:`MAX_ERROR_MM` when the
    other flags alone do. Rounded down to 0.1 um (still flags)."""
    bad = tre > BAD_MM
    allowed = math.floor((1.0 - share) * int(bad.sum()) + 1e-9)  # misses the share allows
    unflagged = np.sort(estimate[bad & ~other])
    if len(unflagged) <= allowed:
        return MAX_ERROR_MM
    return math.floor((float(unflagged[allowed]) - 1e-6) * 1e4) / 1e4


def flag_rates(estimate: np.ndarray, tre: np.ndarray, other: np.ndarray,
               threshold: float) -> dict:
    """Detection (TRE > 5 mm) and false alarms (TRE <= 2 mm) of the whole flag at ``threshold``."""
    flagged = other | (estimate > threshold)
    bad, good = tre > BAD_MM, tre <= GOOD_MM
    return {"detection_tre_gt_5mm": round(float(flagged[bad].mean()), 4) if bad.any() else None,
            "false_alarm_tre_le_2mm": round(float(flagged[good].mean()), 4) if good.any()
            else None,
            "other_flags_detection": round(float(other[bad].mean()), 4) if bad.any() else None,
            "bad_frames": int(bad.sum()), "good_frames": int(good.sum())}


def _scanner_seed(seed: int, phantom: int) -> int:
    return seed * 100_003 + phantom + 7  # as the unrelated-frame pairs (quality_live)


def stream_samples(phantom_seed: int, *, seed: int, weights: Path,
                   sequences: int = SEQUENCES, length: int = LENGTH) -> dict:
    """One phantom's stream frames: ``x`` (N, 4, s, s) float16 QualityNet inputs, ``tre_mm`` (N,)
    (NaN without the gland in the true view), ``other`` (N,) bool, ``phantom`` (N,)."""
    from regseg.stream.build import (
        build_default_capture,
        build_deformable,
        build_engine,
        build_pipeline,
    )
    from regseg.stream.context import build_context
    from regseg.stream.deformable_lag import bench_stage
    from regseg.stream.lc2_lag import in_order
    from regseg.stream.quality import QualityCheck, QualityConfig
    from regseg.train.data import open_simulated_scanner

    torch.set_num_threads(1)
    engine = build_engine(backend="eager", threads=1)
    phantom, scanner = open_simulated_scanner(phantom_seed, _scanner_seed(seed, phantom_seed))
    context = build_context(phantom.mri, phantom.labels)
    stage = build_deformable(context, "plcreg2d", backend="eager", threads=1)
    rng = np.random.default_rng([seed, phantom_seed, 0x5E9])
    xs, tres, others = [], [], []
    made = 0
    while made < sequences:
        stride, start = int(rng.choice(STRIDES)), int(rng.integers(0, _START_RANGE))
        shift, angle = draw_error(rng)
        first = scanner.frame(start)
        ji = np.argwhere(first.truth.labels > 0)
        if len(ji) < 200:  # a sequence starts with the gland in view
            continue
        made += 1
        frames = [first] + [scanner.frame(start + k * stride) for k in range(1, length)]
        centre = spatial.apply(first.truth.image_to_mri,
                               np.column_stack([ji[:, ::-1], np.zeros(len(ji))])).mean(0)
        pipeline = build_pipeline(context, engine, deformable=bench_stage(stage, "default"),
                                  capture=build_default_capture(backend="eager", threads=1),
                                  lc2=in_order("default"),
                                  reference_to_mri=random_rigid(rng, centre, shift, angle))
        check = pipeline.quality.self_check  # --estimate-check's, as the CLI's
        pipeline._quality = QualityCheck(context, QualityConfig(weights=weights,
                                                                error_threshold_mm=math.inf))
        pipeline._quality.self_check = check
        for frame in frames:
            for result in pipeline.submit(frame) + pipeline.flush():
                truth = result.frame.truth
                gland = np.argwhere(truth.labels > 0)
                published = spatial.invert(result.mri_to_image)
                tres.append(metrics.tre_mm(published, truth.image_to_mri, gland[:, ::-1])
                            if len(gland) else math.nan)
                others.append(bool(set(result.flags) - {"error_estimate"}))
                xs.append(pipeline.quality.estimator.inputs(result.frame.pixels, published,
                                                            result.warped_labels).half())
    return {"x": torch.cat(xs), "tre_mm": torch.tensor(tres, dtype=torch.float32),
            "other": torch.tensor(others), "phantom": torch.full((len(tres),), phantom_seed)}


def cached_streams(cache: Path | None, seeds: list[int], *, seed: int, weights: Path,
                   sequences: int = SEQUENCES, length: int = LENGTH) -> dict:
    """:func:`stream_samples` of every phantom of ``seeds``, each cached in its own file (named
    by the networks that make the frames; QualityNet's weights only read them)."""
    from regseg.train.quality_live import _alignsegnet_id, _plcreg2d_id

    nets = hashlib.sha256(f"{_alignsegnet_id()}-{_plcreg2d_id()}-r{LC2_REVISION}".encode()
                          ).hexdigest()[:12]
    parts = []
    for ps in seeds:
        name = f"quality-stream-v{STREAM_VERSION}-{ps}-{sequences}x{length}-{seed}-{nets}.pt"
        path = None if cache is None else cache / name
        if path is not None and path.is_file():
            parts.append(torch.load(path, weights_only=True))
            continue
        part = stream_samples(ps, seed=seed, weights=weights, sequences=sequences, length=length)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(part, path)
        parts.append(part)
        print(f"  stream phantom {ps}: {len(parts)}/{len(seeds)}", flush=True)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
