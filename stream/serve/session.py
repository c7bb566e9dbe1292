"""One scanner's session inside ``regseg-serve``: its source, case, sinks, slot and stats.

A Session is what ``regseg-stream`` runs, built by the same functions (stream/cli.py's source and
sink builders, stream/build.py's pipeline) and run by the same loop
(:func:`regseg.stream.runner.run_stream`) on its own thread. The AlignSegNet engines are shared
(:class:`SharedEngines`): the Pipeline calls a
:class:`~regseg.stream.serve.batcher.BatchedEngine`, so the session's frames are batched with the
other sessions' (and so are its deformable stage's PLCReg calls), while its MRI context,
capture state, quality check and outputs stay its own.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections import deque
from typing import Any

from regseg.clock import now_ns
from regseg.stream.serve.batcher import (
    BatchedEngine,
    BatchedRegistration,
    EngineBatcher,
    build_batcher,
)
from regseg.stream.serve.config import SessionSpec
from regseg.stream.stats import StreamStats, percentiles

log = logging.getLogger(__name__)

RECENT_S = 2.0  # live fps over the results of the last 2 s


class SharedEngines:
    """The engines every session shares, each behind an :class:`EngineBatcher`.

    ``full``: AlignSegNet with theta and logits (the last registration call of a frame);
    ``theta``: theta only, for the refinement calls before the last (``--refine-iterations`` > 1);
    ``deformable``: the deformable stage's 2-D PLCReg. Each is built once per static batch size
    in ``sizes`` (``(1,)``: no batching; the sessions' calls then run one at a time, in arrival
    order). An engine is only ever called from its batcher's thread: ONNX Runtime engines bind
    their input and output buffers, so two sessions' threads must never call one at once.

    Args:
        options: FusionEngine options: weights, backend, device, precision, threads.
        deformable_weights: the 2-D PLCReg of the deformable stage.
    """

    def __init__(self, options: dict[str, Any], sizes: tuple[int, ...], *,
                 window_ms: float = 2.0, deformable_weights: str = "plcreg2d") -> None:
        self.options = options
        self.sizes = sizes
        self.window_ms = window_ms if len(sizes) > 1 else 0.0
        self.deformable_weights = deformable_weights
        self._batchers: dict[str, EngineBatcher] = {}
        self._templates: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _batcher(self, kind: str, context=None) -> tuple[EngineBatcher, Any]:
        """The batcher of ``kind`` and its batch-1 template (built on first use)."""
        with self._lock:
            if kind not in self._batchers:
                make, template = (self._fusion(kind) if kind != "deformable"
                                  else self._registration(context))
                self._templates[kind] = template
                self._batchers[kind] = build_batcher(make, self.sizes, window_ms=self.window_ms,
                                                     name=f"batcher-{kind}")
            return self._batchers[kind], self._templates[kind]

    def _fusion(self, kind: str):
        from regseg.engines.fusion import FusionEngine

        opts = dict(self.options)
        weights = opts.pop("weights", None)
        outputs = {"outputs": ("theta",)} if kind == "theta" else {}
        template = FusionEngine(weights, batch=1, **outputs, **opts)

        def make(batch: int):
            if batch == 1:
                return template.engine
            return FusionEngine(weights, batch=batch, **outputs, **opts).engine

        return make, template

    def _registration(self, context):
        from regseg.engines.base import make_engine
        from regseg.engines.registration import shipped_weights
        from regseg.models.registry import load_model
        from regseg.stream.build import build_deformable

        opts = {"backend": self.options.get("backend", "auto"),
                "precision": self.options.get("precision", "fp32"),
                "threads": self.options.get("threads")}
        stage = build_deformable(context, self.deformable_weights, **opts)
        template = stage.engine  # a RegistrationEngine of batch 1
        cfg = template.config

        def make(batch: int):
            if batch == 1:
                return template.engine
            model = load_model(shipped_weights(self.deformable_weights))
            shapes = {"moving": (batch, cfg.moving_channels, *template.size),
                      "fixed": (batch, cfg.fixed_channels, *template.size)}
            return make_engine(model, shapes, device=template.device,
                               outputs=("ddf", "field"), **opts)

        self._stage = stage
        return make, template

    def full(self) -> BatchedEngine:
        return BatchedEngine(*self._batcher("full"))

    def theta(self) -> BatchedEngine:
        return BatchedEngine(*self._batcher("theta"))

    def deformable(self, context):
        """A deformable stage of the session's own (its context, its grids) whose engine calls
        go through the shared, batched PLCReg."""
        batcher, template = self._batcher("deformable", context)
        stage = copy.copy(self._stage)
        stage.context = context
        stage._axes = {}  # noqa: SLF001 - per-session pixel grids
        stage.engine = BatchedRegistration(batcher, template)
        return stage

    @property
    def backend(self) -> str:
        with self._lock:
            full = self._templates.get("full")
        return full.backend if full else self.options.get("backend", "auto")

    def stats(self) -> dict:
        with self._lock:
            batchers = dict(self._batchers)
        return {kind: b.stats() for kind, b in batchers.items()}

    def close(self) -> None:
        with self._lock:
            batchers = list(self._batchers.values())
        for b in batchers:
            b.close()


class Session:
    """Builds everything a session needs (raises InputError/RegsegError, having closed what it
    opened); :meth:`start` runs it on its own thread, :meth:`stop` ends it.

    ``state``: running, ended (the source finished or died), stopped, failed (``error`` says why).
    """

    def __init__(self, spec: SessionSpec, engines: SharedEngines, web=None) -> None:
        from regseg.stream.build import build_pipeline
        from regseg.stream.capture import Capture, TemporalFilter
        from regseg.stream.cli import _context_and_source, _sinks
        from regseg.stream.gate import FrameGate
        from regseg.stream.igtl.registration import RegistrationListener
        from regseg.stream.slot import LatestSlot

        args, plan = spec.args, spec.plan
        self.spec, self.name = spec, spec.name
        self.state, self.error = "starting", None
        self.stats = StreamStats()
        self.skipped = 0
        self._done_ns: deque[int] = deque(maxlen=4096)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._engines: list = []
        self.sinks: list = []
        self.source = None
        self._web = web
        try:
            self.context, self.source = _context_and_source(args, plan, LatestSlot())
            self.registration = RegistrationListener(
                allowed_hosts=plan.registration_hosts, reference_to_mri=plan.reference_to_mri,
                pivot_mri=self.context.prostate_centre_mm(),
                max_jump_mm=args.registration_max_jump_mm,
                max_jump_deg=args.registration_max_jump_deg,
                allow_jump=args.allow_registration_jump)
            self.sinks, self.sink_urls = _sinks(args, plan, on_message=self.registration)
            if web is not None:
                from regseg.stream.web.sink import WebSink

                self.sinks.append(WebSink(web.channel(self.name)))
                self.sink_urls.append(f"{web.url}?session={self.name}")
            full = engines.full()
            self._engines.append(full)
            theta = None
            if args.refine_iterations > 1:
                theta = engines.theta()
                self._engines.append(theta)
            temporal = args.temporal_filter != "off"
            capture = Capture(args.refine_iterations, None,
                              TemporalFilter() if temporal else None, theta,
                              warm_start=args.temporal_filter == "warm")
            deformable = None
            if args.deformable != "off":
                deformable = engines.deformable(self.context)
                self._engines.append(deformable.engine)
            if args.deformable == "async":  # the network on the session's own worker thread
                from regseg.stream.deformable_lag import DeformableLagged
                from regseg.stream.lag_worker import asynchronous_allowed

                deformable = DeformableLagged(deformable, asynchronous=asynchronous_allowed())
            self.pipeline = build_pipeline(self.context, full, deformable=deformable,
                                           capture=capture, reference_to_mri=plan.reference_to_mri,
                                           do_no_harm=args.do_no_harm,
                                           do_no_harm_margin_mm=args.do_no_harm_margin_mm,
                                           roi=args.roi, lc2=args.lc2,
                                           resegment=args.resegment,
                                           consensus=args.consensus,
                                           intensity=args.intensity,
                                           seg_window=args.seg_window,
                                           jump_at=args.jump_at,
                                           seg_tta=args.seg_tta,
                                           seg_prior=args.seg_prior,
                                           estimate_check=args.estimate_check,
                                           stage_threads=args.stage_threads,
                                           seg_fallback=args.seg_fallback,
                                           lc2_hold=args.lc2_hold, lc2_rescue=args.lc2_rescue,
                                           # the sessions share batched engines: no per-session
                                           # network (README "Adapting to the case's scanner")
                                           scanner_adapt="off")
            self.registration.bind(self.pipeline.set_reference_to_mri)
            self.gate = FrameGate(plan.limits)
        except BaseException:
            self._close_parts()
            raise

    def start(self) -> None:
        self.state = "running"
        self._thread = threading.Thread(target=self._run, name=f"session-{self.name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from regseg.stream.runner import run_stream

        try:
            _, self.skipped = run_stream(self.source, self.pipeline, self.sinks,
                                         stop=self._stop, status_every_s=0, gate=self.gate,
                                         stats=self.stats, on_result=self._on_result)
            self.state = "stopped" if self._stop.is_set() else "ended"
        except Exception as exc:  # noqa: BLE001 - one session's failure must not end the others
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("session %s failed: %s", self.name, self.error)
        finally:
            self._release_engines()

    def _on_result(self, _result) -> None:
        self._done_ns.append(now_ns())

    def stop(self, timeout: float = 10.0) -> None:
        """End the session: its loop, source and sinks (run_stream closes them), its engines."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._close_parts()
        if self.state in ("running", "starting"):
            self.state = "stopped"
        if self._web is not None:
            self._web.remove(self.name)

    def _release_engines(self) -> None:
        for engine in self._engines:
            engine.release()
        self._engines = []

    def _close_parts(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self.source is not None:
            self.source.stop()
        self._release_engines()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def recent_fps(self) -> float:
        """Results per second over the last :data:`RECENT_S` s (0 when none came)."""
        done = list(self._done_ns)
        now = now_ns()
        recent = [t for t in done if now - t <= RECENT_S * 1e9]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / ((recent[-1] - recent[0]) / 1e9)

    def live(self) -> dict:
        """What the control endpoint and the page list show, now."""
        p = percentiles(list(self.stats.recent_latency_ms))
        skipped = self.source.slot.skipped if self.source is not None else self.skipped

        def num(v: float) -> float | None:
            return None if v is None or math.isnan(v) else round(v, 2)

        return {"name": self.name, "state": self.state, "error": self.error,
                "source": self.spec.plan.source_url, "sinks": list(self.sink_urls),
                "frames": self.stats.frames, "fps": num(self.recent_fps()),
                "latency_ms": {"p50": num(p["p50"]), "p99": num(p["p99"])},
                "skipped": skipped, "flagged": self.stats.flagged,
                "failed_frames": self.stats.failed}

    def summary(self) -> dict:
        """The regseg-stream style summary of this session (so far)."""
        skipped = self.source.slot.skipped if self.source is not None else self.skipped
        extra = {"name": self.name, "state": self.state, "error": self.error,
                 "source": self.spec.plan.source_url, "sinks": list(self.sink_urls),
                 "source_stats": self.source.stats() if self.source is not None else None,
                 "gate": self.gate.stats(), "registration_from_slicer":
                 self.registration.stats()}
        return self.stats.summary(skipped=skipped, extra=extra)
