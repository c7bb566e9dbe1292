"""Checkpoints: a model's name and constructor config stored with its weights, loaded strictly.

The file is a plain ``torch.save`` dict of built-in types and tensors, so it loads with
``torch.load(weights_only=True)``: nothing in it is unpickled as code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regseg.errors import EngineError

#: Keys every checkpoint holds.
CHECKPOINT_KEYS = ("model", "config", "state_dict", "meta")


def save_checkpoint(path: str | Path, name: str, model: nn.Module, config: Any,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``{"model", "config", "state_dict", "meta"}`` to ``path``.

    Args:
        name: the registry name of the architecture (``regseg.models.registry.MODELS``).
        model: the network; its state dict is copied to CPU.
        config: the frozen config dataclass the model was built from.
        meta: plain data about the run (metrics, command, versions); must hold only built-in
            types so the file stays ``weights_only``-loadable.
    Returns:
        the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoint = {"model": name, "config": dataclasses.asdict(config), "state_dict": state,
                  "meta": dict(meta or {})}
    # Write then rename, so an interrupted save never leaves a truncated file at ``path``.
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's dict without building the model.

    Raises:
        EngineError: the file is missing, unreadable, not a checkpoint, or holds anything but
            plain data and tensors (``weights_only`` refuses it).
    """
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: checkpoint not found. Train one with `regseg train` or pass "
                          "the path of an existing .pt file.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise EngineError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc}). "
                          "A file written by regseg.models.checkpoint.save_checkpoint is "
                          "expected.") from exc
    if not isinstance(checkpoint, dict) or not set(CHECKPOINT_KEYS) <= set(checkpoint):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise EngineError(f"{path}: not a regseg checkpoint: found {found}, expected a dict with "
                          f"keys {list(CHECKPOINT_KEYS)}.")
    return checkpoint


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, with an error that names the file.

    Raises:
        EngineError: missing or unexpected keys, or a tensor of the wrong shape.
    """
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise EngineError(f"{path}: weights do not fit {type(model).__name__} built from the "
                          f"checkpoint's config: {exc}") from exc
