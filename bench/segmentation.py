"""Segmentation of TRUS frames, side by side: ASC-Seg (fused, TRUS-only), AlignSegNet's U-Net head,
MONAI UNet and UNETR; Dice, HD95, size, FLOPs, ms per frame, ONNX parity, and the trust question.

``python bench/segmentation.py [--quick] [--json F]``

- Frames: held-out family A (plain scanner, phantoms 1000..; train/compare.py's frames) and
  family B (``regseg.sim.family_b``, written separately, never trained on; seeds 5000..), each
  with a rigid tracking error of exactly ``--level`` mm and degrees. The same frames go through
  every model. AlignSegNet registers each frame (one forward pass); its U-Net head's labels are
  ``unet_head``, and its registered MRI plane and labels are the fused models' context.
  ``registered_mri`` scores the registered MRI labels themselves (no segmentation at all).
- Models: the shipped ``ascseg`` / ``ascseg_trus`` (models/weights), the shipped AlignSegNet, and
  the MONAI baselines trained by the same recipe (``regseg train ascseg --arch monai_unet|
  monai_unetr``: same frames, loss, optimiser, schedule, working size 48, batch 8, wall-time
  budget; their checkpoints are read from ``--baselines`` and the training JSON says how long
  each ran). All ASC-Seg / MONAI logits are up-sampled to AlignSegNet's 128 x 128 grid and
  scored there against the true labels; HD95 is in pixels of that grid.
- Cost: parameters; FLOPs of one frame (torch.utils.flop_counter: 2 per multiply-add, matmuls
  and convolutions only; the U-Net head counted alone, AlignSegNet's registration apart);
  ms per frame, 1 thread, eager and ONNX Runtime, median of ``--repeats`` after warm-up, under
  ``flock /tmp/regseg-cpu.lock`` (taken around the timing only); ONNX parity = max |ORT - eager|
  of the logits on the held-out inputs.
- Trust (``--trust-phantoms`` > 0): bench/segmentation_trust.py.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average  # noqa: E402
from segmentation_trust import trust_rows, trust_summary  # noqa: E402

from regseg.machine import machine_name, utc_now  # noqa: E402
from regseg.models.registry import WEIGHTS_DIR, load_model  # noqa: E402
from regseg.registration_metrics import hd95_mm  # noqa: E402
from regseg.train.ascseg import dice_scores, load_net, segmenter_inputs  # noqa: E402
from regseg.train.compare import family_samples  # noqa: E402

LOCK = "/tmp/regseg-cpu.lock"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@torch.inference_mode()
def register(model, samples, batch: int = 16) -> dict[str, torch.Tensor]:
    """AlignSegNet on every frame: U-Net logits, registered MRI + labels (context), at 128."""
    out = {"logits": [], "context": []}
    for s in range(0, len(samples), batch):
        b = samples.batch(torch.arange(s, min(s + batch, len(samples))))
        o = model(b["trus"], b["mri"], b["mri_labels"])
        out["logits"].append(o["logits"])
        out["context"].append(torch.cat([o["warped_mri"], o["warped_labels"]], 1))
    return {k: torch.cat(v) for k, v in out.items()}


@torch.inference_mode()
def predict(net, x: torch.Tensor, hw: tuple[int, int], batch: int = 16) -> np.ndarray:
    """Labels (N, h, w) uint8: the net's logits up-sampled bilinearly to ``hw``, argmax."""
    out = []
    for s in range(0, len(x), batch):
        o = net(x[s:s + batch])
        logits = o["logits"] if isinstance(o, dict) else o
        logits = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
        out.append(logits.argmax(1).to(torch.uint8))
    return torch.cat(out).numpy()


def hd95_prostate(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over frames of the prostate (incl. lesion) HD95 in grid pixels (frames where either
    mask is empty are skipped)."""
    values = [hd95_mm((p >= 1).astype(np.uint8), (t >= 1).astype(np.uint8), labels=[1])[1]
              for p, t in zip(pred, truth, strict=True)]
    values = [v for v in values if np.isfinite(v)]
    return round(float(np.mean(values)), 2) if values else float("nan")


def flops_of(net, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(x)
    return counter.get_total_flops() / 1e9


@contextlib.contextmanager
def cpu_lock():
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def time_backends(name: str, net, example: torch.Tensor, repeats: int,
                  cache_dir: Path) -> tuple[dict, float | None]:
    """ms per frame per backend (median) and the ONNX parity on ``example``."""
    from regseg.engines.base import make_engine
    from regseg.engines.segmentation import LogitsOutput

    wrapped = LogitsOutput(net).eval()
    one = example[:1]
    times, parity = {}, None
    with torch.inference_mode():
        ref = wrapped(one)["logits"].clone()
    for backend in ("eager", "onnxrt"):
        try:
            engine = make_engine(wrapped, {"image": tuple(one.shape)}, backend=backend,
                                 threads=1, cache_dir=cache_dir)
        except Exception as exc:  # report, do not stop the bench
            times[backend] = f"failed: {str(exc).splitlines()[0][:120]}"
            continue
        with torch.inference_mode():
            got = engine({"image": one})["logits"]
            if backend == "onnxrt":
                parity = float((got - ref).abs().max())
                parity = max(parity, max(float((engine({"image": x[None]})["logits"]
                                                - wrapped(x[None])["logits"]).abs().max())
                                         for x in example[1:4]))
            samples = []
            with cpu_lock():
                for _ in range(repeats):
                    t = time.perf_counter()
                    engine({"image": one})
                    samples.append((time.perf_counter() - t) * 1e3)
        times[backend] = round(statistics.median(samples), 2)
    log(f"{name}: " + ", ".join(f"{k} {v} ms" if not isinstance(v, str) else f"{k} {v}"
                                for k, v in times.items())
        + (f", ONNX parity {parity:.2e}" if parity is not None else ""))
    return times, parity


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="2 phantoms x 8 frames per family, 10 timing repeats, trust on 2 "
                   "phantoms x 4 frames x 3 levels (under 10 minutes here)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--families", default="A,B")
    p.add_argument("--level", type=float, default=3.0, help="tracking error, mm and degrees")
    p.add_argument("--phantoms", type=int, default=4)
    p.add_argument("--frames", type=int, default=25, help="per phantom")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--weights", type=Path, default=WEIGHTS_DIR,
                   help="folder with ascseg.pt and ascseg_trus.pt (default: the shipped ones)")
    p.add_argument("--baselines", type=Path, default=Path("runs/ascseg"),
                   help="folder with monai_unet.pt / monai_unetr.pt (regseg train ascseg --arch)")
    p.add_argument("--trust-phantoms", type=int, default=4)
    p.add_argument("--trust-frames", type=int, default=8)
    p.add_argument("--trust-levels", default="0,3,5,10,15")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/regseg/bench-seg")
    p.add_argument("--threads", type=int, default=1)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.quick:
        args.phantoms, args.frames, args.repeats = 2, 8, 10
        args.trust_phantoms, args.trust_frames, args.trust_levels = 2, 4, "0,5,15"
    torch.set_num_threads(args.threads)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    alignsegnet = load_model("alignsegnet")
    nets = {"ascseg": load_model(args.weights / "ascseg.pt"),
            "ascseg_trus": load_model(args.weights / "ascseg_trus.pt")}
    baseline_info = {}
    for arch in ("monai_unet", "monai_unetr"):
        path = args.baselines / f"{arch}.pt"
        if path.is_file():
            nets[arch] = load_net(path)
            meta = args.baselines / f"{arch}.json"
            if meta.is_file():
                m = json.loads(meta.read_text())
                baseline_info[arch] = {k: m.get(k) for k in ("command", "steps", "wall_s",
                                                             "data_s", "batch_size")}
        else:
            log(f"{path} missing: {arch} left out (train it with regseg train ascseg --arch)")
    size = int(nets["ascseg"].config.size)
    dice: dict[str, dict] = {}
    hd95: dict[str, dict] = {}
    frames_used = {}
    held_out_inputs = None
    for family in args.families.split(","):
        cached = args.cache_dir / f"{family}-L{args.level:g}-p{args.phantoms}-f{args.frames}.pt"
        if cached.is_file():
            from regseg.train.data import SampleSet

            samples = SampleSet.load(cached)
        else:
            samples = family_samples(family, args.level, args.phantoms, args.frames, (128, 128))
            samples.save(cached)
        frames_used[family] = len(samples)
        reg = register(alignsegnet, samples)
        truth = samples.labels.numpy()
        hw = tuple(truth.shape[1:])
        preds = {"unet_head": reg["logits"].argmax(1).to(torch.uint8).numpy()}
        wl = (reg["context"][:, 1:] > 0.5).numpy()
        preds["registered_mri"] = (wl[:, 0] * 1 + wl[:, 1] * 1).astype(np.uint8)
        fused_x = segmenter_inputs(samples.trus, reg["context"], size)
        trus_x = segmenter_inputs(samples.trus, None, size)
        if held_out_inputs is None:
            held_out_inputs = {"fused": fused_x, "trus": trus_x}
        for name, net in nets.items():
            cfg = getattr(net, "config", None)
            channels = cfg.in_channels if cfg is not None else 4
            preds[name] = predict(net, fused_x if channels == 4 else trus_x, hw)
        for name, pred in preds.items():
            d = dice_scores(pred, truth)
            dice.setdefault(name, {})[family] = {"prostate": round(d["prostate_dice"], 4),
                                                 "lesion": round(d["lesion_dice"], 4)}
            hd95.setdefault(name, {})[family] = hd95_prostate(pred, truth)
        log(f"family {family} ({len(samples)} frames): " + "; ".join(
            f"{k} {v[family]['prostate']:.3f}/{v[family]['lesion']:.3f}"
            for k, v in dice.items()) + f" [{time.monotonic() - t0:.0f} s]")
    # Top-level dice: pooled over families (frame-weighted mean of the per-family means).
    total = sum(frames_used.values())
    pooled = {name: {s: round(sum(fam[f][s] * frames_used[f] for f in fam) / total, 4)
                     for s in ("prostate", "lesion")} for name, fam in dice.items()}
    cost: dict[str, dict] = {}
    ms: dict[str, float] = {}
    parity: dict[str, float | None] = {}
    timing_nets = {"unet_head": (alignsegnet.unet, torch.rand(4, 4, 128, 128)),
                   **{n: (net, held_out_inputs["fused" if getattr(getattr(net, "config", None),
                                                              "in_channels", 4) == 4
                                               else "trus"]) for n, net in nets.items()}}
    for name, (net, x) in timing_nets.items():
        net.eval()
        times, parity[name] = time_backends(name, net, x, args.repeats, args.cache_dir / "eng")
        numeric = [v for v in times.values() if not isinstance(v, str)]
        ms[name] = min(numeric) if numeric else float("nan")
        cost[name] = {"parameters": sum(q.numel() for q in net.parameters()),
                      "gflops": round(flops_of(net, x[:1]), 4), "ms_per_frame": times,
                      "input": list(x.shape[1:])}
    # The whole AlignSegNet (registration + U-Net head): what every fused model needs first.
    cost["alignsegnet_whole"] = {
        "parameters": sum(q.numel() for q in alignsegnet.parameters()),
        "gflops": round(flops_of(lambda x: alignsegnet(x[:, :1], x[:, 1:2], x[:, 2:]),
                                 torch.rand(1, 4, 128, 128)), 4)}
    trust = None
    if args.trust_phantoms > 0:
        levels = [float(v) for v in args.trust_levels.split(",")]
        rows = trust_rows(list(range(1000, 1000 + args.trust_phantoms)), args.trust_frames,
                          levels, threads=args.threads, progress=log,
                          segmenter=str(args.weights / "ascseg_trus.pt"))
        trust = {"levels_mm": levels, "phantoms": args.trust_phantoms,
                 "frames_per_level": args.trust_frames, **trust_summary(rows), "rows": rows}
    report = {
        "command": shlex.join(["python", "bench/segmentation.py", *argv]),
        "machine": machine_name(), "date": utc_now(), "load_average": load_average(),
        "frames": frames_used, "level_mm_deg": args.level, "size": size,
        "dice": pooled, "dice_by_family": dice, "hd95_px_by_family": hd95,
        "ms_per_frame": ms, "onnx_parity_max_abs": parity, "cost": cost,
        "baselines": baseline_info, "trust": trust, "wall_s": round(time.monotonic() - t0, 1),
    }
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_table(r: dict) -> None:
    fams = list(r["frames"])
    head = "| model | " + " | ".join(f"{f} prostate | {f} lesion | {f} HD95 px" for f in fams)
    print(head + " | params | GFLOPs | ms/frame (best) |")
    print("|" + "---|" * (1 + 3 * len(fams) + 3))
    for name, fam in r["dice_by_family"].items():
        c = r["cost"].get(name, {})
        cells = " | ".join(f"{fam[f]['prostate']:.3f} | {fam[f]['lesion']:.3f} | "
                           f"{r['hd95_px_by_family'][name][f]}" for f in fams)
        print(f"| {name} | {cells} | {c.get('parameters', '-')} | {c.get('gflops', '-')} | "
              f"{r['ms_per_frame'].get(name, '-')} |")
    if r["trust"]:
        t = r["trust"]
        print(f"trust ({t['frames']} frames, {t['bad_frames']} bad, {t['good_frames']} good): "
              f"AUC {t['auc']}; detection {t['detection']}; false alarms "
              f"{t['false_alarm_tre_le_2mm']}")


if __name__ == "__main__":
    sys.exit(main())
