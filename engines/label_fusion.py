"""LabelFusionEngine: N registered atlases -> one label map on the target grid.

Methods (one engine, ``method=``):

- ``vote``: majority (plurality) vote of the atlases' hard labels; ties go to the lower label.
- ``jlf``: joint label fusion (Wang, Suh, Das, Pluta, Craige, Yushkevich, TPAMI 35(3) 2013), our
  own vectorised torch code (engines/jlf.py): weights from the atlas errors' correlation over a
  patch, M_x(i, j) = (mean_y d_i(y) d_j(y))^beta, (M_x + alpha I) w = 1. The error d_i is, by
  default (``jlf_features="mind"``), the difference of MIND descriptors of atlas and target
  (modality-independent: MRI atlases on a TRUS target), or (``"intensity"``) of the z-scored
  intensities, as antsJointFusion (same-modality atlases). Solved only where the atlases'
  labels disagree (elsewhere every weighting gives the same label): weights 1/N there.
- ``simnet``: per-voxel weights S_i(x) from SimNet (models/simnet.py), normalised over atlases.
- ``staple``: SimpleITK ``MultiLabelSTAPLE`` on the hard labels (the classical reference;
  intensity-blind). Its probabilities are the one-hot of its labels; its per-atlas weights are
  each atlas's mean confusion-matrix diagonal (estimated performance), normalised.

Every method returns fused labels, per-class probabilities and the per-atlas mean weights over
the contested voxels (where the atlases disagree). Inputs are on the target grid (what
regseg.crossmodal.CrossModalResult gives): ``target`` (D, H, W), ``images`` (N, D, H, W) warped
atlas images, ``onehot`` (N, C, D, H, W) warped label probabilities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg.engines.jlf import DEFAULTS as JLF_DEFAULTS
from regseg.engines.jlf import FEATURES as JLF_FEATURES
from regseg.engines.jlf import jlf_mind_weights, jlf_weights
from regseg.errors import EngineError, InputError

METHODS = ("vote", "jlf", "simnet", "staple")
__all__ = ["METHODS", "JLF_FEATURES", "FusionResult", "LabelFusionEngine", "jlf_mind_weights",
           "jlf_weights", "simnet_inputs"]


@dataclass
class FusionResult:
    """``labels`` (D, H, W) uint8; ``probabilities`` (C, D, H, W) float32 summing to 1 over C;
    ``atlas_weights`` (N,) mean weight of each atlas over the contested voxels (sum 1);
    ``contested_fraction`` share of voxels where the atlases' labels disagree."""

    labels: np.ndarray
    probabilities: np.ndarray
    atlas_weights: np.ndarray
    contested_fraction: float
    seconds: float
    info: dict = field(default_factory=dict)


def hard_labels(onehot: Tensor) -> Tensor:
    """(N, C, *S) probabilities -> (N, *S) int64 argmax labels."""
    return onehot.argmax(1)


def contested(labels: Tensor) -> Tensor:
    """(N, *S) atlas labels -> (*S) bool, True where they are not all equal."""
    return (labels != labels[:1]).any(0)


def weighted_vote(onehot: Tensor, weights: Tensor) -> Tensor:
    """Class probabilities (C, *S) from atlas one-hots (N, C, *S) and per-voxel weights (N, *S)
    that sum to 1 over N (negative JLF weights allowed: the result is clipped at 0 and
    renormalised)."""
    p = (onehot * weights[:, None]).sum(0).clamp_min(0)
    return p / p.sum(0, keepdim=True).clamp_min(1e-12)


def majority_vote(onehot: Tensor) -> tuple[Tensor, Tensor]:
    """(probabilities (C, *S) = vote fractions of the hard labels, weights (N, *S) = 1/N)."""
    n, c = onehot.shape[:2]
    votes = F.one_hot(hard_labels(onehot), c).movedim(-1, 1).to(onehot.dtype)
    weights = torch.full((n, *onehot.shape[2:]), 1.0 / n, dtype=onehot.dtype,
                         device=onehot.device)
    return votes.mean(0), weights


def staple(onehot: Tensor) -> tuple[Tensor, np.ndarray]:
    """SimpleITK MultiLabelSTAPLE: (one-hot probabilities (C, *S), per-atlas performance (N,)).

    Undecided voxels take the majority vote's label.
    Raises:
        EngineError: SimpleITK is not installed.
    """
    try:
        import SimpleITK as sitk
    except ImportError:
        raise EngineError("method 'staple' needs SimpleITK, which is not installed here; "
                          "`pip install SimpleITK` (the 'bench' extra) or choose vote|jlf|"
                          "simnet") from None
    n, c = onehot.shape[:2]
    labels = hard_labels(onehot).cpu().numpy().astype(np.uint8)
    f = sitk.MultiLabelSTAPLEImageFilter()
    f.SetLabelForUndecidedPixels(255)
    fused = sitk.GetArrayFromImage(f.Execute([sitk.GetImageFromArray(a) for a in labels]))
    vote = majority_vote(onehot)[0].argmax(0).cpu().numpy()
    fused = np.where(fused == 255, vote, fused).astype(np.int64)
    perf = np.array([_sensitivity(f.GetConfusionMatrix(i)) for i in range(n)])
    probs = F.one_hot(torch.from_numpy(fused), c).movedim(-1, 0).float().to(onehot.device)
    return probs, perf / max(perf.sum(), 1e-12)


def _sensitivity(confusion: tuple[float, ...]) -> float:
    """Mean diagonal of a MultiLabelSTAPLE confusion matrix ((L + 1) x L, row-major: observed
    label incl. 'undecided' by true label; columns sum to 1)."""
    k = int(round((np.sqrt(1 + 4 * len(confusion)) - 1) / 2))
    return float(np.mean(np.diag(np.asarray(confusion).reshape(k + 1, k)[:k])))


class LabelFusionEngine:
    """Fuse registered atlases on the target grid (module docstring).

    Args:
        method: one of :data:`METHODS`.
        device: ``cpu`` or ``cuda[:N]`` (vote, jlf, simnet run there; staple runs on CPU).
        jlf_features: what JLF's atlas error compares, ``mind`` (default; across modalities)
            or ``intensity`` (same modality); see engines/jlf.py.
        radius, alpha, beta: JLF patch radius (voxels), ridge and exponent; mind_dilation:
            MIND's neighbour distance (voxels); default: the feature's ``engines.jlf.DEFAULTS``.
        simnet_weights: checkpoint path, registered name (default the shipped ``simnet``) or
            a SimNet module (training validates with it).
        backend: the Engine backend for SimNet (``eager`` default; see make_engine).
    """

    def __init__(self, method: str = "jlf", *, device: str | torch.device = "cpu",
                 jlf_features: str = "mind", radius: int | None = None,
                 alpha: float | None = None, beta: float | None = None,
                 mind_dilation: int | None = None,
                 simnet_weights: str | Path | torch.nn.Module = "simnet",
                 backend: str = "eager") -> None:
        if method not in METHODS:
            raise InputError(f"label fusion method {method!r}: choose one of {list(METHODS)}")
        self.method = method
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError(f"device {self.device}: CUDA is not available here; use cpu")
        if jlf_features not in JLF_FEATURES:
            raise InputError(f"JLF features {jlf_features!r}: choose one of {list(JLF_FEATURES)}")
        self.jlf_features = jlf_features
        d = JLF_DEFAULTS[jlf_features]
        self.radius = int(d["radius"] if radius is None else radius)
        self.alpha = float(d["alpha"] if alpha is None else alpha)
        self.beta = float(d["beta"] if beta is None else beta)
        self.mind_dilation = int(d.get("dilation", 2) if mind_dilation is None
                                 else mind_dilation)
        self._simnet = None
        if method == "simnet":
            from regseg.engines.base import make_engine
            from regseg.models.registry import load_model

            model = (simnet_weights if isinstance(simnet_weights, torch.nn.Module)
                     else load_model(simnet_weights))
            self.size = tuple(model.config.size)
            shape = (1, 1, *self.size)
            self._simnet = make_engine(model, {"target": shape, "atlas_image": shape,
                                               "atlas_foreground": shape},
                                       backend=backend, device=self.device, outputs=("weight",),
                                       warmup=1)

    def __call__(self, target: np.ndarray | Tensor, images: np.ndarray | Tensor,
                 onehot: np.ndarray | Tensor) -> FusionResult:
        t0 = time.perf_counter()
        target_t = torch.as_tensor(np.asarray(target, np.float32) if isinstance(
            target, np.ndarray) else target, device=self.device).float()
        images_t = torch.as_tensor(images, device=self.device).float()
        onehot_t = torch.as_tensor(onehot, device=self.device).float()
        _check_shapes(target_t, images_t, onehot_t)
        where = contested(hard_labels(onehot_t))
        perf = None
        if self.method == "vote":
            probs, weights = majority_vote(onehot_t)
        elif self.method == "jlf":
            extra = {"dilation": self.mind_dilation} if self.jlf_features == "mind" else {}
            solve = jlf_mind_weights if self.jlf_features == "mind" else jlf_weights
            weights = solve(target_t, images_t, where, radius=self.radius, alpha=self.alpha,
                            beta=self.beta, **extra)
            probs = weighted_vote(onehot_t, weights)
        elif self.method == "simnet":
            weights = self.simnet_weights(target_t, images_t, onehot_t)
            probs = weighted_vote(onehot_t, weights)
        else:
            probs, perf = staple(onehot_t)
            weights = None
        if perf is not None:
            atlas_weights = perf
        elif where.any():
            atlas_weights = weights[:, where].mean(1).cpu().numpy()
        else:
            atlas_weights = np.full(images_t.shape[0], 1.0 / images_t.shape[0])
        labels = probs.argmax(0).to(torch.uint8).cpu().numpy()
        return FusionResult(labels=labels, probabilities=probs.cpu().numpy().astype(np.float32),
                            atlas_weights=np.asarray(atlas_weights, np.float64),
                            contested_fraction=float(where.float().mean()),
                            seconds=time.perf_counter() - t0, info=self.info())

    def info(self) -> dict:
        """The method and, for JLF, its features and parameters (for reports)."""
        if self.method != "jlf":
            return {"method": self.method}
        out = {"method": self.method, "jlf_features": self.jlf_features,
               "radius": self.radius, "alpha": self.alpha, "beta": self.beta}
        return out | ({"mind_dilation": self.mind_dilation} if self.jlf_features == "mind"
                      else {})

    @torch.inference_mode()
    def simnet_weights(self, target: Tensor, images: Tensor, onehot: Tensor) -> Tensor:
        """(N, *S) SimNet weights normalised over the atlases (a floor of 1e-3 keeps voxels
        where SimNet trusts no atlas at the vote)."""
        shape = tuple(target.shape)
        raw = []
        for i in range(images.shape[0]):
            out = self._simnet(simnet_inputs(target, images[i], onehot[i], self.size))
            raw.append(F.interpolate(out["weight"].clone(), size=shape, mode="trilinear",
                                     align_corners=False)[0, 0])
        s = torch.stack(raw).clamp_min(1e-3)
        return s / s.sum(0, keepdim=True)


def simnet_inputs(target: Tensor, image: Tensor, onehot: Tensor, size: tuple[int, ...]
                  ) -> dict[str, Tensor]:
    """SimNet's inputs for one atlas at the working ``size`` (what training sees too): target
    and atlas image z-scored, the atlas foreground 1 - onehot[0]; area-resampled, (1, 1, *size).

    Args:
        target: (D, H, W); image: (D, H, W) warped atlas image; onehot: (C, D, H, W).
    """
    return {"target": _resize(_zscore_volume(target), size),
            "atlas_image": _resize(_zscore_volume(image), size),
            "atlas_foreground": _resize(1.0 - onehot[0], size)}


def _zscore_volume(x: Tensor) -> Tensor:
    x = x.float()
    return (x - x.mean()) / x.std().clamp_min(1e-6)


def _resize(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """(D, H, W) -> (1, 1, *size), area (box) resampling (trilinear when up-sampling)."""
    x = x[None, None].float()
    if all(s <= d for s, d in zip(size, x.shape[2:], strict=True)):
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def _check_shapes(target: Tensor, images: Tensor, onehot: Tensor) -> None:
    if target.ndim != 3:
        raise InputError(f"label fusion: target is {target.ndim}-D {tuple(target.shape)}; a 3-D "
                         "volume (D, H, W) is expected")
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(target.shape):
        raise InputError(f"label fusion: atlas images {tuple(images.shape)} must be (N, "
                         f"{', '.join(map(str, target.shape))}) on the target grid")
    if onehot.ndim != 5 or onehot.shape[0] != images.shape[0] or tuple(
            onehot.shape[2:]) != tuple(target.shape):
        raise InputError(f"label fusion: atlas one-hot labels {tuple(onehot.shape)} must be "
                         f"({images.shape[0]}, C, {', '.join(map(str, target.shape))})")
    if images.shape[0] < 1:
        raise InputError("label fusion: no atlases given")
