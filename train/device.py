"""Where training runs and in what precision: the device, bf16 autocast, the memory layout."""

from __future__ import annotations

from typing import TextIO

import torch

from marsvision.runtime.errors import MarsvisionError


def select_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; cuda without a GPU, or another name, is a user
    error (mars-train's and the benchmarks' --device)."""
    if name not in ("auto", "cpu", "cuda"):
        raise MarsvisionError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise MarsvisionError("--device cuda: no CUDA GPU is available; use --device cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def use_bf16(amp: str, device: torch.device, *, log: TextIO) -> bool:
    """Whether `--amp` trains under bf16 autocast here (auto: on CUDA only); says on `log` when
    the CPU would only emulate it."""
    bf16 = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if bf16 and device.type == "cpu" and not _cpu_has_bf16():
        print("--amp bf16: this CPU has neither AMX nor AVX512-BF16, so bf16 is emulated and "
              "slower than fp32 here (--amp off)", file=log)  # fmt: skip
    return bf16


def uses_channels_last(device: torch.device, bf16: bool) -> bool:
    """Whether the model and its inputs use channels_last: it pays on GPUs (tensor cores) and
    with bf16 on AMX; in fp32 on the CPU its first steps are slower."""
    return device.type == "cuda" or bf16


def _cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX tiles or AVX512-BF16): torch's own probes."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
