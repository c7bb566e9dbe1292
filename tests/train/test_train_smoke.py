"""A one-step AlignSegNet training run on a tiny config, fed by a stand-in scanner."""

import json

import numpy as np
import pytest
import torch

from regseg import planes, spatial
from regseg.errors import InputError
from regseg.imageio import Volume
from regseg.models.registry import load_model
from regseg.train import data as data_mod
from regseg.train.alignsegnet import evaluate, train_alignsegnet
from regseg.train.data import SampleSet, generate_samples
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


# Training on randomised cases: frames of mixed sizes, fine-tuning, --randomise.
class SizedScanner(StandInScanner):
    """The stand-in scanner with another frame size (same 0.8 mm pixels)."""

    def __init__(self, phantom, seed, hw):
        super().__init__(phantom, seed)
        self.hw = hw

    def random_frame(self, rng):
        true = np.diag([0.8, 0.8, 0.8, 1.0])
        true[:3, 3] = [-19.2, -19.2, rng.uniform(-4, 4)]
        error = spatial.lift_2d(np.array([[1, 0, rng.uniform(-3, 3)], [0, 1, rng.uniform(-3, 3)],
                                          [0, 0, 1]]))
        labels = spatial.reslice(self.labels, self.world_to_voxel, true, self.hw,
                                 mode="nearest")[0, 0].numpy()
        pixels = (40 + 60 * labels + rng.uniform(0, 30, self.hw)).astype(np.uint8)
        return Frame(seq=0, acquired_ns=0, pixels=pixels, spacing_mm=(0.8, 0.8),
                     image_to_reference=true @ error,
                     truth=GroundTruth(image_to_mri=true, labels=labels))


def _sized(hw):
    def open_scanner(phantom_seed, scanner_seed):
        phantom = StandInPhantom(phantom_seed)
        return phantom, SizedScanner(phantom, scanner_seed, hw)
    return open_scanner


def test_sample_sets_of_different_frame_sizes_concatenate_and_evaluate_per_frame():
    a = generate_samples([3], 3, size=(32, 32), open_scanner=_sized((48, 48)), progress=False)
    b = generate_samples([4], 3, size=(32, 32), open_scanner=_sized((40, 56)), progress=False)
    both = SampleSet.concat([a, b])
    assert len(both) == 6 and both.sample_hw(0) == (48, 48) and both.sample_hw(5) == (40, 56)
    model = _tiny_model()
    metrics = evaluate(model, both)
    # The oracle (true theta) is exact only if each frame's own size maps theta to pixels.
    assert metrics["tre_mm_oracle"] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(metrics["tre_mm_after_median"])


def _tiny_model():
    from regseg.models.alignsegnet import AlignSegNet, AlignSegNetConfig

    torch.manual_seed(0)
    return AlignSegNet(AlignSegNetConfig(**TINY))


def test_old_sample_files_without_per_frame_sizes_still_load(tmp_path):
    s = generate_samples([3], 2, size=(32, 32), open_scanner=open_stand_in, progress=False)
    s.save(tmp_path / "s.pt")
    raw = torch.load(tmp_path / "s.pt", weights_only=True)
    del raw["frame_hws"]
    torch.save(raw, tmp_path / "old.pt")
    old = SampleSet.load(tmp_path / "old.pt")
    assert old.sample_hw(1) == s.frame_hw


def test_fine_tuning_starts_from_the_checkpoint_and_records_it(tmp_path):
    common = dict(minutes=2, steps=1, samples=4, train_phantoms=1, val_phantoms=1, val_frames=2,
                  batch_size=2, config=TINY, cache_dir=None, open_scanner=open_stand_in,
                  progress=False, command="test")
    train_alignsegnet(tmp_path / "a", **common)
    start = tmp_path / "a" / "alignsegnet.pt"
    summary = train_alignsegnet(tmp_path / "b", init=start, lr=0.0, **common)
    assert summary["init"]["path"] == str(start) and len(summary["init"]["sha256"]) == 64
    a, b = load_model(start), load_model(tmp_path / "b" / "alignsegnet.pt")
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name  # lr 0: the weights are the checkpoint's (BN stats move)
    with pytest.raises(InputError, match="--init"):
        train_alignsegnet(tmp_path / "c", init=start, **{**common, "config": {**TINY, "depth": 2}})


@pytest.mark.parametrize("mri_stacks, scanner", [
    (False, "open_randomised_scanner"), (True, "open_randomised_stack_scanner")])
def test_randomised_training_reports_plain_and_randomised_held_out_sets(tmp_path, monkeypatch,
                                                                        mri_stacks, scanner):
    """Randomised frames come from the randomised scanner (with --mri-stacks: the one whose MRI
    is resampled onto a thick slice stack), held-out frames from both it and the plain one."""
    opened = []

    def fake_randomised(phantom_seed, scanner_seed):  # the real draw, on a small fast stand-in
        opened.append(phantom_seed)
        return open_stand_in(phantom_seed, scanner_seed)

    monkeypatch.setattr(f"regseg.train.alignsegnet_data.{scanner}", fake_randomised)
    summary = train_alignsegnet(tmp_path, minutes=2, steps=1, samples=8, train_phantoms=2,
                                val_phantoms=1, val_frames=2, batch_size=2, config=TINY,
                                cache_dir=None, open_scanner=open_stand_in, randomise=True,
                                plain_fraction=0.5, mri_stacks=mri_stacks, progress=False,
                                command="test")
    assert summary["randomise"] is True and summary["train_frames"] == 8
    assert summary.get("mri_stacks", False) is mri_stacks  # recorded when on
    assert opened == [1, 2, 1000]  # randomised: the training cases and the held-out one
    for name in ("validation", "validation_randomised", "demo"):
        assert summary[name]["frames"] == 2
    assert json.loads((tmp_path / "alignsegnet.json").read_text())["plain_fraction"] == 0.5


def test_randomised_scanner_is_seeded_and_cached_under_its_own_key(tmp_path):
    calls = []

    def spy(phantom_seed, scanner_seed):
        calls.append(phantom_seed)
        return open_stand_in(phantom_seed, scanner_seed)

    original = data_mod.CACHEABLE_SCANNERS["randomised"]
    try:
        data_mod.CACHEABLE_SCANNERS["randomised"] = spy
        a = data_mod.cached_samples(tmp_path, [3], 2, size=(32, 32), open_scanner=spy,
                                    progress=False)
        b = data_mod.cached_samples(tmp_path, [3], 2, size=(32, 32), open_scanner=spy,
                                    progress=False)
        c = data_mod.cached_samples(tmp_path, [3], 2, size=(32, 32), open_scanner=open_stand_in,
                                    progress=False)
    finally:
        data_mod.CACHEABLE_SCANNERS["randomised"] = original
    assert calls == [3]  # the second call loaded the cache
    assert torch.equal(a.trus, b.trus) and len(c) == 2
    assert len(list(tmp_path.glob("samples-*.pt"))) == 1  # a stand-in is never cached


@pytest.mark.parametrize("level", [0.0, 3.0, 10.0])
def test_compare_tracking_error_is_exactly_the_level(level):
    from regseg.train.compare import rigid_error

    e = rigid_error(level, np.random.default_rng(1), (300, 400), 0.25)
    angle = np.degrees(np.arctan2(e[1, 0], e[0, 0]))
    assert abs(angle) == pytest.approx(level)
    assert np.allclose(e[:2, :2] @ e[:2, :2].T, np.eye(2))  # rigid in plane
    # Some point (the rotation centre) moves by exactly the level in mm.
    lin, t = e[:2, :2], e[:2, 3]
    if level:
        rng = np.random.default_rng(1)
        centre = np.array([400, 300]) * (0.5 + rng.uniform(-0.15, 0.15, 2))
        moved = lin @ centre + t - centre
        assert np.hypot(*moved) * 0.25 == pytest.approx(level)
    assert abs(e[2, 3]) * 0.25 <= 0.5


def test_compare_speckle_reduced_keeps_the_black_outside_and_smooths_inside():
    from regseg.train.compare import FAMILIES, family_samples, speckle_reduced

    rng = np.random.default_rng(0)
    pixels = np.zeros((60, 80), np.uint8)
    pixels[10:50, 10:70] = rng.integers(20, 200, (40, 60))
    out = speckle_reduced(pixels)
    assert out.shape == pixels.shape and out.dtype == np.uint8
    assert (out[:5] == 0).all() and (out[:, :5] == 0).all()  # outside the "sector": still 0
    inner = (slice(15, 45), slice(15, 65))
    # a median smooths speckle: neighbouring pixels differ less than before
    assert np.abs(np.diff(out[inner].astype(float), axis=1)).mean() < \
        np.abs(np.diff(pixels[inner].astype(float), axis=1)).mean()
    assert "Asr" in FAMILIES
    with pytest.raises(ValueError, match="family 'C'"):
        family_samples("C", 3.0, 1, 1, (32, 32))


def test_compare_refuses_an_unknown_family_before_any_work(capsys):
    from regseg.train.compare import main

    with pytest.raises(SystemExit) as stop:
        main(["--models", "missing.pt", "--families", "A,C"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--families A,C: C unknown" in err and "Traceback" not in err


@pytest.mark.parametrize("restyled_losses", ["all", "segmentation"])
def test_restyled_share_comes_from_the_restyled_scanner_with_its_own_draws(tmp_path, monkeypatch,
                                                                           restyled_losses):
    """--restyled-fraction: that share of the training frames is rendered by the restyled
    scanner, on the training cases drawn with the data seed + 1 (other poses and cases than the
    randomised frames'), and is recorded."""
    opened = {"randomised": [], "restyled": []}

    def spy(kind):
        def open_(phantom_seed, scanner_seed):
            opened[kind].append((phantom_seed, scanner_seed))
            return open_stand_in(phantom_seed, scanner_seed)
        return open_

    monkeypatch.setattr("regseg.train.alignsegnet_data.open_randomised_scanner", spy("randomised"))
    monkeypatch.setattr("regseg.train.alignsegnet_data.open_restyled_scanner", spy("restyled"))
    summary = train_alignsegnet(tmp_path, minutes=2, steps=1, samples=8, train_phantoms=2,
                                val_phantoms=1, val_frames=2, batch_size=2, config=TINY,
                                cache_dir=None, open_scanner=open_stand_in, randomise=True,
                                plain_fraction=0.25, restyled_fraction=0.25, progress=False,
                                restyled_losses=restyled_losses, command="test")
    assert summary["train_frames"] == 8 and summary["restyled_fraction"] == 0.25
    assert summary["restyled_losses"] == restyled_losses
    assert [s for s, _ in opened["restyled"]] == [1, 2]
    randomised_train = opened["randomised"][:2]
    assert {s for s, _ in randomised_train} == {1, 2}
    # data seed 0 -> scanner seeds phantom + 0; the restyled draw uses seed 1 -> 100_003 + phantom
    assert [k for _, k in opened["restyled"]] == [100_004, 100_005]
    assert [k for _, k in randomised_train] == [1, 2]


@pytest.mark.parametrize("randomise, restyled", [(False, 0.2), (True, 0.9), (True, -0.1)])
def test_restyled_fraction_out_of_range_is_refused_before_any_work(tmp_path, randomise, restyled):
    with pytest.raises(InputError, match="--restyled-fraction"):
        train_alignsegnet(tmp_path / "run", minutes=1, steps=1, samples=8, train_phantoms=2,
                          config=TINY, cache_dir=None, open_scanner=open_stand_in,
                          randomise=randomise, plain_fraction=0.2, restyled_fraction=restyled,
                          progress=False, command="test")
    assert not (tmp_path / "run").exists()


def test_compare_family_b_uses_the_diagnosis_seeds_when_given(monkeypatch):
    """--b-seed0 chooses family-B cases outside the evaluation seeds; by default they are the
    evaluation seeds."""
    from regseg.sim.family_b import EVAL_SEEDS
    from regseg.train import compare

    seen = []

    def stand_in_b(seed):
        seen.append(seed)
        phantom = StandInPhantom(seed)
        return phantom, StandInScanner(phantom, seed).random_frame

    monkeypatch.setattr(compare, "_family_b", stand_in_b)
    samples = compare.family_samples("B", 3.0, 2, 1, (32, 32), b_seed0=5428)
    assert seen == [5428, 5429]
    assert samples.phantom_seed.flatten().tolist() == [5428, 5429]
    seen.clear()
    compare.family_samples("B", 3.0, 1, 1, (32, 32))
    assert seen == [EVAL_SEEDS[0]]


def test_registration_losses_skip_the_frames_outside_the_mask():
    """--restyled-losses segmentation: the registration losses are taken over the masked frames
    only (zero, with a gradient path, when none is), the segmentation loss over all."""
    from regseg.train.alignsegnet import LossWeights, joint_loss

    g = torch.Generator().manual_seed(0)
    b, h = 4, 8
    out = {"logits": torch.randn(b, 3, h, h, generator=g, requires_grad=True),
           "warped_labels": torch.rand(b, 2, h, h, generator=g),
           "theta": torch.randn(b, 2, 3, generator=g, requires_grad=True),
           "trus_latent": torch.log_softmax(torch.randn(b, 4, generator=g), 1),
           "mri_latent": torch.log_softmax(torch.randn(b, 4, generator=g), 1)}
    batch = {"labels": torch.randint(0, 3, (b, h, h), generator=g),
             "label_maps": (torch.rand(b, 2, h, h, generator=g) > 0.5).float(),
             "theta": torch.randn(b, 2, 3, generator=g)}
    w = LossWeights()
    full = joint_loss(out, batch, w)
    first = {k: v[:2] for k, v in out.items()}
    first_batch = {k: v[:2] for k, v in batch.items()}
    masked = joint_loss(out, {**batch, "reg_mask": torch.tensor([True, True, False, False])}, w)
    assert torch.isclose(masked["seg"], full["seg"])
    for name in ("reg", "transform", "kl"):
        assert torch.isclose(masked[name], joint_loss(first, first_batch, w)[name])
        assert not torch.isclose(masked[name], full[name])
    none = joint_loss(out, {**batch, "reg_mask": torch.zeros(b, dtype=torch.bool)}, w)
    assert none["reg"] == 0 and none["transform"] == 0 and none["kl"] == 0
    assert torch.isclose(none["total"], full["seg"])
    none["total"].backward()  # still a graph: the step runs
    assert out["logits"].grad is not None
