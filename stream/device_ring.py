"""DeviceRing: frames through a FrameChain on CUDA; upload, compute and download overlapped.

A fixed ring of slots, each with pinned host buffers and device buffers allocated once. Frame N
is copied host-to-device on the upload stream, computed on the compute stream and copied back on
the download stream, ordered by CUDA events, so frame N+1 uploads while N computes and N-1
downloads (notes/engines.md §3.3; DESIGN.md "The live path"). Nothing is allocated per frame
outside the chain's own temporaries (the caching allocator reuses those; a captured graph
removes them too). Importable without CUDA; constructing one needs a CUDA device.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch
from torch import Tensor

from regseg.clock import now_ns
from regseg.errors import EngineError

#: Timings a slot reports (ms), from CUDA events; ``chain`` replaces the four compute stages
#: when the chain runs as one captured graph.
RING_STAGES = ("upload", "prepare", "model", "warp_labels", "segment", "download")


class _Slot:
    """One frame's buffers and events."""

    def __init__(self, hw: tuple[int, int], device: torch.device) -> None:
        def pinned(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            return torch.empty(shape, dtype=dtype, pin_memory=True)

        def dev(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        self.h_pixels, self.d_pixels = pinned(hw, torch.uint8), dev(hw, torch.uint8)
        self.h_mats, self.d_mats = pinned((2, 3, 3), torch.float32), dev((2, 3, 3), torch.float32)
        self.d_theta, self.h_theta = dev((1, 2, 3), torch.float32), pinned((1, 2, 3),
                                                                            torch.float32)
        self.d_labels, self.h_labels = dev(hw, torch.uint8), pinned(hw, torch.uint8)
        self.d_warped, self.h_warped = dev(hw, torch.uint8), pinned(hw, torch.uint8)
        # 0 upload start, 1 uploaded, 2 compute start, 3..6 after prepare/model/warp/segment,
        # 7 download start, 8 downloaded. Timing events cost ~1 us each and give per-stage
        # device time; each stage is measured on its own stream, so waits are not counted.
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(9)]
        self.pending: tuple[Any, np.ndarray, int] | None = None


class DeviceRing:
    """Runs a :class:`~regseg.stream.pipeline.FrameChain` on CUDA with ``slots`` frames in flight.

    Args:
        chain: the frame chain; its context and engine live on the CUDA device.
        slots: 2 or 3.
        cuda_graph: capture the whole chain (prepare, model, warp, segment) as one CUDA graph and
            replay it per frame: one launch instead of ~100. The engine must be capturable (eager
            or tensorrt; ``compiled`` already records its own graphs).
        preprocess: ``torch``, or ``cupy``: the uint8 frame is converted and area-resampled by
            CuPy on the compute stream, sharing memory with torch through DLPack (needs cupy;
            frame size an integer multiple of the model size; not with ``cuda_graph``).
    Raises:
        EngineError: no CUDA, a chain on another device, or an option that cannot work.
    """

    def __init__(self, chain: Any, *, slots: int = 3, cuda_graph: bool = False,
                 preprocess: str = "torch") -> None:
        if not torch.cuda.is_available() or chain.device.type != "cuda":
            raise EngineError(f"DeviceRing needs a CUDA device; the chain is on {chain.device}")
        if not 2 <= slots <= 3:
            raise EngineError(f"DeviceRing: {slots} slots; use 2 or 3 (more only adds latency)")
        if preprocess not in ("torch", "cupy"):
            raise EngineError(f"preprocess {preprocess!r}: use 'torch' or 'cupy'")
        if cuda_graph and preprocess == "cupy":
            raise EngineError("cuda_graph with preprocess='cupy' is not supported: CuPy's memory "
                              "pool allocates during capture; use preprocess='torch'")
        if cuda_graph and chain.engine.engine.info.get("cuda_graphs"):
            raise EngineError("cuda_graph: the engine records its own CUDA graphs (backend "
                              "'compiled' on CUDA); build it with 'eager' or 'tensorrt', or turn "
                              "the ring's capture off")
        self.chain = chain
        self.device = chain.device
        self.h2d = torch.cuda.Stream(self.device)
        self.compute = torch.cuda.Stream(self.device)
        self.d2h = torch.cuda.Stream(self.device)
        self.slots = [_Slot(chain.frame_hw, self.device) for _ in range(slots)]
        self._next = 0
        self._in_flight: deque[int] = deque()
        self._cupy_stream = self._make_cupy_stream() if preprocess == "cupy" else None
        self._graph: torch.cuda.CUDAGraph | None = None
        if cuda_graph:
            self._capture()
        torch.cuda.synchronize(self.device)

    def _make_cupy_stream(self) -> Any:
        try:
            import cupy
        except ImportError as exc:
            raise EngineError("preprocess='cupy' needs CuPy: pip install 'regseg[gpu]'") from exc
        h, w = self.chain.size
        hh, ww = self.chain.frame_hw
        if hh % h or ww % w:
            raise EngineError(f"preprocess='cupy' resamples by integer factors; frame {hh}x{ww} "
                              f"is not a multiple of the model size {h}x{w}")
        # CuPy >= 14 wraps a torch stream through __cuda_stream__ and keeps it alive;
        # ExternalStream is the older (deprecated) way (notes/engines.md §4).
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is not None:
            return from_external(self.compute)
        return cupy.cuda.ExternalStream(self.compute.cuda_stream, self.device.index or 0)

    def _cupy_trus(self, pixels: Tensor) -> Tensor:
        """(1, 1, h, w) float32 model input from the (H, W) uint8 frame, computed by CuPy.

        Block means over integer factors equal torch's ``area`` resampling (tested against it
        where CuPy and a GPU exist). Both libraries run on the compute stream, so the DLPack
        hand-over in either direction needs no synchronisation.
        """
        import cupy

        h, w = self.chain.size
        hh, ww = self.chain.frame_hw
        with self._cupy_stream:
            px = cupy.from_dlpack(pixels)
            x = px.reshape(h, hh // h, w, ww // w).astype(cupy.float32).mean(axis=(1, 3))
            x *= np.float32(1.0 / 255.0)
        return torch.from_dlpack(x).reshape(1, 1, h, w)

    def _run_chain(self, pixels: Tensor, mats: Tensor,
                   events: list[torch.cuda.Event] | None) -> tuple[Tensor, Tensor, Tensor]:
        chain = self.chain
        trus = self._cupy_trus(pixels) if self._cupy_stream is not None else None
        inputs = chain.prepare(pixels, mats, trus=trus)
        if events:
            events[3].record(self.compute)
        theta, logits = chain.model(*inputs, mats)
        if events:
            events[4].record(self.compute)
        warped = chain.warp_labels(theta, mats)
        if events:
            events[5].record(self.compute)
        labels = chain.segment(logits)
        if events:
            events[6].record(self.compute)
        return theta, labels, warped

    def _capture(self) -> None:
        hw = self.chain.frame_hw
        self._static_pixels = torch.zeros(hw, dtype=torch.uint8, device=self.device)
        self._static_mats = torch.zeros((2, 3, 3), dtype=torch.float32, device=self.device)
        # Warm up on the capture stream first: lazy allocations and library handles must not
        # happen inside the capture (torch.cuda.graphs docs: "warmup on a side stream").
        with torch.cuda.stream(self.compute), torch.inference_mode():
            for _ in range(3):
                self._run_chain(self._static_pixels, self._static_mats, None)
        self.compute.synchronize()
        self._graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self._graph, stream=self.compute):
            self._static_out = self._run_chain(self._static_pixels, self._static_mats, None)

    def push(self, frame: Any, tracked: np.ndarray, mats: np.ndarray) -> list[tuple]:
        """Start ``frame``; returns finished frames (see :meth:`flush`) if its slot was busy.

        Args:
            frame: the Frame (its ``pixels`` (H, W) uint8 must match the chain's frame size).
            tracked: (4, 4) its tracked plane, handed back with the outputs.
            mats: (2, 3, 3) float32 plane matrices (:func:`~regseg.stream.pipeline.plane_matrices`).
        """
        index = self._next
        slot = self.slots[index]
        done = []
        while slot.pending is not None:  # the ring is full: this slot holds the oldest frame
            done.append(self._collect(self._in_flight.popleft()))
        self._next = (index + 1) % len(self.slots)
        start = now_ns()
        ev = slot.events
        # The slot's previous frame has been downloaded (collected), so its upload and compute
        # are done: the host may overwrite its pinned input buffers.
        np.copyto(slot.h_pixels.numpy(), frame.pixels)
        np.copyto(slot.h_mats.numpy(), mats)
        with torch.cuda.stream(self.h2d):
            ev[0].record(self.h2d)
            slot.d_pixels.copy_(slot.h_pixels, non_blocking=True)
            slot.d_mats.copy_(slot.h_mats, non_blocking=True)
            ev[1].record(self.h2d)
        self.compute.wait_event(ev[1])
        with torch.cuda.stream(self.compute), torch.inference_mode():
            ev[2].record(self.compute)
            if self._graph is not None:
                self._static_pixels.copy_(slot.d_pixels)
                self._static_mats.copy_(slot.d_mats)
                self._graph.replay()
                theta, labels, warped = self._static_out
                ev[6].record(self.compute)
            else:
                theta, labels, warped = self._run_chain(slot.d_pixels, slot.d_mats, ev)
            # Copy out of the chain's (or graph's) buffers so the next frame may reuse them.
            slot.d_theta.copy_(theta.reshape(1, 2, 3))
            slot.d_labels.copy_(labels)
            slot.d_warped.copy_(warped)
        self.d2h.wait_event(ev[6])
        with torch.cuda.stream(self.d2h):
            ev[7].record(self.d2h)
            slot.h_theta.copy_(slot.d_theta, non_blocking=True)
            slot.h_labels.copy_(slot.d_labels, non_blocking=True)
            slot.h_warped.copy_(slot.d_warped, non_blocking=True)
            ev[8].record(self.d2h)
        slot.pending = (frame, tracked, start)
        self._in_flight.append(index)
        return done

    def _collect(self, index: int) -> tuple:
        slot = self.slots[index]
        ev = slot.events
        ev[8].synchronize()  # a non-blocking D2H is only valid after its event (§3.3)
        frame, tracked, start = slot.pending
        slot.pending = None
        if self._graph is not None:
            timings = {"upload": ev[0].elapsed_time(ev[1]), "chain": ev[2].elapsed_time(ev[6])}
        else:
            names = ("prepare", "model", "warp_labels", "segment")
            timings = {"upload": ev[0].elapsed_time(ev[1])}
            timings |= {n: ev[i + 2].elapsed_time(ev[i + 3]) for i, n in enumerate(names)}
        timings["download"] = ev[7].elapsed_time(ev[8])
        # Copies: the pinned buffers are reused by the slot's next frame.
        return (frame, tracked, slot.h_theta.numpy().copy(), slot.h_labels.numpy().copy(),
                slot.h_warped.numpy().copy(), timings, start)

    @property
    def in_flight(self) -> int:
        """Frames pushed and not yet collected."""
        return len(self._in_flight)

    def poll(self) -> list[tuple]:
        """Collect, without waiting, the frames whose download has finished (oldest first)."""
        done = []
        while self._in_flight and self.slots[self._in_flight[0]].events[8].query():
            done.append(self._collect(self._in_flight.popleft()))
        return done

    def flush(self) -> list[tuple]:
        """Wait for every frame in flight: (frame, tracked, theta (1, 2, 3), labels (H, W),
        warped labels (H, W), device timings ms, start_ns) per frame, oldest first."""
        return [self._collect(self._in_flight.popleft()) for _ in range(len(self._in_flight))]
