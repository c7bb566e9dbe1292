"""WarpSeg network, hierarchical loss and checkpoint: properties that fail if the maths breaks."""

import dataclasses

import pytest
import torch

from regseg.errors import EngineError
from regseg.models.checkpoint import save_checkpoint
from regseg.models.registry import load_model
from regseg.models.warpseg import (
    WarpSeg,
    WarpSegConfig,
    group_logits,
    group_logsumexp,
    one_hot_dice_loss,
    predict_labels,
    set_cross_entropy,
    soft_dice_loss,
    warpseg_loss,
)

SMALL = WarpSegConfig(size=(8, 8, 16), channels=(4, 8))


def test_group_logits_softmax_is_the_sum_of_fine_probabilities():
    z = torch.randn(2, 4, 3, 3, 3)
    groups = (0, 1, 1, 1)
    coarse_p = torch.softmax(group_logits(z, groups), 1)
    fine_p = torch.softmax(z, 1)
    assert torch.allclose(coarse_p[:, 0], fine_p[:, 0], atol=1e-6)
    assert torch.allclose(coarse_p[:, 1], fine_p[:, 1:].sum(1), atol=1e-6)


def test_the_training_loss_fast_paths_give_the_same_values_and_gradients():
    """group_logsumexp (whole-tensor) equals group_logits (one copy per group), with spread-out
    logits that would underflow a shift by the global maximum; one_hot_dice_loss equals
    soft_dice_loss against the one-hot target; and the one-hot CE path equals the masked one."""
    torch.manual_seed(4)
    groups = (0, 1, 1, 2, 2, 2, 3)
    z = (torch.randn(2, 7, 3, 4, 5) * 40).requires_grad_(True)  # differences far beyond exp's range
    z2 = z.detach().clone().requires_grad_(True)
    slow, fast = group_logits(z, groups), group_logsumexp(z2, groups)
    assert torch.isfinite(fast).all()
    assert torch.allclose(slow, fast, atol=1e-4, rtol=1e-5)
    w = torch.randn_like(slow)
    (slow * w).sum().backward()
    (fast * w).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-5)

    labels = torch.randint(0, 7, (2, 3, 4, 5))
    p = torch.softmax(torch.randn(2, 7, 3, 4, 5), 1).requires_grad_(True)
    p2 = p.detach().clone().requires_grad_(True)
    onehot = torch.nn.functional.one_hot(labels, 7).movedim(-1, 1)
    a, b = soft_dice_loss(p, onehot.float()), one_hot_dice_loss(p2, labels)
    assert torch.allclose(a, b, atol=1e-6)
    a.sum().backward()
    b.sum().backward()
    assert torch.allclose(p.grad, p2.grad, atol=1e-6)

    logits = torch.randn(2, 7, 3, 4, 5)
    masked = logits.masked_fill(~onehot.bool(), float("-inf"))
    reference = (torch.logsumexp(logits, 1) - torch.logsumexp(masked, 1)).flatten(1).mean(1)
    assert torch.allclose(set_cross_entropy(logits, onehot.bool()), reference, atol=1e-5)


def test_set_cross_entropy_is_ce_for_one_class_and_marginal_for_sets():
    z = torch.randn(1, 4, 2, 2, 2)
    target = torch.randint(0, 4, (1, 2, 2, 2))
    onehot = torch.nn.functional.one_hot(target, 4).movedim(-1, 1).bool()
    assert torch.allclose(set_cross_entropy(z, onehot)[0],
                          torch.nn.functional.cross_entropy(z, target), atol=1e-5)
    every = torch.ones_like(onehot)
    assert float(set_cross_entropy(z, every)[0]) == pytest.approx(0.0, abs=1e-6)
    sets = onehot.clone()
    sets[:, 3] = True  # allowing one more class can only lower the loss
    assert float(set_cross_entropy(z, sets)[0]) < float(set_cross_entropy(z, onehot)[0])


def test_coarse_only_volume_still_trains_the_fine_decoder():
    """A volume with only coarse labels (fine sets = whole groups, not exact) gives the fine
    decoder a gradient through the hierarchical terms."""
    torch.manual_seed(0)
    model = WarpSeg(SMALL)
    x = torch.rand(1, 1, *SMALL.size)
    coarse = torch.zeros(1, *SMALL.size, dtype=torch.long)
    coarse[..., 2:6, 2:6, 4:12] = 1
    groups = torch.tensor(SMALL.fine_groups)
    sets = (groups.view(1, -1, 1, 1, 1) == coarse[:, None])
    loss, parts = warpseg_loss(model(x), coarse, sets, torch.tensor([False]), torch.ones(1),
                               SMALL)
    assert float(parts["fine_dice"].detach()) == 0.0 and float(parts["hier_ce"].detach()) > 0
    loss.backward()
    grad = model.fine.head.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_training_fits_a_toy_volume_and_labels_are_hierarchical():
    torch.manual_seed(0)
    model = WarpSeg(SMALL)
    x = torch.zeros(1, 1, *SMALL.size)
    fine = torch.zeros(1, *SMALL.size, dtype=torch.long)
    fine[..., 1:7, 1:7, 2:8] = 1
    fine[..., 1:7, 1:7, 8:14] = 2
    fine[..., 3:5, 3:5, 5:7] = 3
    x[0, 0] = fine[0].float() / 3
    sets = torch.nn.functional.one_hot(fine, 4).movedim(-1, 1).bool()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss, _ = warpseg_loss(model(x), (fine > 0).long(), sets, torch.tensor([True]),
                               torch.ones(1), SMALL)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        coarse_l, fine_l = predict_labels(model(x), SMALL)
    assert float((coarse_l == (fine > 0)).float().mean()) > 0.95
    # hierarchy: a fine class is never outside its coarse group
    groups = torch.tensor(SMALL.fine_groups)
    assert torch.equal(groups[fine_l], coarse_l)


def test_single_decoder_has_no_coarse_decoder_and_derives_coarse():
    cfg = dataclasses.replace(SMALL, single_decoder=True)
    model = WarpSeg(cfg)
    assert model.coarse is None
    out = model(torch.rand(1, 1, *cfg.size))
    assert torch.allclose(torch.softmax(out["coarse"], 1)[:, 1],
                          torch.softmax(out["fine"], 1)[:, 1:].sum(1), atol=1e-5)


def test_config_rejects_bad_sizes_and_groups():
    with pytest.raises(ValueError, match="divisible"):
        WarpSegConfig(size=(9, 8, 16), channels=(4, 8))
    with pytest.raises(ValueError, match="fine_groups"):
        WarpSegConfig(fine_groups=(0, 2, 2, 2))


def test_checkpoint_round_trip_is_strict(tmp_path):
    model = WarpSeg(SMALL)
    path = save_checkpoint(tmp_path / "w.pt", "warpseg", model, SMALL)
    loaded = load_model(path)
    assert loaded.config == SMALL
    x = torch.rand(1, 1, *SMALL.size)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)["fine"], loaded(x)["fine"])
    bad = WarpSeg(dataclasses.replace(SMALL, single_decoder=True))
    save_checkpoint(tmp_path / "bad.pt", "warpseg", bad, SMALL)  # weights of another shape
    with pytest.raises(EngineError, match="do not fit"):
        load_model(tmp_path / "bad.pt")
