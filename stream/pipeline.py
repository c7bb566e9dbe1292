"""Per frame: reslice the MRI at the frame's plane, register, warp labels, segment, overlay.

The tensor work of a frame is :class:`~regseg.stream.chain.FrameChain` (stream/chain.py): the same
functions on CPU and GPU, fed a uint8 frame and two 3x3 plane matrices, so it runs in order on the
CPU and overlapped in a :class:`~regseg.stream.device_ring.DeviceRing` (optionally one CUDA graph)
on the GPU. The host does what needs numpy or OpenCV: plane matrices before, overlay and quality
after."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from regseg import spatial
from regseg.clock import now_ns
from regseg.engines.fusion import FusionEngine
from regseg.stream.capture import Capture, warp_labels
from regseg.stream.chain import FrameChain, plane_matrices
from regseg.stream.context import MriContext, untracked_plane
from regseg.stream.overlap import HostWorker
from regseg.stream.overlay import compose_overlay
from regseg.stream.quality import (
    QualityCheck,
    agreement,
    lesion_target,
    pipeline_chain,
    seg_confidence,
)
from regseg.stream.resegment import segment_published
from regseg.stream.seg_prior import published_labels
from regseg.stream.stage_threads import deform_ahead, deform_now, deformed
from regseg.types import Frame, Result

STAGES = ("prepare", "model", "warp_labels", "segment", "overlay")  # Result.timings_ms + total
HOST_STAGES = ("quality",)  # host stages after the chain (regseg.stream.quality), then overlay
#: How often to collect finished frames in flight: the GPU ring's hand-offs every 0.25 ms; the CPU
#: overlap's worker every 1 ms (a wake-up takes the GIL from the two working threads; 0.5 ms wait)
RING_POLL_S, OVERLAP_POLL_S = 0.00025, 0.001


class Pipeline:
    """Turns a Frame into a Result. One instance per stream; its only state across frames is the
    capture's temporal filter (``capture``, :class:`regseg.stream.capture.Capture`).

    Every Result is assessed by ``quality`` (:class:`regseg.stream.quality.QualityCheck`): an
    estimate of the registration error in mm, the segmentation's confidence, and flag reasons
    (:data:`regseg.stream.quality.FLAG_REASONS`; ``disagreement``: ``quality``, the Dice of the
    registered MRI vs the segmented gland, below ``quality_threshold``). A flagged Result is not
    published as truth (no MRIToImage, no MRI labels, overlay marked UNVERIFIED); without image,
    gland or pose its predicted labels are emptied too.

    On a CUDA device the tensor stages run in a :class:`DeviceRing` of ``ring_slots`` slots
    (``cuda_graph``: the chain captured as one graph; ``preprocess="cupy"``: CuPy converts the
    frame). :meth:`submit` keeps up to ``ring_slots`` frames in flight, :meth:`poll` returns the
    finished ones without waiting, :meth:`flush` waits for all; ``__call__`` waits for its own
    frame. On the CPU the stages run in order and :meth:`submit` returns the frame's Result.
    """

    def __init__(self, context: MriContext, engine: FusionEngine, *,
                 reference_to_mri: np.ndarray | None = None,
                 quality_threshold: float = 0.5, ring_slots: int = 3,
                 cuda_graph: bool = False, preprocess: str = "torch",
                 deformable: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
                 | None = None, capture: Capture | None = None,
                 quality: QualityCheck | None = None, segmenter: Any = None,
                 do_no_harm: Any = None, roi: Any = None, overlap: bool = False,
                 lc2: Any = None, resegment: bool = False, consensus: Any = None,
                 intensity: Any = None, seg_window: Any = None, seg_tta: bool = False,
                 seg_prior: str | None = None, scanner_adapt: Any = None,
                 stage_threads: Any = None, seg_fallback: str | None = None) -> None:
        if overlap and roi is not None:
            raise ValueError("overlap with a gland window (roi) is not supported: the window of "
                             "a frame depends on the previous frame's flags")
        # segmenter: an optional segmentation stage instead of the U-Net head (stream/segmenter.py)
        self.context, self.segmenter, self.engine, self.device = (context, segmenter, engine,
                                                                  engine.device)
        self.reference_to_mri = np.eye(4) if reference_to_mri is None else reference_to_mri
        self.quality_threshold = quality_threshold
        self._ring_options = dict(slots=ring_slots, cuda_graph=cuda_graph, preprocess=preprocess)
        self._chains: dict[tuple[int, int], FrameChain] = {}
        self._rings: dict[tuple[int, int], object] = {}  # per frame size, as the chains
        # deformable (DeformableStage): (pixels, image_to_mri) -> (warped labels, ddf); capture
        # (regseg.stream.capture): refinement and multi-start inside the FrameChain, the temporal
        # filter's start and finish here; quality (regseg.stream.quality): made on first use
        self.deformable, self._quality = deformable, quality
        self.capture = capture if capture is not None else Capture()
        # Optional stages (regseg.stream.*), None when off: --do-no-harm (CorrectionGate), --roi
        # (GlandRoi), --lc2 (Lc2Stage; Lc2Lagged), --consensus (PlaneConsensus: out_of_plane),
        # --intensity (IntensityMatch: the stages read the frame with its grey levels matched; the
        # overlay, no_content and the Result keep it as received), --scanner-adapt (ScannerAdapt;
        # seg_engine: with "segmentation", the adapted network for the resegment pass only)
        self.do_no_harm, self.roi, self.lc2, self.consensus = do_no_harm, roi, lc2, consensus
        self.intensity, self.scanner_adapt, self.seg_engine = intensity, scanner_adapt, None
        # --resegment: segment in _settle, not in the chain; --seg-window: the GlandRoi whose
        # window that pass runs on; --seg-tta flip: a mirror pass too (regseg.stream.resegment);
        # --seg-prior on|gated: the MRI labels pooled with its logits, --seg-fallback mri: them
        # instead after a failed estimate check (stream/seg_prior.py);
        # --stage-threads 2 (stage_threads.py); --overlap (overlap.py): close() ends their threads
        self.resegment, self.seg_window, self.seg_tta = bool(resegment), seg_window, bool(seg_tta)
        self.seg_prior, self.seg_fallback = seg_prior, seg_fallback
        self.stage_threads, self._worker = stage_threads, None
        self.overlap = bool(overlap) and self.device.type != "cuda"

    @property
    def quality(self) -> QualityCheck:
        """The per-frame quality check (the shipped QualityNet and its calibration by default)."""
        if self._quality is None:
            self._quality = QualityCheck(self.context)
        if self._quality.chain is None:  # the threshold calibrated on the chain this one runs
            self._quality.bind_chain(pipeline_chain(self))
        return self._quality

    def set_reference_to_mri(self, reference_to_mri: np.ndarray) -> None:
        """Use ``reference_to_mri`` ((4, 4), Reference mm -> MRI RAS mm) from the next frame on.

        Safe from any thread (e.g. an OpenIGTLink reader with Slicer's MRIToReference): a copy is
        swapped in with one attribute assignment, so a frame in flight keeps the matrix it read.
        """
        matrix = np.array(reference_to_mri, dtype=np.float64)
        if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
            raise ValueError(f"reference_to_mri: shape {matrix.shape}, finite (4, 4) expected")
        self.reference_to_mri = matrix
        if self.consensus is not None:  # a new registration: the old corrections say nothing
            self.consensus.reset()

    def plane(self, frame: Frame) -> np.ndarray:
        """The frame's tracked plane in MRI world (pixel (i, j, 0) -> mm)."""
        if frame.image_to_reference is None:
            return untracked_plane(self.context, frame.pixels.shape, frame.spacing_mm)
        return self.reference_to_mri @ frame.image_to_reference

    def chain(self, frame_hw: tuple[int, int]) -> FrameChain:
        """The FrameChain for a frame size (made on first use)."""
        key = (int(frame_hw[0]), int(frame_hw[1]))
        if key not in self._chains:
            self._chains[key] = FrameChain(self.context, self.engine, key,
                                           segmenter=self.segmenter, seg_engine=self.seg_engine,
                                           **self.capture.chain_options())
        return self._chains[key]

    def _ring(self, frame_hw: tuple[int, int]):
        key = (int(frame_hw[0]), int(frame_hw[1]))
        if key not in self._rings:
            from regseg.stream.device_ring import DeviceRing

            self._rings[key] = DeviceRing(self.chain(key), **self._ring_options)
        return self._rings[key]

    def __call__(self, frame: Frame) -> Result:
        """The Result of ``frame``, waited for (not mixed with :meth:`submit` on a GPU or with
        ``overlap``: it runs at once, ahead of any frame in flight)."""
        if self.device.type != "cuda":
            return self._restore(self._complete(*self._run_cpu_affine(self._crop(frame))))
        return (self.submit(frame) + self.flush())[-1]

    def submit(self, frame: Frame) -> list[Result]:
        """Start ``frame``; returns the Results that completed (oldest first, maybe none). On
        the CPU the frame runs at once; with ``overlap`` its host half goes to the worker thread
        (blocking while one already waits) and the worker's finished Results are returned."""
        frame = self._crop(frame)
        if self.overlap:
            settled = self._run_cpu_affine(frame)
            queued = now_ns()
            self._host_worker().submit(
                lambda: self._restore(self._complete(*settled, queued_ns=queued)))
            return self._worker.done()
        if self.device.type != "cuda":
            return [self._restore(self._complete(*self._run_cpu_affine(frame)))]
        start = self._start(frame)
        done = self._ring(frame.pixels.shape).push(frame, start, self._mats(frame, start))
        return [self._restore(self._finish(*item)) for item in done]

    def poll(self) -> list[Result]:
        """The Results of frames in flight that have finished, without waiting (oldest first).

        With ``overlap``, a frame whose host half raised raises here (that frame only)."""
        if self._worker is not None:
            return self._worker.done()
        return [self._restore(self._finish(*i)) for r in self._rings.values() for i in r.poll()]

    def flush(self) -> list[Result]:
        """Wait for every frame in flight; their Results, oldest first (with ``overlap``, up to
        the first frame that failed, which raises: call again while :attr:`in_flight`)."""
        if self._worker is not None:
            return self._worker.wait()
        return [self._restore(self._finish(*i)) for r in self._rings.values() for i in r.flush()]

    @property
    def accepting(self) -> bool:
        """Whether a submitted frame would start at once (not while the overlap's worker waits)."""
        return self._worker is None or self._worker.accepting

    @property
    def poll_interval_s(self) -> float:
        """How often to :meth:`poll` with frames in flight (RING_POLL_S, OVERLAP_POLL_S)."""
        return OVERLAP_POLL_S if self.overlap else RING_POLL_S

    @property
    def in_flight(self) -> int:
        """Frames submitted whose Results are not returned yet (0 on the CPU unless overlap)."""
        return ((0 if self._worker is None else self._worker.in_flight)
                + sum(ring.in_flight for ring in self._rings.values()))

    def close(self) -> None:
        """Stop the overlap and stage workers, if any (a later submit starts new ones)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        for part in (self.stage_threads, self.lc2, self.deformable):  # their threads (async)
            if hasattr(part, "close"):
                part.close()

    def _host_worker(self):
        self._worker = HostWorker() if self._worker is None else self._worker
        return self._worker

    def _crop(self, frame: Frame) -> Frame:  # the window (GlandRoi.cut), the grey levels
        if self.intensity is not None:
            self.intensity.observe(frame.pixels)
        tracked = None if self.roi is None else self.plane(frame)
        if tracked is not None:
            frame = self.roi.cut(frame, tracked, self.capture.predicted(frame, tracked))
        frame = frame if self.intensity is None else self.intensity.enter(frame)
        return frame if self.scanner_adapt is None else self.scanner_adapt.enter(self, frame)

    def _restore(self, result: Result) -> Result:  # a cropped frame's Result onto the frame
        return result if self.roi is None else self.roi.leave(result)

    def _start(self, frame: Frame) -> np.ndarray:
        """The plane the chain registers from: tracked, moved by the temporal filter's prior
        (the filter sees whole frames: a window's plane is its whole frame's, shifted)."""
        whole, shift = self._whole(frame)
        tracked = self.plane(whole)
        return tracked @ spatial.lift_2d(self.capture.start(whole, tracked)) @ shift

    def _whole(self, frame: Frame) -> tuple[Frame, np.ndarray]:  # see GlandRoi.whole
        frame = frame if self.intensity is None else self.intensity.original(frame)
        return (frame, np.eye(4)) if self.roi is None else self.roi.whole(frame)

    def _mats(self, frame: Frame, tracked: np.ndarray) -> np.ndarray:
        return plane_matrices(self.context, tracked, frame.pixels.shape, self.engine.size)

    def _run_cpu_affine(self, frame: Frame) -> tuple:
        """The affine half of a frame on the CPU: the chain, then :meth:`_settle`."""
        chain = self.chain(frame.pixels.shape)
        t = [now_ns()]
        tracked = self._start(frame)
        mats = torch.from_numpy(self._mats(frame, tracked))
        with torch.inference_mode():
            inputs = chain.prepare(torch.from_numpy(frame.pixels), mats)
            t.append(now_ns())
            theta, logits = chain.model(*inputs, mats, need_logits=not self.resegment)
            theta = theta.clone()
            t.append(now_ns())
            # The deformable stage and the temporal filter each warp the labels again through the
            # plane they publish; the chain's affine warp would be thrown away: skip it.
            replaced = self.deformable is not None or self.capture.temporal is not None
            warped = None if replaced else chain.warp_labels(theta, mats).numpy()
            t.append(now_ns())
            labels, seg_conf = None, math.nan  # with resegment: made in _settle
            if not self.resegment:
                logits = chain.seg_logits(inputs, theta, logits)
                labels = chain.segment(logits).numpy()
                seg_conf = seg_confidence(logits)
            t.append(now_ns())
        timings = {n: (t[i + 1] - t[i]) / 1e6 for i, n in enumerate(STAGES[:-1])
                   if n != "warp_labels" or warped is not None}
        timings["quality"] = (now_ns() - t[-1]) / 1e6
        return self._settle(frame, tracked, theta.numpy(), labels, warped, timings, t[0],
                            seg_conf=seg_conf)

    def _finish(self, frame: Frame, tracked: np.ndarray, theta: np.ndarray, labels: np.ndarray,
                warped_labels: np.ndarray | None, timings: dict[str, float],
                start_ns: int, *, seg_conf: float = math.nan) -> Result:
        """Host side, from the chain's outputs (``tracked``: the plane it started from)."""
        return self._complete(*self._settle(frame, tracked, theta, labels, warped_labels,
                                            timings, start_ns, seg_conf=seg_conf))

    def _settle(self, frame: Frame, tracked: np.ndarray, theta: np.ndarray, labels: np.ndarray,
                warped_labels: np.ndarray | None, timings: dict[str, float],
                start_ns: int, *, seg_conf: float = math.nan) -> tuple:
        """The registered plane of the frame, through the temporal filter: the last step that
        carries state to the next frame, so it runs in frame order on the submitting thread.
        Returns :meth:`_complete`'s arguments."""
        hw = frame.pixels.shape
        theta_px = spatial.theta_to_pixel(np.asarray(theta, np.float64).reshape(2, 3), hw)
        image_to_mri = tracked @ spatial.lift_2d(theta_px)
        lc2, seg_logits = (math.nan, math.nan), None  # lc2: (move mm, significance)
        whole, shift = self._whole(frame)  # the tracked plane: self.plane(whole) @ shift
        if self.lc2 is not None:
            t_lc2 = now_ns()
            image_to_mri, *lc2 = self.lc2(frame.pixels, image_to_mri,
                                          tracked=self.plane(whole) @ shift)
            timings = {**timings, "lc2": (now_ns() - t_lc2) / 1e6, **self.lc2.timings()}
        if self.capture.temporal is not None:
            t_cap = now_ns()
            image_to_mri, jump_mm = self.capture.finish(
                whole, self.plane(whole), image_to_mri @ spatial.invert(shift))
            image_to_mri = image_to_mri @ shift
            if self.deformable is None:  # the chain warped through the unfiltered plane
                warped_labels = warp_labels(self.context, image_to_mri, hw)
            timings = {**timings, "temporal": (now_ns() - t_cap) / 1e6}
        else:
            jump_mm = math.nan
        ahead = deform_ahead(self, frame.pixels, image_to_mri)  # --stage-threads 2, or None
        if self.resegment:  # the segmentation's MRI context at the plane published
            t_seg = now_ns()
            labels, seg_conf, seg_logits = segment_published(self, frame, image_to_mri)
            timings = {**timings, "resegment": (now_ns() - t_seg) / 1e6}
        return (frame, image_to_mri, jump_mm, labels, warped_labels, timings, start_ns, seg_conf,
                tuple(lc2), seg_logits, ahead)

    def _complete(self, frame: Frame, image_to_mri: np.ndarray, jump_mm: float,
                  labels: np.ndarray, warped_labels: np.ndarray | None,
                  timings: dict[str, float], start_ns: int, seg_conf: float,
                  lc2: tuple[float, float] = (math.nan, math.nan), seg_logits: Any = None,
                  ahead: Any = None, *, queued_ns: int | None = None) -> Result:
        """The host half: do-no-harm, the deformable stage, quality, overlay, the Result.
        ``queued_ns``: when the affine half handed it over (``overlap``): the wait is timed as
        ``handoff``; ``seg_logits``: the resegmentation's, for ``--seg-prior``; ``ahead``: the
        deformable stage already started (regseg.stream.stage_threads.deform_ahead)."""
        hw = frame.pixels.shape
        shown = frame if self.intensity is None else self.intensity.leave(frame)  # as received
        if queued_ns is not None:
            timings = {**timings, "handoff": (now_ns() - queued_ns) / 1e6}
        decision, deform = None, self.deformable is not None
        if self.do_no_harm is not None and frame.image_to_reference is not None:
            t_gate = now_ns()
            plane = self.plane(frame)
            decision = self.do_no_harm(self.quality.estimator, frame.pixels, plane,
                                       image_to_mri, continues=math.isfinite(jump_mm),
                                       tracked_max_mm=self.quality.lowest_threshold_mm)
            if decision.correction == "tracked":  # the identity correction is published
                image_to_mri = plane
                deform = deform and self.do_no_harm.deformable_on_tracked
                if not deform:
                    warped_labels = warp_labels(self.context, image_to_mri, hw)
            timings = {**timings, "do_no_harm": (now_ns() - t_gate) / 1e6}
        tracked_only = decision is not None and decision.correction == "tracked"
        ddf = None
        if deform and ahead is not None:
            (warped_labels, ddf), timings = deformed(ahead, timings)
        elif deform:  # in order (--deformable async: the network's part on its worker)
            (warped_labels, ddf), timings = deform_now(self, frame.pixels, image_to_mri, timings)
        t_q = now_ns()
        check = self.quality.assess(frame.pixels, frame.spacing_mm,
                                    frame.image_to_reference is not None, labels, warped_labels,
                                    image_to_mri, seg_conf, jump_mm,
                                    threshold_mm=(self.quality.lowest_threshold_mm
                                                  if tracked_only else None),
                                    content_pixels=shown.pixels)
        quality = agreement(warped_labels > 0, labels > 0)  # NaN (no gland) compares False
        flags = check.flags + (("disagreement",) if quality < self.quality_threshold else ())
        if self.lc2 is not None and self.lc2.unsupported(lc2[1]):  # NaN: not computed, no flag
            flags += ("lc2_unsupported",)
        oop, suggestion, sweep = math.nan, None, (-1, None)
        if self.consensus is not None and check.publish_labels:  # tracked, with image and gland
            whole, shift = self._whole(shown)
            oop = self.consensus.assess(self.plane(whole) @ shift, image_to_mri, warped_labels)
            flags += self.consensus.reasons(oop)  # out_of_plane; strict: sweep_pending
            suggestion = self.consensus.suggest(self.reference_to_mri)
        sweep = sweep if self.consensus is None else self.consensus.status()
        flags, estimate_check = self.quality.self_checked(frame.pixels, image_to_mri,
                                                          frame.spacing_mm, flags)
        t0 = now_ns()
        timings = {**timings, "quality": timings.get("quality", 0.0) + (t0 - t_q) / 1e6}
        if not check.publish_labels:  # no image, no gland or no pose: no labels go out
            labels, source = np.zeros_like(labels), "withheld"
        else:  # the checks saw the network's labels; --seg-fallback / --seg-prior publish others
            labels, source, timings = published_labels(
                self, frame, seg_logits, labels, warped_labels, flags, estimate_check, timings)
            t0 = now_ns()
        target = lesion_target(warped_labels)
        margin_px = check.margin_mm / float(np.mean(frame.spacing_mm))
        overlay = compose_overlay(shown.pixels, labels, warped_labels, flags=flags,
                                  target_ij=target, margin_px=margin_px, error_mm=check.error_mm,
                                  tracking_only=tracked_only, sweep=sweep,
                                  estimate_check=estimate_check)
        end = now_ns()
        timings = {**timings, "overlay": (end - t0) / 1e6, "total": (end - start_ns) / 1e6}
        return Result(
            frame=shown, mri_to_image=spatial.invert(image_to_mri), warped_labels=warped_labels,
            labels=labels, overlay=overlay, quality=quality, flagged=bool(flags),
            timings_ms=timings, ddf=ddf, error_mm=check.error_mm,
            seg_confidence=check.seg_confidence, flags=flags, target_ij=target,
            target_margin_mm=check.margin_mm, jump_mm=jump_mm,
            correction="tracked" if tracked_only else "registered",
            error_tracked_mm=math.nan if decision is None else decision.error_tracked_mm,
            error_registered_mm=(math.nan if decision is None
                                 else decision.error_registered_mm),
            lc2_move_mm=lc2[0], lc2_significance=lc2[1], out_of_plane_mm=oop,
            suggested_reference_to_mri=suggestion, labels_source=source,
            sweep_planes=sweep[0], sweep_pending=sweep[1], estimate_check=estimate_check,
        )
