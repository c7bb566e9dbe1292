"""Instance optimisation: a few gradient steps refining a network's field on the pair itself.

Learn2Reg's strongest entries follow a network with a short per-pair optimisation (e.g. Siebert,
Hansen & Heinrich, "Fast 3D registration with accurate optimisation and little learning",
MICCAI 2021 / Learn2Reg 2021): the network gives a good start, a few dozen Adam steps on the pair's
own similarity buy the last points of accuracy. Here the optimised quantity is the stationary
velocity the diffeomorphic PLCReg predicts (so the result stays a diffeomorphism, integrated by
scaling and squaring in :mod:`regseg.models.integrate`), the similarity is MIND (modality
independent: the same code serves T1 <-> T1 and cross-modality pairs) and the regulariser is the
diffusion penalty on the velocity. Everything is on the model's working grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from regseg import spatial
from regseg.models.integrate import scaling_and_squaring
from regseg.models.reg_losses import gradient_loss, mind_descriptor

#: Defaults, chosen on the MNI152 *validation* pairs (seeds 20000..; never the eval pairs) — see
#: the README's instance-optimisation table for what each step count buys.
REFINE_LR = 0.05
REFINE_SMOOTH = 1.0


def refine_velocity(fixed: Tensor, moving: Tensor, velocity: Tensor, *, steps: int,
                    int_steps: int = 7, lr: float = REFINE_LR, smooth: float = REFINE_SMOOTH,
                    diffeomorphic: bool = True) -> Tensor:
    """``steps`` Adam steps on ``velocity`` (1, ndim, *size) minimising MIND(fixed, moving o
    exp(v)) + ``smooth`` * diffusion(v); returns the refined velocity (a displacement when not
    ``diffeomorphic``), detached. ``fixed`` and ``moving`` are (1, 1, *size) on the same grid,
    ``moving`` already through the affine stage; voxels of the working grid, array-axis order.
    """
    if steps <= 0:
        return velocity
    with torch.inference_mode(False), torch.enable_grad():
        fixed = fixed.detach().clone()
        moving = moving.detach().clone()
        v = velocity.detach().clone().requires_grad_(True)
        target = mind_descriptor(fixed)
        optimiser = torch.optim.Adam([v], lr=lr)
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            ddf = scaling_and_squaring(v, int_steps) if diffeomorphic else v
            moved = spatial.warp(moving, ddf, padding_mode="border")
            loss = (mind_descriptor(moved) - target).square().mean() + smooth * gradient_loss(v)
            loss.backward()
            optimiser.step()
    return v.detach()
