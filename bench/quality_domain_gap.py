"""Is QualityNet's family-B bias the scanner it was trained on, or what it is given? (diagnosis)

QualityNet (models/qualitynet.py) estimates a frame's registration error from the registered pair;
on family B, which no model was trained on, it overestimates good frames by ~2-4 mm and flags
~90 % of them (README "The error estimate and the flags"). Two explanations predict different
things: (1) a domain gap -- the same network, given pairs from family B to learn from, would
separate family B's good and bad pairs as well as it does family A's; (2) the input -- the
registered pair at 64 x 64 does not carry the error on family B (thick oblique MRI stacks, another
anatomy and probe), so even a network trained on family B would not separate them.

This bench trains the same network by the same recipe (:func:`regseg.train.quality.fit`, stage 1:
frames with a KNOWN random rigid error about the gland, a third each up to 1, 6 and 20 mm and
degrees), with the same number of steps, once per mix of training sources (:data:`SOURCES`: family
A's plain scanner, its randomisation, with MRI stacks, its scenes in a second appearance
(regseg.sim.restyle), or family B), and scores each, with the shipped QualityNet, on held-out pairs
of both families: ROC AUC of TRE > 5 mm against TRE <= 2 mm, the median estimate minus TRE on pairs
with TRE <= 2 mm, the false alarms (TRE <= 2 mm flagged) at the threshold that catches 95 % of each
held-out set's pairs with TRE > 5 mm (the set's own threshold: what separates), and detection and
false alarms at the threshold calibrated on family A's held-out pairs (what a shipped calibration
would do).

The family-B-trained network is a DIAGNOSIS ONLY: it is never saved into models/, never shipped,
and no reported accuracy uses it (family B stays the simulator no shipped model was trained on).
Its training cases must lie outside family B's evaluation seeds 5000-5099 (refused otherwise).

``python bench/quality_domain_gap.py --mixes "A;A+Arand+C;B" --json F [--steps N --frames N]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table, write_json  # noqa: E402
from quality_bias_cases import rank_auc  # noqa: E402

from regseg.errors import InputError  # noqa: E402

B_EVAL_SEEDS = range(5000, 5100)
B_FRAMES_SPAN = 1200  # session frames a random B frame is drawn from (bench/accuracy.py's sweep)


class _BSource:
    """A family-B session as quality.generate's frame source: ``random_frame(rng)``."""

    def __init__(self, session) -> None:
        self.session = session

    def random_frame(self, rng: np.random.Generator):
        return self.session.frame(int(rng.integers(0, B_FRAMES_SPAN)))


def open_family_b(case_seed: int, scanner_seed: int):
    """(case, frame source) of family-B case ``case_seed`` (its session seeded as bench/accuracy.py
    seeds it; ``scanner_seed`` unused: the session's own seed draws probe and settings)."""
    from regseg.sim.family_b.anatomy import make_case
    from regseg.sim.family_b.session import Session, SessionConfig

    case = make_case(case_seed)
    session = Session(case, SessionConfig(tracking_shift_mm=0.0, tracking_rot_deg=0.0),
                      seed=case_seed * 7 + 1)
    return case, _BSource(session)


def check_b_training_seeds(seeds: list[int]) -> None:
    """Refuse family-B training seeds inside the evaluation range (InputError, exit 2)."""
    inside = [s for s in seeds if s in B_EVAL_SEEDS]
    if inside:
        raise InputError(f"--b-train {inside[0]}: family B's evaluation seeds "
                         f"{B_EVAL_SEEDS.start}-{B_EVAL_SEEDS.stop - 1} are never trained on; "
                         "choose cases outside them")


#: Training sources: a name in a mix (``A+Arand``) -> (quality.generate scanner, or None for
#: family B's sessions). Arand and Astack are family A's own randomisation (regseg.sim.randomise;
#: Astack with the MRI half the time a thick oblique stack): how far family A's variety carries;
#: C: Arand's scenes in another appearance (regseg.sim.restyle).
SOURCES = {"A": "plain", "Arand": "randomised", "Astack": "randomised-stack", "C": "restyled",
           "B": None}


def pairs(source: str, seeds: list[int], frames: int, errors: int, seed: int
          ) -> dict[str, torch.Tensor]:
    """Pairs with a known rigid error (quality.generate) from a :data:`SOURCES` source."""
    from regseg.train.quality import generate

    scanner = SOURCES[source]
    return generate(seeds, frames, errors, size=64, seed=seed, progress=False,
                    scanner=scanner or "plain", open_scanner=None if scanner else open_family_b)


def parse_mix(mix: str) -> list[str]:
    """``A+Arand`` -> ["A", "Arand"] (ValueError naming an unknown source)."""
    parts = mix.split("+")
    unknown = [p for p in parts if p not in SOURCES]
    if unknown or not mix:
        raise ValueError(f"--mixes {mix!r}: unknown source {unknown[0] if unknown else ''!r}; "
                         f"expected names from {sorted(SOURCES)} joined by '+'")
    return parts


def scores(estimate: np.ndarray, tre: np.ndarray) -> dict[str, float]:
    """ROC AUC (TRE > 5 mm vs <= 2 mm), the good pairs' median bias, and the false alarms at the
    set's own threshold for 95 % detection (:func:`run` adds detection and false alarms at the
    threshold calibrated on family A's held-out pairs, as a shipped calibration would be)."""
    from regseg.train.quality import BAD_MM, GOOD_MM, calibrate, detection

    bad, good = estimate[tre > BAD_MM], estimate[tre <= GOOD_MM]
    if not len(bad) or not len(good):  # nothing to separate
        return {"auc": float("nan"), "bias_good_mm": float("nan"), "threshold_mm": float("nan"),
                "false_alarm_at_own_95": float("nan"), "bad": int(len(bad)),
                "good": int(len(good))}
    threshold = calibrate(estimate, tre)["threshold_mm"]
    return {"auc": rank_auc(bad, good),
            "bias_good_mm": float(np.median(good - tre[tre <= GOOD_MM])),
            "threshold_mm": threshold,
            "false_alarm_at_own_95": detection(estimate, tre, threshold)["false_alarm_tre_le_2mm"],
            "bad": int(len(bad)), "good": int(len(good))}


def run(train_seeds: dict[str, list[int]], a_test: list[int], b_test: list[int], *,
        mixes: list[str], frames: int, errors: int, steps: int, seed: int = 0,
        progress: bool = True) -> dict:
    """Train one network per mix (same recipe, same steps; ``train_seeds`` per source), and score
    them and the shipped model on held-out pairs of both families."""
    from regseg.models.qualitynet import QualityNet, QualityNetConfig, load_qualitynet
    from regseg.train.quality import BAD_MM, GOOD_MM, calibrate, fit, predict

    check_b_training_seeds(train_seeds.get("B", []))
    t0 = time.perf_counter()
    used = sorted({s for mix in mixes for s in parse_mix(mix)})
    train = {s: pairs(s, train_seeds[s], frames, errors, seed) for s in used}
    test = {"A": pairs("A", a_test, frames, errors, seed + 1),
            "B": pairs("B", b_test, frames, errors, seed + 1)}
    data_s = time.perf_counter() - t0
    if progress:
        print(f"pairs made in {data_s:.0f} s: " + ", ".join(
            [f"train {s} {len(d['tre_mm'])}" for s, d in train.items()]
            + [f"test {f} {len(d['tre_mm'])}" for f, d in test.items()]), flush=True)
    models = {"shipped": load_qualitynet()[0]}
    for mix in mixes:
        parts = [train[s] for s in parse_mix(mix)]
        data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        torch.manual_seed(seed)
        model = QualityNet(QualityNetConfig())
        fit(model, data, seed=seed, budget_s=float("inf"), steps=steps)
        models[f"trained on {mix}"] = model
    rows = []
    for name, model in models.items():
        estimates = {f: predict(model, p) for f, p in test.items()}
        # what a shipped calibration does: the threshold from family A's pairs, on each family
        a_tre = test["A"]["tre_mm"].numpy()
        a_threshold = (calibrate(estimates["A"], a_tre)["threshold_mm"]
                       if (a_tre > BAD_MM).any() else float("nan"))
        for family, pairs_ in test.items():
            tre = pairs_["tre_mm"].numpy()
            flagged = estimates[family] > a_threshold
            rows.append({"model": name, "test_family": family,
                         **scores(estimates[family], tre), "a_threshold_mm": a_threshold,
                         "detection_at_a_threshold": _share(flagged[tre > BAD_MM]),
                         "false_alarm_at_a_threshold": _share(flagged[tre <= GOOD_MM])})
    return {"rows": rows, "data_s": round(data_s, 1),
            "train_s": round(time.perf_counter() - t0 - data_s, 1)}


def _share(flags: np.ndarray) -> float:
    return float(flags.mean()) if len(flags) else float("nan")


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixes", default="A;B",
                   help="';'-separated training mixes of sources A, Arand, Astack, C, B ('+')")
    p.add_argument("--a-train", default="3000-3031", help="family-A training phantoms (a-b)")
    p.add_argument("--rand-train", default="3200-3231",
                   help="randomised family-A training phantoms (Arand, Astack, C)")
    p.add_argument("--b-train", default="5200-5231",
                   help="family-B cases to train the diagnosis network on (outside 5000-5099)")
    p.add_argument("--a-test", default="3732-3739", help="held-out family-A phantoms")
    p.add_argument("--b-test", default="5408-5415", help="held-out family-B cases")
    p.add_argument("--frames", type=int, default=40, help="frames per case")
    p.add_argument("--errors", type=int, default=4, help="random errors per frame")
    p.add_argument("--steps", type=int, default=2000, help="training steps per network")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        seeds = {k: _seeds(getattr(args, k))
                 for k in ("a_train", "rand_train", "b_train", "a_test", "b_test")}
        check_b_training_seeds(seeds["b_train"])
        mixes = args.mixes.split(";")
        for mix in mixes:
            parse_mix(mix)
    except (InputError, ValueError) as exc:
        p.error(str(exc))  # exit 2 before any work
    torch.set_num_threads(args.threads)
    train_seeds = {"A": seeds["a_train"], "Arand": seeds["rand_train"],
                   "Astack": seeds["rand_train"], "C": seeds["rand_train"],
                   "B": seeds["b_train"]}
    out = run(train_seeds, seeds["a_test"], seeds["b_test"], mixes=mixes, frames=args.frames,
              errors=args.errors, steps=args.steps)
    print_table(out["rows"], [("model", "model", ""), ("test_family", "tested on", ""),
                              ("auc", "ROC AUC", ".3f"), ("bias_good_mm", "bias good mm", "+.2f"),
                              ("threshold_mm", "own 95% thr mm", ".2f"),
                              ("false_alarm_at_own_95", "false alarms", ".1%"),
                              ("detection_at_a_threshold", "at A's thr: detection", ".1%"),
                              ("false_alarm_at_a_threshold", "false alarms", ".1%"),
                              ("bad", "n > 5 mm", "d"), ("good", "n <= 2 mm", "d")])
    if args.json:
        write_json(args.json, "quality_domain_gap", out["rows"], argv,
                   mixes=mixes, seeds={k: [v[0], v[-1]] for k, v in seeds.items()},
                   frames=args.frames, errors=args.errors, steps=args.steps, data_s=out["data_s"],
                   train_s=out["train_s"], device=device_name("cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
