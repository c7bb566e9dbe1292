"""Reading and writing what ``regseg register`` and the batch jobs exchange: label maps checked
against their image, landmark CSVs, and displacement fields in mm (NIfTI, RAS, fixed grid)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np

from regseg.errors import InputError
from regseg.imageio import MAX_VOXELS, Volume, load_mri, read_header


def load_label_map(path: str | Path, like: Volume | None = None, what: str = "label") -> Volume:
    """A 3-D integer label volume (any non-negative values up to 255), RAS.

    Raises:
        InputError: missing/unreadable, not 3-D, non-finite, non-integer, negative or > 255
            values, or (with ``like``) a grid other than ``like``'s.
    """
    try:
        vol = load_mri(path)
    except InputError as exc:
        raise InputError(str(exc).replace("MRI", what)) from None
    data = vol.data
    if not np.array_equal(data, np.round(data)) or data.min() < 0 or data.max() > 255:
        raise InputError(f"{path}: {what} volume must hold integer labels 0..255; found values "
                         f"in [{data.min():g}, {data.max():g}]"
                         + ("" if np.array_equal(data, np.round(data)) else ", not integers")
                         + ". Save the label map with integer values (e.g. uint8).")
    if like is not None and (data.shape != like.data.shape
                             or not np.allclose(vol.voxel_to_world, like.voxel_to_world,
                                                atol=1e-3)):
        raise InputError(f"{path}: {what} grid {data.shape} (voxel_to_world\n"
                         f"{vol.voxel_to_world}) does not match its image {like.path} "
                         f"{like.data.shape}\n{like.voxel_to_world}; labels must be on the grid "
                         "of the image they label.")
    return Volume(data=data.astype(np.uint8), voxel_to_world=vol.voxel_to_world, path=str(path))


def load_landmarks(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Landmark CSV with columns fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z (world mm).

    Raises:
        InputError: missing or unreadable (not UTF-8 text), no header or rows, or a row whose
            six coordinates are not all finite numbers (the line and the value are named).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: landmark file not found")
    cols = [f"{s}_{a}" for s in ("fixed", "moving") for a in "xyz"]
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read the landmark CSV ({exc}); UTF-8 text with a header "
                         f"{cols} is expected") from None
    if not rows or any(c not in rows[0][1] for c in cols):
        raise InputError(f"{path}: a landmark CSV needs a header with {cols} (world mm, RAS) "
                         "and at least one row")
    points = []
    for line, row in rows:
        values = [row.get(c) for c in cols]
        try:
            xyz = [float(v) for v in values]
        except (TypeError, ValueError):
            xyz = [np.nan]
        if not np.isfinite(xyz).all():
            raise InputError(f"{path} line {line}: {values}; six finite numbers "
                             f"({', '.join(cols)}, mm) expected")
        points.append(xyz)
    pts = np.array(points, dtype=np.float64)
    return pts[:, :3], pts[:, 3:]


def save_ddf_mm(ddf_mm: np.ndarray, voxel_to_world: np.ndarray, path: str | Path) -> None:
    """Write an (I, J, K, 3) mm displacement as a NIfTI vector field (I, J, K, 1, 3)."""
    img = nib.Nifti1Image(ddf_mm[:, :, :, None, :].astype(np.float32), voxel_to_world)
    img.header.set_intent("vector", name="ddf_mm RAS")
    img.set_qform(voxel_to_world, code=1)
    img.set_sform(voxel_to_world, code=1)
    nib.save(img, str(path))


def load_ddf_mm(path: str | Path, like: Volume) -> np.ndarray:
    """Read a displacement written by :func:`save_ddf_mm`; (I, J, K, 3) mm on ``like``'s grid."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: displacement file not found")
    img = read_header(path, "displacement", max_voxels=3 * MAX_VOXELS)  # size checked first
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for bad files
        raise InputError(f"{path}: cannot read the displacement as NIfTI ({type(exc).__name__}: "
                         f"{exc})") from None
    if not np.isfinite(data).all():
        raise InputError(f"{path}: displacement has non-finite values (NaN or inf); finite mm "
                         "expected")
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    if data.ndim != 4 or data.shape[3] != 3 or data.shape[:3] != like.data.shape:
        raise InputError(f"{path}: displacement shape {data.shape}; (I, J, K, 1, 3) or "
                         f"(I, J, K, 3) on the fixed grid {like.data.shape} is expected")
    return data
