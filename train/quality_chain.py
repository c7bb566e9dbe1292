"""Which live chain a QualityNet calibration was made on, and the chain's own per-frame cues.

The error estimate is calibrated on the pairs a live chain makes: a frame registered K times
(``--refine-iterations``), perhaps refined by the deformable stage (``--deformable``) or started
from several hypotheses (``--multi-start``) looks different to QualityNet from a frame registered
once, so each chain has its own threshold (:func:`regseg.models.qualitynet.chain_key` names it).

:func:`chain_features` are cues of a registered frame that do not come from the TRUS appearance
the way QualityNet's do: how far the deformable stage had to move the MRI labels, how much the
affine and the deformable labels agree, how much the segmentation and the registered labels
agree, the segmentation's confidence (issue 16: the false alarms on family B are QualityNet's
upward bias on an unfamiliar appearance).
"""

from __future__ import annotations

import math
import re

import numpy as np

from regseg.errors import InputError
from regseg.models.qualitynet import chain_key
from regseg.stream.capture import MULTI_START_DEFAULT, REFINE_ITERATIONS
from regseg.stream.cli_parser import DEFORMABLE_DEFAULT
from regseg.stream.lc2_stage import LC2_DEFAULT

#: The chain ``regseg-stream`` runs without flags (its --refine-iterations, --deformable,
#: --multi-start and --lc2 defaults).
DEFAULT_CHAIN = chain_key(REFINE_ITERATIONS, DEFORMABLE_DEFAULT != "off",
                          MULTI_START_DEFAULT == "on", LC2_DEFAULT != "off")
#: The chains ``python -m regseg.train.quality_calibrate`` calibrates by default: K 1-3 with and
#: without the deformable stage (multi-start off, its default), and the default chain (with the
#: image-based refinement, --lc2 on).
GRID = tuple(chain_key(k, d, False) for k in (1, 2, 3) for d in (True, False))
GRID += (DEFAULT_CHAIN,) if DEFAULT_CHAIN not in GRID else ()

FEATURES = ("ddf_gland_mean_mm", "ddf_gland_p90_mm", "affine_vs_final_dice",
            "seg_vs_registered_dice", "seg_confidence", "gland_area_ratio")

_CHAIN = re.compile(r"K([1-9][0-9]?)/deformable-(on|off)/multi-start-(on|off)(/lc2-on)?")


def parse_chain(chain: str) -> tuple[int, bool, bool]:
    """(refine_iterations, deformable, multi_start) of a :func:`chain_key`
    (:func:`chain_lc2`: whether it names the image-based refinement).

    Raises:
        InputError: not a chain key.
    """
    m = _CHAIN.fullmatch(chain)
    if m is None:
        raise InputError(f"--chains {chain!r}: expected K<iterations>/deformable-<on|off>/"
                         f"multi-start-<on|off>[/lc2-on], e.g. {DEFAULT_CHAIN}")
    return int(m.group(1)), m.group(2) == "on", m.group(3) == "on"


def chain_lc2(chain: str) -> bool:
    """Whether the chain key ``chain`` runs the image-based refinement (``--lc2 on``)."""
    parse_chain(chain)
    return chain.endswith("/lc2-on")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else math.nan


def chain_features(context, result) -> list[float]:
    """The :data:`FEATURES` of a live Result (regseg.stream.pipeline.Result):

    - ``ddf_gland_*``: mean and 90th percentile of the deformable displacement (mm) over the
      registered gland (0 without the deformable stage);
    - ``affine_vs_final_dice``: gland Dice of the MRI labels through the affine plane vs the
      published ones (1 without the deformable stage);
    - ``seg_vs_registered_dice``: the Pipeline's ``quality`` (segmented vs registered gland);
    - ``seg_confidence``; ``gland_area_ratio``: registered / segmented gland area.
    """
    from regseg import spatial
    from regseg.stream.capture import warp_labels

    final = result.warped_labels > 0
    sy, sx = result.frame.spacing_mm
    if result.ddf is not None and final.any():
        mm = np.hypot(result.ddf[0] * sy, result.ddf[1] * sx)[final]
        ddf_mean, ddf_p90 = float(mm.mean()), float(np.quantile(mm, 0.9))
        affine = warp_labels(context, spatial.invert(result.mri_to_image),
                             result.frame.pixels.shape) > 0
        affine_dice = _dice(affine, final)
    else:
        ddf_mean = ddf_p90 = 0.0
        affine_dice = 1.0
    seg = int((result.labels > 0).sum())
    return [ddf_mean, ddf_p90, affine_dice, float(result.quality),
            float(result.seg_confidence), float(final.sum()) / max(seg, 1)]
