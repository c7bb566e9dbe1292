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

Two options, off by default, for consecutive frames (session 27): ``--lc2-hold on``
(:meth:`Lc2Stage.hold`) applies a move over the cap that keeps the previous refinement's correction
of the tracked pose, and ``--lc2-rescue on`` (:meth:`Lc2Stage.rescue`) searches again from other
starts when the first search applies nothing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from regseg import spatial
from regseg.kernels import lc2_maps, plane_sample
from regseg.lc2 import Lc2Config, Lc2Refinement, in_plane_move, refine_in_plane
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
#: ``--lc2-hold on``: a move over the cap (``Lc2Config.max_move_mm``) is still applied when the
#: plane it gives is within this of where the previous refinement's correction of the tracked pose
#: puts the frame (the largest distance at a frame corner, mm; the ``jump`` flag's 3 mm): the
#: registration LC2 holds is kept while the network's own plane drifts away from it. Not across a
#: view change: the tracked plane must have moved <= VIEW_CHANGE_MM (regseg.stream.lag_worker) since
#: the previous refinement's frame. An option, off: it failed its rule (lc2_predeclared.md,
#: addendum 28), and with the rescue it kept a wrong lock the flags missed (addendum 29)
HOLD_MM = 3.0
LC2_HOLD = ("on", "off")
LC2_HOLD_DEFAULT = "off"
#: ``--lc2-rescue on``: when the search from the network's plane applies nothing, LC2 searches
#: again from the plane moved this far (mm) each way along the frame's two axes, and from where
#: the previous refinement's correction of the tracked pose puts the frame (no view change
#: since); the most significant of those searches is applied under the same significance guard
#: and cap (a move over the cap only when it is held, ``--lc2-hold``). An option, off: it failed
#: its rule (lc2_predeclared.md, addendum 29)
RESCUE_MM = 6.0
LC2_RESCUE = ("on", "off")
LC2_RESCUE_DEFAULT = "off"


class Lc2Stage:
    """(frame pixels, registered image_to_mri) -> (refined image_to_mri, move in mm).

    ``warm``: each search starts from the previous frame's applied move (or from no move when
    that scores higher) with a 0.5 mm / 0.5 deg first step (:func:`regseg.lc2.refine_in_plane`);
    the previous move is forgotten when a frame applies none or the frame size changes.
    ``flag_unsupported``: the pipeline flags a frame whose refinement is not significant
    (:meth:`unsupported`). ``hold_mm`` (``--lc2-hold on``: :data:`HOLD_MM`; 0: off): a
    significant move over the cap is applied when it keeps the correction of the tracked pose that
    the previous refinement applied (:meth:`hold`). ``rescue_mm`` (``--lc2-rescue on``:
    :data:`RESCUE_MM`; 0: off): a search that applies nothing is run again from other starts
    (:meth:`rescue`).
    """

    def __init__(self, context: MriContext, config: Lc2Config | None = None, *,
                 warm: bool = False, flag_unsupported: bool = True,
                 hold_mm: float = 0.0, rescue_mm: float = 0.0) -> None:
        self.context = context
        self.config = Lc2Config() if config is None else config
        self.warm = warm
        self.flag_unsupported = flag_unsupported
        if not (math.isfinite(hold_mm) and hold_mm >= 0):
            raise ValueError(f"lc2 hold_mm {hold_mm!r}: expected a number >= 0")
        self.hold_mm = float(hold_mm)
        if not (math.isfinite(rescue_mm) and rescue_mm >= 0):
            raise ValueError(f"lc2 rescue_mm {rescue_mm!r}: expected a number >= 0")
        if rescue_mm and warm:
            raise ValueError("lc2: a warm stage has no rescue (its search starts from the "
                             "previous move)")
        self.rescue_mm = float(rescue_mm)
        self._prior: tuple[tuple[int, int], np.ndarray] | None = None
        self._held: Held | None = None
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
               warm: np.ndarray | None = None, *, tracked: np.ndarray | None = None,
               held: Held | None = None) -> Lc2Refinement:
        """The refinement of one frame's plane (:func:`regseg.lc2.refine_in_plane`): the search
        that :meth:`__call__` and :class:`regseg.stream.lc2_lag.Lc2Lagged` run; with ``tracked``
        (the frame's tracked plane) and ``held`` (what the previous refinement applied,
        :func:`held_by`), :meth:`hold` may apply a move over the cap."""
        found = refine_in_plane(pixels, image_to_mri, self.context.mri,
                                self.context.world_to_voxel, self.centre_ij(image_to_mri),
                                self.config, warm=warm)
        if held is not None and tracked is not None and self.hold_mm > 0:
            found = self.hold(found, pixels.shape, image_to_mri, tracked, held)
        if self.rescue_mm > 0 and not found.applied:
            found = self.rescue(found, pixels, image_to_mri, tracked,
                                held if holds(held, tracked, pixels.shape) else None)
        return found

    def moved(self, image_to_mri: np.ndarray, shift_mm: tuple[float, float],
              rotation_deg: float) -> np.ndarray:
        """``image_to_mri`` moved in-plane by a refinement's move (about :meth:`centre_ij`)."""
        return image_to_mri @ in_plane_move(np.asarray(shift_mm), rotation_deg,
                                            self.centre_ij(image_to_mri),
                                            spatial.plane_spacing(image_to_mri))

    def rescue(self, found: Lc2Refinement, pixels: np.ndarray, image_to_mri: np.ndarray,
               tracked: np.ndarray | None, held: Held | None) -> Lc2Refinement:
        """When ``found`` (the search from the network's plane) applied nothing: the search again
        from ``rescue_mm`` each way along the frame's two axes, and from where ``held``'s
        correction puts the frame (``held``: one that :func:`holds`; a multi-start: a pose
        5-7 mm off is often outside LC2's basin, where these starts are not). Its most
        significant is applied under the same guard and cap, or over the cap when held; else
        ``found``."""
        s = self.rescue_mm
        starts = [np.array([dx, dy, 0.0]) for dx, dy in ((s, 0), (-s, 0), (0, s), (0, -s))]
        if held is not None:
            starts.append(move_params(spatial.invert(image_to_mri) @ tracked @ held.correction,
                                      self.centre_ij(image_to_mri),
                                      spatial.plane_spacing(image_to_mri)))
        again = refine_in_plane(pixels, image_to_mri, self.context.mri,
                                self.context.world_to_voxel, self.centre_ij(image_to_mri),
                                self.config, starts=starts)
        if held is not None and self.hold_mm > 0:
            again = self.hold(again, pixels.shape, image_to_mri, tracked, held)
        return again if again.applied else found

    def hold(self, found: Lc2Refinement, shape: tuple[int, int], image_to_mri: np.ndarray,
             tracked: np.ndarray, held: Held) -> Lc2Refinement:
        """``found`` applied after all if the cap alone refused it (it improved LC2 and is
        significant), ``held`` still :func:`holds` for this frame, and the plane it gives is
        within ``hold_mm`` (at a frame corner) of ``tracked @ held.correction``: where the
        previous refinement's correction of the tracked pose puts this frame. A registration LC2
        found under the cap is so kept while the network's plane drifts away from it; a first
        lock still needs the cap. (``score`` stays the start's, as for a refused move.)"""
        from regseg.stream.lag_worker import view_change_mm

        cfg = self.config
        if (found.applied or not found.move_mm > cfg.max_move_mm
                or found.significance < cfg.min_significance
                or not holds(held, tracked, shape)):
            return found
        plane = self.moved(image_to_mri, found.shift_mm, found.rotation_deg)
        if view_change_mm(tracked @ held.correction, plane, shape) > self.hold_mm:
            return found
        return dataclasses.replace(found, image_to_mri=plane, applied=True)

    def close(self) -> None:
        """Nothing to end (the in-order stage has no thread; Lc2Lagged's has)."""

    def timings(self) -> dict[str, float]:
        """Extra per-frame timings (Lc2Lagged's: the age and time of the move applied)."""
        return {}

    def __call__(self, pixels: np.ndarray, image_to_mri: np.ndarray, *,
                 tracked: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
        """The refined plane, how far it moved the gland (NaN when nothing was applied), and the
        refinement's significance (its LC2 over the chance level; NaN when not computed).
        ``tracked``: the frame's tracked plane (for ``hold_mm``)."""
        prior = None
        if self.warm and self._prior is not None and self._prior[0] == pixels.shape:
            prior = self._prior[1]
        found = self.search(pixels, image_to_mri, prior, tracked=tracked, held=self._held)
        if self.warm:
            self._prior = ((pixels.shape, np.array([*found.shift_mm, found.rotation_deg]))
                           if found.applied else None)
        self._held = held_by(found, pixels.shape, tracked)
        return (found.image_to_mri, (found.move_mm if found.applied else math.nan),
                found.significance)


def move_params(move: np.ndarray, centre_ij: np.ndarray,
                spacing: tuple[float, float]) -> np.ndarray:
    """(shift along columns, along rows mm, rotation deg) of the in-plane part of a (4, 4)
    frame-pixel map, as :func:`regseg.lc2.in_plane_move` takes them (its inverse for a rigid move;
    for one with scale or shear, the rigid move nearest at ``centre_ij``)."""
    sp = np.array(spacing, np.float64)
    r = move[:2, :2] * sp[:, None] / sp[None, :]  # S M S^-1
    a = math.atan2(r[1, 0] - r[0, 1], r[0, 0] + r[1, 1])
    c_mm = sp * np.asarray(centre_ij, np.float64)
    moved_mm = sp * (move[:2, :2] @ np.asarray(centre_ij, np.float64) + move[:2, 3])
    return np.array([*(moved_mm - c_mm), math.degrees(a)])  # where the centre goes, and the turn


@dataclass(frozen=True)
class Held:
    """What a refinement applied, for ``--lc2-hold``: its frame's shape and tracked plane, and
    ``correction`` (4, 4) with ``refined plane = tracked @ correction`` (the registration's
    correction of the tracked pose, in the frame's own coordinates: it carries to the next
    frame's tracked pose)."""

    shape: tuple[int, int]
    tracked: np.ndarray
    correction: np.ndarray


def holds(held: Held | None, tracked: np.ndarray | None, shape: tuple[int, int]) -> bool:
    """Whether ``held`` still describes a frame of ``shape`` whose tracked plane is ``tracked``:
    the same frame size, and the tracked plane moved at most VIEW_CHANGE_MM (at a frame corner;
    regseg.stream.lc2_lag) since ``held``'s frame (not after a jump of the probe, a gap or a new
    registration)."""
    from regseg.stream.lag_worker import VIEW_CHANGE_MM, view_change_mm

    return (held is not None and tracked is not None and held.shape == tuple(shape)
            and view_change_mm(held.tracked, tracked, shape) <= VIEW_CHANGE_MM)


def held_by(found: Lc2Refinement, shape: tuple[int, int],
            tracked: np.ndarray | None) -> Held | None:
    """What ``found`` leaves for the next frame's hold (None when it applied nothing or the frame
    had no tracked plane given)."""
    if not found.applied or tracked is None:
        return None
    return Held(tuple(shape), tracked, spatial.invert(tracked) @ found.image_to_mri)


def build_lc2(context: MriContext, mode: str = LC2_DEFAULT, hold: str = LC2_HOLD_DEFAULT,
              rescue: str = LC2_RESCUE_DEFAULT) -> Any:
    """``--lc2``'s stage over ``context`` (None for off; an Lc2Lagged for async and lag);
    ``hold``: ``--lc2-hold`` (on: :data:`HOLD_MM`); ``rescue``: ``--lc2-rescue`` (on:
    :data:`RESCUE_MM`; not with warm or fast)."""
    from regseg.stream.lag_worker import asynchronous_allowed
    from regseg.stream.lc2_lag import LAG_MODES, Lc2Lagged

    if mode not in (*LC2_MODES, *BENCH_MODES, *LAG_MODES):
        raise ValueError(f"lc2 {mode!r}: expected one of {LC2_MODES}")
    if hold not in LC2_HOLD:
        raise ValueError(f"lc2 hold {hold!r}: expected one of {LC2_HOLD}")
    if rescue not in LC2_RESCUE:
        raise ValueError(f"lc2 rescue {rescue!r}: expected one of {LC2_RESCUE}")
    if mode == "off":
        return None
    hold_mm = HOLD_MM if hold == "on" else 0.0
    rescue_mm = RESCUE_MM if rescue == "on" else 0.0
    if mode in LAG_MODES:
        return Lc2Lagged(Lc2Stage(context, hold_mm=hold_mm, rescue_mm=rescue_mm),
                         asynchronous=mode == "async" and asynchronous_allowed())
    config = (Lc2Config(grid_mm=FAST_GRID_MM) if mode == "fast" else
              Lc2Config(**BENCH_MODES[mode]) if mode in BENCH_MODES else None)
    if rescue_mm and mode in ("warm", "fast"):
        raise ValueError(f"lc2 {mode} with rescue on: a warm search starts from the previous "
                         "move and has no rescue; use --lc2 on or async")
    return Lc2Stage(context, config, warm=mode in ("warm", "fast"), hold_mm=hold_mm,
                    rescue_mm=rescue_mm)
