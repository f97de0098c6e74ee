"""The TensorRT code is type-checked against tensorrt-stubs (TensorRT itself can't be installed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from typecheck_tensorrt import REPO, TRT_MODULES, patched_stubs, run_mypy

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None or importlib.util.find_spec("tensorrt_stubs") is None,
    reason="mypy and tensorrt-stubs are needed (pip install --no-deps tensorrt-stubs)",
)


@pytest.fixture(scope="module")
def stub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return patched_stubs(tmp_path_factory.mktemp("trt-stubs"))


def test_tensorrt_modules_pass_mypy_strict(stub_dir: Path) -> None:
    proc = run_mypy(list(TRT_MODULES), stub_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stubs_really_check_tensorrt_calls(stub_dir: Path) -> None:
    """Misuse of the TensorRT API must fail the check: the stubs are read, not skipped as Any."""
    canary = REPO / "tests" / "_trt_canary_tmp.py"
    canary.write_text(
        "import tensorrt as trt\n\n\n"
        "def build() -> None:\n"
        "    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
        "    network = builder.create_network(0)\n"
        "    network.add_convolution_3d_typo()\n"
        "    size: int = builder.build_serialized_network(network, 5)\n"
    )
    try:
        proc = run_mypy([str(canary.relative_to(REPO))], stub_dir)
    finally:
        canary.unlink()
    assert proc.returncode != 0
    assert "add_convolution_3d_typo" in proc.stdout
    assert 'has type "IHostMemory"' in proc.stdout or "IHostMemory" in proc.stdout
