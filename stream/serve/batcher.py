"""Micro-batching: the frames that several sessions have ready go through ONE engine call.

Each session's Pipeline keeps its own MRI context, capture state and host stages; only the engine
calls are shared. A session's :class:`BatchedEngine` looks like a FusionEngine of batch 1 to its
Pipeline (``size``, ``device``, ``__call__(trus, mri, mri_labels)``), and its deformable stage's
:class:`BatchedRegistration` like a RegistrationEngine (``predict(moving, fixed)``). Behind each,
an :class:`EngineBatcher` thread takes the requests that are waiting, pads them to the smallest
static batch size that holds them (engines are built once per size, so ONNX Runtime, compiled
graphs and CUDA graphs keep fixed shapes), runs one call and hands each session its slice.

A batch forms from what is ready: after the first request, the batcher waits at most
``window_ms`` for the other registered sessions' requests (not at all once all of them have
asked). A session that is slow, stalled or gone is simply not in the batch: it never holds up the
others. A request whose inputs do not fit is refused in its own session's thread, before it can
reach a batch; an engine error costs the frames of that one batch (each session counts its own).

On CUDA the hand-over between a session's stream and the batcher's is by CUDA events (the batch
waits for each request's inputs, each session for its outputs), never a host sync. Not measured
here (no GPU on this machine); a chain captured whole as one CUDA graph (``--cuda-graph``) cannot
call across threads, so regseg-serve never captures it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from regseg.clock import now_ns
from regseg.errors import EngineError
from regseg.stream.stats import Series


@dataclass
class _Request:
    inputs: dict[str, Tensor]
    done: threading.Event = field(default_factory=threading.Event)
    outputs: dict[str, Tensor] | None = None
    error: BaseException | None = None
    # CUDA: the inputs are ready on the caller's stream at ``ready``; the outputs on the
    # batcher's stream at ``finished`` (each side waits for the other's event, not the host)
    ready: Any = None
    finished: Any = None


def _event_on_current_stream(device: torch.device):
    """A CUDA event recorded on this thread's current stream (None off CUDA)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class EngineBatcher:
    """Runs queued batch-1 requests as padded batches through per-size engines, on one thread.

    Args:
        engines: batch size -> an Engine (regseg.engines.base: ``engine(inputs)``, named tensors
            in and out) whose ``input_shapes`` have that leading size. Size 1 must be there.
        window_ms: longest wait, after the first request, for the other sessions' requests.
        name: thread name (``batcher-full``, ``batcher-theta``, ``batcher-deformable``).
    """

    def __init__(self, engines: dict[int, Any], *, window_ms: float = 2.0,
                 name: str = "batcher") -> None:
        if 1 not in engines:
            raise EngineError(f"{name}: an engine for batch size 1 is needed; got "
                              f"{sorted(engines)}")
        self.engines = dict(sorted(engines.items()))
        self.sizes = tuple(self.engines)
        self.input_shapes = {k: tuple(v) for k, v in self.engines[1].input_shapes.items()}
        self.device = self.engines[1].device
        self.window_ns = int(window_ms * 1e6)
        self.name = name
        self.calls = 0
        self.frames = 0
        self.padded = 0
        self.batch_sizes = dict.fromkeys(self.sizes, 0)  # calls per static size
        self.call_ms = Series()
        self.clients = 0  # proxies made (sessions that may send)
        self._queue: list[_Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def client(self) -> None:
        """Count one more session that may send (a batch waits for its request)."""
        with self._cond:
            self.clients += 1

    def release(self) -> None:
        """One session left (its BatchedEngine is no longer used)."""
        with self._cond:
            self.clients = max(self.clients - 1, 0)
            self._cond.notify_all()

    def run(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Queue one request (batch 1) and wait for its outputs (its own tensors).

        Raises:
            EngineError: inputs of the wrong names or shapes (refused here, in the caller's
                thread), the batcher closed, or the batch's engine call raised (its message).
        """
        for name, expected in self.input_shapes.items():
            t = inputs.get(name)
            if t is None or tuple(t.shape) != expected:
                got = None if t is None else tuple(t.shape)
                raise EngineError(f"{self.name}: input {name} of shape {got}; {expected} "
                                  "expected")
        request = _Request(dict(inputs), ready=_event_on_current_stream(self.device))
        with self._cond:
            if self._closed:
                raise EngineError(f"{self.name}: closed")
            self._queue.append(request)
            self._cond.notify_all()
        request.done.wait()
        if request.error is not None:
            raise EngineError(f"{self.name}: batch call failed: {request.error}") from None
        if request.finished is not None:
            torch.cuda.current_stream(self.device).wait_event(request.finished)
        return request.outputs

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def stats(self) -> dict:
        return {"calls": self.calls, "frames": self.frames, "padded": self.padded,
                "sizes": list(self.sizes),
                "calls_by_size": {str(k): v for k, v in self.batch_sizes.items()},
                "mean_batch": round(self.frames / self.calls, 3) if self.calls else None,
                "call_ms": self.call_ms.percentiles()}

    # ------------------------------------------------------------------ the batcher thread
    def _take(self) -> list[_Request]:
        """The next batch: wait for a request, then up to ``window`` for the others."""
        largest = self.sizes[-1]
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed)
            if self._closed and not self._queue:
                return []
            due = now_ns() + self.window_ns
            while (len(self._queue) < min(self.clients, largest) and not self._closed
                   and (left := due - now_ns()) > 0):
                self._cond.wait(left / 1e9)
            batch, self._queue = self._queue[:largest], self._queue[largest:]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                outputs = self._call(batch)
            except BaseException as exc:  # noqa: BLE001 - goes to each waiting session
                for request in batch:
                    request.error = exc
                    request.done.set()
                continue
            for n, request in enumerate(batch):
                request.outputs = {k: v[n:n + 1].clone() for k, v in outputs.items()}
                request.finished = _event_on_current_stream(self.device)
                request.done.set()

    def _call(self, batch: list[_Request]) -> dict[str, Tensor]:
        n = len(batch)
        size = next(s for s in self.sizes if s >= n)
        pad = [batch[-1]] * (size - n)  # repeated inputs: every sample is computed on its own
        t0 = now_ns()
        for request in batch:
            if request.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(request.ready)
        with torch.inference_mode():
            if size == 1:
                inputs = batch[0].inputs
            else:
                inputs = {k: torch.cat([r.inputs[k] for r in batch + pad])
                          for k in self.input_shapes}
            outputs = self.engines[size](inputs)
        self.call_ms.add((now_ns() - t0) / 1e6)
        self.calls += 1
        self.frames += n
        self.padded += size - n
        self.batch_sizes[size] += 1
        return outputs


class BatchedEngine:
    """What one session's Pipeline sees: a FusionEngine of batch 1 that sends via the batcher.

    ``template``: the batch-1 FusionEngine (its size, device, backend and info are reported).
    """

    batch = 1

    def __init__(self, batcher: EngineBatcher, template: Any) -> None:
        batcher.client()
        self.batcher, self.template = batcher, template
        self.size, self.device = tuple(template.size), template.device
        self.backend, self.precision = template.backend, template.precision
        self.weights = getattr(template, "weights", "")

    @property
    def info(self) -> dict:
        return {**self.template.info, "batched": self.batcher.stats()}

    def __call__(self, trus: Tensor, mri: Tensor, mri_labels: Tensor) -> dict[str, Tensor]:
        return self.batcher.run({"trus": trus, "mri": mri, "mri_labels": mri_labels})

    def release(self) -> None:
        self.batcher.release()


class BatchedRegistration:
    """What one session's deformable stage sees: a RegistrationEngine whose ``predict`` sends
    via the batcher (``template``: the batch-1 RegistrationEngine)."""

    def __init__(self, batcher: EngineBatcher, template: Any) -> None:
        batcher.client()
        self.batcher, self.template = batcher, template
        self.config, self.size = template.config, template.size
        self.weights, self.device, self.backend = template.weights, template.device, \
            template.backend
        self.engine = template.engine  # for its info

    def predict(self, moving: Tensor, fixed: Tensor) -> dict[str, Tensor]:
        """``ddf`` and ``field`` (1, ndim, *size) of this request (already copies)."""
        out = self.batcher.run({"moving": moving, "fixed": fixed})
        return {"ddf": out["ddf"], "field": out["field"]}

    def release(self) -> None:
        self.batcher.release()


def build_batcher(make_engine: Callable[[int], Any], sizes: tuple[int, ...], *,
                  window_ms: float, name: str) -> EngineBatcher:
    """An EngineBatcher with ``make_engine(b)`` (an Engine) for each static size ``b``."""
    return EngineBatcher({b: make_engine(b) for b in sizes}, window_ms=window_ms, name=name)
