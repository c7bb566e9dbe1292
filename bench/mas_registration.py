"""MRI -> 3-D TRUS sweep registration on held-out simulated cases: TRE and seconds per pair.

For each EVAL_SEEDS case (regseg.sim.sweep, never trained on), the patient's MRI is registered to
its direct-rendered sweep volume starting from ``reference_to_mri_initial`` (10 mm / 10 degrees
off: tracking alone). TRE: mean distance over the TRUS gland voxels between where a registration
and the simulator's true correspondence (rigid Reference -> MRI *and* the probe-pressure and
smooth deformation) put each point in the MRI. Methods, same pairs, same threads:

* ``initial``: the tracking-only start;
* ``regseg_affine``: regseg.crossmodal, method="affine" (MIND instance optimisation), the
  default of ``regseg register-mri``: the headline ``regseg`` numbers are this row's;
* ``regseg_biregnet``: method="biregnet" (the affine stage, then BiRegNet; called ``regseg`` in
  results written before the default became ``affine``);
* ``simpleitk``: affine then B-spline (mesh 4), Mattes MI (32 bins, 25 % random samples, fixed
  mask = swept voxels), shrink 2/1, from the same initial transform; 100 iterations per stage
  (50 with ``quick``).

``run(quick, threads)`` returns ``{"mri_to_sweep_tre_mm": {"initial", "regseg", "simpleitk"},
"speedup_vs_simpleitk", "rows", ...}`` (bench/mas.py merges it). Alone:
``python bench/mas_registration.py [--quick] [--threads N] [--json F]`` prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

#: held-out pairs: --quick's one pair keeps `bench/mas.py --quick` near 10 minutes on the shared
#: 2-core CPU (SimpleITK takes ~1.5 min a pair there even at its quick iterations)
QUICK_PAIRS, FULL_PAIRS = 1, 8
#: SimpleITK iterations per stage (affine, B-spline): the full bench's, and --quick's
SITK_ITERATIONS, SITK_QUICK_ITERATIONS = 100, 50
#: The row behind the headline "regseg" TRE and the speed-up: register-mri's default method
HEADLINE = "regseg_affine"


def sitk_register(case, threads: int, iterations: int = 100, mesh: int = 4):
    """SimpleITK affine + B-spline (Mattes MI) of the MRI to the sweep, from the initial.

    Returns a function mapping (N, 3) Reference mm to MRI mm. Physical coordinates are our RAS
    mm on both images (one frame per image; ITK's LPS convention does not enter)."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)

    def image(volume, data=None):
        a = volume.data if data is None else data
        img = sitk.GetImageFromArray(np.ascontiguousarray(a.T.astype(np.float32)))
        v2w = volume.voxel_to_world
        spacing = np.linalg.norm(v2w[:3, :3], axis=0)
        img.SetSpacing([float(s) for s in spacing])
        img.SetOrigin([float(o) for o in v2w[:3, 3]])
        img.SetDirection([float(d) for d in (v2w[:3, :3] / spacing).ravel()])
        return img

    fixed, moving = image(case.trus), image(case.mri)
    mask = sitk.Cast(image(case.trus, (case.trus.data > 0).astype(np.float32)), sitk.sitkUInt8)

    def method():
        r = sitk.ImageRegistrationMethod()
        r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        r.SetMetricSamplingStrategy(r.RANDOM)
        r.SetMetricSamplingPercentage(0.25, 0)
        r.SetMetricFixedMask(mask)
        r.SetInterpolator(sitk.sitkLinear)
        r.SetShrinkFactorsPerLevel([2, 1])
        r.SetSmoothingSigmasPerLevel([1, 0])
        return r

    init = sitk.AffineTransform(3)
    m = case.reference_to_mri_initial
    init.SetMatrix([float(v) for v in m[:3, :3].ravel()])
    init.SetTranslation([float(v) for v in m[:3, 3]])
    r = method()
    r.SetInitialTransform(init, inPlace=False)
    r.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, iterations)
    r.SetOptimizerScalesFromPhysicalShift()
    affine = r.Execute(fixed, moving)
    r = method()
    bspline = sitk.BSplineTransformInitializer(fixed, [mesh] * 3)
    r.SetMovingInitialTransform(affine)
    r.SetInitialTransform(bspline, inPlace=True)
    r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=iterations,
                           maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=1000,
                           costFunctionConvergenceFactor=1e7)
    r.Execute(fixed, moving)
    total = sitk.CompositeTransform([affine, bspline])

    def apply(points: np.ndarray) -> np.ndarray:
        return np.array([total.TransformPoint([float(c) for c in p]) for p in points])

    return apply


def _gland_points(case, step: int = 7) -> np.ndarray:
    idx = np.argwhere(case.trus_labels.data > 0)[::step]
    v2w = case.trus.voxel_to_world
    return idx, idx @ v2w[:3, :3].T + v2w[:3, 3]


def _tre(est: np.ndarray, true: np.ndarray) -> float:
    return float(np.linalg.norm(est - true, axis=1).mean())


def run(quick: bool = False, threads: int = 1, pairs: int | None = None,
        progress: bool = True, rows_json: str | None = None,
        make_case: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """The bench (see the module docstring); ``pairs`` overrides the quick/full count;
    ``rows_json``: rewrite the rows so far there after every pair (a long run's partial result);
    ``make_case``: the case maker (default regseg.sim.sweep.make_sweep_case; bench/mas.py
    passes its cached one so a case it already simulated is not simulated again)."""
    from tqdm import tqdm

    from regseg.crossmodal import biregnet_engine, register_cross_modal
    from regseg.sim.sweep import EVAL_SEEDS, true_correspondence

    if make_case is None:
        from regseg.sim.sweep import make_sweep_case as make_case

    torch.set_num_threads(threads)
    n = pairs or (QUICK_PAIRS if quick else FULL_PAIRS)
    seeds = [EVAL_SEEDS[i] for i in range(n)]
    rows: list[dict[str, Any]] = []
    # first-call costs out of the timing: torch.optim's lazy import of torch._dynamo (~7 s,
    # the affine stage's Adam) and the BiRegNet engine's build and warm-up
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    biregnet_engine()
    for seed in tqdm(seeds, desc="mri->sweep", unit="pair", disable=not progress):
        case = make_case(seed)
        idx, ref = _gland_points(case)
        true = true_correspondence(case, ref)
        m0 = case.reference_to_mri_initial
        rows.append({"seed": seed, "method": "initial", "seconds": 0.0,
                     "tre_mm": _tre(ref @ m0[:3, :3].T + m0[:3, 3], true)})
        for name, method in (("regseg_affine", "affine"), ("regseg_biregnet", "biregnet")):
            r = register_cross_modal(case.mri, case.mri_labels, case.trus, method=method,
                                     initial_fixed_to_moving=m0, threads=threads)
            pts = ref if r.ddf_mm is None else ref + r.ddf_mm[:, idx[:, 0], idx[:, 1],
                                                               idx[:, 2]].T
            a = r.fixed_to_moving
            rows.append({"seed": seed, "method": name, "seconds": r.seconds,
                         "tre_mm": _tre(pts @ a[:3, :3].T + a[:3, 3], true)})
        t0 = time.perf_counter()
        try:
            apply = sitk_register(case, threads,
                                  SITK_QUICK_ITERATIONS if quick else SITK_ITERATIONS)
            seconds = time.perf_counter() - t0
            rows.append({"seed": seed, "method": "simpleitk", "seconds": seconds,
                         "tre_mm": _tre(apply(ref), true)})
        except RuntimeError as exc:  # an ITK failure is a result, not a crash of the bench
            rows.append({"seed": seed, "method": "simpleitk", "tre_mm": float("nan"),
                         "seconds": time.perf_counter() - t0,
                         "error": str(exc).strip().splitlines()[-1][:200]})
        if rows_json:
            with open(rows_json, "w") as f:
                json.dump(rows, f, indent=1)
    methods = ("initial", "regseg_affine", "regseg_biregnet", "simpleitk")
    summary = {m: {"tre_mm_mean": float(np.nanmean([r["tre_mm"] for r in rows
                                                    if r["method"] == m])),
                   "tre_mm_median": float(np.nanmedian([r["tre_mm"] for r in rows
                                                        if r["method"] == m])),
                   "tre_mm_max": float(np.nanmax([r["tre_mm"] for r in rows
                                                  if r["method"] == m])),
                   "seconds_per_pair": float(np.mean([r["seconds"] for r in rows
                                                      if r["method"] == m]))}
               for m in methods}
    speedup = summary["simpleitk"]["seconds_per_pair"] / max(
        summary[HEADLINE]["seconds_per_pair"], 1e-9)
    return {"mri_to_sweep_tre_mm": {"initial": round(summary["initial"]["tre_mm_mean"], 3),
                                    "regseg": round(summary[HEADLINE]["tre_mm_mean"], 3),
                                    "simpleitk": round(summary["simpleitk"]["tre_mm_mean"], 3)},
            "regseg_row": HEADLINE,
            "speedup_vs_simpleitk": round(speedup, 2), "methods": summary, "rows": rows,
            "pairs": n, "eval_seeds": seeds, "threads": threads,
            "misalignment": "10 mm / 10 deg about the gland centre",
            "simpleitk_iterations": SITK_QUICK_ITERATIONS if quick else SITK_ITERATIONS}


def print_table(result: dict[str, Any]) -> None:
    print(f"MRI -> sweep registration, {result['pairs']} held-out cases (EVAL_SEEDS "
          f"{result['eval_seeds'][0]}..{result['eval_seeds'][-1]}), {result['threads']} "
          "thread(s)")
    print(f"{'method':<15}{'TRE mean mm':>12}{'median':>9}{'max':>8}{'s / pair':>10}")
    for name, s in result["methods"].items():
        print(f"{name:<15}{s['tre_mm_mean']:>12.2f}{s['tre_mm_median']:>9.2f}"
              f"{s['tre_mm_max']:>8.2f}{s['seconds_per_pair']:>10.2f}")
    print(f"speed-up of regseg over SimpleITK: {result['speedup_vs_simpleitk']:.1f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_PAIRS} pairs instead of "
                   f"{FULL_PAIRS}")
    p.add_argument("--pairs", type=int, default=None, help="number of held-out pairs")
    p.add_argument("--threads", type=int, default=1, help="CPU threads, every method")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--rows-json", default=None, help="rewrite the rows so far here after each pair")
    args = p.parse_args(argv)
    result = run(args.quick, args.threads, pairs=args.pairs, rows_json=args.rows_json)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
