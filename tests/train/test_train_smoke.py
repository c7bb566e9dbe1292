"""A one-step AlignSegNet training run on a tiny config, fed by a stand-in scanner."""

import json

import numpy as np
import pytest
import torch

from regseg import planes, spatial
from regseg.imageio import Volume
from regseg.models.registry import load_model
from regseg.train.alignsegnet import train_alignsegnet
from regseg.train.data import generate_samples
from regseg.types import Frame, GroundTruth

FRAME_HW = (48, 48)


class StandInPhantom:
    """A 40^3 voxel case at 1 mm: an ellipsoid gland (1) with a spherical lesion (2)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        i, j, k = np.meshgrid(*[np.arange(40.0)] * 3, indexing="ij")
        c = 20 + rng.uniform(-2, 2, 3)
        gland = ((i - c[0]) / 12) ** 2 + ((j - c[1]) / 9) ** 2 + ((k - c[2]) / 10) ** 2 < 1
        lesion = (i - c[0] - 4) ** 2 + (j - c[1]) ** 2 + (k - c[2]) ** 2 < 9
        labels = gland.astype(np.uint8) + (gland & lesion).astype(np.uint8)
        voxel_to_world = np.eye(4)
        voxel_to_world[:3, 3] = -20.0
        mri = 100.0 + 300.0 * gland - 150.0 * lesion + rng.normal(0, 10, labels.shape)
        self.mri = Volume(mri.astype(np.float32), voxel_to_world)
        self.labels = Volume(labels, voxel_to_world.copy())


class StandInScanner:
    """Axial frames through the gland (0.8 mm pixels) with a random in-plane tracking error."""

    def __init__(self, phantom: StandInPhantom, seed: int) -> None:
        self.phantom = phantom
        self.labels = torch.from_numpy(phantom.labels.data.transpose(2, 1, 0).copy())[None, None]
        self.world_to_voxel = spatial.invert(phantom.labels.voxel_to_world)

    def random_frame(self, rng: np.random.Generator) -> Frame:
        true = np.diag([0.8, 0.8, 0.8, 1.0])
        true[:3, 3] = [-19.2, -19.2, rng.uniform(-4, 4)]
        error = spatial.lift_2d(np.array([[1, 0, rng.uniform(-3, 3)], [0, 1, rng.uniform(-3, 3)],
                                          [0, 0, 1]]))
        labels = spatial.reslice(self.labels, self.world_to_voxel, true, FRAME_HW,
                                 mode="nearest")[0, 0].numpy()
        pixels = (40 + 60 * labels + rng.uniform(0, 30, FRAME_HW)).astype(np.uint8)
        return Frame(seq=0, acquired_ns=0, pixels=pixels, spacing_mm=(0.8, 0.8),
                     image_to_reference=true @ error,
                     truth=GroundTruth(image_to_mri=true, labels=labels))


def open_stand_in(phantom_seed: int, scanner_seed: int):
    phantom = StandInPhantom(phantom_seed)
    return phantom, StandInScanner(phantom, scanner_seed)


TINY = dict(size=32, enc_channels=8, patch=4, embed_dim=16, depth=1, heads=2,
            unet_channels=(8, 16), latent_dim=4)


def test_samples_hold_what_the_live_path_builds():
    samples = generate_samples([3], 4, size=(32, 32), open_scanner=open_stand_in, progress=False)
    assert len(samples) == 4 and samples.frame_hw == FRAME_HW
    batch = samples.batch([0, 1])
    assert batch["trus"].shape == batch["mri"].shape == (2, 1, 32, 32)
    assert batch["mri_labels"].shape == batch["label_maps"].shape == (2, 2, 32, 32)
    assert batch["labels"].dtype == torch.long and batch["theta"].shape == (2, 2, 3)
    # Warping the tracked MRI labels by the true theta recovers the true labels.
    warped = spatial.warp_affine(batch["mri_labels"], batch["theta"], mode="nearest")
    agree = (warped == batch["label_maps"]).float().mean()
    before = (batch["mri_labels"] == batch["label_maps"]).float().mean()
    assert agree > 0.98 and agree >= before
    assert torch.equal(planes.labels_onehot(samples.mri_labels[:2]), batch["mri_labels"])


def test_one_training_step_writes_checkpoint_plot_and_metrics(tmp_path):
    summary = train_alignsegnet(tmp_path, minutes=2, steps=1, samples=8, train_phantoms=2,
                                val_phantoms=1, val_frames=4, batch_size=4, config=TINY,
                                cache_dir=None, open_scanner=open_stand_in, progress=False,
                                command="test")
    assert summary["steps"] == 1
    for key in ("prostate_dice", "lesion_dice", "tre_mm_before", "tre_mm_after"):
        assert np.isfinite(summary["validation"][key])
    assert summary["validation"]["tre_mm_oracle"] == pytest.approx(0.0, abs=1e-6)
    written = json.loads((tmp_path / "alignsegnet.json").read_text())
    assert written["command"] == "test" and written["config"]["size"] == 32
    assert (tmp_path / "alignsegnet_training.png").stat().st_size > 0
    model = load_model(tmp_path / "alignsegnet.pt")
    assert model.config.size == 32
