"""``python -m regseg.batch JOB MANIFEST --out DIR``: ``regseg batch``, runnable by torchrun
(``torchrun --nproc-per-node 2 -m regseg.batch register pairs.csv --out out/``)."""

from __future__ import annotations

import sys

from regseg.cli import main as regseg_main

if __name__ == "__main__":
    sys.exit(regseg_main(["batch", *sys.argv[1:]]))
