"""Joint label fusion weights (Wang, Suh, Das, Pluta, Craige, Yushkevich, TPAMI 35(3) 2013).

JLF weighs the atlases at a voxel x by how their *errors* correlate over a patch N(x): with
d_i(y) the error of atlas i at y, M_x(i, j) = (mean_{y in N(x)} d_i(y) d_j(y))^beta and the
weights solve (M_x + alpha I) w = 1, normalised to sum 1 (the paper's closed form; atlases that
err together share their weight). What "error" is, is the one choice:

- ``intensity`` (:func:`jlf_weights`): d_i = |A_i - T| of the z-scored patch intensities, as
  antsJointFusion. Right when atlases and target share a modality; across modalities (MRI
  atlases, a TRUS target) the intensities share no relation and the weights follow speckle.
- ``mind`` (:func:`jlf_mind_weights`, ours): d_i = |MIND(A_i) - MIND(T)| per descriptor channel,
  MIND the modality-independent neighbourhood descriptor (Heinrich et al., MedIA 2012;
  regseg.models.reg_losses.mind_descriptor, the similarity the atlases were registered with).
  MIND describes local structure (where the edges are) and is the same for an MRI and a TRUS
  image of one anatomy, so an atlas whose gland boundary lies where the target's does has the
  smaller error. The patch mean runs over the patch voxels and the 6 channels; the errors are
  divided by their mean over the solved voxels first (one scale per call) so that ``alpha``
  means the same on every image. The products are box-filtered over the whole grid, one pair
  of atlases at a time (N(N+1)/2 filters), and M is solved only at the voxels asked for.

No local search (the atlases arrive registered). Weights are 1/N outside ``where``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from regseg.models.reg_losses import mind_descriptor

FEATURES = ("mind", "intensity")
#: Parameters per feature. intensity: antsJointFusion's defaults. mind: chosen on validation
#: sweeps (TRAIN_SEEDS 11900-11907 fused from ATLAS_SEEDS atlases; never EVAL_SEEDS) by
#: bench/mas_tune_jlf.py (bench/results/mas_jlf_tuning.json).
DEFAULTS = {"intensity": {"radius": 2, "alpha": 0.1, "beta": 2.0},
            "mind": {"radius": 5, "alpha": 0.1, "beta": 0.5, "dilation": 2}}


def mind_features(volume: Tensor, dilation: int = 2) -> Tensor:
    """(D, H, W) image -> (6, D, H, W) MIND descriptor (scale-free: the image is divided by its
    standard deviation first, which MIND is invariant to but for its epsilon)."""
    x = volume.float()
    x = (x - x.mean()) / x.std().clamp_min(1e-6)
    return mind_descriptor(x[None, None], dilation=dilation)[0]


def jlf_mind_weights(target: Tensor, images: Tensor, where: Tensor, *, radius: int = 2,
                     alpha: float = 0.1, beta: float = 2.0, dilation: int = 2,
                     chunk: int = 65536) -> Tensor:
    """JLF weights (N, *S) from MIND-descriptor errors (module docstring); 1/N outside ``where``.

    Args:
        target: (D, H, W) target image; images: (N, D, H, W) registered atlas images (any
            modality each).
        where: (D, H, W) bool, the voxels to solve (the contested ones).
        radius: patch radius in voxels (patch (2r+1)^3); alpha: ridge on M's diagonal (errors
            scaled to mean 1); beta: exponent; dilation: MIND's neighbour distance (voxels).
    """
    n = images.shape[0]
    weights, idx = _uniform(n, where)
    if idx.numel() == 0:
        return weights
    ft = mind_features(target, dilation)
    err = torch.stack([(mind_features(a, dilation) - ft).abs() for a in images])  # (N, 6, *S)
    scale = err.reshape(n, err.shape[1], -1)[:, :, idx].mean().clamp_min(1e-6)
    err = err / scale
    m = torch.empty(idx.numel(), n, n, device=target.device)
    for i in range(n):
        for j in range(i, n):
            box = box_mean((err[i] * err[j]).mean(0), radius)
            m[:, i, j] = m[:, j, i] = box.reshape(-1)[idx]
    flat = weights.reshape(n, -1)
    for start in range(0, idx.numel(), chunk):
        flat[:, idx[start:start + chunk]] = _solve(m[start:start + chunk].pow(beta), alpha).T
    return weights


def box_mean(x: Tensor, radius: int) -> Tensor:
    """Mean over the (2r+1)^3 box around each voxel of (D, H, W), the box clipped at the edges
    (mean of the voxels inside); separable: three 1-D means, exact for a box."""
    k = 2 * radius + 1
    out = x[None, None]
    for kernel, pad in (((k, 1, 1), (radius, 0, 0)), ((1, k, 1), (0, radius, 0)),
                        ((1, 1, k), (0, 0, radius))):
        out = F.avg_pool3d(out, kernel, stride=1, padding=pad, count_include_pad=False)
    return out[0, 0]


def _patch_offsets(radius: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
    r = torch.arange(-radius, radius + 1, device=device)
    dz, dy, dx = torch.meshgrid(r, r, r, indexing="ij")
    padded = [s + 2 * radius for s in shape]
    return ((dz * padded[1] + dy) * padded[2] + dx).reshape(-1)


def jlf_weights(target: Tensor, images: Tensor, where: Tensor, *, radius: int = 2,
                alpha: float = 0.1, beta: float = 2.0, chunk: int = 8192) -> Tensor:
    """Intensity JLF weights (N, *S) (module docstring: ``intensity``); 1/N outside ``where``.

    Each patch is z-scored first, as antsJointFusion does.

    Args:
        target: (D, H, W) target image; images: (N, D, H, W) registered atlas images.
        where: (D, H, W) bool, the voxels to solve (the contested ones).
        radius: patch radius in voxels (patch (2r+1)^3); alpha: ridge on M's diagonal;
        beta: exponent on the pairwise error products; chunk: voxels solved at once (memory).
    """
    n, shape = images.shape[0], tuple(target.shape)
    weights, idx = _uniform(n, where)
    if idx.numel() == 0:
        return weights
    pad = (radius,) * 6
    t_pad = F.pad(target[None, None].float(), pad, mode="replicate").reshape(-1)
    a_pad = F.pad(images[:, None].float(), pad, mode="replicate").reshape(n, -1)
    offsets = _patch_offsets(radius, shape, target.device)
    d, h, w = shape
    z, rem = idx // (h * w), idx % (h * w)
    y, x = rem // w, rem % w
    centre = ((z + radius) * (h + 2 * radius) + (y + radius)) * (w + 2 * radius) + (x + radius)
    flat = weights.reshape(n, -1)
    for start in range(0, idx.numel(), chunk):
        sites = centre[start:start + chunk, None] + offsets  # (m, P)
        t = _zscore(t_pad[sites])  # (m, P)
        a = _zscore(a_pad[:, sites])  # (N, m, P)
        diff = (a - t).abs().transpose(0, 1)  # (m, N, P)
        m = (diff @ diff.transpose(1, 2) / diff.shape[-1]).pow(beta)
        flat[:, idx[start:start + chunk]] = _solve(m, alpha).T
    return weights


def _uniform(n: int, where: Tensor) -> tuple[Tensor, Tensor]:
    """Weights 1/N everywhere (N, *S), and the flat indices of the voxels to solve."""
    weights = torch.full((n, *where.shape), 1.0 / n, dtype=torch.float32, device=where.device)
    return weights, where.reshape(-1).nonzero().squeeze(1)


def _solve(m: Tensor, alpha: float) -> Tensor:
    """Wang & Yushkevich's closed form per voxel: (M + alpha I)^-1 1, normalised to sum 1;
    ``m`` (V, N, N) the pairwise error products, returns (V, N)."""
    n = m.shape[-1]
    eye = alpha * torch.eye(n, device=m.device)
    ones = torch.ones(m.shape[0], n, 1, device=m.device)
    sol = torch.linalg.solve(m + eye, ones)[..., 0]
    return sol / sol.sum(1, keepdim=True)


def _zscore(p: Tensor) -> Tensor:
    return (p - p.mean(-1, keepdim=True)) / p.std(-1, keepdim=True).clamp_min(1e-6)
