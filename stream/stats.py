"""Per-frame timings and quality as percentiles: the live status line and the exit summary."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max of a list (NaN when empty), rounded to 0.01."""
    if not values:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan}
    arr = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {k: round(float(v), 3) for k, v in
            (("p50", p50), ("p95", p95), ("p99", p99), ("max", arr.max()))}


class StreamStats:
    """Collects what every frame measured: stage times, latency, Dice when truth is known.

    Latency is receipt (``Frame.acquired_ns``) to result ready, on the monotonic clock.
    """

    def __init__(self) -> None:
        self.stages: dict[str, list[float]] = defaultdict(list)
        self.latency_ms: list[float] = []
        self.dice: dict[str, list[float]] = defaultdict(list)
        self.tre_mm: dict[str, list[float]] = defaultdict(list)
        self.flagged = 0
        self.frames = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None

    def add(self, timings_ms: dict[str, float], latency_ms: float, done_ns: int, *,
            flagged: bool = False) -> None:
        """Record one processed frame."""
        for name, ms in timings_ms.items():
            self.stages[name].append(ms)
        self.latency_ms.append(latency_ms)
        self.flagged += int(flagged)
        self.frames += 1
        self.first_ns = done_ns if self.first_ns is None else self.first_ns
        self.last_ns = done_ns

    def add_accuracy(self, dice: dict[str, float], tre_mm: dict[str, float]) -> None:
        """Record Dice per label and TRE per variant for a frame with ground truth; NaNs skipped."""
        for name, value in dice.items():
            if not math.isnan(value):
                self.dice[name].append(value)
        for name, value in tre_mm.items():
            if not math.isnan(value):
                self.tre_mm[name].append(value)

    def fps(self) -> float:
        """Processed frames per second between the first and the last result."""
        if self.frames < 2 or self.last_ns == self.first_ns:
            return math.nan
        return (self.frames - 1) / ((self.last_ns - self.first_ns) / 1e9)

    def summary(self, *, skipped: int = 0, extra: dict | None = None) -> dict:
        """The summary as a JSON-ready dict (see README, "Stats JSON")."""
        out: dict = {
            "frames": self.frames,
            "skipped": int(skipped),
            "flagged": self.flagged,
            "fps": round(self.fps(), 2) if self.frames > 1 else math.nan,
            "latency_ms": percentiles(self.latency_ms),
            "stages_ms": {name: percentiles(v) for name, v in self.stages.items()},
        }
        if self.dice:
            out["dice"] = {name: round(float(np.mean(values)), 4)
                           for name, values in self.dice.items() if values}
            out["dice_frames"] = {name: len(v) for name, v in self.dice.items()}
        if self.tre_mm:
            out["tre_mm"] = {name: round(float(np.median(v)), 3) for name, v in self.tre_mm.items()}
        if extra:
            out.update(extra)
        return out

    def status_line(self, skipped: int = 0) -> str:
        """One line for the live display: frames, fps, last-100 latency, skipped, flagged."""
        recent = self.latency_ms[-100:]
        p = percentiles(recent)
        return (f"frames {self.frames:6d} | {self.fps():6.1f} fps | latency p50 {p['p50']:6.1f} ms "
                f"p99 {p['p99']:6.1f} ms | skipped {skipped} | flagged {self.flagged}")


def format_summary(summary: dict) -> str:
    """The exit summary as a small table."""
    lines = [f"frames {summary['frames']}  skipped {summary['skipped']}  "
             f"flagged {summary['flagged']}  fps {summary['fps']}"]
    lat = summary["latency_ms"]
    lines.append(f"{'stage':<16}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, p in list(summary["stages_ms"].items()) + [("end-to-end", lat)]:
        lines.append(f"{name:<16}{p['p50']:>10.2f}{p['p95']:>10.2f}{p['p99']:>10.2f}"
                     f"{p['max']:>10.2f}")
    if "dice" in summary:
        dice = "  ".join(f"{k} {v:.3f}" for k, v in summary["dice"].items())
        lines.append(f"Dice vs ground truth (mean over frames): {dice}")
    if "tre_mm" in summary:
        tre = "  ".join(f"{k} {v:.2f}" for k, v in summary["tre_mm"].items())
        lines.append(f"TRE mm (median over frames, prostate pixels): {tre}")
    for key in ("engine", "device", "source", "sinks"):
        if key in summary:
            lines.append(f"{key}: {summary[key]}")
    return "\n".join(lines)


def write_json(summary: dict, path: str | Path) -> None:
    """Write the summary; NaN becomes null so any JSON reader takes it."""
    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean(summary), indent=2) + "\n")
