"""Which family-A phantoms QualityNet's threshold is calibrated on, and how sure that threshold is.

The threshold is the largest error estimate that still flags >= 95 % of the calibration pairs with
true TRE > 5 mm (:func:`regseg.train.quality.calibrate`): the 5th percentile of the bad pairs'
estimates. Bad pairs come in clusters (a phantom's anatomy makes many of its bad pairs alike), so
that percentile moves with the phantoms drawn far more than the pair count suggests. Session 29
measured it: on the 8 phantoms the threshold was first calibrated on (3100-3107, 76 bad pairs of
the default chain) it came out 1.73 mm; on 32 fresh calibration phantoms (3700-3731, 263 bad pairs)
that threshold flagged only 90.5 % of the bad pairs, and the four blocks of 8 phantoms gave 1.76,
1.41, 1.46 and 0.98 mm. Hence :data:`CALIB_SEEDS_DEFAULT`, 40 phantoms, and
:func:`threshold_interval`, which says how far the threshold would move with other phantoms.

Seeds: family-A calibration phantoms only, >= 3100 and outside the randomised training and
calibration ranges 3200-3399; never the training phantoms 3000-3099, the evaluation phantoms
1000-1011 or family B (their generator is another: ``regseg.sim.family_b``).
"""

from __future__ import annotations

import math

import numpy as np

from regseg.errors import InputError
from regseg.train.quality import BAD_MM, CALIB_SEED0, RAND_SEED0, calibrate

#: The plain family-A calibration phantoms of every chain's threshold (since session 29; before:
#: 3100-3107 only)
CALIB_SEEDS_DEFAULT = "3100-3107,3700-3731"
_RESERVED = (RAND_SEED0, RAND_SEED0 + 200)  # randomised training 3200.., calibration 3300..
#: Bootstrap draws of :func:`threshold_interval`
DRAWS = 1000
RAND_CALIB_SEED0 = 3300  # randomised family A: calibration (training: RAND_SEED0..)


def parse_seeds(spec: str, flag: str = "--calib-seeds") -> list[int]:
    """``"3100-3107,3700-3731"`` -> the seeds, in order (ranges inclusive, single seeds allowed).

    Raises:
        InputError: not a list of seeds or ranges, an empty or repeated range, or a seed that is
            not a plain family-A calibration phantom (see the module docstring).
    """
    seeds: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise InputError(f"{flag} {spec!r}: {part.strip()!r} is not a seed or a range "
                             "FIRST-LAST; expected e.g. 3100-3107,3700-3731") from None
        if last < first:
            raise InputError(f"{flag} {spec!r}: range {part.strip()!r} ends before it starts")
        seeds += range(first, last + 1)
    bad = [s for s in seeds if s < CALIB_SEED0 or _RESERVED[0] <= s < _RESERVED[1]]
    if bad:
        raise InputError(f"{flag} {spec!r}: seed {bad[0]} is not a plain family-A calibration "
                         f"phantom; expected seeds >= {CALIB_SEED0} outside {_RESERVED[0]}-"
                         f"{_RESERVED[1] - 1} (training, randomised and evaluation phantoms "
                         "never calibrate)")
    if len(set(seeds)) != len(seeds):
        raise InputError(f"{flag} {spec!r}: a seed appears twice")
    return seeds


def blocks(seeds: list[int]) -> list[list[int]]:
    """``seeds`` cut into runs of consecutive seeds (each run is one cache file of pairs)."""
    out: list[list[int]] = []
    for s in seeds:
        if out and s == out[-1][-1] + 1:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def calib_seeds(args) -> list[int]:
    """The plain calibration phantoms of ``args``: ``--calib-seeds`` when given, else
    ``--calib-phantoms`` N from 3100 (the recipe's older option)."""
    spec = getattr(args, "calib_seeds", None)
    if spec:
        return parse_seeds(spec)
    return list(range(CALIB_SEED0, CALIB_SEED0 + args.calib_phantoms))


def calibration_sets(args) -> dict:
    """The calibration phantoms, for the JSON: the plain ones as [first, last] runs."""
    return {"plain_seeds": [[b[0], b[-1]] for b in blocks(calib_seeds(args))],
            "plain_frames_per_phantom": args.calib_frames or args.frames,
            "randomised_seeds": ([RAND_CALIB_SEED0,
                                  RAND_CALIB_SEED0 + args.randomised_calib_phantoms - 1]
                                 if args.randomised_calib_phantoms else None),
            "randomised_frames_per_phantom": (args.randomised_calib_frames
                                              or args.randomised_frames)}


def threshold_interval(estimate: np.ndarray, tre: np.ndarray, phantom: np.ndarray, *,
                       other: np.ndarray | None = None, at_p5: bool = False,
                       draws: int = DRAWS, seed: int = 0) -> dict:
    """How far the calibrated threshold moves with the phantoms: a bootstrap over phantoms (each
    draw takes as many phantoms as there are, with replacement, all pairs of each).

    Returns the threshold's 5th / 50th / 95th percentiles over the draws, and the detection
    (share of TRE > 5 mm pairs flagged) that one threshold keeps over the draws (5th percentile
    and median; ``detection_at_mm`` says which): the threshold calibrated on all pairs, or with
    ``at_p5`` the draws' 5th percentile (a 95 % confidence bound: it keeps >= 95 % in >= 95 % of
    the draws). What to expect on phantoms like these but not these. NaN where no draw has bad
    pairs. ``other``: whether another flag fired on each pair; then the threshold is the whole
    flag's (:func:`regseg.train.quality_stream.flag_threshold`) and the detection the whole
    flag's.
    """
    from regseg.train.quality_stream import flag_threshold

    if other is None:
        other = np.zeros(len(tre), bool)
        fit = lambda e, t, o: calibrate(e, t)["threshold_mm"]  # noqa: E731
    else:
        fit = flag_threshold
    estimate, tre, phantom, other = (np.asarray(a) for a in (estimate, tre, phantom, other))
    ids = np.unique(phantom)
    rows = {p: np.flatnonzero(phantom == p) for p in ids}
    rng = np.random.default_rng(seed)
    pooled = fit(estimate, tre, other) if (tre > BAD_MM).any() else math.nan
    samples, thresholds = [], []
    for _ in range(draws if math.isfinite(pooled) else 0):
        idx = np.concatenate([rows[p] for p in rng.choice(ids, len(ids))])
        if (tre[idx] > BAD_MM).any():
            samples.append(idx)
            thresholds.append(fit(estimate[idx], tre[idx], other[idx]))
    if not thresholds:
        return {"phantoms": int(len(ids)), "draws": 0, "threshold_mm_p5": math.nan,
                "threshold_mm_p50": math.nan, "threshold_mm_p95": math.nan,
                "detection_at_mm": math.nan, "detection_p5": math.nan, "detection_p50": math.nan}
    t5, t50, t95 = (round(float(t), 4) for t in np.percentile(thresholds, [5, 50, 95]))
    at = t5 if at_p5 else pooled
    detections = []
    for idx in samples:
        bad = tre[idx] > BAD_MM
        detections.append(float(((estimate[idx] > at) | other[idx])[bad].mean()))
    d5, d50 = np.percentile(detections, [5, 50])
    return {"phantoms": int(len(ids)), "draws": len(thresholds), "threshold_mm_p5": t5,
            "threshold_mm_p50": t50, "threshold_mm_p95": t95, "detection_at_mm": at,
            "detection_p5": round(float(d5), 4), "detection_p50": round(float(d50), 4)}
