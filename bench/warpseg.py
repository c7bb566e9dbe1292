"""WarpSeg vs the registrations that label images: held-out phantom MRIs, one run, side by side.

Methods, each labelling the same held-out phantoms (seeds 9000..; WarpSeg trained on 100.. and
200.., validated on 300..303):

- ``pseudolabels``: atlas registration alone -- the training pseudo-labels' own recipe
  (:func:`regseg.pseudolabel.pseudolabel`: atlas phantom 100, RegistrationEngine affine + PLCReg 3-D
  + 25 refinement steps, inside the atlas labels' box + 12 mm);
- ``warpseg``: the shipped ``warpseg-prostate`` (regseg.engines.warpseg.WarpSegEngine);
- ``simpleitk``: SimpleITK affine + B-spline (mesh 6), Mattes MI (bench/registration.py's set-up,
  one thread) of the same atlas in the same box, registered at about 2 mm (every 2nd or 3rd voxel;
  brains at 6.5 mm, every 2nd), the labels warped (nearest) at full resolution;
- ``single_decoder``: the hierarchy ablation ``warpseg-prostate-single`` (one decoder, plain CE +
  Dice on the same hard pseudo-labels; ``regseg train warpseg --single-decoder``).

``--task brain`` runs the same four on MNI152-derived subjects 43000.. (3.25 mm grid; AAL fine,
lobe groups coarse; WarpSeg trained on 40000.. and 41000.., validated on 42000..42003): the atlas
is the template + AAL registered to the whole image with the brain pseudo-labels' own engine
(regseg.train.warpseg_brain.registration_engine: learned affine + MIND steps, PLCReg 3-D, 10
refinement steps), SimpleITK at the image's 3.25 mm, warpseg-brain and warpseg-brain-single.

Scores: Dice of the coarse class (prostate) and mean Dice of the fine classes (peripheral zone,
transition zone, lesion; NaN-free: a missed lesion counts 0), HD95 of the prostate (mm), seconds
per volume (wall, one process; run it under ``flock /tmp/regseg-cpu.lock``).

    python bench/warpseg.py [--task brain] [--quick] [--cases N] [--json F]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import device_name

from regseg.engines.registration import RegistrationEngine
from regseg.engines.warpseg import WarpSegEngine, shipped_path
from regseg.imageio import Volume
from regseg.pseudolabel import crop_to_box, label_box, pseudolabel
from regseg.registration_metrics import dice_per_label, hd95_mm
from regseg.sim.phantom import make_phantom
from regseg.train.warpseg_data import ATLAS_SEEDS0, PROSTATE_CONFIG, prostate_fine

METHODS = ("pseudolabels", "warpseg", "simpleitk", "single_decoder")
EVAL_SEED0 = 9000
#: SimpleITK registers the brains at every 2nd voxel (6.5 mm): at the subjects' own 3.25 mm one
#: subject took 542 s (50 iterations per stage, the 2-core CPU loaded), too long for the bench.
SITK_BRAIN_MM = 6.5
FINE = {1: "peripheral_zone", 2: "transition_zone", 3: "lesion"}


def score(fine_pred: np.ndarray, fine_truth: np.ndarray, groups: np.ndarray,
          spacing_mm: float, fine_names: dict[int, str] | None = None) -> dict[str, float]:
    """Mean Dice of the coarse and of the fine classes present in the truth (a class the method
    misses counts 0), mean coarse HD95 (mm; classes both maps hold), and with ``fine_names`` the
    Dice of each named fine class."""
    coarse_p, coarse_t = groups[fine_pred], groups[fine_truth]
    out = {}
    for level, pred, truth in (("coarse", coarse_p, coarse_t), ("fine", fine_pred, fine_truth)):
        present = [c for c in np.unique(truth).tolist() if c > 0]
        d = dice_per_label(pred, truth, present)
        d = {k: 0.0 if np.isnan(v) else float(v) for k, v in d.items()}
        out[level] = float(np.mean(list(d.values())))
        if level == "fine" and fine_names:
            out.update({name: d.get(k, 0.0) for k, name in fine_names.items()})
    hd = hd95_mm(coarse_p, coarse_t, None, spacing_mm=(spacing_mm,) * 3)
    out["hd95_mm"] = float(np.nanmean(list(hd.values()))) if hd else float("nan")
    return out


def simpleitk_labels(atlas: Volume, atlas_fine: Volume, image: Volume, margin_mm: float | None,
                     iterations: int, register_mm: float = 2.0) -> np.ndarray:
    """SimpleITK affine + B-spline (Mattes MI) of the atlas to ``image`` in the atlas labels' box,
    registered at about ``register_mm`` (every n-th voxel); the atlas's fine labels warped
    (nearest) onto ``image``'s grid (background outside)."""
    from registration import sitk_outputs, sitk_register

    if margin_mm is None:
        fixed, moving, moving_labels = image, atlas, atlas_fine
        slices = tuple(slice(0, n) for n in image.data.shape)
    else:
        box = label_box(atlas_fine, margin_mm)
        fixed, slices = crop_to_box(image, box)
        moving, _ = crop_to_box(atlas, box)
        moving_labels, _ = crop_to_box(atlas_fine, box)
    if moving.data.shape != fixed.data.shape or not np.allclose(moving.voxel_to_world,
                                                                 fixed.voxel_to_world):
        raise ValueError("bench: the phantoms are expected to share one grid")
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # as every other row: one thread
    spacing = float(image.voxel_to_world[0, 0])
    origin = fixed.voxel_to_world[:3, 3]
    step = max(1, int(round(register_mm / spacing)))  # voxel centres kept
    transform, _ = sitk_register(fixed.data[::step, ::step, ::step],
                                 moving.data[::step, ::step, ::step], spacing * step, origin,
                                 mesh=6, iterations=iterations, moments=True)
    reference = sitk.GetImageFromArray(np.ascontiguousarray(fixed.data.T.astype(np.float32)))
    reference.SetSpacing([spacing] * 3)
    reference.SetOrigin([float(o) for o in origin])
    moved, _ = sitk_outputs(transform, reference, moving_labels.data)
    out = np.zeros(image.data.shape, dtype=np.uint8)
    out[slices] = moved
    return out


def prostate_task(n: int):
    """(atlas, atlas fine classes, ROI margin, cases generator, groups, named fine classes)."""
    atlas_case = make_phantom(ATLAS_SEEDS0)
    atlas_fine = Volume(prostate_fine(atlas_case.tissue.data), atlas_case.mri.voxel_to_world)
    seeds = list(range(EVAL_SEED0, EVAL_SEED0 + n))

    def cases():
        for seed in seeds:
            case = make_phantom(seed)
            yield seed, case.mri, prostate_fine(case.tissue.data)

    groups = np.array(PROSTATE_CONFIG.fine_groups)
    return atlas_case.mri, atlas_fine, 12.0, seeds, cases, groups, FINE


def brain_task(n: int):
    """As :func:`prostate_task`: the MNI152 template + AAL, synthetic subjects 43000.."""
    from regseg.sim.mni import MniConfig, load_base
    from regseg.train.warpseg_brain import EVAL_SEED0 as BRAIN_SEED0
    from regseg.train.warpseg_brain import brain_config, subject, template

    config, lookup = brain_config()
    base = load_base(MniConfig())
    atlas, aal = template(base)
    seeds = list(range(BRAIN_SEED0, BRAIN_SEED0 + n))

    def cases():
        for seed in seeds:
            image, labels = subject(base, seed)
            yield seed, image, lookup[labels].astype(np.uint8)

    atlas_fine = Volume(lookup[aal.data].astype(np.uint8), aal.voxel_to_world)
    return atlas, atlas_fine, None, seeds, cases, np.array(config.fine_groups), None


def run(task: str, n: int, *, refine: int, sitk_iterations: int, progress: bool = True,
        warpseg_model: str | None = None, single_model: str | None = None) -> dict:
    """Every method on the held-out cases; the JSON-ready result. ``warpseg_model`` and
    ``single_model``: checkpoints instead of the shipped ``warpseg-<task>`` and
    ``warpseg-<task>-single``."""
    from tqdm import tqdm

    atlas, atlas_fine, margin, seeds, cases, groups, fine_names = (
        prostate_task(n) if task == "prostate" else brain_task(n))
    if task == "brain":
        from regseg.train.warpseg_brain import registration_engine

        registration = registration_engine(refine)
    else:
        from regseg.train.warpseg_data import PSEUDOLABEL_REFINE_MODE

        # as the shipped warpseg-prostate's pseudo-labels (train/warpseg_data.py)
        registration = RegistrationEngine("plcreg3d", affine="optimise", refine=refine,
                                          refine_mode=PSEUDOLABEL_REFINE_MODE)
    warpseg = WarpSegEngine(warpseg_model or f"warpseg-{task}", backend="auto")
    single_name = single_model or f"warpseg-{task}-single"
    single = (WarpSegEngine(single_name, backend=warpseg.backend)
              if shipped_path(single_name).is_file() else None)
    rows: dict[str, list[dict]] = {m: [] for m in METHODS}
    sitk_failures: list[dict] = []
    for _seed, image, truth in tqdm(cases(), total=n, desc=f"bench warpseg {task}",
                                    disable=not progress):
        spacing = float(image.voxel_to_world[0, 0])

        def add(method, fine, t0, truth=truth, spacing=spacing):
            rows[method].append({**score(fine, truth, groups, spacing, fine_names),
                                 "seconds": time.perf_counter() - t0})

        t = time.perf_counter()
        pl = pseudolabel(registration, atlas, atlas_fine, image, roi_margin_mm=margin)
        add("pseudolabels", pl.labels.data, t)
        for name, engine in (("warpseg", warpseg), ("single_decoder", single)):
            if engine is not None:
                t = time.perf_counter()
                add(name, engine(image)[1].data, t)
        t = time.perf_counter()
        try:
            sitk_fine = simpleitk_labels(atlas, atlas_fine, image, margin, sitk_iterations,
                                         2.0 if task == "prostate" else SITK_BRAIN_MM)
        except RuntimeError as exc:  # ITK gives up (e.g. "All samples map outside moving
            # image buffer"): the baseline failed on this case, scored as all background
            sitk_failures.append({"seed": int(_seed), "error": str(exc).strip().splitlines()[-1]})
            sitk_fine = np.zeros_like(truth)
        add("simpleitk", sitk_fine, t)
    means = {m: {k: round(float(np.nanmean([r[k] for r in rs])), 4) for k in rs[0]}
             for m, rs in rows.items() if rs}
    speedup = means["pseudolabels"]["seconds"] / means["warpseg"]["seconds"]
    return {
        "bench": "warpseg", "task": task,
        "command": "python bench/warpseg.py " + " ".join(sys.argv[1:]),
        "machine": device_name("cpu"), "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "eval_seeds": seeds, "warpseg_backend": warpseg.backend, "refine": refine,
        "registration": ("learned+optimise affine, PLCReg 3-D" if task == "brain"
                         else "optimise affine, PLCReg 3-D"),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "simpleitk_failures": sitk_failures,  # cases where ITK stopped; scored as background
        "dice": {m: {"coarse": v["coarse"], "fine": v["fine"]} for m, v in means.items()},
        "fine_dice": ({m: {c: v[c] for c in fine_names.values()} for m, v in means.items()}
                      if fine_names else {}),
        "hd95_mm": {m: v["hd95_mm"] for m, v in means.items()},
        "seconds_per_volume": {m: v["seconds"] for m, v in means.items()},
        "speedup_vs_registration": round(speedup, 1),
        "per_volume": rows,
        "missing": [m for m in METHODS if not rows[m]],
    }


def print_table(result: dict) -> None:
    print(f"{result['task']}: held-out cases {result['eval_seeds']}, {result['machine']}")
    named = bool(result["fine_dice"])
    print(f"{'method':<16}{'coarse Dice':>12}{'fine Dice':>10}"
          + (f"{'PZ':>7}{'TZ':>7}{'lesion':>8}" if named else "")
          + f"{'HD95 mm':>9}{'s/volume':>10}")
    for m, d in result["dice"].items():
        line = f"{m:<16}{d['coarse']:>12.3f}{d['fine']:>10.3f}"
        if named:
            f = result["fine_dice"][m]
            line += (f"{f['peripheral_zone']:>7.3f}{f['transition_zone']:>7.3f}"
                     f"{f['lesion']:>8.3f}")
        print(line + f"{result['hd95_mm'][m]:>9.2f}{result['seconds_per_volume'][m]:>10.2f}")
    print(f"warpseg is {result['speedup_vs_registration']:.1f}x faster per volume than the "
          "registration that made its pseudo-labels")
    for fail in result.get("simpleitk_failures", []):
        print(f"simpleitk failed on case {fail['seed']} (scored as background): {fail['error']}")
    if result["missing"]:
        print(f"not run: {', '.join(result['missing'])} (no shipped weights)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 held-out cases (default 8)")
    p.add_argument("--cases", type=int, default=None,
                   help="held-out cases (overrides --quick's 2 and the default 8)")
    p.add_argument("--warpseg", default=None,
                   help="WarpSeg checkpoint instead of the shipped warpseg-<task>")
    p.add_argument("--single", default=None,
                   help="single-decoder checkpoint instead of the shipped warpseg-<task>-single")
    p.add_argument("--task", choices=("prostate", "brain"), default="prostate",
                   help="prostate phantoms (default) or MNI152-derived brains (AAL)")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.add_argument("--refine", type=int, default=None,
                   help="registration refinement steps (default as the pseudo-labels: prostate "
                        "25, brain 10)")
    p.add_argument("--sitk-iterations", type=int, default=50,
                   help="SimpleITK optimiser iterations per stage (default 50)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.refine is None:
        from regseg.train.warpseg_brain import BRAIN_REFINE

        args.refine = BRAIN_REFINE if args.task == "brain" else 25
    n = args.cases or (2 if args.quick else 8)
    result = run(args.task, n, refine=args.refine, sitk_iterations=args.sitk_iterations,
                 warpseg_model=args.warpseg, single_model=args.single)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
