"""Where a run trains and in what precision (train/device.py), and the run folder's check."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from marsvision.runtime.errors import MarsvisionError
from marsvision.train import device as dev
from marsvision.train.report import check_out_dir

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_select_device() -> None:
    assert dev.select_device("cpu") == CPU
    assert dev.select_device("auto") == (CUDA if torch.cuda.is_available() else CPU)
    if torch.cuda.is_available():
        assert dev.select_device("cuda") == CUDA
    else:
        with pytest.raises(MarsvisionError, match="no CUDA GPU.*--device cpu"):
            dev.select_device("cuda")


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


def test_check_out_dir(tmp_path: Path) -> None:
    check_out_dir(tmp_path / "new" / "deeper")  # not there yet: its nearest parent is checked
    assert not (tmp_path / "new").exists()  # and nothing is created
    (tmp_path / "f").write_text("")
    with pytest.raises(MarsvisionError, match="is a file, not a folder"):
        check_out_dir(tmp_path / "f")
    with pytest.raises(MarsvisionError, match="f is not a folder"):
        check_out_dir(tmp_path / "f" / "run")
    if os.geteuid() == 0:  # root writes anywhere: the permission case cannot be made here
        return
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(MarsvisionError, match="cannot write into"):
        check_out_dir(locked / "run")
