"""Training under torchrun: 2 CPU ranks match one process with the same global batch; a killed
run resumes where it stopped; the rank helpers fail clearly.

What "match" means, as measured here: every rank draws the same global batch (the generator,
batch order and cursor end identical); PLCReg 3-D (InstanceNorm, the loss a mean of per-pair
losses) has the same gradients to float rounding, so each step's loss agrees to 1e-5; AlignSegNet
has BatchNorm and batch-pooled Dice, which torch cannot synchronise across CPU ranks, so its
losses agree only closely (per-rank batch statistics).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from regseg import distributed
from regseg.errors import InputError
from regseg.train.plcreg_mni import _pair_losses, mni_pool, true_pair_ddf
from regseg.train.plcreg_recipe import Weights

WORKER = Path(__file__).parent / "dist_worker.py"
ROOT = Path(__file__).parents[2]
STEPS = 2


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def _in_process(out: Path, *args: str) -> None:
    """The worker run in this process (one rank; saves a Python start on a 2-core CI)."""
    sys.path.insert(0, str(WORKER.parent))
    import dist_worker

    threads = torch.get_num_threads()
    try:
        assert dist_worker.main([str(out), *args]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The tiny recipes trained by one process and by 2 torchrun ranks, STEPS steps each."""
    root = tmp_path_factory.mktemp("dist")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2"]
    two = subprocess.Popen([*torchrun, str(WORKER), str(root / "two"), "--steps", str(STEPS)],
                           env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    _in_process(root / "one", "--steps", str(STEPS))
    out_two, _ = two.communicate(timeout=600)
    assert two.returncode == 0, out_two
    return root


@pytest.mark.slow
def test_two_ranks_draw_the_single_process_global_batch(runs):
    for recipe in ("alignsegnet", "ascseg", "plcreg2d", "plcreg3d"):
        one = _state(runs / "one" / recipe / f"{recipe}.state.pt")
        two = _state(runs / "two" / recipe / f"{recipe}.state.pt")
        assert one["step"] == two["step"] == STEPS
        assert torch.equal(one["generator"], two["generator"]), recipe
        assert len(one["extra"]["history"]) == len(two["extra"]["history"]) == STEPS
    for recipe in ("alignsegnet", "ascseg"):
        one = _state(runs / "one" / recipe / f"{recipe}.state.pt")["extra"]
        two = _state(runs / "two" / recipe / f"{recipe}.state.pt")["extra"]
        assert torch.equal(one["order"], two["order"]) and one["cursor"] == two["cursor"]


@pytest.mark.parametrize("recipe", ["plcreg2d", "plcreg3d"])
def test_plcreg_on_two_ranks_matches_one_process(runs, recipe):
    one = _state(runs / "one" / recipe / f"{recipe}.state.pt")
    two = _state(runs / "two" / recipe / f"{recipe}.state.pt")
    assert len(one["extra"]["history"]) == STEPS
    for a, b in zip(one["extra"]["history"], two["extra"]["history"], strict=True):
        for key in a:  # step 2's loss is after step 1's update
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a, b)


def test_alignsegnet_on_two_ranks_is_close_to_one_process(runs):
    one = _state(runs / "one" / "alignsegnet" / "alignsegnet.state.pt")["extra"]["history"]
    two = _state(runs / "two" / "alignsegnet" / "alignsegnet.state.pt")["extra"]["history"]
    # BatchNorm statistics and the pooled Dice are per rank on CPU: close, not equal
    for a, b in zip(one, two, strict=True):
        assert b["total"] == pytest.approx(a["total"], rel=0.05)


def test_ascseg_on_two_ranks_is_close_to_one_process(runs):
    """The same per-rank BatchNorm and pooled Dice as AlignSegNet: close, not equal; the first
    step (the same initial weights) shows the sharding alone."""
    one = _state(runs / "one" / "ascseg" / "ascseg.state.pt")["extra"]
    two = _state(runs / "two" / "ascseg" / "ascseg.state.pt")["extra"]
    assert len(one["history"]) == len(two["history"]) == STEPS
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b == pytest.approx(a, rel=0.1)


def test_rank_zero_alone_writes(runs):
    for recipe, files in (("alignsegnet", ("alignsegnet.pt", "alignsegnet.json",
                                           "alignsegnet_training.png")),
                          ("plcreg2d", ("plcreg2d.pt", "plcreg2d.json", "plcreg2d_training.png")),
                          ("plcreg3d", ("plcreg3d.pt", "plcreg3d.json", "plcreg3d_training.png"))):
        written = sorted(p.name for p in (runs / "two" / recipe).iterdir())
        assert written == sorted([*files, f"{recipe}.state.pt"])
    import json

    for recipe in ("plcreg2d", "plcreg3d"):
        summary = json.loads((runs / "two" / recipe / f"{recipe}.json").read_text())
        assert summary["ranks"] == 2 and summary["batch_size"] == 2 and summary["steps"] == STEPS


def test_pair_losses_split_over_ranks_give_the_batch_gradient():
    """DDP averages the ranks' gradients: that is the batch's gradient when the batch loss is
    the mean of per-pair losses (PLCReg 3-D), to float rounding."""
    from regseg.models.plcreg import PLCReg
    from regseg.sim import mni

    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import TINY_3D

    torch.manual_seed(0)
    images, maps, fields = mni_pool(mni.load_base(mni.MniConfig(shape=(16, 16, 16))), 4, 0)
    model = PLCReg(TINY_3D).train()
    weights = Weights(dice=0.5, smooth=0.05, epe=0.1)

    def grad(pairs):
        model.zero_grad()
        i, j = [a for a, _ in pairs], [b for _, b in pairs]
        out = model(images[i].float(), images[j].float())
        true = torch.cat([true_pair_ddf(fields[a : a + 1], fields[b : b + 1]) for a, b in pairs])
        loss, _ = _pair_losses(out, maps[i].float(), maps[j].float(), images[j].float(), true,
                               weights)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    batch = grad([(0, 1), (2, 3)])
    ranks = (grad([(0, 1)]) + grad([(2, 3)])) / 2
    assert float((batch - ranks).norm() / batch.norm()) < 1e-5


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL mid-run (after a state was written), then --resume: the same final weights as a
    run that was never stopped (one process, one thread: bit-identical)."""
    steps = 6
    cmd = [sys.executable, str(WORKER), "--steps", str(steps), "--recipes", "alignsegnet"]
    killed = subprocess.Popen([*cmd[:2], str(tmp_path / "killed"), *cmd[2:]], env=_env(),
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / "killed" / "alignsegnet" / "alignsegnet.state.pt"
    deadline = time.monotonic() + 300
    while not state.is_file() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    _in_process(tmp_path / "straight", *cmd[2:])  # the run never stopped, meanwhile
    stopped_at = _state(state)["step"]
    assert stopped_at < steps, "the run finished before it was killed; the test proves nothing"
    assert not (tmp_path / "killed" / "alignsegnet" / "alignsegnet.pt").exists()
    resumed = subprocess.run([*cmd[:2], str(tmp_path / "killed"), *cmd[2:], "--resume"],
                             env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {state} at step {stopped_at}" in resumed.stdout
    a = _state(tmp_path / "straight" / "alignsegnet" / "alignsegnet.state.pt")
    b = _state(state)
    assert a["step"] == b["step"] == steps
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_plcreg3d_resumes_after_a_crash_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """The 3-D recipe stopped by an error after its step-2 state, then resumed: the same
    weights and loss history as a run never stopped."""
    from regseg.train import plcreg_mni

    _in_process(tmp_path / "straight", "--steps", "4", "--recipes", "plcreg3d")
    real_step = plcreg_mni.take_step

    def crash_at_3(*args, **kwargs):
        if len(args[3]) == 2:  # history holds 2 steps: the state after step 2 is written
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(plcreg_mni, "take_step", crash_at_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _in_process(tmp_path / "crashed", "--steps", "4", "--recipes", "plcreg3d")
    monkeypatch.setattr(plcreg_mni, "take_step", real_step)
    _in_process(tmp_path / "crashed", "--steps", "4", "--recipes", "plcreg3d", "--resume")
    a = _state(tmp_path / "straight" / "plcreg3d" / "plcreg3d.state.pt")
    b = _state(tmp_path / "crashed" / "plcreg3d" / "plcreg3d.state.pt")
    assert a["step"] == b["step"] == 4 and a["extra"]["history"] == b["extra"]["history"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_resume_refuses_a_missing_or_foreign_state(tmp_path):
    from regseg.train.resume import load_state, save_state

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    gen = torch.Generator()
    with pytest.raises(InputError, match="nothing to resume"):
        load_state(tmp_path / "x.state.pt", model=model, optimiser=opt, generator=gen,
                   run_key={"seed": 0})
    save_state(tmp_path / "x.state.pt", model=model, optimiser=opt, step=3, generator=gen,
               extra={}, run_key={"seed": 0})
    with pytest.raises(InputError, match="other settings"):
        load_state(tmp_path / "x.state.pt", model=model, optimiser=opt, generator=gen,
                   run_key={"seed": 1})
    assert load_state(tmp_path / "x.state.pt", model=model, optimiser=opt, generator=gen,
                      run_key={"seed": 0})[0] == 3


class _Payload:
    """Unpickling this would call ``os.system``: a state file that carries code."""

    def __reduce__(self):
        return os.system, ("touch " + str(_Payload.marker),)


def test_resume_refuses_a_state_that_carries_code(tmp_path):
    """A --resume file whose pickle would run code is refused (weights_only) and never runs it;
    a file that is a tensor, not a state, is refused too."""
    from regseg.train.resume import load_state

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    _Payload.marker = tmp_path / "ran"
    torch.save({"version": 1, "step": 1, "run_key": {"seed": 0}, "extra": _Payload()},
               tmp_path / "x.state.pt")
    with pytest.raises(InputError, match=r"x\.state\.pt is not a readable training state"):
        load_state(tmp_path / "x.state.pt", model=model, optimiser=opt,
                   generator=torch.Generator(), run_key={"seed": 0})
    assert not _Payload.marker.exists()
    torch.save(torch.zeros(2), tmp_path / "t.state.pt")
    with pytest.raises(InputError, match="holds a Tensor, not a training state"):
        load_state(tmp_path / "t.state.pt", model=model, optimiser=opt,
                   generator=torch.Generator(), run_key={"seed": 0})


def test_rank_helpers_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    try:
        dist = distributed.init(threads=1)
        assert (dist.rank, dist.world, dist.main, dist.active) == (0, 1, True, False)
        assert dist.shard(5) == slice(0, 5) and dist.from_main(0.25) == 0.25
        assert dist.mean({"a": 1.5}) == {"a": 1.5} and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(InputError, match="--batch-size 5.*multiple of 2"):
        distributed.Dist(rank=1, world=2).shard(5)
    assert distributed.Dist(rank=1, world=2).shard(6) == slice(3, 6)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(InputError, match="WORLD_SIZE='two'"):
        distributed.init()


def test_threads_per_rank_never_oversubscribe(monkeypatch):
    monkeypatch.setattr(distributed, "_cpus", lambda: 2)
    assert distributed.threads_per_rank(2, 2) == 1  # 2 ranks on 2 cores: one thread each
    assert distributed.threads_per_rank(None, 1) == 2
    assert distributed.threads_per_rank(1, 1) == 1
    monkeypatch.setattr(distributed, "_cpus", lambda: 16)
    assert distributed.threads_per_rank(None, 4) == 4 and distributed.threads_per_rank(2, 4) == 2


def test_recipes_that_do_not_shard_are_refused_under_torchrun(monkeypatch, capsys):
    from regseg.train.__main__ import main as train_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_main(["quality", "--out", "x"]) == 2
    assert "quality does not run under torchrun yet" in capsys.readouterr().err


def test_every_training_recipe_runs_under_torchrun():
    """A new `regseg train` recipe must shard its batch (train/distributed.py) and be declared;
    only the calibration pass and the intensity reference, which train nothing, run as one
    process."""
    from regseg.cli import TRAIN_MODELS
    from regseg.train.__main__ import DISTRIBUTED

    assert set(TRAIN_MODELS) - set(DISTRIBUTED) == {"quality-calibration", "intensity-reference"}
    assert set(DISTRIBUTED) <= set(TRAIN_MODELS)
