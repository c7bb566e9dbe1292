"""The Engine protocol and ``make_engine``, the one entry every domain engine builds through.

An engine is a model made ready to run fast on one device with fixed input shapes: named float32
tensors in, named float32 tensors out, the same names and dtypes for every backend, warmed up at
load. Backends are one flat class each (eager.py, compiled.py, onnxrt.py, tensorrt.py), imported
only when asked for, so an optional library that is missing costs nothing until it is named.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from regseg.errors import EngineError

log = logging.getLogger(__name__)

BACKENDS = ("eager", "compiled", "onnxrt", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: Largest allowed |backend - eager| per output, relative to the eager output's largest magnitude
#: (floored at 1). fp32 backends differ from eager only by operation order and fused kernels
#: (~1e-6 typ.); reduced precision keeps 11 (fp16) or 8 (bf16) mantissa bits through a dozen
#: layers. These are the tolerances ``auto`` and the equivalence tests use.
TOLERANCES = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 1e-1}


class Engine(Protocol):
    """A model ready to run on one device with fixed input shapes.

    ``engine(inputs)`` takes every name of ``input_shapes`` (float32, on ``device``) and returns
    the ``output_names`` as float32 tensors on ``device``. Backends that write into preallocated
    buffers (onnxrt, CUDA graphs) return the same tensors on every call: a caller that keeps an
    output past the next call must copy it.
    """

    backend: str
    precision: str
    device: torch.device
    input_shapes: dict[str, tuple[int, ...]]
    output_names: tuple[str, ...]
    info: dict[str, Any]

    def __call__(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]: ...


def check_inputs(input_shapes: dict[str, tuple[int, ...]], inputs: dict[str, Tensor]) -> None:
    """Raise EngineError unless ``inputs`` holds every expected name at its fixed shape."""
    for name, shape in input_shapes.items():
        got = inputs.get(name)
        if got is None or tuple(got.shape) != shape:
            raise EngineError(f"engine input {name!r}: expected shape {shape}, got "
                              f"{None if got is None else tuple(got.shape)}; engines have fixed "
                              "shapes, build another for another size")


def example_inputs(input_shapes: dict[str, tuple[int, ...]], device: torch.device,
                   seed: int = 0) -> dict[str, Tensor]:
    """Seeded uniform [0, 1) inputs of the engine's shapes: warm-up, export and parity checks."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(s, generator=g).to(device) for k, s in input_shapes.items()}


def prepare_model(model: nn.Module, input_shapes: dict[str, tuple[int, ...]],
                  device: torch.device, outputs: Sequence[str] | None
                  ) -> tuple[nn.Module, dict[str, Tensor], tuple[str, ...]]:
    """Where every backend starts: ``model`` in eval mode on ``device``, seeded example inputs
    (:func:`example_inputs`) and the output names to keep (:func:`output_names_of`)."""
    model = model.eval().to(device)
    example = example_inputs(input_shapes, device)
    return model, example, output_names_of(model, example, outputs)


def output_names_of(model: nn.Module, inputs: dict[str, Tensor],
                    outputs: Sequence[str] | None) -> tuple[str, ...]:
    """The names a model's dict output has (all of them, or the ``outputs`` asked for, checked)."""
    with torch.inference_mode():
        produced = tuple(model(**inputs))
    if outputs is None:
        return produced
    missing = [o for o in outputs if o not in produced]
    if missing:
        raise EngineError(f"outputs {missing} asked for, but {type(model).__name__} returns "
                          f"{list(produced)}")
    return tuple(outputs)


def parity_error(reference: dict[str, Tensor], candidate: dict[str, Tensor]) -> dict[str, float]:
    """Per output, max |candidate - reference| / max(1, max |reference|) (see TOLERANCES)."""
    out = {}
    for name, ref in reference.items():
        ref = ref.float()
        scale = max(1.0, float(ref.abs().max()))
        out[name] = float((candidate[name].float() - ref).abs().max()) / scale
    return out


def make_engine(model: nn.Module, input_shapes: dict[str, tuple[int, ...]], *,
                backend: str = "eager", device: torch.device | str = "cpu",
                precision: str = "fp32", outputs: Sequence[str] | None = None,
                cache_dir: str | Path | None = None, threads: int | None = None,
                fallback: str | None = None, warmup: int = 3) -> Engine:
    """Build an engine of the named backend; a backend that cannot be built is an error.

    Args:
        model: an ``nn.Module`` whose ``forward(**inputs)`` returns a dict of tensors; put in
            eval mode and moved to ``device`` here.
        input_shapes: input name -> fixed shape, e.g. ``{"trus": (1, 1, 128, 128)}``.
        backend: one of :data:`BACKENDS`, or ``auto`` (:func:`regseg.engines.select.select_engine`:
            the fastest that builds and matches eager within :data:`TOLERANCES` here).
        device: ``cpu`` or ``cuda[:N]``.
        precision: ``fp32``, ``fp16`` or ``bf16``. Reduced precision runs matmuls and
            convolutions low and keeps normalisations and softmax in fp32 (autocast rules).
        outputs: output names to keep (default: all the model returns); a backend that builds a
            graph drops the work only the others need.
        cache_dir: where built artifacts live (default ``~/.cache/regseg/engines``).
        threads: CPU threads for backends with their own pool (onnxrt; default torch's count).
        fallback: a backend to build if ``backend`` fails; the failure is logged once and kept in
            ``engine.info["fallback"]``. None (the default): no fallback, the error stands.
        warmup: calls at load, so lazy allocation and kernel choice stay out of frame 1.
    Raises:
        EngineError: unknown backend or precision, or a backend that cannot be built here (the
            message says why and what to do).
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise EngineError(f"precision {precision!r}: choose one of {list(PRECISIONS)}")
    if backend == "auto":
        from regseg.engines.select import select_engine

        return select_engine(model, input_shapes, device=device, precision=precision,
                             outputs=outputs, cache_dir=cache_dir, threads=threads, warmup=warmup)
    if backend not in BACKENDS:
        raise EngineError(f"backend {backend!r} is not known; choose one of "
                          f"{[*BACKENDS, 'auto']}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device}: CUDA is not available here; use device='cpu'")
    model = model.eval().to(device)
    try:
        return build_backend(backend, model, input_shapes, device=device, precision=precision,
                      outputs=outputs, cache_dir=cache_dir, threads=threads, warmup=warmup)
    except EngineError as exc:
        if fallback is None:
            raise
        log.warning("backend %s could not be built (%s); using the named fallback %s",
                    backend, exc, fallback)
        engine = build_backend(fallback, model, input_shapes, device=device, precision=precision,
                        outputs=outputs, cache_dir=cache_dir, threads=threads, warmup=warmup)
        engine.info["fallback"] = {"from": backend, "reason": str(exc)}
        return engine


def build_backend(backend: str, model: nn.Module, input_shapes: dict[str, tuple[int, ...]],
                  **kwargs: Any) -> Engine:
    """Construct one backend's engine class (keyword arguments as :func:`make_engine`)."""
    if backend == "eager":
        from regseg.engines.eager import EagerEngine as cls
    elif backend == "compiled":
        from regseg.engines.compiled import CompiledEngine as cls
    elif backend == "onnxrt":
        from regseg.engines.onnxrt import OnnxRuntimeEngine as cls
    elif backend == "tensorrt":
        from regseg.engines.tensorrt import TensorRTEngine as cls
    else:
        raise EngineError(f"backend {backend!r} is not known; choose one of {list(BACKENDS)}")
    return cls(model, input_shapes, **kwargs)
