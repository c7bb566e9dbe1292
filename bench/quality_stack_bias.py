"""Does QualityNet overestimate the error when the MRI is a thick, oblique T2 stack?

A diagnosis of family B's false alarms that does not touch family B (session 11). Family B's MRI is
an oblique 0.5 x 0.5 x 3 mm stack with partial-volume labels; QualityNet was trained on family A's
isotropic MRI. Here the same live frames of the randomised family-A calibration phantoms 3300..
(default chain, a known random ``reference_to_mri`` error per frame,
:func:`regseg.train.quality_live.live_samples`) are made twice: with the phantom's isotropic MRI
and with the MRI resampled onto a stack (``randomised-stack``: same case, scanner and frames; a
stack on the cases where :func:`regseg.sim.mri_stack.draw_stack` draws one). Reported per group:
QualityNet's median bias on good frames (TRE <= 2 mm), its false alarms and detection at the
shipped default-chain threshold.

``python bench/quality_stack_bias.py --json bench/results/quality_stack_bias.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

GOOD_MM, BAD_MM = 2.0, 5.0


def group_row(estimate: np.ndarray, tre: np.ndarray, mask: np.ndarray, threshold: float) -> dict:
    """Bias on good frames, false alarms and detection at ``threshold`` over ``mask``."""
    good, bad = mask & (tre <= GOOD_MM), mask & (tre > BAD_MM)
    return {
        "frames": int(mask.sum()), "good": int(good.sum()), "bad": int(bad.sum()),
        "tre_median_mm": float(np.median(tre[mask])) if mask.any() else None,
        "bias_good_median_mm": float(np.median(estimate[good] - tre[good])) if good.any() else None,
        "false_alarm_good": float((estimate[good] > threshold).mean()) if good.any() else None,
        "detection_bad": float((estimate[bad] > threshold).mean()) if bad.any() else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phantoms", type=int, default=8)
    p.add_argument("--frames", type=int, default=25, help="live frames per phantom")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    from regseg.sim.mri_stack import draw_stack
    from regseg.train.quality_chain import DEFAULT_CHAIN
    from regseg.train.quality_live import randomised_calibration_estimates

    first = randomised_calibration_estimates(args.phantoms, args.frames)
    seeds, threshold = first["seeds"], first["threshold"]
    # live_samples opens phantom ps with scanner seed ps + 7 (seed 0): the stack's own draw
    stacked = [ps for ps in seeds
               if draw_stack(np.random.default_rng([ps, ps + 7, 0x57AC])) is not None]
    has_stack = np.repeat([ps in stacked for ps in seeds], args.frames)
    out = {"command": " ".join(["python", "bench/quality_stack_bias.py", *(argv or sys.argv[1:])]),
           "threshold_mm": threshold, "chain": DEFAULT_CHAIN, "phantoms": seeds,
           "stack_phantoms": stacked, "groups": {}}
    for scanner, mri in (("randomised", "isotropic MRI"), ("randomised-stack", "stack MRI")):
        run = first if scanner == "randomised" else randomised_calibration_estimates(
            args.phantoms, args.frames, scanner=scanner)
        tre, estimate = run["tre"], run["estimate"]
        for cases, mask in (("all cases", np.ones_like(has_stack)),
                            ("cases given a stack", has_stack),
                            ("cases never given one", ~has_stack)):
            row = group_row(estimate, tre, mask, threshold)
            out["groups"][f"{mri} / {cases}"] = row
            print(f"{mri:14s} {cases:22s} " + " ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                flush=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
