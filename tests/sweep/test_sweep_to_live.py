"""End to end (issue 11): sweep -> reconstruct -> register-mri -> regseg-stream.

A simulated patient is swept (2-D scanner frames with their tracked poses, compounded by
regseg.reconstruct into a volume), the patient's MRI is registered to that volume with
``regseg register-mri`` from a ReferenceToMRI 10 mm / 10 degrees off, and the live stream is run
on the same patient (sim://SEED: its Reference is the MRI frame, so the true ReferenceToMRI is the
identity) with the produced transform, the true one and the off one. The produced transform must
reach the live TRE of the true one; the off one must not (so the test can fail).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from regseg.calibration import transforms_io
from regseg.cli import main
from regseg.imageio import save_volume
from regseg.sim.phantom import make_phantom, write_phantom
from regseg.sim.sweep import EVAL_SEEDS, make_sweep_case
from regseg.stream.cli import build_parser, run

SEED = EVAL_SEEDS[5]
FRAMES = 6


def _live_tre(reference_to_mri: str) -> float:
    args = build_parser().parse_args(
        ["--source", f"sim://{SEED}", "--device", "cpu", "--backend", "eager", "--quiet",
         "--max-frames", str(FRAMES), "--fps", "0", "--serve", "none", "--zmq", "none",
         "--threads", "1", "--reference-to-mri", reference_to_mri])
    summary = run(args)
    assert summary["frames"] >= FRAMES
    return float(summary["tre_mm"]["registered"])


@pytest.mark.slow
def test_sweep_register_mri_then_live_reaches_the_true_transforms_tre(tmp_path):
    torch.set_num_threads(1)
    case = make_sweep_case(SEED, render="frames", reference_is_mri=True, n_frames=40)
    np.testing.assert_allclose(case.reference_to_mri_true, np.eye(4))
    sweep = tmp_path / "sweep.nii.gz"
    save_volume(case.trus, sweep)
    mri, labels = write_phantom(make_phantom(SEED), tmp_path)  # the MRI the live sim:// uses
    paths = {}
    for name, matrix in (("true", case.reference_to_mri_true),
                         ("initial", case.reference_to_mri_initial)):
        paths[name] = str(tmp_path / f"{name}.tfm")
        transforms_io.write_transform(paths[name], matrix)
    paths["produced"] = str(tmp_path / "produced.tfm")
    assert main(["register-mri", "--mri", str(mri), "--mri-labels", str(labels), "--sweep",
                 str(sweep), "--initial", paths["initial"], "--truth", paths["true"], "--out",
                 paths["produced"], "--no-progress", "--threads", "1"]) == 0
    report = json.loads((tmp_path / "produced.json").read_text())
    tre = {name: _live_tre(path) for name, path in paths.items()}
    print(f"sweep -> live: register-mri TRE {report['tre_mm_initial']} -> {report['tre_mm']} mm "
          f"in {report['seconds']} s; live median TRE with the produced ReferenceToMRI "
          f"{tre['produced']:.2f} mm, the true one {tre['true']:.2f} mm, the 10 mm / 10 deg off "
          f"one {tre['initial']:.2f} mm")
    assert report["tre_mm"] < 2.0
    # The produced ReferenceToMRI is off by its own TRE over the gland (report["tre_mm"], ~0.6 mm);
    # the live chain corrects part of it per frame, so the live TRE may exceed the true
    # transform's by at most that residual (0.3 mm floor: frame-to-frame noise of the medians).
    assert tre["produced"] < tre["true"] + max(0.3, report["tre_mm"])
    assert tre["initial"] > tre["true"] + 1.0
