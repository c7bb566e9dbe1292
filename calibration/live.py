"""What ``regseg-stream`` reads before the first frame: the probe calibration, ReferenceToMRI from
a transform file or from landmarks. Each returns checked matrices or raises InputError naming the
flag, the file and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from regseg.calibration import markups, points, transforms_io
from regseg.errors import InputError
from regseg.geometry import SPACING_RANGE_MM, check_affine, check_registration


def read_image_to_probe(path: str, flag: str = "--probe-calibration") -> np.ndarray:
    """ImageToProbe (pixels -> probe mm) from a PLUS ``.xml`` (Image -> Probe), ITK ``.tfm``/
    ``.h5`` or 4x4 ``.txt``; its pixel axes must have a plausible pixel size."""
    try:
        m = transforms_io.read_transform(path, from_name="Image", to_name="Probe")
    except InputError as exc:
        raise InputError(f"{flag} {exc}") from None
    lo, hi = SPACING_RANGE_MM
    sizes = np.linalg.norm(m[:3, :2], axis=0)
    if not ((sizes >= lo) & (sizes <= hi)).all():
        raise InputError(f"{flag} {path}: pixel axes of {sizes[0]:.4g} and {sizes[1]:.4g} mm; an "
                         f"ImageToProbe in mm per pixel ({lo} to {hi}) is expected (is it "
                         "ProbeToImage, or without the pixel size?)")
    return m


def read_reference_to_mri(path: str, flag: str = "--reference-to-mri") -> np.ndarray:
    """ReferenceToMRI from ``.tfm``/``.h5`` (Slicer), ``.xml`` (PLUS: Reference -> MRI) or our
    4x4 text; near-rigid and not mirrored (:func:`regseg.geometry.check_registration`)."""
    try:
        m = transforms_io.read_transform(path, from_name="Reference", to_name="MRI")
        return check_registration(m, what=f"{path}: ReferenceToMRI")
    except InputError as exc:
        raise InputError(f"{flag} {exc}") from None


@dataclass(frozen=True)
class LandmarkRegistration:
    reference_to_mri: np.ndarray
    fre_mm: float
    count: int

    def describe(self) -> str:
        return (f"ReferenceToMRI from {self.count} landmarks: FRE {self.fre_mm:.2f} mm"
                + (" (fewer than 4 landmarks: FRE says nothing)" if self.count < 4 else ""))


def register_landmarks(mri_path: str, reference_path: str) -> LandmarkRegistration:
    """ReferenceToMRI from the same landmarks in the MRI and in the tracker's Reference frame."""
    try:
        in_mri = markups.read_landmarks(mri_path)
    except InputError as exc:
        raise InputError(f"--landmarks-mri {exc}") from None
    try:
        in_reference = markups.read_landmarks(reference_path)
    except InputError as exc:
        raise InputError(f"--landmarks-reference {exc}") from None
    _, fixed, moving = markups.pair_landmarks(in_mri, in_reference,
                                              f"--landmarks-mri {mri_path}",
                                              f"--landmarks-reference {reference_path}")
    if len(fixed) < 3:
        raise InputError(f"--landmarks-mri {mri_path}: {len(fixed)} landmarks; at least 3 "
                         "(better 6 or more, spread around the target) are expected")
    reg = points.register_points(moving, fixed)
    matrix = check_affine(reg.moving_to_fixed, what="ReferenceToMRI from landmarks")
    return LandmarkRegistration(matrix, reg.fre_mm, len(fixed))
