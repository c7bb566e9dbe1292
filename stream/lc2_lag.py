"""The image-based refinement one frame late, off the frame's path (``regseg-stream --lc2 async``).

On two CPU cores LC2 (:mod:`regseg.stream.lc2_stage`) costs 13-15 ms of a frame's processing and
about 33 ms of its end-to-end latency: with it the chain's processing exceeds the 33 ms frame
period, so each frame also waits for the one before (README "What each default stage costs and
buys"). The move LC2 finds is in the plane and relative to the network's own registration of the
frame, and a tracking error changes slowly, so the move found on one frame is nearly right for the
next. ``async`` applies the most recent move found to each frame's network plane at once and hands
the frame to a worker thread that runs LC2 on it beside the next frame's networks; its move is
applied from the frame after (usually the next one: one LC2 takes well under a frame period).

``lag`` (a bench mode, :data:`LAG_MODES`) is the same arithmetic in order: the frame gets the
previous frame's move, then LC2 runs on it before the call returns. Its results do not depend on
timing, so ``bench/accuracy.py`` measures ``async`` as ``lag`` (README "Image-based refinement").

The worker runs at nice 10 (``REGSEG_LC2_NICE``; Linux, only ever raised): where the cores are
busy the frame's own stages go first, and LC2 takes what is left (its moves come later: lc2_age).

What a frame reports is what was applied to it: ``lc2_move_mm`` the previous frame's move (NaN when
none was applied) and ``lc2_significance`` that refinement's significance, which flags
``lc2_unsupported`` as before, one frame late. The first frame, and the first after the frame
size changes or a refinement failed, and any frame whose network plane is more than 5 mm (at a
frame corner) from the plane the last move was found on (the probe jumped, frames were dropped, a
new registration: :data:`regseg.stream.lag_worker.VIEW_CHANGE_MM`), and (``async``) any frame whose
latest move is more than ``MAX_AGE_MS`` old, has nothing to take over: LC2 runs on it in order, as
``on`` does, so no frame is published with a move found on another view. A refinement that raised
on the worker fails the next frame with the same error, as it would have failed its own frame in
order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from regseg.clock import now_ns
from regseg.stream.lag_worker import Lagged

if TYPE_CHECKING:
    from regseg.stream.lc2_stage import Held

#: ``--lc2`` modes of this module: ``async`` (a worker thread) and ``lag`` (bench: in order)
LAG_MODES = ("async", "lag")
def in_order(mode: str) -> str:
    """The ``--lc2`` mode a bench runs for ``mode`` ("default": the CLI's): ``async`` as ``lag``,
    the same arithmetic in order, whose results do not depend on the machine's speed."""
    from regseg.stream.lc2_stage import LC2_DEFAULT

    return "lag" if (LC2_DEFAULT if mode == "default" else mode) == "async" else mode


@dataclass(frozen=True)
class FoundMove:
    """A refinement's outcome, kept for the next frame."""

    shape: tuple[int, int]
    shift_mm: tuple[float, float]
    rotation_deg: float
    move_mm: float  # NaN when not applied
    significance: float
    applied: bool
    handed_ns: int  # when its frame was handed to the search (regseg.clock.now_ns)
    search_ms: float  # the search's own time
    plane: np.ndarray  # the network's plane it was found on
    #: what it applied, for ``--lc2-hold`` (None when not applied or no tracked plane was given)
    held: Held | None = None


class Lc2Lagged(Lagged):
    """(frame pixels, network image_to_mri) -> (the plane moved by the previous refinement, its
    move in mm, its significance), as :class:`regseg.stream.lc2_stage.Lc2Stage` is called.

    ``stage``: the in-order Lc2Stage whose search runs (cold: each from the frame's network
    plane); ``asynchronous``: on a worker thread (``async``), else in the call (``lag``).
    :meth:`timings` gives the last call's ``lc2_search``, the own time of the search whose move it
    applied (on the worker, off the frame's path, unless the frame was refined in order), and
    ``lc2_age``, how long before the call that search's frame was handed over (about a frame period
    when the worker keeps up)."""

    def __init__(self, stage, *, asynchronous: bool) -> None:
        if stage.warm:
            raise ValueError("lc2 lag: the lagged refinement searches each frame from its network "
                             "plane; a warm stage is not supported")
        super().__init__("regseg-lc2")
        self.stage, self.asynchronous = stage, asynchronous

    def unsupported(self, significance: float) -> bool:
        return self.stage.unsupported(significance)

    @property
    def flag_unsupported(self) -> bool:  # the stage's (bench/trust.py --no-lc2-flag sets it)
        return self.stage.flag_unsupported

    @flag_unsupported.setter
    def flag_unsupported(self, on: bool) -> None:
        self.stage.flag_unsupported = on

    def __call__(self, pixels: np.ndarray, image_to_mri: np.ndarray, *,
                 tracked: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
        job = (np.array(pixels, copy=True), np.array(image_to_mri, np.float64, copy=True),
               now_ns(), None if tracked is None else np.array(tracked, np.float64, copy=True))
        found = self._next(job, pixels.shape, image_to_mri)
        out, move = image_to_mri, math.nan
        if found.applied:
            out = self.stage.moved(image_to_mri, found.shift_mm, found.rotation_deg)
            move = found.move_mm
        self._timings = {"lc2_search": found.search_ms,
                         "lc2_age": (now_ns() - found.handed_ns) / 1e6}
        return out, move, found.significance

    def _run(self, pixels: np.ndarray, plane: np.ndarray, handed_ns: int,
             tracked: np.ndarray | None = None) -> None:
        from regseg.stream.lc2_stage import held_by

        last = self._last()
        try:
            start = now_ns()
            found = self.stage.search(pixels, plane, tracked=tracked,
                                      held=None if last is None else last.held)
            kept = FoundMove(pixels.shape, found.shift_mm, found.rotation_deg,
                             found.move_mm if found.applied else math.nan,
                             found.significance, found.applied, handed_ns,
                             (now_ns() - start) / 1e6, plane,
                             held_by(found, pixels.shape, tracked))
            self._keep(kept)
        except Exception as exc:  # noqa: BLE001 - handed to the next frame, which raises it
            self._fail(exc)
