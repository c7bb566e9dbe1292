"""Which cases a rank runs: a fixed share of the manifest, less the cases already finished.

Sharding is round-robin over the manifest order (rank r takes cases r, r + N, r + 2N...), so
neighbouring cases (often similar in size) spread over the ranks. A case is finished when its
folder holds ``result.json`` with status ``ok``, the digest of its manifest row and options
(:func:`regseg.batch.manifest.case_digest`) and every output it lists: a restarted job (any
number of ranks) skips exactly those and redoes the rest, failed cases included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
RESULT = "result.json"


def shard(items: list[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s share of ``items`` (round-robin; the shares partition ``items``)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    return items[rank::world]


def finished(folder: Path, digest: str) -> bool:
    """The case in ``folder`` finished with these inputs and options (see the module doc)."""
    try:
        record = json.loads((folder / RESULT).read_text())
    except (OSError, ValueError):
        return False
    return (record.get("status") == "ok" and record.get("digest") == digest
            and all((folder / name).is_file() for name in record.get("outputs", [])))
