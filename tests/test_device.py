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
