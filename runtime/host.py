"""What this process may use of the machine: the cores it is allowed to run on, and what its CPU
can do (the instruction set flags that decide how INT8 products are summed)."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

X86 = ("x86_64", "amd64", "i386", "i686", "x86")
# Instructions that sum u8 x s8 products in 32 bits: VNNI (AVX-512 or AVX) and AMX tiles.
INT8_WIDE_SUMS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def usable_cores(cgroups: str | os.PathLike[str] = "/sys/fs/cgroup", own: str = "") -> int:
    """The cores this process may use: its CPU affinity (`taskset`, a container's cpuset), and
    no more than its CPU quota rounded up (`docker run --cpus 2`, a Kubernetes CPU limit),
    which leaves the affinity at every core of the machine: a thread per core there ran
    throttled by the quota. Both can be fewer than the machine's `os.cpu_count()`.

    `cgroups` is where the cgroup file system is mounted and `own` the text of
    /proc/self/cgroup (read when empty): for tests."""
    try:
        cores = len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(Path(cgroups), own or _read("/proc/self/cgroup"))
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _read(path: str | os.PathLike[str]) -> str:
    """The text of a kernel file (/proc, /sys); "" where it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _quota_v2(text: str) -> float | None:
    """cgroup v2 `cpu.max`: "QUOTA PERIOD" (microseconds), or "max PERIOD" for none."""
    parts = text.split()
    try:
        return int(parts[0]) / int(parts[1]) if len(parts) == 2 and parts[0] != "max" else None
    except ValueError:
        return None


def _quota_v1(folder: Path) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` (-1 for none) over `cpu.cfs_period_us`."""
    try:
        quota = int(_read(folder / "cpu.cfs_quota_us") or -1)
        period = int(_read(folder / "cpu.cfs_period_us") or 0)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_quota(cgroups: Path, own: str) -> float | None:
    """The CPUs' worth of time a second that this process's cgroups allow (the tightest of its
    cgroup and the ones above it that can be read), or None where none is set or none can be
    read. `own`: /proc/self/cgroup's lines ("0::/path" for cgroup v2, "N:cpu,cpuacct:/path"
    for v1). Inside a container the path may name a folder of the host's: the mount's root,
    the container's own cgroup, is read too."""
    found: list[float] = []
    for line in own.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: one hierarchy, cpu.max in each folder
            base, read = cgroups, lambda f: _quota_v2(_read(f / "cpu.max"))
        elif "cpu" in controllers.split(","):
            base = next((cgroups / n for n in (controllers, "cpu", "cpu,cpuacct")
                         if (cgroups / n).is_dir()), cgroups / "cpu")  # fmt: skip
            read = _quota_v1
        else:
            continue
        folder = base / path.strip().lstrip("/")
        for f in [folder, *folder.parents]:
            if f == base or base in f.parents:
                found += [q for q in [read(f)] if q]
    return min(found) if found else None


def cpu_model(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> str:
    """The CPU's model name in /proc/cpuinfo; where it has none, what `platform` says."""
    for line in _read(cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def cpu_flags(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's ISA flags in /proc/cpuinfo; empty where it cannot be read (not Linux)."""
    for line in _read(cpuinfo).splitlines():
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
