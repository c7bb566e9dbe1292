"""The state a killed training run resumes from (``--resume``): ``DIR/NAME.state.pt``.

It holds the model and optimiser states, the step, the random generator and whatever else the
recipe needs to continue exactly where it stopped (batch order, history, elapsed time). Rank 0
writes it atomically (a temporary file renamed over the last one), so a kill at any instant
leaves either the previous state or the new one, never half of one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regseg.errors import InputError

STATE_VERSION = 1


def state_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.state.pt"


def save_state(path: Path, *, model: nn.Module, optimiser: torch.optim.Optimizer, step: int,
               generator: torch.Generator, extra: dict[str, Any], run_key: dict[str, Any]
               ) -> None:
    """Write the resumable state (call on rank 0 only; ``model`` unwrapped).

    ``run_key`` identifies the run's settings (seed, batch, config...): :func:`load_state`
    refuses a state written by another run.
    """
    tmp = path.with_suffix(".tmp")
    torch.save({"version": STATE_VERSION, "step": step, "run_key": run_key,
                "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                "generator": generator.get_state(), "extra": extra}, tmp)
    tmp.replace(path)


def load_state(path: Path, *, model: nn.Module, optimiser: torch.optim.Optimizer,
               generator: torch.Generator, run_key: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Restore a state written by :func:`save_state` into ``model``, ``optimiser``, ``generator``.

    Returns:
        the step reached and the recipe's ``extra``.
    Raises:
        InputError: no state file, an unreadable one, or one from a run with other settings.
    """
    if not path.is_file():
        raise InputError(f"--resume: {path} not found; nothing to resume (the run wrote no "
                         "state yet, or --out names another folder). Drop --resume to start.")
    try:
        # weights_only: a state file is data (tensors, numbers, lists, dicts); one that asks to
        # unpickle anything else (code) is refused, not run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--resume: {path} is not a readable training state ({first[:300]}); "
                         "expected a DIR/NAME.state.pt this recipe wrote") from None
    if not isinstance(state, dict):
        raise InputError(f"--resume: {path} holds a {type(state).__name__}, not a training state "
                         "(a dict this recipe wrote)")
    if state.get("version") != STATE_VERSION or state.get("run_key") != run_key:
        raise InputError(f"--resume: {path} was written by a run with other settings "
                         f"{state.get('run_key')}; this run is {run_key}. Resume with the same "
                         "options, or use another --out.")
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    generator.set_state(state["generator"])
    return int(state["step"]), state["extra"]


class Checkpointer:
    """The states one training run writes: every ``every`` steps and once at the end, rank 0 only.

    A recipe's loop calls :meth:`periodic` after each optimiser step and :meth:`final` when
    training stops, so a killed run loses at most ``every`` steps. ``extra`` is the recipe's own
    state (batch order, history, time used); :meth:`periodic` takes it as a callable, built only
    when a state is written.
    """

    def __init__(self, path: Path, *, model: nn.Module, optimiser: torch.optim.Optimizer,
                 generator: torch.Generator, run_key: dict[str, Any], every: int | None,
                 main: bool = True) -> None:
        self.path, self.model, self.optimiser = Path(path), model, optimiser
        self.generator, self.run_key = generator, run_key
        self.every, self.main = int(every or 0), main

    def periodic(self, step: int, extra: Callable[[], dict[str, Any]]) -> None:
        """Write the state if ``step`` is a multiple of ``every`` (and ``every`` is set)."""
        if self.main and self.every and step % self.every == 0:
            self.final(step, extra())

    def final(self, step: int, extra: dict[str, Any]) -> None:
        """Write the state now (rank 0; other ranks return)."""
        if self.main:
            save_state(self.path, model=self.model, optimiser=self.optimiser, step=step,
                       generator=self.generator, extra=extra, run_key=self.run_key)
