"""``regseg batch register|segment|mas MANIFEST --out DIR``: a job over many cases, on any number
of ranks (``torchrun --nproc-per-node N -m regseg.batch ...``), resumable by rerunning it."""

from __future__ import annotations

import argparse
from pathlib import Path

from regseg.cli_checks import int_at_least
from regseg.errors import InputError


def _common(p: argparse.ArgumentParser, affine: str = "learned+optimise") -> None:
    """The options every job takes; ``affine``: the job's default ``--affine`` mode."""
    from regseg.register_options import add_registration_options

    p.add_argument("manifest", type=Path, help="cases: a .csv with a header, or .jsonl")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: one sub-folder per case, results.jsonl, summary.json")
    p.add_argument("--weights", default="plcreg3d", help="PLCReg 3-D checkpoint (default shipped)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: one GPU per local rank when CUDA is there, else CPU")
    p.add_argument("--backend", default="eager", help="engine backend (default eager)")
    add_registration_options(p, affine)
    p.add_argument("--no-affine", action="store_true", help="skip the affine stage")
    p.add_argument("--workers", type=int_at_least(0), default=1,
                   help="DataLoader worker processes reading NIfTI ahead, per rank (default 1)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch CPU threads per rank (default: the cores over the local ranks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_batch)


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """``regseg batch``'s jobs as sub-commands."""
    jobs = p.add_subparsers(dest="job", required=True)
    reg = jobs.add_parser("register", help="register each pair (columns fixed, moving [, "
                          "moving_labels, fixed_labels, landmarks, name])")
    _common(reg)
    seg = jobs.add_parser("segment", help="single-atlas segmentation of each image (columns "
                          "image [, labels, atlas, atlas_labels, name])")
    _common(seg, affine="optimise")  # as regseg pseudolabel: atlases of any anatomy
    seg.add_argument("--atlas", type=Path, help="atlas image for cases without an atlas column")
    seg.add_argument("--atlas-labels", type=Path, help="the atlas's labels (same grid)")
    mas = jobs.add_parser("mas", help="multi-atlas segmentation of each target, as regseg mas "
                          "(columns target [, atlases, truth, name])")
    _common(mas)
    mas.add_argument("--atlases", type=Path,
                     help="atlas set (folder or CSV, as regseg mas) for cases without an "
                     "atlases column")
    from regseg.mas_cli import METHODS

    mas.add_argument("--method", choices=METHODS, default="simnet",
                     help="label fusion (default simnet; see regseg mas --help)")
    mas.add_argument("--registration", choices=("affine", "biregnet"), default="affine",
                     help="atlas-to-target registration (default affine, as regseg mas)")
    mas.add_argument("--initial", choices=("centre", "identity"), default="centre",
                     help="registration start (default centre; see regseg mas --help)")
    mas.add_argument("--target-offset-mm", type=float, nargs=3, default=None,
                     metavar=("X", "Y", "Z"), help="with --initial centre: the structure's "
                     "offset from the target's centroid, world mm (default 0 0 0)")


def run_batch(args: argparse.Namespace) -> int:
    """Run the job on this rank; rank 0 prints the summary. Exit 1 when any case failed."""
    from regseg import distributed
    from regseg.batch.jobs import JOBS
    from regseg.batch.manifest import read_manifest
    from regseg.batch.runner import run_rank
    from regseg.cli_checks import check_checkpoint, check_writable
    from regseg.engines.registration import SHIPPED
    from regseg.models.registry import WEIGHTS_DIR

    job = JOBS[args.job]
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out}: exists and is not a folder")
    check_writable(args.out / "summary.json", "--out")
    check_checkpoint(args.weights, "--weights", "plcreg", ndim=3,
                     shipped={name: WEIGHTS_DIR / f"{name}.pt" for name in SHIPPED})
    cases = read_manifest(args.manifest, job.required, job.file_columns)
    if job.name == "mas" and args.atlases is not None:
        if not args.atlases.exists():
            raise InputError(f"--atlases {args.atlases}: not found (a folder or a CSV expected)")
        args.atlases = str(args.atlases.resolve())
        for case in cases:
            if not case.get("atlases"):
                case["atlases"] = args.atlases
    if job.name == "segment":
        if bool(args.atlas) != bool(args.atlas_labels):
            raise InputError("--atlas and --atlas-labels go together")
        for what in ("atlas", "atlas_labels"):
            given = getattr(args, what)
            if given is not None:
                if not given.is_file():
                    raise InputError(f"--{what.replace('_', '-')} {given}: file not found")
                setattr(args, what, str(given.resolve()))
                for case in cases:
                    case.setdefault(what, getattr(args, what))
    args.out.mkdir(parents=True, exist_ok=True)
    # gloo coordinates the ranks; the compute runs on each rank's own device
    with distributed.joined(threads=args.threads, device=args.device, backend="gloo",
                            timeout_s=7 * 24 * 3600.0) as dist:
        summary = run_rank(job, cases, args.out, args, dist, workers=args.workers,
                           progress=not args.no_progress)
    if summary is None:
        return 0
    mean = summary["mean_s"]
    rate = summary["cases_per_s"]
    print(f"{summary['ok']}/{summary['cases']} cases ok, {summary['skipped_finished']} already "
          f"done, {summary['ran']} run on {summary['ranks']} rank(s) in {summary['wall_s']:.1f} s"
          + (f" ({rate:.3f} cases/s)" if rate else ""))
    if mean["compute_s"] is not None:
        print("per case (s): " + ", ".join(f"{k[:-2]} {v:.3f}" for k, v in mean.items()))
    print(f"wrote {args.out / 'results.jsonl'}")
    if summary["failed"]:
        shown = ", ".join(summary["failed"][:5]) + (" ..." if len(summary["failed"]) > 5 else "")
        print(f"{len(summary['failed'])} case(s) failed: {shown} (errors in results.jsonl); "
              "rerun the same command to retry them")
        return 1
    return 0
