"""The conditions a benchmark ran under: CPU, GPU, library versions, threads, machine name.

Every result file records them, so two numbers are only compared when their conditions match.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import socket
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from marsvision.runtime.host import cpu_flags, cpu_model, usable_cores

LIBRARIES = (
    "marsvision",
    "numpy",
    "pillow",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx",
    "torch",
    "torchvision",
    "tensorrt",
)


def cpu_info(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> dict[str, Any]:
    """CPU model, logical/physical cores, the cores this process may use, and ISA flags of note."""
    physical: set[tuple[str, str]] = set()
    flags = cpu_flags(cpuinfo)  # the runtime's reading, which decides its INT8 kernels
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    phys_id = core_id = "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "physical id":
            phys_id = value
        elif key == "core id":
            core_id = value
            physical.add((phys_id, core_id))
    notable = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "f16c")
    return {
        "model": cpu_model(cpuinfo),
        "logical_cores": os.cpu_count(),
        "physical_cores": len(physical) or None,
        "usable_cores": usable_cores(),
        "isa": [f for f in notable if f in flags],
        "arch": platform.machine(),
    }


def nvidia_smi(query: str) -> list[list[str]] | None:
    """Rows of `nvidia-smi --query-<query> --format=csv,noheader,nounits`; None without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[p.strip() for p in line.split(",")] for line in out.strip().splitlines()]


def gpu_info() -> dict[str, Any] | None:
    """GPU name, driver and memory from nvidia-smi; None when there is no NVIDIA GPU."""
    rows = nvidia_smi("gpu=name,driver_version,memory.total,compute_cap")
    parts = rows[0] if rows else []
    if len(parts) < 3:
        return None
    return {
        "name": parts[0],
        "driver": parts[1],
        "memory_mib": int(parts[2]) if parts[2].isdigit() else parts[2],
        "compute_capability": parts[3] if len(parts) > 3 else None,
    }


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the numbers (absent ones left out)."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def machine_cpu_seconds(
    stat: str | os.PathLike[str] = "/proc/stat", cpus: set[int] | None = None
) -> tuple[float, float] | None:
    """CPU seconds since boot of the CPUs `cpus` (None: all of them): (busy, stolen by the
    hypervisor); None where /proc/stat cannot be read (not Linux) or lists none of them."""
    try:
        with open(stat, encoding="ascii") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
        # cpu<N> user nice system idle iowait irq softirq steal (guest time is inside user)
        names = {"cpu"} if cpus is None else {f"cpu{n}" for n in cpus}
        rows = [[int(v) for v in fields[1:9]] for fields in lines if fields[0] in names]
    except (OSError, ValueError):
        return None
    if not rows or any(len(r) < 8 for r in rows):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = sum(r[0] + r[1] + r[2] + r[5] + r[6] for r in rows)  # user nice system irq softirq
    return busy / hz, sum(r[7] for r in rows) / hz


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children (a job run in its own process)."""
    import resource

    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class OtherWork:
    """What the CPUs this process may run on did beside it over a span (`with OtherWork() as
    w:`): `w.share`, the busy CPU time of other processes there (and CPU time stolen by the
    hypervisor) over those CPUs' time, 0 to 1; None where the counters cannot be read. A noisy
    row with a high share was slowed by other work, not by the model."""

    def __init__(self, stat: str | os.PathLike[str] = "/proc/stat") -> None:
        self._stat = stat
        affinity = getattr(os, "sched_getaffinity", None)  # taskset, a container's cpuset
        self._cpus: set[int] | None = affinity(0) if affinity else None

    def _read(self) -> tuple[float, float] | None:
        return machine_cpu_seconds(self._stat, self._cpus)

    def __enter__(self) -> OtherWork:
        self.share: float | None = None
        self._machine = self._read()
        self._own = own_cpu_seconds()
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._t0
        after = self._read()
        if self._machine is None or after is None or wall <= 0:
            return
        own = own_cpu_seconds() - self._own
        busy = after[0] - self._machine[0] - own
        stolen = after[1] - self._machine[1]
        cpus = len(self._cpus) if self._cpus else os.cpu_count() or 1
        self.share = round(min(1.0, max(0.0, (busy + stolen) / (wall * cpus))), 3)


def source_revision(root: Path = Path(__file__).resolve().parents[1]) -> dict[str, Any] | None:
    """The git commit of the marsvision checkout that runs (`root`: the folder of its stage
    folders), and whether tracked files differ from it; None outside a git checkout (an
    installed wheel) or without git. The version number stays 0.1.0 from commit to commit."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()  # fmt: skip

    if not (root / ".git").exists():  # a venv inside a checkout is not that checkout
        return None
    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return None


def source_words(conditions: dict[str, Any]) -> str:
    """The words after a report's versions, `(commit abc..., with changes)`, where the code ran
    from a git checkout (`source_revision`); "" otherwise, and for records made before it was
    kept."""
    source = conditions.get("source")
    if not source:
        return ""
    return f" (commit {source['commit'][:12]}{', with changes' if source['dirty'] else ''})"


# The instruction set that sets the CPU's INT8/BF16 kernels, best first (ONNX Runtime's and
# oneDNN's fast paths); the first one the CPU has names it in `machine_name`.
ISA_TIERS = (
    ("amx_int8", "amx"),
    ("avx512_vnni", "avx512-vnni"),
    ("avx512f", "avx512"),
    ("avx_vnni", "avx-vnni"),
    ("avx2", "avx2"),
)


def _isa_tier(cpu: dict[str, Any]) -> str | None:
    """The best of `ISA_TIERS` that `cpu_info`'s isa lists, None when it lists none."""
    have = set(cpu.get("isa") or ())
    return next((name for flag, name in ISA_TIERS if flag in have), None)


def machine_name(cpu: dict[str, Any], gpu: dict[str, Any] | None) -> str:
    """A short file-name-safe label: the GPU when there is one, else the CPU, the best of its
    ISA tiers and its usable cores. The tier is in the name because the model name is often
    generic ("AMD EPYC" is a Zen 3 without AVX-512 on one machine, a Zen 4 with VNNI on
    another) and INT8 speed differs several-fold between them."""
    if gpu:
        base = str(gpu["name"]).replace("NVIDIA", "")
    else:
        base = re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*", "", str(cpu["model"]))
        tier = _isa_tier(cpu)
        base = f"{base}-{tier}-{cpu['usable_cores']}c" if tier else f"{base}-{cpu['usable_cores']}c"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", base).strip("-").lower()
    return slug or "unknown"


def onnxruntime_session(threads: int | None) -> dict[str, Any] | None:
    """The runtime's ONNX Runtime session options that decide its speed (None without
    onnxruntime). Spinning alone doubles a latency: a review measured 6.7 ms at batch 1
    without it, 13 ms with ONNX Runtime's default, on 2 busy vCPUs."""
    from marsvision.runtime.backends.onnxruntime import session_options
    from marsvision.runtime.errors import MarsvisionError

    try:
        so = session_options(threads)
    except MarsvisionError:
        return None
    return {
        "graph_optimization_level": str(so.graph_optimization_level).rsplit(".", 1)[-1],
        "execution_mode": str(so.execution_mode).rsplit(".", 1)[-1],
        "intra_op_num_threads": so.intra_op_num_threads,
        "inter_op_num_threads": so.inter_op_num_threads,
        "allow_spinning": so.get_session_config_entry("session.intra_op.allow_spinning") != "0",
    }


def capture_conditions(*, threads: int | None = None, device: str = "cuda") -> dict[str, Any]:
    """The full record of this machine and process, for the result file. A `device` "cpu" run
    is named by its CPU even on a machine with a GPU (its numbers are the CPU's)."""
    from marsvision.runtime.backends.onnxruntime import exact_int8_default

    cpu = cpu_info()
    gpu = gpu_info()
    return {
        "machine": machine_name(cpu, gpu if device != "cpu" else None),
        "hostname": socket.gethostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "gpu": gpu,
        "threads": threads or cpu["usable_cores"],
        # whether ONNX Runtime sessions use exact (slower) INT8 sums: runtime.backends.onnxruntime
        "onnxruntime_exact_int8": exact_int8_default(),
        "onnxruntime_session": onnxruntime_session(threads),
        "env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
        },
        "versions": library_versions(),
        "source": source_revision(),
    }
