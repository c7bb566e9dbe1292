"""Instance optimisation: a few gradient steps refining a network's field on the pair itself.

Learn2Reg's strongest entries follow a network with a short per-pair optimisation (e.g. Siebert,
Hansen & Heinrich, "Fast 3D registration with accurate optimisation and little learning",
MICCAI 2021 / Learn2Reg 2021): the network gives a good start, a few dozen Adam steps on the pair's
own similarity buy the last points of accuracy. Here the optimised quantity is the stationary
velocity the diffeomorphic PLCReg predicts (so the result stays a diffeomorphism, integrated by
scaling and squaring in :mod:`regseg.models.integrate`), the similarity is MIND (modality
independent: the same code serves T1 <-> T1 and cross-modality pairs) and the regulariser is the
diffusion penalty on the velocity. Everything is on the model's working grid.

Two ways of running a step (``fast``):

- ``fast=False`` (the first version): the moving *image* is warped through ``exp(v)`` on the
  working grid and its MIND recomputed every step, the velocity optimised at every voxel.
- ``fast=True`` (the default; as ConvexAdam does): the moving image's MIND is computed once and
  the *descriptor* warped, and the correction to the network's velocity lives on a grid of every
  second voxel (a smooth, 8x smaller field; trilinear up to the working grid), integrated there.
  The network's own fine detail is kept: what is optimised is ``v = v_net + up(delta)``, and a
  step integrates ``down(v_net) + delta`` on the coarse grid and adds back the part of
  ``exp(v_net)`` the coarse grid cannot hold. The returned velocity is integrated exactly by the
  caller on the working grid, so the result is a diffeomorphism either way. On the 48 x 64 x 48
  working grid a step costs several times less (README, "Instance optimisation: fast steps").
  The engine hands it MIND of the images at their own resolution resampled onto the working grid
  (:func:`descriptors_from`), so the steps follow the fine images' edges.
- ``sample_fraction`` < 1 (the ``sampled`` mode; as elastix's random coordinate sampler does): each
  ``fast`` step evaluates the similarity at a fresh random :data:`SAMPLE_FRACTION` of the working
  grid's voxels only, the field there interpolated from the correction grid; a stochastic but
  unbiased gradient, several times fewer warped samples per step. The random stream is seeded,
  so a registration is reproducible.

``loop_int_steps`` (``fast`` and ``sampled``): the scaling-and-squaring steps *inside* the loop,
where a step's time goes mostly into the squarings' grid samples and their backward (two thirds
of it, session 12's profile). The coarse grid's voxels are twice the working grid's, so its
velocities are half as many voxels and fewer squarings reach the same accuracy; the network's own
field enters exactly (the fine detail term is taken against the same integration), and the
returned velocity is still integrated with the model's ``int_steps`` by the caller.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from regseg import spatial
from regseg.models.integrate import resize_ddf, scaling_and_squaring
from regseg.models.reg_losses import gradient_loss, mind_descriptor

#: Defaults, chosen on the MNI152 *validation* pairs (seeds 20000..; never the eval pairs) — see
#: the README's instance-optimisation table for what each step count buys.
REFINE_LR = 0.05
REFINE_SMOOTH = 1.0
#: The share of the working grid's voxels one ``sampled`` step evaluates the similarity at: as
#: many points as the correction grid has nodes (fixed before it was measured, not tuned).
SAMPLE_FRACTION = 0.125
#: The seed of the ``sampled`` steps' random points: the same pair gives the same registration.
SAMPLE_SEED = 0

#: The finest grid :func:`descriptors_from` computes MIND on, in voxels relative to the grid the
#: descriptors are for (16: 2.5x per axis); a finer image is area-averaged to it first, so a 1 mm
#: head costs no more than a 1.5 mm one.
DESCRIPTOR_MAX_RATIO = 16.0


def descriptors_from(fixed: Tensor, moving: Tensor, size: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """MIND of ``fixed`` and ``moving`` (1, 1, *spatial: the same finer grid, ``moving`` already
    through the affine stage) computed at their own resolution (at most
    :data:`DESCRIPTOR_MAX_RATIO` times the voxels of ``size``) and resampled onto ``size``:
    the working grid's steps then see the edges of the fine images, not of their area-averaged
    copies (on the 1.5 mm validation pairs 25 steps gave AAL Dice 0.869 against 0.834)."""
    spatial_ = tuple(fixed.shape[2:])
    ratio = float(torch.tensor(spatial_).prod()) / float(torch.tensor(size).prod())
    mode = "trilinear" if len(size) == 3 else "bilinear"
    with torch.inference_mode(False), torch.no_grad():
        fixed, moving = fixed.detach().clone(), moving.detach().clone()
        if ratio > DESCRIPTOR_MAX_RATIO:
            k = (DESCRIPTOR_MAX_RATIO / ratio) ** (1.0 / len(size))
            mid = tuple(max(1, round(n * k)) for n in spatial_)
            fixed, moving = (F.interpolate(x, size=mid, mode="area") for x in (fixed, moving))
        return tuple(F.interpolate(mind_descriptor(x), size=tuple(size), mode=mode,
                                   align_corners=False) for x in (fixed, moving))


def _coarse(size: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(max(2, (n + 1) // 2) for n in size)


def refine_velocity(fixed: Tensor, moving: Tensor, velocity: Tensor, *, steps: int,
                    int_steps: int = 7, lr: float = REFINE_LR, smooth: float = REFINE_SMOOTH,
                    diffeomorphic: bool = True, fast: bool = True,
                    sample_coarse: bool = False, sample_fraction: float = 1.0,
                    descriptors: tuple[Tensor, Tensor] | None = None,
                    loop_int_steps: int | None = None,
                    coarse_regulariser: bool = False,
                    base_ddf: Tensor | None = None) -> Tensor:
    """``steps`` Adam steps on ``velocity`` (1, ndim, *size) minimising MIND(fixed, moving o
    exp(v)) + ``smooth`` * diffusion(v); returns the refined velocity (a displacement when not
    ``diffeomorphic``), detached. ``fixed`` and ``moving`` are (1, 1, *size) on the same grid,
    ``moving`` already through the affine stage; voxels of the working grid, array-axis order.
    ``fast`` (see the module docstring) warps MIND descriptors and optimises a correction on a
    grid of every second voxel; ``sample_coarse`` (with ``fast``) also evaluates the similarity
    at that grid's points only (the descriptors still computed at every voxel and sampled there):
    8x fewer samples, for a grid much finer than the working one. ``descriptors``: with
    ``fast``, the fixed and moving MIND on ``velocity``'s grid, made elsewhere (e.g.
    :func:`descriptors_from` finer images); ``fixed`` and ``moving`` are then not used.
    ``sample_fraction`` < 1 (with ``fast``): each step's similarity at that share of the working
    grid's voxels, drawn afresh every step (see the module docstring). ``loop_int_steps``
    (with ``fast``): squarings inside the loop (None: ``int_steps``; see the module docstring).
    ``coarse_regulariser`` (with ``fast``): the diffusion penalty on the correction grid's field
    (the network's velocity there plus the correction, in that grid's voxels) instead of on the
    working grid's: no upsampling per step; for a smooth field the two agree (a coarse voxel's
    difference of a field in coarse voxels approximates the working grid's), the network's finest
    detail, which no step changes, is left out.
    ``base_ddf`` (with ``fast``): ``velocity`` already integrated with ``int_steps`` (the
    network's own displacement), so the steps need not integrate it again on the working grid.
    """
    if steps <= 0:
        return velocity
    with torch.inference_mode(False), torch.enable_grad():
        fixed = fixed.detach().clone()
        moving = moving.detach().clone()
        base = velocity.detach().clone()
        if not fast:
            return _refine_full(mind_descriptor(fixed), moving, base, steps, int_steps, lr,
                                smooth, diffeomorphic)
        target, moving_desc = (descriptors if descriptors is not None
                               else (mind_descriptor(fixed), mind_descriptor(moving)))
        loop = int_steps if loop_int_steps is None else int(loop_int_steps)
        if sample_fraction < 1.0 and not sample_coarse:
            return _refine_sampled(target.detach(), moving_desc.detach(), base, steps, int_steps,
                                   lr, smooth, diffeomorphic, sample_fraction, loop,
                                   coarse_regulariser, base_ddf)
        return _refine_coarse(target.detach(), moving_desc.detach(), base, steps, int_steps, lr,
                              smooth, diffeomorphic, sample_coarse, loop, coarse_regulariser,
                              base_ddf)


def _refine_full(target: Tensor, moving: Tensor, base: Tensor, steps: int, int_steps: int,
                 lr: float, smooth: float, diffeomorphic: bool) -> Tensor:
    v = base.requires_grad_(True)
    optimiser = torch.optim.Adam([v], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        ddf = scaling_and_squaring(v, int_steps) if diffeomorphic else v
        moved = spatial.warp(moving, ddf, padding_mode="border")
        loss = (mind_descriptor(moved) - target).square().mean() + smooth * gradient_loss(v)
        loss.backward()
        optimiser.step()
    return v.detach()


def _correction(base: Tensor, int_steps: int, lr: float, diffeomorphic: bool) -> tuple:
    """What the fast and sampled steps share: the working grid's ``size``, the ``coarse`` grid,
    ``integrate`` (with ``int_steps``: the loop's), the network's velocity on the coarse grid,
    ``scale`` (coarse / working voxels, (1, ndim, 1, ...)), the correction ``delta`` (coarse
    voxels, zero) and its Adam optimiser, whose step size (``lr``) stays in working-grid voxels."""
    size = tuple(base.shape[2:])
    coarse = _coarse(size)
    integrate = _integrator(int_steps, diffeomorphic)
    base_coarse = resize_ddf(base, coarse)
    scale = torch.tensor([c / n for c, n in zip(coarse, size, strict=True)],
                         dtype=base.dtype, device=base.device).reshape(1, -1, *[1] * len(size))
    delta = torch.zeros_like(base_coarse, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=lr * float(scale.mean()))
    return size, coarse, integrate, base_coarse, scale, delta, optimiser


def _integrator(int_steps: int, diffeomorphic: bool):
    """Velocity -> displacement with ``int_steps`` squarings (identity when not diffeomorphic):
    the loop's integration, or with the model's ``int_steps`` the caller's."""
    return (lambda v: scaling_and_squaring(v, int_steps)) if diffeomorphic else (lambda v: v)


def _network_ddf(base: Tensor, base_ddf: Tensor | None, int_steps: int,
                 diffeomorphic: bool) -> Tensor:
    """The network's displacement: ``base_ddf`` when the caller has it, else ``base``
    integrated."""
    if base_ddf is not None:
        return base_ddf.detach()
    return _integrator(int_steps, diffeomorphic)(base)


def _refine_coarse(target: Tensor, moving_desc: Tensor, base: Tensor, steps: int,
                   int_steps: int, lr: float, smooth: float, diffeomorphic: bool,
                   sample_coarse: bool, loop_int_steps: int,
                   coarse_regulariser: bool = False, base_ddf: Tensor | None = None) -> Tensor:
    size, coarse, integrate, base_coarse, scale, delta, optimiser = _correction(
        base, loop_int_steps, lr, diffeomorphic)
    if sample_coarse:
        target_c = F.interpolate(target, size=coarse, mode="trilinear" if len(size) == 3
                                 else "bilinear", align_corners=False)
    else:
        # What the coarse grid cannot hold of the network's own field, added back every step
        # (against the loop's integration, so that with no correction the field is exp(v) exactly).
        detail = (_network_ddf(base, base_ddf, int_steps, diffeomorphic)
                  - resize_ddf(integrate(base_coarse), size))
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        if sample_coarse:
            moved = _sample_at(moving_desc, integrate(base_coarse + delta))
            loss = (moved - target_c).square().mean() + smooth * gradient_loss(base_coarse + delta)
        else:
            ddf = resize_ddf(integrate(base_coarse + delta), size) + detail
            moved = spatial.warp(moving_desc, ddf, padding_mode="border")
            loss = ((moved - target).square().mean()
                    + smooth * _regulariser(base, base_coarse, delta, size, coarse_regulariser))
        loss.backward()
        optimiser.step()
    return (base + resize_ddf(delta.detach(), size)).detach()


def _refine_sampled(target: Tensor, moving_desc: Tensor, base: Tensor, steps: int,
                    int_steps: int, lr: float, smooth: float, diffeomorphic: bool,
                    fraction: float, loop_int_steps: int,
                    coarse_regulariser: bool = False, base_ddf: Tensor | None = None) -> Tensor:
    """:func:`_refine_coarse` (without ``sample_coarse``) with each step's similarity at a fresh
    random ``fraction`` of the working grid's voxels: there the field is the correction grid's
    integrated field interpolated (trilinear, as ``resize_ddf`` would give it) plus the network's
    fine detail, and the moving descriptor is sampled at the displaced points."""
    size, _, integrate, base_coarse, scale, delta, optimiser = _correction(
        base, loop_int_steps, lr, diffeomorphic)
    ndim = len(size)
    # voxel-major (voxels, channels) copies: a step's random rows are one contiguous gather each
    detail = (_network_ddf(base, base_ddf, int_steps, diffeomorphic)
              - resize_ddf(integrate(base_coarse), size)).flatten(2)[0].T.contiguous()
    voxels = math.prod(size)
    k = max(1, round(fraction * voxels))
    index = spatial.identity_grid(size, device=base.device, dtype=base.dtype).flatten(1)
    index = index.T.contiguous()
    extent = torch.tensor(size, device=base.device, dtype=base.dtype).reshape(ndim, 1)
    target = target.flatten(2)[0].T.contiguous()
    gen = torch.Generator(device=base.device).manual_seed(SAMPLE_SEED)

    def grid(points: Tensor) -> Tensor:
        """(ndim, k) working-grid voxel coordinates, array order -> a grid_sample grid."""
        g = ((2.0 * points + 1.0) / extent - 1.0).flip(0).T
        return g.reshape((1, k) + (1,) * (ndim - 1) + (ndim,))

    def sample(image: Tensor, points: Tensor) -> Tensor:
        return spatial.grid_sample(image, grid(points), mode="bilinear", padding_mode="border",
                                   align_corners=False).reshape(1, image.shape[1], k)

    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        pick = torch.randint(0, voxels, (k,), generator=gen, device=base.device)
        points = index.index_select(0, pick).T
        field = integrate(base_coarse + delta) / scale  # working-grid voxels
        ddf = sample(field, points) + detail.index_select(0, pick).T[None]
        moved = sample(moving_desc, points + ddf[0])
        loss = ((moved - target.index_select(0, pick).T[None]).square().mean()
                + smooth * _regulariser(base, base_coarse, delta, size, coarse_regulariser))
        loss.backward()
        optimiser.step()
    return (base + resize_ddf(delta.detach(), size)).detach()


def _regulariser(base: Tensor, base_coarse: Tensor, delta: Tensor, size: tuple[int, ...],
                 coarse: bool) -> Tensor:
    """The diffusion penalty of a step: on the working grid's ``base + up(delta)``, or (``coarse``)
    on the correction grid's ``base_coarse + delta``."""
    if coarse:
        return gradient_loss(base_coarse + delta)
    return gradient_loss(base + resize_ddf(delta, size))


def _sample_at(image: Tensor, ddf: Tensor) -> Tensor:
    """``image`` (fine grid) sampled at the voxel centres of ``ddf``'s coarser grid over the same
    extent, displaced by ``ddf`` (coarse voxels): the similarity evaluated at coarse points only."""
    coarse = tuple(ddf.shape[2:])
    ndim = len(coarse)
    coords = spatial.identity_grid(coarse, device=ddf.device, dtype=ddf.dtype) + ddf
    sizes = torch.tensor(coarse[::-1], device=ddf.device, dtype=ddf.dtype)
    grid = (2.0 * coords.flip(1) + 1.0) / sizes.reshape((1, ndim) + (1,) * ndim) - 1.0
    return spatial.grid_sample(image, grid.movedim(1, -1), mode="bilinear",
                               padding_mode="border", align_corners=False)
