"""Compiled CPU kernels (numba) for the few operations torch's CPU build runs slowly for us.

Each kernel has a torch twin it must equal to rounding (tested), is used only where a caller asks
for it (:func:`regseg.kernels.trilinear.enabled`), and falls back to torch where numba is missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def switched_on(family: str | None = None) -> bool:
    """Whether the environment allows compiled kernels (``REGSEG_NUMBA=0`` turns them all off;
    ``REGSEG_NUMBA_<FAMILY>=0`` one family, e.g. ``REGSEG_NUMBA_LABELS=0`` the label kernels, so
    a bench can time their torch twins with everything else the same)."""
    if os.environ.get("REGSEG_NUMBA", "1") == "0":
        return False
    return family is None or os.environ.get(f"REGSEG_NUMBA_{family.upper()}", "1") != "0"


def compiled(cache: dict[str, object], functions: dict[str, Callable],
             **options: object) -> dict[str, object] | None:
    """``functions`` compiled by ``numba.njit(cache=True, nogil=True, **options)``, once, kept in
    ``cache`` (numba compiles on first call, then loads from its on-disk cache); None without
    numba."""
    if not cache:
        try:
            import numba
        except ImportError:  # pragma: no cover - exercised where numba is not installed
            cache["none"] = None
            return None
        jit = numba.njit(cache=True, nogil=True, **options)
        cache.update({name: jit(fn) for name, fn in functions.items()})
    return None if "none" in cache else cache
