"""Fixtures for the bench tests: a bench script loaded as a module."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="session")
def load_bench() -> Callable[[str], ModuleType]:
    """``load_bench("roi")``: bench/roi.py as a module (the benches import their siblings, e.g.
    ``common`` and ``accuracy``, so bench/ is on sys.path while it loads)."""
    def load(name: str) -> ModuleType:
        sys.path.insert(0, str(BENCH))
        try:
            spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        finally:
            sys.path.remove(str(BENCH))

    return load
