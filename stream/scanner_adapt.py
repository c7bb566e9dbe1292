"""Adapting the registration network to the case's scanner (``--scanner-adapt``).

AlignSegNet's TRUS encoder normalises its features with batch-norm statistics learnt on family
A's scanner; another scanner (frequency, speckle, gain, its own post-processing) moves them, and
every later layer then reads features off the range it was trained on. ``--scanner-adapt on``
re-estimates them on the case's own frames -- the TRUS encoder's three BatchNorm layers only, mean
and variance per channel over the first :data:`ADAPT_FRAMES` frames that have ultrasound content
(AdaBN: Li et al., "Revisiting batch normalization for practical domain adaptation", ICLR
workshop 2017) -- and swaps in engines built from the adapted copy (same backend, precision,
device and threads). No label, no gradient, no other weight: the MRI encoder, the affine head and
the segmentation U-Net keep the shipped statistics (they also see the MRI and the case's gland;
adapting them too was worse on the diagnosis sets, bench/results/lc2_predeclared.md, addendum 20).

``--scanner-adapt segmentation`` (addendum 21) builds the adapted network for one pass only: the
segmentation at the published plane (``--resegment``), so the registration, and everything the
checks compare it with, stay those of the shipped network.

Frames before the swap run the shipped network. ``background`` builds the engines on a thread (an
ONNX export takes seconds on a small CPU); they are swapped in before the first frame that arrives
after the build while no frame is in flight on the GPU's device rings (with the CPU's
``--overlap``, the one frame whose second half is on the worker then segments with the new
network). Without it (the benches, for reproducible runs) the frame that completes the set builds
them and the next frame runs them. The statistics are taken on the frames as the networks see them
(after ``--roi``'s window and ``--intensity``'s grey levels); a frame without ultrasound content
(``no_content``'s test: blank, noise) is not used. The adaptation belongs to the stream's
scanner, so a new registration keeps it. :meth:`info` reports what happened (``--stats-json``
``scanner_adapt``).
"""

from __future__ import annotations

import copy
import tempfile
import threading
import time
from typing import Any

import torch
from torch import nn

from regseg import planes
from regseg.stream.quality import QualityConfig, content_score

#: on: every AlignSegNet engine the chain runs (registration and segmentation; addendum 20);
#: segmentation: the adapted network for the segmentation at the published plane only
#: (``--resegment``'s pass), the registration keeping the shipped one (addendum 21)
SCANNER_ADAPT_MODES = ("on", "segmentation", "off")
#: off: both modes failed their rules (bench/results/lc2_predeclared.md, addenda 20 and 21)
SCANNER_ADAPT_DEFAULT = "off"
ADAPT_FRAMES = 12  # frames with content whose statistics are taken (a sweep's worth)


def adapted_model(model: nn.Module, trus: torch.Tensor) -> nn.Module:
    """A copy of AlignSegNet ``model`` whose TRUS-encoder BatchNorm statistics are those of the
    batch ``trus`` ((N, 1, h, w) model inputs): mean and (unbiased) variance per channel of each
    layer's input over the batch, as one training-mode pass with momentum 1 sets them."""
    out = copy.deepcopy(model).float().cpu().eval()
    norms = [m for m in out.trus_encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm2d in its trus_encoder")
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = 1.0
        norm.train()
    with torch.no_grad():
        out.trus_encoder(trus.float().cpu())
    return out.eval()


class ScannerAdapt:
    """The ``--scanner-adapt on`` stage: the Pipeline passes every frame to :meth:`enter`."""

    def __init__(self, frames: int = ADAPT_FRAMES, background: bool = True,
                 scope: str = "network") -> None:
        if int(frames) != frames or frames < 2:
            raise ValueError(f"scanner_adapt frames {frames!r}: expected a whole number >= 2")
        if scope not in ("network", "segmentation"):
            raise ValueError(f"scanner_adapt scope {scope!r}: expected network or segmentation")
        self.frames, self.background, self.scope = int(frames), bool(background), scope
        self._trus: list[torch.Tensor] = []
        self._thread: threading.Thread | None = None
        self._built: dict[str, Any] | None = None
        self.applied_at_seq: int | None = None
        self.build_s = float("nan")
        self.error: str | None = None

    @property
    def applied(self) -> bool:
        return self.applied_at_seq is not None

    def enter(self, pipeline: Any, frame: Any) -> Any:
        """Called by the Pipeline with each frame as its networks will see it, before it runs:
        swap in the adapted engines if they are built (and the GPU's rings are empty); else take the
        frame into the statistics (unless it has no ultrasound content) and build them once
        enough are in. Returns ``frame``."""
        if self.applied or self.error is not None:
            return frame
        if self._thread is not None or self._built is not None:
            if (self._thread is None or not self._thread.is_alive()) and not _rings_busy(pipeline):
                self._swap(pipeline, frame.seq)
            return frame
        if content_score(frame.pixels) < QualityConfig().min_content:
            return frame
        pixels = torch.from_numpy(frame.pixels)
        self._trus.append(planes.trus_input(pixels, pipeline.engine.size))
        if len(self._trus) >= self.frames:
            trus, self._trus = torch.cat(self._trus), []
            args = (pipeline.engine.model, trus,
                    engines_of(pipeline, segmentation_only=self.scope == "segmentation"))
            if self.background:
                self._thread = threading.Thread(target=self._build, args=args,
                                                name="regseg-scanner-adapt", daemon=True)
                self._thread.start()
            else:  # built now, swapped before the next frame
                self._build(*args)
        return frame

    def wait(self) -> None:
        """Block until a background build is done (tests, benches); the next frame swaps it."""
        if self._thread is not None:
            self._thread.join()

    def info(self) -> dict[str, Any]:
        return {"frames": self.frames, "scope": self.scope, "applied": self.applied,
                "applied_from_seq": self.applied_at_seq,
                "build_s": None if self.build_s != self.build_s else round(self.build_s, 2),
                "error": self.error}

    def _build(self, shipped: nn.Module, trus: torch.Tensor,
               jobs: dict[str, dict[str, Any]]) -> None:
        from regseg.engines.fusion import FusionEngine

        start = time.perf_counter()
        try:
            model = adapted_model(shipped, trus)
            # built in a private folder that goes when built (the runtime has read it): one
            # case's network is no artifact to keep, and the shared cache would grow per case
            with tempfile.TemporaryDirectory(prefix="regseg-scanner-adapt-") as folder:
                self._built = {name: FusionEngine(model=model, cache_dir=folder, **options)
                               for name, options in jobs.items()}
        except Exception as exc:  # noqa: BLE001  (the shipped engines simply stay)
            self.error = f"{type(exc).__name__}: {exc}"
        self.build_s = time.perf_counter() - start

    def _swap(self, pipeline: Any, seq: int) -> None:
        built, self._built, self._thread = self._built, None, None
        if built is None:  # the build failed: the shipped network stays, and info() says why
            self.error = self.error or "the adapted engines were not built"
            return
        # the chains (and device rings) were made with the old engines: they are made again
        # from the new ones on first use (the GPU's rings are empty; a CPU overlap worker's
        # frame looks its chain up again)
        pipeline._chains, pipeline._rings = {}, {}
        if self.scope == "segmentation":
            pipeline.seg_engine = built["main"]
        else:
            pipeline.engine = built["main"]
            if "multi_start" in built:
                pipeline.capture.multi_start.engine = built["multi_start"]
            if "theta" in built:
                pipeline.capture.theta_engine = built["theta"]
        self.applied_at_seq = int(seq)


def _rings_busy(pipeline: Any) -> bool:
    """Frames in flight in the GPU's device rings, which the swap would drop. (The CPU overlap's
    worker may be busy: its frame's second half looks its chain up again and runs on.)"""
    return any(ring.in_flight for ring in pipeline._rings.values())


def engines_of(pipeline: Any, segmentation_only: bool = False) -> dict[str, dict[str, Any]]:
    """The FusionEngine arguments (but the model) that rebuild each AlignSegNet engine
    ``pipeline`` runs as it is: its own, the capture's multi-start and theta-only ones;
    ``segmentation_only``: one like its own that gives the logits alone."""
    def options(engine: Any, outputs: tuple[str, ...]) -> dict[str, Any]:
        return {"backend": engine.backend, "device": engine.device,
                "precision": engine.precision, "threads": engine.info.get("threads"),
                "outputs": outputs, "batch": engine.batch}

    from regseg.engines.fusion import LIVE_OUTPUTS

    if segmentation_only:
        return {"main": options(pipeline.engine, ("logits",))}
    jobs = {"main": options(pipeline.engine, LIVE_OUTPUTS)}
    capture = pipeline.capture
    if getattr(capture, "multi_start", None) is not None:
        jobs["multi_start"] = options(capture.multi_start.engine, LIVE_OUTPUTS)
    if getattr(capture, "theta_engine", None) is not None:
        jobs["theta"] = options(capture.theta_engine, ("theta",))
    return jobs


def build_scanner_adapt(mode: str = SCANNER_ADAPT_DEFAULT, *, background: bool = True
                        ) -> ScannerAdapt | None:
    """``--scanner-adapt``'s stage: a ScannerAdapt for "on" (the whole network) and
    "segmentation" (its segmentation pass), None for "off"."""
    if mode not in SCANNER_ADAPT_MODES:
        raise ValueError(f"scanner_adapt {mode!r}: expected one of {SCANNER_ADAPT_MODES}")
    if mode == "off":
        return None
    return ScannerAdapt(background=background,
                        scope="segmentation" if mode == "segmentation" else "network")
