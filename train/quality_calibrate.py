"""Calibrate QualityNet's flag threshold on the live chains the command line runs (family A).

``python -m regseg.train.quality_calibrate --out models/weights`` runs each chain of
:data:`regseg.train.quality_chain.GRID` (K = 1, 2, 3 registrations per frame, deformable stage on
and off; or ``--chains``) on live frames of the family-A CALIBRATION phantoms (``--calib-seeds``,
default 3100-3107 and 3700-3731, :mod:`regseg.train.quality_sets`) (and, with
``--randomised-calib-phantoms``, the randomised family-A phantoms 3300..), each frame with a known
random ``reference_to_mri`` error (:func:`regseg.train.quality_live.live_samples`). Per chain:
the threshold is the largest that still flags >= 95 % of the frames with true TRE > 5 mm, the
margin factor the 90th percentile of TRE / estimate (:func:`regseg.train.quality.calibrate`),
and how far the threshold moves with other phantoms: a bootstrap over phantoms
(:func:`regseg.train.quality_sets.threshold_interval`, ``interval`` in the JSON).
They are stored in the checkpoint (``calibration.by_chain``, weights unchanged); the chain
``regseg-stream`` runs by default also as the top-level ``threshold_mm``. The live path picks the
calibration of the chain it runs (:meth:`regseg.stream.quality.QualityCheck.bind_chain`) and
warns when there is none. Never family B, never the evaluation phantoms 1000-1003.

The default chain's threshold is calibrated otherwise (``--default-chain-on``, since addendum 34
``streams-bound``): on streams of the chain as ``regseg-stream`` runs it, temporal filter and
lagged stages included, for the whole flag (the estimate or any other check), at a 95 % confidence
bound over phantoms (:mod:`regseg.train.quality_stream`). For the other chains, not reproduced: the
temporal filter (their calibration frames are unrelated poses). Nor, for any, other AlignSegNet or
PLCReg weights than the shipped ones (their hashes are recorded: recalibrate after retraining
either).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

import torch

from regseg.errors import InputError
from regseg.machine import machine_name, utc_now
from regseg.models.qualitynet import WEIGHTS, load_qualitynet, save_qualitynet
from regseg.train.quality import CALIB_SEED0, DEFAULT_CACHE, calibrate
from regseg.train.quality_chain import DEFAULT_CHAIN, GRID, parse_chain
from regseg.train.quality_live import (
    _alignsegnet_id,
    calibration_pairs,
    calibration_report,
    predict_x,
)
from regseg.train.quality_sets import (
    CALIB_SEEDS_DEFAULT,
    calib_seeds,
    calibration_sets,
    parse_seeds,
    threshold_interval,
)
from regseg.train.quality_stream import (
    LENGTH,
    SEQUENCES,
    STRIDES,
    cached_streams,
    flag_rates,
    flag_threshold,
)


def _weights_id(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


#: ``--default-chain-on``: how the default chain's threshold is calibrated (addendum 34)
DEFAULT_CHAIN_METHODS = ("frames", "streams", "streams-bound")
DEFAULT_CHAIN_ON = "streams-bound"


def stream_calibration(args: argparse.Namespace, weights: Path, model, *,
                       bound: bool = False) -> dict:
    """The default chain's threshold from streams of it, for the whole flag (addendum 33;
    :mod:`regseg.train.quality_stream`): the threshold, the flag's rates there, the frames'
    estimate-alone threshold for comparison, and the bootstrap interval over phantoms.
    ``bound`` (``streams-bound``, addendum 34): the threshold is the interval's 5th percentile,
    at which the flag catches >= 95 % of the bad frames in >= 95 % of the phantom draws."""
    data = cached_streams(args.cache, calib_seeds(args), seed=args.seed, weights=weights)
    ok = torch.isfinite(data["tre_mm"])
    torch.set_num_threads(args.threads)
    estimate, tre = predict_x(model, data["x"][ok]), data["tre_mm"][ok].numpy()
    other, phantom = data["other"][ok].numpy(), data["phantom"][ok].numpy()
    point = flag_threshold(estimate, tre, other)
    interval = threshold_interval(estimate, tre, phantom, other=other, at_p5=bound)
    threshold = interval["threshold_mm_p5"] if bound else point
    return {"threshold_mm": threshold, **flag_rates(estimate, tre, other, threshold),
            "point_threshold_mm": point, "bound": bound,
            "estimate_alone_threshold_mm": calibrate(estimate, tre)["threshold_mm"],
            "frames": int(ok.sum()), "sequences_per_phantom": SEQUENCES,
            "frames_per_sequence": LENGTH, "strides": list(STRIDES), "interval": interval}


def calibrate_chains(args: argparse.Namespace, weights: Path, chains: list[str],
                     command: str) -> dict:
    """Calibrate ``weights`` on each of ``chains``; save to ``args.out``; returns the JSON part.

    Calibrations already in the checkpoint for other chains are kept (same weights)."""
    for chain in chains:
        parse_chain(chain)
    torch.set_num_threads(args.threads)
    model, previous = load_qualitynet(weights, fold=False)
    by_chain = dict(previous.get("by_chain") or {})
    report: dict[str, dict] = {}
    for chain in chains:
        print(f"chain {chain}", flush=True)
        data = calibration_pairs(args, weights, chain)
        torch.set_num_threads(args.threads)
        estimate, tre = predict_x(model, data["x"]), data["tre_mm"].numpy()
        calibration = calibrate(estimate, tre)
        streams = None
        method = "frames"  # the default chain's: --default-chain-on (quality_live: its default)
        if chain == DEFAULT_CHAIN:
            method = getattr(args, "default_chain_on", DEFAULT_CHAIN_ON)
        if method == "frames":
            interval = threshold_interval(estimate, tre, data["phantom"].numpy())
        else:  # addenda 33-34
            streams = stream_calibration(args, weights, model, bound=method == "streams-bound")
            calibration = {**calibration, "threshold_mm": streams["threshold_mm"]}
            interval = streams.pop("interval")
        by_chain[chain] = {**calibration, "chain": chain, "method": method}
        report[chain] = {**calibration, "method": method, "metrics": calibration_report(
            estimate, tre, data["group"].numpy(), calibration["threshold_mm"]),
            "interval": interval, **({"streams": streams} if streams else {})}
        print(f"  threshold {calibration['threshold_mm']:.4f} mm ({method}; 90 % of phantom draws "
              f"{interval['threshold_mm_p5']:.2f}-{interval['threshold_mm_p95']:.2f}), margin "
              f"factor {calibration['margin_factor']:.3f}; detection on other phantoms like "
              f"these: 5th percentile {interval['detection_p5']:.1%}", flush=True)
    if DEFAULT_CHAIN not in by_chain:
        raise InputError(f"--chains {' '.join(chains)}: the default chain {DEFAULT_CHAIN} has no "
                         "calibration in the checkpoint; include it")
    default = by_chain[DEFAULT_CHAIN]
    save_qualitynet(args.out / "qualitynet.pt", model, {
        "threshold_mm": default["threshold_mm"], "margin_factor": default["margin_factor"],
        "chain": DEFAULT_CHAIN, "by_chain": by_chain})
    summary_path = args.out / "qualitynet.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    part = {
        "command": command, "machine": machine_name(), "date": utc_now(),
        "alignsegnet": _alignsegnet_id(),
        "plcreg2d": _weights_id(WEIGHTS.parent / "plcreg2d.pt"),
        "previous": {k: previous.get(k) for k in ("threshold_mm", "margin_factor", "chain")},
        "default_chain": DEFAULT_CHAIN, "calibration": default,
        "calibration_sets": calibration_sets(args),
        "temporal_filter": "not applied (unrelated frames)", "by_chain": report}
    summary.pop("recalibration", None)  # of the one-chain calibration this replaces
    # the reports of chains calibrated before and kept in the checkpoint stay beside the new
    kept = (summary.get("chain_calibration") or {}).get("by_chain") or {}
    part["by_chain"] = {**{c: r for c, r in kept.items() if c in by_chain}, **report}
    summary["chain_calibration"] = part
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return part


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="folder of qualitynet.pt / .json to write")
    parser.add_argument("--weights", type=Path, default=None,
                        help="QualityNet checkpoint to calibrate (default OUT/qualitynet.pt)")
    parser.add_argument("--chains", nargs="+", default=list(GRID),
                        help="chains to calibrate, "
                        "K<n>/deformable-<on|off>/multi-start-<on|off>[/lc2-on] "
                        f"(default the grid {' '.join(GRID)})")
    parser.add_argument("--calib-seeds", default=CALIB_SEEDS_DEFAULT,
                        help="plain family-A calibration phantoms, seeds and FIRST-LAST ranges "
                        f"(default {CALIB_SEEDS_DEFAULT}; seeds >= {CALIB_SEED0} outside the "
                        "randomised ranges 3200-3399)")
    parser.add_argument("--frames", type=int, default=50, help="frames per calibration phantom")
    parser.add_argument("--randomised-calib-phantoms", type=int, default=0,
                        help="also calibrate on this many randomised family-A phantoms "
                        "(seeds 3300..)")
    parser.add_argument("--randomised-frames", type=int, default=25,
                        help="frames per randomised calibration phantom")
    parser.add_argument("--default-chain-on", choices=list(DEFAULT_CHAIN_METHODS),
                        default=DEFAULT_CHAIN_ON,
                        help="the default chain's threshold from unrelated frames (the estimate "
                        "alone flags >= 95 %% of TRE > 5 mm), from streams of the chain (the "
                        "whole flag does; addendum 33), or streams-bound: that at a 95 %% "
                        "confidence bound over phantoms (addendum 34) "
                        f"(default {DEFAULT_CHAIN_ON})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the frames and errors")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="cache of rendered live pairs")


def run(args: argparse.Namespace, *, command: str | None = None) -> int:
    """Run ``regseg train quality-calibration`` from parsed arguments (bad input: InputError,
    before any work)."""
    for chain in args.chains:
        parse_chain(chain)
    parse_seeds(args.calib_seeds)
    for flag, value in (("--frames", args.frames),
                        ("--threads", args.threads)):
        if value < 1:
            raise InputError(f"{flag} {value}: expected >= 1")
    if args.randomised_calib_phantoms < 0 or args.randomised_frames < 1:
        raise InputError(f"--randomised-calib-phantoms {args.randomised_calib_phantoms} / "
                         f"--randomised-frames {args.randomised_frames}: expected >= 0 / >= 1")
    weights = (args.weights or args.out / WEIGHTS.name).resolve()
    if not weights.is_file():
        raise InputError(f"--weights {weights}: no such QualityNet checkpoint")
    _, existing = load_qualitynet(weights)
    if DEFAULT_CHAIN not in args.chains and DEFAULT_CHAIN not in (existing.get("by_chain") or {}):
        raise InputError(f"--chains {' '.join(args.chains)}: {weights} has no calibration for "
                         f"the default chain {DEFAULT_CHAIN} yet; include it")
    args.calib_frames = args.randomised_calib_frames = None  # calibration_pairs' other options
    if command is None:  # regseg train quality-calibration ... (or python -m regseg.train ...)
        argv = sys.argv[1:]
        rest = argv[argv.index("quality-calibration") + 1:] if "quality-calibration" in argv \
            else argv
        command = shlex.join(["regseg", "train", "quality-calibration", *rest])
    part = calibrate_chains(args, weights, args.chains, command)
    print(json.dumps({c: {k: v for k, v in r.items() if k != "metrics"}
                      | {"plain": r["metrics"].get("plain")}
                      for c, r in part["by_chain"].items()}, indent=2))
    return 0


def add_cli(parser: argparse.ArgumentParser) -> None:
    """``regseg train quality-calibration``: the options and the runner (TRAIN_MODELS)."""
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regseg.train.quality_calibrate",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(parser.parse_args(argv), command=shlex.join(
            ["python", "-m", "regseg.train.quality_calibrate", *argv]))
    except InputError as exc:
        print(f"python -m regseg.train.quality_calibrate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
