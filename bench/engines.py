"""Every model x backend x precision at the live shapes: median and p99 per call, parity vs eager.

Models: AlignSegNet at its working size (the live engine) and the naive baseline's MONAI
GlobalNet, LocalNet and UNet at 256 x 256 (random weights: time does not depend on values).
A combination that cannot be built here is a row that says why, not a gap. The ``naive chain``
row is the three MONAI nets' eager fp32 medians added up: ``ratio_p50_vs_naive`` of a row is
that sum over the row's median (how many times less model time than the naive chain).

    python bench/engines.py [--quick] [--json out/bench_engines.json] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import add_ratios, device_name, print_table, summarise, write_histogram, write_json
from naive import build_naive_nets
from torch import Tensor, nn

from regseg.engines.base import BACKENDS, PRECISIONS, make_engine, parity_error
from regseg.engines.fusion import LIVE_OUTPUTS
from regseg.engines.select import time_engine
from regseg.errors import EngineError
from regseg.models.registry import build_model, load_model


class TensorToDict(nn.Module):
    """Named inputs in, ``{"out": tensor}`` out, for MONAI nets that return bare tensors."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        return {"out": self.net(image)}


def models(live_weights: bool) -> dict[str, tuple[nn.Module, dict[str, tuple[int, ...]]]]:
    """name -> (model, input shapes) at the shapes they run at live (AlignSegNet: only its live
    outputs, as FusionEngine builds it)."""
    try:
        live = load_model("alignsegnet") if live_weights else build_model("alignsegnet")
    except EngineError:  # shipped weights missing: timing does not depend on them
        live = build_model("alignsegnet")
    s = int(live.config.size)
    nets = build_naive_nets(256)
    frame2 = {"image": (1, 2, 256, 256)}
    return {
        "alignsegnet": (live.eval(), {"trus": (1, 1, s, s), "mri": (1, 1, s, s),
                                      "mri_labels": (1, 2, s, s)}),
        "monai_globalnet": (TensorToDict(nets["globalnet"]), frame2),
        "monai_localnet": (TensorToDict(nets["localnet"]), frame2),
        "monai_unet": (TensorToDict(nets["unet"]), frame2),
    }


def machine_peaks(device: torch.device, threads: int) -> dict[str, float]:
    """Measured fp32 matmul GFLOP/s (1024^3 sgemm) and copy GB/s (64 MiB) on ``device``."""
    a = torch.rand(1024, 1024, device=device)
    src = torch.empty(16 << 20, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best_mm = best_copy = float("inf")
    for _ in range(5):
        sync()
        t = time.perf_counter()
        a @ a
        sync()
        best_mm = min(best_mm, time.perf_counter() - t)
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        best_copy = min(best_copy, time.perf_counter() - t)
    return {"matmul_gflops": round(2 * 1024**3 / best_mm / 1e9, 1),
            "copy_gbps": round(2 * src.numel() * 4 / best_copy / 1e9, 1), "threads": threads}


def floors(model: nn.Module, shapes: dict[str, tuple[int, ...]], peaks: dict[str, float]
           ) -> dict[str, float]:
    """Lower bounds of one call: compute (FLOPs at the measured matmul rate) and bytes (weights
    read once, every leaf module's output written once and read once, at the measured copy rate).
    """
    from torch.utils.flop_counter import FlopCounterMode

    inputs = {k: torch.rand(s) for k, s in shapes.items()}
    activation_bytes = 0

    def hook(_module, _inputs, output):
        nonlocal activation_bytes
        outs = output.values() if isinstance(output, dict) else (
            output if isinstance(output, tuple | list) else (output,))
        activation_bytes += sum(o.numel() * o.element_size() for o in outs
                                if isinstance(o, Tensor))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.cpu()(**inputs)
    for h in handles:
        h.remove()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    moved = weight_bytes + 2 * activation_bytes
    flops = counter.get_total_flops()
    return {"gflops_per_call": round(flops / 1e9, 3), "mbytes_per_call": round(moved / 1e6, 2),
            "compute_floor_ms": round(flops / (peaks["matmul_gflops"] * 1e9) * 1e3, 3),
            "bytes_floor_ms": round(moved / (peaks["copy_gbps"] * 1e9) * 1e3, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls, compiled only for "
                    "alignsegnet fp32 (under 3 minutes on 2 CPU cores)")
    ap.add_argument("--calls", type=int, default=None, help="timed calls per row")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and engine threads (regseg-stream's CPU default)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--json", default="out/bench_engines.json")
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    calls = args.calls or (30 if args.quick else 200)
    device = torch.device(args.device)
    cache_dir = Path(tempfile.mkdtemp(prefix="regseg-engines-"))  # a cold cache: builds timed
    rows, series = [], {}
    peaks = machine_peaks(device, args.threads)
    model_floors = {}
    for model_name, (model, shapes) in models(live_weights=True).items():
        model_floors[model_name] = floors(model, shapes, peaks)
        reference = None
        for backend in args.backends.split(","):
            for precision in args.precisions.split(","):
                name = f"{model_name}/{backend}/{precision}"
                if args.quick and backend == "compiled" and (
                        model_name != "alignsegnet" or precision != "fp32"):
                    rows.append({"name": name, "status": "skipped (--quick)"})
                    continue
                start = time.perf_counter()
                try:
                    engine = make_engine(model, shapes, backend=backend, device=device,
                                         precision=precision, cache_dir=cache_dir,
                                         threads=args.threads,
                                         outputs=LIVE_OUTPUTS if model_name == "alignsegnet"
                                         else None)
                except EngineError as exc:
                    rows.append({"name": name, "status": f"unavailable: {exc}"[:160]})
                    continue
                build_s = time.perf_counter() - start
                probe = {k: torch.rand(s, device=device) for k, s in shapes.items()}
                out = {k: v.clone() for k, v in engine(probe).items()}
                if reference is None and backend == "eager" and precision == "fp32":
                    reference = (probe, out)
                error = (max(parity_error(reference[1], engine(reference[0])).values())
                         if reference is not None else None)
                times = time_engine(engine, probe, calls)
                series[name] = times
                rows.append(summarise(name, times, status="ok", model=model_name,
                                      **model_floors[model_name],
                                      backend=backend, precision=precision,
                                      build_s=round(build_s, 2), device=device_name(device),
                                      max_rel_error_vs_eager=error,
                                      median_ms=round(statistics.median(times), 3)))
    naive_parts = [r for r in rows if r.get("status") == "ok" and r["backend"] == "eager"
                   and r["precision"] == "fp32" and r["model"].startswith("monai_")]
    if len(naive_parts) == 3:
        rows.append({"name": "naive chain (3 MONAI nets, eager fp32)", "status": "sum",
                     "p50_ms": round(sum(r["p50_ms"] for r in naive_parts), 3),
                     "p99_ms": round(sum(r["p99_ms"] for r in naive_parts), 3),
                     "device": device_name(device)})
        add_ratios(rows, naive=rows[-1]["name"])
    for row in rows:
        row.setdefault("ratio_vs_simpleitk", None)  # not a registration-only bench
    print_table(rows, [("name", "model/backend/precision", ""), ("p50_ms", "median ms", ".2f"),
                       ("p99_ms", "p99 ms", ".2f"), ("fps", "calls/s", ".0f"),
                       ("build_s", "build s", ".1f"),
                       ("max_rel_error_vs_eager", "err vs eager", ".1e"),
                       ("ratio_p50_vs_naive", "x naive", ".1f"), ("status", "status", "")])
    print(f"machine: {peaks['matmul_gflops']} GFLOP/s fp32 matmul, {peaks['copy_gbps']} GB/s "
          f"copy ({device_name(device)}, {args.threads} threads)")
    for model_name, f in model_floors.items():
        print(f"floors {model_name}: {f['gflops_per_call']} GFLOP -> {f['compute_floor_ms']} ms; "
              f"{f['mbytes_per_call']} MB -> {f['bytes_floor_ms']} ms")
    write_json(args.json, "engines", rows, calls=calls, threads=args.threads, machine=peaks,
               floors=model_floors,
               command=" ".join(["python", "bench/engines.py", *(argv or sys.argv[1:])]))
    write_histogram(args.png or Path(args.json).with_suffix(".png"), series,
                    f"per-call latency by engine ({device_name(device)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
