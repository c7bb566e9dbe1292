"""The deformable stage's network one frame late, off the frame's path
(``regseg-stream --deformable async``).

The deformable stage (:class:`regseg.stream.deformable.DeformableStage`) costs 9-12 ms of each
frame on two CPU cores, nearly all of it PLCReg 2-D's forward pass; the chain with it misses the
25 ms latency target that the chain without it meets (README "What each default stage costs and
buys"). The displacement it predicts is the tissue's deformation in the frame's own pixels
relative to the affinely registered plane, and between frames 33 ms apart the probe's pressure on
the gland changes little. ``async`` therefore warps each frame's MRI labels through its own
published plane and the most recent displacement predicted (one nearest lookup, ~1 ms) and hands
the frame to a worker thread whose prediction the next frame uses.

``lag`` (a bench mode) is the same arithmetic in order: the frame gets the previous frame's
displacement, then the network runs on it before the call returns. Its results do not depend on
timing, so the benches measure ``async`` as ``lag`` (:func:`in_order`).

A frame reports the displacement it was warped through (``Result.ddf``). The first frame, the first
after the frame size changes or a prediction failed, and any frame whose published plane is more
than :data:`regseg.stream.lag_worker.VIEW_CHANGE_MM` (at a frame corner) from the plane the last
displacement was predicted on (the probe jumped, frames were dropped, a new registration) has
nothing to take over: the network runs on it in order, as ``on`` does. A prediction that raised on
the worker fails the next frame with the same error, as it would have failed its own frame.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from regseg.clock import now_ns
from regseg.stream.lag_worker import Lagged

#: ``--deformable`` modes: ``on`` (in order), ``off``, ``async`` (the network on a worker thread,
#: one frame late); ``lag`` is ``async``'s arithmetic in order (benches)
DEFORMABLE_MODES = ("on", "off", "async")
LAG_MODES = ("async", "lag")


def in_order(mode: str) -> str:
    """The ``--deformable`` mode a bench runs for ``mode`` ("default": the CLI's): ``async`` as
    ``lag``, the same arithmetic in order, whose results do not depend on the machine's speed."""
    from regseg.stream.cli_parser import DEFORMABLE_DEFAULT

    return "lag" if (DEFORMABLE_DEFAULT if mode == "default" else mode) == "async" else mode


def bench_stage(stage, mode: str = "default"):
    """What a bench's chain gets for ``--deformable`` ``mode`` ("default": the CLI's) from an
    in-order ``stage`` (None: off): the stage itself for ``on``; for ``async`` and ``lag`` a new
    :class:`DeformableLagged` over it, in order (one per chain: its last displacement is that
    chain's, while the network is shared)."""
    if stage is None or in_order(mode) != "lag":
        return stage
    return DeformableLagged(stage, asynchronous=False)


@dataclass(frozen=True)
class Field:
    """A prediction, kept for the next frame."""

    plane: np.ndarray  # the published plane it was predicted on
    ddf: torch.Tensor  # (1, 2, H, W) frame pixels (dy, dx), on the stage's device
    handed_ns: int  # when its frame was handed over (regseg.clock.now_ns)
    own_ms: float  # the network's own time

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.ddf.shape[-2]), int(self.ddf.shape[-1])


class DeformableLagged(Lagged):
    """(frame pixels, published image_to_mri) -> (MRI labels through the plane and the previous
    frame's displacement, that displacement), as the stage is called.

    ``stage``: the in-order :class:`~regseg.stream.deformable.DeformableStage` (its ``field`` runs
    on the worker, its ``warp`` on the frame's thread); ``asynchronous``: a worker thread
    (``async``), else in the call (``lag``). :meth:`timings` gives the last call's
    ``deformable_net``, the own time of the prediction it applied (on the worker, off the frame's
    path, unless the frame ran in order), and ``deformable_age``, how long before the call that
    prediction's frame was handed over."""

    def __init__(self, stage, *, asynchronous: bool) -> None:
        super().__init__("regseg-deformable")
        self.stage, self.asynchronous = stage, asynchronous
        self._net = threading.Lock()  # one prediction at a time (worker or an in-order frame)

    # what the command line and regseg-serve read of the stage
    @property
    def weights(self):
        return self.stage.weights

    @property
    def engine(self):
        return self.stage.engine

    def __call__(self, pixels: np.ndarray, image_to_mri: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        job = (np.array(pixels, copy=True), np.array(image_to_mri, np.float64, copy=True),
               now_ns())
        field = self._next(job, pixels.shape[:2], image_to_mri)
        labels = self.stage.warp(image_to_mri, field.ddf)
        self._timings = {"deformable_net": field.own_ms,
                         "deformable_age": (now_ns() - field.handed_ns) / 1e6}
        return labels, field.ddf[0].float().cpu().numpy()

    def _run(self, pixels: np.ndarray, plane: np.ndarray, handed_ns: int) -> None:
        try:
            with self._net:
                start = now_ns()
                ddf = self.stage.field(pixels, plane)
            self._keep(Field(plane, ddf, handed_ns, (now_ns() - start) / 1e6))
        except Exception as exc:  # noqa: BLE001 - handed to the next frame, which raises it
            self._fail(exc)
