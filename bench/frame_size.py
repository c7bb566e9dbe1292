"""The live chain at the frame sizes scanners send, with the compiled label kernels and with their
torch twins, in alternating rounds of one run.

A PLUS server usually streams 640 x 480 video; ``bench/latency.py`` renders 256 x 256 frames, where
the stages whose work grows with the frame (labels up-sampled to the frame, the MRI labels warped
onto it, the overlay) cost little. This bench runs ``bench/latency.py --quick --deformable
--no-naive --frame-size HxW`` for each size, once with the label kernels
(``regseg.kernels.labels_up``, ``regseg.kernels.plane_labels``) and once with
``REGSEG_NUMBA_LABELS=0`` (their torch twins, the chain before session 33; every other stage the
same), alternating, and reports the default chain's rows (``regseg+deformable @30fps``) and the
per-stage medians; before, each kernel against its twin alone (one thread): one JSON, two tables.

``python bench/frame_size.py [--sizes 480x640,256x256] [--rounds 2] [--kernels-only] [--json F]``
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


def _cases(size: str, logits, context, rng) -> dict:
    """name -> (kernel, torch twin) at frame size ``size``: labels from ``logits``, and the
    MRI labels on a plane through the gland's centre, with and without a displacement."""
    import torch

    from regseg.kernels.labels_up import labels_up
    from regseg.kernels.plane_labels import labels_on_plane
    from regseg.stream.capture import warp_labels_torch
    from regseg.stream.chain import segment_torch

    hw = tuple(int(v) for v in size.lower().split("x"))
    plane = np.eye(4)
    plane[:3, :3] *= 0.2 * 256 / max(hw)
    plane[:3, 3] = context.centre_mm - plane[:3, :3] @ np.array([hw[1] / 2, hw[0] / 2, 0.0])
    m = (context.world_to_normalised @ plane)[:3, [0, 1, 3]].astype(np.float32)
    ddf = torch.from_numpy(rng.normal(0, 2.0, (1, 2, *hw)).astype(np.float32))
    labels = context.labels[0, 0].numpy()
    return {"labels from logits": (lambda: labels_up(logits[0].numpy(), hw),
                                   lambda: segment_torch(logits, hw)),
            "MRI labels on the plane": (lambda: labels_on_plane(labels, m, hw),
                                        lambda: warp_labels_torch(context, m, hw)),
            "... through a displacement": (
                lambda: labels_on_plane(labels, m, hw, ddf[0].numpy()),
                lambda: warp_labels_torch(context, m, hw, ddf))}


def kernel_rows(sizes: list[str], calls: int = 20) -> list[dict]:
    """Each label kernel against its torch twin at each size, one thread, median of ``calls``:
    the labels of network-like logits (smooth classes, noisy boundaries) and the phantom's MRI
    labels on a plane through its gland, with and without a displacement."""
    import torch
    import torch.nn.functional as F

    from regseg.sim.phantom import make_phantom
    from regseg.stream.context import build_context

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    low = torch.from_numpy(rng.normal(size=(1, 3, 8, 8)).astype(np.float32)) * 6
    logits = F.interpolate(low, size=(128, 128), mode="bilinear", align_corners=False)
    logits += torch.from_numpy(rng.normal(size=(1, 3, 128, 128)).astype(np.float32)) * 0.3
    phantom = make_phantom(0)
    context = build_context(phantom.mri, phantom.labels)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return float(np.median(times))

    rows = []
    for size in sizes:
        for name, (kernel, twin) in _cases(size, logits, context, rng).items():
            same = bool((np.asarray(kernel()) == np.asarray(twin())).all())
            k_ms, t_ms = timed(kernel), timed(twin)
            rows.append({"name": f"{size} {name}", "size": size, "kernel_ms": k_ms,
                         "twin_ms": t_ms, "speedup": t_ms / k_ms, "same_labels": same})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="480x640,256x256", help="HxW frame sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--kernels-only", action="store_true",
                   help="only time the kernels against their twins (seconds, no chain runs)")
    p.add_argument("--json", default="out/bench_frame_size.json")
    args = p.parse_args(argv)
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    if not sizes or args.rounds < 1:
        p.error(f"--sizes {args.sizes!r} / --rounds {args.rounds}: a size and a round needed")
    for size in sizes:  # the same check as bench/latency.py --frame-size
        parts = size.split("x")
        if not (len(parts) == 2 and all(v.isdigit() and 64 <= int(v) <= 2048 for v in parts)):
            p.error(f"--sizes: {size!r} is not HxW with each side 64 to 2048 pixels, e.g. 480x640")
    t0 = time.perf_counter()
    kernels = kernel_rows(sizes)
    print(f"label kernels against their torch twins (one thread, median of 20 calls), "
          f"{device_name()}")
    print_table(kernels, [("name", "size, work", ""), ("kernel_ms", "kernel ms", ".2f"),
                          ("twin_ms", "torch ms", ".2f"), ("speedup", "x", ".1f"),
                          ("same_labels", "same labels", "")])
    if args.kernels_only:
        write_json(args.json, "frame_size", [], argv, kernels=kernels)
        return 0
    runs: dict[tuple[str, str], list[dict]] = {}
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
    write_json(args.json, "frame_size", rows, argv, rounds=args.rounds, row=ROW,
               kernels=kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
