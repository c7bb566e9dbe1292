"""The ONNX Runtime backend: the fast CPU path, exported once and cached, run through IOBinding.

Threads are set explicitly and spinning is off: on a 2-core machine ORT's default spin-waiting
threads starve the torch work that follows each call (~50x slowdowns reported:
https://github.com/microsoft/onnxruntime/issues/13808; notes/engines.md §5). Inputs and outputs
are bound once to preallocated torch buffers, so a call allocates nothing on our side.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from regseg.engines.base import check_inputs, example_inputs, output_names_of
from regseg.engines.cache import ArtifactCache, cache_key, code_hash, weights_hash
from regseg.errors import EngineError

#: opset 20 has AffineGrid and GridSample with the torch semantics the models use
#: (align_corners=False, zeros padding); ORT >= 1.17 implements both on CPU.
OPSET = 20
#: What our export writes beyond torch's exporter, in the cache key so a change re-exports:
#: 3 = bilinear border padding exported as clamped points + zeros (regseg.spatial.grid_sample);
#: 4 = that clamp written as Clip with scalar bounds (regseg.spatial.clamp_to_centres).
EXPORT_REVISION = 4


class _TupleOutputs(nn.Module):
    """Positional inputs, tuple outputs in a fixed order: what the ONNX exporter wants."""

    def __init__(self, model: nn.Module, input_names: Sequence[str],
                 output_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        out = self.model(**dict(zip(self.input_names, args, strict=True)))
        return tuple(out[k] for k in self.output_names)


def export_onnx(model: nn.Module, inputs: dict[str, Tensor], output_names: Sequence[str],
                path: Path) -> None:
    """Write ``model`` at the fixed shapes of ``inputs`` as an ONNX file (opset :data:`OPSET`).

    Uses torch's TorchScript-based exporter (``dynamo=False``): it needs no onnxscript, takes
    under a second for these models, and handles AffineGrid/GridSample at opset 20. The exporter
    is recorded in the cache key through torch's version.
    """
    wrapper = _TupleOutputs(model, list(inputs), output_names).eval()
    with warnings.catch_warnings(), torch.no_grad():
        # The deprecation notice of the TorchScript exporter and tracer warnings about shape
        # checks (constant at fixed shapes, which is what we want) are expected here.
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(inputs.values()), str(path), dynamo=False,
                          input_names=list(inputs), output_names=list(output_names),
                          opset_version=OPSET, do_constant_folding=True)


class OnnxRuntimeEngine:
    """ONNX Runtime on the CPU (``CPUExecutionProvider``), fp32.

    Args: see :func:`regseg.engines.base.make_engine`. ``threads`` sets ORT's intra-op pool
    (default: ``torch.get_num_threads()``); the inter-op pool is 1 (the graph runs sequentially).
    Outputs are the same preallocated tensors on every call (copy to keep one).
    ``input_buffers`` are the bound inputs: a caller that writes its inputs there saves a copy.
    """

    backend = "onnxrt"

    def __init__(self, model: nn.Module, input_shapes: dict[str, tuple[int, ...]], *,
                 device: torch.device, precision: str = "fp32",
                 outputs: Sequence[str] | None = None, cache_dir: str | Path | None = None,
                 threads: int | None = None, warmup: int = 3) -> None:
        start = time.perf_counter()
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineError("backend onnxrt needs onnxruntime and onnx: "
                              "pip install 'regseg[onnx]'") from exc
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise EngineError(f"backend onnxrt is the CPU path; on {self.device} use 'compiled' "
                              "or 'tensorrt'")
        if precision != "fp32":
            raise EngineError(f"backend onnxrt runs fp32 only (ORT's CPU kernels have no fast "
                              f"{precision}); use precision='fp32'")
        self.precision = precision
        self.input_shapes = {k: tuple(v) for k, v in input_shapes.items()}
        model = model.eval().to(self.device)
        example = example_inputs(self.input_shapes, self.device)
        self.output_names = output_names_of(model, example, outputs)
        with torch.inference_mode():
            reference = model(**example)
        output_shapes = {k: tuple(reference[k].shape) for k in self.output_names}

        cache = ArtifactCache(cache_dir)
        key, fields = cache_key(weights_hash(model), self.input_shapes, precision=precision,
                                backend=self.backend, device=self.device,
                                extra={"opset": OPSET, "outputs": list(self.output_names),
                                       "export": EXPORT_REVISION},
                                code=code_hash(model))
        path, hit = cache.fetch(self.backend, key, fields, "model.onnx",
                                lambda p: export_onnx(model, example, self.output_names, p))

        self.threads = int(threads or torch.get_num_threads())
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise EngineError(f"onnxrt: cannot load {path} ({type(exc).__name__}: {exc}); "
                              "delete that cache folder to rebuild it") from exc

        # Bind once: ORT reads and writes these torch buffers in place on every run.
        self.input_buffers = {k: torch.empty(s, dtype=torch.float32)
                              for k, s in self.input_shapes.items()}
        self._outputs = {k: torch.empty(s, dtype=torch.float32) for k, s in output_shapes.items()}
        self._binding = self.session.io_binding()
        for name, buf in self.input_buffers.items():
            self._binding.bind_input(name, "cpu", 0, "float32", tuple(buf.shape), buf.data_ptr())
        for name, buf in self._outputs.items():
            self._binding.bind_output(name, "cpu", 0, "float32", tuple(buf.shape), buf.data_ptr())
        for _ in range(warmup):
            self(example)
        self.info: dict[str, Any] = {
            "backend": self.backend, "precision": precision, "device": str(self.device),
            "threads": self.threads, "artifact": str(path), "cache": cache.last,
            "build_s": round(time.perf_counter() - start, 3), "onnxruntime": ort.__version__,
        }

    def __call__(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        check_inputs(self.input_shapes, inputs)
        for name, buf in self.input_buffers.items():
            src = inputs[name]
            if src is not buf:
                buf.copy_(src)
        self.session.run_with_iobinding(self._binding)
        return dict(self._outputs)
