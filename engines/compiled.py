"""The compiled backend: torch.compile (Inductor) at fixed shapes; CUDA graphs on the GPU.

Inductor keeps its own on-disk cache of compiled kernels (FX graph cache), keyed by the graph,
the inputs' shapes and dtypes, torch's version and the device, so a second process with the same
model compiles much faster; we do not duplicate it under our cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from regseg.engines.base import check_inputs, prepare_model
from regseg.engines.eager import check_torch_precision, run_module
from regseg.errors import EngineError


class CompiledEngine:
    """``torch.compile(model, fullgraph=True, dynamic=False)``, warmed up (compiled) at load.

    On CUDA the mode is ``reduce-overhead``: Inductor records the whole forward as a CUDA graph and
    replays it, which removes the per-kernel launch cost that dominates at batch 1 (notes/engines.md
    §1.6, §3.2). Outputs then live in the graph's memory pool and are overwritten by the next call:
    copy what you keep. On CPU the default mode (no graphs).

    Args: see :func:`regseg.engines.base.make_engine`; ``cache_dir`` and ``threads`` are unused.
    Raises:
        EngineError: the model does not compile as one graph (the message has Dynamo's reason),
            or no C++ compiler is available for Inductor's CPU code.
    """

    backend = "compiled"

    def __init__(self, model: nn.Module, input_shapes: dict[str, tuple[int, ...]], *,
                 device: torch.device, precision: str = "fp32",
                 outputs: Sequence[str] | None = None, cache_dir: Any = None,
                 threads: int | None = None, warmup: int = 3) -> None:
        start = time.perf_counter()
        self.device = torch.device(device)
        self.precision = check_torch_precision(self.backend, self.device, precision)
        self.input_shapes = {k: tuple(v) for k, v in input_shapes.items()}
        self.model, example, self.output_names = prepare_model(model, self.input_shapes,
                                                               self.device, outputs)
        self.cuda_graphs = self.device.type == "cuda"
        mode = "reduce-overhead" if self.cuda_graphs else None
        self._compiled = torch.compile(self.model, fullgraph=True, dynamic=False, mode=mode)
        # Dynamo guards on each input's strides and on whether it is an inference tensor: live
        # inputs (views made inside inference mode) failed the guards of the warm-up example and
        # recompiled on the first frame (seconds). Every call therefore copies its inputs into
        # these buffers, made once, so warm-up and live calls present the very same tensors.
        with torch.inference_mode():
            self._inputs = {k: v.clone().contiguous() for k, v in example.items()}
        try:
            for _ in range(max(warmup, 3 if self.cuda_graphs else 1)):  # graphs record on call 3
                self(example)
        except Exception as exc:  # Dynamo/Inductor raise many types; the message is what matters
            raise EngineError(f"backend compiled: torch.compile failed for "
                              f"{type(model).__name__} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
        self.info: dict[str, Any] = {
            "backend": self.backend, "precision": precision, "device": str(self.device),
            "mode": mode or "default", "cuda_graphs": self.cuda_graphs, "cache": "inductor",
            "build_s": round(time.perf_counter() - start, 3),
        }

    def __call__(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.cuda_graphs:
            # Tells cudagraph trees that the previous call's outputs are no longer read, so the
            # next replay may reuse their memory.
            torch.compiler.cudagraph_mark_step_begin()
        check_inputs(self.input_shapes, inputs)
        with torch.inference_mode():
            for name, buffer in self._inputs.items():
                buffer.copy_(inputs[name])
        return run_module(self._compiled, self, self._inputs)
