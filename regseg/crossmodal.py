"""Register a labelled MRI (the patient's, or an atlas) to a 3-D TRUS volume: cross-modality.

Two stages, the second optional:
    ``affine``: label-free instance optimisation of a 12-parameter affine in world mm (rotation,
        scale and shear about the fixed volume's swept centre, then a shift), MIND similarity
        (Heinrich et al., MedIA 2012) masked to the voxels the sweep reached, coarse to fine
        (6 mm, then 2 mm), from ``initial_fixed_to_moving`` (what tracking gives).
    ``biregnet``: the affine stage, then BiRegNet (:mod:`regseg.models.biregnet`) on a fixed-size
        working grid around the swept volume: its forward field is the deformable part.

Frames: ``fixed`` is the TRUS volume (voxel -> Reference mm), ``moving`` the MRI (voxel -> MRI mm).
A fixed world point ``p`` corresponds to the moving world point
``fixed_to_moving @ (p + ddf_mm(p))``: the deformable part is a displacement in fixed mm applied
before the affine. The fixed image needs no labels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg import spatial
from regseg.errors import InputError
from regseg.imageio import Volume
from regseg.models.reg_losses import mind_descriptor

METHODS = ("affine", "biregnet")
AFFINE_LEVELS = ((6.0, 80), (2.0, 80))  # (voxel mm, Adam steps) of the affine stage
MIN_COVERED = 500  # fewer swept voxels than this at the coarsest level: refused


@dataclass
class CrossModalResult:
    """A moving volume registered to a fixed grid (see the module docstring for the frames)."""

    warped_image: np.ndarray  # moving image on the fixed grid, float32, fixed.data.shape
    warped_onehot: np.ndarray  # (C, *fixed.data.shape) float32 label probabilities
    fixed_to_moving: np.ndarray  # (4, 4) affine part, fixed world mm -> moving world mm
    ddf_mm: np.ndarray | None  # (3, *fixed.data.shape) deformable part in fixed mm, or None
    seconds: float


def grid_points(shape: tuple[int, ...], voxel_to_world: np.ndarray) -> Tensor:
    """World mm of every voxel of a grid, (I, J, K, 3) float32."""
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    m = torch.as_tensor(voxel_to_world, dtype=torch.float32)
    return ijk @ m[:3, :3].T + m[:3, 3]


def sample_world(volume: Volume | np.ndarray, voxel_to_world: np.ndarray | None, points: Tensor,
                 mode: str = "bilinear") -> Tensor:
    """Sample a volume (I, J, K) or channels (C, I, J, K) at world points (..., 3): (C, ...).

    Zero outside the volume. ``voxel_to_world`` is taken from a :class:`Volume`.
    """
    if isinstance(volume, Volume):
        data, voxel_to_world = volume.data, volume.voxel_to_world
    else:
        data = volume
    data = data[None] if data.ndim == 3 else data
    src = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 2, 1)).astype(np.float32))
    to_norm = torch.as_tensor(spatial.index_to_normalised(data.shape[1:])
                              @ spatial.invert(voxel_to_world), dtype=torch.float32)
    grid = points @ to_norm[:3, :3].T + to_norm[:3, 3]
    lead = points.shape[:-1]
    out = F.grid_sample(src[None], grid.reshape(1, 1, 1, -1, 3), mode=mode, padding_mode="zeros",
                        align_corners=False)
    return out[0, :, 0, 0].reshape(data.shape[0], *lead)


def transform_points(matrix: np.ndarray | Tensor, points: Tensor) -> Tensor:
    m = torch.as_tensor(matrix, dtype=points.dtype)
    return points @ m[:3, :3].T + m[:3, 3]


def normalise(data: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Percentiles 1-99 (of the masked voxels) to [0, 1], clipped, float32."""
    values = data[mask] if mask is not None and mask.any() else data
    lo, hi = np.percentile(values, [1.0, 99.0])
    return np.clip((data - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)


def working_grid(fixed: Volume, spacing_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """The fixed volume's extent at another spacing: (shape, voxel_to_world)."""
    spacing = np.asarray(fixed.spacing_mm)
    extent = np.asarray(fixed.data.shape) * spacing
    shape = tuple(int(max(8, round(e / spacing_mm))) for e in extent)
    v2w = fixed.voxel_to_world.copy()
    scale = extent / np.asarray(shape) / spacing  # new voxel in old voxels, per axis
    v2w[:3, :3] = fixed.voxel_to_world[:3, :3] * scale
    # align_corners=False: both grids cover the same extent
    v2w[:3, 3] = fixed.voxel_to_world[:3, :3] @ (0.5 * scale - 0.5) + fixed.voxel_to_world[:3, 3]
    return shape, v2w


def _masked_mind(fixed_desc: Tensor, moved: Tensor, mask: Tensor) -> Tensor:
    d = mind_descriptor(moved[None, None])[0]
    return ((d - fixed_desc).square().mean(0) * mask).sum() / mask.sum().clamp_min(1.0)


def affine_stage(moving: Volume, fixed: Volume, initial: np.ndarray,
                 levels: tuple[tuple[float, int], ...] = AFFINE_LEVELS) -> np.ndarray:
    """Fixed world -> moving world affine maximising masked MIND similarity, from ``initial``.

    The fixed image's swept voxels are those above zero (a reconstructed sweep is 0 where no
    frame reached). Returns (4, 4) float64.

    Raises:
        InputError: a fixed volume with almost no swept voxels.
    """
    fixed_mask = fixed.data > 0
    fixed_norm = normalise(fixed.data, fixed_mask)
    moving_norm = normalise(moving.data)
    pts_all = np.argwhere(fixed_mask)
    centre = (pts_all @ fixed.voxel_to_world[:3, :3].T + fixed.voxel_to_world[:3, 3]).mean(0) \
        if len(pts_all) else fixed.voxel_to_world[:3, 3]
    centre_t = torch.as_tensor(centre, dtype=torch.float32)
    linear = torch.zeros(3, 3, requires_grad=True)
    shift = torch.zeros(3, requires_grad=True)  # in units of 10 mm
    init = torch.as_tensor(initial, dtype=torch.float32)
    for spacing_mm, steps in levels:
        shape, v2w = working_grid(fixed, spacing_mm)
        pts = grid_points(shape, v2w)
        f = sample_world(fixed_norm, fixed.voxel_to_world, pts)[0]
        mask = sample_world(fixed_mask.astype(np.float32), fixed.voxel_to_world, pts)[0] > 0.99
        if int(mask.sum()) < MIN_COVERED // (spacing_mm / levels[-1][0]) ** 3:
            raise InputError(f"{fixed.path or 'fixed volume'}: only {int(mask.sum())} swept "
                             f"(non-zero) voxels at {spacing_mm} mm; a TRUS sweep volume is "
                             "expected")
        f_desc = mind_descriptor(f[None, None])[0]
        # the descriptor at the mask's edge sees the unswept zeros: keep the interior
        mask = -F.max_pool3d(-mask.float()[None, None], 5, 1, 2)[0, 0]
        m_src = torch.from_numpy(np.ascontiguousarray(moving_norm.transpose(2, 1, 0)))[None, None]
        to_norm = torch.as_tensor(spatial.index_to_normalised(moving.data.shape)
                                  @ spatial.invert(moving.voxel_to_world), dtype=torch.float32)
        rel = pts - centre_t
        optimiser = torch.optim.Adam([{"params": [linear], "lr": 0.01},
                                      {"params": [shift], "lr": 0.05}])
        with torch.enable_grad():
            for _ in range(steps):
                p = rel @ (torch.eye(3) + linear).T + centre_t + 10.0 * shift
                q = p @ init[:3, :3].T + init[:3, 3]
                grid = q @ to_norm[:3, :3].T + to_norm[:3, 3]
                moved = F.grid_sample(m_src, grid.permute(2, 1, 0, 3)[None],
                                      padding_mode="zeros", align_corners=False)[0, 0]
                loss = _masked_mind(f_desc, moved.permute(2, 1, 0), mask)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
    a = np.eye(4)
    lin = np.eye(3) + linear.detach().double().numpy()
    a[:3, :3] = lin
    a[:3, 3] = centre - lin @ centre + 10.0 * shift.detach().double().numpy()
    return np.asarray(initial, dtype=np.float64) @ a


def mind_distance(moving: Volume, fixed: Volume, fixed_to_moving: np.ndarray,
                  spacing_mm: float = 2.0) -> float:
    """The affine stage's cost at a transform: masked MIND distance at ``spacing_mm`` (lower is
    more similar; for reports)."""
    shape, v2w = working_grid(fixed, spacing_mm)
    pts = grid_points(shape, v2w)
    f = sample_world(normalise(fixed.data, fixed.data > 0), fixed.voxel_to_world, pts)[0]
    mask = sample_world((fixed.data > 0).astype(np.float32), fixed.voxel_to_world, pts)[0] > 0.99
    mask = -F.max_pool3d(-mask.float()[None, None], 5, 1, 2)[0, 0]
    moved = sample_world(normalise(moving.data), moving.voxel_to_world,
                         transform_points(fixed_to_moving, pts))[0]
    return float(_masked_mind(mind_descriptor(f[None, None])[0], moved, mask))


def warp_moving(moving: Volume, moving_labels: Volume | None, fixed: Volume,
                fixed_to_moving: np.ndarray, ddf_mm: np.ndarray | None,
                n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Moving image (trilinear) and one-hot labels (linear) on the fixed grid through the map."""
    pts = grid_points(fixed.data.shape, fixed.voxel_to_world)
    if ddf_mm is not None:
        pts = pts + torch.from_numpy(np.moveaxis(ddf_mm, 0, -1).astype(np.float32))
    q = transform_points(fixed_to_moving, pts)
    image = sample_world(moving, None, q)[0].numpy()
    if moving_labels is None:
        onehot = np.zeros((n_classes, *fixed.data.shape), np.float32)
    else:
        labels = moving_labels.data
        channels = np.stack([(labels == c) for c in range(n_classes)]).astype(np.float32)
        onehot = sample_world(channels, moving_labels.voxel_to_world, q).numpy()
        onehot[0] += np.clip(1.0 - onehot.sum(0), 0.0, 1.0)  # outside the MRI: background
    return image.astype(np.float32), onehot.astype(np.float32)


@dataclass
class WorkGrid:
    """BiRegNet's working grid: a cube of ``size`` voxels of ``spacing_mm`` along the fixed
    grid's axes, centred on ``centre`` (fixed world mm)."""

    voxel_to_world: np.ndarray  # (4, 4) work voxel (i, j, k) -> fixed world mm
    size: int

    @classmethod
    def around(cls, fixed: Volume, centre: np.ndarray, size: int, spacing_mm: float) -> WorkGrid:
        axes = fixed.voxel_to_world[:3, :3] / np.linalg.norm(fixed.voxel_to_world[:3, :3], axis=0)
        v2w = np.eye(4)
        v2w[:3, :3] = axes * spacing_mm
        v2w[:3, 3] = np.asarray(centre) - v2w[:3, :3] @ np.full(3, 0.5 * (size - 1))
        return cls(v2w, int(size))

    def points(self) -> Tensor:
        return grid_points((self.size,) * 3, self.voxel_to_world)

    def ddf_to_mm(self, ddf: Tensor) -> Tensor:
        """(B, 3, K, J, I) work voxels, array order (dk, dj, di) -> (B, I, J, K, 3) mm."""
        lin = torch.as_tensor(self.voxel_to_world[:3, :3], dtype=ddf.dtype)
        return torch.einsum("ab,nbkji->nijka", lin, ddf.flip(1))


def gland_centre(labels: Volume, to_world: np.ndarray | None = None) -> np.ndarray | None:
    """Centroid (mm) of the labelled voxels, mapped by ``to_world`` after the volume's own
    voxel_to_world (None when there are none)."""
    idx = np.argwhere(labels.data > 0)
    if not len(idx):
        return None
    c = idx.mean(0) @ labels.voxel_to_world[:3, :3].T + labels.voxel_to_world[:3, 3]
    return c if to_world is None else to_world[:3, :3] @ c + to_world[:3, 3]


def work_inputs(moving: Volume, fixed: Volume, fixed_to_moving: np.ndarray, grid: WorkGrid,
                moving_labels: Volume | None = None, fixed_labels: Volume | None = None
                ) -> dict[str, Tensor]:
    """Network inputs on the work grid, (1, C, K, J, I): ``moving`` (after the affine) and
    ``fixed`` images normalised to [0, 1]; with labels, ``moving_labels``/``fixed_labels`` as
    two soft channels (gland incl. lesion, lesion)."""
    pts = grid.points()
    out = {"moving": sample_world(normalise(moving.data), moving.voxel_to_world,
                                  transform_points(fixed_to_moving, pts)),
           "fixed": sample_world(normalise(fixed.data, fixed.data > 0), fixed.voxel_to_world,
                                 pts)}
    for name, labels, where in (("moving_labels", moving_labels,
                                 transform_points(fixed_to_moving, pts)),
                                ("fixed_labels", fixed_labels, pts)):
        if labels is not None:
            chans = np.stack([labels.data > 0, labels.data == 2]).astype(np.float32)
            out[name] = sample_world(chans, labels.voxel_to_world, where)
    return {k: v.permute(0, 3, 2, 1)[None].contiguous() for k, v in out.items()}


_ENGINES: dict[tuple[str, str], object] = {}


def biregnet_engine(weights: str = "biregnet", device: str = "cpu"):
    """The BiRegNet engine (eager, through make_engine), built once per process."""
    key = (str(weights), str(device))
    if key not in _ENGINES:
        from regseg.engines.base import make_engine
        from regseg.models.registry import load_model

        model = load_model(weights)
        size = tuple(model.config.size)
        _ENGINES[key] = make_engine(model, {"moving": (1, 1, *size), "fixed": (1, 1, *size)},
                                    backend="eager", device=device, outputs=("ddf",), warmup=1)
    return _ENGINES[key]


def deformable_stage(moving: Volume, moving_labels: Volume | None, fixed: Volume,
                     fixed_to_moving: np.ndarray, *, weights: str = "biregnet",
                     device: str = "cpu") -> np.ndarray:
    """BiRegNet's forward field on the work grid around the (affinely mapped) gland, as the
    deformable part ``ddf_mm`` (3, *fixed.data.shape) in fixed mm (zero outside the work grid)."""
    engine = biregnet_engine(weights, device)
    config = engine.model.config if hasattr(engine, "model") else None
    size = engine.input_shapes["fixed"][-1]
    spacing = getattr(config, "spacing_mm", 2.0)
    centre = None if moving_labels is None else gland_centre(
        moving_labels, spatial.invert(fixed_to_moving))
    if centre is None:
        swept = np.argwhere(fixed.data > 0)
        centre = swept.mean(0) @ fixed.voxel_to_world[:3, :3].T + fixed.voxel_to_world[:3, 3]
    grid = WorkGrid.around(fixed, centre, size, spacing)
    inputs = work_inputs(moving, fixed, fixed_to_moving, grid)
    with torch.inference_mode():
        out = engine({"moving": inputs["moving"].to(engine.device),
                      "fixed": inputs["fixed"].to(engine.device)})
    ddf_mm = grid.ddf_to_mm(out["ddf"].float().cpu())[0]  # (I, J, K, 3) on the work grid
    pts = grid_points(fixed.data.shape, fixed.voxel_to_world)
    full = sample_world(ddf_mm.permute(3, 0, 1, 2).numpy(), grid.voxel_to_world, pts)
    return full.numpy().astype(np.float32)


def check_volume(volume: Volume, what: str) -> None:
    if volume.data.ndim != 3:
        raise InputError(f"{volume.path or what}: {volume.data.ndim}-D array "
                         f"{volume.data.shape}; a 3-D volume is expected")
    if not np.isfinite(volume.data).all():
        raise InputError(f"{volume.path or what}: non-finite voxels; a finite image is expected")


def register_cross_modal(moving: Volume, moving_labels: Volume | None, fixed: Volume, *,
                         n_classes: int = 3, initial_fixed_to_moving: np.ndarray | None = None,
                         method: str = "affine", device: str = "cpu",
                         threads: int | None = None) -> CrossModalResult:
    """Register ``moving`` (MRI, labelled) to ``fixed`` (TRUS volume); see the module docstring.

    Args:
        moving_labels: on the moving grid, 0..n_classes-1 (0 background, 1 gland, 2 lesion).
        initial_fixed_to_moving: (4, 4) start, fixed world mm -> moving world mm (default
            identity: both in one world).
        method: one of :data:`METHODS` (default ``affine``: the shipped BiRegNet did not improve
            on the affine stage on its validation sweeps).
        threads: torch CPU threads for the call (default: leave as set).
    Raises:
        InputError: unknown method, not 3-D volumes, or a fixed volume with no sweep in it.
    """
    if method not in METHODS:
        raise InputError(f"method {method!r}: one of {', '.join(METHODS)} expected")
    check_volume(moving, "moving")
    check_volume(fixed, "fixed")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        t0 = time.perf_counter()
        initial = np.eye(4) if initial_fixed_to_moving is None else np.asarray(
            initial_fixed_to_moving, dtype=np.float64)
        fixed_to_moving = affine_stage(moving, fixed, initial)
        ddf_mm = None
        if method == "biregnet":
            ddf_mm = deformable_stage(moving, moving_labels, fixed, fixed_to_moving,
                                      device=device)
        image, onehot = warp_moving(moving, moving_labels, fixed, fixed_to_moving, ddf_mm,
                                    n_classes)
        return CrossModalResult(warped_image=image, warped_onehot=onehot,
                                fixed_to_moving=fixed_to_moving, ddf_mm=ddf_mm,
                                seconds=time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old_threads)
