"""Volume I/O: NIfTI in and out, validated at load so bad input fails early and says why."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from regseg.errors import InputError
from regseg.geometry import check_affine
from regseg.types import LABEL_NAMES

ALLOWED_LABELS = frozenset({0, *LABEL_NAMES})

#: Largest volume read, in voxels: 2**26 = 67,108,864 (512 x 512 x 256; 256 MiB as float32, about
#: 1 GiB at the peak of a load). Prostate T2 series are 512 x 512 x 30-60 (16 M) or isotropic 3-D
#: T2 at 384 x 384 x 208 (31 M); brain templates 182 x 218 x 182 (7 M). The header's size is
#: checked before a byte is decompressed: a 130 KB .nii.gz of 512^3 zeros no longer costs 1.45 GB.
MAX_VOXELS = 2 ** 26


@dataclass(frozen=True, slots=True)
class Volume:
    """A 3-D image on a RAS grid: ``data[i, j, k]``, ``voxel_to_world`` maps (i, j, k) to mm."""

    data: np.ndarray  # (I, J, K)
    voxel_to_world: np.ndarray  # (4, 4)
    path: str = ""

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.voxel_to_world[:3, :3], axis=0))


def read_header(path: str | Path, what: str, max_voxels: int = MAX_VOXELS) -> nib.Nifti1Image:
    """Open a NIfTI and check its header, without reading (decompressing) the data.

    Raises:
        InputError: missing or unreadable file, an empty or absurdly large declared size (more
            than ``max_voxels``: the message gives the number and the limit), or a singular or
            implausible voxel-to-world matrix.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} file not found. Check the path (it is read as given, "
                         f"relative to {Path.cwd()}).")
    try:
        img = nib.load(str(path))  # the header only: the data stays on disk until asked for
        shape = tuple(int(d) for d in img.shape)
        affine = img.affine
    except Exception as exc:  # nibabel raises many types for bad files
        raise InputError(f"{path}: cannot read {what} as NIfTI ({type(exc).__name__}: {exc}). "
                         "A .nii or .nii.gz file is expected.") from exc
    voxels = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if not shape or min(shape) < 1:
        raise InputError(f"{path}: {what} header declares an empty volume of shape {shape}")
    if voxels > max_voxels:
        raise InputError(f"{path}: {what} header declares {'x'.join(map(str, shape))} = "
                         f"{voxels:,} voxels ({voxels * 4 / 2**30:.1f} GiB as float32); the limit "
                         f"is {max_voxels:,} voxels (512x512x256). Nothing was decompressed. "
                         "Crop or resample the volume.")
    check_affine(affine, what=f"{path}: {what} voxel-to-world matrix (sform/qform)")
    return img


def _read(path: str | Path, what: str, max_voxels: int = MAX_VOXELS) -> nib.Nifti1Image:
    """Read a NIfTI: header first (:func:`read_header`), then the data, reoriented to RAS."""
    img = read_header(path, what, max_voxels)
    voxels = int(np.prod(img.shape))
    try:
        img = nib.as_closest_canonical(img)
        img.get_fdata(dtype=np.float32)  # force the read here so corruption shows now
    except MemoryError:
        raise InputError(f"{path}: out of memory reading {what} of {voxels:,} voxels; free "
                         "memory or use a smaller volume") from None
    except Exception as exc:  # nibabel raises many types for bad files
        raise InputError(f"{path}: cannot read {what} as NIfTI ({type(exc).__name__}: {exc}). "
                         "A .nii or .nii.gz file is expected.") from exc
    return img


def _as_3d(path: str | Path, data: np.ndarray, what: str) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 2:
        raise InputError(f"{path}: {what} is {data.ndim}-D with shape {data.shape}; a 3-D volume "
                         "(at least 2 voxels along each axis) is expected. Export the series as a "
                         "single 3-D NIfTI.")
    return data


def load_mri(path: str | Path) -> Volume:
    """Load a 3-D MRI, reoriented to RAS, as float32.

    Raises:
        InputError: missing or unreadable file, not 3-D, or non-finite values (NaN/inf).
    """
    img = _read(path, "MRI")
    data = _as_3d(path, np.asarray(img.get_fdata(dtype=np.float32)), "MRI")
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(f"{path}: MRI has {bad} non-finite voxels (NaN or inf); finite "
                         "intensities are expected. Replace them (e.g. with 0) before loading.")
    return Volume(data=np.ascontiguousarray(data), voxel_to_world=img.affine.astype(np.float64),
                  path=str(path))


def load_labels(path: str | Path, like: Volume | None = None) -> Volume:
    """Load a 3-D label volume with values in {0 background, 1 prostate, 2 lesion} as uint8.

    Args:
        like: when given, the label grid must match this volume's shape and voxel_to_world.
    Raises:
        InputError: missing/unreadable, not 3-D, non-integer or unexpected values, grid mismatch.
    """
    img = _read(path, "label")
    data = _as_3d(path, np.asarray(img.get_fdata(dtype=np.float32)), "label volume")
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise InputError(f"{path}: label volume has non-integer or non-finite values; "
                         f"integer labels {sorted(ALLOWED_LABELS)} are expected.")
    values = set(np.unique(data).astype(int).tolist())
    extra = values - ALLOWED_LABELS
    if extra:
        raise InputError(f"{path}: label values {sorted(extra)} are not allowed; expected only "
                         f"{sorted(ALLOWED_LABELS)} (0 background, 1 prostate, 2 lesion). Map your "
                         "label file to these values.")
    labels = Volume(data=data.astype(np.uint8), voxel_to_world=img.affine.astype(np.float64),
                    path=str(path))
    if like is not None:
        check_same_grid(like, labels)
    return labels


def check_same_grid(image: Volume, labels: Volume, tol_mm: float = 1e-3) -> None:
    """Raise InputError unless two volumes share shape and voxel-to-world matrix."""
    if image.data.shape != labels.data.shape:
        raise InputError(f"{labels.path}: label grid {labels.data.shape} does not match the MRI "
                         f"{image.path} grid {image.data.shape}; labels must be on the MRI's grid.")
    if not np.allclose(image.voxel_to_world, labels.voxel_to_world, atol=tol_mm):
        raise InputError(f"{labels.path}: label voxel-to-world matrix\n{labels.voxel_to_world}\n"
                         f"does not match the MRI {image.path}\n{image.voxel_to_world}\n"
                         f"(tolerance {tol_mm} mm); resample the labels onto the MRI grid.")


def save_volume(volume: Volume, path: str | Path) -> None:
    """Write a volume as NIfTI (uint8 labels stay uint8, everything else float32)."""
    data = volume.data if volume.data.dtype == np.uint8 else volume.data.astype(np.float32)
    img = nib.Nifti1Image(data, volume.voxel_to_world)
    img.set_qform(volume.voxel_to_world, code=1)
    img.set_sform(volume.voxel_to_world, code=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def normalise_intensity(data: np.ndarray, low_pct: float = 1.0,
                        high_pct: float = 99.0) -> np.ndarray:
    """Map the [low_pct, high_pct] percentile range to [0, 1], clipped: float32."""
    lo, hi = np.percentile(data, [low_pct, high_pct])
    scale = 1.0 / max(float(hi - lo), 1e-6)
    return np.clip((data - lo) * scale, 0.0, 1.0).astype(np.float32)
