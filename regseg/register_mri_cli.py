"""``regseg register-mri``: the case's MRI registered to its 3-D TRUS sweep volume, to start live.

Reads the MRI and its labels (MRI mm) and the sweep volume (``regseg reconstruct``'s output,
voxel -> tracker Reference mm; 0 where no frame reached), starts from ``--initial`` (Reference ->
MRI, e.g. from landmarks or the tracker's nominal set-up; identity by default), registers with
:func:`regseg.crossmodal.register_cross_modal` and writes:

* ``--out``: ReferenceToMRI, the affine part, in the format its name asks for (``.tfm``/``.h5``
  ITK as Slicer saves it, ``.xml`` PLUS, else 4 rows of 4 numbers): the file
  ``regseg-stream --reference-to-mri`` takes. The live path's transform is affine;
* ``--ddf-out`` (optional): the deformable part (biregnet), a displacement NIfTI on the sweep grid
  (I, J, K, 1, 3 float32, Reference mm): Reference point ``p`` corresponds to MRI point
  ``ReferenceToMRI (p + ddf(p))``. The live path does not take it: its per-frame networks correct
  the residual deformation frame by frame;
* a JSON report beside ``--out`` (seconds, MIND distance before and after, and with ``--truth``
  the TRE over the gland before and after).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from regseg.cli_checks import check_readable_file, check_writable, int_at_least
from regseg.errors import InputError

TRANSFORM_SUFFIXES = (".tfm", ".h5", ".hdf5", ".xml", ".txt", ".mat")


def add_cli(p: argparse.ArgumentParser) -> None:
    """Options of ``regseg register-mri`` (regseg/cli.py TASKS)."""
    p.add_argument("--mri", required=True, help="the case's MRI, 3-D NIfTI (MRI mm)")
    p.add_argument("--mri-labels", required=True,
                   help="its labels, 3-D NIfTI on the MRI grid: 1 prostate, 2 lesion")
    p.add_argument("--sweep", required=True,
                   help="the 3-D TRUS sweep volume, NIfTI in Reference mm (regseg reconstruct)")
    p.add_argument("--initial", default=None,
                   help="starting ReferenceToMRI (.tfm/.h5/.xml/4x4 .txt); default identity")
    p.add_argument("--out", required=True,
                   help="ReferenceToMRI to write (.tfm/.h5 ITK, .xml PLUS, or 4x4 .txt)")
    p.add_argument("--method", choices=["affine", "biregnet"], default="affine",
                   help="affine (MIND instance optimisation; default) or affine then BiRegNet "
                   "(not the default: on its validation sweeps it added nothing, gland Dice "
                   "0.901 -> 0.902, and cost time)")
    p.add_argument("--ddf-out", default=None,
                   help="also write the deformable part as a displacement NIfTI (.nii.gz)")
    p.add_argument("--truth", default=None,
                   help="the true ReferenceToMRI (simulated cases): the report gives the TRE")
    p.add_argument("--report", default=None,
                   help="JSON report path (default: --out with .json)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _transform(path: str, flag: str) -> np.ndarray:
    from regseg.calibration import transforms_io

    check_readable_file(path, flag)
    try:
        return transforms_io.read_transform(path, from_name="Reference", to_name="MRI")
    except InputError as exc:
        raise InputError(f"{flag} {exc}") from None


def gland_tre_mm(mri_labels, estimate: np.ndarray, truth: np.ndarray) -> float:
    """Mean distance (mm) over the gland between where two ReferenceToMRI put it: the MRI gland
    voxels taken to Reference by the truth's inverse, then to the MRI by the estimate."""
    idx = np.argwhere(mri_labels.data > 0)
    pts = idx @ mri_labels.voxel_to_world[:3, :3].T + mri_labels.voxel_to_world[:3, 3]
    ref = pts @ np.linalg.inv(truth)[:3, :3].T + np.linalg.inv(truth)[:3, 3]
    est = ref @ estimate[:3, :3].T + estimate[:3, 3]
    return float(np.linalg.norm(est - pts, axis=1).mean())


def _check_args(args: argparse.Namespace) -> None:
    if not str(args.out).lower().endswith(TRANSFORM_SUFFIXES):
        raise InputError(f"--out {args.out}: a transform file name expected "
                         f"({', '.join(TRANSFORM_SUFFIXES)})")
    check_writable(args.out, "--out")
    if args.ddf_out:
        if not str(args.ddf_out).endswith((".nii", ".nii.gz")):
            raise InputError(f"--ddf-out {args.ddf_out}: a NIfTI file name (.nii.gz) expected")
        check_writable(args.ddf_out, "--ddf-out")
        if args.method != "biregnet":
            raise InputError("--ddf-out: only --method biregnet has a deformable part")
    if args.report:
        check_writable(args.report, "--report")
    for path, flag in ((args.mri, "--mri"), (args.mri_labels, "--mri-labels"),
                       (args.sweep, "--sweep")):
        check_readable_file(path, flag)
    if str(args.device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"--device {args.device}: CUDA is not available here; use cpu")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from regseg.calibration import transforms_io
    from regseg.crossmodal import mind_distance, register_cross_modal
    from regseg.imageio import load_labels, load_mri

    _check_args(args)
    t0 = time.perf_counter()
    bar = tqdm(total=3, desc="register-mri", unit="stage", disable=args.no_progress)
    mri = load_mri(args.mri)
    labels = load_labels(args.mri_labels, like=mri)
    if not (labels.data > 0).any():
        raise InputError(f"--mri-labels {args.mri_labels}: no prostate (label 1) or lesion (2) "
                         "voxels; the gland must be labelled")
    sweep = load_mri(args.sweep)
    if not (sweep.data > 0).any():
        raise InputError(f"--sweep {args.sweep}: all voxels are zero (no frame reached the "
                         "grid); a reconstructed TRUS sweep volume is expected")
    initial = np.eye(4) if args.initial is None else _transform(args.initial, "--initial")
    truth = None if args.truth is None else _transform(args.truth, "--truth")
    bar.set_postfix_str("affine + " + args.method if args.method != "affine" else "affine")
    bar.update(1)
    result = register_cross_modal(mri, labels, sweep, initial_fixed_to_moving=initial,
                                  method=args.method, device=args.device, threads=args.threads)
    bar.update(1)
    reference_to_mri = result.fixed_to_moving
    transforms_io.write_transform(args.out, reference_to_mri, from_name="Reference",
                                  to_name="MRI")
    if args.ddf_out and result.ddf_mm is not None:
        import nibabel as nib

        ddf = np.moveaxis(result.ddf_mm, 0, -1)[:, :, :, None, :].astype(np.float32)
        img = nib.Nifti1Image(ddf, sweep.voxel_to_world)
        img.header.set_intent("vector")
        nib.save(img, str(args.ddf_out))
    report = {"mri": str(args.mri), "sweep": str(args.sweep), "method": args.method,
              "out": str(args.out), "ddf_out": args.ddf_out,
              "seconds": round(result.seconds, 2),
              "total_seconds": round(time.perf_counter() - t0, 2),
              "mind_distance_initial": round(mind_distance(mri, sweep, initial), 5),
              "mind_distance_final": round(mind_distance(mri, sweep, reference_to_mri), 5),
              "reference_to_mri": np.round(reference_to_mri, 6).tolist()}
    if truth is not None:
        report["tre_mm_initial"] = round(gland_tre_mm(labels, initial, truth), 3)
        report["tre_mm"] = round(gland_tre_mm(labels, reference_to_mri, truth), 3)
    report_path = Path(args.report) if args.report else Path(args.out).with_suffix(".json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    bar.update(1)
    bar.close()
    tre = (f"; TRE {report['tre_mm_initial']} -> {report['tre_mm']} mm"
           if truth is not None else "")
    print(f"registered {args.mri} to {args.sweep} ({args.method}) in {report['seconds']} s{tre}"
          f"\nwrote {args.out}\nwrote {report_path}")
    return 0
