"""The options every ``regseg train RECIPE`` shares: threads, a step count, ``--resume`` and its
state interval, progress. Written once so each recipe gets the same names, checks and help."""

from __future__ import annotations

import argparse

from regseg.cli_checks import int_at_least


def add_run_options(parser: argparse.ArgumentParser, *, threads: int = 1,
                    checkpoint_every: int = 50) -> None:
    """``--threads``, ``--steps``, ``--resume``, ``--checkpoint-every`` and ``--no-progress``
    (read by :mod:`regseg.train.distributed` / :mod:`regseg.train.resume` in the recipes)."""
    parser.add_argument("--threads", type=int_at_least(1), default=threads,
                        help=f"torch CPU threads per rank (default {threads}; capped at the "
                             "node's cores over its ranks under torchrun)")
    parser.add_argument("--steps", type=int_at_least(1), default=None,
                        help="stop after this many steps (default: fill --minutes)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last state (same options)")
    parser.add_argument("--checkpoint-every", type=int_at_least(0), default=checkpoint_every,
                        help=f"steps between resumable states (default {checkpoint_every}; "
                             "0: at the end only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
