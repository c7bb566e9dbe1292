"""``regseg segment``: label a 3-D image with a shipped WarpSeg network.

``regseg segment --model warpseg-prostate --mri case.nii.gz --out case_labels.nii.gz`` writes the
0 background / 1 prostate / 2 lesion map that ``regseg-stream --mri-labels`` takes, and the zones
(0 background, 1 peripheral zone, 2 transition zone, 3 lesion) to ``--zones`` (default
``<out>_zones.nii.gz``). Another model writes its fine labels to ``--out`` and its coarse labels to
``--zones``' place as ``<out>_coarse.nii.gz``: ``warpseg-brain`` the AAL region ids (1..116, as in
the AAL atlas; 0 background) and its lobe groups (0 background, 1 frontal, 2 temporal, 3 parietal,
4 occipital, 5 limbic, 6 deep grey, 7 cerebellum).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from regseg.cli_checks import check_checkpoint, check_readable_file, check_writable, int_at_least


def _sibling(out: Path, suffix: str) -> Path:
    name = out.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return out.with_name(name[: -len(ext)] + suffix + ext)
    return out.with_name(name + suffix + ".nii.gz")


def add_cli(p: argparse.ArgumentParser) -> None:
    """Arguments of ``regseg segment``."""
    p.add_argument("--model", default="warpseg-prostate",
                   help="warpseg-prostate (default), warpseg-prostate-single (the ablation), "
                        "warpseg-brain (AAL regions of an MNI-space T1 brain; "
                        "warpseg-brain-single the ablation) or a WarpSeg checkpoint path")
    p.add_argument("--mri", required=True, help="the image to label, 3-D NIfTI")
    p.add_argument("--out", required=True,
                   help="label map to write (prostate model: 0/1/2 for regseg-stream "
                        "--mri-labels; brain model: AAL region ids 1..116)")
    p.add_argument("--zones", default=None,
                   help="second map: the prostate zones (default <out>_zones.nii.gz), or for "
                        "another model its coarse labels (default <out>_coarse.nii.gz)")
    p.add_argument("--backend", default="eager",
                   help="engine backend: eager (default), onnxrt, or auto (fastest that matches)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="CPU threads (default torch's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check inputs and outputs, segment, write both maps (each to a temporary name, renamed)."""
    import numpy as np
    import torch

    from regseg.engines.warpseg import (
        SHIPPED,
        WarpSegEngine,
        is_aal,
        shipped_path,
        stream_labels,
    )
    from regseg.errors import InputError
    from regseg.imageio import Volume, load_mri, save_volume

    check_readable_file(args.mri, "--mri")
    if args.model in SHIPPED and not shipped_path(args.model).is_file():
        task = args.model.split("-")[1]
        raise InputError(f"--model {args.model}: its weights ({shipped_path(args.model).name}) are "
                         "not shipped in this version; train them with `regseg train warpseg "
                         f"--task {task} --out {shipped_path(args.model).parent}`")
    if args.model not in SHIPPED and not Path(args.model).exists():
        raise InputError(f"--model {args.model}: neither a shipped model ({', '.join(SHIPPED)}) "
                         "nor an existing checkpoint file")
    check_checkpoint(args.model, "--model", "warpseg",
                     shipped={k: shipped_path(k) for k in SHIPPED})
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = WarpSegEngine(args.model, backend=args.backend, threads=args.threads)
    prostate = "prostate" in engine.config.coarse_names
    second = Path(args.zones) if args.zones else _sibling(out, "_zones" if prostate
                                                          else "_coarse")
    check_writable(out, "--out")
    check_writable(second, "--zones")
    image = load_mri(args.mri)
    coarse, fine = engine(image)
    first_map = (stream_labels(coarse.data, fine.data, engine.config) if prostate
                 else fine.data)
    second_map = fine.data if prostate else coarse.data
    for path, data in ((out, first_map), (second, second_map)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.nii.gz")
        save_volume(Volume(np.ascontiguousarray(data, dtype=np.uint8), image.voxel_to_world), tmp)
        os.replace(tmp, path)
    what = ("0 background, 1 prostate, 2 lesion" if prostate
            else "AAL region ids 1..116, 0 background" if is_aal(engine.config)
            else "fine labels")
    names = engine.config.fine_names if prostate else engine.config.coarse_names
    print(f"wrote {out} ({what}) and {second} "
          f"({'zones' if prostate else 'coarse labels'}: "
          f"{', '.join(f'{k} {n}' for k, n in enumerate(names))}) "
          f"in {time.perf_counter() - t0:.2f} s ({engine.backend}; network "
          f"{engine.timings_s['total_s']:.2f} s)")
    return 0
