"""``regseg <task>``: the offline tasks (phantoms, registration, training) from the command line.

Start-up is lazy: a task's module (and torch with it) is imported only when that task is the one
being run, so ``regseg --help`` and ``regseg TASK --help`` of a light task answer at once. A task is
one line in ``TASKS`` (or ``TRAIN_MODELS`` for ``regseg train MODEL``): its one-line help and
``"module:function"``, the function taking the sub-parser, adding the task's arguments and setting
``func`` (the runner) through ``set_defaults``. Add new tasks there, nothing else.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from regseg.cli_checks import TOP_LEVEL_ERRORS, Parser, exit_code, int_at_least

# task -> (help, "module:function(parser)"), in the order `regseg --help` lists them.
TASKS: dict[str, tuple[str, str]] = {
    "phantom": ("write a synthetic prostate MRI case and its labels", "regseg.cli:add_phantom"),
    "train": ("train a model on simulated data", "regseg.cli:add_train"),
    "register": ("affine + deformable registration of 3-D NIfTI pairs",
                 "regseg.register_cli:add_register_arguments"),
    "eval": ("Dice, HD95, folding and TRE of a registered pair, as a table",
             "regseg.eval_cli:add_eval_arguments"),
    "mni": ("write the MNI152 registration evaluation set (needs nilearn)",
            "regseg.eval_cli:add_mni_arguments"),
    "reconstruct": ("compound a tracked sweep (sequence file) into a 3-D volume",
                    "regseg.reconstruct_cli:add_arguments"),
    "register-mri": ("register the case's MRI to its 3-D TRUS sweep: ReferenceToMRI for live",
                     "regseg.register_mri_cli:add_cli"),
    "calibrate": ("pivot, probe (N-wire), temporal and landmark calibration; transform files",
                  "regseg.calibration.cli:add_arguments"),
    "batch": ("register, segment or multi-atlas segment (mas) the cases of a manifest, sharded "
              "over torchrun ranks, resumable", "regseg.batch.cli:add_batch_arguments"),
    "mas": ("cross-modality multi-atlas segmentation: register atlases, fuse their labels",
            "regseg.mas_cli:add_cli"),
    "pseudolabel": ("register a labelled atlas to unlabelled images: pseudo-labels + quality",
                    "regseg.pseudolabel_cli:add_cli"),
    "segment": ("segment a 3-D image with a shipped network (warpseg-prostate)",
                "regseg.segment_cli:add_cli"),
}

# `regseg train MODEL` -> (help, "module:function(parser)").
TRAIN_MODELS: dict[str, tuple[str, str]] = {
    "alignsegnet": ("the live affine registration + segmentation model",
                    "regseg.cli:add_train_alignsegnet"),
    "plcreg2d": ("PLCReg deformable registration (live 2-D refinement)",
                 "regseg.cli:add_train_plcreg2d"),
    "plcreg3d": ("PLCReg deformable registration (offline 3-D, MNI152 pairs)",
                 "regseg.cli:add_train_plcreg3d"),
    "ascseg": ("ASC-Seg 2-D TRUS segmentation (fused with the registered MRI; --trus-only)",
               "regseg.train.ascseg:add_cli"),
    "simnet": ("SimNet atlas weights for multi-atlas label fusion (MRI atlases, TRUS sweeps)",
               "regseg.train.simnet:add_cli"),
    "warpseg": ("WarpSeg coarse/fine 3-D segmentation from atlas pseudo-labels",
                "regseg.train.warpseg:add_cli"),
    "biregnet": ("BiRegNet cross-modality MRI <-> 3-D TRUS registration (simulated sweeps)",
                 "regseg.train.biregnet:add_cli"),
    "quality-calibration": ("QualityNet's flag threshold, calibrated on each live chain",
                            "regseg.train.quality_calibrate:add_cli"),
    "intensity-reference": ("the grey levels --intensity match maps live frames onto",
                            "regseg.train.intensity_reference:add_cli"),
    "affine3d": ("Affine3D, the learned 3-D affine stage (MNI152 pairs, large affines)",
                 "regseg.train.affine3d:add_cli"),
}


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _first_word(argv: Sequence[str]) -> str | None:
    """The first argument that is not an option: the chosen (sub)task, if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def _add_lazy(sub, table: dict[str, tuple[str, str]], chosen: str | None, rest: Sequence[str],
              build_all: bool) -> None:
    for name, (help_text, target) in table.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if build_all or name == chosen:
            fn = _resolve(target)
            if fn is add_train:
                fn(p, rest, build_all)
            else:
                fn(p)


def add_phantom(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (case.nii.gz, case_labels.nii.gz)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="anatomy seed (same seed, same case)")
    p.set_defaults(func=_phantom)


def _phantom(args) -> int:
    from pathlib import Path

    from regseg.cli_checks import check_writable
    from regseg.sim.phantom import make_phantom, write_phantom

    check_writable(Path(args.out) / "case.nii.gz", "--out")
    image, labels = write_phantom(make_phantom(args.seed), args.out)
    print(f"wrote {image}\nwrote {labels}")
    return 0


def add_train(p: argparse.ArgumentParser, argv: Sequence[str] = (), build_all: bool = True) -> None:
    models = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    words = [a for a in argv if not a.startswith("-")]
    chosen = words[1] if len(words) > 1 else None
    _add_lazy(models, TRAIN_MODELS, chosen, argv, build_all)


def add_train_alignsegnet(p: argparse.ArgumentParser) -> None:
    from regseg.train import alignsegnet

    alignsegnet.add_arguments(p)
    p.set_defaults(func=alignsegnet.run)


def _add_train_plcreg(p: argparse.ArgumentParser, dim: int) -> None:
    from regseg.train import plcreg

    plcreg.add_arguments(p, dim)
    p.set_defaults(func=plcreg.run)


def add_train_plcreg2d(p: argparse.ArgumentParser) -> None:
    _add_train_plcreg(p, 2)


def add_train_plcreg3d(p: argparse.ArgumentParser) -> None:
    _add_train_plcreg(p, 3)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``regseg`` parser. With ``argv`` only the chosen task's arguments are built (its module
    imported); without, every task's are (imports everything: for tests and introspection)."""
    build_all = argv is None
    argv = list(argv or ())
    p = Parser(prog="regseg", description="regseg offline tasks")
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    _add_lazy(sub, TASKS, _first_word(argv), argv, build_all)
    return p


def main(argv: list[str] | None = None) -> int:
    """``regseg``: 0 done, 2 bad input (one paragraph ``regseg TASK: error: ...``, checked before
    any work), 1 a failure at run time, 130 interrupted by Ctrl-C (quietly, at any point)."""
    task = "regseg"
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before torch is imported: OpenMP threads that spin while waiting turned a 15 s registration
    # into 130 s when other jobs held the cores (README, `regseg register` threads); passive waiting
    # costs little when the machine is idle. A value the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        args = build_parser(argv).parse_args(argv)
        task = f"regseg {args.task}"
        return int(args.func(args) or 0)
    except TOP_LEVEL_ERRORS as exc:
        return exit_code(task, exc)


if __name__ == "__main__":
    sys.exit(main())
