"""Tracked data for calibration: poses (and images) from PLUS sequence files or CSV.

CSV layout (one tool per file): a header row naming ``timestamp_s`` (optional) and ``m00`` ...
``m33`` (the 4 x 4 pose, row-major, mm), then one row per sample. Sequence files: the per-frame
``<Name>Transform`` fields PLUS writes (``ProbeToTrackerTransform``, ``StylusToTrackerTransform``),
frames whose ``<Name>TransformStatus`` is not OK skipped.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from regseg.errors import InputError

MATRIX_COLUMNS = tuple(f"m{r}{c}" for r in range(4) for c in range(4))


@dataclass(frozen=True)
class Tracked:
    """Samples of one tool: (N,) times, (N, 4, 4) poses and, from sequence files, (N, H, W)
    images (None from CSV). Only samples with a valid pose are kept."""

    times_s: np.ndarray
    poses: np.ndarray
    pixels: np.ndarray | None
    spacing_mm: tuple[float, float] = (1.0, 1.0)  # (x = column, y = row) from the file header


def read_csv_poses(path: Path) -> Tracked:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    if not rows:
        raise InputError(f"{path}: empty; a header row with m00 ... m33 expected")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in MATRIX_COLUMNS if c not in header]
    if missing:
        raise InputError(f"{path}: header {header[:6]}... lacks {missing[:4]}; columns m00 ... "
                         "m33 (the 4x4 pose, row-major) and optionally timestamp_s expected")
    cols = [header.index(c) for c in MATRIX_COLUMNS]
    tcol = header.index("timestamp_s") if "timestamp_s" in header else None
    times, poses = [], []
    for n, row in enumerate(rows[1:], start=2):
        if not any(v.strip() for v in row):
            continue
        try:
            m = np.array([float(row[c]) for c in cols]).reshape(4, 4)
            t = float(row[tcol]) if tcol is not None else float(len(times))
        except (ValueError, IndexError):
            raise InputError(f"{path}: line {n}: {row[:4]}...; numbers in every column "
                             "expected") from None
        if np.isfinite(m).all():
            times.append(t)
            poses.append(m)
    return Tracked(np.array(times), np.array(poses).reshape(-1, 4, 4), None)


def read_sequence_poses(path: Path, name: str, *, images: bool) -> Tracked:
    from regseg.sequence_file import read_sequence

    seq = read_sequence(path)
    times, poses, pixels = [], [], []
    seen = False
    for n, frame in enumerate(seq.frames):
        seen = seen or f"{name}Transform" in frame.fields
        m = frame.transform(name)
        if m is None:
            continue
        t = frame.timestamp_s
        times.append(float(n) if t is None else t)
        poses.append(m)
        if images:
            pixels.append(frame.pixels if frame.pixels.ndim == 2 else frame.pixels[..., 0])
    if not seen:
        names = sorted({k[:-len("Transform")] for f in seq.frames[:1] for k in f.fields
                        if k.endswith("Transform")})
        raise InputError(f"{path}: no {name}Transform in its frames (it has: "
                         f"{', '.join(names) or 'none'}); name the tool's transform")
    return Tracked(np.array(times), np.array(poses).reshape(-1, 4, 4),
                   np.array(pixels) if images and pixels else None, seq.element_spacing_mm)


def read_tracked(path: str | os.PathLike, name: str, *, images: bool = False) -> Tracked:
    """Poses of transform ``name`` (e.g. ``StylusToTracker``) from a sequence file or a CSV.

    Args:
        images: also return the frames (sequence files only; InputError for a CSV).
    """
    from regseg.sequence_file import SEQUENCE_EXTENSIONS

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.name.lower().endswith(".csv"):
        if images:
            raise InputError(f"{path}: a CSV holds no images; a PLUS sequence file "
                             f"({', '.join(SEQUENCE_EXTENSIONS[:4])}) is expected here")
        return read_csv_poses(path)
    if path.name.lower().endswith(SEQUENCE_EXTENSIONS):
        return read_sequence_poses(path, name, images=images)
    raise InputError(f"{path}: neither a CSV nor a PLUS sequence file "
                     f"({', '.join(SEQUENCE_EXTENSIONS[:4])} ...)")


def write_csv_poses(path: str | os.PathLike, times_s, poses) -> Path:
    """The CSV :func:`read_csv_poses` reads (for simulated sessions and exports)."""
    from regseg.calibration.transforms_io import write_atomic

    lines = [",".join(("timestamp_s", *MATRIX_COLUMNS))]
    for t, m in zip(times_s, poses, strict=True):
        lines.append(",".join([repr(float(t)), *(repr(float(v)) for v in np.ravel(m))]))
    return write_atomic(path, "\n".join(lines) + "\n")
