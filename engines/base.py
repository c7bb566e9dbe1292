"""The Engine protocol and the eager backend: named tensors in, named tensors out, fixed shapes."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from regseg.errors import EngineError

BACKENDS = ("eager",)  # the engine layer grows (compiled, onnxrt, tensorrt) in a later issue


class Engine(Protocol):
    """A model made ready to run on one device with fixed input shapes."""

    backend: str
    device: torch.device
    input_shapes: dict[str, tuple[int, ...]]

    def __call__(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]: ...


class EagerEngine:
    """Plain torch in inference mode: the reference every other backend is checked against."""

    backend = "eager"

    def __init__(self, model: nn.Module, input_shapes: dict[str, tuple[int, ...]],
                 device: torch.device | str = "cpu", warmup: int = 2) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.input_shapes = dict(input_shapes)
        example = {k: torch.zeros(s, device=self.device) for k, s in self.input_shapes.items()}
        for _ in range(warmup):  # first calls allocate and pick kernels: keep that out of frame 1
            self(example)

    def __call__(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        for name, shape in self.input_shapes.items():
            got = inputs.get(name)
            if got is None or tuple(got.shape) != shape:
                raise EngineError(f"engine input {name!r}: expected shape {shape}, got "
                                  f"{None if got is None else tuple(got.shape)}")
        with torch.inference_mode():
            return self.model(**{k: inputs[k] for k in self.input_shapes})


def make_engine(model: nn.Module, input_shapes: dict[str, tuple[int, ...]], *,
                backend: str = "eager", device: torch.device | str = "cpu") -> Engine:
    """Build an engine of the named backend; an unknown or unavailable backend is an error."""
    if backend not in BACKENDS:
        raise EngineError(f"backend {backend!r} is not available; choose one of {list(BACKENDS)}")
    return EagerEngine(model, input_shapes, device)
