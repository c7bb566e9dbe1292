"""The OpenIGTLink sink: overlay, predicted labels and registration, to every client of a server.

What Slicer sends back (an ``MRIToReference`` TRANSFORM) is taken, under the network safeguards,
by :class:`regseg.stream.igtl.registration.RegistrationListener`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from pyigtl.messages import ImageMessage

from regseg.clock import ms_between, now_ns, wall_s
from regseg.stream.igtl.codec import (
    check_device_name,
    check_header_version,
    pack_image,
    pack_message,
    pack_transform,
)
from regseg.stream.igtl.polydata import pack_outline
from regseg.stream.igtl.server import IgtlServer
from regseg.stream.igtl.status import STATUS_OK, STATUS_TIME_OUT, pack_status
from regseg.stream.sink_thread import SinkThread
from regseg.types import LESION, Frame, Result

log = logging.getLogger(__name__)


def output_to_reference(frame: Frame, out_hw: tuple[int, int]) -> np.ndarray:
    """(4, 4) map from pixel (i, j, k) of an output image of size ``out_hw`` = (h, w) to mm.

    The frame's ``image_to_reference`` when tracked, else its spacing alone (diag(col mm, row mm,
    1 mm), the image at the origin). An output at another resolution than the frame covers the
    same area: pixel centres map as i_frame = (i_out + 0.5) * W / w - 0.5 (the same for j).
    """
    if frame.image_to_reference is not None:
        base = np.asarray(frame.image_to_reference, dtype=np.float64)
    else:
        base = np.diag([frame.spacing_mm[1], frame.spacing_mm[0], 1.0, 1.0])
    rows, cols = frame.pixels.shape[:2]
    h, w = out_hw
    if (h, w) == (rows, cols):
        return base
    sx, sy = cols / w, rows / h
    out_to_frame = np.array([[sx, 0, 0, (sx - 1) / 2], [0, sy, 0, (sy - 1) / 2],
                             [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    return base @ out_to_frame


def target_mm(result: Result) -> np.ndarray | None:
    """The MRI lesion centroid (the biopsy target) in the Reference frame, mm; None when not in
    view or not to be trusted (flagged frame)."""
    if result.flagged or result.target_ij is None:
        return None
    to_ref = output_to_reference(result.frame, result.frame.pixels.shape[:2])
    i, j = result.target_ij
    return (to_ref @ np.array([i, j, 0.0, 1.0]))[:3]


def displacement_mm(result: Result, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The deformable part as an image: ((h, w, 3) float32 Reference-frame mm, image_to_reference).

    ``ddf`` (dy, dx) in frame pixels says frame pixel p shows the MRI at
    ``image_to_mri (p + ddf(p))``; here each pixel's (dx, dy, 0) is mapped through the linear part
    of the frame's ImageToReference (spacing and orientation), area-averaged by ``step``.
    """
    ddf = np.asarray(result.ddf, np.float32)
    h, w = ddf.shape[1:]
    out_hw = (max(1, h // step), max(1, w // step))
    small = [cv2.resize(c, out_hw[::-1], interpolation=cv2.INTER_AREA) for c in (ddf[1], ddf[0])]
    linear = output_to_reference(result.frame, (h, w))[:3, :2].astype(np.float32)
    vectors = np.stack(small, axis=-1) @ linear.T  # (h, w, 3) mm
    return np.ascontiguousarray(vectors, np.float32), output_to_reference(result.frame, out_hw)


def trust_metadata(result: Result) -> dict[str, str]:
    """Seq, Quality, Flagged, Flags (comma-separated reasons, "" none), ErrorMm, SegConfidence;
    Correction (registered or tracked) when regseg.stream.do_no_harm ran; Lc2MoveMm (how far the
    image-based refinement moved the plane at the gland) when it applied a move; Lc2Significance
    (its LC2 over the chance level, applied at >= 1.5) when it was computed; OutOfPlaneMm (the
    3-D consensus's offset of the plane along its normal) when the consensus holds; SweepPlanes
    and SweepPending (the distinct planes since the registration; true while the sweep that checks
    it along the normals is still to be made) when the consensus runs; LabelsSource
    (network+mri: the labels pooled with the MRI labels as a prior, --seg-prior; withheld) when
    the labels are not the network's own."""
    meta = {"Seq": str(result.frame.seq), "Quality": f"{result.quality:.4f}",
            "Flagged": "true" if result.flagged else "false", "Flags": ",".join(result.flags),
            "ErrorMm": f"{result.error_mm:.3f}", "SegConfidence": f"{result.seg_confidence:.4f}"}
    if math.isfinite(result.error_tracked_mm):  # do no harm ran: which alignment went out
        meta["Correction"] = result.correction
    if math.isfinite(result.lc2_move_mm):
        meta["Lc2MoveMm"] = f"{result.lc2_move_mm:.3f}"
    if math.isfinite(result.lc2_significance):
        meta["Lc2Significance"] = f"{result.lc2_significance:.3f}"
    if math.isfinite(result.out_of_plane_mm):
        meta["OutOfPlaneMm"] = f"{result.out_of_plane_mm:.3f}"
    if result.sweep_pending is not None:
        meta["SweepPlanes"] = str(result.sweep_planes)
        meta["SweepPending"] = "true" if result.sweep_pending else "false"
    if result.labels_source != "network":
        meta["LabelsSource"] = result.labels_source
    if getattr(result, "estimate_check", None) is not None:  # --estimate-check's status
        meta["EstimateCheck"] = result.estimate_check
    return meta


@dataclass(frozen=True, slots=True)
class IgtlOutputs:
    """What goes out for each Result, under which device names; checked when made.

    Fields:
        overlay_device, labels_device, transform_device: device names (<= 20 ASCII chars).
        header_version: 2 (Slicer's default, needed for metadata) or 1 for v1-only receivers
            (OpenIGTLink 1.x, e.g. Debian's 1.11, cannot parse a v2 header and loses step).
        send_flagged_transform: also send the TRANSFORM of flagged results (see :meth:`pack`).
        contour_devices: (gland, lesion) POLYDATA device names, e.g. ("ProstateContour",
            "LesionContour"); None sends no outlines.
        mri_labels_device: the MRI labels through the full registration (affine + deformable),
            uint8 IMAGE; None sends none.
        target_device: the MRI lesion's outline (the biopsy target), POLYDATA, with metadata
            TargetMm (centroid "x y z" in the Reference frame) and TargetMarginMm; None: none.
        displacement_device: the deformable part, a 3-component float32 IMAGE of Reference-frame
            mm at 1/``displacement_step`` resolution, when the deformable stage ran; None: none.
        suggestion_device: the registration the 3-D consensus suggests, as the TRANSFORM an
            operator would send back (``MRIToReference`` convention: MRI mm -> Reference mm),
            when it holds; None: none. regseg never applies it.
    Raises:
        InputError: a device name that is not <= 20 ASCII characters, or a header version
            other than 1 or 2.
    """

    overlay_device: str = "Overlay"
    labels_device: str = "Labels"
    transform_device: str = "MRIToImage"
    header_version: int = 2
    send_flagged_transform: bool = False
    contour_devices: tuple[str, str] | None = None
    mri_labels_device: str | None = "MRILabels"
    target_device: str | None = "TargetContour"
    displacement_device: str | None = "MRIToImageDeformable"
    displacement_step: int = 4
    suggestion_device: str | None = "SuggestedMRIToRef"

    def __post_init__(self) -> None:
        for name in (self.overlay_device, self.labels_device, self.transform_device,
                     *(self.contour_devices or ()), self.mri_labels_device, self.target_device,
                     self.displacement_device, self.suggestion_device):
            if name is not None:
                check_device_name(name)
        check_header_version(self.header_version)

    def pack(self, result: Result) -> list[bytes]:
        """The messages for one Result: overlay (RGB IMAGE), labels (uint8 IMAGE), [MRI labels
        (uint8 IMAGE), outlines and target as POLYDATA, displacement (float IMAGE), the
        consensus's suggested registration (TRANSFORM),] mri_to_image (TRANSFORM, last).

        With ``contour_devices`` = (gland, lesion) device names, the outlines of the predicted
        gland (labels > 0: the lesion lies inside it) and lesion (labels == 2) follow the images,
        in mm on the image plane (:func:`~regseg.stream.igtl.polydata.label_outlines`).

        Every message carries the frame's ``source_ts`` (wall clock now if the source gave none),
        so a receiver can match it to the frame it sent and measure latency. With header v2 each
        carries metadata Seq, Quality, Flagged, Flags, ErrorMm and SegConfidence; the TRANSFORM
        also PLUS's TransformStatus (OK / INVALID). A flagged registration's TRANSFORM is left out
        unless ``send_flagged_transform``: Slicer would apply it as if it were right, and the last
        good one is better than a wrong one. A flagged Result's MRI labels go out empty and its
        target outline empty (clearing what Slicer shows) and no displacement is sent: nothing
        from a doubtful registration is sent as truth.

        Raises:
            InputError: an overlay or labels array of the wrong shape or dtype (from pack_image).
        """
        frame = result.frame
        timestamp = frame.source_ts if frame.source_ts > 0 else wall_s()
        version = self.header_version
        meta = trust_metadata(result)
        labels_to_reference = output_to_reference(frame, result.labels.shape[:2])
        messages = [
            pack_image(result.overlay, output_to_reference(frame, result.overlay.shape[:2]),
                       self.overlay_device, timestamp, header_version=version, metadata=meta),
            pack_image(result.labels, labels_to_reference,
                       self.labels_device, timestamp, header_version=version, metadata=meta),
        ]
        mri_labels = (np.zeros_like(result.warped_labels) if result.flagged
                      else result.warped_labels)
        if self.mri_labels_device is not None:
            messages.append(pack_image(mri_labels, output_to_reference(frame, mri_labels.shape),
                                       self.mri_labels_device, timestamp, header_version=version,
                                       metadata=meta))
        if self.contour_devices is not None:
            for device, mask in zip(self.contour_devices,
                                    (result.labels > 0, result.labels == LESION), strict=True):
                messages.append(pack_outline(mask, labels_to_reference, device, timestamp,
                                             header_version=version, metadata=meta))
        if self.target_device is not None:
            target = target_mm(result)
            target_meta = dict(meta)
            if target is not None:
                target_meta["TargetMm"] = " ".join(f"{v:.3f}" for v in target)
                target_meta["TargetMarginMm"] = f"{result.target_margin_mm:.3f}"
            messages.append(pack_outline(mri_labels == LESION,
                                         output_to_reference(frame, mri_labels.shape),
                                         self.target_device, timestamp, header_version=version,
                                         metadata=target_meta))
        if (self.displacement_device is not None and result.ddf is not None
                and not result.flagged):
            vectors, to_reference = displacement_mm(result, self.displacement_step)
            msg = ImageMessage(vectors[np.newaxis], ijk_to_world_matrix=to_reference,
                               world_coordinate_system="ras", timestamp=timestamp,
                               device_name=self.displacement_device)
            messages.append(pack_message("IMAGE", self.displacement_device, timestamp,
                                         msg._pack_content(), header_version=version,
                                         metadata=meta))
        if self.suggestion_device is not None and result.suggested_reference_to_mri is not None:
            messages.append(pack_transform(np.linalg.inv(result.suggested_reference_to_mri),
                                           self.suggestion_device, timestamp,
                                           header_version=version, metadata=meta))
        if self.send_flagged_transform or not result.flagged:
            status = {"TransformStatus": "INVALID" if result.flagged else "OK",
                      "TransformValid": "false" if result.flagged else "true"}
            messages.append(pack_transform(result.mri_to_image, self.transform_device, timestamp,
                                           header_version=version, metadata=meta | status))
        return messages


def pack_result(result: Result, **options: Any) -> list[bytes]:
    """The messages for one Result (:meth:`IgtlOutputs.pack`); ``options`` are the fields of
    :class:`IgtlOutputs` (device names, header_version, send_flagged_transform, contour_devices,
    mri_labels_device, target_device, displacement_device, displacement_step).

    Raises:
        InputError: a bad option, or an overlay or labels array of the wrong shape or dtype.
    """
    return IgtlOutputs(**options).pack(result)


class IgtlSink:
    """Publishes each Result through an :class:`IgtlServer`, packed once for all its clients.

    ``submit`` only hands the Result to this sink's :class:`SinkThread` (never blocks; a backlog
    is dropped and counted as ``skipped``); packing (CRC included) happens on that thread. The
    server is not ours: close it separately. When no Result has gone out for ``stale_after_s``
    (and every ``stale_after_s`` while that lasts), a STATUS ``regsegStatus`` goes out: code 7
    (time-out), subcode the whole seconds, text "stale: no frame for N s"; the next Result is
    followed by a STATUS code 1 "ok: live". Slicer shows the latest one: the overlay is old.

    Args:
        server: where the packed messages are broadcast.
        stale_after_s: seconds without a Result before the stale STATUS (None: never).
        options: the fields of :class:`IgtlOutputs` (device names, header_version,
            send_flagged_transform, contour_devices), checked here.
    """

    def __init__(self, server: IgtlServer, *, stale_after_s: float | None = 1.0,
                 **options: Any) -> None:
        self.outputs = IgtlOutputs(**options)
        self.server = server
        self.published = 0
        self.withheld_transforms = 0
        self.pack_ms = 0.0  # last result's packing time
        self._thread = SinkThread(self._pack, self._broadcast, name="igtl-sink", logger=log,
                                  stale_after_s=stale_after_s, on_stale=self._send_stale,
                                  on_fresh=self._send_fresh)

    def submit(self, result: Result) -> None:
        """Hand ``result`` over; never blocks. Its arrays must not change after this call."""
        self._thread.submit(result)

    def close(self, timeout: float = 2.0) -> None:
        """Publish what is pending, then end the thread (within ``timeout`` s)."""
        self._thread.close(timeout)

    def stats(self) -> dict:
        return {
            "kind": "igtl",
            "port": self.server.port,
            "submitted": self._thread.submitted,
            "published": self.published,
            "skipped": self._thread.skipped,
            "pack_errors": self._thread.encode_errors,
            "withheld_transforms": self.withheld_transforms,
            "pack_ms": round(self.pack_ms, 3),
            "stale_reports": self._thread.stale_reports,
            "server": self.server.stats(),
        }

    def _send_stale(self, idle_s: float) -> None:
        self.server.broadcast([pack_status(STATUS_TIME_OUT, int(idle_s), "stale",
                                           f"stale: no frame for {idle_s:.0f} s",
                                           header_version=self.outputs.header_version)])

    def _send_fresh(self) -> None:
        self.server.broadcast([pack_status(STATUS_OK, 0, "", "ok: live",
                                           header_version=self.outputs.header_version)])

    def _pack(self, result: Result) -> list[bytes]:
        start = now_ns()
        messages = self.outputs.pack(result)
        self.pack_ms = ms_between(start, now_ns())
        return messages

    def _broadcast(self, result: Result, messages: list[bytes]) -> None:
        if result.flagged and not self.outputs.send_flagged_transform:
            self.withheld_transforms += 1
        self.server.broadcast(messages)
        self.published += 1
