"""``regseg <task>``: the offline tasks (phantom cases, training) from the command line."""

from __future__ import annotations

import argparse
import sys

from regseg.cli_checks import EXIT_INPUT, EXIT_INTERRUPTED, Parser, int_at_least, memory_message
from regseg.errors import InputError, RegsegError


def _phantom(args) -> int:
    from pathlib import Path

    from regseg.cli_checks import check_writable
    from regseg.sim.phantom import make_phantom, write_phantom

    check_writable(Path(args.out) / "case.nii.gz", "--out")
    image, labels = write_phantom(make_phantom(args.seed), args.out)
    print(f"wrote {image}\nwrote {labels}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="regseg", description="regseg offline tasks")
    sub = p.add_subparsers(dest="task", required=True)

    ph = sub.add_parser("phantom", help="write a synthetic prostate MRI case and its labels")
    ph.add_argument("--out", required=True, help="output folder (case.nii.gz, case_labels.nii.gz)")
    ph.add_argument("--seed", type=int_at_least(0), default=0,
                    help="anatomy seed (same seed, same case)")
    ph.set_defaults(func=_phantom)

    tr = sub.add_parser("train", help="train a model on simulated data")
    models = tr.add_subparsers(dest="model", required=True)
    from regseg.train import alignsegnet as train_alignsegnet

    al = models.add_parser("alignsegnet", help="the live affine registration + segmentation model")
    train_alignsegnet.add_arguments(al)
    al.set_defaults(func=train_alignsegnet.run)

    # Deformable registration (issue 4): training recipes, register, eval, the MNI152 set.
    from regseg import register_cli
    from regseg.train import plcreg as train_plcreg

    for dim in (2, 3):
        what = "live 2-D refinement" if dim == 2 else "offline 3-D, MNI152 pairs"
        pl = models.add_parser(f"plcreg{dim}d", help=f"PLCReg deformable registration ({what})")
        train_plcreg.add_arguments(pl, dim)
        pl.set_defaults(func=train_plcreg.run)
    register_cli.add_register_arguments(sub.add_parser(
        "register", help="affine + deformable registration of 3-D NIfTI pairs"))
    register_cli.add_eval_arguments(sub.add_parser(
        "eval", help="Dice, HD95, folding and TRE of a registered pair, as a table"))
    register_cli.add_mni_arguments(sub.add_parser(
        "mni", help="write the MNI152 registration evaluation set (needs nilearn)"))
    return p


def main(argv: list[str] | None = None) -> int:
    """``regseg``: 0 done, 2 bad input (one paragraph ``regseg TASK: error: ...``, checked before
    any work), 1 a failure at run time, 130 interrupted by Ctrl-C (quietly, at any point)."""
    task = "regseg"
    try:
        args = build_parser().parse_args(argv)
        task = f"regseg {args.task}"
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{task}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except InputError as exc:
        print(f"{task}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except MemoryError as exc:
        print(f"{task}: error: {memory_message(exc)}", file=sys.stderr)
        return EXIT_INPUT
    except RegsegError as exc:
        print(f"{task}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
