"""LabelFusionEngine against analytic cases: vote, JLF, STAPLE (SimNet: test_simnet.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regseg.engines.label_fusion import LabelFusionEngine, jlf_mind_weights, jlf_weights
from regseg.errors import InputError

SHAPE = (12, 12, 12)


def _truth() -> np.ndarray:
    t = np.zeros(SHAPE, np.int64)
    t[3:9, 3:9, 3:9] = 1
    t[5:7, 5:7, 5:7] = 2
    return t


def _onehot(labels: np.ndarray, c: int = 3) -> np.ndarray:
    return np.eye(c, dtype=np.float32)[labels].transpose(3, 0, 1, 2)


def _image(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (labels * 0.4 + 0.05 * rng.standard_normal(labels.shape)).astype(np.float32)


def _dice(a: np.ndarray, b: np.ndarray, k: int = 1) -> float:
    a, b = a >= k, b >= k
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("method", ["vote", "jlf", "staple"])
def test_identical_atlases_give_their_label(method):
    rng = np.random.default_rng(0)
    truth = _truth()
    image = _image(truth, rng)
    out = LabelFusionEngine(method)(image, np.stack([image] * 4), np.stack([_onehot(truth)] * 4))
    assert np.array_equal(out.labels, truth)
    assert out.contested_fraction == 0.0
    np.testing.assert_allclose(out.probabilities.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.atlas_weights.sum(), 1.0, atol=1e-6)


@pytest.mark.parametrize("method", ["vote", "jlf", "staple"])
def test_one_corrupted_atlas_is_outvoted(method):
    rng = np.random.default_rng(1)
    truth = _truth()
    bad = np.roll(truth, 3, axis=0)  # one atlas 3 voxels off
    labels = [truth, truth, truth, bad]
    images = np.stack([_image(a, rng) for a in labels])
    out = LabelFusionEngine(method)(_image(truth, rng), images, np.stack([_onehot(a)
                                                                          for a in labels]))
    assert _dice(out.labels, truth) > 0.98
    assert _dice(bad, truth) < 0.8  # the test can fail: the bad atlas alone is far off
    if method != "vote":  # JLF and STAPLE also say which atlas is the bad one
        assert out.atlas_weights.argmin() == 3


@pytest.mark.parametrize("features", ["mind", "intensity"])
def test_jlf_downweights_the_atlas_whose_image_disagrees(features):
    """Two atlases tie on the labels; JLF must pick the one whose image matches the target."""
    rng = np.random.default_rng(2)
    truth = _truth()
    wrong = np.roll(truth, 2, axis=1)
    target = _image(truth, rng)
    images = np.stack([_image(truth, rng), _image(wrong, rng)])
    onehot = np.stack([_onehot(truth), _onehot(wrong)])
    fused = LabelFusionEngine("jlf", jlf_features=features)(target, images, onehot)
    assert fused.atlas_weights[0] > 0.7 > fused.atlas_weights[1]
    assert _dice(fused.labels, truth) > 0.97
    vote = LabelFusionEngine("vote")(target, images, onehot)  # a tie: no image, no answer
    assert _dice(vote.labels, truth) < _dice(fused.labels, truth)


@pytest.mark.parametrize("solve", [jlf_weights, jlf_mind_weights])
def test_jlf_weights_sum_to_one_per_voxel(solve):
    rng = np.random.default_rng(3)
    target = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32))
    images = torch.from_numpy(rng.standard_normal((5, *SHAPE)).astype(np.float32))
    where = torch.from_numpy(rng.random(SHAPE) < 0.3)
    w = solve(target, images, where, radius=1)
    torch.testing.assert_close(w.sum(0), torch.ones(SHAPE), atol=1e-4, rtol=0)
    assert torch.allclose(w[:, ~where], torch.full_like(w[:, ~where], 0.2))
    assert not torch.allclose(w[:, where], torch.full_like(w[:, where], 0.2))


def test_mind_jlf_trusts_structure_not_intensity():
    """Cross-modality: the right atlas shows the target's anatomy in inverted contrast (another
    modality), the wrong one shows a shifted anatomy in the target's own contrast. The labels
    tie; intensity JLF follows the intensities to the wrong atlas, MIND JLF follows the
    structure to the right one."""
    rng = np.random.default_rng(5)
    truth = np.zeros((16, 16, 16), np.int64)
    truth[4:12, 4:12, 4:12] = 1
    wrong = np.roll(truth, 3, axis=2)

    def img(labels, contrast):
        return (contrast * labels + 0.05 * rng.standard_normal(labels.shape)).astype(np.float32)

    target = img(truth, 1.0)
    images = np.stack([img(truth, -1.0), img(wrong, 1.0)])  # right (inverted), wrong (same)
    onehot = np.stack([_onehot(truth, 2), _onehot(wrong, 2)])
    mind = LabelFusionEngine("jlf", jlf_features="mind")(target, images, onehot)
    inten = LabelFusionEngine("jlf", jlf_features="intensity")(target, images, onehot)
    assert mind.atlas_weights[0] > 0.6 > mind.atlas_weights[1]
    assert inten.atlas_weights[1] > inten.atlas_weights[0]  # the failure MIND fixes
    assert _dice(mind.labels, truth) > 0.95
    assert _dice(inten.labels, truth) < _dice(mind.labels, truth) - 0.05
    assert mind.info["jlf_features"] == "mind" and "mind_dilation" in mind.info


@pytest.mark.parametrize("radius", [1, 3])
def test_separable_box_mean_is_the_3d_box_mean(radius):
    import torch.nn.functional as F

    from regseg.engines.jlf import box_mean

    x = torch.from_numpy(np.random.default_rng(6).random((9, 11, 13)).astype(np.float32))
    full = F.avg_pool3d(x[None, None], 2 * radius + 1, stride=1, padding=radius,
                        count_include_pad=False)[0, 0]
    torch.testing.assert_close(box_mean(x, radius), full, atol=1e-5, rtol=0)


def test_bad_shapes_are_clear_errors():
    engine = LabelFusionEngine("vote")
    with pytest.raises(InputError, match="on the target grid"):
        engine(np.zeros(SHAPE), np.zeros((2, 4, 4, 4)), np.zeros((2, 3, *SHAPE)))
    with pytest.raises(InputError, match="choose one of"):
        LabelFusionEngine("best")
    with pytest.raises(InputError, match="JLF features 'sift'"):
        LabelFusionEngine("jlf", jlf_features="sift")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("solve", [jlf_weights, jlf_mind_weights])
def test_jlf_cuda_matches_cpu(solve):
    rng = np.random.default_rng(4)
    target = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32))
    images = torch.from_numpy(rng.standard_normal((4, *SHAPE)).astype(np.float32))
    where = torch.from_numpy(rng.random(SHAPE) < 0.3)
    cpu = solve(target, images, where)
    gpu = solve(target.cuda(), images.cuda(), where.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)
