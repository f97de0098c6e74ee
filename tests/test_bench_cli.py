"""mars-bench's flags reach the run configs (the runs themselves not made), its telemetry
setting, and --device cuda on a machine without a GPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import config_started_with

from marsvision.benchmarks.cli import main


def _config(monkeypatch: pytest.MonkeyPatch, module: str, run: str, args: list[str]) -> Any:
    """The config that `mars-bench *args` starts `module.run` with."""
    import importlib

    return config_started_with(monkeypatch, main, importlib.import_module(module), run, args)


def test_parity_flags_reach_its_config(
    monkeypatch: pytest.MonkeyPatch, msl_dir: Path, tmp_path: Path
) -> None:
    """--threads, --batch-size, --limit, --splits and each threshold are the parity run's."""
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"checkpoint")
    args = ["parity", "--checkpoint", str(ckpt), "--artifacts", str(tmp_path), "--data",
            str(msl_dir), "--splits", "test", "--limit", "5", "--batch-size", "3", "--device",
            "cpu", "--threads", "2", "--fp32-min-agreement", "99.1",
            "--fp16-max-accuracy-change", "0.3", "--fp16-min-agreement", "98.1",
            "--int8-max-accuracy-change", "1.3", "--int8-min-agreement", "97.1",
            "--out", str(tmp_path / "out")]  # fmt: skip
    cfg = _config(monkeypatch, "marsvision.benchmarks.parity", "run_parity", args)
    assert (cfg.threads, cfg.batch_size, cfg.limit, cfg.splits, cfg.device) == (
        2, 3, 5, ("test",), "cpu")  # fmt: skip
    t = cfg.thresholds
    assert (t.fp32_min_agreement, t.fp16_max_accuracy_change, t.fp16_min_agreement,
            t.int8_max_accuracy_change, t.int8_min_agreement) == (
        99.1, 0.3, 98.1, 1.3, 97.1)  # fmt: skip


def test_speed_flags_reach_its_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--threads, --batch-sizes, --warmup, --repeats and --in-process are the speed run's."""
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"checkpoint")
    args = ["speed", "--checkpoint", str(ckpt), "--modes", "model", "--batch-sizes", "4,2",
            "--precisions", "fp32", "--backends", "pytorch,onnxruntime", "--warmup", "2",
            "--repeats", "7", "--device", "cpu", "--threads", "3", "--in-process",
            "--out", str(tmp_path / "out")]  # fmt: skip
    cfg = _config(monkeypatch, "marsvision.benchmarks.speed", "run_speed", args)
    assert (cfg.threads, cfg.batch_sizes, cfg.warmup, cfg.repeats, cfg.isolate) == (
        3, (4, 2), 2, 7, False)  # fmt: skip
    assert (cfg.precisions, cfg.backends, cfg.modes, cfg.device) == (
        ("fp32",), ("pytorch", "onnxruntime"), ("model",), "cpu")  # fmt: skip


@pytest.mark.parametrize("command", ["speed", "parity"])
def test_device_cuda_without_a_gpu_is_refused(
    monkeypatch: pytest.MonkeyPatch, command: str, msl_dir: Path, tmp_path: Path
) -> None:
    """--device cuda where nvidia-smi finds no GPU is a one-line error: it ran the rows on the
    CPU and wrote them up as the asked-for device's."""
    from marsvision.benchmarks import conditions

    monkeypatch.setattr(conditions, "gpu_info", lambda: None)
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"checkpoint")
    args = [command, "--checkpoint", str(ckpt), "--artifacts", str(tmp_path), "--device", "cuda",
            "--out", str(tmp_path / "out")]  # fmt: skip
    if command == "parity":
        args += ["--data", str(msl_dir)]
    else:
        args += ["--modes", "model"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "--device cuda: no NVIDIA GPU here" in result.output


def test_bench_turns_onnxruntime_telemetry_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Any mars-bench command turns onnxruntime's telemetry off before it imports onnxruntime
    (a user's own ORT_DISABLE_TELEMETRY is kept)."""
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    CliRunner().invoke(main, ["score", str(tmp_path / "none.csv"), "--out", str(tmp_path)])
    assert os.environ.get("ORT_DISABLE_TELEMETRY") == "1"
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")
    CliRunner().invoke(main, ["score", str(tmp_path / "none.csv"), "--out", str(tmp_path)])
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "0"
