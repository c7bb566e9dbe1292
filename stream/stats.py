"""Per-frame timings and quality as percentiles: the live status line and the exit summary.

Memory stays bounded over a session of any length: each measured series keeps an exact count, sum
and maximum, and for its percentiles at most :data:`RESERVOIR_SIZE` values (every value until
then, so short runs are exact; afterwards a uniform random sample of all values, Vitter's
algorithm R, whose p99 is within about +-0.2 percentile ranks of the exact one).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict, deque
from pathlib import Path

import numpy as np

#: Values kept per series for percentiles: 10,000 (80 kB) is exact for the first 5.5 minutes at
#: 30 fps; after that the p99 of a uniform sample of 10,000 has a rank error of
#: sqrt(0.99 * 0.01 / 10,000) = 0.1 percentile (1 sigma).
RESERVOIR_SIZE = 10_000
RECENT = 100  # latencies the status line shows percentiles of


def percentiles(values) -> dict[str, float]:
    """p50/p95/p99/max of a sequence (NaN when empty), rounded to 0.001."""
    if len(values) == 0:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan}
    arr = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {k: round(float(v), 3) for k, v in
            (("p50", p50), ("p95", p95), ("p99", p99), ("max", arr.max()))}


class Series:
    """One measured quantity: exact count, mean and max; percentiles from a bounded reservoir."""

    def __init__(self, size: int = RESERVOIR_SIZE, seed: int = 0) -> None:
        self.count = 0
        self.total = 0.0
        self.max = -math.inf
        self._sample = np.empty(size, dtype=np.float64)
        self._rng = np.random.default_rng(seed)
        self._uniform = np.empty(0)  # random draws, made 4096 at a time (cheaper than one)
        self._next = 0

    def add(self, value: float) -> None:
        size = len(self._sample)
        if self.count < size:
            self._sample[self.count] = value
        else:
            if self._next == len(self._uniform):
                self._uniform, self._next = self._rng.random(4096), 0
            slot = int(self._uniform[self._next] * (self.count + 1))
            self._next += 1
            if slot < size:
                self._sample[slot] = value
        self.count += 1
        self.total += value
        self.max = max(self.max, value)

    def __len__(self) -> int:
        return self.count

    @property
    def sample(self) -> np.ndarray:
        """The values kept (all of them while ``count`` <= the reservoir size)."""
        return self._sample[:min(self.count, len(self._sample))]

    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def median(self) -> float:
        return float(np.median(self.sample)) if self.count else math.nan

    def percentiles(self) -> dict[str, float]:
        """p50/p95/p99 (from the sample) and the exact max, as :func:`percentiles`."""
        out = percentiles(self.sample)
        if self.count:
            out["max"] = round(float(self.max), 3)
        return out


class StreamStats:
    """Collects what every frame measured: stage times, latency, Dice when truth is known.

    Latency is receipt (``Frame.acquired_ns``) to result ready, on the monotonic clock.
    """

    def __init__(self) -> None:
        self.stages: dict[str, Series] = defaultdict(Series)
        self.latency_ms = Series()
        self.recent_latency_ms: deque[float] = deque(maxlen=RECENT)
        self.dice: dict[str, Series] = defaultdict(Series)
        self.tre_mm: dict[str, Series] = defaultdict(Series)
        self.flagged = 0
        self.error_mm = Series()  # estimated registration error (regseg.stream.quality)
        self.flag_reasons: dict[str, int] = defaultdict(int)
        # what was published per frame (regseg.stream.do_no_harm): registered or tracked
        self.corrections: dict[str, int] = defaultdict(int)
        # what the published labels were (Result.labels_source): network, network+mri, withheld
        self.labels_sources: dict[str, int] = defaultdict(int)
        self.sweep_pending = 0  # frames before the sweep (regseg.stream.consensus)
        self.frames = 0
        self.failed = 0  # frames the pipeline raised on (the runner counts them and goes on)
        self.sink_errors = 0  # results a sink raised on (the other sinks still got them)
        self.first_ns: int | None = None
        self.last_ns: int | None = None

    def add(self, timings_ms: dict[str, float], latency_ms: float, done_ns: int, *,
            flagged: bool = False) -> None:
        """Record one processed frame."""
        for name, ms in timings_ms.items():
            self.stages[name].add(ms)
        self.latency_ms.add(latency_ms)
        self.recent_latency_ms.append(latency_ms)
        self.flagged += int(flagged)
        self.frames += 1
        self.first_ns = done_ns if self.first_ns is None else self.first_ns
        self.last_ns = done_ns

    def add_accuracy(self, dice: dict[str, float], tre_mm: dict[str, float]) -> None:
        """Record Dice per label and TRE per variant for a frame with ground truth; NaNs skipped."""
        for name, value in dice.items():
            if not math.isnan(value):
                self.dice[name].add(value)
        for name, value in tre_mm.items():
            if not math.isnan(value):
                self.tre_mm[name].add(value)

    def add_trust(self, error_mm: float, flags: tuple[str, ...] = (),
                  correction: str = "registered", labels_source: str = "network",
                  sweep_pending: bool | None = None) -> None:
        """Record a frame's estimated registration error (NaN skipped), its flag reasons,
        which alignment was published (``correction``: registered or tracked), what its
        labels were (``labels_source``) and whether it came before the sweep that checks the
        registration along the normals (``sweep_pending``; None: no consensus)."""
        self.sweep_pending += bool(sweep_pending)
        if not math.isnan(error_mm):
            self.error_mm.add(error_mm)
        for reason in flags:
            self.flag_reasons[reason] += 1
        self.corrections[correction] += 1
        self.labels_sources[labels_source] += 1

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
            "failed_frames": self.failed,
            "sink_errors": self.sink_errors,
            "fps": round(self.fps(), 2) if self.frames > 1 else math.nan,
            "latency_ms": self.latency_ms.percentiles(),
            "stages_ms": {name: v.percentiles() for name, v in self.stages.items()},
        }
        if self.dice:
            out["dice"] = {name: round(v.mean(), 4) for name, v in self.dice.items() if v.count}
            out["dice_frames"] = {name: len(v) for name, v in self.dice.items()}
        if self.tre_mm:
            out["tre_mm"] = {name: round(v.median(), 3) for name, v in self.tre_mm.items()}
        if self.error_mm.count:
            out["error_estimate_mm"] = self.error_mm.percentiles()
        if self.flag_reasons:
            out["flag_reasons"] = dict(self.flag_reasons)
        if self.corrections.get("tracked"):  # do no harm withheld the registration
            out["corrections"] = dict(self.corrections)
        if self.labels_sources:
            out["labels_source"] = dict(self.labels_sources)
        if self.sweep_pending:
            out["sweep_pending_frames"] = self.sweep_pending
        if extra:
            out.update(extra)
        return out

    def status_line(self, skipped: int = 0) -> str:
        """One line for the live display: frames, fps, last-100 latency, skipped, flagged."""
        p = percentiles(self.recent_latency_ms)
        fps = self.fps()
        rate = "   n/a fps" if math.isnan(fps) else f"{fps:6.1f} fps"
        line = (f"frames {self.frames:6d} | {rate} | latency p50 {p['p50']:6.1f} ms "
                f"p99 {p['p99']:6.1f} ms | skipped {skipped} | flagged {self.flagged}")
        return line + (f" | failed {self.failed}" if self.failed else "")


def format_summary(summary: dict) -> str:
    """The exit summary as a small table."""
    fps = summary["fps"]
    if fps is None or (isinstance(fps, float) and math.isnan(fps)):
        fps = "n/a (a rate needs 2 frames)"
    lines = [f"frames {summary['frames']}  skipped {summary['skipped']}  "
             f"flagged {summary['flagged']}  failed {summary.get('failed_frames', 0)}  "
             f"fps {fps}"]
    if not summary["frames"]:
        lines.append("no frame was processed: no latency to report")
    else:
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
    if "error_estimate_mm" in summary:
        e = summary["error_estimate_mm"]
        reasons = ", ".join(f"{k} {v}" for k, v in summary.get("flag_reasons", {}).items())
        lines.append(f"estimated registration error mm: p50 {e['p50']:.2f}  p95 {e['p95']:.2f}"
                     f"  | flag reasons: {reasons or 'none'}")
    if summary.get("labels_source"):  # network, network+mri (--seg-prior), withheld
        sources = "  ".join(f"{k} {v}" for k, v in summary["labels_source"].items())
        lines.append(f"published labels (frames): {sources}")
    if summary.get("sweep_pending_frames"):  # before the sweep that checks the depth
        lines.append(f"frames before the sweep (depth not yet checked): "
                     f"{summary['sweep_pending_frames']}")
    check = summary.get("estimate_check")
    if isinstance(check, dict):  # --estimate-check (regseg.stream.estimate_check)
        rank = "" if check.get("rank") is None else (
            f": {check['rank']:.2f} of displaced planes estimated worse, {check['min_rank']:.2f} "
            f"needed, {check['frames']} frames")
        lines.append(f"error estimate's own check: {check['status']}{rank}"
                     + ("; every later frame flagged estimate_unverified"
                        if check["status"] == "failed" and check.get("flag") else ""))
    gate = summary.get("gate")
    if gate and (any(gate["refused_frames"].values()) or gate["poses_refused"]):
        refused = "  ".join(f"{k} {v}" for k, v in gate["refused_frames"].items() if v)
        lines.append(f"refused frames: {refused or 'none'}  poses refused (frames processed "
                     f"untracked): {gate['poses_refused']}")
    for key in ("engine", "device", "source", "sinks"):
        if key in summary:
            lines.append(f"{key}: {summary[key]}")
    return "\n".join(lines)


def write_json(summary: dict, path: str | Path) -> None:
    """Write the summary, stamped with the machine, the date and the load average (``machine``,
    ``date``, ``load_average``); NaN
    becomes null so any JSON reader takes it."""
    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v
    from regseg.machine import load_average, machine_name, utc_now

    stamped = {"machine": machine_name(), "date": utc_now(), "load_average": load_average(),
               **summary}  # where, when and beside what it was measured
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean(stamped), indent=2) + "\n")
