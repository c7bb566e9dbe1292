"""The ranks of a ``torchrun`` job: which process this is, its device and threads, collectives.

Run plainly (no torchrun), :func:`init` gives a one-rank :class:`Dist` and every collective is a
no-op. Under ``torchrun`` (environment ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``PORT``) it joins the process group (gloo on CPU, NCCL on
CUDA, one GPU per local rank). The training loops (:mod:`regseg.train.distributed`) and the batch
jobs (:mod:`regseg.batch`) share it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from regseg.errors import InputError


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job: ``rank`` of ``world`` (``local_*`` on this node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, validates and writes."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one rank (a process group is up)."""
        return self.world > 1

    def shard(self, global_batch: int) -> slice:
        """This rank's rows of a global batch of ``global_batch`` samples (equal shares).

        Raises:
            InputError: ``global_batch`` not a multiple of the world size.
        """
        if global_batch % self.world:
            raise InputError(f"--batch-size {global_batch}: the global batch must split evenly "
                             f"over the {self.world} ranks; use a multiple of {self.world}.")
        per = global_batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def from_main(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (a float64 broadcast; no-op on one rank)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        tdist.broadcast(t, src=0)
        return float(t.item())

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over ranks of each value (the same keys on every rank); for logging losses."""
        if not self.active or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self._comm_device)
        tdist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(values, t.tolist(), strict=True)}

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if tdist.get_backend() == "nccl" else torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"environment {name}={text!r}: an integer is expected (set by "
                         "torchrun)") from None


def _cpus() -> int:
    """The CPUs this process may run on (affinity: containers and taskset are honoured)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def threads_per_rank(requested: int | None, local_world: int) -> int:
    """Torch CPU threads for one rank: ``requested``, capped so that the ranks of one node
    together use no more threads than it has cores (2 ranks on 2 cores: 1 thread each)."""
    cap = max(1, _cpus() // max(1, local_world))
    return max(1, min(requested or cap, cap)) if local_world > 1 else max(1, requested or cap)


def init(*, threads: int | None = None, device: str = "auto", backend: str | None = None,
         timeout_s: float = 1800.0) -> Dist:
    """Join the torchrun job described by the environment (or be the only rank), set threads.

    Args:
        threads: wanted torch CPU threads per rank (see :func:`threads_per_rank`).
        device: ``auto`` (CUDA when there, one GPU per local rank), ``cpu`` or ``cuda``.
        backend: ``gloo`` or ``nccl``; default NCCL on CUDA, else gloo (batch jobs, which only
            coordinate, use gloo everywhere).
        timeout_s: how long a collective waits for a slow rank before failing.
    Returns:
        this process's :class:`Dist`; on CUDA its device is ``cuda:LOCAL_RANK``.
    Raises:
        InputError: ``device`` unknown, or ``cuda`` asked for where there is none.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device {device!r}: use auto, cpu or cuda (one GPU per local rank)")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available here; use --device cpu")
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    torch.set_num_threads(threads_per_rank(threads, local_world))
    cuda = device != "cpu" and torch.cuda.is_available()
    where = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(where)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend or ("nccl" if cuda else "gloo"),
                                 timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank=rank, world=world, local_rank=local_rank, local_world=local_world,
                device=where)


def shutdown() -> None:
    """Leave the process group (if any); every rank calls it once at the end."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


@contextlib.contextmanager
def joined(**kwargs) -> Iterator[Dist]:
    """``with joined(threads=...) as dist:`` — :func:`init` (same arguments), and
    :func:`shutdown` afterwards."""
    dist = init(**kwargs)
    try:
        yield dist
    finally:
        shutdown()
