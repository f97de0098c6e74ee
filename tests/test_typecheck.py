"""The type check (tests/typecheck.py): the TensorRT code --strict against tensorrt-stubs
(TensorRT itself can't be installed), and the package under its real module names."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from typecheck import REPO, TRT_MODULES, package_tree, patched_stubs, run_mypy

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None or importlib.util.find_spec("tensorrt_stubs") is None,
    reason="mypy and tensorrt-stubs are needed (pip install --no-deps tensorrt-stubs)",
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package tree, with the mended stubs in tree/stubs (and mypy's cache, shared)."""
    tree = package_tree(tmp_path_factory.mktemp("typecheck"))
    patched_stubs(tree / "stubs")
    return tree


def _check(tree: Path, files: list[Path], *, strict: bool = False) -> tuple[int, str]:
    proc = run_mypy([str(f) for f in files], tree, tree / "stubs", strict=strict)
    return proc.returncode, proc.stdout + proc.stderr


def test_tensorrt_modules_pass_mypy_strict(tree: Path) -> None:
    proc = run_mypy([a for m in TRT_MODULES for a in ("-m", m)], tree, tree / "stubs", strict=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stubs_really_check_tensorrt_calls(tree: Path, tmp_path: Path) -> None:
    """Misuse of the TensorRT API must fail the check: the stubs are read, not skipped as Any."""
    canary = tmp_path / "trt_canary.py"
    canary.write_text(
        "import tensorrt as trt\n\n\n"
        "def build() -> None:\n"
        "    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
        "    network = builder.create_network(0)\n"
        "    network.add_convolution_3d_typo()\n"
        "    size: int = builder.build_serialized_network(network, 5)\n"
    )
    status, out = _check(tree, [canary], strict=True)
    assert status != 0
    assert "add_convolution_3d_typo" in out
    assert "IHostMemory" in out


def test_the_runtime_backends_tensorrt_calls_are_checked(tree: Path, tmp_path: Path) -> None:
    """The runner's own calls into the tensorrt module are checked too: a typo in them fails
    (the module was handed around as Any, and `trt_mod.Logger.WARNNG` passed)."""
    text = (REPO / "runtime" / "backends" / "tensorrt.py").read_text(encoding="utf-8")
    typo, n = re.subn(r"\bLogger\.WARNING\b", "Logger.WARNNG", text)
    assert n == 1
    canary = tmp_path / "trt_runner_canary.py"
    canary.write_text(typo, encoding="utf-8")
    status, out = _check(tree, [canary], strict=True)
    assert status != 0 and "WARNNG" in out, out


def test_calls_between_stages_are_checked(tree: Path, tmp_path: Path) -> None:
    """`marsvision.*` imports resolve to the stage folders: a wrong call into another module is
    an error (mypy ran on the folders and took every `marsvision.*` import for a missing module:
    Any, and this passed)."""
    canary = tmp_path / "stage_canary.py"
    canary.write_text(
        "from marsvision.runtime.metadata import sha256_file\n\n"
        "sha256_file(123, 'not an int', 'one argument too many')\n"
    )
    status, out = _check(tree, [canary])
    assert status != 0 and 'Argument 1 to "sha256_file"' in out, out
    assert "Too many arguments" in out, out
