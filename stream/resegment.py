"""The segmentation at the published plane (``--resegment``), optionally on a gland window
(``--seg-window``).

``--resegment on`` segments the frame with the MRI and its labels resliced at the plane that is
published (after ``--lc2`` and the temporal filter). ``--seg-window auto`` additionally runs that
one segmentation pass on a window around the gland where the published registration puts it (the
window of ``--roi auto``: :meth:`regseg.stream.roi.GlandRoi.window`, 1.8 x the MRI gland's
diameter), so the network sees a gland in a wide view at the scale it was trained at; the labels
are pasted back into the whole frame (nothing is labelled outside the window). Unlike ``--roi
auto`` the registration, the error estimate and everything else keep the whole view: only the
segmentation changes. A frame not wider than the window (family A's own) is segmented whole.

``--seg-window fuse`` segments both the whole view and the window and averages their class
probabilities inside the window (the whole view's alone outside it): two scales of one network,
so a window centred off the gland (a registration that has not captured) costs at most half a
vote inside it and nothing outside.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from regseg.engines.segmentation import argmax_labels
from regseg.stream.chain import plane_matrices
from regseg.stream.quality import seg_confidence
from regseg.types import Frame

SEG_WINDOW_MODES = ("auto", "fuse", "off")
SEG_WINDOW_DEFAULT = "off"


def _logits(pipeline, pixels: np.ndarray, plane: np.ndarray):
    chain = pipeline.chain(pixels.shape)
    mats = torch.from_numpy(plane_matrices(pipeline.context, plane, pixels.shape,
                                           pipeline.engine.size)).to(pipeline.device)
    return chain, chain.resegment(torch.from_numpy(pixels).to(pipeline.device), mats)


def segment_published(pipeline, frame: Frame, image_to_mri: np.ndarray) -> tuple[np.ndarray,
                                                                                  float]:
    """(labels (H, W) uint8, seg confidence) of ``frame`` with the MRI context at
    ``image_to_mri``, on ``pipeline.seg_window``'s window when it has one for the frame
    (its ``fuse``: both scales, averaged in the window)."""
    window = None if pipeline.seg_window is None else pipeline.seg_window.window(frame,
                                                                                  image_to_mri)
    fuse = window is not None and pipeline.seg_window.fuse
    with torch.inference_mode():
        if window is None or fuse:
            chain, logits = _logits(pipeline, frame.pixels, image_to_mri)
            if not fuse:
                return chain.segment(logits).cpu().numpy(), seg_confidence(logits)
            whole = torch.softmax(F.interpolate(logits.float(), size=chain.frame_hw,
                                                mode="bilinear", align_corners=False), 1)
            confidence = seg_confidence(logits)
        rows, cols = window.rows_cols()
        pixels = np.ascontiguousarray(frame.pixels[rows, cols])
        cut_chain, cut = _logits(pipeline, pixels, image_to_mri @ window.shift())
        if fuse:
            cut = torch.softmax(F.interpolate(cut.float(), size=cut_chain.frame_hw,
                                              mode="bilinear", align_corners=False), 1)
            whole[..., rows, cols] = 0.5 * (whole[..., rows, cols] + cut)
            return argmax_labels(whole)[0].cpu().numpy(), confidence
        labels = np.zeros(frame.pixels.shape, np.uint8)
        labels[rows, cols] = cut_chain.segment(cut).cpu().numpy()
        return labels, seg_confidence(cut)


@dataclasses.dataclass(frozen=True)
class SegWindow:
    """``--seg-window``'s stage: the gland window of ``roi`` (a :class:`regseg.stream.roi.GlandRoi`,
    only its :meth:`~regseg.stream.roi.GlandRoi.window` is used) and whether to ``fuse``."""

    roi: Any
    fuse: bool = False

    def window(self, frame: Frame, plane: np.ndarray):
        return self.roi.window(frame, plane)


def build_seg_window(context, mode: str = SEG_WINDOW_DEFAULT) -> SegWindow | None:
    """``--seg-window``'s stage for ``mode`` (auto, fuse: a :class:`SegWindow`; off: None)."""
    if mode not in SEG_WINDOW_MODES:
        raise ValueError(f"seg_window {mode!r}: expected one of {SEG_WINDOW_MODES}")
    if mode == "off":
        return None
    from regseg.stream.roi import GlandRoi

    return SegWindow(GlandRoi(context), fuse=mode == "fuse")
