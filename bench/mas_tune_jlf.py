"""Choose MIND-JLF's patch radius, beta and alpha on validation sweeps (never the bench's targets).

Targets: ``TRAIN_SEEDS`` cases 11900.. (``--targets``, default 8; the range train/simnet.py
validates on, not trained on; disjoint from the bench's ``EVAL_SEEDS`` 13000..); atlases: the
bench's ``ATLAS_SEEDS`` MRIs (12000..), registered once per target exactly as bench/mas.py
does (its ``registered_atlases``, same cache format). Every (radius, beta, alpha) of the grid
fuses the same registered atlases; the mean gland Dice ranks them. Also reported on the same
targets: vote and intensity JLF (antsJointFusion's defaults), the reference points.

``python bench/mas_tune_jlf.py --json bench/results/mas_jlf_tuning.json`` (the coarse grid) and
``... --radii 3 4 5 --betas 0.5 --alphas 0.1 1 --dilations 2 4 --json
bench/results/mas_jlf_tuning_2.json`` (around its best) print the grid and the best setting,
which engines/jlf.py's ``DEFAULTS["mind"]`` then takes (by hand, the results committed).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

VAL_START = 11_900  # TRAIN_SEEDS offset 900: validation, never a training target
RADII, BETAS, ALPHAS, DILATIONS = (1, 2, 3), (0.5, 1.0, 2.0), (0.01, 0.1, 1.0), (2,)


def main(argv: list[str] | None = None) -> int:
    from mas import registered_atlases
    from tqdm import tqdm

    from regseg.engines.label_fusion import LabelFusionEngine
    from regseg.mas import Atlas
    from regseg.metrics import dice
    from regseg.sim.sweep import ATLAS_SEEDS, TRAIN_SEEDS, make_sweep_case

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=int, default=8, help="validation targets (default 8)")
    p.add_argument("--atlases", type=int, default=4, help="atlases per target (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/mas_val_cache"),
                   help="registered-atlas cache (default /tmp/mas_val_cache)")
    p.add_argument("--radii", type=int, nargs="+", default=list(RADII),
                   help=f"patch radii to try (default {' '.join(map(str, RADII))})")
    p.add_argument("--betas", type=float, nargs="+", default=list(BETAS),
                   help=f"exponents to try (default {' '.join(map(str, BETAS))})")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS),
                   help=f"ridges to try (default {' '.join(map(str, ALPHAS))})")
    p.add_argument("--dilations", type=int, nargs="+", default=list(DILATIONS),
                   help="MIND neighbour distances (voxels) to try (default 2)")
    p.add_argument("--json", help="write the grid here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = list(range(VAL_START, VAL_START + args.targets))
    assert all(s in TRAIN_SEEDS for s in seeds)
    atlases = []
    for seed in ATLAS_SEEDS[:args.atlases]:
        case = make_sweep_case(seed)
        atlases.append(Atlas(f"atlas_{seed}", case.mri, case.mri_labels))
    data = []
    for seed in tqdm(seeds, desc="register validation targets", disable=args.no_progress):
        case = make_sweep_case(seed)
        inputs, _ = registered_atlases(case, atlases, "affine", args.threads, args.cache_dir)
        data.append((inputs, case.trus_labels.data))

    def score(engine: Any) -> tuple[float, float]:
        t0 = time.perf_counter()
        d = [dice(engine(**inputs).labels, truth, 1) for inputs, truth in data]
        return float(np.mean(d)), (time.perf_counter() - t0) / len(data)

    rows: list[dict[str, Any]] = []
    for name, engine in (("vote", LabelFusionEngine("vote")),
                         ("jlf_intensity", LabelFusionEngine("jlf", jlf_features="intensity"))):
        d, s = score(engine)
        rows.append({"method": name, "gland_dice": d, "fusion_s": s})
    grid = list(itertools.product(args.radii, args.betas, args.alphas, args.dilations))
    for radius, beta, alpha, dilation in tqdm(grid, desc="grid", disable=args.no_progress):
        d, s = score(LabelFusionEngine("jlf", jlf_features="mind", radius=radius, beta=beta,
                                       alpha=alpha, mind_dilation=dilation))
        rows.append({"method": "jlf_mind", "radius": radius, "beta": beta, "alpha": alpha,
                     "dilation": dilation, "gland_dice": d, "fusion_s": s})
        print(f"radius {radius} beta {beta} alpha {alpha} dilation {dilation}: Dice {d:.4f}",
              flush=True)
    best = max((r for r in rows if r["method"] == "jlf_mind"), key=lambda r: r["gland_dice"])
    for r in rows:
        print(f"{r['method']:<14}{r.get('radius', ''):>3}{r.get('beta', ''):>6}"
              f"{r.get('alpha', ''):>6}{r.get('dilation', ''):>3}  Dice {r['gland_dice']:.4f}  "
              f"{r['fusion_s']:.2f} s")
    print(f"best MIND JLF on validation: radius {best['radius']}, beta {best['beta']}, "
          f"alpha {best['alpha']}, dilation {best['dilation']}: gland Dice "
          f"{best['gland_dice']:.4f}")
    if args.json:
        write_json(args.json, "mas_jlf_tuning", rows, argv, best=best,
                   validation_target_seeds=seeds,
                   atlas_seeds=list(ATLAS_SEEDS[:args.atlases]),
                   note="validation targets are TRAIN_SEEDS cases, disjoint from the bench's "
                   "EVAL_SEEDS 13000..; the grid is chosen here and only then run on EVAL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
