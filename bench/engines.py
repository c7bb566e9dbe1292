"""Every model x backend x precision at the live shapes: latency, and accuracy vs eager fp32.

Models: AlignSegNet and the 2-D PLCReg (shipped plcreg2d) at their working sizes, read from their
checkpoints (the live engines), and the naive baseline's MONAI GlobalNet, LocalNet and UNet at
256 x 256 (random weights: time does not depend on values). A combination that cannot be built
here is a row that says why, not a gap. The ``naive chain`` row is the three MONAI nets' eager
fp32 medians added up: ``ratio_p50_vs_naive`` of a row is that sum over the row's median (how
many times less model time than the naive chain).

Accuracy has two measures. ``max_rel_error_vs_eager`` is the largest output difference on one
random input (:func:`regseg.engines.base.parity_error`). The task measure runs every variant
and eager fp32 on the same real inputs, simulated frames of a held-out phantom built by
``regseg.planes`` at each frame's tracked plane (as the live path builds them), and compares
what the live path uses: AlignSegNet's prostate and lesion labels (Dice agreement, argmax at
frame size) and its registration (``theta_diff_mm``: mean distance over the frame's pixels
between where the two thetas send them); PLCReg's ``ddf`` (mean end-point difference in model
pixels, and in mm). ``accuracy_holds`` applies the rule of :func:`accuracy_holds`; it is null
where no task measure applies (the random-weight MONAI nets).

    python bench/engines.py [--quick] [--json out/bench_engines.json] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import add_ratios, device_name, print_table, summarise, write_histogram, write_json
from naive import build_naive_nets
from torch import Tensor, nn

from regseg import metrics, planes, spatial
from regseg.engines.base import BACKENDS, PRECISIONS, Engine, make_engine, parity_error
from regseg.engines.eager import native_bf16_cpu
from regseg.engines.fusion import LIVE_OUTPUTS
from regseg.engines.registration import shipped_weights
from regseg.engines.segmentation import argmax_labels
from regseg.engines.select import time_engine
from regseg.errors import EngineError
from regseg.models.registry import build_model, load_model
from regseg.sim.phantom import Phantom, make_phantom
from regseg.sim.scanner import SimulatedScanner
from regseg.stream.context import MriContext, build_context
from regseg.types import LESION, PROSTATE, Frame

#: Outputs each model's live engine computes (a graph backend drops the rest): FusionEngine's,
#: and DeformableStage's (``ddf`` and ``field``, what RegistrationEngine.predict returns).
OUTPUTS = {"alignsegnet": LIVE_OUTPUTS, "plcreg2d": ("ddf", "field")}

#: Our rule for "accuracy holds" (the issue: fp16/bf16 where accuracy holds): against eager fp32
#: on the same frames, labels agree to Dice >= MIN_DICE_AGREEMENT (mean over the frames that show
#: the structure, prostate and lesion each) and the registration moves by at most
#: MAX_REGISTRATION_DIFF_MM (mean over frames; a tenth of a millimetre is below the 0.2 mm frame
#: pixel and far below the ~1 mm TRE the models reach).
MIN_DICE_AGREEMENT = 0.99
MAX_REGISTRATION_DIFF_MM = 0.1

#: The held-out case and session the task measure images (no training used phantom 1000).
PHANTOM_SEED, SCANNER_SEED = 1000, 1
ACCURACY_FIELDS = ("dice_agreement_prostate", "dice_agreement_lesion", "theta_diff_mm",
                   "ddf_diff_px", "ddf_diff_mm")


class TensorToDict(nn.Module):
    """Named inputs in, ``{"out": tensor}`` out, for MONAI nets that return bare tensors."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        return {"out": self.net(image)}


def models(live_weights: bool) -> dict[str, tuple[nn.Module, dict[str, tuple[int, ...]]]]:
    """name -> (model, input shapes) at the shapes they run at live, working sizes from the
    checkpoints' configs (random weights where none is shipped: time does not depend on them)."""
    def load(name: str, weights: str, **config) -> nn.Module:
        try:
            if live_weights:
                return load_model(shipped_weights(weights))
        except EngineError:  # shipped weights missing: timing does not depend on them
            pass
        return build_model(name, **config)

    live = load("alignsegnet", "alignsegnet")
    s = int(live.config.size)
    # Random weights: the live stage's inputs (DeformableStage: MRI plane + 2 label maps, TRUS).
    plcreg = load("plcreg", "plcreg2d", moving_channels=3, fixed_channels=1,
                  shared_encoder=False)
    cfg = plcreg.config
    grid = tuple(int(n) for n in cfg.size)
    nets = build_naive_nets(256)
    frame2 = {"image": (1, 2, 256, 256)}
    return {
        "alignsegnet": (live.eval(), {"trus": (1, 1, s, s), "mri": (1, 1, s, s),
                                      "mri_labels": (1, 2, s, s)}),
        "plcreg2d": (plcreg.eval(), {"moving": (1, cfg.moving_channels, *grid),
                                     "fixed": (1, cfg.fixed_channels, *grid)}),
        "monai_globalnet": (TensorToDict(nets["globalnet"]), frame2),
        "monai_localnet": (TensorToDict(nets["localnet"]), frame2),
        "monai_unet": (TensorToDict(nets["unet"]), frame2),
    }


# ------------------------------------------------------------------ task accuracy vs eager fp32
def simulated_frames(phantom: Phantom, n: int, seed: int = SCANNER_SEED) -> list[Frame]:
    """``n`` frames spread evenly over one cycle (sagittal and transverse sweep) of a session."""
    scanner = SimulatedScanner(phantom, seed=seed)
    cycle = 2 * scanner.config.sweep_frames
    return [scanner.frame(int(i)) for i in np.linspace(0, cycle, n, endpoint=False)]


def accuracy_inputs(model_name: str, shapes: dict[str, tuple[int, ...]], context: MriContext,
                    frames: list[Frame]) -> list[dict[str, Tensor]] | None:
    """Per frame, the model's inputs at its tracked plane, built by ``regseg.planes`` as the live
    path builds them (PLCReg: as DeformableStage, here at the tracked rather than the affinely
    registered plane); None for a model without a task measure."""
    if model_name not in ("alignsegnet", "plcreg2d"):
        return None
    size = shapes["trus" if model_name == "alignsegnet" else "fixed"][-2:]
    out = []
    for frame in frames:
        trus = planes.trus_input(torch.from_numpy(np.ascontiguousarray(frame.pixels)), size)
        mri, label_maps = planes.mri_inputs(context.mri, context.labels, context.world_to_voxel,
                                            frame.image_to_reference, frame.pixels.shape, size)
        out.append({"trus": trus, "mri": mri, "mri_labels": label_maps}
                   if model_name == "alignsegnet"
                   else {"moving": torch.cat([mri, label_maps], dim=1), "fixed": trus})
    return out


def run_frames(engine: Engine, inputs: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The engine's outputs for every input, copied to the CPU (engines may reuse buffers)."""
    with torch.inference_mode():
        return [{k: v.float().cpu().clone() for k, v in
                 engine({n: x.to(engine.device) for n, x in x_in.items()}).items()}
                for x_in in inputs]


def theta_difference_mm(theta_a: np.ndarray, theta_b: np.ndarray, hw: tuple[int, int],
                        spacing_mm: tuple[float, float]) -> float:
    """Mean distance in mm, over every pixel of an (H, W) frame, between where two normalised
    affines (2, 3) send it (:func:`regseg.spatial.theta_to_pixel`); ``spacing_mm`` (row, col)."""
    diff = spatial.theta_to_pixel(theta_a, hw) - spatial.theta_to_pixel(theta_b, hw)
    j, i = np.mgrid[: hw[0], : hw[1]]
    d = diff[:2] @ np.stack([i.ravel(), j.ravel(), np.ones(i.size)])  # (2, N): (di, dj) pixels
    return float(np.hypot(d[0] * spacing_mm[1], d[1] * spacing_mm[0]).mean())


def frame_labels(logits: Tensor, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 labels as the live path makes them (FrameChain.segment): bilinear logits at
    frame size, then argmax."""
    up = F.interpolate(logits, size=tuple(hw), mode="bilinear", align_corners=False)
    return argmax_labels(up)[0].numpy()


def task_agreement(model_name: str, reference: list[dict[str, Tensor]],
                   candidate: list[dict[str, Tensor]], frames: list[Frame]
                   ) -> dict[str, float | None]:
    """The task measure of a variant (``candidate`` outputs) against eager fp32's (``reference``)
    on the same frames: every :data:`ACCURACY_FIELDS` key (null where it does not apply) and the
    worst frame's value beside each (``..._worst``). Dice is NaN where no frame shows the
    structure in either label map."""
    values: dict[str, list[float]] = {k: [] for k in ACCURACY_FIELDS}
    for ref, cand, frame in zip(reference, candidate, frames, strict=True):
        hw, spacing = tuple(frame.pixels.shape), frame.spacing_mm
        if model_name == "alignsegnet":
            ref_labels, cand_labels = (frame_labels(o["logits"], hw) for o in (ref, cand))
            values["dice_agreement_prostate"].append(
                metrics.dice(cand_labels, ref_labels, PROSTATE))
            values["dice_agreement_lesion"].append(metrics.dice(cand_labels, ref_labels, LESION))
            values["theta_diff_mm"].append(theta_difference_mm(
                ref["theta"][0].double().numpy(), cand["theta"][0].double().numpy(), hw, spacing))
        elif model_name == "plcreg2d":
            diff = (cand["ddf"] - ref["ddf"])[0]  # (2, h, w) model pixels, (dy, dx)
            pixel_mm = torch.tensor([hw[0] * spacing[0] / diff.shape[1],
                                     hw[1] * spacing[1] / diff.shape[2]]).reshape(2, 1, 1)
            values["ddf_diff_px"].append(float(diff.norm(dim=0).mean()))
            values["ddf_diff_mm"].append(float((diff * pixel_mm).norm(dim=0).mean()))
    out: dict[str, float | None] = {}
    for key, v in values.items():
        arr = np.asarray(v, dtype=np.float64)
        shown = arr[~np.isnan(arr)]
        if not len(arr):
            out[key] = out[f"{key}_worst"] = None
        elif not len(shown):
            out[key] = out[f"{key}_worst"] = float("nan")
        else:
            worst = shown.min() if key.startswith("dice") else shown.max()
            out[key] = round(float(shown.mean()), 5)
            out[f"{key}_worst"] = round(float(worst), 5)
    return out


def accuracy_holds(row: dict) -> bool | None:
    """Our rule: every Dice agreement >= :data:`MIN_DICE_AGREEMENT` and every registration
    difference (``theta_diff_mm``, ``ddf_diff_mm``) <= :data:`MAX_REGISTRATION_DIFF_MM`, means
    over the frames; None when the row has no task measure. NaN (nothing to compare) counts as
    neither pass nor fail."""
    def measured(keys: tuple[str, ...]) -> list[float]:
        return [row[k] for k in keys if row.get(k) is not None and not np.isnan(row[k])]

    dice = measured(("dice_agreement_prostate", "dice_agreement_lesion"))
    mm = measured(("theta_diff_mm", "ddf_diff_mm"))
    if not dice and not mm:
        return None
    return (all(d >= MIN_DICE_AGREEMENT for d in dice)
            and all(m <= MAX_REGISTRATION_DIFF_MM for m in mm))


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


def slow_emulated_bf16(model_name: str, device: torch.device, precision: str) -> bool:
    """The rows ``--quick`` leaves out for time: the naive baseline's MONAI nets in bf16 on a CPU
    without bf16 units (1.5-23 s a call on this EPYC: a full run spends ~18 minutes on them). The
    live models' bf16 rows stay: their accuracy under bf16 is what the task columns measure."""
    return (precision == "bf16" and device.type == "cpu" and model_name.startswith("monai_")
            and not native_bf16_cpu())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls and frames, compiled "
                    "only for alignsegnet fp32, no bf16 rows for the MONAI baseline nets on a CPU "
                    "without bf16 units (about 3 minutes on 2 CPU cores)")
    ap.add_argument("--calls", type=int, default=None, help="timed calls per row")
    ap.add_argument("--frames", type=int, default=None,
                    help="simulated frames of the task accuracy measure (default 12, 40)")
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
    n_frames = args.frames or (12 if args.quick else 40)
    device = torch.device(args.device)
    cache_dir = Path(tempfile.mkdtemp(prefix="regseg-engines-"))  # a cold cache: builds timed
    rows, series = [], {}
    peaks = machine_peaks(device, args.threads)
    phantom = make_phantom(PHANTOM_SEED)
    context = build_context(phantom.mri, phantom.labels)
    frames = simulated_frames(phantom, n_frames)
    model_floors = {}
    for model_name, (model, shapes) in models(live_weights=True).items():
        model_floors[model_name] = floors(model, shapes, peaks)
        outputs = OUTPUTS.get(model_name)
        task_inputs = accuracy_inputs(model_name, shapes, context, frames)
        task_reference = None
        if task_inputs is not None:  # eager fp32 on the frames, whatever --backends says
            task_reference = run_frames(make_engine(model, shapes, device=device,
                                                    outputs=outputs), task_inputs)
        reference = None
        for backend in args.backends.split(","):
            for precision in args.precisions.split(","):
                name = f"{model_name}/{backend}/{precision}"
                if args.quick and backend == "compiled" and (
                        model_name != "alignsegnet" or precision != "fp32"):
                    rows.append({"name": name, "status": "skipped (--quick)"})
                    continue
                if args.quick and slow_emulated_bf16(model_name, device, precision):
                    rows.append({"name": name, "status": "skipped (--quick: bf16 is emulated on "
                                 "this CPU; the random-weight baseline nets take seconds a call)"})
                    continue
                start = time.perf_counter()
                try:
                    engine = make_engine(model, shapes, backend=backend, device=device,
                                         precision=precision, cache_dir=cache_dir,
                                         threads=args.threads, outputs=outputs)
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
                task = ({} if task_reference is None else
                        task_agreement(model_name, task_reference,
                                       run_frames(engine, task_inputs), frames))
                times = time_engine(engine, probe, calls)
                series[name] = times
                rows.append(summarise(name, times, status="ok", model=model_name,
                                      **model_floors[model_name],
                                      backend=backend, precision=precision,
                                      build_s=round(build_s, 2), device=device_name(device),
                                      max_rel_error_vs_eager=error, **task,
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
        for key in ACCURACY_FIELDS:
            row.setdefault(key, None)
            row.setdefault(f"{key}_worst", None)
        row["accuracy_holds"] = accuracy_holds(row) if row.get("status") == "ok" else None
    print_table(rows, [("name", "model/backend/precision", ""), ("p50_ms", "median ms", ".2f"),
                       ("p99_ms", "p99 ms", ".2f"), ("fps", "calls/s", ".0f"),
                       ("build_s", "build s", ".1f"),
                       ("max_rel_error_vs_eager", "err vs eager", ".1e"),
                       ("dice_agreement_prostate", "Dice prost", ".4f"),
                       ("dice_agreement_lesion", "Dice lesion", ".4f"),
                       ("theta_diff_mm", "theta mm", ".3f"), ("ddf_diff_px", "ddf px", ".3f"),
                       ("accuracy_holds", "acc holds", ""),
                       ("ratio_p50_vs_naive", "x naive", ".1f"), ("status", "status", "")])
    print(f"task accuracy vs eager fp32 on {n_frames} simulated frames (phantom {PHANTOM_SEED}, "
          f"session {SCANNER_SEED}); accuracy holds when Dice agreement (prostate, lesion) >= "
          f"{MIN_DICE_AGREEMENT} and the registration moves <= {MAX_REGISTRATION_DIFF_MM} mm "
          "(AlignSegNet theta: mean over frame pixels; PLCReg ddf: mean end-point, model px "
          "to mm), means over the frames; '-' where it does not apply")
    print(f"machine: {peaks['matmul_gflops']} GFLOP/s fp32 matmul, {peaks['copy_gbps']} GB/s "
          f"copy ({device_name(device)}, {args.threads} threads)")
    for model_name, f in model_floors.items():
        print(f"floors {model_name}: {f['gflops_per_call']} GFLOP -> {f['compute_floor_ms']} ms; "
              f"{f['mbytes_per_call']} MB -> {f['bytes_floor_ms']} ms")
    write_json(args.json, "engines", rows, calls=calls, threads=args.threads, peaks=peaks,
               floors=model_floors, accuracy_frames=n_frames,
               accuracy_rule={"min_dice_agreement": MIN_DICE_AGREEMENT,
                              "max_registration_diff_mm": MAX_REGISTRATION_DIFF_MM,
                              "phantom_seed": PHANTOM_SEED, "scanner_seed": SCANNER_SEED},
               argv=argv)
    write_histogram(args.png or Path(args.json).with_suffix(".png"), series,
                    f"per-call latency by engine ({device_name(device)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
