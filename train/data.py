"""The MSL data set layout: where it is, the official splits, the two tasks, a fingerprint.

The split files are used as published; the one derived set is val's two halves by sol
(`halve_by_sol`, for `mars-train --train-on train+half-val`). Tasks:
- `binary`: "Surface" (classes 5 drill holes, 8 ground, 9 horizon) vs "Rover" (all others);
  Rover is label 1, the positive class.
- `msl25`: the 25 MSL classes (0-24), names from the synset file.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.inputs import decode_text
from marsvision.runtime.metadata import check_class_names

SPLITS = ("train", "val", "test")
SPLIT_FILES = {s: f"{s}-calibrated-shuffled.txt" for s in SPLITS}
SYNSET_FILE = "msl_synset_words-indexed.txt"
NUM_MSL_CLASSES = 25
SURFACE_CLASSES = frozenset({5, 8, 9})
BINARY_CLASS_NAMES = ["Surface", "Rover"]
TASKS = ("binary", "msl25")
DATA_ENV = "MARS_DATA"
REDOWNLOAD = "mars-train --download --data NEW_DIR"  # it does nothing into a folder holding one
# sol, instrument, 16 digits of sequence and image, then the product code (C00, I01, E01 ...)
_PRODUCT = re.compile(r"(\d{4}[A-Z]{2}\d{16})[A-Z]\d\d(?=[_.])")


@dataclass(frozen=True)
class Sample:
    """One labeled image of a split."""

    path: Path
    label: int  # the task's label
    msl_class: int  # the original MSL class id (0-24)


def data_dir_setting(data: str | os.PathLike[str] | None) -> Path | None:
    """The data folder asked for: the argument, else $MARS_DATA (`~` expanded), else None."""
    chosen = data if data is not None else os.environ.get(DATA_ENV)
    return Path(chosen).expanduser() if chosen else None


def check_data_set(d: Path) -> None:
    """`d` holds the data set whole: its split and class-name files, and every image the split
    files list (a MarsvisionError names the first that is missing)."""
    resolve_data_dir(d)
    for split in SPLITS:
        read_split(d, split, "msl25")


def resolve_data_dir(data: str | os.PathLike[str] | None) -> Path:
    """The data directory: the argument, else $MARS_DATA, else a user error saying how to get it."""
    d = data_dir_setting(data)
    if d is None:
        raise MarsvisionError(
            f"no MSL data given: pass --data DIR or set {DATA_ENV}; to get it, run "
            "`mars-train --download --data DIR`"
        )
    given = f"--data {d}" if data is not None else f"{DATA_ENV}={d}"  # whichever chose it
    if d.is_file():
        raise MarsvisionError(
            f"{given} is a file; give the folder the data set is unpacked in (for "
            f"msl-images.zip: `mars-train --download --data DIR` unpacks it)"
        )
    if not d.is_dir():  # a relative path said in full: from where it was read
        raise MarsvisionError(
            f"{given}: MSL data directory {d.absolute()} does not exist; run `mars-train "
            f"--download --data {d.absolute()}`"
        )
    missing = [f for f in (*SPLIT_FILES.values(), SYNSET_FILE) if not (d / f).is_file()]
    if missing:
        # the images' folder, or the folder above an unzipped archive: the one to pass is near
        near = [p for p in (d.parent, *_subfolders(d)) if (p / SPLIT_FILES["train"]).is_file()]
        hint = f"; the data set is in {near[0]}: pass that" if near else ""
        raise MarsvisionError(
            f"{given} is not an MSL data directory: missing {', '.join(missing)} "
            f"(expected the layout of msl-images.zip){hint}"
        )
    return d


def _subfolders(d: Path) -> list[Path]:
    """The folders directly in `d` (none where it cannot be listed)."""
    try:
        return sorted(p for p in d.iterdir() if p.is_dir())
    except OSError:
        return []


def check_task(task: str) -> str:
    """Return the task name, or fail with the valid choices."""
    if task not in TASKS:
        raise MarsvisionError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    return task


def _text_file(path: Path) -> str:
    """A split or class-names file's text (UTF-8, or UTF-16 with its mark); bytes of neither are
    a one-line error (a UnicodeDecodeError traceback)."""
    return decode_text(path.read_bytes(), str(path), strict=True)


def msl_class_names(data_dir: Path) -> list[str]:
    """The 25 MSL class names, in class-id order, from the synset file."""
    names: dict[int, str] = {}
    path = data_dir / SYNSET_FILE
    for n, line in enumerate(_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            idx, name = line.split(None, 1)
            names[int(idx)] = name.strip()
        except ValueError:
            raise MarsvisionError(f"{path}:{n}: expected '<id> <name>', got {line!r}") from None
    if sorted(names) != list(range(NUM_MSL_CLASSES)):
        raise MarsvisionError(f"{path}: expected class ids 0-{NUM_MSL_CLASSES - 1}")
    ordered = [names[i] for i in range(NUM_MSL_CLASSES)]
    check_class_names(ordered, where=path)  # refused before training, not by mars-infer after
    return ordered


def class_names(task: str, data_dir: Path) -> list[str]:
    """The task's class names, indexed by label."""
    check_task(task)
    return list(BINARY_CLASS_NAMES) if task == "binary" else msl_class_names(data_dir)


CAMERAS = {"ML": "Mastcam left", "MR": "Mastcam right", "MH": "MAHLI"}


def msl_product(path: Path) -> bool:
    """Whether the file name is an MSL product's (sol, instrument, sequence, product code), the
    names whose sol and camera are read."""
    return _PRODUCT.match(path.name) is not None


def camera(path: Path) -> str:
    """The instrument code in an MSL product's file name after the 4-digit sol (a key of
    CAMERAS); "?" for a name that is no MSL product's (`sample_001.jpg` has two letters there
    too: it read "le")."""
    return path.name[4:6] if msl_product(path) else "?"


def sol_key(path: Path) -> str:
    """The sol (mission day) that begins an MSL product's file name, as the key that groups one
    day's observations; any other name is its own group (a phone's `20240501_1230.jpg` begins
    with 4 digits too: its whole year was one "sol")."""
    return path.name[:4] if msl_product(path) else path.name


def frame_key(path: Path) -> str:
    """The camera frame an MSL file name shows: the name less its product code, so that
    `0019MR0000540060100176C00_DRCL.JPG` and `...I01_DRCL.JPG` (a thumbnail and a full image of
    one frame) share a key; a name without a product code is its own frame."""
    match = _PRODUCT.match(path.name)
    return match.group(1) if match else path.name


def task_label(task: str, msl_class: int) -> int:
    """Map an MSL class id to the task's label."""
    if task == "binary":
        return 0 if msl_class in SURFACE_CLASSES else 1
    return msl_class


def read_split(data_dir: Path, split: str, task: str, limit: int | None = None) -> list[Sample]:
    """The samples of one official split, in file order (the files are pre-shuffled).

    `limit` keeps at most that many (at least 1). A listed image that is missing is an error
    naming it.
    """
    check_task(task)
    if limit is not None and limit < 1:  # 0 or -1 kept one image: a model shipped scored on one
        raise MarsvisionError(f"--limit {limit}: need at least 1 image per split")
    if split not in SPLITS:
        raise MarsvisionError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = data_dir / SPLIT_FILES[split]
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise MarsvisionError(f"{path}:{n}: expected '<image> <class id>', got {line!r}")
        try:
            msl_class = int(parts[1])
        except ValueError:
            raise MarsvisionError(f"{path}:{n}: class id {parts[1]!r} is not an integer") from None
        if not 0 <= msl_class < NUM_MSL_CLASSES:
            raise MarsvisionError(f"{path}:{n}: class id {msl_class} is outside 0-24")
        listed = Path(os.path.normpath(parts[0]))  # calibrated/../calibrated/x.JPG is x.JPG
        if listed.is_absolute():
            raise MarsvisionError(
                f"{path}:{n}: {parts[0]} is an absolute path; the split files list images "
                "relative to the data folder"
            )
        key = listed.as_posix()  # calibrated/x.JPG, ./calibrated//x.JPG: one image
        if key in seen:  # it would count twice in the metrics
            raise MarsvisionError(f"{path}:{n}: {parts[0]} is listed again (line {seen[key]})")
        seen[key] = n
        image = data_dir / listed
        if not image.is_file():
            raise MarsvisionError(
                f"{path}:{n}: listed image {image} is missing; the split files do not match "
                f"the images (re-download the data set into an empty folder: {REDOWNLOAD})"
            )
        samples.append(Sample(image, task_label(task, msl_class), msl_class))
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise MarsvisionError(f"{path} lists no images")
    return samples


def check_all_listed(data_dir: Path, task: str) -> None:
    """Every image the three split files list is there: before work that reads only some of them
    (a --limit) and then all (a model card's counts)."""
    for split in SPLITS:
        read_split(data_dir, split, task)


def check_disjoint(splits: dict[str, list[Sample]]) -> None:
    """Refuse an image listed in two splits: a train image scored as val or test."""
    first: dict[Path, str] = {}
    for split, samples in splits.items():
        for sample in samples:
            other = first.setdefault(sample.path, split)
            if other != split:
                raise MarsvisionError(
                    f"{sample.path} is listed in both the {other} and the {split} split files; "
                    "a split's images must not be in another"
                )


def halve_by_sol(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """Two halves of a split, a sol's images always in the same one: the sols in order, the
    first, third, fifth ... to the first half, the others to the second; file order kept within
    each. On the official val split (103 sols, 182-564) the first holds 804 images, the second 836,
    and each has a share of every camera and Surface class (MAHLI ground 58 and 29, drill holes
    182 and 288). `mars-train --train-on train+half-val` trains on train and the first half and
    selects on the second."""
    order = {sol: i for i, sol in enumerate(sorted({sol_key(s.path) for s in samples}))}
    halves: tuple[list[Sample], list[Sample]] = ([], [])
    for s in samples:
        halves[order[sol_key(s.path)] % 2].append(s)
    if not halves[1]:
        raise MarsvisionError(
            f"all {len(samples)} images come from one sol: there is no second half to hold out"
        )
    return halves


# val's halves by sol (`halve_by_sol`), named by what a `--train-on train+half-val` model does
# with them: it trains on the first and is selected (and scored as val) on the second (in the
# order of `config.val_to_score`'s halves)
VAL_HALVES = ("trained", "held")


def data_fingerprint(data_dir: Path) -> str:
    """sha256 over the split files and the synset file: identifies the data set version."""
    h = hashlib.sha256()
    for name in (*SPLIT_FILES.values(), SYNSET_FILE):
        h.update(name.encode())
        h.update((data_dir / name).read_bytes())
    return h.hexdigest()


def check_same_data(ckpt: dict[str, Any], data_dir: Path, source: Path) -> None:
    """Refuse a data folder other than the one the checkpoint (from `source`) was trained on."""
    if ckpt["data_fingerprint"] != data_fingerprint(data_dir):
        raise MarsvisionError(
            f"{data_dir} is not the data set {source} was trained on (split files differ)"
        )
