"""Where a measurement ran: the machine's name and the time, for every JSON that carries numbers."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model and the cores this process may use, e.g. ``AMD EPYC 9B14 (2 cores)``."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return f"{model} ({cores} cores)"


def machine_name() -> str:
    """The CPU, and the GPU when torch (already imported) sees one."""
    import sys

    name = cpu_name()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        name += f" + {torch.cuda.get_device_name(0)}"
    return name


def utc_now() -> str:
    """The time now, UTC, to the minute: ``2026-11-30 15:44 UTC``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages now (None where the OS has none).

    Written with every measurement, so a timing taken while other jobs shared the cores says so:
    on a 2-core machine a load of 4 roughly doubles every wall time.
    """
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
