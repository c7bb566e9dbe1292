"""Capture curve of the live registration: final TRE against the initial tracking error.

Held-out family-A phantoms (1000..), a scanner seed no training used. Per error level e (mm and
degrees alike): random poses whose tracking error is replaced by an in-plane shift of length e mm
in a random direction, a rotation of +-e degrees about the frame centre, the session's random
scale error (<= 4 %) and out-of-plane shift (<= 0.5 mm). Each frame goes through the live
registration path (FrameChain + capture, as the Pipeline runs it; ``--deformable`` adds the
PLCReg stage) for every configuration:
``K`` refinement iterations, multi-start on/off. TRE is the tissue TRE over the true prostate
(bench/registration.py ``frame_errors``: includes the simulated tissue deformation).

``--sequence N``: also N consecutive frames per phantom and level (a static tracking error, as a
calibration or MRI-to-reference error is), with the temporal filter off and on.

``python bench/capture.py [--quick] [--json PATH]``; run alone on a busy machine (``nice``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import write_json
from registration import frame_errors

LEVELS = (0.0, 2.0, 3.0, 5.0, 7.5, 10.0, 12.5, 15.0)


def with_error(pose: Any, level: float, rng: np.random.Generator) -> Any:
    """``pose`` with its in-plane tracking error set to ``level`` mm / degrees."""
    phi = rng.uniform(0, 2 * np.pi)
    return dataclasses.replace(
        pose, error_rot_deg=float(level * rng.choice([-1.0, 1.0])),
        error_shift_mm=(float(level * np.cos(phi)), float(level * np.sin(phi))))


def weights_id(name: str = "alignsegnet") -> str:
    path = Path(__file__).resolve().parents[1] / "models" / "weights" / f"{name}.pt"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"{name}.pt sha256:{digest} mtime {time.ctime(path.stat().st_mtime)}"


def configs(args: argparse.Namespace) -> list[tuple[str, int, bool, bool]]:
    """(name, K, multi_start, temporal) per configuration."""
    out = [(f"K{k}", k, False, False) for k in args.iterations]
    out += [(f"K{k}_ms", k, True, False) for k in args.multi_start_iterations]
    return out


class Registrar:
    """The live Pipeline's registration path alone (FrameChain, capture, deformable): the same
    calls as ``Pipeline._run_cpu``/``_finish`` without overlay and quality checks."""

    def __init__(self, context: Any, engine: Any, capture: Any, deformable: Any) -> None:
        from regseg.stream.pipeline import FrameChain, plane_matrices

        self.context, self.engine, self.capture, self.deformable = (context, engine, capture,
                                                                    deformable)
        self._plane_matrices = plane_matrices
        self._chains: dict[tuple[int, int], Any] = {}
        self._make = lambda hw: FrameChain(context, engine, hw, **capture.chain_options())

    def __call__(self, frame: Any) -> tuple[np.ndarray, np.ndarray | None, float, float]:
        """(registered image_to_mri, ddf or None, jump_mm, ms) of one frame."""
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
        ddf = None
        if self.deformable is not None:
            _, ddf = self.deformable(frame.pixels, registered)
        return registered, ddf, jump, (time.perf_counter() - t0) * 1e3


def pipelines(context: Any, engines: tuple[Any, Any, Any], deformable: Any,
              rows: list[tuple[str, int, bool, bool]]) -> dict[str, Registrar]:
    """``engines``: (full, theta-only, batched multi-start)."""
    from regseg.stream.capture import Capture, MultiStart, TemporalFilter

    engine, theta_engine, ms_engine = engines
    out = {}
    for name, k, ms, temporal in rows:
        cap = Capture(refine_iterations=k,
                      multi_start=MultiStart(ms_engine) if ms else None,
                      temporal=TemporalFilter() if temporal else None,
                      theta_engine=theta_engine)
        out[name] = Registrar(context, engine, cap, deformable)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from regseg.engines.fusion import FusionEngine
    from regseg.stream.capture import start_thetas
    from regseg.stream.context import build_context
    from regseg.stream.deformable import DeformableStage
    from regseg.train.data import open_simulated_scanner
    from regseg.train.plcreg_live import VAL_SEED0, true_displacement

    torch.set_num_threads(args.threads)
    engine = FusionEngine(backend=args.backend)
    ms_engine = (FusionEngine(backend=args.backend, batch=len(start_thetas()))
                 if args.multi_start_iterations else None)
    engines = (engine, FusionEngine(backend=args.backend, outputs=("theta",)), ms_engine)
    rows_cfg = configs(args)
    tre: dict[str, dict[float, list[float]]] = {n: {e: [] for e in args.levels}
                                                for n in ["tracked", *(r[0] for r in rows_cfg)]}
    ms_time: dict[str, list[float]] = {r[0]: [] for r in rows_cfg}
    seq: dict[str, dict[float, list[float]]] = {}
    jumps: dict[float, list[float]] = {e: [] for e in args.levels}
    for ps in range(VAL_SEED0, VAL_SEED0 + args.phantoms):
        phantom, scanner = open_simulated_scanner(ps, args.seed * 100_003 + ps)
        context = build_context(phantom.mri, phantom.labels)
        deformable = DeformableStage(context, backend=args.backend) if args.deformable else None
        pipes = pipelines(context, engines, deformable, rows_cfg)
        rng = np.random.default_rng([args.seed, ps, 11])
        for level in args.levels:
            for _ in range(args.frames):
                pose = with_error(scanner.path.random_pose(rng), level, rng)
                frame = scanner.render(pose, 0, noise_seed=int(rng.integers(2**62)))
                disp = true_displacement(scanner, pose).numpy()
                _, t = frame_errors(frame, disp, frame.image_to_reference, None,
                                    frame.truth.labels)
                tre["tracked"][level].append(t)
                for name, pipe in pipes.items():
                    registered, ddf, _, ms = pipe(frame)
                    _, t = frame_errors(frame, disp, registered, ddf, frame.truth.labels)
                    tre[name][level].append(t)
                    ms_time[name].append(ms)
            if args.sequence:
                sequence(args, scanner, context, engines, deformable, level, rng, seq, jumps)
        print(f"  phantom {ps}: done", flush=True)

    def med(v: list[float]) -> float:
        a = np.asarray(v, float)
        a = a[np.isfinite(a)]
        return float(np.median(a)) if a.size else math.nan

    def p90(v: list[float]) -> float:
        a = np.asarray(v, float)
        a = a[np.isfinite(a)]
        return float(np.percentile(a, 90)) if a.size else math.nan

    curve = [{"name": n, "level": e, "tre_median_mm": round(med(v), 3),
              "tre_p90_mm": round(p90(v), 3), "n": len(v),
              "ms_p50": round(med(ms_time[n]), 2) if n in ms_time else None}
             for n, per in tre.items() for e, v in per.items()]
    seq_rows = [{"name": n, "level": e, "tre_median_mm": round(med(v), 3),
                 "tre_p90_mm": round(p90(v), 3), "n": len(v)}
                for n, per in seq.items() for e, v in per.items()]
    jump_rows = [{"level": e, "jump_mm_median": round(med(v), 3), "jump_mm_p90": round(p90(v), 3)}
                 for e, v in jumps.items() if v]
    return {"curve": curve, "sequence": seq_rows, "jumps": jump_rows}


def sequence(args: argparse.Namespace, scanner: Any, context: Any, engines: Any, deformable: Any,
             level: float, rng: np.random.Generator, seq: dict, jumps: dict) -> None:
    """``args.sequence`` consecutive frames with a static error of ``level``; filter off/on."""
    from regseg.train.plcreg_live import true_displacement

    k = args.sequence_k
    rows = [(f"seq_K{k}", k, False, False), (f"seq_K{k}_temporal", k, False, True)]
    pipes = pipelines(context, engines, deformable, rows)
    start = int(rng.integers(0, 2 * scanner.config.sweep_frames))
    err_rng = np.random.default_rng(int(rng.integers(2**32)))
    base = with_error(scanner.path.pose(start), level, err_rng)
    for i in range(start, start + args.sequence):
        pose = dataclasses.replace(scanner.path.pose(i), error_rot_deg=base.error_rot_deg,
                                   error_shift_mm=base.error_shift_mm)
        frame = scanner.render(pose, i, noise_seed=i)
        disp = true_displacement(scanner, pose).numpy()
        for name, pipe in pipes.items():
            registered, ddf, jump, _ = pipe(frame)
            _, t = frame_errors(frame, disp, registered, ddf, frame.truth.labels)
            seq.setdefault(name, {}).setdefault(level, []).append(t)
            if name.endswith("temporal") and math.isfinite(jump):
                jumps[level].append(jump)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 phantoms x 3 frames per level")
    p.add_argument("--phantoms", type=int, default=None, help="held-out phantoms (default 4)")
    p.add_argument("--frames", type=int, default=None, help="frames per phantom and level (6)")
    p.add_argument("--levels", type=float, nargs="+", default=list(LEVELS))
    p.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--multi-start-iterations", type=int, nargs="*", default=[1, 2])
    p.add_argument("--sequence", type=int, default=0, help="consecutive frames per level")
    p.add_argument("--sequence-k", type=int, default=2, help="K for the sequence runs")
    p.add_argument("--deformable", action="store_true", help="with the live PLCReg stage")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=78)
    p.add_argument("--json", default="out/bench_capture.json")
    args = p.parse_args(argv)
    args.phantoms = args.phantoms or (2 if args.quick else 4)
    args.frames = args.frames or (3 if args.quick else 6)
    out = run(args)
    print(f"{'config':<22}" + "".join(f"{e:>8g}" for e in args.levels) + "   (median TRE mm)")
    for block in ("curve", "sequence"):
        names = dict.fromkeys(r["name"] for r in out[block])
        for n in names:
            vals = {r["level"]: r["tre_median_mm"] for r in out[block] if r["name"] == n}
            print(f"{n:<22}" + "".join(f"{vals.get(e, math.nan):>8.2f}" for e in args.levels))
    for r in out["jumps"]:
        print(f"jump_mm at level {r['level']:g}: median {r['jump_mm_median']}, p90 "
              f"{r['jump_mm_p90']}")
    write_json(args.json, "capture", out["curve"] + out["sequence"], argv,
               jumps=out["jumps"], weights=weights_id(), phantoms=args.phantoms,
               frames=args.frames, deformable=args.deformable)


if __name__ == "__main__":
    main()
