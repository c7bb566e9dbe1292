"""Which randomised cases does QualityNet overestimate? Per-case bias against the case's draw.

A diagnosis of family B's false alarms on family A only (session 11). For each randomised family-A
calibration phantom 3300.. (``regseg.sim.randomise``: probe, frame, speckle, gain, anatomy), live
frames of the default chain with a known random ``reference_to_mri`` error
(:func:`regseg.train.quality_live.live_samples`) give QualityNet's per-case median of
estimate − true TRE (all frames, and good frames: TRE <= 2 mm) and false alarms at the shipped
threshold. The cases are then split by each drawn property (probe kind; above/below the median
of the numeric ones) and the two halves' biases compared (Mann-Whitney U as a rank AUC).

``python bench/quality_bias_cases.py --phantoms 32 --json bench/results/quality_bias_cases.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

GOOD_MM = 2.0


def case_properties(phantom_seed: int, scanner_seed: int) -> dict[str, float]:
    """The randomised draw of one case (:func:`regseg.train.data.open_randomised_scanner`)."""
    from regseg.sim.randomise import randomise

    case = randomise(np.random.default_rng([int(phantom_seed), int(scanner_seed), 0x5A]))
    sc, ph = case.scanner, case.phantom
    return {
        "endfire": float(sc.array == "endfire"),
        "linear": float(bool(getattr(sc, "linear_width_mm", 0.0))),
        "fov_mm": float(sc.frame_hw[0] * sc.pixel_mm),
        "pixel_mm": float(sc.pixel_mm),
        "axial_psf_mm": float(sc.axial_psf_mm),
        "lateral_psf_beams": float(sc.lateral_psf_beams),
        "speckle_shape": float(sc.speckle_shape),
        "gain_db": float(sc.gain_db),
        "dynamic_range_db": float(sc.dynamic_range_db),
        "deform_mm": float(sc.deform_mm),
        "pressure_mm": float(sc.pressure_mm),
        "gland_scale": float(np.prod(ph.gland_scale) ** (1 / 3)),
        "mri_slice_blur_vox": float(ph.mri_slice_blur_vox),
        "mri_noise": float(ph.mri_noise),
    }


def rank_auc(high: np.ndarray, low: np.ndarray) -> float:
    """P(a value from ``high`` > one from ``low``) (ties count half): the U statistic / n1 n2."""
    high, low = np.asarray(high, float), np.asarray(low, float)
    if not len(high) or not len(low):
        return float("nan")
    greater = (high[:, None] > low[None, :]).sum() + 0.5 * (high[:, None] == low[None, :]).sum()
    return float(greater / (len(high) * len(low)))


def split_report(cases: list[dict], key: str, bias_key: str = "bias_all_median_mm") -> dict:
    """The cases split by property ``key`` (0/1 flags as they are, numbers at their median):
    median bias of each half and the rank AUC of 'upper half has the larger bias'."""
    values = np.array([c["properties"][key] for c in cases])
    bias = np.array([c[bias_key] for c in cases])
    upper = values > 0.5 if set(np.unique(values)) <= {0.0, 1.0} else values > np.median(values)
    return {"property": key, "n_upper": int(upper.sum()), "n_lower": int((~upper).sum()),
            "bias_upper_mm": float(np.median(bias[upper])) if upper.any() else None,
            "bias_lower_mm": float(np.median(bias[~upper])) if (~upper).any() else None,
            "auc_upper_larger": rank_auc(bias[upper], bias[~upper])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phantoms", type=int, default=32)
    p.add_argument("--frames", type=int, default=25, help="live frames per phantom")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    from regseg.train.quality_chain import DEFAULT_CHAIN
    from regseg.train.quality_live import randomised_calibration_estimates

    run = randomised_calibration_estimates(args.phantoms, args.frames)
    seeds, threshold, tre, estimate = run["seeds"], run["threshold"], run["tre"], run["estimate"]
    cases = []
    for n, ps in enumerate(seeds):  # live_samples: scanner seed ps + 7 at seed 0
        sl = slice(n * args.frames, (n + 1) * args.frames)
        t, e = tre[sl], estimate[sl]
        good = t <= GOOD_MM
        cases.append({"phantom": ps, "properties": case_properties(ps, ps + 7),
                      "bias_all_median_mm": float(np.median(e - t)),
                      "bias_good_median_mm": float(np.median(e[good] - t[good])) if good.any()
                      else None,
                      "good": int(good.sum()),
                      "false_alarm_good": float((e[good] > threshold).mean()) if good.any()
                      else None})
    with_good = [c for c in cases if c["bias_good_median_mm"] is not None]
    splits = {"all frames": [split_report(cases, k) for k in cases[0]["properties"]],
              "good frames": [split_report(with_good, k, "bias_good_median_mm")
                              for k in cases[0]["properties"]]}
    for frames, rows in splits.items():
        print(f"per-case median bias over {frames}, cases split by property:")
        for s in sorted(rows, key=lambda s: -abs(s["auc_upper_larger"] - 0.5)):
            print(f"  {s['property']:20s} upper {s['n_upper']:2d} bias {s['bias_upper_mm']:+.2f} "
                  f"mm | lower {s['n_lower']:2d} bias {s['bias_lower_mm']:+.2f} mm | "
                  f"AUC {s['auc_upper_larger']:.2f}", flush=True)
    out = {"command": " ".join(["python", "bench/quality_bias_cases.py", *(argv or sys.argv[1:])]),
           "threshold_mm": threshold, "chain": DEFAULT_CHAIN, "frames_per_phantom": args.frames,
           "good_frames": int(sum(c["good"] for c in cases)),
           "false_alarm_good": float(np.mean(estimate[tre <= GOOD_MM] > threshold)),
           "bias_good_median_mm": float(np.median((estimate - tre)[tre <= GOOD_MM])),
           "splits": splits, "cases": cases}
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
