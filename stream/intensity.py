"""Grey levels matched to the training scanner's (``regseg-stream --intensity match``).

A scanner's gain, TGC, dynamic range and log-compression curve change how grey a tissue looks
without changing where anything is. The live networks (and LC2's fit) were made on one simulator's
grey levels; :class:`IntensityMatch` maps each frame's grey levels monotonically so that their
distribution over the imaged area (pixels > 0) is the reference's: histogram matching, a lookup
table of 256 entries. Texture, speckle and geometry are not touched.

Per stream, the histogram is an exponential average over frames (:data:`HISTORY_WEIGHT` for the
new frame; the first frame starts it), so the map follows a change of gain within a few frames
and does not flicker with what is in view. Frames with fewer than :data:`MIN_PIXELS` imaged
pixels leave the histogram as it is.

The reference is the quantiles of the imaged pixels of family-A frames from the default scanner
on training phantoms (``regseg train intensity-reference``, ``models/weights/intensity_reference
.json``). The overlay, the ``no_content`` check and the published frame keep the original pixels
(regseg.stream.pipeline).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from regseg.errors import InputError
from regseg.types import Frame

INTENSITY_MODES = ("match", "off")
INTENSITY_DEFAULT = "off"
HISTORY_WEIGHT = 0.2  # the new frame's weight in the running histogram
MIN_PIXELS = 1000  # imaged pixels a frame needs to update the histogram
QUANTILES = 257  # reference quantiles, at 0, 1/256, .., 1
MAX_IN_FLIGHT = 16  # mapped frames remembered at most (a GPU ring holds 3 in flight)
REFERENCE_NAME = "intensity_reference.json"  # in regseg.models.registry.WEIGHTS_DIR


def reference_quantiles(pixels: list[np.ndarray]) -> np.ndarray:
    """(QUANTILES,) float64: quantiles of the pixels > 0 of ``pixels`` (uint8 frames), pooled."""
    values = np.concatenate([np.asarray(p)[np.asarray(p) > 0].ravel() for p in pixels])
    if values.size == 0:
        raise ValueError("reference_quantiles: no imaged pixel (> 0) in the frames")
    return np.quantile(values.astype(np.float64), np.linspace(0.0, 1.0, QUANTILES))


def load_reference(path: str | Path | None = None) -> np.ndarray:
    """The reference quantiles from ``path`` (default: the shipped one; a JSON with
    ``quantiles``: QUANTILES non-decreasing numbers in [0, 255])."""
    if path is None:
        from regseg.models.registry import WEIGHTS_DIR

        path = WEIGHTS_DIR / REFERENCE_NAME
    path = Path(path)
    try:
        q = np.asarray(json.loads(path.read_text())["quantiles"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: unreadable intensity reference ({e}); make it with "
                         "`regseg train intensity-reference`") from None
    if q.shape != (QUANTILES,) or not np.isfinite(q).all() or (np.diff(q) < 0).any() \
            or q.min() < 0 or q.max() > 255:
        raise InputError(f"{path}: 'quantiles' must be {QUANTILES} non-decreasing numbers in "
                         f"[0, 255], got shape {q.shape}")
    return q


class IntensityMatch:
    """Maps a stream's frames onto the reference grey levels (see the module docstring).

    :meth:`observe` (frame order, whole frames) updates the running histogram and the lookup
    table; :meth:`apply` maps a frame's pixels through the current table.
    """

    def __init__(self, reference: np.ndarray | None = None, *,
                 weight: float = HISTORY_WEIGHT) -> None:
        self.reference = load_reference() if reference is None else np.asarray(reference,
                                                                               np.float64)
        if self.reference.shape != (QUANTILES,):
            raise ValueError(f"IntensityMatch reference: shape {self.reference.shape}, "
                             f"({QUANTILES},) expected")
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"IntensityMatch weight {weight}: in (0, 1] expected")
        self.weight = float(weight)
        self.histogram: np.ndarray | None = None  # (256,) fractions of imaged pixels
        self.lut = np.arange(256, dtype=np.uint8)  # identity until a frame is observed
        self._in_flight: dict[int, tuple[Frame, Frame]] = {}  # id(mapped) -> (mapped, original)

    def reset(self) -> None:
        self.histogram, self.lut = None, np.arange(256, dtype=np.uint8)

    def observe(self, pixels: np.ndarray) -> None:
        """Fold ``pixels`` ((H, W) uint8) into the running histogram; remake the table."""
        counts = np.bincount(np.asarray(pixels, np.uint8).ravel(), minlength=256)[:256]
        counts[0] = 0  # outside the imaged area
        total = int(counts.sum())
        if total < MIN_PIXELS:
            return
        h = counts / total
        self.histogram = h if self.histogram is None else (
            (1.0 - self.weight) * self.histogram + self.weight * h)
        self.lut = self.table(self.histogram, self.reference)

    @staticmethod
    def table(histogram: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """(256,) uint8: grey v -> the reference grey at v's mid-bin quantile; 0 stays 0 and no
        imaged grey becomes 0."""
        cdf = np.cumsum(histogram)
        mid = cdf - 0.5 * histogram  # the quantile at the middle of each bin
        out = np.interp(mid, np.linspace(0.0, 1.0, reference.size), reference)
        lut = np.clip(np.rint(out), 1, 255).astype(np.uint8)
        lut[0] = 0
        return lut

    def apply(self, frame: Frame) -> Frame:
        """``frame`` with its pixels through the current table (the same Frame otherwise)."""
        return dataclasses.replace(frame, pixels=self.lut[frame.pixels])

    def enter(self, frame: Frame) -> Frame:
        """:meth:`apply`, remembered for :meth:`original` and :meth:`leave` (the entry holds
        the mapped frame, so its id is not reused before :meth:`leave`)."""
        mapped = self.apply(frame)
        while len(self._in_flight) >= MAX_IN_FLIGHT:  # frames whose chain raised never leave
            self._in_flight.pop(next(iter(self._in_flight)))
        self._in_flight[id(mapped)] = (mapped, frame)
        return mapped

    def original(self, frame: Frame) -> Frame:
        """The frame :meth:`enter` mapped to ``frame`` (``frame`` itself for any other)."""
        entry = self._in_flight.get(id(frame))
        return frame if entry is None else entry[1]

    def leave(self, frame: Frame) -> Frame:
        """:meth:`original`, forgotten."""
        entry = self._in_flight.pop(id(frame), None)
        return frame if entry is None else entry[1]


def build_intensity(mode: str = INTENSITY_DEFAULT) -> IntensityMatch | None:
    """``--intensity``'s stage: an :class:`IntensityMatch` for ``match``, None for ``off``."""
    if mode not in INTENSITY_MODES:
        raise ValueError(f"intensity {mode!r}: expected one of {INTENSITY_MODES}")
    return IntensityMatch() if mode == "match" else None
