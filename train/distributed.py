"""Training under ``torchrun``: one process per rank, written once for every recipe in train/.

A recipe calls :func:`regseg.distributed.init` first; run plainly (no torchrun) it gets a one-rank
:class:`~regseg.distributed.Dist` and nothing changes. Under ``torchrun --nproc-per-node N -m
regseg.train RECIPE ...`` the recipe:

- draws the *global* batch from the same seeded generator on every rank and trains on its
  contiguous slice (:meth:`Dist.shard`), so the samples of a step are those of a single process
  with the same ``--batch-size``; DistributedDataParallel averages the gradients (:func:`wrap`);
- takes its schedule (learning-rate progress, stop) from rank 0 (:meth:`Dist.from_main`), so the
  ranks never diverge nor wait on each other's clocks;
- logs, validates and writes checkpoints on rank 0 only (:attr:`Dist.main`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch.distributed as tdist
from torch import nn

from regseg.distributed import Dist


@contextlib.contextmanager
def main_first(dist: Dist) -> Iterator[None]:
    """Local rank 0 runs the block first (fills a data cache), then the other local ranks (they
    read it back instead of generating it again)."""
    if dist.active and dist.local_rank != 0:
        tdist.barrier()
    try:
        yield
    finally:
        if dist.active and dist.local_rank == 0:
            tdist.barrier()


def wrap(model: nn.Module, dist: Dist) -> nn.Module:
    """The model as the training step should call it: DistributedDataParallel over the ranks
    (BatchNorm synchronised across ranks on CUDA; on CPU torch has no SyncBatchNorm, so batch
    statistics stay per rank), or the model itself on one rank."""
    model = model.to(dist.device)
    if not dist.active:
        return model
    # DDP warns once per rank when a weight with a size-1 axis (a conv on one input channel) has
    # another stride on that axis than its gradient bucket: the same memory, no copy is slower.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    if dist.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[dist.device.index])
    return nn.parallel.DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside :func:`wrap`'s (for evaluation and checkpoints)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
