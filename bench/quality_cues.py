"""Do the chain's own cues make QualityNet's error estimate less appearance-bound? (issue 16)

``python bench/quality_cues.py [--json F]``: on live pairs of the CLI's default chain
(:func:`regseg.train.quality_live.cached_live`, family A only), a ridge regression of log(1 + TRE)
on log(1 + QualityNet's estimate) and each subset of the chain cues tried
(:data:`regseg.train.quality_chain.FEATURES`: deformable displacement over the gland, affine vs
deformable labels, segmented vs registered gland, segmentation confidence, gland areas) is fitted
on the TRAINING phantoms (plain 3000-3011 x 40 frames, randomised 3200-3223 x 20) and compared on
the CALIBRATION phantoms (plain 3100-3107 x 50, randomised 3300-3315 x 25: the B-like set inside
family A) by the shipped rule: the threshold that flags >= 95 % of frames with TRE > 5 mm, and the
false alarms (TRE <= 2 mm flagged) it then makes, on all, plain and randomised pairs. Never family
B, never the evaluation phantoms. The pairs are rendered on first use (~25 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from regseg.models.qualitynet import WEIGHTS, load_qualitynet
from regseg.train.quality import DEFAULT_CACHE, calibrate, detection
from regseg.train.quality_chain import FEATURES
from regseg.train.quality_live import cached_live, predict_x

SETS = {"train": ((range(3000, 3012), 40, "plain"), (range(3200, 3224), 20, "randomised")),
        "validation": ((range(3100, 3108), 50, "plain"), (range(3300, 3316), 25, "randomised"))}
SUBSETS = ((), ("ddf_gland_mean_mm",), ("affine_vs_final_dice",), ("seg_vs_registered_dice",),
           ("seg_confidence",), ("ddf_gland_mean_mm", "affine_vs_final_dice"), FEATURES)


def load(name: str, model, weights: Path) -> tuple[np.ndarray, ...]:
    """(QualityNet estimate, features, TRE, randomised?) of one set."""
    parts = []
    for seeds, frames, scanner in SETS[name]:
        d = cached_live(DEFAULT_CACHE, list(seeds), frames, seed=0, weights=weights,
                        scanner=scanner)
        parts.append((predict_x(model, d["x"]), d["features"].numpy().astype(np.float64),
                      d["tre_mm"].numpy(), np.full(len(d["tre_mm"]), scanner == "randomised")))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def design(estimate: np.ndarray, features: np.ndarray, subset: tuple[str, ...]) -> np.ndarray:
    cols = [np.ones(len(estimate)), np.log1p(estimate)]
    for name in subset:
        v = np.nan_to_num(features[:, FEATURES.index(name)])
        cols.append(np.log1p(v) if name.startswith("ddf") else v)
    return np.column_stack(cols)


def rule(score: np.ndarray, tre: np.ndarray, randomised: np.ndarray) -> dict:
    """Threshold for >= 95 % detection; detection and false alarms on all/plain/randomised."""
    threshold = calibrate(score, tre)["threshold_mm"]
    out = {"threshold": threshold}
    for name, m in (("all", np.ones_like(randomised)), ("plain", ~randomised),
                    ("randomised", randomised)):
        d = detection(score[m], tre[m], threshold)
        out[name] = {"detection": round(d["detection_tre_gt_5mm"], 3),
                     "false_alarm": round(d["false_alarm_tre_le_2mm"], 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="QualityNet checkpoint")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, _ = load_qualitynet(args.weights, fold=False)
    weights = args.weights.resolve()
    tr, va = load("train", model, weights), load("validation", model, weights)
    results = {"qualitynet_alone": rule(va[0], va[2], va[3]), "ridge": {}}
    for subset in SUBSETS:
        x = design(tr[0], tr[1], subset)
        w = np.linalg.solve(x.T @ x + 1e-2 * np.eye(x.shape[1]), x.T @ np.log1p(tr[2]))
        score = np.expm1(design(va[0], va[1], subset) @ w).clip(0)
        results["ridge"]["+".join(subset) or "(estimate only)"] = rule(score, va[2], va[3])
    bad, good = va[2] > 5, va[2] <= 2
    results["feature_auc_bad_vs_good"] = {
        name: round(float((v[bad][:, None] > v[good][None]).mean()
                          + 0.5 * (v[bad][:, None] == v[good][None]).mean()), 3)
        for name, v in ((n, np.nan_to_num(va[1][:, j])) for j, n in enumerate(FEATURES))}
    results["validation_frames"] = {"all": len(va[2]), "bad": int(bad.sum()),
                                    "good": int(good.sum())}
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
