"""``regseg reconstruct SEQUENCE --out vol.nii.gz``: a tracked sweep compounded into a 3-D volume.

Reads a PLUS sequence file (``.igs.mha``/``.seq.nrrd`` …, or one ``regseg-stream --record`` wrote),
takes each frame's ``<transform>Transform`` (default ImageToReference; frames whose status is not
OK are skipped and counted), and writes the volume (NIfTI, Reference mm = RAS) and, with
``--coverage-out``, the coverage mask (0 none, 1 reached by a pixel, 2 hole filled).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from regseg.cli_checks import check_writable, float_at_least, int_at_least
from regseg.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sequence", help="tracked frames: a PLUS sequence file (.igs.mha, .seq.nrrd …)")
    p.add_argument("--out", required=True, help="output volume, NIfTI (.nii.gz)")
    p.add_argument("--spacing", type=float_at_least(0.05), default=0.5,
                   help="voxel size in mm (default 0.5)")
    p.add_argument("--method", choices=["linear", "nearest"], default="linear",
                   help="pixel splatting: trilinear onto 8 voxels (default) or nearest voxel")
    p.add_argument("--fill-holes", type=int_at_least(0), default=3,
                   help="fill empty voxels between data up to this many voxels from it (default "
                   "3; 0 = off)")
    p.add_argument("--transform", default="ImageToReference",
                   help="the per-frame transform to use (default ImageToReference)")
    p.add_argument("--skip-zero", action="store_true",
                   help="leave exactly-zero pixels out (the black outside a fan or sector)")
    p.add_argument("--margin", type=float_at_least(0.0), default=0.0,
                   help="mm added around the frames' extent (default 0)")
    p.add_argument("--coverage-out", help="also write the coverage mask here (NIfTI, uint8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from regseg.imageio import Volume, save_volume
    from regseg.reconstruct import VolumeReconstructor, frame_corners, grid_around
    from regseg.sequence_file import frame_from_sequence, read_sequence

    for path, flag in ((args.out, "--out"), (args.coverage_out, "--coverage-out")):
        if path and not str(path).endswith((".nii", ".nii.gz")):
            raise InputError(f"{flag} {path}: a NIfTI file name (.nii or .nii.gz) expected")
        if path:
            check_writable(path, flag)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if not Path(args.sequence).is_file():
        raise InputError(f"{args.sequence}: sequence file not found")
    t0 = time.perf_counter()
    sequence = read_sequence(args.sequence)
    tracked, untracked = [], 0
    for index, item in enumerate(sequence.frames):
        frame = frame_from_sequence(item, index, 0, transform_name=args.transform,
                                    element_spacing_mm=sequence.element_spacing_mm)
        if frame.image_to_reference is None:
            untracked += 1
        else:
            tracked.append(frame)
    if not tracked:
        raise InputError(f"{args.sequence}: none of its {len(sequence.frames)} frames has an OK "
                         f"{args.transform}Transform; a tracked sweep is needed (see --transform)")
    corners = np.vstack([frame_corners(f.pixels.shape, f.image_to_reference) for f in tracked])
    grid = grid_around(corners, args.spacing, args.margin)
    recon = VolumeReconstructor(grid, args.method, args.device)
    t1 = time.perf_counter()
    for frame in tqdm(tracked, desc="reconstruct", unit="frame", disable=args.no_progress):
        recon.add(frame.pixels, frame.image_to_reference,
                  frame.pixels > 0 if args.skip_zero else None)
    volume, coverage = recon.result(args.fill_holes)
    splat_s = time.perf_counter() - t1
    save_volume(Volume(volume, grid.voxel_to_world, ""), args.out)
    if args.coverage_out:
        save_volume(Volume(coverage, grid.voxel_to_world, ""), args.coverage_out)
    report = {"sequence": str(args.sequence), "frames": len(sequence.frames),
              "tracked_frames": len(tracked), "untracked_frames": untracked,
              "grid_shape": list(grid.shape), "spacing_mm": args.spacing, "method": args.method,
              "covered_pct": round(100 * float((coverage == 1).mean()), 2),
              "filled_pct": round(100 * float((coverage == 2).mean()), 2),
              "ms_per_frame": round(1e3 * splat_s / len(tracked), 2),
              "seconds": round(time.perf_counter() - t0, 2)}
    report_path = Path(str(args.out).removesuffix(".gz").removesuffix(".nii") + ".json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(tracked)} tracked frames ({untracked} untracked skipped) -> {grid.shape} voxels "
          f"of {args.spacing} mm; {report['covered_pct']} % reached, {report['filled_pct']} % "
          f"filled; {report['ms_per_frame']} ms per frame\nwrote {args.out}\nwrote {report_path}")
    return 0
