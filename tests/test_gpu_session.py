"""The GPU session's device call (train/gpu_session.sh), rehearsed on the CPU at tiny sizes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = ("device=cpu", "image_size=64", "limit=16", "epochs=1", "batch_size=8")


PIP_SAYS = r"  error: subprocess-exited-with-error\n  ValueError: invalid pyproject.toml config\n"


def _python_without_marsvision(path: Path, pip_says: str = PIP_SAYS) -> Path:
    """A python3 as the GPU machine's looks to the script: marsvision not importable, and (here)
    pip unable to install it, saying `pip_says` before its last lines, so the script takes its
    fallback."""
    path.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *"-m pip"*) printf "{pip_says}hint: See above\\npip: no network\\n" >&2; '
        "exit 1;; esac\n"
        'case "$*" in *"import marsvision"*) exit 1;; esac\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    path.chmod(0o755)
    return path


def _tree_that_travels(path: Path) -> Path:
    """A copy of the repository as the device machine gets it: the tracked files (here links to
    them), no data beside it."""
    path.mkdir()
    for name in ("Makefile", "pyproject.toml", "train", "export", "runtime", "benchmarks"):
        (path / name).symlink_to(REPO / name)
    return path


def test_device_data_fails_without_the_data_and_keeps_the_archive(tmp_path: Path) -> None:
    # the target piped tar into gzip: without the data it exited 0 with an empty archive
    tree = _tree_that_travels(tmp_path / "tree")
    (tree / ".data").mkdir()
    (tree / ".data" / "msl.tgz").write_bytes(b"earlier archive")
    made = subprocess.run(["make", "-s", "device-data", f"MARS_DATA={tmp_path / 'nope'}"],
                          cwd=tree, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert made.returncode != 0
    assert f"no MSL data set at MARS_DATA={tmp_path / 'nope'}" in made.stderr
    assert (tree / ".data" / "msl.tgz").read_bytes() == b"earlier archive"


def test_gpu_session_script_ships_parts_the_device_can_return(
    msl_dir: Path, tmp_path: Path
) -> None:
    tree = _tree_that_travels(tmp_path / "tree")
    # the data travels as one file, made here by `make device-data` (DEVELOPERS.md, step 1)
    made = subprocess.run(["make", "-s", "device-data", f"MARS_DATA={msl_dir}"], cwd=tree,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    assert sorted(p.name for p in (tree / ".data").iterdir()) == ["msl.tgz"]
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "MARS_DATA"}
    env.update(OUT=str(out), RUNS=str(tmp_path / "r"), WORKERS="2", TMPDIR=str(tmp_path),
               PY=str(_python_without_marsvision(tmp_path / "python3")))  # fmt: skip
    flags = ["--candidates", "default", "--distill"]  # as DEVELOPERS.md's next call
    for s in TINY:
        flags += ["--set", s]
    done = subprocess.run(["bash", "train/gpu_session.sh", "binary", "3", *flags], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # the script unpacked the data where the sweep read it
    unpacked = tree / ".data" / "msl"
    assert sorted(p.name for p in unpacked.iterdir()) == sorted(p.name for p in msl_dir.iterdir())
    # the fallback put the stage folders on the path
    assert (tmp_path / "mv" / "marsvision" / "train").resolve() == REPO / "train"
    log = (out / "log.txt").read_text()
    assert log.startswith("gpu_session: task binary, budget 3 min")
    assert "unpacked .data/msl.tgz into .data/msl" in log
    assert "pip: no network" in log and "torch 2." in log and "cuda False" in log
    assert "ValueError: invalid pyproject.toml config" in log  # the cause, not pip's "error:"
    assert "chosen on val: default" in log
    parts = [f"resnet50-binary.pt.part{i}" for i in range(3)]
    names = ["SHA256SUMS", "log.txt", "resnet50-binary.md", *parts, "sweep.json"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())  # the tool's limit
    joined = b"".join((out / part).read_bytes() for part in parts)
    sha = hashlib.sha256(joined).hexdigest()
    assert (out / "SHA256SUMS").read_text() == f"{sha}  resnet50-binary.pt\n"
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["candidates"][0]["config"]["device"] == "cpu"  # later --set wins over cuda
    assert summary["distilled"] and "trained_val" in summary["candidates"][0]
    assert summary["candidates"][0]["config"]["data"] == str(unpacked)


def test_a_damaged_data_archive_stops_the_call(tmp_path: Path) -> None:
    """It was logged as unpacked, and the sweep then failed asking for a download."""
    tree = _tree_that_travels(tmp_path / "tree")
    (tree / ".data").mkdir()
    (tree / ".data" / "msl.tgz").write_bytes(b"not a tar.gz")
    env = {k: v for k, v in os.environ.items() if k != "MARS_DATA"}
    env.update(OUT=str(tmp_path / "out"))
    done = subprocess.run(["bash", "train/gpu_session.sh", "binary", "3"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    log = (tmp_path / "out" / "log.txt").read_text()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gpu_session: cannot unpack .data/msl.tgz" in log and "unpacked .data" not in log


def test_pip_output_without_an_exception_line_still_takes_the_fallback(
    msl_dir: Path, tmp_path: Path
) -> None:
    """The cause's grep found nothing, and under pipefail that ended the call before the
    fallback (pip's 'ERROR: ... build_editable hook', an empty log)."""
    tree = _tree_that_travels(tmp_path / "tree")
    py = _python_without_marsvision(tmp_path / "py", pip_says="")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "MARS_DATA": str(msl_dir),
           "TMPDIR": str(tmp_path), "PY": str(py)}  # fmt: skip
    # an unknown candidate: the sweep stops at once, after the install step
    call = ["bash", "train/gpu_session.sh", "binary", "3", "--candidates", "x"]
    done = subprocess.run(call, cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "pip: no network" in log and "torch 2." in log, done.stdout + done.stderr
    assert "--candidates" in log  # the sweep ran, on the fallback's path


def test_gpu_session_script_says_how_to_call_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(["bash", "train/gpu_session.sh", "binary", "3"], cwd=REPO, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0 and "set OUT" in done.stderr
    done = subprocess.run(["bash", "train/gpu_session.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0 and "usage: bash train/gpu_session.sh TASK" in done.stderr
