"""``regseg mas``: cross-modality multi-atlas segmentation of one target volume.

``regseg mas --atlases DIR_OR_CSV --target VOL [--method simnet|jlf|vote|staple] --out DIR
[--truth LABELS]`` registers every atlas (image + labels) to the target
(regseg.crossmodal.register_cross_modal), fuses the warped labels (LabelFusionEngine) and writes
``DIR/labels.nii.gz``, ``DIR/atlas_weights.csv`` (each atlas's mean fusion weight) and
``DIR/report.json`` (seconds per stage; Dice/HD95 with ``--truth``).
``regseg mas --simulate DIR [--kind sweep|brain]`` writes a simulated atlas set and targets
(regseg/mas_sim.py) to try it on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from regseg.cli_checks import check_writable, int_at_least
from regseg.errors import InputError

METHODS = ("simnet", "jlf", "vote", "staple")


def add_cli(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atlases", help="atlas set: a folder of NAME.nii.gz + NAME_labels.nii.gz "
                   "pairs, or a CSV with columns image,labels[,name]")
    p.add_argument("--target", help="the image to segment (3-D NIfTI, another modality allowed)")
    p.add_argument("--method", choices=METHODS, default="simnet",
                   help="label fusion: simnet (learned per-voxel weights, default), jlf (joint "
                   "label fusion), vote (majority), staple (SimpleITK MultiLabelSTAPLE)")
    p.add_argument("--jlf-features", choices=("mind", "intensity"), default="mind",
                   help="with --method jlf: the atlas error JLF correlates, mind (MIND "
                   "descriptors, modality-independent: atlases of another modality, default) "
                   "or intensity (z-scored intensities, antsJointFusion: same-modality atlases)")
    p.add_argument("--registration", choices=("affine", "biregnet"), default="affine",
                   help="atlas-to-target registration: affine (MIND, default: what the shipped "
                   "SimNet was trained on) or biregnet (affine + BiRegNet deformable)")
    p.add_argument("--initial", choices=("centre", "identity"), default="centre",
                   help="registration start: centre (the target's non-zero voxels' centroid "
                   "onto the atlas labels' centroid, default) or identity (one world, e.g. MNI)")
    p.add_argument("--target-offset-mm", type=float, nargs=3, default=(0.0, 0.0, 0.0),
                   metavar=("X", "Y", "Z"), help="with --initial centre: where the structure "
                   "sits relative to the target's non-zero centroid, world mm (default 0 0 0; "
                   "simulated sweeps: 0.7 -14.5 1.0)")
    p.add_argument("--out", help="output folder (labels.nii.gz, atlas_weights.csv, report.json)")
    p.add_argument("--truth", help="the target's true labels (NIfTI on the target grid): adds "
                   "Dice and HD95 to the report")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="CPU threads for registration and fusion (default: torch's)")
    p.add_argument("--simulate", metavar="DIR", help="instead: write a simulated atlas set and "
                   "targets to DIR (atlases/, targets/, targets.csv) and stop")
    p.add_argument("--kind", choices=("sweep", "brain"), default="sweep",
                   help="with --simulate: prostate MRI atlases + TRUS sweep targets (default), "
                   "or MNI152 subjects with AAL labels + remapped-intensity targets")
    p.add_argument("--n-atlases", type=int_at_least(1), default=4,
                   help="with --simulate: number of atlases (default 4)")
    p.add_argument("--n-targets", type=int_at_least(1), default=2,
                   help="with --simulate: number of targets (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.simulate:
        return _simulate(args)
    missing = [f for f, v in (("--atlases", args.atlases), ("--target", args.target),
                              ("--out", args.out)) if not v]
    if missing:
        raise InputError(f"regseg mas: {' and '.join(missing)} required (or --simulate DIR to "
                         "write a simulated set first)")
    import torch
    from tqdm import tqdm

    from regseg import mas
    from regseg.engines.label_fusion import LabelFusionEngine
    from regseg.imageio import load_mri
    from regseg.register_cli import load_label_map

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file; an output folder is expected")
    check_writable(out / "report.json", "--out")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    entries = mas.atlas_entries(args.atlases)
    target = load_mri(args.target)
    truth = load_label_map(args.truth, target, "truth label") if args.truth else None
    atlases = mas.load_atlases(entries)
    fusion = LabelFusionEngine(args.method, device=args.device,
                               jlf_features=args.jlf_features)
    bar = None if args.no_progress else (
        lambda items: tqdm(items, desc=f"register {len(items)} atlases", unit="atlas"))
    result = mas.segment_target(target, atlases, registration=args.registration,
                                device=args.device, threads=args.threads, fusion=fusion,
                                initial=args.initial,
                                target_offset_mm=tuple(args.target_offset_mm), progress=bar)
    report = mas.make_report(result, args.method, args.registration, truth)
    report |= {"target": str(args.target), "atlas_source": str(args.atlases),
               "fusion": fusion.info(),
               "initial": args.initial, "target_offset_mm": list(args.target_offset_mm)}
    paths = mas.write_outputs(out, result, report)
    metrics = report.get("metrics", {})
    shown = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"{len(atlases)} atlases, {args.method} fusion: {result.seconds['total']:.1f} s "
          f"(registration {result.seconds['registration']:.1f} s, fusion "
          f"{result.seconds['fusion']:.2f} s){'; ' + shown if shown else ''}")
    for p in paths.values():
        print(f"wrote {p}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from functools import partial

    from tqdm import tqdm

    from regseg.mas_sim import write_simulated_set

    folder = Path(args.simulate)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--simulate {folder}: is a file; a folder is expected")
    check_writable(folder / "targets.csv", "--simulate")
    total = args.n_atlases + args.n_targets
    bar = None if args.no_progress else partial(tqdm, total=total, desc=f"simulate {args.kind}",
                                                unit="volume")
    path = write_simulated_set(folder, args.kind, n_atlases=args.n_atlases,
                               n_targets=args.n_targets, progress=bar)
    print(f"wrote {args.n_atlases} atlases in {folder / 'atlases'} and {args.n_targets} targets "
          f"in {folder / 'targets'}\nwrote {path}")
    return 0
