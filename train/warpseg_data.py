"""Training data of ``regseg train warpseg``: labelled atlases + registration pseudo-labels.

Prostate (``--task prostate``): phantom MRIs (regseg.sim.phantom). The atlases keep their true
zones; the unlabelled phantoms get pseudo-labels from ``regseg pseudolabel``'s code path
(:func:`regseg.pseudolabel.pseudolabel_folder`, atlas seed ``ATLAS_SEEDS[0]``), cached on disk so a
second run (the single-decoder ablation) reuses them. Seeds: atlases 100..., unlabelled 200...,
validation 300..303; evaluation (bench/warpseg.py, tests/warpseg) uses 0 and 9000..., never these.

Fine classes (prostate): 0 background, 1 peripheral zone, 2 transition zone (with the urethra and
the calcifications in it), 3 lesion; coarse: 0 background, 1 prostate (= fine 1..3, the label file
``regseg-stream --mri-labels`` takes has prostate 1 and lesion 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from regseg.engines.warpseg import labels_to_working, to_working
from regseg.imageio import Volume, load_mri, save_volume
from regseg.models.warpseg import WarpSegConfig
from regseg.sim import phantom as ph

#: The refinement steps' mode of both WarpSeg recipes' pseudo-labels (train and bench): ``full``,
#: the one the shipped warpseg-brain and warpseg-prostate were trained with (the engine's default
#: became ``fast`` afterwards; pinned so that the recipes reproduce the shipped models).
PSEUDOLABEL_REFINE_MODE = "full"

ATLAS_SEEDS0 = 100
UNLABELLED_SEEDS0 = 200
VAL_SEEDS = (300, 301, 302, 303)
#: Prostate fine classes from the phantom's tissue classes.
FINE_OF_TISSUE = np.zeros(len(ph.TISSUE_NAMES), dtype=np.uint8)
FINE_OF_TISSUE[ph.PERIPHERAL_ZONE] = 1
FINE_OF_TISSUE[[ph.TRANSITION_ZONE, ph.URETHRA, ph.CALCIFICATION]] = 2
FINE_OF_TISSUE[ph.TUMOUR] = 3
#: What a pseudo-label's fine class allows (label sets): the registration moves the atlas's zones
#: but an atlas lesion says nothing about where this image's lesions are, so a lesion may hide in
#: any warped zone voxel, and a warped atlas lesion only says "prostate".
PSEUDO_SETS = {0: (0,), 1: (1, 3), 2: (2, 3), 3: (1, 2, 3)}

PROSTATE_CONFIG = WarpSegConfig()


def prostate_fine(tissue: np.ndarray) -> np.ndarray:
    """Fine labels (0..3) of a phantom tissue map."""
    return FINE_OF_TISSUE[tissue]


@dataclass
class TrainingSet:
    """Working-grid tensors of every training volume."""

    images: torch.Tensor  # (N, 1, D, H, W) float32 in [0, 1]
    coarse: torch.Tensor  # (N, D, H, W) int64
    fine: torch.Tensor  # (N, D, H, W) int64: true fine labels, or the warped atlas's
    exact: torch.Tensor  # (N,) bool: true labels (atlases)
    weight: torch.Tensor  # (N,) float32: 1 for atlases, the pseudo-label quality weight
    quality: list[dict]  # the pseudo-label quality rows


def fine_sets(fine: torch.Tensor, exact: torch.Tensor, classes: int,
              pseudo_sets: dict[int, tuple[int, ...]] | None) -> torch.Tensor:
    """(B, K, D, H, W) bool label sets: one-hot for exact labels, ``pseudo_sets`` (e.g.
    :data:`PSEUDO_SETS`) for pseudo-labels; None: one-hot everywhere (hard pseudo-labels, as the
    single-decoder ablation and the brain model train)."""
    onehot = torch.nn.functional.one_hot(fine, classes).movedim(-1, 1).bool()
    if pseudo_sets is None:
        return onehot
    table = torch.zeros(classes, classes, dtype=torch.bool)
    for c, allowed in pseudo_sets.items():
        table[c, list(allowed)] = True
    sets = table[fine].movedim(-1, 1)
    return torch.where(exact.view(-1, 1, 1, 1, 1), onehot, sets)


def write_phantom_case(seed: int, folder: Path) -> tuple[Path, Path]:
    """``folder/images/p<seed>.nii.gz`` and its fine labels ``folder/truth/p<seed>.nii.gz``."""
    images, truth = folder / "images", folder / "truth"
    img_path, lab_path = images / f"p{seed}.nii.gz", truth / f"p{seed}.nii.gz"
    if not (img_path.is_file() and lab_path.is_file()):
        images.mkdir(parents=True, exist_ok=True)
        truth.mkdir(parents=True, exist_ok=True)
        case = ph.make_phantom(seed)
        save_volume(case.mri, img_path)
        save_volume(Volume(prostate_fine(case.tissue.data), case.tissue.voxel_to_world), lab_path)
    return img_path, lab_path


def prostate_training_set(cache: Path, *, atlases: int, unlabelled: int, refine: int,
                          config: WarpSegConfig, progress: bool) -> TrainingSet:
    """Write (or reuse) the phantoms and pseudo-labels under ``cache``; working-grid tensors."""
    from tqdm import tqdm

    from regseg.engines.registration import RegistrationEngine
    from regseg.pseudolabel import pseudolabel_folder, read_quality

    atlas_seeds = list(range(ATLAS_SEEDS0, ATLAS_SEEDS0 + atlases))
    free_seeds = list(range(UNLABELLED_SEEDS0, UNLABELLED_SEEDS0 + unlabelled))
    cases = {}
    for seed in tqdm(atlas_seeds + free_seeds, desc="phantoms", disable=not progress):
        folder = cache / ("atlases" if seed in atlas_seeds else "unlabelled")
        cases[seed] = write_phantom_case(seed, folder)
    atlas_img, atlas_lab = cases[atlas_seeds[0]]
    pseudo_dir = cache / f"pseudo_refine{refine}"
    done = read_quality(pseudo_dir)
    if len(done) < len(free_seeds):
        # optimise, not the learned affine stage (trained on brain MRI pairs only): what the
        # shipped model's pseudo-labels were made with
        engine = RegistrationEngine("plcreg3d", affine="optimise", refine=refine,
                                    refine_mode=PSEUDOLABEL_REFINE_MODE)
        bar = tqdm(total=len(free_seeds), desc="pseudolabel", disable=not progress)
        pseudolabel_folder(engine, load_mri(atlas_img), _load_labels(atlas_lab),
                           [cases[s][0] for s in free_seeds], pseudo_dir,
                           meta={"atlas_seed": atlas_seeds[0], "refine": refine},
                           on_done=lambda *_: bar.update(1))
        bar.close()
    quality = read_quality(pseudo_dir)
    # pseudo-label weights relative to the median one (capped at 1): a typical registration counts
    # as much as an atlas, worse ones less, dropped ones (weight 0) not at all
    pseudo_median = max(1e-6, float(np.median([quality[f"p{s}"]["weight"] for s in free_seeds])))
    images, coarse, fine, exact, weight = [], [], [], [], []
    for seed in atlas_seeds + free_seeds:
        img_path, lab_path = cases[seed]
        image = load_mri(img_path)
        if seed in atlas_seeds:
            labels, w = _load_labels(lab_path), 1.0
        else:
            labels = _load_labels(pseudo_dir / f"p{seed}_labels.nii.gz")
            w = float(quality[f"p{seed}"]["weight"]) / pseudo_median
        f = labels_to_working(labels, config, image)
        images.append(to_working(image, config))
        fine.append(f)
        coarse.append((f > 0).astype(np.int64))
        exact.append(seed in atlas_seeds)
        weight.append(min(1.0, w))
    return TrainingSet(images=torch.from_numpy(np.stack(images))[:, None],
                       coarse=torch.from_numpy(np.stack(coarse)),
                       fine=torch.from_numpy(np.stack(fine)),
                       exact=torch.tensor(exact), weight=torch.tensor(weight),
                       quality=[quality[k] for k in sorted(quality)])


def _load_labels(path: Path) -> Volume:
    vol = load_mri(path)
    return Volume(np.rint(vol.data).astype(np.uint8), vol.voxel_to_world, str(path))


def validation_cases(cache: Path) -> list[tuple[Volume, np.ndarray]]:
    """(MRI, fine truth on its grid) of the validation phantoms."""
    out = []
    for seed in VAL_SEEDS:
        img_path, lab_path = write_phantom_case(seed, cache / "validation")
        out.append((load_mri(img_path), _load_labels(lab_path).data))
    return out


def quality_summary(rows: list[dict]) -> dict:
    """Mean and minimum of the pseudo-labels' NCC and weight, and how many were dropped."""
    ncc = [r["ncc"] for r in rows]
    w = [r["weight"] for r in rows]
    return {"n": len(rows), "ncc_mean": round(float(np.mean(ncc)), 4),
            "ncc_min": round(float(np.min(ncc)), 4), "weight_mean": round(float(np.mean(w)), 4),
            "dropped": int(sum(x == 0 for x in w))}


def dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
