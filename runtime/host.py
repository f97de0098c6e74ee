"""What this process may use of the machine: the cores it is allowed to run on, and what its CPU
can do (the instruction set flags that decide how INT8 products are summed)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

X86 = ("x86_64", "amd64", "i386", "i686", "x86")
# Instructions that sum u8 x s8 products in 32 bits: VNNI (AVX-512 or AVX) and AMX tiles.
INT8_WIDE_SUMS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or `taskset`'s
    limit), which can be fewer than the machine's `os.cpu_count()`."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> str:
    """The CPU's model name in /proc/cpuinfo; where it has none, what `platform` says."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def cpu_flags(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's ISA flags in /proc/cpuinfo; empty where it cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def int8_sums_saturate(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """True on an x86 CPU without VNNI or AMX. There ONNX Runtime's INT8 kernels add pairs of
    u8 x s8 products in saturating 16-bit arithmetic (PMADDUBSW: 255 x 127 x 2 > 32,767), so an
    INT8 model's outputs depend on the CPU; its session option `session.x64quantprecision`
    then makes them exact (u8 x u8 kernels, slower). Also True on x86 when the flags cannot be
    read (exact rather than fast where unknown); False off x86."""
    if (machine or platform.machine()).lower() not in X86:
        return False
    have = cpu_flags() if flags is None else flags
    return not have & INT8_WIDE_SUMS
