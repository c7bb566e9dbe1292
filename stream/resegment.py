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

``--seg-tta flip`` runs that pass twice, on the frame and on its mirror image (columns reversed,
with the MRI context resliced at the mirrored plane, so frame and MRI stay aligned), and averages
the two logits on the network's grid (the mirror of the mirror's grid is the frame's: the grids
are pixel-centred, regseg.planes.model_to_frame): one more network call per frame.
"""

from __future__ import annotations

import numpy as np
import torch

from regseg.stream.chain import plane_matrices
from regseg.stream.quality import seg_confidence
from regseg.types import Frame

SEG_WINDOW_MODES = ("auto", "off")
SEG_WINDOW_DEFAULT = "off"
SEG_TTA_MODES = ("flip", "off")
SEG_TTA_DEFAULT = "off"  # until its rule (bench/results/lc2_predeclared.md, addendum 16)


def mirrored(pixels: np.ndarray, image_to_mri: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The frame with its columns reversed, and the plane that places it: pixel (i, j) of the
    mirror shows what pixel (W - 1 - i, j) of the frame shows, at the same point of the MRI."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, pixels.shape[1] - 1.0
    return np.ascontiguousarray(pixels[:, ::-1]), image_to_mri @ flip


def segment_published(pipeline, frame: Frame, image_to_mri: np.ndarray
                      ) -> tuple[np.ndarray, float, torch.Tensor]:
    """(labels (H, W) uint8, seg confidence, logits (1, 3, h, w) on the model grid of the pass)
    of ``frame`` with the MRI context at ``image_to_mri``, on ``pipeline.seg_window``'s window
    when it has one for the frame (the logits are then the window's; a copy where
    ``--seg-tta`` or ``--seg-prior`` keeps them, else possibly the engine's own buffer)."""
    window = None if pipeline.seg_window is None else pipeline.seg_window.window(frame,
                                                                                  image_to_mri)
    pixels, plane = frame.pixels, image_to_mri
    if window is not None:
        rows, cols = window.rows_cols()
        pixels, plane = np.ascontiguousarray(pixels[rows, cols]), image_to_mri @ window.shift()
    chain = pipeline.chain(pixels.shape)

    def logits_at(pixels: np.ndarray, plane: np.ndarray) -> torch.Tensor:
        mats = torch.from_numpy(plane_matrices(pipeline.context, plane, pixels.shape,
                                               pipeline.engine.size)).to(pipeline.device)
        return chain.resegment(torch.from_numpy(pixels).to(pipeline.device), mats)

    with torch.inference_mode():
        logits = logits_at(pixels, plane)
        if pipeline.seg_tta or pipeline.seg_prior:  # kept past the next engine call: a copy,
            logits = logits.clone()  # as an engine may reuse its output buffer
        if pipeline.seg_tta:  # --seg-tta flip
            logits = 0.5 * (logits + logits_at(*mirrored(pixels, plane)).flip(-1))
        labels, confidence = chain.segment(logits).cpu().numpy(), seg_confidence(logits)
    if window is not None:
        whole = np.zeros(frame.pixels.shape, np.uint8)
        whole[rows, cols] = labels
        labels = whole
    return labels, confidence, logits


def seg_tta_on(mode: str = SEG_TTA_DEFAULT) -> bool:
    """``--seg-tta``'s mode as the Pipeline's flag."""
    if mode not in SEG_TTA_MODES:
        raise ValueError(f"seg_tta {mode!r}: expected one of {SEG_TTA_MODES}")
    return mode == "flip"


def build_seg_window(context, mode: str = SEG_WINDOW_DEFAULT):
    """``--seg-window``'s window maker: a :class:`regseg.stream.roi.GlandRoi` for ``auto``
    (only its :meth:`~regseg.stream.roi.GlandRoi.window` is used), None for ``off``."""
    if mode not in SEG_WINDOW_MODES:
        raise ValueError(f"seg_window {mode!r}: expected one of {SEG_WINDOW_MODES}")
    if mode == "off":
        return None
    from regseg.stream.roi import GlandRoi

    return GlandRoi(context)
