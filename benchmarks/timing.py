"""The timing harness: warm up, synchronize, repeat, summarize as mean and percentiles.

Also the peak-memory probes (process RSS from the kernel; GPU memory comes from torch in the
baseline code path only).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# The fewest calls a percentile is reported from: below them it is only the largest of them, or
# close to it (p99 of 30 calls interpolates between the two largest: README quoted the largest
# of 30 as a p99). Where there are fewer, it is None, and the max speaks for the tail.
LEAST_CALLS = {90: 10, 99: 100}


@dataclass(frozen=True)
class Timing:
    """Latency figures of one measured call, in milliseconds, over `repeats` calls (p90 and p99
    None where there are fewer calls than LEAST_CALLS)."""

    repeats: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def summarize(seconds: list[float] | np.ndarray) -> Timing:
    """Mean, std and percentiles (linear interpolation, as numpy) of per-call seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no timings to summarize")

    def tail(q: int) -> float | None:
        return float(np.percentile(ms, q)) if ms.size >= LEAST_CALLS[q] else None

    return Timing(
        repeats=int(ms.size),
        mean_ms=float(ms.mean()),
        std_ms=float(ms.std()),
        min_ms=float(ms.min()),
        p50_ms=float(np.percentile(ms, 50)),
        p90_ms=tail(90),
        p99_ms=tail(99),
        max_ms=float(ms.max()),
    )


def time_calls(
    fn: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Call `fn` `warmup` times untimed, then `repeats` times timed one by one.

    `sync` (e.g. `torch.cuda.synchronize`) runs after every call, inside the timed span, so that
    asynchronous GPU work is counted where it happens.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    clock = time.perf_counter
    for _ in range(repeats):
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        times.append(clock() - t0)
    return summarize(times)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB: Linux's VmHWM, else ru_maxrss.
    Not ru_maxrss first: Linux carries it over fork and exec, so a job's process started by
    mars-bench reported mars-bench's own peak where that was higher (178 MiB for every INT8
    row, its own about 118, once mars-bench had opened the FP32 file to check it)."""
    try:
        with open("/proc/self/status", "rb") as f:  # bytes: its Name line may be any
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    """Resident set size now, in MiB (from /proc/self/statm; falls back to the peak)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()
