"""``regseg-stream``'s command line: its options, their help and defaults (no checks here).

:func:`build_parser` is used by ``regseg-stream`` (``regseg.stream.cli``), by ``regseg-serve``'s
per-session configuration and by the tests. Checks of the parsed values are in
:mod:`regseg.stream.cli_args`.
"""

from __future__ import annotations

import argparse

# Only the standard library and regseg's light modules at import time (``--help`` must not wait
# for torch).
from regseg.cli_checks import (
    Once,
    Parser,
    float_at_least,
    int_at_least,
)

EPILOG = """examples:
  regseg-stream --demo --max-frames 200
  regseg-stream --mri case.nii.gz --mri-labels case_labels.nii.gz \\
      --source igtl://plus-host:18944 --serve igtl://127.0.0.1:18945 --zmq tcp://127.0.0.1:5556
  regseg-stream --mri case.nii.gz --mri-labels case_labels.nii.gz \\
      --source file://session.igs.mha --replay-rate recorded --record out/run.igs.mha
"""


#: Live deformable refinement by default: on, because on 80 held-out phantom frames it raised the
#: registered prostate Dice 0.957 -> 0.981 and lowered TRE 0.85 -> 0.58 mm, for ~11 ms per frame
#: on the 2-core CPU with ONNX Runtime (bench/registration.py; README "Registration (offline and
#: deformable live)"); the whole chain then keeps a 30 fps source (bench/latency.py). Since
#: session 28 (bench/results/lc2_predeclared.md, addenda 30-31) ``async``: the network runs one
#: frame late on a worker thread (regseg.stream.deformable_lag), off the frame's path.
DEFORMABLE_DEFAULT = "async"


def build_parser() -> argparse.ArgumentParser:
    from regseg.geometry import MAX_FRAME_PIXELS
    from regseg.stream.capture import (
        MULTI_START_DEFAULT,
        REFINE_ITERATIONS,
        TEMPORAL_FILTER_DEFAULT,
    )

    p = Parser(prog="regseg-stream", epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Live MRI-TRUS fusion: register the MRI to every ultrasound frame, "
               "segment prostate and lesion, publish overlays.")
    p.add_argument("--demo", action="store_true",
                   help="simulated scanner on a generated phantom case; no files needed")
    p.add_argument("--mri", action=Once, help="patient MRI, 3-D NIfTI (T2)")
    p.add_argument("--mri-labels", action=Once,
                   help="labels: 3-D NIfTI on the MRI grid: 1 prostate, 2 lesion")
    p.add_argument("--source", action=Once, default=None,
                   help="igtl://HOST:PORT (PLUS or scanner OpenIGTLink server), sim://[SEED] "
                   "(simulated scanner), file://PATH (PLUS sequence file .igs.mha/.seq.nrrd ...), "
                   "grabber://N (capture device N) or a video file path; default sim:// with "
                   "--demo")
    p.add_argument("--image-device", action=Once, default=None,
                   help="IMAGE device to use (default: the first seen, e.g. Image_Reference)")
    p.add_argument("--serve", action="append", default=None,
                   help="OpenIGTLink server for 3D Slicer, igtl://HOST:PORT (repeatable; 'none' "
                   "for no server; default igtl://127.0.0.1:18945 with --demo)")
    p.add_argument("--zmq", action=Once, default=None,
                   help="ZeroMQ PUB endpoint, e.g. tcp://127.0.0.1:5556 ('none' for none; default "
                   "tcp://127.0.0.1:5556 with --demo)")
    p.add_argument("--zmq-allow", action=Once, default=None, metavar="HOST[,HOST]",
                   help="only these hosts may subscribe to --zmq (default: any that reaches it; "
                   "name them when --zmq is bound beyond loopback)")
    p.add_argument("--reference-to-mri", action=Once, default=None,
                   help="ReferenceToMRI (initial registration): ITK .tfm/.h5 as Slicer saves it, "
                   "PLUS .xml (Reference -> MRI) or a text file of 4 rows of 4 numbers; default "
                   "identity")
    cal = p.add_argument_group("calibration (regseg calibrate ...)")
    cal.add_argument("--probe-calibration", action=Once, default=None, metavar="FILE",
                     help="ImageToProbe (PLUS .xml, .tfm/.h5 or 4x4 .txt, pixels -> mm): pair "
                     "IMAGEs with the probe's TRANSFORM (--probe-transform) and use "
                     "ProbeToReference x ImageToProbe as the frame's pose (igtl:// sources)")
    cal.add_argument("--probe-transform", action=Once, default="ProbeToTracker", metavar="NAME",
                     help="the probe's TRANSFORM device with --probe-calibration (default "
                     "ProbeToTracker; ProbeToReference with a reference marker)")
    cal.add_argument("--time-offset-ms", action=Once, type=float_at_least(-5000.0, 5000.0),
                     default=0.0, metavar="MS",
                     help="pair an IMAGE stamped t with the pose stamped t + MS (the lag "
                     "`regseg calibrate temporal` measures; igtl:// sources)")
    cal.add_argument("--landmarks-mri", action=Once, default=None, metavar="FILE",
                     help="landmarks in the MRI (.mrk.json/.fcsv); with --landmarks-reference, "
                     "ReferenceToMRI is registered from them at start (FRE printed)")
    cal.add_argument("--landmarks-reference", action=Once, default=None, metavar="FILE",
                     help="the same landmarks in the tracker's Reference frame (.mrk.json/.fcsv)")
    p.add_argument("--max-frames", action=Once, type=int_at_least(1), default=None,
                   help="stop after this many results")
    p.add_argument("--fps", action=Once, type=float_at_least(0.0, 1000.0), default=30.0,
                   help="simulated scanner frame rate (0 = flat out)")
    p.add_argument("--seed", action=Once, type=int_at_least(0), default=0,
                   help="phantom and scanner seed for sim://")
    p.add_argument("--device", action=Once, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", action=Once, default="auto",
                   choices=["auto", "eager", "compiled", "onnxrt", "tensorrt"],
                   help="engine backend; auto (default) builds the candidates for the device, "
                   "checks each against eager and takes the fastest (the choice is printed)")
    p.add_argument("--precision", action=Once, default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="engine precision (fp16/bf16: matmuls and convolutions low, norms fp32)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: capture the whole per-frame chain as one CUDA graph")
    p.add_argument("--weights", action=Once, default=None,
                   help="AlignSegNet checkpoint (default: shipped)")
    p.add_argument("--deformable", action=Once, choices=["on", "off", "async"],
                   default=DEFORMABLE_DEFAULT,
                   help="refine the affine registration with the 2-D PLCReg (default "
                   f"{DEFORMABLE_DEFAULT}; see README 'Registration'). async: each frame is "
                   "warped through the previous frame's displacement and the network runs on a "
                   "worker thread, off the frame's path (the first frame runs in order)")
    p.add_argument("--deformable-weights", action=Once, default="plcreg2d",
                   help="2-D PLCReg checkpoint for --deformable on (default: shipped)")
    p.add_argument("--segmenter", action=Once, choices=["unet", "ascseg", "ascseg-trus"],
                   default="unet",
                   help="segmentation stage: unet (default, AlignSegNet's head), ascseg (ASC-Seg "
                   "on the frame + registered MRI) or ascseg-trus (ASC-Seg on the frame alone: "
                   "the disagreement flag then compares two independent views)")
    p.add_argument("--refine-iterations", action=Once, type=int_at_least(1),
                   default=REFINE_ITERATIONS, metavar="K",
                   help="registrations per frame, each on the MRI resliced at the estimate so far "
                   f"(default {REFINE_ITERATIONS}; README 'Capture range')")
    p.add_argument("--multi-start", action=Once, choices=["on", "off"],
                   default=MULTI_START_DEFAULT,
                   help="register 7 start hypotheses (shifts, rotations) in one batched call and "
                   f"keep the best (default {MULTI_START_DEFAULT})")
    p.add_argument("--temporal-filter", action=Once, choices=["on", "off", "warm"],
                   default=TEMPORAL_FILTER_DEFAULT,
                   help="on: filter the correction over frames and report jump_mm; warm: also "
                   f"start each frame from the filtered one (default {TEMPORAL_FILTER_DEFAULT})")
    from regseg.stream.temporal import JUMP_AT, JUMP_AT_DEFAULT

    p.add_argument("--jump-at", action=Once, choices=list(JUMP_AT), default=JUMP_AT_DEFAULT,
                   help="where a frame's jump from the filtered correction is measured for the "
                   "jump flag (3 mm): frame, a grid spanning the frame; gland, the pixels the MRI "
                   "gland covers, where the registration error matters (a rotation about the "
                   f"gland moves the frame's corners, not the gland) (default {JUMP_AT_DEFAULT})")
    from regseg.stream.do_no_harm import DO_NO_HARM_DEFAULT, MARGIN_MM, MODES

    p.add_argument("--do-no-harm", action=Once, choices=list(MODES), default=DO_NO_HARM_DEFAULT,
                   help="publish the registration only where QualityNet estimates it better "
                   "than the tracked plane by --do-no-harm-margin-mm, else the tracked plane "
                   "(correction: tracked in the stats and ZeroMQ header); on-skip-deformable: "
                   "no deformable stage on a tracked plane (faster, lower Dice) "
                   f"(default {DO_NO_HARM_DEFAULT}; README 'Do no harm')")
    p.add_argument("--do-no-harm-margin-mm", action=Once, type=float_at_least(-20.0, 20.0),
                   default=MARGIN_MM, metavar="MM",
                   help="how much lower (mm) the registration's error estimate must be than the "
                   f"tracked plane's for the registration to be published (default {MARGIN_MM:g})")
    from regseg.stream.roi import ROI_DEFAULT, ROI_MODES

    p.add_argument("--roi", action=Once, choices=list(ROI_MODES), default=ROI_DEFAULT,
                   help="auto: a frame much wider than the MRI gland is cropped to a window "
                   "1.8 x the gland's diameter around it before the networks, and the results "
                   f"mapped back (default {ROI_DEFAULT}; README 'Gland-centred window')")
    from regseg.stream.lc2_stage import (
        HOLD_MM,
        LC2_DEFAULT,
        LC2_HOLD,
        LC2_HOLD_DEFAULT,
        LC2_MODES,
        LC2_RESCUE,
        LC2_RESCUE_DEFAULT,
        RESCUE_MM,
    )

    p.add_argument("--lc2", action=Once, choices=list(LC2_MODES), default=LC2_DEFAULT,
                   help="on: move each frame's registered plane in-plane (shifts and a rotation, "
                   "at most 8 mm) to where the frame best matches the MRI by LC2, an image "
                   "similarity that is not learnt; ~13-15 ms per frame on a 2-core CPU. async: "
                   "each frame takes the previous frame's move and LC2 runs on a worker thread, "
                   "off the frame's path (the first frame is refined in order). warm: "
                   "start from the previous frame's move; fast: warm on a coarser grid, ~half the "
                   "time, slightly less accurate. A move is applied only when its LC2 is "
                   "1.5x that of the MRI displaced 12 mm; below that the frame is flagged "
                   f"lc2_unsupported (default {LC2_DEFAULT}; README 'Image-based refinement')")
    p.add_argument("--lc2-hold", action=Once, choices=list(LC2_HOLD), default=LC2_HOLD_DEFAULT,
                   help="on: a significant LC2 move over the 8 mm cap is still applied when the "
                   "plane it gives is within "
                   f"{HOLD_MM:g} mm (at a frame corner) of where the previous refinement's "
                   "correction of the tracked pose puts the frame: a registration LC2 found is "
                   "kept while the network's own plane drifts from it; a first lock still needs "
                   f"the cap (default {LC2_HOLD_DEFAULT}; README 'Image-based refinement')")
    p.add_argument("--lc2-rescue", action=Once, choices=list(LC2_RESCUE),
                   default=LC2_RESCUE_DEFAULT,
                   help="on: when LC2's search from the network's plane applies nothing, search "
                   f"again from the plane moved {RESCUE_MM:g} mm each way along the frame's axes "
                   "and from the previous refinement's correction; the most significant is "
                   "applied under the same guard and cap (not with --lc2 warm or fast; default "
                   f"{LC2_RESCUE_DEFAULT}; README 'Image-based refinement')")
    from regseg.stream.chain import RESEGMENT_DEFAULT

    p.add_argument("--resegment", action=Once, choices=["on", "off"], default=RESEGMENT_DEFAULT,
                   help="on: segment the frame with the MRI and its labels resliced at the plane "
                   "that is published (after --lc2 and the temporal filter), not at the "
                   "network's last pass (the chain's passes then skip the segmentation net: "
                   "~+0.5 ms) "
                   f"(default {RESEGMENT_DEFAULT}; README 'Segmenting at the published plane')")
    from regseg.stream.consensus import CONSENSUS_DEFAULT, CONSENSUS_MODES

    p.add_argument("--consensus", action=Once, choices=list(CONSENSUS_MODES),
                   default=CONSENSUS_DEFAULT,
                   help="on: fit one 3-D shift to the in-plane corrections of the recent frames "
                   "whose planes differ (a sweep shows an error from several sides) and flag a "
                   "frame out_of_plane when it puts the frame's plane > 3 mm off along its "
                   "normal, which no single frame shows, and only where one 3-D shift fits "
                   "the corrections better than an offset fixed to the probe; a new "
                   "--reference-to-mri starts it again. suggest: also publish the "
                   "registration the fit implies (SuggestedMRIToRef), for the operator to "
                   "accept or not; never applied. "
                   "strict: on, and flag sweep_pending until the probe has swept (6 distinct "
                   "planes since the registration, corrections a model fits) "
                   f"(default {CONSENSUS_DEFAULT}; README 'Out of plane: the consensus of "
                   "a sweep')")
    from regseg.stream.resegment import SEG_WINDOW_DEFAULT, SEG_WINDOW_MODES

    p.add_argument("--seg-window", action=Once, choices=list(SEG_WINDOW_MODES),
                   default=SEG_WINDOW_DEFAULT,
                   help="auto (with --resegment on): segment on a window around the gland where "
                   "the published registration puts it (1.8x its diameter) when the view is "
                   "wider, so a small gland in a wide view is seen at the scale the network was "
                   "trained at; registration and the error estimate keep the whole view "
                   f"(default {SEG_WINDOW_DEFAULT}; README 'Segmenting at the published plane')")
    from regseg.stream.resegment import SEG_TTA_DEFAULT, SEG_TTA_MODES

    p.add_argument("--seg-tta", action=Once, choices=list(SEG_TTA_MODES), default=SEG_TTA_DEFAULT,
                   help="flip (with --resegment on): segment the frame and its mirror image (with "
                   "the MRI context mirrored alike) and average the two; one more network call "
                   f"per frame (default {SEG_TTA_DEFAULT}; README 'Segmenting at the published "
                   "plane')")
    from regseg.stream.seg_prior import SEG_PRIOR_DEFAULT, SEG_PRIOR_MODES

    p.add_argument("--seg-prior", action=Once, choices=list(SEG_PRIOR_MODES),
                   default="default",
                   help="on (with --resegment on, --seg-window off): pool the segmentation with "
                   "the MRI labels through the registration (MRILabels) as a prior, the "
                   "log odds moved by at most ~3.9; gated: that, only on frames no image-based "
                   "flag (lc2_unsupported, jump, out_of_plane, disagreement) doubts; the flags "
                   f"still judge the network's own labels (default {SEG_PRIOR_DEFAULT} where "
                   "--resegment is on and --seg-window off, else off; README 'Segmenting at "
                   "the published plane')")
    from regseg.stream.seg_prior import SEG_FALLBACK_DEFAULT, SEG_FALLBACK_MODES

    p.add_argument("--seg-fallback", action=Once, choices=list(SEG_FALLBACK_MODES),
                   default=SEG_FALLBACK_DEFAULT,
                   help="mri: once the error estimate has failed its check on this stream "
                   "(--estimate-check's verdict: a scanner unlike the one the networks were "
                   "trained on), publish the MRI labels carried through the registration as the "
                   "frame's labels (labels_source mri) wherever no image-based flag doubts the "
                   "registration; the flags still judge the network's own labels (needs "
                   f"--estimate-check inform or on) (default {SEG_FALLBACK_DEFAULT}; README "
                   "'Segmenting at the published plane')")
    from regseg.stream.intensity import INTENSITY_DEFAULT, INTENSITY_MODES

    p.add_argument("--intensity", action=Once, choices=list(INTENSITY_MODES),
                   default=INTENSITY_DEFAULT,
                   help="match: map each frame's grey levels (a running histogram of the imaged "
                   "area) onto the training scanner's before the networks, LC2 and QualityNet "
                   "read it, undoing gain, TGC and compression differences; the overlay and "
                   "the published frame keep the original pixels "
                   f"(default {INTENSITY_DEFAULT}; README 'Grey levels of another scanner')")
    from regseg.stream.scanner_adapt import (
        ADAPT_FRAMES,
        SCANNER_ADAPT_DEFAULT,
        SCANNER_ADAPT_MODES,
    )

    p.add_argument("--scanner-adapt", action=Once, choices=list(SCANNER_ADAPT_MODES),
                   default=SCANNER_ADAPT_DEFAULT,
                   help="on: re-estimate the registration network's TRUS-encoder normalisation "
                   f"(batch-norm statistics) on the first {ADAPT_FRAMES} frames with ultrasound "
                   "content, build engines from the adapted copy on a background thread and "
                   "use them from then on; no label, no other weight changes. segmentation: "
                   "the adapted network for the segmentation at the published plane only "
                   "(--resegment on), the registration keeping the shipped one "
                   f"(default {SCANNER_ADAPT_DEFAULT}; README 'Adapting to the case's scanner')")
    from regseg.stream.estimate_check import (
        CHECK_FRAMES,
        ESTIMATE_CHECK_DEFAULT,
        ESTIMATE_CHECK_MODES,
        SHIFT_MM,
    )

    p.add_argument("--estimate-check", action=Once, choices=list(ESTIMATE_CHECK_MODES),
                   default=ESTIMATE_CHECK_DEFAULT,
                   help=f"on the first {CHECK_FRAMES} frames that no other check doubts and "
                   "that show the gland, check that the error estimate tells each frame's "
                   f"published plane from the same plane displaced by a known {SHIFT_MM:g} mm "
                   "(passed / failed); on: after a failed check (a scanner it does not read), "
                   "flag every later frame estimate_unverified; inform: report the verdict only "
                   "(ZeroMQ estimate_check, OpenIGTLink EstimateCheck, --stats-json, the "
                   f"overlay's estimate) (default {ESTIMATE_CHECK_DEFAULT}; README 'The error "
                   "estimate checks itself')")
    from regseg.stream.overlap import OVERLAP_DEFAULT

    p.add_argument("--overlap", action=Once, choices=["on", "off"], default=OVERLAP_DEFAULT,
                   help="CPU: run each frame's deformable stage, quality and overlay on a second "
                   "thread while the next frame is registered, so two cores work at once; "
                   "results keep their order (not with --roi auto; on CUDA the device ring "
                   f"already overlaps) (default {OVERLAP_DEFAULT}; README 'The live chain')")
    from regseg.stream.stage_threads import STAGE_THREADS_CHOICES, STAGE_THREADS_DEFAULT

    p.add_argument("--stage-threads", action=Once, type=int, choices=list(STAGE_THREADS_CHOICES),
                   default=STAGE_THREADS_DEFAULT,
                   help="CPU: 2 runs each frame's deformable stage on a second thread beside its "
                   "segmentation at the published plane, the two stages that read that plane "
                   "and not each other; the same results, one frame sooner done (not with "
                   "--overlap or --do-no-harm; needs --resegment and --deformable on, not async) "
                   f"(default {STAGE_THREADS_DEFAULT}; README 'The live chain')")
    p.add_argument("--threads", action=Once, type=int_at_least(1), default=None,
                   help="CPU threads for torch (default on CPU: 1; the per-frame glue ops are too "
                   "small to gain from more, and two busy thread pools thrash on 2 cores)")
    p.add_argument("--engine-threads", action=Once, type=int_at_least(1), default=None,
                   help="threads of the engine's own pool (onnxrt); default: --threads")
    p.add_argument("--max-frame-pixels", action=Once, type=int_at_least(64 * 64),
                   default=MAX_FRAME_PIXELS,
                   help="frames with more pixels are refused and counted (refused_frames."
                   f"too_large); default {MAX_FRAME_PIXELS} = 2048x2048, 4x the largest TRUS "
                   "frames PLUS streams; OpenIGTLink IMAGE bodies above the matching size are "
                   "skipped unread")
    p.add_argument("--stats-json", action=Once, default=None,
                   help="write the exit summary here as JSON (checked writable at start)")
    p.add_argument("--quiet", action="store_true", help="no live status line")
    io = p.add_argument_group("interoperability and recording")
    io.add_argument("--replay-rate", action=Once, choices=["recorded", "max"], default="recorded",
                    help="file:// and video replay: at the recorded rate, or flat out (the "
                    "pipeline then takes the newest frame; skips are counted)")
    io.add_argument("--record", action=Once, default=None, metavar="PATH",
                    help="record every incoming frame with its pose and time as a PLUS sequence "
                    "file (.igs.mha, .seq.mha, .igs.nrrd, .seq.nrrd)")
    io.add_argument("--record-outputs", action="store_true",
                    help="with --record, also record labels and overlays (PATH_Labels.*, "
                    "PATH_Overlay.*) with MRIToImage per frame")
    io.add_argument("--grabber-crop", action=Once, default=None, metavar="X,Y,W,H",
                    help="grabber/video: the ultrasound image inside the captured frame, pixels")
    io.add_argument("--grabber-spacing-mm", action=Once, default="0.2,0.2", metavar="ROW,COL",
                    help="grabber/video: pixel size of the cropped image in mm (default 0.2,0.2)")
    io.add_argument("--pose-source", action=Once, default=None, metavar="igtl://HOST:PORT",
                    help="grabber/video: take ImageToReference TRANSFORMs from this OpenIGTLink "
                    "server (untracked without it)")
    io.add_argument("--igtl-header-version", action=Once, type=int, choices=[1, 2], default=2,
                    help="OpenIGTLink header version we send: 2 (Slicer, PLUS; metadata) or 1 "
                    "(OpenIGTLink <= 2.x receivers such as Debian's 1.11 library)")
    io.add_argument("--web", action=Once, default=None, metavar="HOST:PORT",
                    help="browser view of the overlay, quality, fps and latency, e.g. "
                    "127.0.0.1:8080 (JPEG over a WebSocket; 0.0.0.0 to reach it from a tablet)")
    io.add_argument("--no-contours", action="store_true",
                    help="do not send the ProstateContour/LesionContour POLYDATA outlines")
    net = p.add_argument_group("network safeguards (OpenIGTLink server)")
    net.add_argument("--max-clients", action=Once, type=int_at_least(1), default=8,
                     help="clients each --serve server takes at once; more are refused and "
                     "counted (default 8)")
    net.add_argument("--accept-registration-from", action=Once, default=None,
                     metavar="HOST[,HOST]",
                     help="hosts whose MRIToReference/ReferenceToMRI TRANSFORM may change the "
                     "registration (default: none; every such TRANSFORM is refused and logged)")
    net.add_argument("--registration-max-jump-mm", action=Once,
                     type=float_at_least(1e-3, 1e3), default=10.0,
                     help="refuse a registration change moving the prostate centre further "
                     "(default 10 mm)")
    net.add_argument("--registration-max-jump-deg", action=Once,
                     type=float_at_least(1e-3, 180.0), default=10.0,
                     help="refuse a registration change turning more (default 10 degrees)")
    net.add_argument("--allow-registration-jump", action="store_true",
                     help="take registration changes above both limits (still logged)")
    return p
