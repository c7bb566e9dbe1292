"""Run a batch job over a manifest on this rank: load ahead, compute, write, record.

Each rank (one process; ``torchrun`` starts N of them, one per GPU, or several on a CPU) takes
its share of the unfinished cases (:mod:`regseg.batch.shard`). A ``DataLoader`` with worker
processes reads the next cases' NIfTI files while this process computes the current one. A
case's outputs are written into ``OUT/.partial/NAME.rankR`` and renamed to ``OUT/NAME`` once
complete (with ``result.json`` last), so a kill at any instant leaves finished cases and nothing
half-written. Every case, good or bad, appends a line to ``OUT/logs/rankR.jsonl``; a bad case is
recorded there and skipped. When all ranks are done, rank 0 writes ``OUT/results.jsonl`` (one
line per manifest case, in order) and ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from regseg.batch.jobs import Job
from regseg.batch.manifest import Case, case_digest
from regseg.batch.shard import RESULT, finished, shard
from regseg.distributed import Dist


class _Loads(Dataset):
    """Case ``i`` loaded by ``job.load`` (in a worker): inputs, or the error that stopped it."""

    def __init__(self, cases: list[Case], job: Job) -> None:
        self.cases, self.job = cases, job

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, Any]:
        case, t0 = self.cases[i], time.perf_counter()
        try:
            inputs, error = self.job.load(case), None
        except Exception as exc:  # noqa: BLE001 - recorded per case, never ends the job
            inputs, error = None, _describe(exc)
        return {"case": case, "inputs": inputs, "error": error,
                "io_s": time.perf_counter() - t0}


def _only(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]


def _describe(exc: BaseException) -> str:
    """``Type: message`` and, for errors that are not about the input, where it happened."""
    from regseg.errors import InputError

    text = f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, (InputError, FileNotFoundError)):
        frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        text += "".join(f" (at {f.filename}:{f.lineno})" for f in frame)
    return text


def _commit(out: Path, case: Case, digest: str, job: Job, inputs: dict[str, Any],
            computed: dict[str, Any], rank: int, record: dict[str, Any]) -> dict[str, Any]:
    """Write a case's outputs and ``result.json`` into a partial folder, then move it into
    place; returns its metrics."""
    partial = out / ".partial" / f"{case['name']}.rank{rank}.{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    metrics = job.write(partial, inputs, computed)
    outputs = sorted(p.name for p in partial.iterdir())
    result = {"name": case["name"], "status": "ok", "digest": digest, "outputs": outputs,
              **record, "metrics": metrics}
    (partial / RESULT).write_text(json.dumps(result, indent=1, default=float) + "\n")
    final = out / case["name"]
    if final.exists():  # an earlier run's outputs for other inputs or options
        shutil.rmtree(final)
    partial.rename(final)
    return metrics


def _progress_path(out: Path, rank: int) -> Path:
    return out / "logs" / f"progress.rank{rank}"


def _done_by_all(out: Path, world: int, run_id: int) -> int:
    """Cases the ranks have finished (ok or failed) in this run, from their progress files."""
    total = 0
    for r in range(world):
        try:
            rid, count = _progress_path(out, r).read_text().split()
        except (OSError, ValueError):
            continue
        total += int(count) if int(rid) == run_id else 0
    return total


def run_rank(job: Job, cases: list[Case], out: Path, args: argparse.Namespace, dist: Dist, *,
             workers: int, progress: bool) -> dict[str, Any] | None:
    """Run this rank's share of ``cases`` into ``out``.

    Returns:
        on rank 0, the job's summary (also in ``out/summary.json``); ``None`` elsewhere.
    """
    t_start = time.perf_counter()
    options = job.options(args)
    digests = {c["name"]: case_digest(job.name, c, options) for c in cases}
    mine = shard(cases, dist.rank, dist.world)
    todo = [c for c in mine if not finished(out / c["name"], digests[c["name"]])]
    run_id = int(dist.from_main(float(time.time_ns() // 1_000_000)))
    total_todo = round(dist.mean({"n": float(len(todo))})["n"] * dist.world)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    _progress_path(out, dist.rank).write_text(f"{run_id} 0\n")
    bar = None
    if progress and dist.main:
        from tqdm import tqdm

        bar = tqdm(total=total_todo, desc=f"batch {job.name}", unit="case")
    loader = DataLoader(_Loads(todo, job), batch_size=1, collate_fn=_only, num_workers=workers,
                        prefetch_factor=2 if workers else None)
    # the workers start (fork) and read the first cases while the engine is built (CUDA
    # initialised after the fork, never in a worker)
    items = iter(loader)
    engine = job.make_engine(args, dist.device) if todo else None
    log = (out / "logs" / f"rank{dist.rank}.jsonl").open("a")
    done, t_wait = 0, time.perf_counter()
    for item in items:
        case = item["case"]
        record: dict[str, Any] = {"rank": dist.rank, "run": run_id, "io_s": item["io_s"],
                                  "wait_s": time.perf_counter() - t_wait}
        error = item["error"]
        if error is None:
            try:
                t0 = time.perf_counter()
                computed = job.compute(engine, item["inputs"])
                if dist.device.type == "cuda":
                    torch.cuda.synchronize(dist.device)
                record["compute_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                metrics = _commit(out, case, digests[case["name"]], job, item["inputs"],
                                  computed, dist.rank, record)
                record["write_s"] = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - a bad case is recorded and skipped
                error = _describe(exc)
        line = {"name": case["name"], "status": "ok" if error is None else "error", **record,
                "time": time.time()}
        if error is None:
            line["metrics"] = metrics
        else:
            line["error"] = error
        log.write(json.dumps(line, default=float) + "\n")
        log.flush()
        done += 1
        _progress_path(out, dist.rank).write_text(f"{run_id} {done}\n")
        if bar is not None:
            _update(bar, _done_by_all(out, dist.world, run_id), t_start)
        t_wait = time.perf_counter()
    log.close()
    if bar is not None:  # the other ranks' last cases
        while (n := _done_by_all(out, dist.world, run_id)) < total_todo:
            _update(bar, n, t_start)
            time.sleep(0.5)
        _update(bar, total_todo, t_start)
        bar.close()
    dist.barrier()
    if not dist.main:
        return None
    return _summarise(job, cases, digests, out, dist.world, run_id, len(cases) - total_todo,
                      time.perf_counter() - t_start)


def _update(bar: Any, n: int, t_start: float) -> None:
    bar.n = n
    bar.set_postfix_str(f"{n / max(time.perf_counter() - t_start, 1e-9):.2f} cases/s all ranks")
    bar.refresh()


def _summarise(job: Job, cases: list[Case], digests: dict[str, str], out: Path, world: int,
               run_id: int, skipped: int, wall_s: float) -> dict[str, Any]:
    """``results.jsonl`` (one line per case, manifest order) and ``summary.json``."""
    latest: dict[str, dict[str, Any]] = {}
    this_run: list[dict[str, Any]] = []
    for log in sorted((out / "logs").glob("rank*.jsonl")):
        for text in log.read_text().splitlines():
            try:
                rec = json.loads(text)
            except ValueError:  # a line cut by a kill
                continue
            if rec["name"] not in latest or rec["time"] >= latest[rec["name"]]["time"]:
                latest[rec["name"]] = rec
            if rec.get("run") == run_id:
                this_run.append(rec)
    rows = []
    for case in cases:
        folder = out / case["name"]
        if finished(folder, digests[case["name"]]):
            rows.append(json.loads((folder / RESULT).read_text()))
        else:
            rows.append(latest.get(case["name"], {"name": case["name"], "status": "missing"}))
    tmp = out / "results.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in rows))
    tmp.replace(out / "results.jsonl")
    shutil.rmtree(out / ".partial", ignore_errors=True)
    ok = [r for r in this_run if r["status"] == "ok"]
    summary = {
        "job": job.name, "cases": len(cases), "ranks": world,
        "ok": sum(r["status"] == "ok" for r in rows),
        "failed": [r["name"] for r in rows if r["status"] != "ok"],
        "skipped_finished": skipped, "ran": len(this_run), "wall_s": round(wall_s, 2),
        "cases_per_s": round(len(this_run) / wall_s, 4) if this_run else None,
        "mean_s": {k: round(sum(r.get(k, 0.0) for r in ok) / len(ok), 4) if ok else None
                   for k in ("io_s", "wait_s", "compute_s", "write_s")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
