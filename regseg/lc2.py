"""The image-based refinement's search: the pose of a frame's plane that maximises LC2
(:mod:`regseg.lc2_score`) between the frame and the MRI resliced at the pose.

:func:`refine_in_plane` searches the in-plane rigid pose (two shifts and a rotation about a
point, in mm and degrees; with ``Lc2Config.out_of_plane`` also the normal shift and both tilts)
from a start plane: a pattern search whose candidate poses of each round are resliced and scored
in one batch. A move is applied only when it is significant (``min_significance``) and within
``max_move_mm``.

Conventions: planes map frame pixel (i, j, 0) (i = column, j = row) to MRI world mm, as
``Result.mri_to_image``'s inverse does (:mod:`regseg.spatial`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg import spatial
from regseg.kernels import plane_sample
from regseg.lc2_score import (  # noqa: F401  (the score, also importable from here)
    UltrasoundWindows,
    box_mean,
    gradient_magnitude,
    lc2,
)
from regseg.lc2_slice import PlaneSlice, slice_for_frame

#: Reslice candidates on the CPU with the compiled kernel (:mod:`regseg.kernels.plane_sample`,
#: ~2.5x faster than torch's grid_sample here); False: torch's, which CUDA tensors always take
#: (tests compare the two)
NUMBA_ON_CPU = True
#: ... whose points inside the volume skip the bounds tests (the same bits; False: the kernel as it
#: was before session 22, for side-by-side timing: bench/lc2_kernels.py, or REGSEG_LC2_KERNELS=0
#: in a process's environment, e.g. under bench/latency.py)
RESLICE_INTERIOR = os.environ.get("REGSEG_LC2_KERNELS", "1") != "0"
#: Bump whenever the search's answers change: caches of a chain's output carry it (from 2 on)
LC2_REVISION = 2  # 2: the significance guard (session 17)


@dataclass(frozen=True)
class Lc2Config:
    """Settings of the score and the search (defaults: the values of the first measurement,
    set before it from the scale of the prostate's zones and capsule, not tuned)."""

    grid_mm: float = 0.6  # working pixel size: the frame is area-averaged down to about this
    radius_mm: float = 4.0  # half-size of the local windows the fits are made in
    step: float = 2.0  # first step of the search, mm for shifts and degrees for the rotation
    min_step: float = 0.25  # the search stops when no move of this size improves the score
    max_rounds: int = 24  # batched rounds at most (each scores 6 poses)
    coarse_above: float = 0.5  # steps larger than this are scored on a grid twice as coarse
    max_move_mm: float = 8.0  # a refinement that moves the gland further is not applied
    #: a refinement is applied only if its LC2 is at least this many times the highest LC2 of the
    #: MRI displaced in-plane by ``null_shift_mm`` (NULL_SHIFTS): evidence that the frame holds
    #: anatomy the MRI explains, not speckle any plane fits (lc2_predeclared.md, addendum 4)
    min_significance: float = 1.5
    null_shift_mm: float = 12.0
    #: also search the normal shift and both tilts (six parameters; ``--lc2 six``): ~4x the poses
    out_of_plane: bool = False
    #: in-plane candidates are resampled in 2-D from the MRI resliced once over the frame's plane
    #: (:class:`PlaneSlice`); False: each candidate is resliced from the volume (the reference)
    plane_slice: bool = False  # not the default: failed its rule (lc2_predeclared.md, addendum 3)
    slice_margin_mm: float = 12.0  # how far around the frame that slice reaches

    def __post_init__(self) -> None:
        for name in ("grid_mm", "radius_mm", "step", "min_step", "max_move_mm",
                     "slice_margin_mm", "null_shift_mm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Lc2Config.{name} must be a positive number; got {value!r}")
        if self.min_step > self.step:
            raise ValueError(f"Lc2Config.min_step ({self.min_step}) must not exceed step "
                             f"({self.step})")
        if not (math.isfinite(self.min_significance) and self.min_significance >= 0):
            raise ValueError("Lc2Config.min_significance must be a number >= 0; got "
                             f"{self.min_significance!r}")
        if self.max_rounds < 1:
            raise ValueError(f"Lc2Config.max_rounds must be >= 1; got {self.max_rounds}")


@dataclass
class Lc2Refinement:
    """What :func:`refine_in_plane` found: the plane, and what it is worth."""

    image_to_mri: np.ndarray  # (4, 4) the refined plane (the start when not applied)
    score_start: float
    score: float  # LC2 at the refined plane (score_start when not applied)
    shift_mm: tuple[float, float]  # the move found, in the plane: along columns, along rows
    rotation_deg: float
    # out of plane (``out_of_plane``): normal shift mm, tilts about the column and row axes deg
    move_mm: float  # how far the move takes the point it rotates about, plus the rotation's arm
    rounds: int
    applied: bool  # False when the move exceeded ``max_move_mm``, nothing improved, or the
    # significance is below ``min_significance``
    significance: float = math.nan  # score / the highest score of the MRI displaced (NULL_SHIFTS)
    out_of_plane: tuple[float, float, float] = (0.0, 0.0, 0.0)


class FrameScorer:
    """LC2 of one frame against the MRI resliced at candidate planes, on a working grid.

    ``plane_slice``: the :class:`PlaneSlice` of ``plane`` that in-plane candidates are resampled
    from (other candidates, and any a slice does not cover, are resliced from the volume)."""

    def __init__(self, pixels: np.ndarray, plane: np.ndarray, mri: Tensor,
                 world_to_voxel: np.ndarray, config: Lc2Config, *, coarse: int = 1,
                 plane_slice: PlaneSlice | None = None) -> None:
        h, w = pixels.shape
        self.spacing = spatial.plane_spacing(plane)
        f = max(1, int(round(coarse * config.grid_mm / min(self.spacing))))
        self.hw = (h // f, w // f)
        if min(self.hw) < 8:
            raise ValueError(f"lc2: frame {h}x{w} is too small for a {config.grid_mm} mm grid")
        frame = torch.from_numpy(np.ascontiguousarray(pixels[: self.hw[0] * f, : self.hw[1] * f]))
        frame = frame.to(device=mri.device, dtype=torch.float32)[None, None]
        self.us = F.avg_pool2d(frame / 255.0, f)[0, 0]
        self.weight = (F.avg_pool2d((frame > 0).float(), f)[0, 0] > 0.99).float()
        self.radius = max(2, int(round(config.radius_mm / (f * min(self.spacing)))))
        # working pixel (a, b) averages frame pixels f*a .. f*a + f - 1: its centre
        self.work_to_frame = np.diag([f, f, 1.0, 1.0])
        self.work_to_frame[:2, 3] = (f - 1) / 2.0
        self.windows = UltrasoundWindows(self.us, self.weight, self.radius)
        self.mri = mri if mri.is_floating_point() else mri.float()
        size = (mri.shape[4], mri.shape[3], mri.shape[2])
        self.to_normalised = spatial.index_to_normalised(size) @ world_to_voxel
        jj, ii = np.mgrid[: self.hw[0], : self.hw[1]]
        pixels = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)], 1)
        self.pixels = torch.as_tensor(pixels, dtype=torch.float32, device=mri.device)
        self.slice = plane_slice
        self._from_plane = None if plane_slice is None else np.linalg.inv(plane)
        self._host_volume = (self.mri[0, 0].contiguous().numpy()
                             if NUMBA_ON_CPU and self.mri.device.type == "cpu"
                             and self.mri.dtype == torch.float32 and self.mri.shape[:2] == (1, 1)
                             and plane_sample.available() else None)

    def resliced(self, planes: list[np.ndarray]) -> Tensor:
        """(B, H, W) the MRI on the working grid at each plane."""
        if self.slice is None:
            return self._from_volume(planes)
        maps = [self.slice.lattice_map(self._from_plane @ p, self.work_to_frame) for p in planes]
        flat = [i for i, a in enumerate(maps) if a is not None and self.slice.inside(a, self.hw)]
        if len(flat) == len(planes):
            return self.slice.sample(maps, self.hw)
        out = torch.empty((len(planes), *self.hw), dtype=torch.float32, device=self.mri.device)
        rest = sorted(set(range(len(planes))) - set(flat))
        if flat:
            out[flat] = self.slice.sample([maps[i] for i in flat], self.hw)
        out[rest] = self._from_volume([planes[i] for i in rest])
        return out

    def _from_volume(self, planes: list[np.ndarray]) -> Tensor:
        mats = np.stack([(self.to_normalised @ p @ self.work_to_frame)[:3].T for p in planes])
        if self._host_volume is not None:
            return torch.from_numpy(plane_sample.sample_planes(self._host_volume, mats, self.hw,
                                                               interior=RESLICE_INTERIOR))
        m = torch.as_tensor(mats, dtype=torch.float32, device=self.mri.device)
        grid = (self.pixels @ m).reshape(len(planes), 1, self.hw[0], self.hw[1], 3)
        src = self.mri.expand(len(planes), -1, -1, -1, -1)
        return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)[:, 0, 0]

    def scores(self, planes: list[np.ndarray]) -> Tensor:
        """(B,) LC2 of the frame against the MRI at each plane."""
        return self.windows.score(self.resliced(planes))


def in_plane_move(shift_mm: np.ndarray, angle_deg: float, centre_ij: np.ndarray,
                  spacing: tuple[float, float]) -> np.ndarray:
    """(4, 4) frame-pixel map of a rigid in-plane move: a rotation by ``angle_deg`` about pixel
    ``centre_ij`` then a shift of ``shift_mm`` (along columns, along rows), rigid in mm."""
    sp = np.array([spacing[0], spacing[1]], np.float64)
    a = math.radians(angle_deg)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c_mm = sp * np.asarray(centre_ij, np.float64)
    move = np.eye(4)
    move[:2, :2] = r * sp[None, :] / sp[:, None]  # S^-1 R S for S = diag(spacing)
    move[:2, 3] = (c_mm - r @ c_mm + np.asarray(shift_mm, np.float64)) / sp
    return move


def rigid_move(p: np.ndarray, centre_ij: np.ndarray, spacing: tuple[float, float],
               normal_mm_per_unit: float) -> np.ndarray:
    """(4, 4) frame-pixel map of ``p`` = (shift along columns, rows in mm, in-plane rotation deg,
    normal shift mm, tilt about the column axis deg, tilt about the row axis deg), rigid in mm,
    about frame pixel ``centre_ij``; :func:`in_plane_move` when the last three are 0.
    ``normal_mm_per_unit``: mm per unit of the plane's k axis."""
    inplane = in_plane_move(p[:2], p[2], centre_ij, spacing)
    if not (p[3] or p[4] or p[5]):
        return inplane
    s = np.diag([spacing[0], spacing[1], normal_mm_per_unit, 1.0])
    ax, ay = math.radians(p[4]), math.radians(p[5])
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    r = ry @ rx
    c = np.array([centre_ij[0] * spacing[0], centre_ij[1] * spacing[1], 0.0])
    t = np.eye(4)
    t[:3, :3] = r
    t[:3, 3] = c - r @ c + np.array([0.0, 0.0, p[3]])
    return np.linalg.inv(s) @ t @ s @ inplane


def pattern_search(score, p: np.ndarray, best: float, step: float, *, min_step: float,
                   max_rounds: int, above: float = 0.0) -> tuple[np.ndarray, float, float, int]:
    """Maximise ``score`` from parameters ``p`` (scoring ``best``) by a pattern search.

    Each round scores the moves of one ``step`` up and down each parameter from the best so far
    (``score``: a list of parameter vectors -> their scores, in one batch; a vector already scored
    is not scored again) and takes the best if it improves; otherwise the step halves. It runs
    while ``min_step <= step``, ``step > above`` and fewer than ``max_rounds`` rounds have run.
    Returns (p, best, the step reached, rounds).
    """
    seen: dict[tuple, float] = {}
    rounds = 0
    while min_step <= step and step > above and rounds < max_rounds:
        cands = []
        for k in range(len(p)):
            for sign in (1.0, -1.0):
                q = p.copy()
                q[k] += sign * step
                cands.append(q)
        # the pose a move came from is among its neighbours: scored already
        keys = [tuple(np.round(q, 9)) for q in cands]
        todo = [i for i, key in enumerate(keys) if key not in seen]
        if todo:
            for i, v in zip(todo, score([cands[i] for i in todo]), strict=True):
                seen[keys[i]] = v
        values = [seen[key] for key in keys]
        rounds += 1
        k = int(np.argmax(values))
        if values[k] > best:
            seen[tuple(np.round(p, 9))] = best
            best, p = values[k], cands[k]
        else:
            step /= 2.0
    return p, best, step, rounds


def _plane_slice(pixels: np.ndarray, plane: np.ndarray, mri: Tensor,
                 world_to_voxel: np.ndarray, config: Lc2Config) -> PlaneSlice | None:
    """The slice of ``plane`` a search's scorers share (None when ``config.plane_slice`` is
    off): :func:`regseg.lc2_slice.slice_for_frame` at the working grid."""
    if not config.plane_slice:
        return None
    return slice_for_frame(pixels.shape, plane, mri, world_to_voxel, config.grid_mm,
                           config.slice_margin_mm)


#: In-plane displacements (units of ``null_shift_mm``) of the refined plane whose LC2 is the
#: chance level a refinement must beat: four directions and two diagonals
NULL_SHIFTS = ((1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0), (0.75, 0.75), (-0.75, -0.75))


def refine_in_plane(pixels: np.ndarray, plane: np.ndarray, mri: Tensor,
                    world_to_voxel: np.ndarray, centre_ij: np.ndarray,
                    config: Lc2Config | None = None, *, arm_mm: float = 10.0,
                    warm: np.ndarray | None = None, warm_step: float = 0.5,
                    starts: list[np.ndarray] | None = None) -> Lc2Refinement:
    """Maximise LC2 over in-plane rigid moves of ``plane`` about frame pixel ``centre_ij`` (with
    ``config.out_of_plane``: over all six rigid parameters, :func:`rigid_move`).

    A :func:`pattern_search` over (shift along columns, along rows in mm, rotation in degrees):
    steps above ``coarse_above`` on a grid twice as coarse, then on the working grid down to
    ``min_step``. ``arm_mm``: the radius (about the gland's) at which a rotation's displacement
    is counted in ``move_mm``.

    ``warm``: a move to start from, e.g. the previous frame's; it is scored beside no move and
    the better starts the search, whose first step is then ``warm_step`` (on the fine grid when
    that is <= ``coarse_above``).

    ``starts``: in-plane moves (shift along columns, along rows mm, rotation deg) to search from
    instead of no move (a multi-start: a full search from each; the one kept is the most
    significant, each against the MRI displaced from its own optimum, since the highest raw LC2
    can sit where any pose scores high; ``move_mm`` and the cap are still measured from
    ``plane``). Not with ``warm``.
    """
    config = Lc2Config() if config is None else config
    n = 6 if config.out_of_plane else 3
    if (warm is not None or starts is not None) and n != 3:
        raise ValueError("lc2: a warm start or other starts are for the in-plane search only")
    if warm is not None and starts is not None:
        raise ValueError("lc2: a warm start and other starts are exclusive")
    if starts is not None and len(starts) == 0:
        raise ValueError("lc2: starts is empty; give at least one move to search from")
    normal = float(np.linalg.norm(plane[:3, 2]))
    if n == 6 and not normal > 1e-9:
        raise ValueError("lc2: the plane's third axis is zero; an out-of-plane search needs it")
    first_step = config.step if warm is None else min(config.step, warm_step)
    with torch.inference_mode():
        fine = FrameScorer(pixels, plane, mri, world_to_voxel, config,
                           plane_slice=_plane_slice(pixels, plane, mri, world_to_voxel, config))
        coarse = (FrameScorer(pixels, plane, mri, world_to_voxel, config, coarse=2,
                              plane_slice=fine.slice)
                  if first_step > config.coarse_above else None)
    spacing = fine.spacing

    def moved(p: np.ndarray) -> np.ndarray:
        if n == 3:
            return plane @ in_plane_move(p[:2], p[2], centre_ij, spacing)
        return plane @ rigid_move(p, centre_ij, spacing, normal)

    def on(scorer: FrameScorer):
        return lambda params: scorer.scores([moved(q) for q in params]).tolist()

    zero = np.zeros(n)

    def climb(p: np.ndarray, best: float, start: float) -> tuple[np.ndarray, float, float, int]:
        """(p, best, the start's score, rounds): the search from ``p``, scores on the working
        grid"""
        step, rounds = first_step, 0
        if coarse is not None:
            p, best, step, rounds = pattern_search(on(coarse), p, best, step,
                                                   min_step=config.min_step,
                                                   max_rounds=config.max_rounds,
                                                   above=config.coarse_above)
            start, best = on(fine)([zero, p])  # both again on the working grid
        p, best, step, more = pattern_search(on(fine), p, best, step, min_step=config.min_step,
                                             max_rounds=config.max_rounds - rounds)
        return p, best, start, rounds + more

    def significance_at(p: np.ndarray, best: float) -> float:
        """LC2 at ``p`` over the highest LC2 of the MRI displaced from it (NULL_SHIFTS)."""
        nulls = [p + np.r_[dx * config.null_shift_mm, dy * config.null_shift_mm,
                           np.zeros(n - 2)] for dx, dy in NULL_SHIFTS]
        chance = max(on(fine)(nulls))
        return best / chance if chance > 0 else math.inf

    with torch.inference_mode():
        first = on(coarse or fine)
        if starts is not None:
            seeds = [np.asarray(s, np.float64).reshape(3).copy() for s in starts]
            start, *values = first([zero, *seeds])
            climbs = [climb(s, v, start) for s, v in zip(seeds, values, strict=True)]
            rank = ([significance_at(c[0], c[1]) for c in climbs] if config.min_significance > 0
                    else [c[1] for c in climbs])
            p, best, start, _ = climbs[int(np.argmax(rank))]
            rounds = sum(c[3] for c in climbs)
        else:
            if warm is None:
                p, (best,) = zero, first([zero])
                start = best
            else:
                w = np.asarray(warm, np.float64).reshape(3)
                start, warm_score = first([zero, w])
                p, best = (w.copy(), warm_score) if warm_score > start else (zero, start)
            p, best, start, rounds = climb(p, best, start)
        significance = math.nan
        if config.min_significance > 0:
            significance = (max(rank) if starts is not None else significance_at(p, best))
    q = np.r_[p, np.zeros(6 - n)]  # (shifts, rotation, normal shift, tilts)
    move = float(np.linalg.norm(q[[0, 1, 3]])
                 + math.radians(abs(q[2]) + abs(q[4]) + abs(q[5])) * arm_mm)
    applied = (best > start and move <= config.max_move_mm
               and not significance < config.min_significance)
    return Lc2Refinement(image_to_mri=moved(p) if applied else plane, score_start=start,
                         score=best if applied else start,
                         shift_mm=(float(q[0]), float(q[1])), rotation_deg=float(q[2]),
                         move_mm=move, rounds=rounds, applied=applied,
                         significance=float(significance),
                         out_of_plane=(float(q[3]), float(q[4]), float(q[5])))
