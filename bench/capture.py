"""Capture curve of the live registration: final TRE against the initial tracking error.

Both simulator families, on cases no training used: family A (``regseg.sim``) phantoms 1000..,
family B (``regseg.sim.family_b``, never trained on) cases 5000... Per error level L (mm and
degrees alike) the tracked pose carries an in-plane rigid error of exactly L mm (random direction)
and L degrees (random sign), plus family A's random scale (<= 4 %) and out-of-plane (<= 0.5 mm)
error, or family B's own 0.5 mm / 0.5 deg out of plane.

- Independent frames (random poses): every configuration of the chain's capture, K refinement
  iterations (``--iterations``) and multi-start on (``--multi-start-iterations``).
- ``--sequence N``: N consecutive frames per case and level (the error fixed in plane for the
  stretch, as a calibration or MRI-to-reference error is), with the temporal filter off and on.

TRE: mean distance (mm) between the registered and the true plane over the true prostate pixels,
as ``regseg.stream.runner.frame_accuracy`` (so the same as bench/accuracy.py). Each frame runs the
live registration path (FrameChain with the capture, as the Pipeline runs it; the deformable
stage does not change this TRE). Rendered frames are cached (``--cache``), so a rerun on new
weights skips the simulators.

``python bench/capture.py [--quick] [--family a b] [--json PATH]``; run alone on a busy machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import write_json

LEVELS = (0.0, 3.0, 5.0, 7.5, 10.0, 12.5, 15.0)
FIRST_SEED = {"a": 1000, "b": 5000}
TRE_POINTS = 2000


# ------------------------------------------------------------------------------ frames
def with_error(pose: Any, level: float, rng: np.random.Generator) -> Any:
    """Family-A ``pose`` with its in-plane tracking error set to ``level`` mm / degrees."""
    phi = rng.uniform(0, 2 * np.pi)
    return dataclasses.replace(
        pose, error_rot_deg=float(level * rng.choice([-1.0, 1.0])),
        error_shift_mm=(float(level * np.cos(phi)), float(level * np.sin(phi))))


def render_a(seed: int, level: float, n: int, sequence: bool) -> tuple[Any, Any, list]:
    from regseg.train.data import open_simulated_scanner

    phantom, scanner = open_simulated_scanner(seed, 78 * 100_003 + seed)
    rng = np.random.default_rng([seed, int(level * 10), int(sequence), 0xA])
    frames = []
    if sequence:
        start = int(rng.integers(0, 2 * scanner.config.sweep_frames))
        base = with_error(scanner.path.pose(start), level, rng)
        for i in range(start, start + n):
            pose = dataclasses.replace(scanner.path.pose(i), error_rot_deg=base.error_rot_deg,
                                       error_shift_mm=base.error_shift_mm)
            frames.append(scanner.render(pose, i, noise_seed=i))
    else:
        for _ in range(n):
            pose = with_error(scanner.path.random_pose(rng), level, rng)
            frames.append(scanner.render(pose, 0, noise_seed=int(rng.integers(2**62))))
    return phantom.mri, phantom.labels, frames


def render_b(seed: int, level: float, n: int, sequence: bool) -> tuple[Any, Any, list]:
    from regseg.sim.family_b.anatomy import make_case
    from regseg.sim.family_b.session import Session, SessionConfig

    case = make_case(seed)
    session = Session(case, SessionConfig(tracking_shift_mm=level, tracking_rot_deg=level),
                      seed=seed * 7 + 3)
    rng = np.random.default_rng([seed, int(level * 10), int(sequence), 0xB])
    if sequence:
        start = int(rng.integers(0, 600))
        indices = range(start, start + n)
    else:
        indices = [int(i) for i in rng.integers(0, 1200, n)]
    return case.mri, case.labels, [session.frame(i) for i in indices]


def frames_of(family: str, seed: int, level: float, n: int, sequence: bool,
              cache: Path | None) -> tuple[Any, Any, list]:
    """(mri, labels, frames), from ``cache`` when rendered before."""
    key = f"{family}-{seed}-{level:g}-{n}-{int(sequence)}"
    path = cache / f"frames-{key}.pkl" if cache else None
    if path is not None and path.is_file():
        return pickle.loads(path.read_bytes())
    out = (render_a if family == "a" else render_b)(seed, level, n, sequence)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(out))
    return out


# ------------------------------------------------------------------------------ registration
class Registrar:
    """The live Pipeline's registration path alone (FrameChain + capture): the same calls as
    ``Pipeline._run_cpu``/``_finish`` without segmentation output, overlay and quality."""

    def __init__(self, context: Any, engine: Any, capture: Any) -> None:
        from regseg.stream.pipeline import FrameChain, plane_matrices

        self.context, self.engine, self.capture = context, engine, capture
        self._plane_matrices = plane_matrices
        self._chains: dict[tuple[int, int], Any] = {}
        self._make = lambda hw: FrameChain(context, engine, hw, **capture.chain_options())

    def __call__(self, frame: Any) -> tuple[np.ndarray, float, float]:
        """(registered image_to_mri, jump_mm, ms) of one frame."""
        from regseg import spatial

        t0 = time.perf_counter()
        hw = frame.pixels.shape
        if hw not in self._chains:
            self._chains[hw] = self._make(hw)
        chain = self._chains[hw]
        tracked = frame.image_to_reference
        start = tracked @ spatial.lift_2d(self.capture.start(frame, tracked))
        mats = torch.from_numpy(self._plane_matrices(self.context, start, hw, self.engine.size))
        with torch.inference_mode():
            theta, _ = chain.model(*chain.prepare(torch.from_numpy(frame.pixels), mats), mats)
            theta_px = spatial.theta_to_pixel(theta.double().numpy().reshape(2, 3), hw)
        registered, jump = self.capture.finish(frame, tracked, start @ spatial.lift_2d(theta_px))
        return registered, jump, (time.perf_counter() - t0) * 1e3


def tre(frame: Any, image_to_mri: np.ndarray) -> float:
    """As regseg.stream.runner.frame_accuracy: mean mm over the true prostate pixels."""
    from regseg import metrics

    ji = np.argwhere(frame.truth.labels > 0)
    if len(ji) == 0:
        return math.nan
    ji = ji[np.linspace(0, len(ji) - 1, min(TRE_POINTS, len(ji))).astype(int)]
    return metrics.tre_mm(image_to_mri, frame.truth.image_to_mri, ji[:, ::-1].astype(float))


def make_capture(engines: tuple[Any, Any, Any], k: int, ms: bool, temporal: str) -> Any:
    """``temporal``: "off", "on" (filter) or "warm" (filter and warm start)."""
    from regseg.stream.capture import Capture, MultiStart, TemporalFilter

    _, theta_engine, ms_engine = engines
    return Capture(refine_iterations=k, multi_start=MultiStart(ms_engine) if ms else None,
                   temporal=TemporalFilter() if temporal != "off" else None,
                   theta_engine=theta_engine, warm_start=temporal == "warm")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from regseg.engines.fusion import FusionEngine
    from regseg.stream.capture import start_thetas
    from regseg.stream.context import build_context

    torch.set_num_threads(args.threads)
    engine = FusionEngine(args.weights, backend=args.backend)
    theta_engine = FusionEngine(args.weights, backend=args.backend, outputs=("theta",))
    ms_engine = (FusionEngine(args.weights, backend=args.backend, batch=len(start_thetas()))
                 if args.multi_start_iterations else None)
    engines = (engine, theta_engine, ms_engine)
    configs = [(f"K{k}", k, False) for k in args.iterations]
    configs += [(f"K{k}_ms", k, True) for k in args.multi_start_iterations]
    seq_configs = [(f"seq_K{args.sequence_k}{suffix}", mode)
                   for suffix, mode in (("", "off"), ("_filter", "on"), ("_warm", "warm"))]
    cache = Path(args.cache) if args.cache else None
    rows: dict[tuple[str, str, float], dict[str, list[float]]] = {}

    def add(family: str, name: str, level: float, t: float, ms: float = math.nan,
            jump: float = math.nan) -> None:
        r = rows.setdefault((family, name, level), {"tre": [], "ms": [], "jump": []})
        r["tre"].append(t)
        r["ms"].append(ms)
        r["jump"].append(jump)

    for family in args.family:
        for seed in range(FIRST_SEED[family], FIRST_SEED[family] + args.phantoms):
            for level in args.levels:
                mri, labels, frames = frames_of(family, seed, level, args.frames, False, cache)
                context = build_context(mri, labels)
                regs = {n: Registrar(context, engine, make_capture(engines, k, ms, "off"))
                        for n, k, ms in configs}
                for frame in frames:
                    add(family, "tracked", level, tre(frame, frame.image_to_reference))
                    for name, reg in regs.items():
                        registered, _, ms = reg(frame)
                        add(family, name, level, tre(frame, registered), ms)
                if args.sequence and level in args.sequence_levels:
                    mri, labels, frames = frames_of(family, seed, level, args.sequence, True,
                                                    cache)
                    context = build_context(mri, labels)
                    for name, temporal in seq_configs:
                        reg = Registrar(context, engine, make_capture(
                            engines, args.sequence_k, False, temporal))
                        for i, frame in enumerate(frames):
                            # frames 33 ms apart, as a 30 fps stream
                            frame = dataclasses.replace(frame, acquired_ns=int(i * 33.3e6))
                            registered, jump, ms = reg(frame)
                            add(family, name, level, tre(frame, registered), ms, jump)
                print(f"  family {family} case {seed} level {level:g}: done", flush=True)

    def stat(v: list[float], q: float) -> float:
        a = np.asarray(v, float)
        a = a[np.isfinite(a)]
        return round(float(np.percentile(a, q)), 3) if a.size else math.nan

    return [{"family": f, "name": n, "level": lv, "tre_median_mm": stat(r["tre"], 50),
             "tre_p90_mm": stat(r["tre"], 90), "n": len(r["tre"]),
             "ms_p50": stat(r["ms"], 50), "ms_p10": stat(r["ms"], 10),
             "jump_mm_median": stat(r["jump"], 50), "jump_mm_p90": stat(r["jump"], 90)}
            for (f, n, lv), r in rows.items()]


def timing(args: argparse.Namespace) -> list[dict[str, Any]]:
    """ms per frame of each configuration: ``--timing N`` interleaved runs on one frame.

    The minimum is the least disturbed run (a shared machine); p50 is what a busy one gives.
    """
    from regseg.engines.fusion import FusionEngine
    from regseg.stream.capture import start_thetas
    from regseg.stream.context import build_context

    torch.set_num_threads(args.threads)
    engines = (FusionEngine(args.weights, backend=args.backend),
               FusionEngine(args.weights, backend=args.backend, outputs=("theta",)),
               FusionEngine(args.weights, backend=args.backend, batch=len(start_thetas())))
    mri, labels, frames = frames_of("a", FIRST_SEED["a"], 10.0, 1, False,
                                    Path(args.cache) if args.cache else None)
    context = build_context(mri, labels)
    configs = [(f"K{k}", k, False) for k in args.iterations]
    configs += [(f"K{k}_ms", k, True) for k in args.multi_start_iterations]
    regs = {n: Registrar(context, engines[0], make_capture(engines, k, ms, "off"))
            for n, k, ms in configs}
    times: dict[str, list[float]] = {n: [] for n in regs}
    for _ in range(args.timing):
        for name, reg in regs.items():
            times[name].append(reg(frames[0])[2])
    return [{"family": "a", "name": n, "timing_runs": len(t), "ms_min": round(min(t), 2),
             "ms_p50": round(float(np.median(t)), 2)} for n, t in times.items()]


def weights_id(weights: str | None = None) -> str:
    path = (Path(weights) if weights else
            Path(__file__).resolve().parents[1] / "models" / "weights" / "alignsegnet.pt")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"{path.name} sha256:{digest} mtime {time.ctime(path.stat().st_mtime)}"


def print_curves(rows: list[dict[str, Any]], levels: list[float]) -> None:
    print(f"{'family/config':<26}" + "".join(f"{e:>7g}" for e in levels)
          + "   median TRE mm per initial error (mm/deg); ms p50")
    for key in dict.fromkeys((r["family"], r["name"]) for r in rows):
        sel = {r["level"]: r for r in rows if (r["family"], r["name"]) == key}
        ms = [r["ms_p50"] for r in sel.values() if math.isfinite(r["ms_p50"])]
        ms = float(np.median(ms)) if ms else math.nan
        print(f"{key[0] + ' ' + key[1]:<26}"
              + "".join(f"{sel[e]['tre_median_mm'] if e in sel else math.nan:>7.2f}"
                        for e in levels) + f"   {ms:.1f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 cases per family, 3 frames per level")
    p.add_argument("--family", nargs="+", choices=["a", "b"], default=["a", "b"])
    p.add_argument("--phantoms", type=int, default=None, help="cases per family (default 4)")
    p.add_argument("--frames", type=int, default=None, help="frames per case and level (5)")
    p.add_argument("--levels", type=float, nargs="+", default=list(LEVELS))
    p.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--multi-start-iterations", type=int, nargs="*", default=[1, 2])
    p.add_argument("--sequence", type=int, default=0, help="consecutive frames per level")
    p.add_argument("--sequence-k", type=int, default=2, help="K for the sequence runs")
    p.add_argument("--sequence-levels", type=float, nargs="+", default=[3.0, 10.0])
    p.add_argument("--timing", type=int, default=0, metavar="N",
                   help="only time each configuration, N interleaved runs on one frame")
    p.add_argument("--weights", default=None, help="AlignSegNet checkpoint (default: shipped)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="out/capture_frames", help="rendered frames ('' = none)")
    p.add_argument("--json", default="out/bench_capture.json")
    args = p.parse_args(argv)
    args.phantoms = args.phantoms or (2 if args.quick else 4)
    args.frames = args.frames or (3 if args.quick else 5)
    if args.timing:
        rows = timing(args)
        for r in rows:
            print(f"{r['name']:<10} ms min {r['ms_min']:>7.2f}  p50 {r['ms_p50']:>7.2f}")
        write_json(args.json, "capture", rows, argv, weights=weights_id(args.weights))
        return
    rows = run(args)
    print_curves(rows, args.levels)
    write_json(args.json, "capture", rows, argv, weights=weights_id(args.weights),
               phantoms=args.phantoms, frames=args.frames, sequence=args.sequence)


if __name__ == "__main__":
    main()
