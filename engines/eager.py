"""The eager backend: plain torch in inference mode, the reference every other backend matches."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from regseg.engines.base import DTYPES, Engine, check_inputs, prepare_model
from regseg.engines.onednn import OneDNNConv3d, prefer_onednn
from regseg.errors import EngineError

log = logging.getLogger(__name__)

#: Measured on this project's AMD EPYC (AVX2, no bf16 units; ``bench/engines.py``, 1 thread):
#: eager bf16 over eager fp32 per call, PLCReg 2-D 7x, AlignSegNet 21x, MONAI LocalNet 84x.
EMULATED_BF16_SLOWDOWN = "7-84x"


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for fp16/bf16, a no-op for fp32.

    Autocast runs convolutions, matmuls and linear layers in the low type and keeps layer/group
    norm, softmax and grid_sample in fp32 (torch's autocast op lists): the "norms in fp32" rule of
    notes/engines.md §0.3 without editing the model.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def check_torch_precision(backend: str, device: torch.device, precision: str) -> str:
    """Return ``precision`` unless it is fp16 on CPU, which the torch backends refuse.

    CPU autocast accepts fp16, but most CPU kernels have no fp16 path and run many times slower
    through conversions: refuse rather than mislead.
    """
    if device.type == "cpu" and precision == "fp16":
        raise EngineError(f"{backend} fp16 on CPU is not supported here (no fast CPU fp16 "
                          "kernels); use precision='fp32' or 'bf16' on CPU, fp16 on CUDA")
    if device.type == "cpu" and precision == "bf16" and not native_bf16_cpu():
        # Allowed (the accuracy of bf16 can be checked here), but never silently slow.
        log.warning("%s bf16 on this CPU is emulated (no AVX512-BF16 or AMX units): expect it "
                    "%s slower than fp32 (measured here); use precision='fp32' on this CPU",
                    backend, EMULATED_BF16_SLOWDOWN)
    return precision


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 arithmetic that oneDNN uses (AVX512-BF16 or AMX); without it
    torch's CPU bf16 convolutions are emulated and many times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def run_module(module: Callable[..., dict[str, Tensor]], engine: Engine,
               inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """``module(**inputs)`` as the torch backends run it: inputs checked against ``engine``, in
    inference mode and autocast below fp32; the ``engine.output_names`` come back as float32."""
    check_inputs(engine.input_shapes, inputs)
    with torch.inference_mode(), autocast_context(engine.device, engine.precision):
        out = module(**{k: inputs[k] for k in engine.input_shapes})
    return {k: out[k].float() for k in engine.output_names}


class EagerEngine:
    """Plain torch: ``model(**inputs)`` under inference mode (and autocast below fp32).

    Args: see :func:`regseg.engines.base.make_engine`; ``cache_dir`` and ``threads`` are unused
    (eager builds nothing and uses torch's own thread pool).
    """

    backend = "eager"

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
        # 3-D convolutions through oneDNN where torch's heuristics pick its slow kernel (CPU fp32)
        if self.device.type == "cpu" and precision == "fp32":
            prefer_onednn(self.model)
        routed = sum(isinstance(m, OneDNNConv3d) for m in self.model.modules())
        for _ in range(warmup):  # first calls allocate and choose kernels: keep that out of frame 1
            self(example)
        self.info: dict[str, Any] = {"backend": self.backend, "precision": precision,
                                     "device": str(self.device), "onednn_conv3d": routed,
                                     "build_s": round(time.perf_counter() - start, 3)}

    def __call__(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return run_module(self.model, self, inputs)
