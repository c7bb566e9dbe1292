"""Compare AlignSegNet checkpoints on held-out frames of three kinds, at set tracking errors.

``python -m regseg.train.compare --models OLD.pt NEW.pt [--families A,Arand,B] [--levels 3,10]``

- ``A``: family A (the training simulator) as the demo renders it, held-out phantoms 1000..;
- ``Arand``: family A with randomised scanner and anatomy (``regseg.sim.randomise``), the same
  held-out phantom seeds but scanner draws that training never used;
- ``Asr``: ``Arand`` frames through a fixed scanner post-processing that neither simulator nor
  the training augmentation has (a 5 x 5 median filter, speckle reduction, then histogram
  equalisation): a check of generalisation to an unseen appearance that does not touch family B;
- ``B``: simulator family B (``regseg.sim.family_b``, written separately, never trained on),
  its evaluation seeds.

Every frame gets a rigid in-plane tracking error of exactly L mm and L degrees (random direction
and centre, plus 0.5 mm out of plane), as ``bench/accuracy.py`` defines its levels. The same
frames go through every model: one forward pass, no iterative refinement (that is the live
chain's, measured by ``bench/accuracy.py``). Reported per model, family and level: prostate and
lesion Dice of the segmentation, registered-label Dice, TRE median (tracked -> registered) and
p90 over the prostate pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from regseg.models.registry import load_model
from regseg.train.alignsegnet import evaluate
from regseg.train.data import SampleSet, frame_sample, mri_tensors

FAMILY_A_SEED0 = 1000  # held-out family-A phantoms 1000..; --a-seed0 3100 for calibration ones
OUT_OF_PLANE_MM = 0.5
FAMILIES = ("A", "Arand", "Asr", "B")


def rigid_error(level: float, rng: np.random.Generator, frame_hw: tuple[int, int],
                pixel_mm: float) -> np.ndarray:
    """(4, 4) pixel-space error: rotate L deg about a point near the centre, shift L mm."""
    h, w = frame_hw
    centre = np.array([w, h]) * (0.5 + rng.uniform(-0.15, 0.15, 2))
    t = np.deg2rad(level) * rng.choice([-1.0, 1.0])
    direction = rng.uniform(0, 2 * np.pi)
    e = np.eye(4)
    e[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    e[:2, 3] = centre - e[:2, :2] @ centre
    e[:2, 3] += level / pixel_mm * np.array([np.cos(direction), np.sin(direction)])
    e[2, 3] = OUT_OF_PLANE_MM * rng.uniform(-1, 1) / pixel_mm
    return e


def _family_a(seed: int, randomised: bool):
    from regseg.sim.phantom import make_phantom
    from regseg.sim.randomise import randomise
    from regseg.sim.scanner import ScannerConfig, SimulatedScanner

    no_error = dict(tracking_rot_deg=0.0, tracking_shift_mm=0.0, tracking_scale=0.0,
                    out_of_plane_mm=0.0)
    if randomised:  # scanner seeds 77_000..: draws that training never made
        case = randomise(np.random.default_rng([seed, 77_000 + seed, 0x5A]))
        phantom = make_phantom(seed, options=case.phantom)
        cfg = dataclasses.replace(case.scanner, **no_error)
    else:
        phantom, cfg = make_phantom(seed), ScannerConfig(**no_error)
    scanner = SimulatedScanner(phantom, cfg, seed=77_000 + seed)
    return phantom, scanner.random_frame


def _family_b(seed: int):
    from regseg.sim.family_b.anatomy import make_case
    from regseg.sim.family_b.session import Session, SessionConfig

    case = make_case(seed)
    session = Session(case, SessionConfig(tracking_shift_mm=0.0, tracking_rot_deg=0.0),
                      seed=seed * 7 + 1)
    start = int(np.random.default_rng([seed, 0xB]).integers(0, 300))
    counter = iter(range(start, start + 10**6, 4))
    return SimpleNamespace(mri=case.mri, labels=case.labels), lambda rng: session.frame(
        next(counter))


def speckle_reduced(pixels: np.ndarray) -> np.ndarray:
    """The ``Asr`` post-processing of a uint8 frame: 5 x 5 median, then histogram equalisation
    (the darkest value, the black outside the sector, stays 0)."""
    import cv2

    return cv2.equalizeHist(cv2.medianBlur(np.ascontiguousarray(pixels, np.uint8), 5))


def family_samples(family: str, level: float, phantoms: int, frames: int,
                   size: tuple[int, int], a_seed0: int = FAMILY_A_SEED0,
                   b_seed0: int | None = None) -> SampleSet:
    """Held-out frames of one family at tracking error ``level``, on the model grid.

    Family B's cases are its evaluation seeds unless ``b_seed0`` names the first of a
    diagnosis set (seeds outside them, for choosing between models).
    """
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: expected one of {', '.join(FAMILIES)}")
    if family == "B":
        from regseg.sim.family_b import EVAL_SEEDS
        seeds = (list(EVAL_SEEDS)[:phantoms] if b_seed0 is None
                 else list(range(b_seed0, b_seed0 + phantoms)))
    else:
        seeds = list(range(a_seed0, a_seed0 + phantoms))
    rows = []
    for seed in seeds:
        case, draw = (_family_b(seed) if family == "B"
                      else _family_a(seed, family in ("Arand", "Asr")))
        if not np.allclose(case.mri.voxel_to_world, case.labels.voxel_to_world):
            raise ValueError(f"{family} case {seed}: MRI and labels on different grids")
        mri, labels, world_to_voxel = mri_tensors(case)
        rng = np.random.default_rng([seed, int(level * 10), 0xC])
        for _ in range(frames):
            frame = draw(rng)
            # Replace whatever tracking error the frame had by exactly L mm / L deg.
            err = rigid_error(level, rng, frame.pixels.shape, frame.spacing_mm[0])
            frame = dataclasses.replace(frame, image_to_reference=frame.truth.image_to_mri @ err)
            if family == "Asr":
                frame = dataclasses.replace(frame, pixels=speckle_reduced(frame.pixels))
            row = frame_sample(frame, mri, labels, world_to_voxel, size)
            row["phantom_seed"] = torch.tensor([seed])
            rows.append(row)
    merged = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    return SampleSet(**merged, frame_hw=tuple(int(v) for v in merged["frame_hws"][0]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m regseg.train.compare",
                                description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, type=Path, help="checkpoints")
    p.add_argument("--families", default="A,Arand,B")
    p.add_argument("--levels", default="3,10", help="tracking errors, mm and deg")
    p.add_argument("--phantoms", type=int, default=4)
    p.add_argument("--a-seed0", type=int, default=FAMILY_A_SEED0,
                   help="first family-A phantom seed (default 1000, the held-out evaluation "
                   "phantoms; 3100 for the calibration phantoms used to choose)")
    p.add_argument("--b-seed0", type=int, default=None,
                   help="first family-B case seed (default: the evaluation seeds 5000..; "
                   "a diagnosis set outside them, e.g. 5428, to choose on)")
    p.add_argument("--frames", type=int, default=10, help="per phantom and level")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="keep the rendered sample sets here and reuse them")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    unknown = [f for f in args.families.split(",") if f not in FAMILIES]
    if unknown:  # before any model is loaded or frame rendered
        p.error(f"--families {args.families}: {', '.join(unknown)} unknown; expected a "
                f"comma-separated subset of {', '.join(FAMILIES)}")
    torch.set_num_threads(args.threads)
    models = {str(m): load_model(m) for m in args.models}
    size = (next(iter(models.values())).config.size,) * 2
    rows = []
    for family in args.families.split(","):
        for level in (float(v) for v in args.levels.split(",")):
            t0 = time.monotonic()
            seed0 = ((f"-b{args.b_seed0}" if args.b_seed0 is not None else "") if family == "B"
                     else f"-a{args.a_seed0}")
            cached = (args.cache_dir / f"{family}{seed0}-L{level:g}-p{args.phantoms}"
                      f"-f{args.frames}-s{size[0]}.pt") if args.cache_dir else None
            if cached is not None and cached.is_file():
                samples = SampleSet.load(cached)
            else:
                samples = family_samples(family, level, args.phantoms, args.frames, size,
                                         args.a_seed0, args.b_seed0)
                if cached is not None:
                    samples.save(cached)
            for name, model in models.items():
                m = evaluate(model, samples)
                rows.append({"model": name, "family": family, "level": level, **m})
                print(f"{family:5s} L={level:4.1f} {Path(name).parent.name}/{Path(name).name}: "
                      f"prostate {m['prostate_dice']:.3f} lesion {m['lesion_dice']:.3f} "
                      f"reg-dice {m['reg_dice_after']:.3f} TRE median "
                      f"{m['tre_mm_before_median']:.2f} -> {m['tre_mm_after_median']:.2f} mm "
                      f"(mean {m['tre_mm_after']:.2f}) [{len(samples)} frames, "
                      f"{time.monotonic() - t0:.0f} s]", flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "command": shlex.join(["python", "-m", "regseg.train.compare", *argv]),
            "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
