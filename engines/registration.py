"""RegistrationEngine: affine then deformable (PLCReg) registration, and warping images and labels.

Offline (3-D volumes) and live (2-D planes) call the same class: :meth:`RegistrationEngine.predict`
runs the deformable model on working-grid tensors; :meth:`RegistrationEngine.register` takes two
volumes on any grids, resamples the moving image onto the fixed image's grid (world mm, RAS),
aligns it affinely (:mod:`regseg.engines.affine`: learned, optimised or both), refines it with
the network, and resamples the moving image and labels once through the composed map.

Multi-resolution: affine stage, network and instance optimisation run on the network's working
grid (images area-averaged onto it); the field is upsampled and composed with the affine on the
fixed image's own grid (optionally refined there, ``refine_fine``), so inputs at 1-1.5 mm are
registered at their resolution for about the cost of the working grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg import spatial
from regseg.engines.affine import AffineStage
from regseg.engines.affine_modes import (
    AFFINE_DEFAULT,
    REFINE_INT_STEPS_DEFAULT,
    REFINE_LR_DEFAULT,
    REFINE_MODE_DEFAULT,
    REFINE_MODES,
    REFINE_REGULARISER_DEFAULT,
    REFINE_REGULARISERS,
)
from regseg.engines.base import Engine, make_engine
from regseg.engines.refine import SAMPLE_FRACTION, descriptors_from, refine_velocity
from regseg.errors import InputError
from regseg.imageio import Volume, normalise_intensity
from regseg.kernels import trilinear
from regseg.models.integrate import invert_ddf, invert_velocity, resize_ddf, scaling_and_squaring
from regseg.models.registry import WEIGHTS_DIR, load_model

#: Registered names of shipped PLCReg weights (``models/weights/<name>.pt``).
SHIPPED = ("plcreg2d", "plcreg3d")
#: Below this fraction of the fixed grid covered by the moving image, the pair is refused.
MIN_OVERLAP = 0.05


@dataclass
class RegistrationResult:
    """A registered pair on the fixed image's grid.

    ``ddf`` maps fixed voxels to the moving image: fixed voxel x (array order k, j, i)
    corresponds to the world point ``fixed.voxel_to_world @ (x + ddf(x))`` of the moving image
    (the fixed and moving world frames are taken to coincide before registration).
    """

    moved: Volume  # moving image on the fixed grid, float32
    moved_labels: Volume | None  # moving labels on the fixed grid (nearest), uint8
    ddf: np.ndarray  # (3, K, J, I) fixed-grid voxels, array order: affine + deformable
    ddf_mm: np.ndarray  # (I, J, K, 3) the same displacement in world mm (RAS x, y, z)
    affine: np.ndarray  # (4, 4) fixed-grid voxel (i, j, k) -> moving point, same grid
    timings_s: dict[str, float] = field(default_factory=dict)
    inverse_ddf: np.ndarray | None = None  # (3, K, J, I), when asked for
    inverse_ddf_mm: np.ndarray | None = None  # (I, J, K, 3) world mm, as ``ddf_mm``


def ddf_voxels_to_mm(ddf: np.ndarray, voxel_to_world: np.ndarray) -> np.ndarray:
    """A (3, K, J, I) displacement in array-order grid voxels as (I, J, K, 3) world mm."""
    linear = voxel_to_world[:3, :3] @ np.eye(3)[[2, 1, 0]]  # (k, j, i) -> mm
    return np.einsum("ab,bkji->ijka", linear, ddf).astype(np.float32)


def shipped_weights(weights: str | Path) -> str | Path:
    """A shipped weights name (:data:`SHIPPED`) -> its file; anything else is passed through."""
    if str(weights) in SHIPPED:
        return WEIGHTS_DIR / f"{weights}.pt"
    return weights


def resample_to_grid(volume: Volume, shape_ijk: tuple[int, ...], voxel_to_world: np.ndarray,
                     *, mode: str = "bilinear") -> tuple[np.ndarray, float]:
    """Sample a volume on another grid through world mm (identity world transform).

    Args:
        volume: source, nibabel order (I, J, K).
        shape_ijk, voxel_to_world: the target grid.
        mode: ``bilinear`` (trilinear) for images, ``nearest`` for labels.
    Returns:
        the resampled (I, J, K) array (zero outside the source) and the fraction of target
        voxels that fall inside the source's field of view.
    """
    if (tuple(volume.data.shape) == tuple(shape_ijk)
            and np.allclose(volume.voxel_to_world, voxel_to_world, rtol=0.0, atol=1e-6)):
        # already on that grid (e.g. both images from one scanner or one template): a copy
        return np.array(volume.data, dtype=np.float32), 1.0
    src = torch.from_numpy(np.ascontiguousarray(volume.data.transpose(2, 1, 0))).float()
    to_norm = (spatial.index_to_normalised(volume.data.shape)
               @ spatial.invert(volume.voxel_to_world) @ np.asarray(voxel_to_world))
    grid = _index_grid(shape_ijk) @ torch.as_tensor(to_norm[:3].T, dtype=torch.float32)
    out = spatial.grid_sample(src[None, None], grid[None], mode=mode, padding_mode="zeros",
                              align_corners=False)[0, 0]
    inside = float((grid.abs() <= 1).all(-1).float().mean())
    return np.ascontiguousarray(out.numpy().transpose(2, 1, 0)), inside


def _index_grid(shape_ijk: tuple[int, ...]) -> Tensor:
    """Homogeneous voxel coordinates (K, J, I, 4) = (i, j, k, 1) of a grid."""
    k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape_ijk[::-1]],
                             indexing="ij")
    return torch.stack([i, j, k, torch.ones_like(i)], -1)


def _to_tensor(data: np.ndarray, device: torch.device) -> Tensor:
    """(I, J, K) array -> (1, 1, K, J, I) float tensor."""
    return torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0))).float()[None, None].to(
        device)


def affine_ddf(matrix: np.ndarray, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """(4, 4) array-order voxel map -> its displacement (1, 3, *shape) in voxels."""
    grid = spatial.identity_grid(shape, device=device, dtype=torch.float32)
    m = torch.as_tensor(matrix, dtype=torch.float32, device=device)
    moved = torch.einsum("ab,b...->a...", m[:3, :3], grid) + m[:3, 3].reshape(3, 1, 1, 1)
    return (moved - grid)[None]


class RegistrationEngine:
    """Deformable registration with a PLCReg model behind the Engine seam.

    Args:
        weights: checkpoint path or a registered name (``plcreg3d``, ``plcreg2d``).
        backend, device, precision, threads, cache_dir: passed to
            :func:`regseg.engines.base.make_engine` (``backend="auto"`` picks and reports).
        affine: the affine stage of :meth:`register`: ``learned`` (Affine3D), ``optimise``
            (MIND instance optimisation from the centre of mass), ``learned+optimise`` (the
            network, then a few MIND steps from its estimate) or ``none``.
        affine_iterations: MIND steps of the affine stage (None: the mode's default,
            :data:`regseg.engines.affine.DEFAULT_ITERATIONS`; 0: no affine stage).
        affine_weights: Affine3D checkpoint or ``affine3d`` (shipped).
        refine: instance-optimisation steps after the network (:mod:`regseg.engines.refine`;
            0: the network's field as it is), on the working grid.
        refine_fine: further instance-optimisation steps on the fixed image's own grid, when it
            is finer than the working grid (the velocity upsampled, refined on the full-resolution
            images, integrated there); 0: the working-grid field upsampled as it is.
        refine_mode: ``fast`` (MIND descriptors warped, the correction on a grid of every second
            voxel), ``sampled`` (``fast``, each step's similarity at a random eighth of the
            voxels) or ``full`` (MIND recomputed on the warped image, every voxel); see
            :mod:`regseg.engines.refine`.
        outputs: model outputs to compute (:meth:`predict` needs ``ddf`` and ``field``; a graph
            backend then drops the rest).
        refine_int_steps: scaling-and-squaring steps inside the ``fast``/``sampled`` refinement
            loop (None: the model's; see :mod:`regseg.engines.refine`, ``loop_int_steps``).
        refine_regulariser: where the ``fast``/``sampled`` steps' diffusion penalty is taken:
            ``working`` (the working grid) or ``coarse`` (the correction grid; see
            :mod:`regseg.engines.refine`, ``coarse_regulariser``).
        refine_lr: the working-grid steps' Adam step size, working-grid voxels (default
            :data:`regseg.engines.affine_modes.REFINE_LR_DEFAULT`).
    """

    def __init__(self, weights: str | Path = "plcreg3d", *, backend: str = "eager",
                 device: torch.device | str = "cpu", affine: str = AFFINE_DEFAULT,
                 affine_iterations: int | None = None, affine_weights: str | Path = "affine3d",
                 precision: str = "fp32", threads: int | None = None,
                 cache_dir: str | Path | None = None,
                 outputs: tuple[str, ...] | None = None, refine: int = 0,
                 refine_fine: int = 0, refine_mode: str = REFINE_MODE_DEFAULT,
                 refine_int_steps: int | None = REFINE_INT_STEPS_DEFAULT,
                 refine_regulariser: str = REFINE_REGULARISER_DEFAULT,
                 refine_lr: float = REFINE_LR_DEFAULT) -> None:
        if refine_mode not in REFINE_MODES:
            raise ValueError(f"refine_mode {refine_mode!r}: expected one of {REFINE_MODES}")
        model = load_model(shipped_weights(weights))
        self.refine = int(refine)
        self.refine_fine = int(refine_fine)
        self.refine_mode = refine_mode
        if refine_int_steps is not None and int(refine_int_steps) < 1:
            raise ValueError(f"refine_int_steps {refine_int_steps}: expected at least 1 or None")
        self.refine_int_steps = refine_int_steps
        if refine_regulariser not in REFINE_REGULARISERS:
            raise ValueError(f"refine_regulariser {refine_regulariser!r}: expected one of "
                             f"{REFINE_REGULARISERS}")
        self.refine_regulariser = refine_regulariser
        if not float(refine_lr) > 0.0:
            raise ValueError(f"refine_lr {refine_lr}: expected a step size > 0")
        self.refine_lr = float(refine_lr)
        self.config = model.config
        self.size = tuple(self.config.size)
        self.weights = str(weights)
        self.affine_iterations = affine_iterations
        shapes = {"moving": (1, self.config.moving_channels, *self.size),
                  "fixed": (1, self.config.fixed_channels, *self.size)}
        self.engine: Engine = make_engine(model, shapes, backend=backend, device=device,
                                          precision=precision, threads=threads,
                                          cache_dir=cache_dir, outputs=outputs)
        self.backend = self.engine.backend
        self.device = self.engine.device
        # built now, so its load and warm-up stay out of the first pair's time; mode "none"
        # (the live path: affine_iterations=0) loads nothing
        self.affine = AffineStage(affine, iterations=affine_iterations, weights=affine_weights,
                                  backend=backend, device=self.device, precision=precision,
                                  threads=threads, cache_dir=cache_dir)
        # only where volumes are registered: the live 2-D stage never loads numba (its import
        # alone is ~1.3 s of start-up)
        self.fast_sampler = (self.config.ndim == 3 and self.device.type == "cpu"
                             and trilinear.available())
        if self.fast_sampler:
            trilinear.warm_up()  # numba compiles (or loads its cache) now, not in a pair's time

    def predict(self, moving: Tensor, fixed: Tensor) -> dict[str, Tensor]:
        """Run the network on working-grid tensors (see :class:`regseg.models.plcreg.PLCReg`).

        Returns copies of ``ddf`` and ``field`` (B, ndim, *size), voxels of the working grid.
        """
        out = self.engine({"moving": moving, "fixed": fixed})
        return {"ddf": out["ddf"].clone(), "field": out["field"].clone()}

    def inverse(self, field_: Tensor) -> Tensor:
        """Inverse displacement of a predicted field (exact exp(-v) when diffeomorphic)."""
        if self.config.diffeomorphic:
            return invert_velocity(field_, self.config.int_steps)
        return invert_ddf(field_)

    def register(self, fixed: Volume, moving: Volume, moving_labels: Volume | None = None, *,
                 inverse: bool = False, deformable: bool = True) -> RegistrationResult:
        """Affine then deformable registration of two 3-D volumes on any grids.

        ``deformable=False`` stops after the affine stage (for ablations and benchmarks). Its
        trilinear samples run the compiled CPU kernels (:mod:`regseg.kernels.trilinear`) where
        they apply and ``fast_sampler`` is on.

        Raises:
            InputError: a 2-D model asked to register volumes, or volumes whose fields of view
                do not overlap (after the identity world transform) by :data:`MIN_OVERLAP`.
        """
        with trilinear.enabled(self.fast_sampler):
            return self._register(fixed, moving, moving_labels, inverse=inverse,
                                  deformable=deformable)

    def _register(self, fixed: Volume, moving: Volume, moving_labels: Volume | None, *,
                  inverse: bool, deformable: bool) -> RegistrationResult:
        if self.config.ndim != 3:
            raise InputError(f"{self.weights}: a {self.config.ndim}-D model cannot register "
                             "3-D volumes; use the 3-D weights (plcreg3d).")
        t0 = time.perf_counter()
        shape = fixed.data.shape
        moving_on_fixed, overlap = resample_to_grid(moving, shape, fixed.voxel_to_world)
        if overlap < MIN_OVERLAP:
            raise InputError(
                f"{moving.path or 'moving'}: only {100 * overlap:.1f}% of the fixed image "
                f"{fixed.path or ''} lies inside the moving image's field of view (world mm, "
                f"RAS); at least {100 * MIN_OVERLAP:.0f}% is needed. Check that both images are "
                "in the same world space (e.g. both in scanner or both in MNI coordinates).")
        dev = self.device
        f_full = _to_tensor(normalise_intensity(fixed.data), dev)
        m_full = _to_tensor(normalise_intensity(moving_on_fixed), dev)
        f_work = _resize(f_full, self.size)
        m_work = _resize(m_full, self.size)
        t1 = time.perf_counter()
        affine = self.affine(f_work, m_work)
        aff = affine_ddf(affine, self.size, dev)
        m_aff = spatial.warp(m_work, aff, padding_mode="zeros")
        t2 = time.perf_counter()
        full = tuple(f_full.shape[2:])
        # Working-grid voxels -> fixed-grid voxels, both align_corners=False over one extent.
        work_to_full = np.eye(4)
        for a, (n, w) in enumerate(zip(full, self.size, strict=True)):
            work_to_full[a, a], work_to_full[a, 3] = n / w, 0.5 * n / w - 0.5
        affine_full = work_to_full @ affine @ np.linalg.inv(work_to_full)
        aff_full = affine_ddf(affine_full, full, dev)  # A x - x
        fast = self.refine_mode in ("fast", "sampled")
        fraction = SAMPLE_FRACTION if self.refine_mode == "sampled" else 1.0
        # fast steps on the working grid follow MIND computed on finer images than it
        fine_mind = fast and self.refine > 0 and np.prod(full) > np.prod(self.size)
        # the moving image through the affine stage on the fixed grid: the fine level's input
        m_aff_full = (spatial.warp(m_full, aff_full, padding_mode="zeros")
                      if deformable and (fine_mind or self.refine_fine > 0 and full != self.size)
                      else None)
        if deformable:
            out = self.predict(m_aff, f_work)
            if self.refine > 0:
                cfg = self.config
                desc = descriptors_from(f_full, m_aff_full, self.size) if fine_mind else None
                field_ = refine_velocity(f_work, m_aff, out["field"], steps=self.refine,
                                         lr=self.refine_lr,
                                         int_steps=cfg.int_steps, diffeomorphic=cfg.diffeomorphic,
                                         fast=fast, sample_fraction=fraction,
                                         descriptors=desc, loop_int_steps=self.refine_int_steps,
                                         coarse_regulariser=self.refine_regulariser == "coarse",
                                         base_ddf=out["ddf"])
                out = {"field": field_, "ddf": scaling_and_squaring(field_, cfg.int_steps)
                       if cfg.diffeomorphic else field_}
        else:
            zero = torch.zeros(1, 3, *self.size, device=dev)
            out = {"ddf": zero, "field": zero}
        deform = out["ddf"]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t3 = time.perf_counter()
        # Multi-resolution: affine, network and refinement ran on the working grid; the
        # deformable field is upsampled and x -> A (x + def(x)) composed on the fixed image's own
        # grid (the affine part exact there).
        if deformable and self.refine_fine > 0 and full != self.size:
            # ... and, asked for, refined on the pair at that resolution first
            cfg = self.config
            field_full = refine_velocity(f_full, m_aff_full, resize_ddf(out["field"], full),
                                         steps=self.refine_fine, int_steps=cfg.int_steps,
                                         diffeomorphic=cfg.diffeomorphic,
                                         fast=fast, sample_coarse=True)
            deform_full = (scaling_and_squaring(field_full, cfg.int_steps)
                           if cfg.diffeomorphic else field_full)
            out = {"field": field_full, "ddf": deform_full}
        else:
            deform_full = resize_ddf(deform, full)
        ddf_full = aff_full + _apply_affine(affine_full, deform_full, dev)
        t_fine = time.perf_counter()
        moved, moved_labels = self._resample_moving(moving, moving_labels, fixed, ddf_full)
        ddf = ddf_full[0].cpu().numpy()
        ddf_mm = ddf_voxels_to_mm(ddf, fixed.voxel_to_world)
        inv = None
        if inverse:
            fine = tuple(out["field"].shape[2:]) == full
            inv = self._inverse_full(out["field"], affine_full if fine else affine, full)
            inv_mm = ddf_voxels_to_mm(inv, fixed.voxel_to_world)
        t4 = time.perf_counter()
        timings = {"prepare_s": t1 - t0, "affine_s": t2 - t1, "deformable_s": t3 - t2,
                   "refine_fine_s": t_fine - t3, "warp_s": t4 - t_fine, "total_s": t4 - t0}
        return RegistrationResult(
            moved=moved, moved_labels=moved_labels, ddf=ddf, ddf_mm=ddf_mm,
            affine=affine_full, timings_s=timings,
            inverse_ddf=inv, inverse_ddf_mm=None if inv is None else inv_mm)

    def warp_labels(self, labels: Volume, fixed: Volume, result: RegistrationResult) -> Volume:
        """Another label map of the moving image (e.g. a fine parcellation) through a registration
        already computed, onto the fixed grid (nearest), as ``result.moved_labels`` was."""
        ddf = torch.as_tensor(result.ddf, dtype=torch.float32, device=self.device)[None]
        return self._resample_moving(None, labels, fixed, ddf)[1]

    def _resample_moving(self, moving: Volume | None, labels: Volume | None, fixed: Volume,
                         ddf: Tensor) -> tuple[Volume, Volume | None]:
        """Sample the original moving image (and labels) once through fixed -> moving voxels."""
        shape = fixed.data.shape
        outs = []
        grids: dict[tuple, Tensor] = {}  # labels on the image's grid share its sample points
        for vol, mode in ((moving, "bilinear"), (labels, "nearest")):
            if vol is None:
                outs.append(None)
                continue
            to_norm = (spatial.index_to_normalised(vol.data.shape)
                       @ spatial.invert(vol.voxel_to_world) @ fixed.voxel_to_world)
            key = (tuple(vol.data.shape), to_norm[:3].tobytes())
            if key not in grids:
                grids[key] = spatial.displaced_points(shape, ddf, to_norm)
            grid = grids[key]
            src = _to_tensor(vol.data.astype(np.float32), ddf.device)
            out = spatial.grid_sample(src, grid[None], mode=mode, padding_mode="zeros",
                                      align_corners=False)[0, 0].cpu().numpy().transpose(2, 1, 0)
            data = out.astype(np.uint8 if mode == "nearest" else np.float32)
            outs.append(Volume(data=np.ascontiguousarray(data),
                               voxel_to_world=fixed.voxel_to_world, path=""))
        return outs[0], outs[1]

    def _inverse_full(self, field_: Tensor, affine: np.ndarray, shape: tuple[int, ...]
                      ) -> np.ndarray:
        """Inverse of x -> A(x + def(x)) on the fixed grid: z -> def^-1(A^-1 z), computed on the
        grid of ``field_`` (the working grid, or the fixed grid after a fine refinement; ``affine``
        in that grid's voxels) and resampled to ``shape``."""
        inv_def = self.inverse(field_)
        inv_affine = np.linalg.inv(affine)
        pre = affine_ddf(inv_affine, tuple(field_.shape[2:]), self.device)  # A^-1 z - z
        total = pre + spatial.warp(inv_def, pre, padding_mode="border")
        return resize_ddf(total, shape)[0].cpu().numpy()


def _resize(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """An image onto the working grid over the same extent: area averaging where every axis
    shrinks (anti-aliased, as the training images were box-filtered to 3.25 mm), else trilinear."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if all(n >= s for n, s in zip(x.shape[2:], size, strict=True)):
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def _apply_affine(matrix: np.ndarray, ddf: Tensor, device: torch.device) -> Tensor:
    """The linear part of an array-order affine applied to a displacement field."""
    m = torch.as_tensor(matrix[:3, :3], dtype=ddf.dtype, device=device)
    return torch.einsum("ab,nb...->na...", m, ddf)
