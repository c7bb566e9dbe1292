"""bench/engines.py's task accuracy: sane for eager fp32 against itself, worse for a perturbed
variant (so the check can fail), and analytic for the registration differences."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from regseg.engines.base import make_engine
from regseg.models.registry import build_model, load_model
from regseg.sim.phantom import make_phantom
from regseg.stream.context import build_context

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load_bench():
    # The benches are scripts that import their siblings (common, naive) by plain name.
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_engines", BENCH / "engines.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


bench = _load_bench()


@pytest.fixture(scope="module")
def case():
    phantom = make_phantom(0, spacing_mm=1.4)  # coarse: a fast case with the same geometry
    context = build_context(phantom.mri, phantom.labels)
    return context, bench.simulated_frames(phantom, 3)


class _Perturbed(nn.Module):
    """AlignSegNet with its registration shifted and its segmentation moved by two pixels."""

    def __init__(self, model: nn.Module, shift: float) -> None:
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, trus: Tensor, mri: Tensor, mri_labels: Tensor) -> dict[str, Tensor]:
        out = self.model(trus=trus, mri=mri, mri_labels=mri_labels)
        theta = out["theta"].clone()
        theta[:, 0, 2] += self.shift
        return {"theta": theta, "logits": out["logits"].roll(2, dims=-1)}


def _shapes(size: int) -> dict[str, tuple[int, ...]]:
    return {"trus": (1, 1, size, size), "mri": (1, 1, size, size),
            "mri_labels": (1, 2, size, size)}


def test_alignsegnet_agreement_is_exact_against_itself_and_fails_when_perturbed(case):
    context, frames = case
    model = load_model("alignsegnet")  # shipped weights: labels that show the gland
    shapes = _shapes(int(model.config.size))
    inputs = bench.accuracy_inputs("alignsegnet", shapes, context, frames)
    assert [tuple(x.shape) for x in inputs[0].values()] == list(shapes.values())
    reference = bench.run_frames(make_engine(model, shapes, outputs=("theta", "logits")), inputs)
    same = bench.task_agreement("alignsegnet", reference, bench.run_frames(
        make_engine(model, shapes, outputs=("theta", "logits")), inputs), frames)
    assert same["dice_agreement_prostate"] == 1.0
    assert same["dice_agreement_lesion"] == 1.0 or math.isnan(same["dice_agreement_lesion"])
    assert same["theta_diff_mm"] == 0.0 and same["theta_diff_mm_worst"] == 0.0
    assert same["ddf_diff_px"] is None and same["ddf_diff_mm"] is None
    assert bench.accuracy_holds(same) is True

    shift = 0.01  # normalised x: 0.01 * W / 2 frame pixels
    perturbed = bench.task_agreement("alignsegnet", reference, bench.run_frames(
        make_engine(_Perturbed(model, shift), shapes), inputs), frames)
    hw, spacing = frames[0].pixels.shape, frames[0].spacing_mm
    assert perturbed["theta_diff_mm"] == pytest.approx(shift * hw[1] / 2 * spacing[1], rel=1e-3)
    assert 0.5 < perturbed["dice_agreement_prostate"] < same["dice_agreement_prostate"]
    assert bench.accuracy_holds(perturbed) is False


def test_plcreg_agreement_is_zero_against_itself_and_the_end_point_difference(case):
    context, frames = case
    torch.manual_seed(0)
    # Small and random (values not judged), with the live stage's channels.
    model = build_model("plcreg", size=(32, 32), moving_channels=3, fixed_channels=1,
                        shared_encoder=False).eval()
    cfg = model.config
    shapes = {"moving": (1, cfg.moving_channels, *cfg.size),
              "fixed": (1, cfg.fixed_channels, *cfg.size)}
    inputs = bench.accuracy_inputs("plcreg2d", shapes, context, frames)
    assert tuple(inputs[0]["moving"].shape) == shapes["moving"]
    reference = bench.run_frames(make_engine(model, shapes), inputs)
    same = bench.task_agreement("plcreg2d", reference,
                                bench.run_frames(make_engine(model, shapes), inputs), frames)
    assert same["ddf_diff_px"] == 0.0 and same["ddf_diff_mm"] == 0.0
    assert same["dice_agreement_prostate"] is None and same["theta_diff_mm"] is None
    assert bench.accuracy_holds(same) is True

    moved = [{**o, "ddf": o["ddf"] + torch.tensor([0.3, 0.4]).reshape(1, 2, 1, 1)}
             for o in reference]
    worse = bench.task_agreement("plcreg2d", reference, moved, frames)
    hw, spacing = frames[0].pixels.shape, frames[0].spacing_mm
    mm = math.hypot(0.3 * hw[0] * spacing[0] / 32, 0.4 * hw[1] * spacing[1] / 32)
    assert worse["ddf_diff_px"] == pytest.approx(0.5, rel=1e-5)
    assert worse["ddf_diff_mm"] == pytest.approx(mm, rel=1e-5)
    assert bench.accuracy_holds(worse) is False


def test_theta_difference_of_a_rotation_about_the_centre_is_the_mean_arc():
    hw, spacing = (64, 64), (0.5, 0.5)
    angle = np.deg2rad(1.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0],
                         [np.sin(angle), np.cos(angle), 0.0]])
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    j, i = np.mgrid[:64, :64]
    radius_mm = np.hypot(i - 31.5, j - 31.5) * 0.5
    expected = float((2 * np.sin(angle / 2) * radius_mm).mean())
    got = bench.theta_difference_mm(rotation, identity, hw, spacing)
    assert got == pytest.approx(expected, rel=1e-6)


def test_accuracy_holds_is_none_without_a_task_measure_and_ignores_nan():
    assert bench.accuracy_holds({"dice_agreement_prostate": None, "theta_diff_mm": None}) is None
    ok = {"dice_agreement_prostate": 0.995, "dice_agreement_lesion": float("nan"),
          "theta_diff_mm": 0.05}
    assert bench.accuracy_holds(ok) is True
    assert bench.accuracy_holds({**ok, "dice_agreement_lesion": 0.98}) is False
    assert bench.accuracy_holds({**ok, "theta_diff_mm": 0.2}) is False


def test_quick_skips_only_the_baseline_nets_emulated_bf16(monkeypatch):
    """--quick leaves out the MONAI baseline nets' bf16 rows where bf16 is emulated (seconds a
    call: the reason the quick run took 20 minutes), and keeps every live-model row."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(bench, "native_bf16_cpu", lambda: False)
    assert bench.slow_emulated_bf16("monai_localnet", cpu, "bf16")
    assert not bench.slow_emulated_bf16("alignsegnet", cpu, "bf16")
    assert not bench.slow_emulated_bf16("plcreg2d", cpu, "bf16")
    assert not bench.slow_emulated_bf16("monai_localnet", cpu, "fp32")
    assert not bench.slow_emulated_bf16("monai_localnet", torch.device("cuda"), "bf16")
    monkeypatch.setattr(bench, "native_bf16_cpu", lambda: True)
    assert not bench.slow_emulated_bf16("monai_localnet", cpu, "bf16")
