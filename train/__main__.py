"""``python -m regseg.train RECIPE [options]``: ``regseg train RECIPE``, runnable by torchrun.

One process per rank: ``torchrun --nproc-per-node 2 -m regseg.train alignsegnet --minutes 1
--out runs/a`` trains with DistributedDataParallel over 2 ranks (see
:mod:`regseg.train.distributed`); without torchrun it is the plain single-process command.
"""

from __future__ import annotations

import sys

from regseg.cli import main as regseg_main
from regseg.train.distributed import shutdown


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return regseg_main(["train", *argv])
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
