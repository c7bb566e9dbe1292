"""What one frame cannot see: a 3-D consensus of the recent frames' corrections.

Each frame's registration (the network, then ``--lc2``) corrects its plane **in plane** only: an
error along the plane's normal leaves the ultrasound matching an MRI slice a few mm away, and no
single-frame cue sees it (README "Image-based refinement", out of plane). But the errors that
matter most in a case -- the MRI-to-patient registration, a tracker's offset -- are the same 3-D
error in every frame, and a sweep of the probe shows it from several orientations: what is out of
plane for one frame is in plane for another.

:class:`PlaneConsensus` keeps up to ``keyframes`` frames whose planes differ (a new keyframe when
the plane has turned >= ``min_turn_deg`` or moved >= ``min_move_mm`` from the last one; else the
last one is replaced). Each holds the in-plane projector ``P_i = I - n_i n_i^T`` of its plane and
the 3-D correction ``d_i`` its registration applied at the registered gland's centre (published
point minus tracked point, MRI mm). The consensus shift is the ridge least-squares solution

    t = (sum_i P_i + ridge * I)^-1  sum_i P_i d_i,

so a direction no keyframe sees in plane stays near 0 (a fan of nearly parallel planes says
nothing about their common normal). Its fit residual (rms of ``P_i (d_i - t)``) says, only
roughly, whether the corrections are one 3-D shift: a per-frame error that turns with the probe
fitted with misfits of 1-4 mm in the diagnosis, as constant shifts did; only nonsense exceeds the
gate. The fit holds when the residual is <=
``max_residual_mm`` over >= ``min_keyframes`` keyframes and (``image_gate``, the default since
addendum 19 of bench/results/lc2_predeclared.md) one 3-D shift explains the corrections better
than one in-plane offset fixed to the probe -- what a tracking or probe-calibration error that
turns with the probe gives, and what says nothing about the normal (without the gate such errors
were fitted as a shift and flagged good frames after a sweep: session 22). While it holds,
``out_of_plane_mm`` of a frame is
``|t . n|``: how far the consensus puts the frame's published plane along its normal. Above
``flag_mm`` the frame is flagged ``out_of_plane`` (regseg.stream.pipeline): it is not corrected,
only not vouched for. With ``suggest`` (``--consensus suggest``), :meth:`suggest` gives the
registration the fit implies, which goes out for the operator (OpenIGTLink
``SuggestedMRIToRef``), never applied by regseg: opt-in, because the fit also holds on errors
that are not one 3-D shift. With ``strict`` (``--consensus strict``) a frame is flagged
``sweep_pending`` until the sweep has been made: fewer than ``min_keyframes`` distinct planes since
the registration, or corrections no model fits (residual over the gate); until the probe has swept
after a registration, its error along the normal is not verified by anything (session 22: the flag's
misses on new family-A phantoms were such frames). A new ``reference_to_mri`` (a new
registration) clears the keyframes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

#: ``--consensus``: decided by addendum 8 of bench/results/lc2_predeclared.md.
CONSENSUS_DEFAULT = "on"
#: suggest: on, and publish the suggested registration; strict: on, and flag ``sweep_pending``
#: while the consensus has not formed (an option, README "Out of plane: the consensus of a sweep")
CONSENSUS_MODES = ("on", "suggest", "strict", "off")
#: Bench-only modes (not ``--consensus`` choices), as ConsensusConfig changes: ``ungated``, the
#: consensus before addendum 19 (the estimate held on the misfit alone); ``gated``, the name
#: addendum 19 measured the image gate under, now the same as ``on``
BENCH_MODES = {"ungated": {"image_gate": False}, "gated": {"image_gate": True}}


@dataclass(frozen=True)
class ConsensusConfig:
    keyframes: int = 24
    min_keyframes: int = 6
    min_turn_deg: float = 3.0
    min_move_mm: float = 3.0
    ridge: float = 2.0
    max_residual_mm: float = 4.0
    flag_mm: float = 3.0
    suggest: bool = False  # publish the registration the fit implies (--consensus suggest)
    #: flag ``sweep_pending`` while the estimate does not hold (--consensus strict): the
    #: registration's out-of-plane direction is not verified until a sweep has formed it
    strict: bool = False
    #: hold the estimate only when its misfit is below that of the probe-fixed model: one in-plane
    #: offset in every frame's own axes (what a probe-calibration error, or a tracking error that
    #: turns with the probe, gives), which says nothing about the normal; on since addendum 19
    image_gate: bool = True


@dataclass(frozen=True)
class ConsensusEstimate:
    shift_mm: np.ndarray  # (3,) t, MRI mm (NaN when there is no estimate)
    residual_mm: float  # rms in-plane misfit of the keyframes' corrections to t
    keyframes: int
    probe_residual_mm: float = math.nan  # the same of the probe-fixed model (image_gate)

    @property
    def holds(self) -> bool:
        return bool(np.isfinite(self.shift_mm).all())


class PlaneConsensus:
    """See the module docstring. ``update`` per registered frame, then ``out_of_plane_mm``."""

    def __init__(self, config: ConsensusConfig = ConsensusConfig()) -> None:
        self.config = config
        self._frames: deque = deque(maxlen=config.keyframes)  # (normal, centre, P, d, axes)
        self.estimate = ConsensusEstimate(np.full(3, np.nan), math.nan, 0)

    def reset(self) -> None:
        self._frames.clear()
        self.estimate = ConsensusEstimate(np.full(3, np.nan), math.nan, 0)

    def update(self, tracked: np.ndarray, published: np.ndarray,
               centre_ij: tuple[float, float] | None) -> ConsensusEstimate:
        """Add a frame: its tracked and published planes (4, 4: pixel -> MRI mm) and the pixel
        its correction is measured at (the registered gland's centre; None: nothing added)."""
        if centre_ij is not None:
            c = np.array([centre_ij[0], centre_ij[1], 0.0, 1.0])
            point = (published @ c)[:3]
            d = point - (tracked @ c)[:3]
            n = np.cross(published[:3, 0], published[:3, 1])
            norm = float(np.linalg.norm(n))
            if norm > 0 and np.isfinite(d).all():
                n = n / norm
                projector = np.eye(3) - np.outer(n, n)
                # the plane's own orthonormal in-plane axes (columns, then rows)
                u = published[:3, 0] / np.linalg.norm(published[:3, 0])
                axes = np.stack([u, np.cross(n, u)])
                last = self._frames[-1] if self._frames else None
                if last is not None and not self._distinct(last, n, point):
                    # the newest measurement, at the keyframe's pose (which stays the reference,
                    # so that a slow sweep still adds keyframes)
                    self._frames[-1] = (last[0], last[1], projector, d, axes)
                else:
                    self._frames.append((n, point, projector, d, axes))
        self.estimate = self._solve()
        return self.estimate

    def out_of_plane_mm(self, published: np.ndarray) -> float:
        """|t . n| of the plane ``published``: NaN while the consensus does not hold."""
        est = self.estimate
        if not est.holds:
            return math.nan
        n = np.cross(published[:3, 0], published[:3, 1])
        return float(abs(est.shift_mm @ n) / np.linalg.norm(n))

    def assess(self, tracked: np.ndarray, published: np.ndarray,
               warped_labels: np.ndarray) -> float:
        """:meth:`update` with the frame, its correction measured at the registered MRI gland's
        centre (nothing added without one), then :meth:`out_of_plane_mm` of ``published``."""
        m = cv2.moments((warped_labels > 0).view(np.uint8), binaryImage=True)
        centre = (m["m10"] / m["m00"], m["m01"] / m["m00"]) if m["m00"] > 0 else None
        self.update(tracked, published, centre)
        return self.out_of_plane_mm(published)

    def suggest(self, reference_to_mri: np.ndarray) -> np.ndarray | None:
        """The registration the consensus suggests, ``T(t) @ reference_to_mri`` (Reference mm ->
        MRI mm), or None while it does not hold or ``config.suggest`` is off. Only a suggestion:
        regseg never applies it; the operator may (README "Out of plane: the consensus of a
        sweep")."""
        if not (self.config.suggest and self.estimate.holds):
            return None
        move = np.eye(4)
        move[:3, 3] = self.estimate.shift_mm
        return move @ reference_to_mri

    def info(self) -> dict:
        """The last estimate, for the run's summary (``--stats-json`` ``consensus_estimate``)."""
        est = self.estimate
        return {"holds": est.holds, "keyframes": est.keyframes,
                "shift_mm": [round(float(v), 3) for v in est.shift_mm] if est.holds else None,
                "residual_mm": (round(est.residual_mm, 3) if math.isfinite(est.residual_mm)
                                else None)}

    def flags(self, out_of_plane_mm: float) -> bool:
        return out_of_plane_mm > self.config.flag_mm  # NaN compares False

    def reasons(self, out_of_plane_mm: float) -> tuple[str, ...]:
        """The frame's flags from the consensus: ``out_of_plane`` above ``flag_mm``; with
        ``strict``, ``sweep_pending`` while :meth:`pending`."""
        if self.flags(out_of_plane_mm):
            return ("out_of_plane",)
        return ("sweep_pending",) if self.config.strict and self.pending() else ()

    def status(self) -> tuple[int, bool]:
        """(distinct planes since the registration, :meth:`pending`): what the operator is told
        in every mode (overlay corner, ZeroMQ ``sweep_planes`` / ``sweep_pending``, OpenIGTLink
        ``SweepPlanes`` / ``SweepPending``); only ``strict`` turns pending into a flag."""
        return self.estimate.keyframes, self.pending()

    def pending(self) -> bool:
        """Has the sweep not been made yet? Fewer than ``min_keyframes`` distinct planes since the
        registration, or corrections that no model fits (misfit above ``max_residual_mm``). Not
        the same as "the estimate does not hold": after a sweep whose corrections a probe-fixed
        offset explains as well (none at all, for one), the image gate holds no estimate, yet the
        sweep has been made and said the registration needs nothing along the normals it saw."""
        est = self.estimate
        return est.keyframes < self.config.min_keyframes or not (
            est.residual_mm <= self.config.max_residual_mm)

    def _distinct(self, last, n: np.ndarray, point: np.ndarray) -> bool:
        turn = math.degrees(math.acos(min(1.0, abs(float(last[0] @ n)))))
        return (turn >= self.config.min_turn_deg
                or float(np.linalg.norm(point - last[1])) >= self.config.min_move_mm)

    def _solve(self) -> ConsensusEstimate:
        cfg, frames = self.config, list(self._frames)
        if len(frames) < cfg.min_keyframes:
            return ConsensusEstimate(np.full(3, np.nan), math.nan, len(frames))
        p = np.stack([f[2] for f in frames])  # (k, 3, 3) in-plane projectors
        d = np.stack([f[3] for f in frames])  # (k, 3) corrections
        t = np.linalg.solve(p.sum(0) + cfg.ridge * np.eye(3), np.einsum("kij,kj->i", p, d))
        misfit = np.einsum("kij,kj->ki", p, d - t)
        residual = math.sqrt(float(np.mean(np.sum(misfit ** 2, axis=1))))
        probe = math.nan
        if cfg.image_gate:  # one offset in every frame's own axes: its mean is the fit
            local = np.einsum("kaj,kj->ka", np.stack([f[4] for f in frames]), d)  # (k, 2)
            probe = math.sqrt(float(np.mean(np.sum((local - local.mean(0)) ** 2, axis=1))))
        if residual > cfg.max_residual_mm or (cfg.image_gate and not residual < probe):
            return ConsensusEstimate(np.full(3, np.nan), residual, len(frames), probe)
        return ConsensusEstimate(t, residual, len(frames), probe)


def build_consensus(mode: str) -> PlaneConsensus | None:
    """``--consensus``'s stage: a PlaneConsensus for "on" (or a bench mode), None for "off"."""
    if mode not in (*CONSENSUS_MODES, *BENCH_MODES):
        raise ValueError(f"consensus {mode!r}: expected one of {CONSENSUS_MODES} or 'default'")
    if mode == "off":
        return None
    return PlaneConsensus(ConsensusConfig(suggest=mode == "suggest", strict=mode == "strict",
                                          **BENCH_MODES.get(mode, {})))
