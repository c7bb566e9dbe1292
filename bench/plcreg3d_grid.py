"""What PLCReg 3-D costs per pair at each working grid: why the CPU default keeps a coarse network.

``regseg train plcreg3d --spacing MM`` trains the network on the MNI box at any voxel size; this
bench times one forward pass (moving + fixed -> field, as ``RegistrationEngine.predict`` runs
it) of the recipe's model at each ``--spacing``, on each backend, in one run. Weights are
random (the cost does not depend on their values), so a grid no one has trained yet is timed
too. Compare with ``bench/registration.py``'s whole ``regseg register`` default at 1.5 mm.

    python bench/plcreg3d_grid.py [--spacing 3.25 2.0 1.5] [--threads 2] [--json F]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import torch
from common import device_name, print_table, write_json

from regseg.engines.base import make_engine
from regseg.engines.select import time_engine
from regseg.errors import EngineError
from regseg.models.plcreg import PLCReg, count_parameters
from regseg.train.plcreg_mni import model_at_spacing

COLUMNS = [("name", "grid", ""), ("backend", "backend", ""), ("voxels", "voxels", "d"),
           ("median_s", "s / pair", ".3f"), ("min_s", "min s", ".3f"),
           ("vs_coarsest", "x coarsest", ".1f")]


def time_grid(spacing: float, backend: str, repeats: int, threads: int,
              device: torch.device) -> dict:
    """One row: the recipe's model at ``spacing``, ``repeats`` timed passes after one warm-up."""
    cfg = model_at_spacing(spacing)
    torch.manual_seed(0)
    model = PLCReg(cfg).eval()
    shape = (1, 1, *cfg.size)
    row = {"name": f"{spacing:g} mm {'x'.join(map(str, cfg.size))}", "spacing_mm": spacing,
           "size": list(cfg.size), "voxels": int(np.prod(cfg.size)), "backend": backend,
           "parameters": count_parameters(model), "threads": threads}
    try:
        engine = make_engine(model, {"moving": shape, "fixed": shape}, backend=backend,
                             device=device, threads=threads, outputs=("ddf", "field"))
    except EngineError as exc:  # a backend this machine cannot build is a row that says why
        return {**row, "median_s": None, "min_s": None, "error": str(exc)}
    gen = torch.Generator().manual_seed(1)
    inputs = {k: torch.rand(shape, generator=gen).to(device) for k in ("moving", "fixed")}
    time_engine(engine, inputs, 1)  # warm-up (ONNX Runtime's first run allocates)
    times = [t / 1e3 for t in time_engine(engine, inputs, repeats)]
    return {**row, "median_s": round(statistics.median(times), 4),
            "min_s": round(min(times), 4), "times_s": [round(t, 4) for t in times]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, nargs="+", default=[3.25, 2.0, 1.5],
                        metavar="MM", help="grids to time (default 3.25 2.0 1.5)")
    parser.add_argument("--backend", nargs="+", default=["eager", "onnxrt"],
                        help="backends (default eager onnxrt)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per row (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch / ORT threads (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="out/bench_plcreg3d_grid.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or any(not s > 0 for s in args.spacing):
        print("plcreg3d_grid: --repeats and --threads must be >= 1 and every --spacing > 0 mm",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [time_grid(s, b, args.repeats, args.threads, device)
            for s in args.spacing for b in args.backend]
    for b in args.backend:  # each backend against its own coarsest grid
        mine = [r for r in rows if r["backend"] == b and r["median_s"]]
        if mine:
            base = min(mine, key=lambda r: r["voxels"])["median_s"]
            for r in mine:
                r["vs_coarsest"] = round(r["median_s"] / base, 2)
    print_table(rows, COLUMNS)
    write_json(args.json, "plcreg3d_grid", rows, argv, device=device_name(device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
