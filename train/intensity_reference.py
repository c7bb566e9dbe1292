"""``regseg train intensity-reference``: the grey levels ``--intensity match`` maps frames onto.

The quantiles of the imaged pixels (> 0) of family-A frames from the default scanner (the one the
live networks' plain training frames and QualityNet's calibration come from) on training phantoms
1.. (never the demo phantom 0, the held-out 1000.., calibration 3100.. or family B), frames spread
evenly over both sweeps. Deterministic: the same command writes the same file.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import numpy as np

from regseg.errors import InputError
from regseg.stream.intensity import QUANTILES, REFERENCE_NAME, reference_quantiles


def make_reference(phantoms: int, frames: int) -> np.ndarray:
    """Quantiles of ``frames`` frames of each of ``phantoms`` training phantoms (seeds 1..)."""
    from regseg.sim.phantom import make_phantom
    from regseg.sim.scanner import ScannerConfig, SimulatedScanner

    pixels = []
    for seed in range(1, phantoms + 1):
        cfg = ScannerConfig()
        scanner = SimulatedScanner(make_phantom(seed), cfg, seed=seed)
        for index in np.linspace(0, 2 * cfg.sweep_frames - 1, frames).round().astype(int):
            pixels.append(scanner.frame(int(index)).pixels)
    return reference_quantiles(pixels)


def run(args: argparse.Namespace) -> int:
    if args.phantoms < 1 or args.frames < 1:
        raise InputError(f"--phantoms {args.phantoms} / --frames {args.frames}: expected >= 1")
    out = Path(args.out)
    if not out.is_dir():
        raise InputError(f"--out {out}: no such folder")
    q = make_reference(args.phantoms, args.frames)
    command = shlex.join(["regseg", "train", "intensity-reference", "--out", str(out),
                          "--phantoms", str(args.phantoms), "--frames", str(args.frames)])
    path = out / REFERENCE_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"quantiles": [round(float(v), 4) for v in q],
                               "n_quantiles": QUANTILES, "phantom_seeds": [1, args.phantoms],
                               "frames_per_phantom": args.frames, "scanner": "family A default",
                               "command": command}) + "\n")
    tmp.replace(path)  # nothing half-written
    print(f"wrote {path}: median grey {q[QUANTILES // 2]:.1f}, 5-95 % "
          f"{q[int(0.05 * (QUANTILES - 1))]:.1f}-{q[int(0.95 * (QUANTILES - 1))]:.1f}")
    return 0


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="models/weights", help="folder to write "
                        f"{REFERENCE_NAME} into (default models/weights)")
    parser.add_argument("--phantoms", type=int, default=8, help="training phantoms 1.. (8)")
    parser.add_argument("--frames", type=int, default=12, help="frames per phantom (12)")
    parser.set_defaults(func=run)
