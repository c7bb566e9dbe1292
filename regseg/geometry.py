"""Geometry validated where it enters: 4x4 affines, image poses and whole frames.

Every matrix that comes from outside (an OpenIGTLink IMAGE or TRANSFORM, a paired pose,
``--reference-to-mri``, a registration sent by Slicer) passes one of these checks before anything
inverts or composes it, so a singular, degenerate or absurd matrix is refused with a message that
names where it came from, the bad value and what was expected, and never reaches the pipeline.

Limits (module constants, each a keyword argument too):

- ``MAX_CONDITION = 1e4``: condition number (2-norm) of the 3x3 linear part. Rigid transforms have
  1; a pixel pose has (largest / smallest axis length), e.g. 5 mm slice over 0.05 mm pixels = 100.
  Near-singular matrices (random rank-deficient ones plus noise) are 1e6 and up.
- ``SCALE_RANGE = (1e-3, 1e3)``: singular values of the linear part (mm per mm or mm per pixel);
  a matrix that shrinks everything to a micrometre (a tiny multiple of a singular one) is refused
  even when its condition number looks fine.
- ``MAX_TRANSLATION_MM = 1e4``: 10 m; trackers' working volumes are under 3 m.
- ``SPACING_RANGE_MM = (0.01, 5.0)``: ultrasound pixel sizes run from ~0.03 mm (high-frequency
  linear probes, small depth) to ~1 mm (deep abdominal sector at low resolution); 0.01-5 mm leaves
  room either side and still refuses a pose in metres (1000x) or in micrometres.
- ``MAX_SHEAR_DEG = 5.0``: the image axes i, j and the normal k must be within 5 degrees of
  orthogonal. A spatial calibration (fCal) is near-orthogonal to a fraction of a degree; parallel
  or collapsed axes are the failures this refuses.
- ``MAX_FRAME_PIXELS = 2048 * 2048`` (4.2 MP): real TRUS frames are under 1 MP (PLUS streams of
  BK/Ultrasonix: 640x480 to 1024x1024); a 1920x1080 grabber capture fits. A 4000x4000 frame costs
  5-7 s of pipeline time on 2 CPU cores (issue 9), so bigger frames are refused with a counter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from regseg.errors import InputError

MAX_CONDITION = 1e4
SCALE_RANGE = (1e-3, 1e3)
MAX_TRANSLATION_MM = 1e4
SPACING_RANGE_MM = (0.01, 5.0)
MAX_SHEAR_DEG = 5.0
MAX_FRAME_PIXELS = 2048 * 2048
NORMAL_LENGTH_RANGE_MM = (1e-3, 1e3)
#: A registration between two frames in mm (ReferenceToMRI) is near-rigid: scales 0.8-1.25 (an
#: affine from landmarks may scale by a few per cent) and no reflection, as for one sent by Slicer.
REGISTRATION_SCALE_RANGE = (0.8, 1.25)
_LAST_ROW = np.array([0.0, 0.0, 0.0, 1.0])


class FrameRefused(InputError):
    """A frame failed :func:`check_frame`; ``reason`` is the counter it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _brief(matrix: np.ndarray) -> str:
    """A one-line rendering of a (small) matrix for error messages."""
    with np.printoptions(precision=4, suppress=True, threshold=20, linewidth=10_000):
        return " ".join(str(np.asarray(matrix)).split())


def _as_matrix(matrix, what: str) -> np.ndarray:
    try:
        m = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what}: not a numeric matrix ({exc}); a 4x4 affine is expected") from exc
    if m.shape != (4, 4):
        raise InputError(f"{what}: shape {m.shape}; a 4x4 affine matrix is expected")
    if not np.isfinite(m).all():
        bad = int((~np.isfinite(m)).sum())
        raise InputError(f"{what}: {bad} non-finite value(s) (NaN or inf) in {_brief(m)}; "
                         "a finite 4x4 affine is expected")
    if np.abs(m[3] - _LAST_ROW).max() > 1e-6:
        raise InputError(f"{what}: last row {_brief(m[3])}; an affine's last row is 0 0 0 1")
    return m


def check_affine(matrix, *, what: str, max_condition: float = MAX_CONDITION,
                 scale_range: tuple[float, float] = SCALE_RANGE,
                 max_translation_mm: float = MAX_TRANSLATION_MM) -> np.ndarray:
    """Return ``matrix`` as a (4, 4) float64 affine, or raise :class:`InputError` naming ``what``.

    Checks: shape (4, 4), every value finite, last row 0 0 0 1, the 3x3 linear part invertible with
    a condition number at most ``max_condition`` and singular values within ``scale_range``, the
    translation at most ``max_translation_mm`` from the origin.

    Args:
        matrix: anything ``np.array`` turns into (4, 4) numbers.
        what: where it came from, for the message: a file, a flag, a device name.
    """
    return _check_linear(_as_matrix(matrix, what), what, max_condition, scale_range,
                         max_translation_mm)


def _check_linear(m: np.ndarray, what: str, max_condition: float,
                  scale_range: tuple[float, float], max_translation_mm: float) -> np.ndarray:
    """check_affine's tests past the shape, finiteness and last row (``m`` already checked)."""
    singular = np.linalg.svd(m[:3, :3], compute_uv=False)
    if singular[-1] <= 0.0 or singular[0] / singular[-1] > max_condition:
        cond = np.inf if singular[-1] <= 0.0 else singular[0] / singular[-1]
        raise InputError(f"{what}: singular or near-singular affine (condition number {cond:.3g}, "
                         f"limit {max_condition:.3g}) {_brief(m)}; an invertible 4x4 affine is "
                         "expected")
    if not scale_range[0] <= singular[-1] <= singular[0] <= scale_range[1]:
        raise InputError(f"{what}: scales {singular[-1]:.3g} to {singular[0]:.3g} (singular "
                         f"values) outside {scale_range[0]:.3g} to {scale_range[1]:.3g}; a "
                         "transform in mm is expected (is it in micrometres or metres?)")
    shift = math.sqrt(float(m[:3, 3] @ m[:3, 3]))
    if shift > max_translation_mm:
        raise InputError(f"{what}: translation {shift:.3g} mm exceeds {max_translation_mm:.3g} mm; "
                         "a transform in mm within the tracker's working volume is expected")
    return m


def check_registration(matrix, *, what: str) -> np.ndarray:
    """Return a registration between two frames in mm (ReferenceToMRI) as a (4, 4) float64
    affine, or raise :class:`InputError` naming ``what``: :func:`check_affine` with scales within
    :data:`REGISTRATION_SCALE_RANGE`, and a positive determinant (a mirror image is not a pose)."""
    m = _as_matrix(matrix, what)
    singular = np.linalg.svd(m[:3, :3], compute_uv=False)
    lo, hi = REGISTRATION_SCALE_RANGE
    if not lo <= singular[-1] <= singular[0] <= hi:
        raise InputError(f"{what}: scales {singular[-1]:.3g} to {singular[0]:.3g} (singular "
                         f"values of {_brief(m[:3, :3])}); a near-rigid registration between "
                         f"two frames in mm (scales {lo} to {hi}) is expected (is it in metres, "
                         "or an image's pixel pose?)")
    det = float(np.linalg.det(m[:3, :3]))
    if det <= 0.0:
        raise InputError(f"{what}: a reflection (determinant {det:.3g} of {_brief(m[:3, :3])}); "
                         "a registration is a rotation and a translation. Check the RAS/LPS "
                         "convention of the file (an axis flipped by hand?).")
    return check_affine(m, what=what)


def _angle_deg(a: np.ndarray, b: np.ndarray, a_len: float, b_len: float) -> float:
    """Unsigned angle between two non-zero vectors of lengths ``a_len``, ``b_len``, degrees."""
    cos = abs(float(a @ b)) / (a_len * b_len)
    return math.degrees(math.acos(min(1.0, cos)))


def check_image_pose(matrix, *, what: str,
                     spacing_range_mm: tuple[float, float] = SPACING_RANGE_MM,
                     max_shear_deg: float = MAX_SHEAR_DEG) -> np.ndarray:
    """Return an ImageToReference pose as (4, 4) float64, or raise :class:`InputError`.

    ``matrix`` maps pixel (i = column, j = row, k) to mm. Checks, besides :func:`check_affine`:
    columns i and j have lengths (the pixel spacing) within ``spacing_range_mm``; i and j are within
    ``max_shear_deg`` of orthogonal; the k column is non-zero and within ``max_shear_deg`` of the
    plane normal i x j (either sign: a mirrored image is allowed).
    """
    m = _as_matrix(matrix, what)
    lo, hi = spacing_range_mm
    i, j, k = m[:3, 0], m[:3, 1], m[:3, 2]
    i_len, j_len, k_len = (math.sqrt(float(v)) for v in (m[:3, :3] ** 2).sum(axis=0))
    lengths = (i_len, j_len)
    if not all(lo <= v <= hi for v in lengths):
        raise InputError(f"{what}: pixel axes of length (i, j) = ({lengths[0]:.4g}, "
                         f"{lengths[1]:.4g}) mm; pixel spacing between {lo} and {hi} mm is "
                         f"expected (matrix {_brief(m)})")
    shear = 90.0 - _angle_deg(i, j, i_len, j_len)
    if shear > max_shear_deg:
        raise InputError(f"{what}: image axes i and j are {90.0 - shear:.2f} degrees apart; within "
                         f"{max_shear_deg} degrees of orthogonal is expected (matrix {_brief(m)})")
    klo, khi = NORMAL_LENGTH_RANGE_MM
    if not klo <= k_len <= khi:
        raise InputError(f"{what}: normal (k column) of length {k_len:.3g} mm; between {klo} and "
                         f"{khi} mm along i x j is expected (matrix {_brief(m)})")
    normal = np.array([i[1] * j[2] - i[2] * j[1], i[2] * j[0] - i[0] * j[2],
                       i[0] * j[1] - i[1] * j[0]])  # i x j (np.cross costs 50 us)
    tilt = _angle_deg(k, normal, k_len, math.sqrt(float(normal @ normal)))
    if tilt > max_shear_deg:
        raise InputError(f"{what}: normal (k column) is {tilt:.2f} degrees off the image plane's "
                         f"normal i x j; within {max_shear_deg} degrees is expected "
                         f"(matrix {_brief(m)})")
    return _check_linear(m, what, MAX_CONDITION, SCALE_RANGE, MAX_TRANSLATION_MM)


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """What a frame may be; see the module docstring for the reasoning behind each default."""

    max_pixels: int = MAX_FRAME_PIXELS
    spacing_range_mm: tuple[float, float] = SPACING_RANGE_MM
    max_shear_deg: float = MAX_SHEAR_DEG


def check_frame(frame, limits: FrameLimits = FrameLimits()) -> None:
    """Refuse a frame the pipeline cannot use: raise :class:`FrameRefused` with its reason.

    Reasons (the counters the gate keeps): ``bad_pixels`` (not a 2-D uint8 array, or empty),
    ``too_large`` (more than ``limits.max_pixels``), ``bad_spacing`` (``spacing_mm`` outside
    ``limits.spacing_range_mm`` or not finite), ``bad_pose`` (``image_to_reference`` fails
    :func:`check_image_pose`). A frame with ``image_to_reference`` None (untracked) passes.
    """
    what = f"frame {frame.seq} from '{frame.device_name}'"
    pixels = frame.pixels
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 \
            or 0 in pixels.shape:
        desc = (f"{pixels.dtype} array of shape {pixels.shape}" if isinstance(pixels, np.ndarray)
                else type(pixels).__name__)
        raise FrameRefused("bad_pixels", f"{what}: pixels are {desc}; a non-empty (H, W) uint8 "
                           "B-mode image is expected")
    if pixels.size > limits.max_pixels:
        h, w = pixels.shape
        raise FrameRefused("too_large", f"{what}: {w}x{h} = {pixels.size} pixels exceeds the "
                           f"limit of {limits.max_pixels} (--max-frame-pixels); crop the image "
                           "at the sender (or --grabber-crop) or raise the limit")
    lo, hi = limits.spacing_range_mm
    spacing = np.asarray(frame.spacing_mm, dtype=np.float64)
    if spacing.shape != (2,) or not all(lo <= v <= hi for v in spacing):
        raise FrameRefused("bad_spacing", f"{what}: spacing_mm {tuple(spacing.tolist())}; (row, "
                           f"col) between {lo} and {hi} mm is expected")
    if frame.image_to_reference is not None:
        try:
            check_image_pose(frame.image_to_reference, what=f"{what}: ImageToReference",
                             spacing_range_mm=limits.spacing_range_mm,
                             max_shear_deg=limits.max_shear_deg)
        except InputError as exc:
            raise FrameRefused("bad_pose", str(exc)) from exc
