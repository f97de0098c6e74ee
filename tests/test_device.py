"""`--amp` resolved to bf16 autocast or fp32, and the memory layout with it (train/device.py).

`--device` and the run folder's check are tested through the CLI: tests/test_train.py; here only
the device name the CLI's choices cannot reach (the benchmarks' Python API takes any string).
"""

from __future__ import annotations

import io

import pytest
import torch

from marsvision.runtime.errors import MarsvisionError
from marsvision.train import device as dev

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("amp", "device", "native", "bf16", "warned"),
    [
        ("auto", CPU, True, False, False),  # auto: bf16 on CUDA only
        ("auto", CUDA, False, True, False),  # the CPU's abilities do not matter on CUDA
        ("bf16", CPU, True, True, False),
        ("bf16", CPU, False, True, True),  # emulated: runs, but says it is slower
        ("off", CUDA, True, False, False),
        ("off", CPU, False, False, False),
    ],
)
def test_use_bf16(
    monkeypatch: pytest.MonkeyPatch,
    amp: str,
    device: torch.device,
    native: bool,
    bf16: bool,
    warned: bool,
) -> None:
    monkeypatch.setattr(dev, "_cpu_has_bf16", lambda: native)
    log = io.StringIO()
    assert dev.use_bf16(amp, device, log=log) is bf16
    assert ("emulated" in log.getvalue()) is warned
    assert dev.uses_channels_last(device, bf16) is (device.type == "cuda" or bf16)


def test_unknown_device_name() -> None:
    with pytest.raises(MarsvisionError, match="unknown device 'gpu'; choose auto, cpu or cuda"):
        dev.select_device("gpu")


@pytest.mark.parametrize(
    ("name", "gpu", "chosen"),
    [("auto", True, "cuda"), ("auto", False, "cpu"), ("cpu", True, "cpu"), ("cuda", True, "cuda")],
)
def test_select_device(monkeypatch: pytest.MonkeyPatch, name: str, gpu: bool, chosen: str) -> None:
    """auto takes the GPU where there is one, the CPU otherwise; cpu is the CPU even on a GPU
    machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert dev.select_device(name) == torch.device(chosen)


def test_cuda_without_a_gpu_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda on a machine without a GPU is refused, not run on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MarsvisionError, match="--device cuda: no CUDA GPU is available"):
        dev.select_device("cuda")


@pytest.mark.parametrize(("amx", "avx512_bf16"), [(False, False), (True, False), (False, True)])
def test_the_cpu_computes_bf16_with_amx_or_avx512_bf16(
    monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool
) -> None:
    """Either of torch's probes saying yes is native bf16; neither is emulation."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert dev._cpu_has_bf16() is (amx or avx512_bf16)
