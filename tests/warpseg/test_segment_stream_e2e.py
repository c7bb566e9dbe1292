"""End to end: ``regseg segment --model warpseg-prostate`` labels a held-out phantom MRI, and those
labels drive the live chain ``regseg-stream`` runs (stream/build.py, the same composition) as well
as the true labels do.

Phantom seed 0 is held out (WarpSeg trained on seeds 100.. and 200.., validated on 300..303). The
same frames of the simulated scanner go through two chains that differ only in ``--mri-labels``;
live Dice is ``regseg.stream.runner.frame_accuracy``'s prostate Dice, what ``--stats-json`` reports.
"""

import numpy as np
import pytest
import torch

from regseg.cli import main as regseg_main
from regseg.engines.warpseg import SHIPPED, shipped_path
from regseg.registration_metrics import dice_per_label
from regseg.sim.phantom import make_phantom, write_phantom
from regseg.sim.scanner import SimulatedScanner
from regseg.stream.runner import frame_accuracy

FRAMES = 12
STRIDE = 7  # frames apart along the sweep, so the 12 cover more of the gland


def _live_dice(mri_path, labels_path, scanner):
    from regseg.stream.build import build_deformable, build_engine, build_pipeline
    from regseg.stream.context import load_context

    context = load_context(mri_path, labels_path)  # what regseg-stream does with --mri-labels
    engine = build_engine(backend="eager")
    pipeline = build_pipeline(context, engine, deformable=build_deformable(context,
                                                                            backend="eager"))
    rows = []
    for k in range(FRAMES):
        results = pipeline.submit(scanner.frame(k * STRIDE))
        rows += [frame_accuracy(pipeline, r)[0] for r in results]
    rows += [frame_accuracy(pipeline, r)[0] for r in pipeline.flush()]
    return {key: float(np.nanmean([r[key] for r in rows]))
            for key in ("prostate", "registered_prostate")}, len(rows)


@pytest.mark.skipif(not shipped_path("warpseg-prostate").is_file(),
                    reason="warpseg_prostate.pt not shipped yet")
def test_warpseg_labels_drive_the_live_chain_like_true_labels(tmp_path):
    assert "warpseg-prostate" in SHIPPED
    torch.set_num_threads(1)
    phantom = make_phantom(0)
    mri_path, true_path = write_phantom(phantom, tmp_path)
    pred_path = tmp_path / "warpseg_labels.nii.gz"
    rc = regseg_main(["segment", "--model", "warpseg-prostate", "--mri", str(mri_path),
                      "--out", str(pred_path)])
    assert rc == 0 and pred_path.is_file()
    assert (tmp_path / "warpseg_labels_zones.nii.gz").is_file()

    import nibabel as nib

    pred = np.asarray(nib.load(pred_path).dataobj)
    assert set(np.unique(pred).tolist()) <= {0, 1, 2}
    truth = phantom.labels.data
    prostate = dice_per_label((pred > 0).astype(np.uint8), (truth > 0).astype(np.uint8), [1])[1]
    lesion = dice_per_label(pred, truth, [2])[2]
    print(f"segment: prostate Dice {prostate:.3f}, lesion Dice {lesion:.3f}")

    scanner = SimulatedScanner(phantom, seed=0)
    live_pred, n_pred = _live_dice(mri_path, pred_path, scanner)
    live_true, n_true = _live_dice(mri_path, true_path, scanner)
    print(f"live Dice ({n_pred} frames): warpseg labels {live_pred}, true labels {live_true}")
    assert n_pred == n_true >= FRAMES // 2
    assert abs(live_pred["prostate"] - live_true["prostate"]) <= 0.02
    # the MRI labels through the registration alone: the labels' own error shows here
    assert abs(live_pred["registered_prostate"] - live_true["registered_prostate"]) <= 0.08
    assert prostate >= 0.90  # the bar for the MRI labels themselves
