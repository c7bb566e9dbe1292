"""The TensorRT backend (torch-tensorrt, ahead of time), an optional extra imported lazily.

Built with the dynamo frontend at static shapes and saved as an ExportedProgram under our cache
key (notes/engines.md §1.1-1.2, §1.10: plans are tied to the GPU model and TensorRT version,
both in the key). Precision: torch-tensorrt >= 2.10 types the graph strongly and takes reduced
precision through its autocast options (normalisations stay fp32); older versions take
``enabled_precisions`` (§1.3). fp32 builds disable TF32 so they match eager to fp32 tolerance.
Not measured in this repository's CI (no GPU there): see README "Engines and benchmarks".
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from regseg.engines.base import DTYPES, check_inputs, example_inputs, output_names_of
from regseg.engines.cache import ArtifactCache, cache_key, code_hash, weights_hash
from regseg.engines.onnxrt import _TupleOutputs
from regseg.errors import EngineError


def _precision_options(compile_fn: Any, precision: str) -> dict[str, Any]:
    """torch-tensorrt compile options for ``precision`` on the installed version."""
    params = inspect.signature(compile_fn).parameters
    if precision == "fp32":
        return {"disable_tf32": True} if "disable_tf32" in params else {}
    dtype = DTYPES[precision]
    if "enable_autocast" in params:  # >= 2.10: strong typing, autocast for reduced precision
        return {"enable_autocast": True, "autocast_low_precision_type": dtype}
    return {"enabled_precisions": {torch.float32, dtype}}


class TensorRTEngine:
    """torch-tensorrt AOT engine on one CUDA device, cached on disk.

    Call it on a non-default CUDA stream: the runtime then enqueues on that stream instead of an
    internal one synchronised with events (notes/engines.md §1.9). Not thread safe (one
    execution context).

    Args: see :func:`regseg.engines.base.make_engine`; ``threads`` is unused.
    Raises:
        EngineError: torch-tensorrt missing, a CPU device, or a failed build (with the reason).
    """

    backend = "tensorrt"

    def __init__(self, model: nn.Module, input_shapes: dict[str, tuple[int, ...]], *,
                 device: torch.device, precision: str = "fp32",
                 outputs: Sequence[str] | None = None, cache_dir: str | Path | None = None,
                 threads: int | None = None, warmup: int = 3) -> None:
        start = time.perf_counter()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise EngineError(f"backend tensorrt needs a CUDA device, got {self.device}; on CPU "
                              "use 'onnxrt' or 'eager'")
        try:
            import torch_tensorrt
        except ImportError as exc:
            raise EngineError("backend tensorrt needs torch-tensorrt: pip install "
                              "'regseg[trt]' (a build matching your torch and CUDA)") from exc
        self.precision = precision
        self.input_shapes = {k: tuple(v) for k, v in input_shapes.items()}
        model = model.eval().to(self.device)
        example = example_inputs(self.input_shapes, self.device)
        self.output_names = output_names_of(model, example, outputs)
        wrapper = _TupleOutputs(model, list(self.input_shapes), self.output_names).eval()
        args = list(example.values())
        options = _precision_options(torch_tensorrt.dynamo.compile, precision)

        def build(path: Path) -> None:
            try:
                module = torch_tensorrt.compile(wrapper, ir="dynamo", arg_inputs=args,
                                                **options)
                torch_tensorrt.save(module, str(path), output_format="exported_program",
                                    arg_inputs=args)
            except Exception as exc:  # converter and builder failures come in many types
                raise EngineError(f"backend tensorrt: build failed for {type(model).__name__} "
                                  f"({type(exc).__name__}: {exc})") from exc

        cache = ArtifactCache(cache_dir)
        key, fields = cache_key(weights_hash(model), self.input_shapes, precision=precision,
                                backend=self.backend, device=self.device,
                                extra={"outputs": list(self.output_names),
                                       "options": sorted(options)},
                                code=code_hash(model))
        path, hit = cache.fetch(self.backend, key, fields, "engine.ep", build)
        self._module = torch_tensorrt.load(str(path)).module()
        for _ in range(warmup):
            self(example)
        torch.cuda.synchronize(self.device)
        self.info: dict[str, Any] = {
            "backend": self.backend, "precision": precision, "device": str(self.device),
            "artifact": str(path), "cache": cache.last,
            "torch_tensorrt": torch_tensorrt.__version__,
            "build_s": round(time.perf_counter() - start, 3),
        }

    def __call__(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        check_inputs(self.input_shapes, inputs)
        with torch.inference_mode():
            out = self._module(*(inputs[k] for k in self.input_shapes))
        return {k: v.float() for k, v in zip(self.output_names, out, strict=True)}
