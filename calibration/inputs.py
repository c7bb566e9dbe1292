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
#: A tracker's pose is rigid: its 3x3 part a rotation to this tolerance (largest entry of
#: R^T R - I; trackers write 6 or more significant digits) with determinant +1.
RIGID_TOLERANCE = 1e-2


def check_rigid(poses: np.ndarray, where: list[str], path: Path) -> None:
    """Raise InputError naming ``path`` and the first sample (``where[n]``, e.g. "line 7") whose
    pose is not a rotation and a translation (a scaled, sheared, zero or mirrored 3x3 part)."""
    if not len(poses):
        return
    r = poses[:, :3, :3]
    with np.errstate(over="ignore", invalid="ignore"):  # 1e308 entries: inf, refused below
        error = np.abs(np.swapaxes(r, 1, 2) @ r - np.eye(3)).max(axis=(1, 2))
        bad = np.flatnonzero(~(error <= RIGID_TOLERANCE) | ~(np.linalg.det(r) > 0))
    if bad.size:
        n = int(bad[0])
        with np.printoptions(precision=4, suppress=True):
            rotation = " ".join(str(r[n]).split())
        raise InputError(f"{path}: {where[n]}: pose rotation part {rotation} (and {bad.size - 1} "
                         "more) is not a rotation (orthonormal, determinant +1); a tracker's "
                         "rigid pose in mm is expected (is it a calibration, or scaled?)")


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
    times, poses, where = [], [], []
    for n, row in enumerate(rows[1:], start=2):
        if not any(v.strip() for v in row):
            continue
        try:
            m = np.array([float(row[c]) for c in cols]).reshape(4, 4)
            t = float(row[tcol]) if tcol is not None else float(len(times))
        except (ValueError, IndexError):
            raise InputError(f"{path}: line {n}: {row[:4]}...; numbers in every column "
                             "expected") from None
        if not np.isfinite(t):
            raise InputError(f"{path}: line {n}: timestamp_s {row[tcol]!r}; a finite time in "
                             "seconds expected")
        if np.isfinite(m).all():
            times.append(t)
            poses.append(m)
            where.append(f"line {n}")
    poses = np.array(poses).reshape(-1, 4, 4)
    check_rigid(poses, where, path)
    return Tracked(np.array(times), poses, None)


def read_sequence_poses(path: Path, name: str, *, images: bool) -> Tracked:
    from regseg.sequence_file import read_sequence

    seq = read_sequence(path)
    times, poses, pixels, where = [], [], [], []
    seen = False
    for n, frame in enumerate(seq.frames):
        seen = seen or f"{name}Transform" in frame.fields
        try:
            m = frame.transform(name)
        except InputError as exc:
            raise InputError(f"{path}: frame {n}: {exc}") from None
        if m is None:
            continue
        t = frame.timestamp_s
        times.append(float(n) if t is None else t)
        poses.append(m)
        where.append(f"frame {n} {name}Transform")
        if images:
            pixels.append(frame.pixels if frame.pixels.ndim == 2 else frame.pixels[..., 0])
    if not seen:
        names = sorted({k[:-len("Transform")] for f in seq.frames[:1] for k in f.fields
                        if k.endswith("Transform")})
        raise InputError(f"{path}: no {name}Transform in its frames (it has: "
                         f"{', '.join(names) or 'none'}); name the tool's transform")
    check_rigid(np.array(poses).reshape(-1, 4, 4), where, path)
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
