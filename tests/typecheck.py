"""Type-check marsvision with mypy: the whole package, the TensorRT code --strict against
tensorrt-stubs, mended so that mypy reads them, and the tests (for the Python that runs them, not
the package's oldest: they use tomllib). Run: `python tests/typecheck.py` (`make typecheck`).

The stage folders (train/, runtime/, ...) are the subpackages `marsvision.train`, ...: the code
imports them by those names, which only the editable install's import hook maps to the folders,
and mypy cannot follow the hook. Run on the folders, mypy took `marsvision.*` for a missing
module and every call between stages for Any. So this builds a tree of links, `marsvision/<stage>`
-> the stage folder, and checks the packages under their real names.

tensorrt-stubs 10.13 ships `tensorrt/__init__.pyi` without a py.typed marker, so mypy skips it
and every `trt.*` name silently becomes Any. Its bindings stub also has syntax errors (`in` as a
parameter name, a required parameter after defaulted ones) and a module-level `bool: DataType`
that shadows the builtin in every annotation. The stubs are copied and mended beside the tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("train", "export", "runtime", "benchmarks")
PACKAGES = tuple(f"marsvision.{stage}" for stage in STAGES)
TRT_MODULES = ("marsvision.export.tensorrt", "marsvision.runtime.backends.tensorrt")
STUB_PACKAGES = ("tensorrt", "tensorrt_bindings")
TREE = REPO / "build" / "typecheck"  # ignored by git; kept between runs for mypy's cache


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


def package_tree(dest: Path) -> Path:
    """`dest/marsvision/<stage>` -> REPO/<stage> for each stage (a namespace package, as
    installed); made again each time, so that a moved checkout does not keep stale links."""
    pkg = dest / "marsvision"
    shutil.rmtree(pkg, ignore_errors=True)
    pkg.mkdir(parents=True)
    for stage in STAGES:
        (pkg / stage).symlink_to(REPO / stage, target_is_directory=True)
    return dest


def run_mypy(
    args: list[str], tree: Path, stub_dir: Path, *, strict: bool = False
) -> subprocess.CompletedProcess[str]:
    """mypy with the package tree and the mended stubs on its path, the repo's configuration, and
    `args` (`-p PACKAGE`, `-m MODULE` or files). Paths inside the tree are reported as the repo's
    (`runtime/cli.py`, not `build/typecheck/marsvision/runtime/cli.py`)."""
    env = dict(os.environ, MYPYPATH=os.pathsep.join([str(tree), str(stub_dir)]))
    flags = ["--config-file", str(REPO / "pyproject.toml"), "--cache-dir", str(tree / "cache")]
    if strict:
        # --strict for the named modules only: the stages they import are checked, not reported
        flags += ["--strict", "--follow-imports=silent"]
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", *flags, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    pkg = tree / "marsvision"
    prefixes = {str(pkg) + os.sep, os.path.relpath(pkg, REPO) + os.sep}
    for prefix in sorted(prefixes, key=len, reverse=True):
        proc.stdout = proc.stdout.replace(prefix, "")
    return proc


def main() -> int:
    tree = package_tree(TREE)
    stubs = patched_stubs(TREE / "stubs")
    status = 0
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("*.py"))
    for args, strict in (
        ([a for m in TRT_MODULES for a in ("-m", m)], True),
        ([a for p in PACKAGES for a in ("-p", p)], False),
        (["--python-version", running, *tests], False),
    ):
        proc = run_mypy(args, tree, stubs, strict=strict)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        status = status or proc.returncode
    return status


if __name__ == "__main__":
    raise SystemExit(main())
