"""Registration pseudo-labels (WarpSeg stage A): a labelled atlas registered to unlabelled images.

The atlas is the *moving* image and each unlabelled image the *fixed* one, so the atlas labels are
resampled straight onto the image's grid through the registration's ``fixed -> moving`` map: no
field inversion is needed (as in WarpSeg, ARCHITECTURES.md §5.1). The registration is
:class:`regseg.engines.registration.RegistrationEngine` (affine instance optimisation, then PLCReg
3-D, optionally instance-refined), run on a region of interest: the atlas labels' bounding box plus
a margin, cut from both images in world mm, so that the structures to label and not the whole field
of view drive the similarity. Outside that box the pseudo-label is background.

Each pseudo-label comes with its registration quality -- the normalised cross-correlation of the
image and the moved atlas inside the box, and the % of folding voxels of the map -- so a training
recipe can down-weight or drop the worst (:func:`quality_weight`).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from regseg.errors import InputError
from regseg.imageio import Volume, load_mri, save_volume
from regseg.registration_metrics import jacobian_stats

#: How labels go through the map: nearest neighbour, or each label's indicator trilinearly then
#: the most probable label per voxel (smoother boundaries, the same label set).
INTERPOLATIONS = ("nearest", "linear")
QUALITY_FIELDS = ("image", "labels", "ncc", "folding_pct", "seconds", "weight")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class PseudoLabel:
    """The atlas labels on one image's grid and how well the atlas fitted there."""

    labels: Volume  # uint8 on the image's grid; background outside the region of interest
    ncc: float  # normalised cross-correlation of image and moved atlas inside the box, [-1, 1]
    folding_pct: float  # % of box voxels where the map folds (det J <= 0)
    seconds: float  # registration and warping


def label_box(labels: Volume, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """World-mm corners (min, max) of the non-zero labels' bounding box grown by ``margin_mm``.

    Raises:
        InputError: the label map is empty.
    """
    idx = np.argwhere(labels.data > 0)
    if idx.size == 0:
        raise InputError(f"{labels.path or 'atlas labels'}: no non-zero label; an atlas needs "
                         "at least one labelled structure")
    corners = np.array([[a, b, c] for a in (idx[:, 0].min(), idx[:, 0].max())
                        for b in (idx[:, 1].min(), idx[:, 1].max())
                        for c in (idx[:, 2].min(), idx[:, 2].max())], dtype=np.float64)
    world = corners @ labels.voxel_to_world[:3, :3].T + labels.voxel_to_world[:3, 3]
    return world.min(0) - margin_mm, world.max(0) + margin_mm


def crop_to_box(volume: Volume, box_mm: tuple[np.ndarray, np.ndarray]) -> tuple[Volume, tuple]:
    """The voxels of ``volume`` inside a world box, and the index slices they came from."""
    lo_mm, hi_mm = box_mm
    corners = np.array([[a, b, c] for a in (lo_mm[0], hi_mm[0]) for b in (lo_mm[1], hi_mm[1])
                        for c in (lo_mm[2], hi_mm[2])])
    to_vox = np.linalg.inv(volume.voxel_to_world)
    vox = corners @ to_vox[:3, :3].T + to_vox[:3, 3]
    lo = np.clip(np.floor(vox.min(0)).astype(int), 0, volume.data.shape)
    hi = np.clip(np.ceil(vox.max(0)).astype(int) + 1, 0, volume.data.shape)
    if np.any(hi - lo < 4):
        raise InputError(f"{volume.path or 'image'}: the atlas region of interest {lo_mm.round(1)}"
                         f"..{hi_mm.round(1)} mm lies (almost) outside this image's field of view;"
                         " both must be in the same world space (e.g. both scanner RAS)")
    slices = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    matrix = volume.voxel_to_world.copy()
    matrix[:3, 3] = volume.voxel_to_world[:3, :3] @ lo + volume.voxel_to_world[:3, 3]
    return Volume(np.ascontiguousarray(volume.data[slices]), matrix, volume.path), slices


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Global normalised cross-correlation of two arrays of one shape (1: identical up to gain)."""
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def pseudolabel(engine, atlas: Volume, atlas_labels: Volume, image: Volume, *,
                roi_margin_mm: float | None = 12.0,
                interpolation: str = "nearest") -> PseudoLabel:
    """Register the atlas to ``image`` and carry its labels over.

    Args:
        engine: a :class:`regseg.engines.registration.RegistrationEngine` (3-D weights).
        atlas, atlas_labels: the labelled atlas (one grid).
        image: the unlabelled image (the fixed image).
        roi_margin_mm: margin around the atlas labels' box; None: register whole images.
        interpolation: one of :data:`INTERPOLATIONS`.
    Returns:
        the :class:`PseudoLabel` on ``image``'s grid.
    """
    if interpolation not in INTERPOLATIONS:
        raise InputError(f"interpolation {interpolation!r}: choose one of {list(INTERPOLATIONS)}")
    t0 = time.perf_counter()
    if roi_margin_mm is None:
        fixed, slices = image, tuple(slice(0, n) for n in image.data.shape)
    else:
        box = label_box(atlas_labels, roi_margin_mm)
        fixed, slices = crop_to_box(image, box)
    if interpolation == "nearest":
        result = engine.register(fixed, atlas, atlas_labels)
        moved_labels = result.moved_labels.data
    else:
        result = engine.register(fixed, atlas)
        present = np.unique(atlas_labels.data)
        probs = [_warp_linear(engine, Volume((atlas_labels.data == c).astype(np.float32),
                                             atlas_labels.voxel_to_world), fixed, result)
                 for c in present]
        moved_labels = present[np.argmax(np.stack(probs), axis=0)].astype(np.uint8)
    full = np.zeros(image.data.shape, dtype=np.uint8)
    full[slices] = moved_labels
    folding = jacobian_stats(result.ddf)["folding_pct"]
    return PseudoLabel(labels=Volume(full, image.voxel_to_world.copy()),
                       ncc=ncc(fixed.data, result.moved.data), folding_pct=folding,
                       seconds=time.perf_counter() - t0)


def _warp_linear(engine, volume: Volume, fixed: Volume, result) -> np.ndarray:
    """A moving-grid float volume through a computed registration onto the fixed grid
    (trilinear), the way the engine resamples its moving image."""
    import torch

    ddf = torch.as_tensor(result.ddf, dtype=torch.float32, device=engine.device)[None]
    return engine._resample_moving(volume, None, fixed, ddf)[0].data


def quality_weight(ncc_value: float, folding_pct: float, *, min_ncc: float = 0.3,
                   max_folding_pct: float = 1.0) -> float:
    """A training weight in [0, 1] from a pseudo-label's quality: 0 (dropped) when the NCC is
    below ``min_ncc`` or the map folds on more than ``max_folding_pct`` % of voxels, else the NCC
    rescaled linearly from ``min_ncc`` (weight 0) to 1 (weight 1)."""
    if not np.isfinite(ncc_value) or ncc_value < min_ncc or folding_pct > max_folding_pct:
        return 0.0
    return float((ncc_value - min_ncc) / (1.0 - min_ncc))


def image_stem(path: Path) -> str:
    """``case.nii.gz`` -> ``case``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def list_images(images_dir: Path) -> list[Path]:
    """The NIfTI files of a folder, sorted.

    Raises:
        InputError: not a folder, or no ``.nii``/``.nii.gz`` file in it.
    """
    if not images_dir.is_dir():
        raise InputError(f"--images {images_dir}: not a folder; a folder of .nii.gz images is "
                         "expected")
    images = sorted(p for p in images_dir.iterdir()
                    if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if not images:
        raise InputError(f"--images {images_dir}: no .nii or .nii.gz file in it")
    return images


def read_quality(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The quality rows already in ``out_dir/quality.json`` (image stem -> row)."""
    path = out_dir / "quality.json"
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text())["images"]
        return {row["image"]: row for row in rows}
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a quality file written by `regseg pseudolabel` ({exc}); "
                         "remove it or choose another --out") from None


def write_quality(out_dir: Path, rows: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    """``quality.json`` ({"meta", "images": [rows]}) and ``quality.csv``, written atomically."""
    ordered = [rows[k] for k in sorted(rows)]
    tmp = out_dir / ".quality.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "images": ordered}, indent=1) + "\n")
    tmp.replace(out_dir / "quality.json")
    tmp = out_dir / ".quality.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=QUALITY_FIELDS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in QUALITY_FIELDS} for row in ordered)
    tmp.replace(out_dir / "quality.csv")


def pseudolabel_folder(engine, atlas: Volume, atlas_labels: Volume, images: Sequence[Path],
                       out_dir: Path, *, roi_margin_mm: float | None = 12.0,
                       interpolation: str = "nearest", meta: dict[str, Any] | None = None,
                       on_done: Callable[[str, bool], None] | None = None
                       ) -> dict[str, dict[str, Any]]:
    """Pseudo-label every image into ``out_dir/<stem>_labels.nii.gz``; resumable.

    An image whose label file and quality row both exist is skipped. Each label file is written to
    a temporary name and renamed, and the quality files are rewritten after every image, so an
    interrupted run leaves only whole outputs.

    Args:
        on_done: called with (stem, skipped) after each image (a progress bar).
    Returns:
        image stem -> quality row (:data:`QUALITY_FIELDS`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_quality(out_dir)
    meta = dict(meta or {})
    for path in images:
        stem = image_stem(path)
        out = out_dir / f"{stem}_labels.nii.gz"
        if out.is_file() and stem in rows:
            if on_done:
                on_done(stem, True)
            continue
        image = load_mri(path)
        result = pseudolabel(engine, atlas, atlas_labels, image, roi_margin_mm=roi_margin_mm,
                             interpolation=interpolation)
        tmp = out_dir / f".{stem}_labels.tmp.nii.gz"
        save_volume(result.labels, tmp)
        os.replace(tmp, out)
        rows[stem] = {"image": stem, "labels": out.name, "ncc": round(result.ncc, 5),
                      "folding_pct": round(result.folding_pct, 5),
                      "seconds": round(result.seconds, 3),
                      "weight": round(quality_weight(result.ncc, result.folding_pct), 5)}
        write_quality(out_dir, rows, meta)
        if on_done:
            on_done(stem, False)
    return rows
