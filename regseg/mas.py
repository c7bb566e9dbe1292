"""Cross-modality multi-atlas segmentation (seed 001): register every atlas, then fuse.

``segment_target`` is the whole method: each atlas (image + labels, any modality) is registered
to the target with :func:`regseg.crossmodal.register_cross_modal` (labels warped as one-hot
probabilities onto the target grid), then :class:`regseg.engines.label_fusion.LabelFusionEngine`
fuses them (vote, jlf, simnet, staple). ``regseg mas`` (regseg/mas_cli.py), ``bench/mas.py``
and the batch job (:func:`load_case` / :func:`compute_case` / :func:`write_case`) call it.

Atlas sets: a folder of ``NAME.nii.gz`` + ``NAME_labels.nii.gz`` pairs, or a CSV with columns
``image,labels[,name]`` (paths relative to the CSV's folder). Labels are integer maps 0..255
(0 background); the prostate sweep uses 1 gland, 2 lesion, the brain variant AAL's ids.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from regseg.errors import InputError
from regseg.imageio import Volume, load_mri, save_volume

LABEL_SUFFIXES = ("_labels.nii.gz", "_labels.nii")
REGISTRATIONS = ("affine", "biregnet")
INITIALS = ("centre", "identity")
#: Gland centroid minus swept-volume centroid (Reference mm) of simulated sweeps, the mean over
#: regseg.sim.sweep.TRAIN_SEEDS 11000..11005 (measured: (2.8, -12.0, 1.6), (-0.3, -14.9, 0.0),
#: (1.3, -15.9, 1.7), (1.9, -14.8, 0.8), (-0.6, -17.0, 2.8), (-0.7, -12.6, -1.0)): the probe
#: sweeps from below the gland. bench/mas.py and train/simnet.py start from it.
SWEEP_GLAND_OFFSET_MM = (0.7, -14.5, 1.0)


@dataclass(frozen=True)
class Atlas:
    """One labelled image: ``labels`` on ``image``'s grid."""

    name: str
    image: Volume
    labels: Volume


@dataclass
class MasResult:
    """Fused ``labels`` on the target grid, each atlas's mean fusion weight, timings (s)."""

    labels: Volume
    atlas_names: list[str]
    atlas_weights: np.ndarray
    seconds: dict[str, float]
    registration_s: list[float] = field(default_factory=list)
    contested_fraction: float = 0.0


def atlas_entries(source: str | Path) -> list[dict[str, str]]:
    """``[{"name", "image", "labels"}]`` of an atlas folder or CSV (module docstring).

    Raises:
        InputError: missing source, an image without its labels file, a CSV without the
            ``image``/``labels`` columns or with an empty value, no atlases.
    """
    source = Path(source)
    if source.is_dir():
        entries = []
        for path in sorted(source.iterdir()):
            name = path.name
            if not name.endswith((".nii", ".nii.gz")) or name.endswith(LABEL_SUFFIXES):
                continue
            stem = name.removesuffix(".gz").removesuffix(".nii")
            labels = [source / (stem + s) for s in LABEL_SUFFIXES
                      if (source / (stem + s)).is_file()]
            if not labels:
                raise InputError(f"{path}: atlas image without labels; expected "
                                 f"{source / (stem + LABEL_SUFFIXES[0])} beside it (every "
                                 "image in an atlas folder needs NAME_labels.nii.gz)")
            entries.append({"name": stem, "image": str(path), "labels": str(labels[0])})
        if not entries:
            raise InputError(f"{source}: no atlases in this folder; expected NAME.nii.gz + "
                             "NAME_labels.nii.gz pairs (or pass a CSV with columns image,labels)")
        return entries
    if not source.is_file():
        raise InputError(f"--atlases {source}: not found; a folder of NAME.nii.gz + "
                         "NAME_labels.nii.gz pairs or a CSV with columns image,labels expected")
    if source.suffix.lower() != ".csv":
        raise InputError(f"--atlases {source}: a folder or a .csv file expected, got a "
                         f"{source.suffix or 'suffix-less'} file")
    from regseg.batch.manifest import read_manifest

    return [{"name": c["name"], "image": c["image"], "labels": c["labels"]}
            for c in read_manifest(source, ("image", "labels"), ("image", "labels"))]


def load_atlases(entries: list[dict[str, str]]) -> list[Atlas]:
    """Read every atlas (image as float32, labels as uint8 on the image's grid)."""
    from regseg.register_cli import load_label_map

    out = []
    for e in entries:
        image = load_mri(e["image"])
        labels = load_label_map(e["labels"], image, "atlas label")
        if not labels.data.any():
            raise InputError(f"{e['labels']}: atlas labels are all 0 (background); an atlas "
                             "needs at least one labelled structure")
        out.append(Atlas(e["name"], image, labels))
    return out


def class_count(atlases: list[Atlas]) -> int:
    """Number of label classes (max label over the atlases + 1, at least 2)."""
    return max(2, 1 + max(int(a.labels.data.max()) for a in atlases))


def centroid_mm(volume: Volume, mask: np.ndarray) -> np.ndarray:
    """World (mm) centroid of a mask's voxels; the grid centre for an empty mask."""
    ijk = np.argwhere(mask)
    if len(ijk) == 0:
        ijk = (np.asarray(mask.shape)[None] - 1) / 2.0
    return (ijk @ volume.voxel_to_world[:3, :3].T + volume.voxel_to_world[:3, 3]).mean(0)


def initial_transform(atlas: Atlas, target: Volume, initial: str = "centre",
                      target_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
                      ) -> np.ndarray:
    """Start of the atlas registration, target world mm -> atlas world mm (4, 4).

    ``centre``: the translation taking the target's non-zero (swept) voxels' centroid, plus
    ``target_offset_mm``, to the centroid of the atlas's labelled voxels (the target needs no
    labels); ``identity``: both already in one world (e.g. MNI space).
    """
    if initial not in INITIALS:
        raise InputError(f"--initial {initial!r}: choose one of {list(INITIALS)}")
    out = np.eye(4)
    if initial == "centre":
        start = centroid_mm(target, target.data > 0) + np.asarray(target_offset_mm, float)
        out[:3, 3] = centroid_mm(atlas.image, atlas.labels.data > 0) - start
    return out


def segment_target(target: Volume, atlases: list[Atlas], *, method: str = "simnet",
                   registration: str = "affine", device: str = "cpu",
                   threads: int | None = None, fusion: Any = None,
                   initial: str = "centre",
                   target_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
                   progress: Callable[[Any], Any] | None = None) -> MasResult:
    """Register every atlas to ``target`` and fuse their labels (module docstring).

    Args:
        method: a LabelFusionEngine method; ignored when ``fusion`` (a built engine) is given.
        registration: ``register_cross_modal``'s method (``biregnet`` or ``affine``).
        initial, target_offset_mm: where each registration starts (:func:`initial_transform`).
        progress: wraps the atlas iterable (e.g. ``tqdm``) for a progress bar.
    """
    from regseg.crossmodal import register_cross_modal
    from regseg.engines.label_fusion import LabelFusionEngine

    if not atlases:
        raise InputError("multi-atlas segmentation needs at least one atlas")
    t0 = time.perf_counter()
    fusion = fusion or LabelFusionEngine(method, device=device)
    n_classes = class_count(atlases)
    images, onehots, reg_s = [], [], []
    t_reg = time.perf_counter()
    for atlas in (progress(atlases) if progress else atlases):
        start = initial_transform(atlas, target, initial, target_offset_mm)
        result = register_cross_modal(atlas.image, atlas.labels, target, n_classes=n_classes,
                                      initial_fixed_to_moving=start, method=registration,
                                      device=device, threads=threads)
        images.append(result.warped_image)
        onehots.append(result.warped_onehot)
        reg_s.append(float(result.seconds))
    t_fuse = time.perf_counter()
    fused = fusion(target.data, np.stack(images), np.stack(onehots))
    t_end = time.perf_counter()
    return MasResult(
        labels=Volume(fused.labels, target.voxel_to_world, ""),
        atlas_names=[a.name for a in atlases], atlas_weights=fused.atlas_weights,
        seconds={"setup": round(t_reg - t0, 3), "registration": round(t_fuse - t_reg, 3),
                 "fusion": round(t_end - t_fuse, 3), "total": round(t_end - t0, 3)},
        registration_s=reg_s, contested_fraction=fused.contested_fraction)


def score(pred: np.ndarray, truth: np.ndarray, voxel_to_world: np.ndarray) -> dict[str, Any]:
    """Dice and HD95 (mm). Prostate label sets (values <= 2): gland (1, lesion included) and
    lesion (2); other label sets (the brain): mean Dice over the truth's structures only."""
    from regseg.metrics import dice
    from regseg.registration_metrics import hd95_mm

    spacing = np.linalg.norm(voxel_to_world[:3, :3], axis=0)
    if int(truth.max()) <= 2:
        out: dict[str, Any] = {}
        for name, k in (("gland", 1), ("lesion", 2)):
            p = (pred >= k) if k == 1 else (pred == k)
            t = (truth >= k) if k == 1 else (truth == k)
            out[f"{name}_dice"] = dice(pred, truth, k)
            out[f"{name}_hd95_mm"] = hd95_mm(p.astype(np.uint8), t.astype(np.uint8), [1],
                                             spacing)[1]
        return out
    from regseg.register_cli import score_fine

    fine = score_fine(truth, pred)
    return {"dice_mean": fine["dice_fine_mean"], "dice_low10": fine["dice_fine_low10"],
            "structures": fine["fine_structures"]}


def write_outputs(out_dir: Path, result: MasResult, report: dict[str, Any]) -> dict[str, str]:
    """``labels.nii.gz``, ``atlas_weights.csv`` and ``report.json`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"labels": out_dir / "labels.nii.gz", "weights": out_dir / "atlas_weights.csv",
             "report": out_dir / "report.json"}
    save_volume(result.labels, paths["labels"])
    rows = ["atlas,mean_weight,registration_s"] + [
        f"{n},{w:.6f},{s:.3f}" for n, w, s in zip(result.atlas_names, result.atlas_weights,
                                                  result.registration_s, strict=True)]
    paths["weights"].write_text("\n".join(rows) + "\n")
    paths["report"].write_text(json.dumps(_nan_to_none(report), indent=2) + "\n")
    return {k: str(v) for k, v in paths.items()}


def _nan_to_none(value: Any) -> Any:
    """NaN (a structure absent from both maps) as JSON null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def make_report(result: MasResult, method: str, registration: str,
                truth: Volume | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "method": method, "registration": registration, "atlases": result.atlas_names,
        "atlas_weights": {n: float(w) for n, w in zip(result.atlas_names, result.atlas_weights,
                                                      strict=True)},
        "contested_fraction": result.contested_fraction, "seconds": result.seconds,
        "registration_s_per_atlas": result.registration_s}
    if truth is not None:
        report["metrics"] = score(result.labels.data, truth.data, truth.voxel_to_world)
    return report


# batch job (regseg batch mas): manifest columns target, atlases [, truth, name] ----------------
@dataclass
class MasEngine:
    """What one rank of ``regseg batch mas`` builds once: the fusion engine and the options."""

    fusion: Any
    registration: str = "affine"
    initial: str = "centre"
    target_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


def make_mas_engine(args: Any, device: Any) -> MasEngine:
    """The batch job's ``make_engine``: reads ``method``, ``registration``, ``initial`` and
    ``target_offset_mm`` from the parsed options (the ``regseg mas`` defaults when absent)."""
    from regseg.engines.label_fusion import LabelFusionEngine

    return MasEngine(LabelFusionEngine(getattr(args, "method", None) or "simnet", device=device),
                     getattr(args, "registration", None) or "affine",
                     getattr(args, "initial", None) or "centre",
                     tuple(getattr(args, "target_offset_mm", None) or (0.0, 0.0, 0.0)))


def load_case(case: dict[str, str]) -> dict[str, Any]:
    """A manifest row -> inputs: ``target`` (image), ``atlases`` (folder or CSV), ``truth``."""
    from regseg.register_cli import load_label_map

    target = load_mri(case["target"])
    return {"target": target, "atlases": load_atlases(atlas_entries(case["atlases"])),
            "truth": (load_label_map(case["truth"], target, "truth label")
                      if case.get("truth") else None)}


def compute_case(engine: MasEngine, inputs: dict[str, Any]) -> dict[str, Any]:
    """Segment one loaded case (the batch job's ``compute``)."""
    result = segment_target(inputs["target"], inputs["atlases"], fusion=engine.fusion,
                            registration=engine.registration, initial=engine.initial,
                            target_offset_mm=engine.target_offset_mm,
                            device=str(engine.fusion.device))
    return {"result": result, "report": make_report(result, engine.fusion.method,
                                                    engine.registration, inputs["truth"])}


def write_case(folder: Path, inputs: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """labels.nii.gz, atlas_weights.csv, report.json; returns the metrics row."""
    write_outputs(Path(folder), out["result"], out["report"])
    return out["report"].get("metrics", {}) | {"seconds": out["report"]["seconds"]}


def run_case(row: dict[str, str], out_dir: str | Path, *, method: str = "simnet",
             registration: str = "affine", initial: str = "centre",
             target_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
             device: str = "cpu") -> dict[str, Any]:
    """One manifest row end to end (what ``regseg batch mas`` does per case); returns the
    report."""
    from regseg.engines.label_fusion import LabelFusionEngine

    inputs = load_case(row)
    engine = MasEngine(LabelFusionEngine(method, device=device), registration, initial,
                       target_offset_mm)
    out = compute_case(engine, inputs)
    write_case(Path(out_dir), inputs, out)
    return out["report"]
