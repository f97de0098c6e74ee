"""mypy --strict on the TensorRT modules against tensorrt-stubs, mended so that mypy reads them.

tensorrt-stubs 10.13 ships `tensorrt/__init__.pyi` without a py.typed marker, so mypy skips it
and every `trt.*` name silently becomes Any. Its bindings stub also has syntax errors (`in` as a
parameter name, a required parameter after defaulted ones) and a module-level `bool: DataType`
that shadows the builtin in every annotation. This copies the stubs into a folder, mends those,
and runs mypy with that folder on its path. Run: `python tests/typecheck_tensorrt.py`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRT_MODULES = ("export/tensorrt.py", "runtime/backends/tensorrt.py")
STUB_PACKAGES = ("tensorrt", "tensorrt_bindings")


def _site_stub_dir() -> Path:
    import tensorrt_stubs  # the marker package that tensorrt-stubs installs beside the stubs

    site = Path(tensorrt_stubs.__file__).resolve().parents[1]
    if not (site / "tensorrt" / "__init__.pyi").is_file():
        raise SystemExit(f"tensorrt-stubs is installed without tensorrt/__init__.pyi in {site}")
    return site


def patched_stubs(dest: Path) -> Path:
    """Copy tensorrt-stubs into `dest` and mend what stops mypy from reading them."""
    site = _site_stub_dir()
    for pkg in STUB_PACKAGES:
        shutil.copytree(site / pkg, dest / pkg, dirs_exist_ok=True)
    bindings = dest / "tensorrt_bindings" / "tensorrt.pyi"
    text = bindings.read_text(encoding="utf-8")
    text = re.sub(r"\bin: ", "in_: ", text)  # `in` is a keyword
    text = re.sub(
        r"(power: Weights = None, channel_axis: int)\)", r"\1 = ...)", text
    )  # required parameter after defaulted ones
    text = re.sub(r"^bool: DataType.*$", "", text, flags=re.M)  # shadows builtins.bool
    bindings.write_text(text, encoding="utf-8")
    libs = dest / "tensorrt_libs"  # imported by tensorrt/__init__.pyi, not shipped
    libs.mkdir(exist_ok=True)
    (libs / "__init__.pyi").write_text("", encoding="utf-8")
    return dest


def run_mypy(files: list[str], stub_dir: Path) -> subprocess.CompletedProcess[str]:
    """mypy --strict on `files` (paths relative to the repo) with the mended stubs."""
    env = dict(os.environ, MYPYPATH=str(stub_dir))
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *files],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="trt-stubs-") as tmp:
        proc = run_mypy(list(TRT_MODULES), patched_stubs(Path(tmp)))
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
