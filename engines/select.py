"""``auto``: the fastest backend that builds here and matches eager within tolerance.

First-that-works is not enough (a backend can build and be slower, or be fast and wrong), so
every candidate is built, checked against eager on seeded inputs (:data:`TOLERANCES`), and timed;
the fastest that passes wins. The pattern is NVIDIA AITune's ``MinLatencyStrategy`` and the
parity gate of notes/engines.md §0.1, §7. Every candidate's outcome, including why one failed,
is printed once and kept in ``engine.info["selection"]``: nothing is dropped silently.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from regseg.engines.base import (
    TOLERANCES,
    Engine,
    build_backend,
    example_inputs,
    parity_error,
)
from regseg.errors import EngineError

#: Candidates per device type, in the order they are tried. ``compiled`` is left out on CPU:
#: Inductor took 26 s to compile AlignSegNet on 2 cores, and then ran 7.4 ms per call against
#: onnxrt's 4.1 ms (bench/engines.py, README "Engines and benchmarks"); ask for it by name.
AUTO_CANDIDATES = {"cpu": ("eager", "onnxrt"), "cuda": ("eager", "compiled", "tensorrt")}


def time_engine(engine: Engine, inputs: dict[str, torch.Tensor], repeats: int) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls (synchronised on CUDA), in call order."""
    sync = (lambda: torch.cuda.synchronize(engine.device)) if engine.device.type == "cuda" \
        else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        engine(inputs)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def select_engine(model: nn.Module, input_shapes: dict[str, tuple[int, ...]], *,
                  device: torch.device, precision: str = "fp32",
                  outputs: Sequence[str] | None = None, cache_dir: str | Path | None = None,
                  threads: int | None = None, warmup: int = 3,
                  candidates: Sequence[str] | None = None, repeats: int = 20,
                  report: TextIO | None = sys.stderr) -> Engine:
    """Build each candidate, keep the fastest that matches eager; see the module docstring.

    Args:
        candidates: backends to try (default :data:`AUTO_CANDIDATES` for the device type).
        repeats: timed calls per candidate (median kept).
        report: where the one-line choice is printed (None: nowhere; it is in ``info`` anyway).
        Others: as :func:`regseg.engines.base.make_engine`.
    Raises:
        EngineError: no candidate built and matched (the message lists each one's reason).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device}: CUDA is not available here; use device='cpu'")
    candidates = tuple(candidates or AUTO_CANDIDATES.get(device.type, ("eager",)))
    model = model.eval().to(device)
    kwargs: dict[str, Any] = dict(device=device, precision=precision, outputs=outputs,
                                  cache_dir=cache_dir, threads=threads, warmup=warmup)
    probe = example_inputs(input_shapes, device, seed=1)  # not the warm-up inputs
    # The reference is eager fp32 whatever is asked: reduced precision is judged against it.
    reference_engine = build_backend("eager", model, input_shapes,
                                     **{**kwargs, "precision": "fp32"})
    reference = {k: v.clone() for k, v in reference_engine(probe).items()}
    tolerance = TOLERANCES[precision]
    outcome: dict[str, dict[str, Any]] = {}
    engines: dict[str, Engine] = {}
    for name in candidates:
        try:
            engine = (reference_engine if name == "eager" and precision == "fp32"
                      else build_backend(name, model, input_shapes, **kwargs))
        except EngineError as exc:
            outcome[name] = {"status": "failed", "reason": str(exc)}
            continue
        error = parity_error(reference, engine(probe))
        worst = max(error.values())
        if worst > tolerance:
            outcome[name] = {"status": "mismatch", "max_rel_error": worst,
                             "tolerance": tolerance, "per_output": error}
            continue
        outcome[name] = {"status": "ok", "max_rel_error": worst}
        engines[name] = engine
    # Timed in rounds, one call of each candidate per round: a burst of load from another
    # process (the OpenIGTLink threads, a sender on the same cores) hits every candidate alike
    # instead of deciding the choice.
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            samples[name] += time_engine(engine, probe, 1)
    for name, times in samples.items():
        outcome[name]["p50_ms"] = round(statistics.median(times), 3)
    if not engines:
        reasons = "; ".join(f"{k}: {v.get('reason') or v['status']}" for k, v in outcome.items())
        raise EngineError(f"auto: no backend built and matched eager on {device} at {precision} "
                          f"({reasons})")
    chosen = min(engines, key=lambda k: outcome[k]["p50_ms"])
    engine = engines[chosen]
    engine.info["selection"] = {"chosen": chosen, "tolerance": tolerance, "candidates": outcome}
    if report is not None:
        parts = [f"{k} {v['p50_ms']:.2f} ms" if v["status"] == "ok" else f"{k} {v['status']}"
                 for k, v in outcome.items()]
        print(f"engine auto for {type(model).__name__} on {device} ({precision}): chose {chosen} "
              f"[{', '.join(parts)}]", file=report)
    return engine
