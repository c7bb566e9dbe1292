"""Per-frame registration time and TRE: regseg's learned affine vs SimpleITK affine (Mattes MI).

Both start from the tracked plane of the same simulated frames and estimate the in-plane affine
that aligns the MRI plane with the B-mode frame; TRE is measured over the frame's true prostate
pixels against the simulator's ground truth (as regseg-stream reports it). regseg's time is its
registration path: reslice at the model size, the engine, and the refined transform. SimpleITK's
is ``ImageRegistrationMethod.Execute`` on the 256 x 256 frame and MRI plane, set up as the
SimpleITK registration notebooks do (Mattes MI, 50 bins, 20 % random sampling, regular-step
gradient descent, scales from physical shift, 3-level pyramid).

    python bench/classical.py [--quick] [--json out/bench_classical.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import add_ratios, device_name, print_table, summarise, write_histogram, write_json

from regseg import metrics, spatial
from regseg.engines.fusion import FusionEngine
from regseg.errors import EngineError
from regseg.models.registry import build_model
from regseg.sim.phantom import make_phantom
from regseg.sim.scanner import SimulatedScanner
from regseg.stream.context import build_context
from regseg.stream.pipeline import Pipeline, plane_matrices

TRE_POINTS = 2000


def simpleitk_affine(fixed: np.ndarray, moving: np.ndarray, seed: int) -> np.ndarray:
    """(3, 3) pixel affine: fixed pixel (i, j, 1) -> moving pixel, by SimpleITK (Mattes MI).

    Args:
        fixed: (H, W) float32 B-mode frame in [0, 1].
        moving: (H, W) float32 MRI plane in [0, 1] at the tracked pose.
    """
    import SimpleITK as sitk

    f = sitk.GetImageFromArray(fixed)  # spacing 1, origin 0: physical = pixel (i, j)
    m = sitk.GetImageFromArray(moving)
    initial = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(2),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                 numberOfIterations=100)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(initial, inPlace=False)
    out = reg.Execute(f, m)
    affine = sitk.AffineTransform(sitk.CompositeTransform(out).GetNthTransform(0))
    a = np.asarray(affine.GetMatrix(), dtype=np.float64).reshape(2, 2)
    c = np.asarray(affine.GetCenter(), dtype=np.float64)
    t = np.asarray(affine.GetTranslation(), dtype=np.float64)
    m3 = np.eye(3)
    m3[:2, :2] = a
    m3[:2, 2] = t + c - a @ c  # ITK: T(x) = A (x - c) + c + t
    return m3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 frames (about a minute)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="regseg's torch and engine threads (as regseg-stream's default)")
    ap.add_argument("--sitk-threads", type=int, default=2,
                    help="SimpleITK's threads (its default: every core)")
    ap.add_argument("--json", default="out/bench_classical.json")
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    import SimpleITK as sitk

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.sitk_threads)
    n = args.frames or (20 if args.quick else 100)
    phantom = make_phantom(0)
    context = build_context(phantom.mri, phantom.labels)
    scanner = SimulatedScanner(phantom, seed=1)  # not the training sessions' seed
    frames = [scanner.frame(i) for i in range(n)]
    try:
        engine = FusionEngine(backend=args.backend, threads=args.threads)
        weights = "shipped"
    except EngineError:  # no shipped weights yet: time is still right, TRE is not meaningful
        engine = FusionEngine(model=build_model("alignsegnet"), backend=args.backend,
                              threads=args.threads)
        weights = "random (TRE not meaningful)"
    pipeline = Pipeline(context, engine)
    times = {"regseg": [], "simpleitk": []}
    tre = {"tracked": [], "regseg": [], "simpleitk": []}
    for k, frame in enumerate(frames):
        truth = frame.truth
        ji = np.argwhere(truth.labels > 0)
        if len(ji) == 0:
            continue
        ji = ji[np.linspace(0, len(ji) - 1, min(TRE_POINTS, len(ji))).astype(int)]
        points = ji[:, ::-1].astype(np.float64)
        hw = frame.pixels.shape
        tracked = pipeline.plane(frame)
        chain = pipeline.chain(hw)

        start = time.perf_counter()
        with torch.inference_mode():
            mats = torch.from_numpy(plane_matrices(context, tracked, hw, engine.size))
            theta, _ = chain.model(*chain.prepare(torch.from_numpy(frame.pixels), mats))
            theta_px = spatial.theta_to_pixel(theta[0].double().numpy(), hw)
        regseg_to_mri = tracked @ spatial.lift_2d(theta_px)
        times["regseg"].append((time.perf_counter() - start) * 1e3)

        moving = spatial.reslice(context.mri, context.world_to_voxel, tracked, hw)[0, 0].numpy()
        fixed = frame.pixels.astype(np.float32) / 255.0
        start = time.perf_counter()
        sitk_to_mri = tracked @ spatial.lift_2d(simpleitk_affine(fixed, moving, seed=k))
        times["simpleitk"].append((time.perf_counter() - start) * 1e3)

        for name, m in (("tracked", tracked), ("regseg", regseg_to_mri),
                        ("simpleitk", sitk_to_mri)):
            tre[name].append(metrics.tre_mm(m, truth.image_to_mri, points))
    dev = device_name("cpu")
    rows = [summarise(f"regseg alignsegnet/{engine.backend}", times["regseg"], device=dev,
                      weights=weights),
            summarise("simpleitk affine (mattes mi)", times["simpleitk"], device=dev,
                      simpleitk=sitk.Version_VersionString()),
            summarise("tracked pose (no registration)", [], device=dev)]
    for row, key in zip(rows, ("regseg", "simpleitk", "tracked"), strict=True):
        row["tre_mm_median"] = round(float(np.median(tre[key])), 3)
        row["tre_mm_mean"] = round(float(np.mean(tre[key])), 3)
        row["frames"] = len(tre[key])
    add_ratios(rows, simpleitk=rows[1]["name"])
    for row in rows:
        row.setdefault("ratio_p50_vs_naive", None)  # the naive chain is in bench/latency.py
    print_table(rows, [("name", "method", ""), ("p50_ms", "p50 ms", ".1f"),
                       ("p95_ms", "p95 ms", ".1f"), ("p99_ms", "p99 ms", ".1f"),
                       ("tre_mm_median", "TRE mm med", ".2f"),
                       ("tre_mm_mean", "TRE mm mean", ".2f"),
                       ("ratio_vs_simpleitk", "x simpleitk", ".1f")])
    write_json(args.json, "classical", rows, frames=n, threads=args.threads,
               sitk_threads=args.sitk_threads,
               engine_info=engine.info, argv=argv)
    write_histogram(args.png or Path(args.json).with_suffix(".png"),
                    {"regseg": times["regseg"], "simpleitk": times["simpleitk"]},
                    f"per-frame registration time ({dev})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
