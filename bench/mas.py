"""Multi-atlas segmentation of held-out simulated TRUS sweeps: vote, STAPLE, JLF, SimNet compared.

Targets: the reconstructed 3-D TRUS sweeps of ``regseg.sim.sweep.EVAL_SEEDS`` cases (never
trained on); atlases: the labelled MRIs of ``ATLAS_SEEDS`` cases (SimNet was trained on
``TRAIN_SEEDS`` pairs only). Every atlas is registered once per target (regseg.crossmodal,
``--registration``, started at the centroid prior regseg.mas.SWEEP_GLAND_OFFSET_MM measured on
TRAIN_SEEDS); the four fusion methods then fuse the *same* registered atlases. Per case and
method: gland Dice (lesion included), lesion Dice, gland HD95 (mm), seconds (the case's
registrations, shared, plus the method's fusion). Also the single-atlas Dice (mean and best) as
the floor fusion must beat.

Merged in: ``bench/mas_registration.py``'s ``run(quick, threads)`` (MRI -> sweep TRE after the
tracking-only start, regseg and SimpleITK; speed-up). If it is missing or fails, the JSON says
so (``registration_error``) and its numbers are null.

``python bench/mas.py --quick --json F`` (4 targets, the registration bench's 1-pair quick mode;
the full run: 8 targets) writes top-level ``dice`` (method -> mean gland Dice: vote, staple,
jlf = MIND JLF, simnet, and jlf_intensity, the intensity JLF it replaced), ``mri_to_sweep_tre_mm``
and ``speedup_vs_simpleitk``, and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

METHODS = ("vote", "staple", "jlf", "simnet")
#: Also fused and reported (not one of the issue's four): JLF on intensities, antsJointFusion's
#: error, which MIND JLF (``jlf``) replaced across modalities.
EXTRA_METHODS = ("jlf_intensity",)
QUICK_TARGETS, FULL_TARGETS = 4, 8


@functools.lru_cache(maxsize=32)
def sweep_case(seed: int) -> Any:
    """regseg.sim.sweep.make_sweep_case, once per seed per process (a case takes ~6 s; the
    registration part reuses the fusion part's targets)."""
    from regseg.sim.sweep import make_sweep_case

    return make_sweep_case(seed)


class Capture:
    """A stand-in fusion engine that keeps the registered atlases, so every method then fuses
    the same ones (each target's atlases are registered once)."""

    device = torch.device("cpu")
    method = "capture"

    def __init__(self) -> None:
        from regseg.engines.label_fusion import LabelFusionEngine

        self.vote = LabelFusionEngine("vote")
        self.inputs: dict[str, Any] = {}

    def __call__(self, target: Any, images: Any, onehot: Any) -> Any:
        self.inputs = {"target": target, "images": images, "onehot": onehot}
        return self.vote(target, images, onehot)


def registered_atlases(case: Any, atlases: list[Any], registration: str, threads: int,
                       cache_dir: Path | None) -> tuple[dict[str, Any], float]:
    """The target's registered atlases (fusion inputs) and the registrations' seconds, from
    ``cache_dir`` when an earlier run left them there (its seconds are that run's)."""
    from regseg.mas import SWEEP_GLAND_OFFSET_MM, segment_target

    path = None if cache_dir is None else Path(cache_dir) / (
        f"mas-{case.seed}-{'-'.join(a.name for a in atlases)}-{registration}.pt")
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        return {k: saved[k].numpy() for k in ("target", "images", "onehot")}, float(
            saved["registration_s"])
    capture = Capture()
    result = segment_target(case.trus, atlases, registration=registration, threads=threads,
                            fusion=capture, initial="centre",
                            target_offset_mm=SWEEP_GLAND_OFFSET_MM)
    reg_s = result.seconds["registration"]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**{k: torch.as_tensor(np.asarray(v)) for k, v in capture.inputs.items()},
                    "registration_s": torch.tensor(reg_s)}, path)
    return capture.inputs, reg_s


def run_fusion(n_targets: int, n_atlases: int, registration: str, threads: int,
               progress: bool = True, simnet_weights: str = "simnet",
               cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """One row per (target, method) plus a ``single_atlas`` row per target."""
    from tqdm import tqdm

    from regseg.engines.label_fusion import LabelFusionEngine
    from regseg.mas import Atlas
    from regseg.metrics import dice
    from regseg.sim.sweep import ATLAS_SEEDS, EVAL_SEEDS

    torch.set_num_threads(threads)
    atlases = []
    for seed in ATLAS_SEEDS[:n_atlases]:
        case = sweep_case(seed)
        atlases.append(Atlas(f"atlas_{seed}", case.mri, case.mri_labels))
    engines = {m: LabelFusionEngine(m, simnet_weights=simnet_weights) for m in METHODS}
    engines["jlf_intensity"] = LabelFusionEngine("jlf", jlf_features="intensity")
    rows: list[dict[str, Any]] = []
    for seed in tqdm(EVAL_SEEDS[:n_targets], desc="mas targets", unit="case",
                     disable=not progress):
        case = sweep_case(seed)
        truth = case.trus_labels.data
        inputs, reg_s = registered_atlases(case, atlases, registration, threads, cache_dir)
        single = [dice(o.argmax(0), truth, 1) for o in inputs["onehot"]]
        rows.append({"seed": seed, "method": "single_atlas", "gland_dice": float(np.mean(single)),
                     "gland_dice_best": float(np.max(single)), "registration_s": reg_s})
        for name, engine in engines.items():
            fused = engine(**inputs)
            rows.append({"seed": seed, "method": name, "registration_s": reg_s,
                         "fusion_s": fused.seconds, "seconds": reg_s + fused.seconds,
                         **_scores(fused.labels, truth, case.trus.voxel_to_world)})
    return rows


def _scores(pred: np.ndarray, truth: np.ndarray, voxel_to_world: np.ndarray) -> dict[str, float]:
    from regseg.mas import score

    s = score(pred, truth, voxel_to_world)
    return {k: float(v) for k, v in s.items()}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in ("single_atlas", *METHODS, *EXTRA_METHODS):
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        row: dict[str, Any] = {"method": m, "cases": len(mine)}
        for key in ("gland_dice", "gland_dice_best", "lesion_dice", "gland_hd95_mm", "seconds",
                    "fusion_s"):
            values = [r[key] for r in mine if key in r and r[key] is not None]
            if values:
                row[key] = float(np.nanmean(values))
        out.append(row)
    return out


def registration_part(quick: bool, threads: int, progress: bool = True) -> dict[str, Any]:
    """bench/mas_registration.py's result, or nulls and the reason it is missing."""
    try:
        import mas_registration

        return mas_registration.run(quick=quick, threads=threads, make_case=sweep_case,
                                    progress=progress)
    except Exception as exc:  # noqa: BLE001 - any failure is reported, never hidden
        return {"mri_to_sweep_tre_mm": {"initial": None, "regseg": None, "simpleitk": None},
                "speedup_vs_simpleitk": None,
                "registration_error": f"{type(exc).__name__}: {exc}",
                "registration_traceback": traceback.format_exc(limit=3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_TARGETS} targets x 4 atlases and the registration bench's "
                   "quick mode")
    p.add_argument("--targets", type=int, default=None,
                   help=f"held-out targets (default {QUICK_TARGETS} quick, {FULL_TARGETS} full)")
    p.add_argument("--atlases", type=int, default=4, help="atlases per target (default 4)")
    p.add_argument("--registration", choices=("affine", "biregnet"), default="affine",
                   help="atlas registration (default affine: what SimNet was trained on)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--simnet-weights", default="simnet",
                   help="SimNet checkpoint (default the shipped models/weights/simnet.pt)")
    p.add_argument("--skip-registration-bench", action="store_true",
                   help="leave out bench/mas_registration.py (its keys are then null)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="keep each target's registered atlases here and reuse them (their "
                   "seconds are then the first run's); default: none, register every time")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    n_targets = args.targets or (QUICK_TARGETS if args.quick else FULL_TARGETS)
    n_atlases = args.atlases
    t0 = time.perf_counter()
    rows = run_fusion(n_targets, n_atlases, args.registration, args.threads,
                      not args.no_progress, args.simnet_weights, args.cache_dir)
    fusion_s = time.perf_counter() - t0
    table = summarise(rows)
    print(f"\nmulti-atlas segmentation, {n_targets} held-out sweeps (EVAL_SEEDS), {n_atlases} MRI "
          f"atlases (ATLAS_SEEDS), {args.registration} registration, {args.threads} thread(s)")
    print_table(table, [("method", "method", ""), ("gland_dice", "gland Dice", ".3f"),
                        ("lesion_dice", "lesion Dice", ".3f"),
                        ("gland_hd95_mm", "HD95 mm", ".2f"), ("seconds", "s/case", ".1f"),
                        ("fusion_s", "fusion s", ".2f")])
    if args.skip_registration_bench:
        reg = {"mri_to_sweep_tre_mm": {"initial": None, "regseg": None, "simpleitk": None},
               "speedup_vs_simpleitk": None, "registration_error": "skipped "
               "(--skip-registration-bench)"}
    else:
        reg = registration_part(args.quick, args.threads, not args.no_progress)
    tre = reg["mri_to_sweep_tre_mm"]
    print("\nMRI -> sweep registration TRE (mm): " + ", ".join(
        f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in tre.items())
        + (f"; regseg {reg['speedup_vs_simpleitk']}x faster than SimpleITK"
           if reg.get("speedup_vs_simpleitk") is not None else "")
        + (f"\nregistration bench missing: {reg['registration_error']}"
           if "registration_error" in reg else ""))
    dice = {r["method"]: r["gland_dice"] for r in table
            if r["method"] in METHODS + EXTRA_METHODS}
    if args.json:
        write_json(args.json, "mas", rows, argv,
                   dice=dice, lesion_dice={r["method"]: r.get("lesion_dice") for r in table
                                           if r["method"] in METHODS + EXTRA_METHODS},
                   summary=table, mri_to_sweep_tre_mm=tre,
                   speedup_vs_simpleitk=reg.get("speedup_vs_simpleitk"),
                   registration=reg, targets=n_targets, atlases=n_atlases,
                   atlas_registration=args.registration, threads=args.threads,
                   simnet_weights=args.simnet_weights,
                   registration_cache=str(args.cache_dir) if args.cache_dir else None,
                   fusion_part_s=round(fusion_s, 1),
                   total_s=round(time.perf_counter() - t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
