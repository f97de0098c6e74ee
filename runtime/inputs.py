"""Turn the PATH arguments of mars-infer into the list of input files, one entry per image.

A PATH is a file (any name: non-images become error rows), a folder (its image files, sorted;
with `recursive`, its subfolders too), a glob pattern (`'data/*.JPG'`, `**` with `recursive`),
or `@list.txt`: a text file with one path per line (blank lines and lines starting with `#`
are skipped; relative paths are relative to the current directory). In a folder, hidden files
and subfolders (names starting with `.`: macOS's `._IMG.JPG` resource copies on a card or disk
written by a Mac, `.Trashes`, editors' thumbnails) are skipped, as the shell and glob patterns
skip them; a hidden file named on its own, or in a list, is kept. A PATH that names nothing is
kept, so that it gets its own error row, and so is a folder with no image files in it. Each
file appears once, in the order given, under its first spelling: `imgs/a.jpg`, `./imgs/a.jpg`
and its absolute path are one input (`path_keys`).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from marsvision.runtime.errors import MarsvisionError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_GLOB_CHARS = frozenset("*?[")


def folder_images(d: str, recursive: bool = False) -> list[str]:
    """The image files of folder `d` (and with `recursive` its subfolders), sorted, hidden names
    skipped: what mars-infer classifies for a folder PATH."""
    found: list[str] = []
    for root, dirs, files in os.walk(d, followlinks=False):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(os.path.join(root, name))
        if not recursive:
            break
    return found


def _list_file(arg: str) -> list[str]:
    path = arg[1:]
    try:
        # utf-8-sig: a list saved by Windows Notepad starts with a byte-order mark
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except OSError as e:
        raise MarsvisionError(f"cannot read the list file {path} ({e.strerror})") from None
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def path_keys(paths: Iterable[str]) -> list[str]:
    """What the spellings of each input path share (`imgs/a.jpg`, `./imgs/a.jpg`, `imgs//a.jpg`,
    its absolute path, a path through a symlinked folder): its folder's real path and its name,
    each folder resolved once (a folder holds thousands of images). Inputs are deduplicated by
    it, and --resume matches the rows already written by it, so a rerun that spells a folder
    another way writes no row twice. The folder is resolved on the file system (`link/../a.jpg`
    is the `a.jpg` next to the link's target, not the one beside the link), and the name is
    not: two symlinks to one file are two inputs."""
    real: dict[str, str] = {}
    keys = []
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in real:
            real[folder] = os.path.realpath(folder or ".")
        keys.append(os.path.join(real[folder], name))
    return keys


def expand_inputs(args: list[str], *, recursive: bool = False) -> list[str]:
    """The input files named by PATH arguments, in order, each once."""
    out: list[str] = []
    for arg in args:
        if arg.startswith("@") and len(arg) > 1:
            out.extend(_list_file(arg))
        elif os.path.isdir(arg):
            out.extend(folder_images(arg, recursive) or [arg])  # no images: the folder's error row
        elif not os.path.lexists(arg) and _GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(arg, recursive=recursive))
            files = [m for m in matches if not os.path.isdir(m)]
            for m in matches:
                if os.path.isdir(m):
                    files.extend(folder_images(m, recursive))
            out.extend(files or [arg])  # no match: the pattern gets an error row
        else:
            out.append(arg)
    first: dict[str, str] = {}
    for key, path in zip(path_keys(out), out):
        first.setdefault(key, path)
    return list(first.values())
