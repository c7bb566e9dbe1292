"""``regseg register``, ``eval`` and ``mni``: volume registration from the command line.

``register`` runs the RegistrationEngine (affine instance optimisation, then PLCReg) on one pair or
a batch (a CSV of pairs or a folder), writes the moved image, moved labels (nearest), the
displacement field (NIfTI, mm, on the fixed grid) and a JSON report per pair. ``eval`` scores any
moved/fixed pair and prints a table. ``mni`` writes the MNI152 evaluation set.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from regseg import spatial
from regseg.batch.manifest import SAFE_NAME
from regseg.cli_checks import check_checkpoint, check_writable, int_at_least
from regseg.errors import InputError
from regseg.imageio import Volume, load_mri, read_header, save_volume
from regseg.register_io import (  # noqa: F401 - the batch jobs and tests import them from here
    load_ddf_mm,
    load_label_map,
    load_landmarks,
    save_ddf_mm,
)
from regseg.register_options import (
    MAX_DEFAULT_THREADS,
    add_registration_options,
    default_threads,
)
from regseg.registration_metrics import (
    dice_per_label,
    hd95_mm,
    jacobian_stats,
    labels_present,
    nanmean,
    sample_field,
    tre_mm,
)

PAIR_COLUMNS = ("fixed", "moving")
OPTIONAL_COLUMNS = ("moving_labels", "fixed_labels", "landmarks", "name", "moving_fine_labels",
                    "fixed_fine_labels")
#: Label-map columns (paths): the tissue labels, and a fine parcellation (e.g. AAL's 116 regions,
#: which `regseg mni` writes) scored by Dice only: mean and the mean of the lowest 10 %.
LABEL_COLUMNS = ("moving_labels", "fixed_labels", "moving_fine_labels", "fixed_fine_labels")


def score(fixed_labels: Volume | None, moved_labels: Volume | None,
          ddf_mm: np.ndarray | None, voxel_to_world: np.ndarray,
          landmarks: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    """Dice and HD95 per label, Jacobian statistics and TRE, whichever the inputs allow."""
    out: dict[str, Any] = {}
    if fixed_labels is not None and moved_labels is not None:
        labels = labels_present(fixed_labels.data)
        dice = dice_per_label(moved_labels.data, fixed_labels.data, labels)
        spacing = np.linalg.norm(voxel_to_world[:3, :3], axis=0)
        hd = hd95_mm(moved_labels.data, fixed_labels.data, labels, spacing)
        out["dice"] = {str(k): v for k, v in dice.items()}
        out["dice_mean"] = nanmean(dice.values())
        out["hd95_mm"] = {str(k): v for k, v in hd.items()}
        out["hd95_mean_mm"] = nanmean(hd.values())
    if ddf_mm is not None:
        # mm -> voxels of the fixed grid, channel c along array axis c (I, J, K)
        to_vox = np.linalg.inv(voxel_to_world[:3, :3])
        ddf_vox = np.einsum("ab,ijkb->aijk", to_vox, ddf_mm)
        out.update(jacobian_stats(ddf_vox))
    if landmarks is not None and ddf_mm is not None:
        fixed_mm, moving_mm = landmarks
        ijk = spatial.apply(spatial.invert(voxel_to_world), fixed_mm)
        moved = fixed_mm + sample_field(np.moveaxis(ddf_mm, -1, 0), ijk)
        out.update(tre_mm(moved, moving_mm))
        out["tre_before_mm"] = tre_mm(fixed_mm, moving_mm)["tre_mm"]
    return out


def register_pair(engine: Any, pair: dict[str, str], out_dir: Path, *,
                  inverse: bool = False) -> dict[str, Any]:
    """Register one pair (paths in ``pair``), write its files and report; returns the report."""
    fixed = load_mri(pair["fixed"])
    moving = load_mri(pair["moving"])
    moving_labels = (load_label_map(pair["moving_labels"], moving, "moving label")
                     if pair.get("moving_labels") else None)
    fixed_labels = (load_label_map(pair["fixed_labels"], fixed, "fixed label")
                    if pair.get("fixed_labels") else None)
    landmarks = load_landmarks(pair["landmarks"]) if pair.get("landmarks") else None
    t0 = time.perf_counter()
    result = engine.register(fixed, moving, moving_labels, inverse=inverse)
    seconds = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    save_volume(result.moved, out_dir / "moved.nii.gz")
    if result.moved_labels is not None:
        save_volume(result.moved_labels, out_dir / "moved_labels.nii.gz")
    save_ddf_mm(result.ddf_mm, fixed.voxel_to_world, out_dir / "ddf_mm.nii.gz")
    if result.inverse_ddf_mm is not None:  # the same convention as the forward field
        save_ddf_mm(result.inverse_ddf_mm, fixed.voxel_to_world,
                    out_dir / "inverse_ddf_mm.nii.gz")
    report: dict[str, Any] = {
        "fixed": pair["fixed"], "moving": pair["moving"], "weights": engine.weights,
        "backend": engine.backend, "device": str(engine.device), "seconds": seconds,
        "timings_s": result.timings_s,
        # the settings that made it, so a report says how to reproduce it
        "settings": {"affine": engine.affine.mode, "affine_iterations": engine.affine.iterations,
                     "refine": engine.refine, "refine_lr": engine.refine_lr,
                     "refine_int_steps": engine.refine_int_steps,
                     "refine_regulariser": engine.refine_regulariser,
                     "refine_fine": engine.refine_fine, "refine_mode": engine.refine_mode},
    }
    if fixed_labels is not None and moving_labels is not None:
        before = Volume(*_on_fixed(moving_labels, fixed))
        report["dice_before_mean"] = score(fixed_labels, before, None, fixed.voxel_to_world,
                                           None)["dice_mean"]
    if pair.get("moving_fine_labels") and pair.get("fixed_fine_labels"):
        fine_moving = load_label_map(pair["moving_fine_labels"], moving, "moving fine label")
        fine_fixed = load_label_map(pair["fixed_fine_labels"], fixed, "fixed fine label")
        fine_moved = engine.warp_labels(fine_moving, fixed, result)
        save_volume(fine_moved, out_dir / "moved_fine_labels.nii.gz")
        report.update(score_fine(fine_fixed.data, fine_moved.data))
        report["dice_fine_before_mean"] = score_fine(
            fine_fixed.data, _on_fixed(fine_moving, fixed)[0])["dice_fine_mean"]
    report.update(score(fixed_labels, result.moved_labels, result.ddf_mm, fixed.voxel_to_world,
                        landmarks))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def score_fine(fixed: np.ndarray, moved: np.ndarray) -> dict[str, Any]:
    """Dice over a fine parcellation: the mean over the structures of the fixed map, the mean of
    the lowest 10 % of them (where registration fails first), and how many were scored."""
    labels = labels_present(fixed)
    dice = np.array([d for d in dice_per_label(moved, fixed, labels).values()], dtype=np.float64)
    if dice.size == 0:
        return {"dice_fine_mean": float("nan"), "dice_fine_low10": float("nan"),
                "fine_structures": 0}
    low = np.sort(dice)[:max(1, int(round(0.1 * dice.size)))]
    return {"dice_fine_mean": float(dice.mean()), "dice_fine_low10": float(low.mean()),
            "fine_structures": int(dice.size)}


def _on_fixed(labels: Volume, fixed: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Labels resampled (nearest, identity world transform) onto the fixed grid."""
    from regseg.engines.registration import resample_to_grid

    data, _ = resample_to_grid(labels, fixed.data.shape, fixed.voxel_to_world, mode="nearest")
    return data.astype(np.uint8), fixed.voxel_to_world


def read_pairs(source: str | Path) -> list[dict[str, str]]:
    """Pairs from a CSV (columns fixed, moving [, moving_labels, fixed_labels, landmarks, name])
    or a folder: its ``pairs.csv``, else every sub-folder holding fixed.nii.gz and moving.nii.gz.
    Relative paths in a CSV are relative to the CSV's folder.
    """
    source = Path(source)
    if source.is_dir():
        if (source / "pairs.csv").is_file():
            return read_pairs(source / "pairs.csv")
        pairs = []
        for sub in sorted(p for p in source.iterdir() if p.is_dir()):
            if (sub / "fixed.nii.gz").is_file() and (sub / "moving.nii.gz").is_file():
                pair = {"name": sub.name}
                for key in (*PAIR_COLUMNS, *LABEL_COLUMNS):
                    if (sub / f"{key}.nii.gz").is_file():
                        pair[key] = str(sub / f"{key}.nii.gz")
                if (sub / "landmarks.csv").is_file():
                    pair["landmarks"] = str(sub / "landmarks.csv")
                pairs.append(pair)
        if not pairs:
            raise InputError(f"{source}: no pairs.csv and no sub-folder with fixed.nii.gz and "
                             "moving.nii.gz; nothing to register.")
        return pairs
    if not source.is_file():
        raise InputError(f"{source}: pairs file or folder not found")
    try:
        with source.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{source}: cannot read the pairs CSV ({exc}); UTF-8 text with a header "
                         f"{list(PAIR_COLUMNS)} is expected") from None
    if not rows or any(c not in rows[0] for c in PAIR_COLUMNS):
        raise InputError(f"{source}: a pairs CSV needs a header with columns {list(PAIR_COLUMNS)} "
                         f"(optional {list(OPTIONAL_COLUMNS)}) and at least one row")
    pairs = []
    for n, row in enumerate(rows):
        line = n + 2  # the header is line 1
        if None in row:  # DictReader puts the fields beyond the header under None
            raise InputError(f"{source} line {line}: {len(row) - 1 + len(row[None])} fields, more "
                             f"than the header's {len(row) - 1}; one value per column expected")
        missing = [c for c in PAIR_COLUMNS if not (row.get(c) or "").strip()]
        if missing:
            raise InputError(f"{source} line {line}: no value for {missing} (row {row}); every "
                             f"row needs {list(PAIR_COLUMNS)}. Nothing was registered.")
        pair = {"name": (row.get("name") or "").strip() or f"pair{n:03d}"}
        if not SAFE_NAME.match(pair["name"]) or pair["name"] == "summary.json":
            raise InputError(f"{source} line {line}: name {pair['name']!r} cannot name an output "
                             "folder inside --out; use letters, digits, '.', '_' and '-' (not "
                             "first). Nothing was registered.")
        for key in (*PAIR_COLUMNS, *LABEL_COLUMNS, "landmarks"):
            if row.get(key):
                path = Path(row[key])
                pair[key] = str(path if path.is_absolute() else source.parent / path)
        pairs.append(pair)
    return pairs


def check_pairs(pairs: list[dict[str, str]]) -> None:
    """Every pair complete and every file it names readable (NIfTI headers checked, landmark
    CSVs parsed) before the first pair is registered, so a bad row never leaves a batch half
    done. Pair names must differ (each names its output folder).

    Raises:
        InputError: the first bad pair, naming its name, the field and the file.
    """
    names: set[str] = set()
    for pair in pairs:
        name = pair.get("name", "")
        if name in names:
            raise InputError(f"pair name {name!r} is used twice; pair names name the output "
                             "folders and must differ")
        names.add(name)
        for key in PAIR_COLUMNS:
            if not pair.get(key):
                raise InputError(f"pair {name!r}: no {key} image given")
        for key in (*PAIR_COLUMNS, *LABEL_COLUMNS):
            if pair.get(key):
                try:
                    read_header(pair[key], key.replace("_", " "))
                except InputError as exc:
                    raise InputError(f"pair {name!r}: {exc}") from None
        if pair.get("landmarks"):
            load_landmarks(pair["landmarks"])


def _device_name(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (CUDA must be there when asked for)."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise InputError(f"--device {text!r}: not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {text}: CUDA is not available here; use --device cpu")
    return text


def run_register(args: argparse.Namespace) -> int:
    """``regseg register``: one pair (--fixed/--moving) or a batch (--pairs)."""
    started = time.perf_counter()
    import torch
    from tqdm import tqdm

    from regseg.engines.registration import RegistrationEngine

    if bool(args.pairs) == bool(args.fixed or args.moving):
        raise InputError("give either --fixed and --moving (one pair) or --pairs (a CSV or a "
                         "folder of pairs), not both and not neither")
    if args.pairs is None and not (args.fixed and args.moving):
        raise InputError("one pair needs both --fixed and --moving")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    check_writable(out / "report.json", "--out")
    from regseg.engines.registration import SHIPPED
    from regseg.models.registry import WEIGHTS_DIR

    check_checkpoint(args.weights, "--weights", "plcreg", ndim=3,
                     shipped={name: WEIGHTS_DIR / f"{name}.pt" for name in SHIPPED})
    device = _device_name(args.device)
    pairs = read_pairs(args.pairs) if args.pairs else [{
        "name": "", "fixed": args.fixed, "moving": args.moving,
        "moving_labels": args.moving_labels or "", "fixed_labels": args.fixed_labels or "",
        "moving_fine_labels": args.moving_fine_labels or "",
        "fixed_fine_labels": args.fixed_fine_labels or "",
        "landmarks": args.landmarks or ""}]
    check_pairs(pairs)
    torch.set_num_threads(args.threads or default_threads())
    engine = RegistrationEngine(args.weights, backend=args.backend, device=device,
                                affine_iterations=0 if args.no_affine else args.affine_iterations,
                                affine=args.affine,
                                refine=args.refine, refine_fine=args.refine_fine,
                                refine_mode=args.refine_mode)
    startup_s = time.perf_counter() - started  # imports, checks, model load: not in any pair's
    reports = []
    for pair in tqdm(pairs, desc="register", unit="pair", disable=len(pairs) == 1):
        reports.append(register_pair(engine, pair, out / pair["name"], inverse=args.inverse))
    keys = ("dice_before_mean", "dice_mean", "dice_fine_before_mean", "dice_fine_mean",
            "dice_fine_low10", "hd95_mean_mm", "folding_pct", "sdlogj", "tre_before_mm", "tre_mm",
            "seconds")
    summary = {k: nanmean(r.get(k, float("nan")) for r in reports) for k in keys}
    summary["pairs"] = len(reports)
    summary["startup_s"] = startup_s
    summary["wall_s"] = time.perf_counter() - started
    summary["threads"] = torch.get_num_threads()
    if len(reports) > 1:
        (out / "summary.json").write_text(json.dumps(
            {"summary": summary, "pairs": reports}, indent=2) + "\n")
    # A single pair is named by its output folder (it was labelled 'fixed.nii.gz').
    print_table([{"name": p["name"] or out.name or str(out), **r}
                 for p, r in zip(pairs, reports, strict=True)], keys)
    print(f"{len(reports)} pair(s) in {summary['wall_s']:.1f} s: start-up {startup_s:.1f} s "
          f"(imports, checks, model load), then {summary['seconds']:.2f} s per pair (the table's "
          f"'seconds'), {summary['threads']} CPU thread(s)")
    print(f"wrote {out}")
    return 0


def print_table(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """A plain text table of the numeric ``keys`` per row, and their mean."""
    shown = [k for k in keys if any(k in r for r in rows)]
    width = max([12, *(len(str(r["name"])) for r in rows)])
    print("  ".join(["pair".ljust(width)] + [k.rjust(16) for k in shown]))
    for r in rows + ([{"name": "mean", **{k: nanmean(x.get(k, float("nan")) for x in rows)
                                          for k in shown}}] if len(rows) > 1 else []):
        cells = [f"{r.get(k, float('nan')):16.4f}" for k in shown]
        print("  ".join([str(r["name"]).ljust(width)] + cells))


def add_register_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed", help="fixed image, 3-D NIfTI")
    p.add_argument("--moving", help="moving image, 3-D NIfTI (any grid; resampled to the fixed)")
    p.add_argument("--moving-labels", help="labels on the moving grid, warped with nearest")
    p.add_argument("--fixed-labels", help="labels on the fixed grid: adds Dice and HD95")
    p.add_argument("--landmarks", help="CSV fixed_x..moving_z (world mm): adds TRE")
    p.add_argument("--moving-fine-labels",
                   help="a fine parcellation on the moving grid (e.g. AAL), warped with nearest")
    p.add_argument("--fixed-fine-labels",
                   help="the same parcellation on the fixed grid: adds fine Dice (mean, "
                   "lowest 10 %%)")
    p.add_argument("--pairs", help="batch: a CSV of pairs or a folder (see `regseg mni`)")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per pair)")
    p.add_argument("--weights", default="plcreg3d", help="PLCReg 3-D checkpoint (default shipped)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", default="eager", help="engine backend (default eager)")
    add_registration_options(p)
    p.add_argument("--no-affine", action="store_true", help="skip the affine stage")
    p.add_argument("--inverse", action="store_true",
                   help="also write the inverse displacement, inverse_ddf_mm.nii.gz (world mm on "
                   "the fixed grid, as ddf_mm.nii.gz: moving-side point z -> z + inverse(z))")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help=f"torch CPU threads (default: the CPUs available, at most "
                   f"{MAX_DEFAULT_THREADS}; see the README's threads table)")
    p.set_defaults(func=run_register)
