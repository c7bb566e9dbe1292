"""Micro-batching across sessions: same outputs as one call each, padded static sizes, and no
session held up by another's slowness or bad input."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from regseg.errors import EngineError
from regseg.stream.serve.batcher import BatchedEngine, EngineBatcher

SIZE = 16


class FakeEngine:
    """An Engine of batch ``b`` (named tensors in and out): theta and logits computed per sample
    from its inputs; records the batch sizes it was called with. ``fail`` makes it raise."""

    backend, precision, info = "fake", "fp32", {}

    def __init__(self, batch: int, delay_s: float = 0.0) -> None:
        self.batch, self.device = batch, torch.device("cpu")
        self.input_shapes = {"trus": (batch, 1, SIZE, SIZE), "mri": (batch, 1, SIZE, SIZE),
                             "mri_labels": (batch, 2, SIZE, SIZE)}
        self.delay_s, self.fail, self.calls = delay_s, False, []

    def __call__(self, inputs):
        trus, mri, mri_labels = inputs["trus"], inputs["mri"], inputs["mri_labels"]
        assert trus.shape[0] == self.batch
        self.calls.append(trus.shape[0])
        if self.fail:
            raise RuntimeError("engine broke")
        time.sleep(self.delay_s)
        s = (trus + 2 * mri).mean((1, 2, 3)) + mri_labels.sum((1, 2, 3))
        return {"theta": s[:, None, None].expand(-1, 2, 3).clone(),
                "logits": torch.cat([trus, mri, mri_labels[:, :1]], 1) * 3}


class Client:
    """A session's view of the batcher (as BatchedEngine, without a FusionEngine template)."""

    def __init__(self, batcher: EngineBatcher) -> None:
        batcher.client()
        self.batcher = batcher

    def __call__(self, trus, mri, mri_labels):
        return self.batcher.run({"trus": trus, "mri": mri, "mri_labels": mri_labels})

    def release(self) -> None:
        self.batcher.release()


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 1, SIZE, SIZE, generator=g), torch.rand(1, 1, SIZE, SIZE, generator=g),
            torch.rand(1, 2, SIZE, SIZE, generator=g))


def as_dict(t):
    return {"trus": t[0], "mri": t[1], "mri_labels": t[2]}


def run_parallel(engines, n: int) -> dict[int, dict]:
    out: dict[int, dict] = {}

    def one(k):
        out[k] = engines[k](*inputs(k))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_batched_outputs_equal_one_call_each_and_padding():
    engines = {b: FakeEngine(b) for b in (1, 2, 4)}
    batcher = EngineBatcher(engines, window_ms=2000, name="test")
    clients = [Client(batcher) for _ in range(3)]
    try:
        out = run_parallel(clients, 3)
        ref = FakeEngine(1)
        for k in range(3):
            expected = ref(as_dict(inputs(k)))
            for name in ("theta", "logits"):
                assert out[k][name].shape[0] == 1
                torch.testing.assert_close(out[k][name], expected[name])
        # all three waited for one another (window) and went as one padded batch of 4
        assert engines[4].calls == [4] and not engines[1].calls and not engines[2].calls
        assert batcher.stats()["padded"] == 1 and batcher.stats()["mean_batch"] == 3.0
    finally:
        batcher.close()


def test_real_engine_batched_matches_unbatched():
    """AlignSegNet (eager, a tiny one) at batch 2 through the batcher = two batch-1 calls."""
    from regseg.engines.fusion import FusionEngine
    from regseg.models.alignsegnet import AlignSegNet, AlignSegNetConfig

    torch.manual_seed(0)
    model = AlignSegNet(AlignSegNetConfig(size=32, enc_channels=8, patch=4, embed_dim=16,
                                          depth=1, heads=2, unet_channels=(8, 16),
                                          latent_dim=8, readout_dim=2)).eval()
    fusion = {b: FusionEngine(model=model, batch=b, backend="eager") for b in (1, 2)}
    size = fusion[1].size
    batcher = EngineBatcher({b: f.engine for b, f in fusion.items()}, window_ms=2000,
                            name="test")
    clients = [BatchedEngine(batcher, fusion[1]) for _ in range(2)]
    assert clients[0].size == size and clients[0].info["batched"]["sizes"] == [1, 2]

    def real_inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(1, 1, *size, generator=g), torch.rand(1, 1, *size, generator=g),
                (torch.rand(1, 2, *size, generator=g) > 0.7).float())

    out: dict[int, dict] = {}

    def one(k):
        out[k] = clients[k](*real_inputs(k))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert batcher.stats()["calls_by_size"] == {"1": 0, "2": 1}
        for k in range(2):
            expected = {n: v.clone() for n, v in fusion[1](*real_inputs(k)).items()}
            for name in ("theta", "logits"):
                torch.testing.assert_close(out[k][name], expected[name], atol=1e-4, rtol=1e-4)
    finally:
        batcher.close()


def test_bad_input_refused_in_its_own_thread():
    batcher = EngineBatcher({1: FakeEngine(1), 2: FakeEngine(2)}, window_ms=1, name="test")
    client = Client(batcher)
    try:
        with pytest.raises(EngineError, match=r"input trus of shape \(1, 1, 8, 8\); "
                           r"\(1, 1, 16, 16\) expected"):
            client(torch.zeros(1, 1, 8, 8), *inputs(0)[1:])
        with pytest.raises(EngineError, match=r"input mri of shape None"):
            batcher.run({"trus": inputs(0)[0]})
        assert client(*inputs(1))["theta"].shape == (1, 2, 3)  # still serving
        assert batcher.calls == 1
    finally:
        batcher.close()


def test_engine_error_costs_that_batch_only():
    engines = {1: FakeEngine(1)}
    batcher = EngineBatcher(engines, window_ms=0, name="test")
    client = Client(batcher)
    try:
        engines[1].fail = True
        with pytest.raises(EngineError, match="batch call failed: engine broke"):
            client(*inputs(0))
        engines[1].fail = False
        assert client(*inputs(0))["theta"].shape == (1, 2, 3)
    finally:
        batcher.close()


def test_idle_or_stalled_session_does_not_hold_a_batch():
    """Four sessions registered, one sends: its call waits the window (20 ms) at most."""
    batcher = EngineBatcher({1: FakeEngine(1), 4: FakeEngine(4)}, window_ms=20, name="test")
    clients = [Client(batcher) for _ in range(4)]
    try:
        t0 = time.monotonic()
        clients[0](*inputs(0))
        assert time.monotonic() - t0 < 0.5
        for c in clients[1:]:
            c.release()  # sessions gone: no waiting at all any more
        t0 = time.monotonic()
        for _ in range(5):
            clients[0](*inputs(0))
        assert time.monotonic() - t0 < 0.5
    finally:
        batcher.close()


def test_slow_session_host_work_does_not_slow_the_others():
    """Session 0 spends 0.3 s on its own work between frames; session 1 goes on meanwhile."""
    batcher = EngineBatcher({1: FakeEngine(1), 2: FakeEngine(2)}, window_ms=5, name="test")
    slow, fast = Client(batcher), Client(batcher)
    done = {"fast": 0}
    stop = threading.Event()

    def slow_loop():
        while not stop.is_set():
            slow(*inputs(0))
            stop.wait(0.3)

    def fast_loop():
        while not stop.is_set():
            fast(*inputs(1))
            done["fast"] += 1

    threads = [threading.Thread(target=f) for f in (slow_loop, fast_loop)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.6)
        stop.set()
        for t in threads:
            t.join(5)
        # each fast call waits the 5 ms window at most: far more than the 2-3 slow frames
        assert done["fast"] >= 20, done
    finally:
        batcher.close()


def test_closed_batcher_refuses():
    batcher = EngineBatcher({1: FakeEngine(1)}, name="test")
    client = Client(batcher)
    batcher.close()
    with pytest.raises(EngineError, match="closed"):
        client(*inputs(0))
    with pytest.raises(EngineError, match="batch size 1 is needed"):
        EngineBatcher({2: FakeEngine(2)}, name="x")


def test_deformable_stages_of_two_sessions_batched_match_their_own_stage():
    """Two sessions' deformable stages share one batched PLCReg (eager, batch 2): each gets what
    a stage of its own computes."""
    import numpy as np

    from regseg.sim.phantom import make_phantom
    from regseg.sim.scanner import SimulatedScanner
    from regseg.stream.build import build_deformable
    from regseg.stream.context import build_context
    from regseg.stream.serve.session import SharedEngines

    phantom = make_phantom(0)
    context = build_context(phantom.mri, phantom.labels, torch.device("cpu"))
    frames = [SimulatedScanner(phantom, seed=0).frame(i) for i in (0, 5)]
    planes = [f.truth.image_to_mri for f in frames]
    shared = SharedEngines({"backend": "eager", "device": torch.device("cpu")}, (1, 2),
                           window_ms=2000)
    try:
        stages = [shared.deformable(context), shared.deformable(context)]
        out: dict[int, tuple] = {}

        def one(k):
            out[k] = stages[k](frames[k].pixels, planes[k])

        threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert shared.stats()["deformable"]["calls_by_size"] == {"1": 0, "2": 1}
        own = build_deformable(context, backend="eager")
        for k in range(2):
            labels, ddf = own(frames[k].pixels, planes[k])
            np.testing.assert_allclose(out[k][1], ddf, atol=1e-3)
            assert np.mean(out[k][0] != labels) < 1e-3  # nearest labels: a few edge pixels
    finally:
        shared.close()
