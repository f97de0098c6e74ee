"""What this process may use of the machine: the cores it is allowed to run on."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or `taskset`'s
    limit), which can be fewer than the machine's `os.cpu_count()`."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
