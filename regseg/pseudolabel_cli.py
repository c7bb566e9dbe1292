"""``regseg pseudolabel``: a labelled atlas registered to a folder of unlabelled images.

Writes ``OUT/<image>_labels.nii.gz`` (the atlas labels on each image's grid) and
``OUT/quality.json`` / ``quality.csv`` (per image: NCC after registration, % folding, seconds and a
training weight in [0, 1]); images already done are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from regseg.cli_checks import check_checkpoint, check_readable_file, check_writable, int_at_least

#: ``regseg pseudolabel``'s affine stage. Not ``regseg register``'s learned+optimise: Affine3D was
#: trained on brain MRI pairs only, and atlases may be of any anatomy (the shipped
#: warpseg-prostate's pseudo-labels were made with this).
PSEUDOLABEL_AFFINE = "optimise"


def add_cli(p: argparse.ArgumentParser) -> None:
    """Arguments of ``regseg pseudolabel``."""
    from regseg.register_options import add_registration_options

    p.add_argument("--atlas", required=True, help="the atlas image, 3-D NIfTI")
    p.add_argument("--atlas-labels", required=True,
                   help="the atlas label map on the atlas grid (integers 0..255)")
    p.add_argument("--images", required=True, help="folder of unlabelled 3-D NIfTI images")
    p.add_argument("--out", required=True,
                   help="output folder: <image>_labels.nii.gz and quality.json/.csv")
    p.add_argument("--interpolation", choices=("nearest", "linear"), default="nearest",
                   help="labels through the map: nearest, or each label's indicator trilinearly "
                        "then the most probable label (default nearest)")
    p.add_argument("--roi-margin-mm", type=float, default=12.0,
                   help="register inside the atlas labels' bounding box grown by this margin "
                        "(mm); a negative value registers the whole images (default 12)")
    p.add_argument("--weights", default="plcreg3d", help="PLCReg 3-D checkpoint (default shipped)")
    add_registration_options(p, PSEUDOLABEL_AFFINE, ": atlases of any anatomy")
    p.add_argument("--backend", default="eager", help="engine backend (default eager)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch CPU threads (default: as `regseg register`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check every input first, then pseudo-label the images not done yet."""
    import torch
    from tqdm import tqdm

    from regseg.engines.registration import RegistrationEngine, shipped_weights
    from regseg.imageio import load_mri
    from regseg.pseudolabel import list_images, pseudolabel_folder
    from regseg.register_cli import load_label_map
    from regseg.register_options import default_threads

    check_readable_file(args.atlas, "--atlas")
    check_readable_file(args.atlas_labels, "--atlas-labels")
    images = list_images(Path(args.images))
    out = Path(args.out)
    check_writable(out / "quality.json", "--out")
    check_checkpoint(shipped_weights(args.weights), "--weights", "plcreg", ndim=3)
    atlas = load_mri(args.atlas)
    labels = load_label_map(args.atlas_labels, like=atlas, what="atlas label")
    torch.set_num_threads(args.threads or default_threads())
    engine = RegistrationEngine(args.weights, backend=args.backend, device="cpu",
                                affine=args.affine, affine_iterations=args.affine_iterations,
                                refine=args.refine, refine_fine=args.refine_fine,
                                refine_mode=args.refine_mode)
    margin = None if args.roi_margin_mm < 0 else args.roi_margin_mm
    meta = {"atlas": str(args.atlas), "atlas_labels": str(args.atlas_labels),
            "weights": str(args.weights), "affine": args.affine, "refine": args.refine,
            "refine_fine": args.refine_fine, "refine_mode": args.refine_mode,
            "interpolation": args.interpolation, "roi_margin_mm": margin}
    bar = tqdm(total=len(images), desc="pseudolabel", unit="image", disable=args.no_progress)
    skipped = []

    def done(stem: str, was_skipped: bool) -> None:
        if was_skipped:
            skipped.append(stem)
        bar.update(1)

    rows = pseudolabel_folder(engine, atlas, labels, images, out, roi_margin_mm=margin,
                              interpolation=args.interpolation, meta=meta, on_done=done)
    bar.close()
    worst = min(rows.values(), key=lambda r: r["ncc"])
    print(f"{len(rows)} pseudo-labels in {out} ({len(skipped)} already there, skipped); "
          f"lowest NCC {worst['ncc']:.3f} ({worst['image']}); quality in {out / 'quality.csv'}")
    return 0
