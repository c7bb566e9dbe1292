"""The registered MRI labels as a prior on the segmentation (``--seg-prior``).

The segmentation network and the registration are two estimates of the same gland and lesion: the
network from the frame (with the MRI as context), the registration by carrying the MRI's own
delineation onto the frame (``MRILabels``). On an unfamiliar scanner the network's boundary is the
weaker of the two (README "Why family B's segmentation misses its target"), on a familiar one they
agree. ``--seg-prior on`` pools them as experts (a weighted product of experts: log probabilities
added): the network's logits times :data:`NET_WEIGHT` plus the log probability of each class under
the MRI labels displaced by the registration's expected error.

The prior, per model-grid pixel x, from the MRI labels through the published registration (plane
and deformable field): ``p_gland = eps + (1 - 2 eps) P(x + e in gland)`` for a Gaussian
registration error ``e`` of ``sigma`` mm per axis -- the MRI gland blurred by that Gaussian,
``Phi(d / sigma)`` at a distance ``d`` inside a straight edge -- floored and capped by ``eps`` for
what the registration cannot know (the MRI delineation, tissue it did not follow); ``p_lesion``
the same for the MRI lesion. Classes: background ``1 - p_gland``, prostate
``p_gland (1 - p_lesion)``, lesion ``p_gland p_lesion``. ``eps`` bounds the prior's say (the
prostate-vs-background log odds move by at most ~``log((1 - eps) / eps)``, 3.9 at 0.02), so a
confident network keeps its answer where the two disagree, and decides alone at an edge, where
the prior is ~0.5.

``--seg-prior gated`` (the default where ``--resegment`` is on and ``--seg-window`` off) pools them
only on frames that no flag but the error estimate's doubts: a registration the ultrasound does not
support (``lc2_unsupported``), that jumps (``jump``), that the sweep puts off its plane
(``out_of_plane``) or whose gland the network does not see there (``disagreement``) gives no prior,
since a prior that assumes a 1 mm error pulls a right network towards a wrong gland (addenda 17 and
18 of bench/results/lc2_predeclared.md).

``--seg-fallback mri`` goes further once the stream's scanner is shown unfamiliar: after the error
estimate failed its own check (``--estimate-check``'s verdict ``failed``: the estimate does not see
a known 4 mm displacement on this scanner's images, regseg.stream.estimate_check), every frame that
``gated`` would pool publishes the MRI labels carried through the registration as its labels
(``labels_source`` ``mri``): a verdict that the network was trained on another scanner's images is
a verdict on its segmentation too, and on family B the registered MRI labels were the better
estimate of the gland and of the lesion (README "What each default stage costs and buys"). Before a
verdict, after a pass, and on frames an image-based flag doubts, nothing changes.

What is published changes; what is checked does not: the error estimate, the ``disagreement`` and
``no_gland`` checks and the segmentation confidence see the network's own labels (an independent
view of the gland, README "The error estimate and the flags"), and a frame whose labels are
withheld (no image, no gland, no pose) publishes none either way.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from regseg.clock import now_ns
from regseg.planes import model_grid_labels
from regseg.types import LESION

SEG_PRIOR_MODES = ("on", "gated", "off")
SEG_FALLBACK_MODES = ("mri", "off")
#: --seg-fallback's default (bench/results/lc2_predeclared.md, addendum 24, decides it)
SEG_FALLBACK_DEFAULT = "off"
#: gated: the default since session 21 by addendum 18 (bench/results/lc2_predeclared.md); on
#: failed addendum 17's part 1 (the prior pulled a right network towards a 2-4 mm wrong gland)
SEG_PRIOR_DEFAULT = "gated"
#: The registration's expected error (mm; family B's tissue TRE at 3-10 mm / 10 deg is ~1.1 mm),
#: the prior's floor and cap, and the weight of the network's logits: chosen on family-B diagnosis
#: cases 5132-5135 and calibration phantoms 3448-3451 among sigma 1.0 / 1.5 / 2.5, eps 0.02 / 0.05
#: / 0.15 and weight 1 / 0.5 / 0.25 / 0.1 (README "Segmenting at the published plane").
SIGMA_MM, EPS, NET_WEIGHT = 1.0, 0.02, 0.5
#: ``gated``: flags that leave the prior on. The error estimate's do not gate it (on an unfamiliar
#: scanner it fires on most good frames, README "The error estimate and the flags"; nor its own
#: check's, regseg.stream.estimate_check); the image-based ones (lc2_unsupported, jump,
#: out_of_plane, disagreement) do.
UNGATED_FLAGS = frozenset({"error_estimate", "estimate_unverified"})


def displaced_probability(mask: np.ndarray, spacing_mm: tuple[float, float], sigma_mm: float,
                          eps: float) -> np.ndarray:
    """``eps + (1 - 2 eps) P(x + e in mask)`` per pixel x, ``e`` a Gaussian error of ``sigma_mm``
    per axis: the mask blurred by that Gaussian (``Phi(d / sigma)`` at a distance ``d`` inside a
    straight edge), on a grid of ``spacing_mm`` (row, col) mm; beyond the grid the edge pixels
    repeat."""
    blurred = cv2.GaussianBlur(mask.astype(np.float32), (0, 0),
                               sigmaX=sigma_mm / float(spacing_mm[1]),
                               sigmaY=sigma_mm / float(spacing_mm[0]),
                               borderType=cv2.BORDER_REPLICATE)
    return eps + (1.0 - 2.0 * eps) * np.clip(blurred, 0.0, 1.0)


def prior_log_probs(warped_labels: np.ndarray, size: tuple[int, int],
                    frame_spacing_mm: tuple[float, float], sigma_mm: float = SIGMA_MM,
                    eps: float = EPS) -> np.ndarray:
    """(3, h, w) float32 log probabilities of background, prostate and lesion on the model grid
    under the MRI labels through the registration (``warped_labels``, (H, W) uint8)."""
    grid = model_grid_labels(np.asarray(warped_labels), size)
    hgt, wid = np.asarray(warped_labels).shape
    spacing = (frame_spacing_mm[0] * hgt / size[0], frame_spacing_mm[1] * wid / size[1])
    gland = displaced_probability(grid > 0, spacing, sigma_mm, eps)
    lesion = displaced_probability(grid == LESION, spacing, sigma_mm, eps)
    probs = np.stack([1.0 - gland, gland * (1.0 - lesion), gland * lesion])
    return np.log(probs).astype(np.float32)


def fuse(logits: torch.Tensor, warped_labels: np.ndarray,
         frame_spacing_mm: tuple[float, float], sigma_mm: float = SIGMA_MM,
         eps: float = EPS, net_weight: float = NET_WEIGHT) -> torch.Tensor:
    """The network's logits (1, 3, h, w) times ``net_weight`` plus the prior's log probabilities:
    the pooled logits (a new tensor; ``logits`` is not changed)."""
    size = tuple(logits.shape[-2:])
    prior = prior_log_probs(warped_labels, size, frame_spacing_mm, sigma_mm, eps)
    return net_weight * logits.float() + torch.from_numpy(prior).to(logits.device)[None]


def seg_prior_mode(mode: str = SEG_PRIOR_DEFAULT) -> str | None:
    """``--seg-prior``'s mode as the Pipeline's (None when off)."""
    if mode not in SEG_PRIOR_MODES:
        raise ValueError(f"seg_prior {mode!r}: expected one of {SEG_PRIOR_MODES}")
    return None if mode == "off" else mode


def prior_applies(mode: str | None, flags: tuple[str, ...]) -> bool:
    """Is the prior pooled on a frame with these flags? ``on``: always; ``gated``: only while no
    flag but the error estimate's doubts the registration (a registration the ultrasound does not
    support gives no prior: the network decides alone)."""
    if mode == "gated":
        return not set(flags) - UNGATED_FLAGS
    return mode == "on"


def seg_fallback_mode(mode: str = SEG_FALLBACK_DEFAULT) -> str | None:
    """``--seg-fallback``'s mode as the Pipeline's (None when off)."""
    if mode not in SEG_FALLBACK_MODES:
        raise ValueError(f"seg_fallback {mode!r}: expected one of {SEG_FALLBACK_MODES}")
    return None if mode == "off" else mode


def fallback_applies(mode: str | None, estimate_check: str | None,
                     flags: tuple[str, ...]) -> bool:
    """Does a frame publish the registered MRI labels (``--seg-fallback mri``)? Only after the
    error estimate failed its check on this stream, and only where ``gated``'s prior would be
    pooled (no flag but the error estimate's doubts the registration)."""
    return mode == "mri" and estimate_check == "failed" and prior_applies("gated", flags)


def published_labels(pipeline, frame, logits: torch.Tensor | None, labels: np.ndarray,
                     warped_labels: np.ndarray, flags: tuple[str, ...],
                     estimate_check: str | None, timings: dict[str, float]
                     ) -> tuple[np.ndarray, str, dict[str, float]]:
    """(labels, their source, ``timings``) a frame with labels to publish publishes: the
    registered MRI labels (``mri``: :func:`fallback_applies`), the network's pooled with them
    (``network+mri``: ``--seg-prior``, with the resegmentation's ``logits``), else the network's
    own ``labels`` (``network``)."""
    if fallback_applies(pipeline.seg_fallback, estimate_check, flags):
        return warped_labels.copy(), "mri", timings
    if logits is not None and prior_applies(pipeline.seg_prior, flags):
        pooled, timings = pooled_labels(pipeline, frame, logits, warped_labels, timings)
        return pooled, "network+mri", timings
    return labels, "network", timings


def pooled_labels(pipeline, frame, logits: torch.Tensor, warped_labels: np.ndarray,
                  timings: dict[str, float]) -> tuple[np.ndarray, dict[str, float]]:
    """(labels (H, W) uint8 from the pooled logits, ``timings`` with ``seg_prior`` in ms): the
    frame's segmentation (``logits`` from :func:`regseg.stream.resegment.segment_published`, on
    the whole frame: ``--seg-prior`` is refused with ``--seg-window``) with the registered MRI
    labels ``warped_labels`` as its prior."""
    start = now_ns()
    with torch.inference_mode():
        pooled = fuse(logits, warped_labels, frame.spacing_mm)
        labels = pipeline.chain(frame.pixels.shape).segment(pooled).cpu().numpy()
    return labels, {**timings, "seg_prior": (now_ns() - start) / 1e6}
