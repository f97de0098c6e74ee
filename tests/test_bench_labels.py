"""`mars-bench score --labels`'s reader (benchmarks/labels.py): spaces, the folder's hash, an
unlistable subfolder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from marsvision.benchmarks.labels import read_labels
from marsvision.runtime.errors import MarsvisionError

BINARY = ["Surface", "Rover"]


def test_labels_csv_cells_are_read_past_spaces(tmp_path: Path) -> None:
    """`path, label` as a spreadsheet exports it: ' Rover' is Rover, ' imgs/a.jpg' is a.jpg."""
    f = tmp_path / "spaced.csv"
    f.write_text("path, label, group\n imgs/a.jpg , Rover , site-1 \nb.jpg,Surface,site-2\n")
    truths = read_labels(f, BINARY).truths
    assert [(t.name, t.label, t.group) for t in truths] == [("a.jpg", 1, "site-1"),
                                                            ("b.jpg", 0, "site-2")]  # fmt: skip


def test_a_mars_infer_csv_with_its_labels_corrected_is_a_labels_file(tmp_path: Path) -> None:
    """README: "a mars-infer CSV with its wrong labels corrected is one". Its error rows have no
    label: they were refused ("no label"), so the file was not one until they were deleted."""
    import io

    from marsvision.runtime.classifier import Prediction
    from marsvision.runtime.results import Provenance, ResultWriter

    buf = io.StringIO()
    ResultWriter(buf, fmt="csv", class_names=BINARY, top_k=None, write_header=True,
                 provenance=Provenance("sha", "int8", "onnxruntime-cpu")).write([
        Prediction("imgs/a.jpg", "ok", "Rover", (0.2, 0.8)),
        Prediction("imgs/b.jpg", "error", error="cannot decode"),
        Prediction("imgs/c.jpg", "ok", "Surface", (0.9, 0.1)),
    ])  # fmt: skip
    f = tmp_path / "sort.csv"
    f.write_text(buf.getvalue().replace("imgs/c.jpg,ok,Surface", "imgs/c.jpg,ok,Rover"))
    assert [(t.name, t.label) for t in read_labels(f, BINARY).truths] == [("a.jpg", 1),
                                                                         ("c.jpg", 1)]  # fmt: skip
    # an error row given a label is labelled; a row that is not an error still needs one
    f.write_text(buf.getvalue().replace("imgs/b.jpg,error,", "imgs/b.jpg,error,Surface"))
    assert [t.name for t in read_labels(f, BINARY).truths] == ["a.jpg", "b.jpg", "c.jpg"]
    f.write_text(buf.getvalue().replace("imgs/a.jpg,ok,Rover", "imgs/a.jpg,ok,"))
    with pytest.raises(MarsvisionError, match=r"sort.csv:2: no label$"):
        read_labels(f, BINARY)


def test_the_second_interval_resamples_sols_where_names_have_them(tmp_path: Path) -> None:
    """By sol where a file name is an MSL product's; with none, by image (it said "by sol" of a
    phone's photos); a group column's groups first."""
    msl_name = "0270MH0002580000101234E01_DRCL.JPG"
    f = tmp_path / "l.csv"
    for rows, want in (([msl_name, "IMG_1.jpg"], "sol"), (["IMG_1.jpg", "IMG_2.jpg"], "image")):
        f.write_text("path,label\n" + "".join(f"{n},Rover\n" for n in rows))
        assert read_labels(f, BINARY).group_by == want
    f.write_text(f"path,label,group\n{msl_name},Rover,site-1\n")
    assert read_labels(f, BINARY).group_by == "group"
    assert read_labels(_folder(tmp_path), BINARY).group_by == "image"


def _folder(tmp_path: Path) -> Path:
    top = tmp_path / "sorted"
    for rel in ("Rover/z.jpg", "Rover/sub/a.jpg", "Surface/b.jpg"):
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(b"")
    return top


def test_a_class_folders_sha256_is_of_its_sorted_lines(tmp_path: Path) -> None:
    """Labels.sha256 of a folder: of its sorted "<relative path>\\t<label>" lines, whatever
    order the walk found them in (it lists a folder's files before its subfolders')."""
    lines = sorted(["Rover/z.jpg\tRover\n", "Rover/sub/a.jpg\tRover\n", "Surface/b.jpg\tSurface\n"])
    want = hashlib.sha256("".join(lines).encode()).hexdigest()
    assert read_labels(_folder(tmp_path), BINARY).sha256 == want


def test_a_class_subfolder_that_cannot_be_listed_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its images would be left out of the labelled set without a word (chmod does not stop
    root, so the listing fails by hand)."""
    top = _folder(tmp_path)
    real = os.scandir

    def scandir(path: str = ".") -> object:
        if Path(path) == top / "Rover" / "sub":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(MarsvisionError, match="cannot list .*sub in the labels folder"):
        read_labels(top, BINARY)


def test_a_class_number_as_label_is_refused_with_its_name(tmp_path: Path) -> None:
    """Labels are class names; a number (as the MSL split files give them) is refused, and the
    message names the class it stands for, where there is one."""
    msl = ["apxs", "apxs cal target", "chemcam cal target"]
    f = tmp_path / "ids.csv"
    f.write_text("path,label\na.jpg,2\n")
    with pytest.raises(MarsvisionError) as e:
        read_labels(f, msl)
    assert e.value.message.endswith(
        "label '2' is not one of the model's classes [apxs, apxs cal target, chemcam cal "
        "target]: labels are class names, not numbers (class 2 is 'chemcam cal target')"
    )
    f.write_text("path,label\na.jpg,3\n")  # no class 3: no name to give
    with pytest.raises(MarsvisionError, match=r"target\]$"):
        read_labels(f, msl)
