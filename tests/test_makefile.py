"""The Makefile's own checks, before it builds a 6 GB venv: the data, and Python's version."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tree(path: Path) -> Path:
    """The files the venv's recipe depends on (links to them), nothing built."""
    path.mkdir()
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        (path / name).symlink_to(REPO / name)
    return path


def _make(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", *args], cwd=tree, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_no_data_is_said_before_the_venv_is_built(tmp_path: Path) -> None:
    """`make demo` (and test, ship) without the data built the venv first (2 minutes, 6 GB), then
    failed in mars-export; a relative MARS_DATA is read from the repository, and said so."""
    tree = _tree(tmp_path / "tree")
    for target in ("demo", "test", "ship", "device-data"):
        made = _make(tree, target, "MARS_DATA=shared/msl")
        assert made.returncode != 0, target
        assert made.stderr.startswith(
            f"no MSL data set at MARS_DATA=shared/msl (from {tree}): make ... MARS_DATA=DIR"
        ), made.stderr
        assert not (tree / ".venv").exists(), target
    space = tmp_path / "with space" / "msl"  # quoted in the recipes
    space.mkdir(parents=True)
    (space / "train-calibrated-shuffled.txt").write_text("")
    assert _make(tree, "data", f"MARS_DATA={space}").returncode == 0
    demo = _make(tree, "-n", "demo", f"MARS_DATA={space}").stdout
    assert demo.count(f'--data "{space}"') == 3 and f'mars-infer "{space}/calibrated"' in demo
    assert f'tar -C "{space}"' in _make(tree, "-n", "device-data", f"MARS_DATA={space}").stdout


def test_a_model_named_that_is_not_there_is_refused_not_replaced_by_the_toy(tmp_path: Path) -> None:
    """`make demo MODEL=typo.pt` trained the toy model in place of the one named (its metrics
    mean nothing); the toy stays for a plain `make demo` with no model shipped."""
    tree = _tree(tmp_path / "tree")
    data = tmp_path / "msl"
    data.mkdir()
    (data / "train-calibrated-shuffled.txt").write_text("")
    for how in ("MODEL=typo.pt", "env"):
        env = {**os.environ, "MODEL": "typo.pt"} if how == "env" else None
        args = ("demo", f"MARS_DATA={data}") + (() if env else (how,))
        made = subprocess.run(["make", "-s", *args], cwd=tree, capture_output=True, text=True,
                              timeout=60, env=env)  # fmt: skip
        assert made.returncode != 0, how
        assert made.stderr.startswith(f"no model at MODEL=typo.pt (from {tree}); "), made.stderr
        assert not (tree / ".venv").exists(), how
    (tree / "typo.pt").write_text("")
    named = _make(tree, "-n", "demo", "MODEL=typo.pt", f"MARS_DATA={data}").stdout
    assert "mars-export --checkpoint typo.pt" in named and "mars-train" not in named
    toy = _make(tree, "-n", "demo", f"MARS_DATA={data}").stdout
    assert "training a toy one" in toy and "mars-train" in toy


def test_a_python_too_old_for_the_pins_is_refused_and_its_venv_made_anew(tmp_path: Path) -> None:
    """A python3 older than the pins need (3.11) failed deep in pip ("ResolutionImpossible"),
    and its venv stayed: a second try with a newer Python kept the old one's python link."""
    tree = _tree(tmp_path / "tree")
    old = tmp_path / "python3.10"
    old.write_text(
        '#!/bin/sh\ncase "$*" in -V) echo "Python 3.10.13";; *version_info*) exit 1;; esac\n'
        "exit 0\n"
    )
    old.chmod(0o755)
    made = _make(tree, "setup", f"PY={old}")
    assert made.returncode != 0
    assert made.stderr.startswith(
        f"{old} is Python 3.10.13; the versions pinned in constraints.txt need Python 3.11 or "
        f"later: make ... PY=python3.11"
    ), made.stderr
    # a venv left by such a try is removed before the new one is made (this python makes none:
    # the recipe stops there)
    (tree / ".venv" / "bin").mkdir(parents=True)
    (tree / ".venv" / "bin" / "python").symlink_to(old)
    (tree / ".venv" / "left").write_text("")
    new = tmp_path / "python3.11"
    new.write_text('#!/bin/sh\ncase "$*" in *version_info*) exit 0;; esac\nexit 1\n')
    new.chmod(0o755)
    made = _make(tree, "setup", f"PY={new}")
    assert made.returncode != 0 and not (tree / ".venv").exists(), made.stderr
    # so is one whose python links to a Python since removed
    (tree / ".venv" / "bin").mkdir(parents=True)
    (tree / ".venv" / "bin" / "python").symlink_to(tmp_path / "removed" / "python3.10")
    made = _make(tree, "setup", f"PY={new}")
    assert made.returncode != 0 and not (tree / ".venv").exists(), made.stderr
    # a venv of a new enough python is kept (pip brings it up to date)
    (tree / ".venv" / "bin").mkdir(parents=True)
    (tree / ".venv" / "bin" / "python").symlink_to(new)
    (tree / ".venv" / "left").write_text("")
    assert _make(tree, "setup", f"PY={new}").returncode != 0 and (tree / ".venv" / "left").exists()
    made = _make(tree, "setup", "PY=nopython3")  # not there: said so, not as a version
    assert made.stderr.startswith("no nopython3 here: make ... PY=python3.11"), made.stderr
