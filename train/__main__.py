"""``python -m regseg.train RECIPE [options]``: ``regseg train RECIPE``, runnable by torchrun.

One process per rank: ``torchrun --nproc-per-node 2 -m regseg.train alignsegnet --minutes 1
--out runs/a`` trains with DistributedDataParallel over 2 ranks (see
:mod:`regseg.train.distributed`); without torchrun it is the plain single-process command.
"""

from __future__ import annotations

import os
import sys

from regseg.cli import main as regseg_main  # light: torch loads after OMP_WAIT_POLICY is set

#: Recipes whose loop shards the global batch over the ranks (train/distributed.py). The others
#: would train the same thing on every rank and write over each other: they are refused.
#: ``quality-calibration`` is not training (one inference pass per live chain) and
#: ``intensity-reference`` a few seconds of quantiles: run each once.
DISTRIBUTED = ("alignsegnet", "ascseg", "biregnet", "plcreg2d", "plcreg3d", "simnet", "affine3d",
               "warpseg")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    recipe = next((a for a in argv if not a.startswith("-")), None)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and recipe not in DISTRIBUTED + (None,):
        print(f"regseg train: error: {recipe} does not run under torchrun yet (its loop does "
              f"not shard the batch over ranks; these do: {', '.join(DISTRIBUTED)}); run it as "
              "one process.", file=sys.stderr)
        return 2
    try:
        return regseg_main(["train", *argv])
    finally:
        from regseg.distributed import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
