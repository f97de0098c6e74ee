"""A user's own labelled images, for `mars-bench score --labels`: the truth that a mars-infer
result file is scored against when the images are not an MSL split (Perseverance's, a mission
team's own sort).

Two forms: a CSV file whose header names a `path` and a `label` column (other columns are
ignored, so a mars-infer CSV with its label column corrected is one: its error rows, which have
no label, are passed over unless given one), with an optional `group` column; or a folder with
one subfolder per class (`Surface/`, `Rover/`), the ImageFolder layout, images anywhere below
each. Labels are the model's class names, exactly. Images are matched to rows by file name, as
for a split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from marsvision.benchmarks.predictions import file_name, short_list
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.inputs import IMAGE_SUFFIXES, decode_text, folder_images
from marsvision.runtime.results import csv_rows
from marsvision.train.data import camera, msl_product, sol_key

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
    # "group" (the CSV's column), "sol" (from MSL products' file names), or "image" (no name is
    # an MSL product's: each image is its own group)
    group_by: str
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
    classes = _Classes({n: i for i, n in enumerate(class_names)}, short_list(class_names, 5))
    if path.is_dir():
        return _read_folder(path, classes)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MarsvisionError(f"cannot read the labels file {path} ({e.strerror})") from None
    return _read_csv(path, data, classes)


@dataclass(frozen=True)
class _Classes:
    """The model's classes, as the readers check labels against them."""

    index: dict[str, int]  # class name -> label
    text: str  # "Surface, Rover": for messages


def _truth(name: str, label: int, group: str | None) -> Truth:
    """A labelled image; without a group, its sol (an MSL product's name), else on its own."""
    return Truth(name, label, group or sol_key(Path(name)), (camera(Path(name)), label))


def _read_csv(path: Path, data: bytes, classes: _Classes) -> Labels:
    text = decode_text(data, f"the labels file {path}")
    if "\x00" in text:  # no CSV holds one: UTF-16 without its mark, or not a text file
        raise MarsvisionError(
            f"{path} is not a text file (it holds a NUL byte): save it as CSV (UTF-8)"
        )
    if "\n" not in text:  # old Mac line ends: CR alone
        text = text.replace("\r", "\n")
    numbered = [
        (n, r) for n, r in enumerate(csv_rows(path, text), 1) if any(cell.strip() for cell in r)
    ]
    if not numbered:
        raise MarsvisionError(f"{path} is empty: expected a header naming path and label")
    header = [h.strip().lower() for h in numbered[0][1]]
    twice = [c for c in ("path", "label", GROUP_COLUMN) if header.count(c) > 1]
    if twice:
        raise MarsvisionError(f"{path}: its first line names the {twice[0]} column twice")
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise MarsvisionError(
            f"{path}: its first line names no {' or '.join(missing)} column (found "
            f"{short_list(numbered[0][1], 5)}); expected a header such as path,label"
        )
    at = {c: header.index(c) for c in ("path", "label", GROUP_COLUMN, "status") if c in header}
    truths = []
    for n, row in numbered[1:]:
        cells = {c: row[i].strip() if i < len(row) else "" for c, i in at.items()}
        if not cells["label"] and cells.get("status") == "error":
            continue  # a mars-infer error row: an image it could not classify, left unlabelled
        for column in ("path", "label"):
            if not cells[column]:
                raise MarsvisionError(f"{path}:{n}: no {column}")
        if cells["label"] not in classes.index:
            raise MarsvisionError(
                f"{path}:{n}: label {cells['label']!r} is not one of the model's classes "
                f"[{classes.text}]{_number_hint(cells['label'], classes)}"
            )
        if GROUP_COLUMN in at and not cells[GROUP_COLUMN]:
            raise MarsvisionError(f"{path}:{n}: no group (the column is there: give every row one)")
        label = classes.index[cells["label"]]
        truths.append(_truth(file_name(cells["path"]), label, cells.get(GROUP_COLUMN)))
    if not truths:
        raise MarsvisionError(f"{path} has a header but no rows: no labelled images")
    group_by = GROUP_COLUMN if GROUP_COLUMN in at else _sols_or_images(truths)
    return _sorted(Labels(path, "csv", truths, group_by, hashlib.sha256(data).hexdigest()))


def _number_hint(label: str, classes: _Classes) -> str:
    """For a class number given as a label (the MSL split files number them): the name."""
    names = list(classes.index)
    if not label.isdigit() or int(label) >= len(names):
        return ""
    return f": labels are class names, not numbers (class {int(label)} is {names[int(label)]!r})"


def _read_folder(path: Path, classes: _Classes) -> Labels:
    unreadable: list[str] = []
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as e:
        raise MarsvisionError(f"cannot read the labels folder {path} ({e.strerror})") from None
    truths, listing = [], []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                raise MarsvisionError(
                    f"{entry.path} lies in the labels folder itself: put each image in the "
                    f"subfolder of its class [{classes.text}]"
                )
            continue
        if entry.name not in classes.index:
            raise MarsvisionError(
                f"{entry.path}: the labels folder's subfolders are the model's classes "
                f"[{classes.text}], and {entry.name!r} is not one of them"
            )
        for image in folder_images(entry.path, recursive=True, unreadable=unreadable):
            truths.append(_truth(file_name(image), classes.index[entry.name], None))
            listing.append(f"{os.path.relpath(image, path)}\t{entry.name}\n")
    if unreadable:
        raise MarsvisionError(f"cannot list {unreadable[0]} in the labels folder {path}")
    if not truths:
        raise MarsvisionError(
            f"{path} holds no images in subfolders named after the model's classes [{classes.text}]"
        )
    sha = hashlib.sha256("".join(sorted(listing)).encode("utf-8", "surrogateescape")).hexdigest()
    return _sorted(Labels(path, "folder", truths, _sols_or_images(truths), sha))


def _sols_or_images(truths: list[Truth]) -> str:
    """What the second interval resamples without a group column: sols where a file name is an
    MSL product's, else images (the report said "by sol ... 60 sols" of 60 phone photos)."""
    return "sol" if any(msl_product(Path(t.name)) for t in truths) else "image"


def _sorted(labels: Labels) -> Labels:
    """The labels with their images in file-name order (the image bootstrap's resamples follow
    the order: a CSV sorted another way, or the folder, would give other intervals). A name
    labelled twice is refused where they are scored (`score.score_predictions`)."""
    return dataclasses.replace(labels, truths=sorted(labels.truths, key=lambda t: t.name))
