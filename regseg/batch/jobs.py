"""The batch jobs: what a case needs (columns), how it is loaded, computed and written.

A job is three plain functions and a few names (:class:`Job`); :data:`JOBS` maps the job name of
``regseg batch JOB`` to it. ``load`` runs in the DataLoader's worker processes (NIfTI reading and
decompression overlap the compute), ``compute`` in the rank's process on its device, ``write``
in the rank's process into a fresh folder. Add a job (e.g. a network ``segment``) by adding one
entry.

- ``register``: a pair per case, as ``regseg register --pairs`` (columns fixed, moving
  [, moving_labels, fixed_labels, landmarks]); writes moved.nii.gz, moved_labels.nii.gz (with
  moving labels), ddf_mm.nii.gz; metrics Dice/HD95/folding/TRE as the inputs allow.
- ``segment``: single-atlas segmentation of an image per case (column image [, labels, atlas,
  atlas_labels]): the atlas (per case, or ``--atlas``/``--atlas-labels``) is registered to the
  image with the same engine and its labels carried over; writes labels.nii.gz; Dice/HD95
  against ``labels`` when given.
- ``mas``: cross-modality multi-atlas segmentation per case (column target [, atlases, truth]),
  as ``regseg mas`` (:mod:`regseg.mas`): every atlas of the set (per case, or ``--atlases``)
  registered to the target, the labels fused (``--method``); writes labels.nii.gz,
  atlas_weights.csv and report.json; Dice/HD95 against ``truth`` when given.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regseg.errors import InputError


@dataclass(frozen=True)
class Job:
    """One kind of batch job (see the module docstring)."""

    name: str
    required: tuple[str, ...]  # manifest columns every case fills
    file_columns: tuple[str, ...]  # columns holding paths
    make_engine: Callable[[argparse.Namespace, Any], Any]  # (options, device) -> engine
    load: Callable[[dict[str, str]], dict[str, Any]]  # case -> inputs (a worker process)
    compute: Callable[[Any, dict[str, Any]], dict[str, Any]]  # (engine, inputs) -> result
    write: Callable[[Path, dict[str, Any], dict[str, Any]], dict[str, Any]]  # -> metrics

    def options(self, args: argparse.Namespace) -> dict[str, Any]:
        """The options that change a case's outputs (part of its digest)."""
        keys = ("weights", "affine", "affine_iterations", "no_affine", "refine", "refine_fine",
                "refine_mode", "atlas", "atlas_labels", "atlases", "method", "registration",
                "initial", "target_offset_mm")
        return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _registration_engine(args: argparse.Namespace, device: Any) -> Any:
    from regseg.engines.registration import RegistrationEngine

    return RegistrationEngine(args.weights, backend=args.backend, device=device,
                              affine="none" if args.no_affine else args.affine,
                              affine_iterations=args.affine_iterations, refine=args.refine,
                              refine_fine=args.refine_fine, refine_mode=args.refine_mode)


# register ---------------------------------------------------------------------------------------
def load_pair(case: dict[str, str]) -> dict[str, Any]:
    from regseg.imageio import load_mri
    from regseg.register_cli import load_label_map, load_landmarks

    fixed, moving = load_mri(case["fixed"]), load_mri(case["moving"])
    return {
        "fixed": fixed, "moving": moving,
        "moving_labels": (load_label_map(case["moving_labels"], moving, "moving label")
                          if case.get("moving_labels") else None),
        "fixed_labels": (load_label_map(case["fixed_labels"], fixed, "fixed label")
                         if case.get("fixed_labels") else None),
        "landmarks": load_landmarks(case["landmarks"]) if case.get("landmarks") else None,
    }


def compute_pair(engine: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    from regseg.register_cli import score

    fixed = inputs["fixed"]
    result = engine.register(fixed, inputs["moving"], inputs["moving_labels"])
    metrics = score(inputs["fixed_labels"], result.moved_labels, result.ddf_mm,
                    fixed.voxel_to_world, inputs["landmarks"])
    metrics["timings_s"] = result.timings_s
    return {"result": result, "metrics": metrics}


def write_pair(folder: Path, inputs: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    from regseg.imageio import save_volume
    from regseg.register_cli import save_ddf_mm

    result = out["result"]
    save_volume(result.moved, folder / "moved.nii.gz")
    if result.moved_labels is not None:
        save_volume(result.moved_labels, folder / "moved_labels.nii.gz")
    save_ddf_mm(result.ddf_mm, inputs["fixed"].voxel_to_world, folder / "ddf_mm.nii.gz")
    return out["metrics"]


# segment (single atlas) -------------------------------------------------------------------------
def load_target(case: dict[str, str]) -> dict[str, Any]:
    from regseg.imageio import load_mri
    from regseg.register_cli import load_label_map

    if not case.get("atlas") or not case.get("atlas_labels"):
        raise InputError(f"case {case['name']!r}: no atlas; give columns atlas and atlas_labels "
                         "or --atlas and --atlas-labels")
    image, atlas = load_mri(case["image"]), load_mri(case["atlas"])
    return {
        "image": image, "atlas": atlas,
        "atlas_labels": load_label_map(case["atlas_labels"], atlas, "atlas label"),
        "labels": (load_label_map(case["labels"], image, "reference label")
                   if case.get("labels") else None),
    }


def compute_target(engine: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    from regseg.register_cli import score

    image = inputs["image"]
    result = engine.register(image, inputs["atlas"], inputs["atlas_labels"])
    metrics = score(inputs["labels"], result.moved_labels, None, image.voxel_to_world, None)
    metrics["timings_s"] = result.timings_s
    return {"labels": result.moved_labels, "metrics": metrics}


def write_target(folder: Path, inputs: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    from regseg.imageio import save_volume

    save_volume(out["labels"], folder / "labels.nii.gz")
    return out["metrics"]


# mas (multi-atlas) ------------------------------------------------------------------------------
def _mas_engine(args: argparse.Namespace, device: Any) -> Any:
    from regseg.mas import make_mas_engine

    return make_mas_engine(args, device)


def _mas_load(case: dict[str, str]) -> dict[str, Any]:
    from regseg.mas import load_case

    if not case.get("atlases"):
        raise InputError(f"case {case['name']!r}: no atlases; give a column atlases or --atlases")
    return load_case(case)


def _mas_compute(engine: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    from regseg.mas import compute_case

    return compute_case(engine, inputs)


def _mas_write(folder: Path, inputs: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    from regseg.mas import write_case

    return write_case(folder, inputs, out)


JOBS: dict[str, Job] = {
    "register": Job("register", ("fixed", "moving"),
                    ("fixed", "moving", "moving_labels", "fixed_labels", "landmarks"),
                    _registration_engine, load_pair, compute_pair, write_pair),
    "segment": Job("segment", ("image",), ("image", "labels", "atlas", "atlas_labels"),
                   _registration_engine, load_target, compute_target, write_target),
    "mas": Job("mas", ("target",), ("target", "atlases", "truth"),
               _mas_engine, _mas_load, _mas_compute, _mas_write),
}
