"""Batch throughput: ``regseg batch register`` over MNI152 pairs on 1 and 2 ranks (cases/s).

Each rank count runs the real command (``python -m regseg.batch``, under ``torchrun`` for more
than one rank) into a fresh folder; the rate is the cases run over the job's own wall time
(``summary.json``: engine start, loading, compute and writing, not the Python start-up). The
scaling efficiency is ``rate(N) / (N * rate(1))``. On a CPU every run uses all cores (1 rank:
all threads; N ranks: cores / N threads each), so the efficiency says what ranks gain over
threads on the same machine; on CUDA each rank takes one GPU. The time per case is broken into
I/O (NIfTI reading in the loader's workers), the compute's wait for it, compute and writing.

Run timings under the team's lock: ``flock /tmp/regseg-cpu.lock python bench/batch.py --quick
--json out/bench_batch.json``.
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
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, print_table, write_json  # noqa: E402


def run_job(manifest: Path, out: Path, ranks: int, device: str, extra: list[str]) -> dict:
    """One ``regseg batch register`` job on ``ranks`` ranks; its ``summary.json``."""
    job = ["-m", "regseg.batch", "register", str(manifest), "--out", str(out), "--device",
           device, "--no-progress", *extra]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(ranks), *job] if ranks > 1 else [sys.executable, *job])
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench/batch.py: {' '.join(cmd)} failed ({done.returncode}):\n"
                         f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["process_wall_s"] = round(time.perf_counter() - t0, 2)
    # the registration alone (affine + deformable + warping), without scoring and I/O
    totals = [r["metrics"]["timings_s"]["total_s"] for r in map(
        json.loads, (out / "results.jsonl").read_text().splitlines()) if r["status"] == "ok"]
    summary["register_s"] = round(sum(totals) / len(totals), 4) if totals else None
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="6 pairs, no affine stage (~2 min)")
    p.add_argument("--pairs", type=int, default=None, help="MNI152 pairs (quick 6, full 24)")
    p.add_argument("--ranks", type=int, nargs="+", default=None,
                   help="rank counts to run (default 1 2; on CUDA 1 and the GPU count)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--affine-iterations", type=int, default=None,
                   help="affine stage steps (quick: 0, i.e. --no-affine; full: 120)")
    p.add_argument("--data", type=Path, default=None,
                   help="an MNI152 set from `regseg mni` to reuse (default: written to a "
                        "temporary folder)")
    p.add_argument("--weights", default="plcreg3d", help="PLCReg 3-D checkpoint (default shipped)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    n_pairs = args.pairs or (6 if args.quick else 24)
    iterations = args.affine_iterations if args.affine_iterations is not None else (
        0 if args.quick else 120)
    extra = ["--no-affine"] if iterations == 0 else ["--affine-iterations", str(iterations)]
    extra += ["--weights", args.weights]
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    ranks = args.ranks or ([1, 2] if args.device == "cpu" else sorted({1, max(1, gpus)}))
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            from regseg.sim.mni import build_mni_set

            data = tmp / "mni"
            build_mni_set(data, n_pairs)
        manifest = data / "pairs.csv"
        rows: list[dict[str, Any]] = []
        for n in ranks:
            summary = run_job(manifest, tmp / f"out{n}", n, args.device, extra)
            mean = summary["mean_s"]
            rows.append({"ranks": n, "cases": summary["ran"], "wall_s": summary["wall_s"],
                         "cases_per_s": summary["cases_per_s"],
                         "io_s": mean["io_s"], "wait_s": mean["wait_s"],
                         "compute_s": mean["compute_s"], "write_s": mean["write_s"],
                         "register_s": summary["register_s"],
                         "failed": len(summary["failed"])})
    rates = {str(r["ranks"]): r["cases_per_s"] for r in rows}
    base = rows[0]["cases_per_s"] if rows[0]["ranks"] == 1 else None
    for r in rows:
        r["scaling_efficiency"] = (round(r["cases_per_s"] / (r["ranks"] * base), 3)
                                   if base else None)
    efficiency = rows[-1]["scaling_efficiency"] if len(rows) > 1 else None
    print(f"regseg batch register, {n_pairs} MNI152 pairs, affine iterations {iterations}, "
          f"{device_name(args.device)}, {os.cpu_count()} cores")
    print_table(rows, [("ranks", "ranks", ""), ("cases_per_s", "cases/s", ".3f"),
                       ("scaling_efficiency", "efficiency", ".2f"), ("io_s", "io s", ".3f"),
                       ("wait_s", "wait s", ".3f"), ("compute_s", "compute s", ".3f"),
                       ("write_s", "write s", ".3f"), ("register_s", "register s", ".3f"),
                       ("wall_s", "wall s", ".1f")])
    if args.json:
        write_json(args.json, "batch", rows, argv, cases_per_s=rates,
                   scaling_efficiency=efficiency, device=device_name(args.device),
                   pairs=n_pairs, affine_iterations=iterations, cores=os.cpu_count())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
