"""Image-based refinement of the live registration (``regseg-stream --lc2 on``).

AlignSegNet's registration is learnt; on ultrasound unlike its training it is off by 2-4 mm in a
consistent direction (README "Accuracy on a simulator it was not trained on"). This stage moves
each frame's registered plane in-plane (two shifts and a rotation about the MRI gland's centre)
to maximise LC2 between the frame and the MRI resliced at the plane (:mod:`regseg.lc2`): a
similarity that is not learnt, so it does not share the network's blind spots. It runs on the
frame's own registration, before the temporal filter, so the filter, ``jump_mm``, the deformable
stage and the quality check see the refined plane. A move larger than
:attr:`regseg.lc2.Lc2Config.max_move_mm` is not applied (an LC2 optimum that far from the
network's plane is more likely a wrong one than a correction).

The default (``LC2_DEFAULT``) is set by the rules written before their measurements
(``bench/results/lc2_predeclared.md``; ``bench/lc2.py``): ``on`` since session 16, and since
session 26 ``async``, this search one frame late on a worker thread (:mod:`regseg.stream.lc2_lag`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from regseg import spatial
from regseg.kernels import lc2_maps, plane_sample
from regseg.lc2 import Lc2Config, Lc2Refinement, refine_in_plane
from regseg.stream.context import MriContext
from regseg.types import PROSTATE

#: ``async``: LC2 one frame late on a worker thread (regseg.stream.lc2_lag; ``lag``, the same in
#: order, is a bench mode)
LC2_MODES = ("on", "async", "warm", "fast", "off")
#: ``six`` (bench mode): the search also over the normal shift and both tilts, with more rounds as
#: six parameters take; not shipped by its rule (bench/results/lc2_predeclared.md, addendum 6)
SIX_MAX_ROUNDS = 40
#: Bench-only modes (not ``--lc2`` choices), as Lc2Config changes: ``on`` with every candidate
#: resliced from the volume (what ``on`` does), and ``on`` with the plane slice
#: (:class:`regseg.lc2_slice.PlaneSlice`), which failed its rule (bench/results/lc2_predeclared.md,
#: addendum 3)
BENCH_MODES = {"on-volume": {}, "on-slice": {"plane_slice": True},
               # ``on`` without the significance guard (addendum 4)
               "on-unguarded": {"min_significance": 0.0},
               "six": {"out_of_plane": True, "max_rounds": SIX_MAX_ROUNDS}}
#: ``fast``: ``warm`` on a coarser working grid (bench/results/lc2_predeclared.md, addendum 2)
FAST_GRID_MM = 0.8
#: ``on`` by addendum 1 of bench/results/lc2_predeclared.md (session 16); ``async`` since its
#: addendum 26 (session 26): the same search one frame late, off the frame's path (lc2_lag)
LC2_DEFAULT = "async"


class Lc2Stage:
    """(frame pixels, registered image_to_mri) -> (refined image_to_mri, move in mm).

    ``warm``: each search starts from the previous frame's applied move (or from no move when
    that scores higher) with a 0.5 mm / 0.5 deg first step (:func:`regseg.lc2.refine_in_plane`);
    the previous move is forgotten when a frame applies none or the frame size changes.
    ``flag_unsupported``: the pipeline flags a frame whose refinement is not significant
    (:meth:`unsupported`).
    """

    def __init__(self, context: MriContext, config: Lc2Config | None = None, *,
                 warm: bool = False, flag_unsupported: bool = True) -> None:
        self.context = context
        self.config = Lc2Config() if config is None else config
        self.warm = warm
        self.flag_unsupported = flag_unsupported
        self._prior: tuple[tuple[int, int], np.ndarray] | None = None
        labels = context.labels[0, 0].cpu().numpy()
        gland = np.argwhere(labels >= PROSTATE)  # (k, j, i) voxel indices of gland and lesion
        if len(gland) == 0:
            raise ValueError("lc2: the MRI labels hold no gland to rotate about")
        ijk = gland[:, ::-1].mean(0)
        self.centre_mri = spatial.apply(context.voxel_to_world, ijk[None])[0]
        if context.mri.device.type == "cpu":  # compile (or load) the kernels now, not on frame 1
            plane_sample.warm_up()
            lc2_maps.warm_up()

    def unsupported(self, significance: float) -> bool:
        """Whether a frame is flagged ``lc2_unsupported``: its refinement's significance was
        computed and is below ``min_significance`` (lc2_predeclared.md, addendum 5)."""
        return self.flag_unsupported and significance < self.config.min_significance

    def centre_ij(self, image_to_mri: np.ndarray) -> np.ndarray:
        """The MRI gland's centre projected onto the plane, in frame pixels (i, j)."""
        return spatial.apply(spatial.invert(image_to_mri), self.centre_mri[None])[0, :2]

    def search(self, pixels: np.ndarray, image_to_mri: np.ndarray,
               warm: np.ndarray | None = None) -> Lc2Refinement:
        """The refinement of one frame's plane (:func:`regseg.lc2.refine_in_plane`): the search
        that :meth:`__call__` and :class:`regseg.stream.lc2_lag.Lc2Lagged` run."""
        return refine_in_plane(pixels, image_to_mri, self.context.mri,
                               self.context.world_to_voxel, self.centre_ij(image_to_mri),
                               self.config, warm=warm)

    def close(self) -> None:
        """Nothing to end (the in-order stage has no thread; Lc2Lagged's has)."""

    def timings(self) -> dict[str, float]:
        """Extra per-frame timings (Lc2Lagged's: the age and time of the move applied)."""
        return {}

    def __call__(self, pixels: np.ndarray,
                 image_to_mri: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The refined plane, how far it moved the gland (NaN when nothing was applied), and the
        refinement's significance (its LC2 over the chance level; NaN when not computed)."""
        prior = None
        if self.warm and self._prior is not None and self._prior[0] == pixels.shape:
            prior = self._prior[1]
        found = self.search(pixels, image_to_mri, prior)
        if self.warm:
            self._prior = ((pixels.shape, np.array([*found.shift_mm, found.rotation_deg]))
                           if found.applied else None)
        return (found.image_to_mri, (found.move_mm if found.applied else math.nan),
                found.significance)


def build_lc2(context: MriContext, mode: str = LC2_DEFAULT) -> Any:
    """``--lc2``'s stage over ``context`` (None for off; an Lc2Lagged for async and lag)."""
    from regseg.stream.lc2_lag import LAG_MODES, Lc2Lagged, asynchronous_allowed

    if mode not in (*LC2_MODES, *BENCH_MODES, *LAG_MODES):
        raise ValueError(f"lc2 {mode!r}: expected one of {LC2_MODES}")
    if mode == "off":
        return None
    if mode in LAG_MODES:
        return Lc2Lagged(Lc2Stage(context),
                         asynchronous=mode == "async" and asynchronous_allowed())
    config = (Lc2Config(grid_mm=FAST_GRID_MM) if mode == "fast" else
              Lc2Config(**BENCH_MODES[mode]) if mode in BENCH_MODES else None)
    return Lc2Stage(context, config, warm=mode in ("warm", "fast"))
