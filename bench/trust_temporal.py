"""Would filtering the error estimate over time cut false alarms? Measured on trust.py's frames.

``python bench/trust_temporal.py TRUST_JSON [--json OUT]`` reads the per-frame rows
(``frames_detail``) of a ``bench/trust.py`` run, groups them into the sequences trust.py drew (one
phantom, one ``reference_to_mri`` error level: consecutive frames of one sweep) and recomputes the
flag with the ``error_estimate`` cue replaced by a causal filter of the estimate over the last
``n`` frames of the sequence (median or mean), at the run's own threshold; every other flag reason
is kept as it fired. Per rule: detection (frames with TRE > 5 mm flagged) and false alarms (frames
with TRE <= 2 mm flagged), pooled, and the lengths of the runs of consecutive false alarms of the
per-frame rule (isolated alarms are what a filter can remove; long runs are a bias it cannot).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from common import print_table, write_json

BAD_MM, GOOD_MM = 5.0, 2.0
WINDOWS = (2, 3, 5)


def sequences(frames: list[dict]) -> list[list[dict]]:
    """Rows grouped by (seed, level), in the order trust.py wrote them (frame order)."""
    out: dict[tuple, list[dict]] = {}
    for row in frames:
        out.setdefault((row["seed"], row["level_mm"]), []).append(row)
    return list(out.values())


def rates(seqs: list[list[dict]], flag: Callable[[list[float], int], bool]) -> dict:
    """Detection and false alarms when the ``error_estimate`` cue is ``flag(estimates, i)``."""
    bad = bad_flagged = good = good_flagged = 0
    for seq in seqs:
        estimates = [row["error_mm"] for row in seq]
        for i, row in enumerate(seq):
            flagged = any(r != "error_estimate" for r in row["flags"]) or flag(estimates, i)
            if row["tre_mm"] > BAD_MM:
                bad, bad_flagged = bad + 1, bad_flagged + flagged
            elif row["tre_mm"] <= GOOD_MM:
                good, good_flagged = good + 1, good_flagged + flagged
    return {"detection": bad_flagged / bad if bad else None, "bad_frames": bad,
            "false_alarm": good_flagged / good if good else None, "good_frames": good}


def false_alarm_runs(seqs: list[list[dict]], threshold: float) -> list[int]:
    """Lengths of the runs of consecutive good frames flagged by the per-frame estimate."""
    runs = []
    for seq in seqs:
        alarms = [row["error_mm"] > threshold and row["tre_mm"] <= GOOD_MM for row in seq]
        runs += [len(list(g)) for on, g in itertools.groupby(alarms) if on]
    return sorted(runs)


def evaluate(trust: dict) -> tuple[list[dict], list[int]]:
    """The rows (per-frame rule, then causal median and mean over each window) and the runs."""
    threshold = float(trust["threshold_mm"])
    seqs = sequences(trust["frames_detail"])
    rows = [{"name": "per frame (shipped)", **rates(seqs, lambda e, i: e[i] > threshold)}]
    for n in WINDOWS:
        for kind, fn in (("median", statistics.median), ("mean", statistics.fmean)):
            rows.append({"name": f"causal {kind} of {n}", **rates(
                seqs, lambda e, i, n=n, fn=fn: fn(e[max(0, i - n + 1):i + 1]) > threshold)})
    return rows, false_alarm_runs(seqs, threshold)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trust_json", type=Path, help="a bench/trust.py --out file (frames_detail)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = ap.parse_args(argv)
    try:
        trust = json.loads(args.trust_json.read_text())
        if (not isinstance(trust, dict) or not trust.get("frames_detail")
                or "threshold_mm" not in trust):
            raise ValueError("no frames_detail or threshold_mm")
        rows, runs = evaluate(trust)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        ap.error(f"{args.trust_json}: {type(exc).__name__}: {exc}; a bench/trust.py --out JSON "
                 "with its frames_detail (seed, level_mm, tre_mm, error_mm, flags per frame) is "
                 "expected")
    print_table(rows, [("name", "error_estimate cue", ""), ("detection", "detection", ".3f"),
                       ("bad_frames", "n TRE > 5 mm", "d"), ("false_alarm", "false alarms", ".3f"),
                       ("good_frames", "n TRE <= 2 mm", "d")])
    print(f"threshold {trust['threshold_mm']} mm; runs of consecutive false alarms (per frame): "
          f"{runs}")
    if args.json is not None:
        write_json(args.json, "trust_temporal", rows, source=str(args.trust_json),
                   threshold_mm=trust["threshold_mm"], false_alarm_runs=runs, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
