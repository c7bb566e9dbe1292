"""The live chain at the frame sizes scanners send, with the compiled label kernels and with their
torch twins, in alternating rounds of one run.

A PLUS server usually streams 640 x 480 video; ``bench/latency.py`` renders 256 x 256 frames, where
the stages whose work grows with the frame (labels up-sampled to the frame, the MRI labels warped
onto it, the overlay) cost little. This bench runs ``bench/latency.py --quick --deformable
--no-naive --frame-size HxW`` for each size, once with the label kernels
(``regseg.kernels.labels_up``, ``regseg.kernels.plane_labels``) and once with
``REGSEG_NUMBA_LABELS=0`` (their torch twins, the chain before session 33; every other stage the
same), alternating, and reports the default chain's rows (``regseg+deformable @30fps``) and the
per-stage medians: one JSON, one table.

``python bench/frame_size.py [--sizes 480x640,256x256] [--rounds 2] [--json F]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table, write_json  # noqa: E402

LATENCY = Path(__file__).with_name("latency.py")
VARIANTS = {"kernels": {}, "torch twins": {"REGSEG_NUMBA_LABELS": "0"}}
ROW = "regseg+deformable @30fps"  # the CLI's default chain at the offered 30 fps
STAGES = ("prepare", "resegment", "deformable", "seg_prior", "overlay", "total")


def one_run(size: str, env: dict[str, str], out: Path) -> dict:
    """One ``bench/latency.py`` run; its default-chain row."""
    cmd = [sys.executable, str(LATENCY), "--quick", "--deformable", "--no-naive",
           "--frame-size", size, "--json", str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    rows = json.loads(out.read_text())["results"]
    return next(r for r in rows if r["name"] == ROW)


def summary(size: str, variant: str, runs: list[dict]) -> dict:
    def med(values):
        return float(np.median(values))

    row = {"name": f"{size} {variant}", "size": size, "variant": variant, "rounds": len(runs),
           "p50_ms": med([r["p50_ms"] for r in runs]), "fps": med([r["fps"] for r in runs]),
           "p50_ms_rounds": [r["p50_ms"] for r in runs]}
    for stage in STAGES:
        row[f"{stage}_ms"] = med([r["stages_p50_ms"].get(stage, float("nan")) for r in runs])
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="480x640,256x256", help="HxW frame sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--json", default="out/bench_frame_size.json")
    args = p.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes or args.rounds < 1:
        p.error(f"--sizes {args.sizes!r} / --rounds {args.rounds}: a size and a round needed")
    runs: dict[tuple[str, str], list[dict]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="regseg-frame-size-") as tmp:
        for r in range(args.rounds):
            for size in sizes:
                for variant, env in VARIANTS.items():
                    out = Path(tmp) / f"{size}-{variant.replace(' ', '_')}-{r}.json"
                    runs.setdefault((size, variant), []).append(one_run(size, env, out))
                    print(f"round {r + 1} {size} {variant}: e2e p50 "
                          f"{runs[(size, variant)][-1]['p50_ms']:.1f} ms", flush=True)
    rows = [summary(size, variant, runs[(size, variant)]) for size in sizes
            for variant in VARIANTS]
    for size in sizes:
        new, old = (next(r for r in rows if r["size"] == size and r["variant"] == v)
                    for v in VARIANTS)
        new["speedup_p50"] = old["p50_ms"] / new["p50_ms"]
    print(f"frame size: {ROW} (median of {args.rounds} alternating rounds), {device_name()}")
    print_table(rows, [("name", "size, labels", ""), ("p50_ms", "e2e p50", ".1f"),
                       ("fps", "fps", ".1f"), *((f"{s}_ms", s, ".1f") for s in STAGES),
                       ("speedup_p50", "x p50", ".2f")])
    print(f"wall {time.perf_counter() - t0:.0f} s")
    write_json(args.json, "frame_size", rows, argv, rounds=args.rounds, row=ROW)
    return 0


if __name__ == "__main__":
    sys.exit(main())
