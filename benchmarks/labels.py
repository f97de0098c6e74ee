"""A user's own labelled images, for `mars-bench score --labels`: the truth that a mars-infer
result file is scored against when the images are not an MSL split (Perseverance's, a mission
team's own sort).

Two forms: a CSV file whose header names a `path` and a `label` column (other columns are
ignored, so a mars-infer CSV with its label column corrected is one), with an optional `group`
column; or a folder with one subfolder per class (`Surface/`, `Rover/`), the ImageFolder layout,
images anywhere below each. Labels are the model's class names, exactly. Images are matched to
rows by file name, as for a split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from marsvision.benchmarks.predictions import short_list
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.inputs import IMAGE_SUFFIXES, folder_images
from marsvision.runtime.results import csv_rows
from marsvision.train.data import camera, msl_name, sol_key

GROUP_COLUMN = "group"


@dataclass(frozen=True)
class Truth:
    """One image to score: its file name (what rows are matched on), its label (an index of the
    task's classes), the group it is resampled with for the grouped interval (its sol, or the
    labels file's `group`), and what its errors are listed under: (camera code, class id)."""

    name: str
    label: int
    group: str
    listed: tuple[str, int]


@dataclass(frozen=True)
class Labels:
    """A labelled set read: its images' truths and where they came from."""

    path: Path
    fmt: str  # csv | folder
    truths: list[Truth]
    group_by: str  # "group" (the CSV's column) or "sol" (from MSL-style file names)
    sha256: str  # of the CSV's bytes, or of the folder's sorted "<relative path>\t<label>" lines

    def describe(self) -> dict[str, object]:
        """JSON-ready provenance of the labels."""
        return {
            "path": str(self.path),
            "format": self.fmt,
            "sha256": self.sha256,
            "images": len(self.truths),
            "group_by": self.group_by,
        }


def read_labels(path: Path, class_names: list[str]) -> Labels:
    """The labelled images of a CSV file or a class-per-subfolder folder (module docstring)."""
    if path.is_dir():
        return _read_folder(path, class_names)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MarsvisionError(f"cannot read the labels file {path} ({e.strerror})") from None
    return _read_csv(path, data, class_names)


def _truth(name: str, label: int, group: str | None) -> Truth:
    """A labelled image; without a group, its sol where the name is an MSL product's, else the
    image is its own group (a phone's `20240501_1230.jpg` was put in "sol 2024" with every
    other image of that year, an interval of zero width)."""
    msl = msl_name(Path(name))
    sol = sol_key(Path(name)) if msl else name
    return Truth(name, label, group or sol, (camera(Path(name)) if msl else "?", label))


def _decode(path: Path, data: bytes) -> str:
    """A CSV's text: UTF-8 (a byte-order mark skipped: Excel's "CSV UTF-8" writes one) or
    UTF-16 with its mark (Excel's "Unicode text", PowerShell 5's `>`); old Mac line ends (CR
    alone) read as lines."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise MarsvisionError(
                f"the labels file {path} is not UTF-16 text ({e.reason})"
            ) from None
    else:
        text = data.decode("utf-8-sig", errors="surrogateescape")
    return text.replace("\r", "\n") if "\n" not in text else text


def _file_name(path: str) -> str:
    """The file name a labels CSV's path ends in, at `/` or, for a path written on Windows
    (`C:\\imgs\\0195MH....JPG`), at a backslash: rows are matched by it."""
    return re.split(r"[\\/]", path.rstrip("/\\"))[-1]


def _read_csv(path: Path, data: bytes, class_names: list[str]) -> Labels:
    numbered = [
        (n, r) for n, r in enumerate(csv_rows(path, _decode(path, data)), 1)
        if any(cell.strip() for cell in r)
    ]  # fmt: skip
    if not numbered:
        raise MarsvisionError(f"{path} is empty: expected a header naming path and label")
    rows = [r for _, r in numbered]
    header = [h.strip().lower() for h in rows[0]]
    twice = [c for c in ("path", "label", GROUP_COLUMN) if header.count(c) > 1]
    if twice:
        raise MarsvisionError(f"{path}: its first line names the {twice[0]} column twice")
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise MarsvisionError(
            f"{path}: its first line names no {' or '.join(missing)} column (found "
            f"{short_list(rows[0], 5)}); expected a header such as path,label"
        )
    at = {c: header.index(c) for c in ("path", "label", GROUP_COLUMN) if c in header}
    index = {n: i for i, n in enumerate(class_names)}
    truths = []
    for n, row in numbered[1:]:
        cells = {c: row[i].strip() if i < len(row) else "" for c, i in at.items()}
        for column in ("path", "label"):
            if not cells[column]:
                raise MarsvisionError(f"{path}:{n}: no {column}")
        if cells["label"] not in index:
            raise MarsvisionError(
                f"{path}:{n}: label {cells['label']!r} is not one of the model's classes "
                f"[{short_list(class_names, 5)}]"
            )
        if GROUP_COLUMN in at and not cells[GROUP_COLUMN]:
            raise MarsvisionError(f"{path}:{n}: no group (the column is there: give every row one)")
        truths.append(
            _truth(_file_name(cells["path"]), index[cells["label"]], cells.get(GROUP_COLUMN))
        )
    if not truths:
        raise MarsvisionError(f"{path} has a header but no rows: no labelled images")
    group_by = GROUP_COLUMN if GROUP_COLUMN in at else "sol"
    labels = Labels(path, "csv", truths, group_by, hashlib.sha256(data).hexdigest())
    return _unique(labels)


def _read_folder(path: Path, class_names: list[str]) -> Labels:
    unreadable: list[str] = []
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as e:
        raise MarsvisionError(f"cannot read the labels folder {path} ({e.strerror})") from None
    index = {n: i for i, n in enumerate(class_names)}
    truths, listing = [], []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                raise MarsvisionError(
                    f"{entry.path} lies in the labels folder itself: put each image in the "
                    f"subfolder of its class [{short_list(class_names, 5)}]"
                )
            continue
        if entry.name not in index:
            raise MarsvisionError(
                f"{entry.path}: the labels folder's subfolders are the model's classes "
                f"[{short_list(class_names, 5)}], and {entry.name!r} is not one of them"
            )
        for image in folder_images(entry.path, recursive=True, unreadable=unreadable):
            name = os.path.basename(image)
            truths.append(_truth(name, index[entry.name], None))
            listing.append(f"{os.path.relpath(image, path)}\t{entry.name}\n")
    if unreadable:
        raise MarsvisionError(f"cannot list {unreadable[0]} in the labels folder {path}")
    if not truths:
        raise MarsvisionError(
            f"{path} holds no images in subfolders named after the model's classes "
            f"[{short_list(class_names, 5)}]"
        )
    sha = hashlib.sha256("".join(sorted(listing)).encode("utf-8", "surrogateescape")).hexdigest()
    return _unique(Labels(path, "folder", truths, "sol", sha))


def _unique(labels: Labels) -> Labels:
    """The labels with their images in file-name order (the image bootstrap's resamples follow
    the order: a CSV sorted another way, or the folder, would give other intervals); a name
    labelled twice is refused, as rows are matched by file name."""
    seen: dict[str, int] = {}
    for t in labels.truths:
        seen[t.name] = seen.get(t.name, 0) + 1
    twice = sorted(n for n, k in seen.items() if k > 1)
    if twice:
        raise MarsvisionError(
            f"{labels.path} labels the same file name more than once ({short_list(twice)}): "
            "rows are matched by file name"
        )
    return dataclasses.replace(labels, truths=sorted(labels.truths, key=lambda t: t.name))
