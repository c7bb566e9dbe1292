"""The GPU acceptance report: bench/gpu_check.sh's results as one JSON and a table of targets.

``python bench/gpu_report.py DIR [--raw RAW]`` reads ``DIR/steps.tsv`` (step, exit status,
seconds) and the benches' JSON under ``RAW`` (default ``DIR/raw``), and writes
``DIR/gpu_check.json`` (with every bench JSON embedded) and ``DIR/gpu_check.md``. A figure a step
did not produce is written as unmeasured (null), never guessed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: (key, what, target, unit, better): the issue's GPU targets.
TARGETS = (
    ("processing_p99_ms", "live processing p99", 2.0, "ms", "<="),
    ("loopback_p99_ms", "loopback OpenIGTLink p99", 5.0, "ms", "<="),
    ("flat_out_fps", "flat-out rate", 500.0, "fps", ">="),
    ("vs_naive", "speed-up vs the naive pipeline (p50)", 10.0, "x", ">="),
    ("register_3d_s", "3-D registration per MNI152 pair", 0.3, "s", "<="),
)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _row(rows: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    return next((r for r in rows if str(r.get("name", "")).startswith(prefix)), {})


def figures(raw: Path) -> dict[str, Any]:
    """The target figures from the benches' JSON (``None`` where not measured)."""
    out: dict[str, Any] = {k: None for k, *_ in TARGETS}
    latency = _load(raw / "latency.json")
    if latency:
        rows = latency.get("results", [])
        paced = next((r for r in rows if str(r.get("name", "")).startswith("regseg @")), {})
        flat = _row(rows, "regseg flat-out")
        out["loopback_p99_ms"] = paced.get("p99_ms")
        # bench/latency.py records the pipeline's processing p99 where it has it, else p50 only
        out["processing_p99_ms"] = paced.get("processing_p99_ms")
        out["processing_p50_ms"] = paced.get("processing_p50_ms")
        out["flat_out_fps"] = flat.get("fps")
        out["vs_naive"] = flat.get("ratio_p50_vs_naive")
    batch = _load(raw / "batch.json")
    if batch and batch.get("results"):
        out["register_3d_s"] = batch["results"][0].get("register_s")
        out["batch_cases_per_s"] = batch.get("cases_per_s")
    engines = _load(raw / "engines.json")
    if engines:
        out["engines"] = [{k: r.get(k) for k in ("name", "status", "p50_ms", "p99_ms",
                                                 "max_rel_error_vs_eager", "accuracy_holds")
                           if k in r} for r in engines.get("results", [])]
    return out


def verdict(value: float | None, target: float, better: str) -> str:
    if value is None:
        return "unmeasured"
    ok = value <= target if better == "<=" else value >= target
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path, help="bench/gpu_check.sh's output folder")
    p.add_argument("--raw", type=Path, default=None, help="the benches' JSON (default DIR/raw)")
    args = p.parse_args(argv)
    raw = args.raw or args.dir / "raw"
    steps = []
    tsv = args.dir / "steps.tsv"
    if tsv.is_file():
        for line in tsv.read_text().splitlines():
            name, rc, seconds = line.split("\t")
            steps.append({"step": name, "exit": int(rc), "seconds": float(seconds)})
    env = _load(raw / "env.json") or {}
    found = figures(raw)
    table = ["| figure | target | measured | verdict |", "|---|---|---|---|"]
    for key, what, target, unit, better in TARGETS:
        value = found[key]
        shown = "—" if value is None else f"{value:.3g} {unit}"
        table.append(f"| {what} | {better} {target:g} {unit} | {shown} | "
                     f"{verdict(value, target, better)} |")
    if found.get("processing_p99_ms") is None and found.get("processing_p50_ms") is not None:
        table.append(f"| live processing p50 (p99 not recorded) | — | "
                     f"{found['processing_p50_ms']:.3g} ms | — |")
    engines_md = []
    if found.get("engines"):
        engines_md = ["| model/backend/precision | status | p50 ms | p99 ms | err vs eager | "
                      "accuracy holds |", "|---|---|---|---|---|---|"] + [
            f"| {r.get('name')} | {r.get('status')} | {r.get('p50_ms', '—')} | "
            f"{r.get('p99_ms', '—')} | {r.get('max_rel_error_vs_eager', '—')} | "
            f"{r.get('accuracy_holds', '—')} |" for r in found["engines"]] + [""]
    steps_md = ["| step | exit | seconds |", "|---|---|---|"] + [
        f"| {s['step']} | {s['exit']} | {s['seconds']:.0f} |" for s in steps]
    title = f"GPU acceptance on {env.get('gpu', 'an unknown device')}"
    text = "\n".join([f"# {title}", "", *table, "", *engines_md, *steps_md, ""])
    (args.dir / "gpu_check.md").write_text(text)
    report = {"env": env, "steps": steps, "figures": found,
              "raw": {f.stem: _load(f) for f in sorted(raw.glob("*.json"))},
              "targets": {k: {"target": t, "unit": u, "better": b,
                              "verdict": verdict(found[k], t, b)} for k, _, t, u, b in TARGETS}}
    (args.dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
