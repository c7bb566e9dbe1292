"""ANTs SyN (antspyx, an optional bench extra) on the MNI152 pairs, for bench/registration.py.

The field's reference for deformable registration (Avants et al., MedIA 2008). Two settings: ANTs'
default ``SyN`` (affine + SyN, Mattes MI) and ``SyNCC`` (rigid + affine + SyN with local cross
correlation, the stronger and slower setting). Images go to ANTs with our voxel size and a zero
origin, both of a pair alike, so the transforms it finds are in the pair's own frame; the moving
labels (tissue and AAL) are warped with nearest neighbour through the same transforms. Folding is
the share of voxels where the Jacobian determinant of the deformable part is <= 0.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

SETTINGS = ("SyN", "SyNCC")


def available() -> bool:
    try:
        import ants  # noqa: F401
    except ImportError:
        return False
    return True


def set_threads(threads: int) -> None:
    """ITK's thread count for ANTs (read when its first filter runs)."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)


def register(fixed: np.ndarray, moving: np.ndarray, labels: list[np.ndarray], spacing_mm: float,
             setting: str = "SyN") -> dict[str, Any]:
    """One pair with ANTs ``setting``: moving ``labels`` warped (nearest), % folding, seconds."""
    import ants

    def image(a: np.ndarray):
        return ants.from_numpy(np.ascontiguousarray(a, dtype=np.float32),
                               spacing=(spacing_mm,) * 3, origin=(0.0, 0.0, 0.0))

    f, m = image(fixed), image(moving)
    t0 = time.perf_counter()
    reg = ants.registration(fixed=f, moving=m, type_of_transform=setting)
    seconds = time.perf_counter() - t0
    moved = [ants.apply_transforms(fixed=f, moving=image(lab), transformlist=reg["fwdtransforms"],
                                   interpolator="nearestNeighbor").numpy().round().astype(np.uint8)
             for lab in labels]
    warp = next((t for t in reg["fwdtransforms"] if t.endswith((".nii.gz", ".nii"))), None)
    folding = float("nan")
    if warp is not None:
        jac = ants.create_jacobian_determinant_image(f, warp, do_log=False).numpy()
        folding = float(100.0 * (jac <= 0).mean())
    return {"moved_labels": moved, "folding_pct": folding, "seconds": seconds}
