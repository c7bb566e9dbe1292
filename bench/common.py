"""What every benchmark shares: percentiles, device names, the table, the JSON and the histogram."""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regseg.machine import cpu_name, load_average, machine_name, utc_now


def device_name(device: str | torch.device = "cpu") -> str:
    """A human name for where a row ran: the CPU model and core count, or the GPU's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def summarise(name: str, times_ms: Sequence[float], **extra: Any) -> dict[str, Any]:
    """One JSON row: p50/p95/p99/max in ms and fps (1000 / mean), plus ``extra`` fields."""
    arr = np.asarray(times_ms, dtype=np.float64)
    if arr.size == 0:
        stats = {k: math.nan for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "fps")}
    else:
        p50, p95, p99 = np.percentile(arr, [50, 95, 99])
        stats = {"p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3),
                 "p99_ms": round(float(p99), 3), "max_ms": round(float(arr.max()), 3),
                 "fps": round(1000.0 / float(arr.mean()), 2)}
    return {"name": name, **stats, "n": int(arr.size), **extra}


def add_ratios(rows: list[dict[str, Any]], *, naive: str | None = None,
               simpleitk: str | None = None) -> None:
    """Set ``ratio_p50_vs_naive`` / ``ratio_vs_simpleitk``: baseline p50 / row p50 (x faster).

    Args:
        naive: name of the naive-pipeline row (the baseline of ``ratio_p50_vs_naive``).
        simpleitk: name of the SimpleITK row (the baseline of ``ratio_vs_simpleitk``).
    """
    for key, base_name in (("ratio_p50_vs_naive", naive), ("ratio_vs_simpleitk", simpleitk)):
        base = next((r for r in rows if r["name"] == base_name), None) if base_name else None
        for row in rows:
            ok = base is not None and row.get("p50_ms") and not math.isnan(row["p50_ms"])
            row[key] = round(base["p50_ms"] / row["p50_ms"], 2) if ok else None


def print_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """Print rows as a fixed-width table; ``columns`` are (key, header, format spec)."""
    widths = [max(len(h), 9) for _, h, _ in columns]
    widths[0] = max(widths[0], *(len(str(r.get(columns[0][0], ""))) for r in rows))
    print("  ".join(h.rjust(w) if i else h.ljust(w)
                    for i, ((_, h, _), w) in enumerate(zip(columns, widths, strict=True))))
    for row in rows:
        cells = []
        for i, ((key, _, spec), w) in enumerate(zip(columns, widths, strict=True)):
            value = row.get(key)
            text = "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
                else format(value, spec) if spec and isinstance(value, int | float) else str(value)
            cells.append(text.rjust(w) if i else text.ljust(w))
        print("  ".join(cells))


def case_bootstrap(per_case: Sequence[np.ndarray], stat: Any,
                   picks: np.ndarray) -> tuple[float, float]:
    """95 % interval of ``stat`` over the frames of whole cases resampled with replacement:
    ``per_case`` each case's values, ``picks`` (draws, cases) the case indices of each draw
    (the caller's seeded rng). Draws whose frames are all empty are left out; (NaN, NaN) if all
    are."""
    boot = []
    for pick in picks:
        v = np.concatenate([per_case[i] for i in pick]) if len(pick) else np.empty(0)
        if v.size:
            boot.append(float(stat(v)))
    boot_arr = np.asarray(boot)
    boot_arr = boot_arr[np.isfinite(boot_arr)]
    if not boot_arr.size:
        return math.nan, math.nan
    return float(np.percentile(boot_arr, 2.5)), float(np.percentile(boot_arr, 97.5))


def write_json(path: str | Path, bench: str, rows: list[dict[str, Any]],
               argv: list[str] | None = None, **meta: Any) -> None:
    """``{"bench", "command", "results": rows, **meta}`` with NaN written as null.

    ``command`` is the bench's command line (``python bench/<bench>.py`` and ``argv``, default
    the process's arguments), so a JSON says how to reproduce it.
    """
    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    command = " ".join(["python", f"bench/{bench}.py", *(argv or sys.argv[1:])])
    out = {"bench": bench, "command": command, "machine": machine_name(), "date": utc_now(),
           "load_average": load_average(), "python": platform.python_version(),
           "torch": torch.__version__, **meta, "results": rows}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean(out), indent=2) + "\n")
    print(f"wrote {path}")


def write_histogram(path: str | Path, series: dict[str, Sequence[float]], title: str) -> None:
    """Latency histograms (ms, log-spaced bins) of several series on one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [np.asarray(v, dtype=np.float64) for v in series.values() if len(v)]
    if not values:
        return
    lo = max(min(float(v.min()) for v in values), 0.01)
    hi = max(float(v.max()) for v in values) * 1.05
    bins = np.geomspace(lo, max(hi, lo * 1.1), 60)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, v in series.items():
        if len(v):
            ax.hist(v, bins=bins, alpha=0.55, label=f"{name} (p50 {np.median(v):.1f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("latency per frame (ms, log scale)")
    ax.set_ylabel("frames")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
