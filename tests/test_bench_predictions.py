"""mars-bench's result-file reader (benchmarks/predictions.py): names, probabilities, JSONL,
top-k and tasks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from marsvision.benchmarks.predictions import (
    file_name,
    read_predictions,
    resolve_task,
    short_list,
)
from marsvision.runtime.classifier import Prediction
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.results import Provenance, ResultWriter

HEADER = "path,status,label,error,prob_Surface,prob_Rover,model_sha256,precision,backend\n"


def _write(path: Path, preds: list[Prediction], names: list[str], *, fmt: str = "csv",
           top_k: int | None = None) -> Path:  # fmt: skip
    with open(path, "a", newline="", encoding="utf-8") as f:
        ResultWriter(f, fmt=fmt, class_names=names, top_k=top_k,
                     provenance=Provenance("ab" * 32, "int8", "onnxruntime", "none"),
                     write_header=True).write(preds)  # fmt: skip
    return path


def test_a_file_name_is_read_past_a_trailing_separator() -> None:
    assert file_name("imgs/a.JPG/") == "a.JPG" and file_name("C:\\imgs\\a.JPG\\") == "a.JPG"


def test_short_list_says_how_many_as_soon_as_one_is_left_out() -> None:
    assert short_list(["a", "b", "c"]) == "a, b, c"
    assert short_list(["a", "b", "c", "d"]) == "a, b, c, ... (4 in all)"


def test_a_negative_probability_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "neg.csv"
    f.write_text(HEADER + "/x/a.jpg,ok,Rover,,1.5,-0.5,abab,int8,onnxruntime\n")
    with pytest.raises(MarsvisionError, match=re.escape("probability '-0.5', not a number")):
        read_predictions(f)


def test_a_jsonl_file_may_start_with_a_blank_line(tmp_path: Path) -> None:
    """Blank lines of a JSONL file are skipped, the first one too (its first row is the check)."""
    src = _write(tmp_path / "r.jsonl", [Prediction("/x/a.jpg", "ok", "Rover", (0.1, 0.9))],
                 ["Surface", "Rover"], fmt="jsonl")  # fmt: skip
    f = tmp_path / "blank.jsonl"
    f.write_text("\n" + src.read_text())
    assert [r.confidence for r in read_predictions(f).rows] == [0.9]


def test_a_jsonl_files_top_k_is_its_longest_row(tmp_path: Path) -> None:
    rows = [Prediction(f"/x/{n}.jpg", "ok", "Rover", (0.1, 0.9)) for n in "ab"]
    _write(tmp_path / "k.jsonl", rows[:1], ["Surface", "Rover"], fmt="jsonl", top_k=2)
    f = _write(tmp_path / "k.jsonl", rows[1:], ["Surface", "Rover"], fmt="jsonl", top_k=1)
    assert read_predictions(f).top_k == 2


def test_a_top_k_file_of_error_rows_alone_has_no_task(tmp_path: Path) -> None:
    """No row names a class: not taken for a binary file (an empty set is a subset of any)."""
    f = _write(tmp_path / "k.csv", [Prediction("/x/a.jpg", "error", None, None, error="boom")],
               ["Surface", "Rover"], top_k=1)  # fmt: skip
    with pytest.raises(MarsvisionError, match=r"has classes \[\], which are not binary's"):
        resolve_task(read_predictions(f), data_dir=None)


def test_a_top_k_files_classes_are_all_it_ranks(tmp_path: Path) -> None:
    """A class that appears only as a second choice is one of the file's classes: a model of
    Surface, Rover and Other is no binary model, whichever class its rows decide."""
    names = ["Surface", "Rover", "Other"]
    for fmt in ("csv", "jsonl"):
        f = _write(tmp_path / f"k.{fmt}", [Prediction("/x/a.jpg", "ok", "Rover", (0.1, 0.6, 0.3))],
                   names, fmt=fmt, top_k=2)  # fmt: skip
        assert read_predictions(f).labels == {"Rover", "Other"}
        with pytest.raises(MarsvisionError, match=r"\[Other, Rover\], which are not binary's"):
            resolve_task(read_predictions(f), data_dir=None)


def test_classes_neither_binarys_nor_25_are_refused_without_data(tmp_path: Path) -> None:
    """Without --data, a file of its own 25 classes is msl25; one of 3 is nothing."""
    f = _write(tmp_path / "three.csv", [Prediction("/x/a.jpg", "ok", "a", (0.8, 0.1, 0.1))],
               ["a", "b", "c"])  # fmt: skip
    with pytest.raises(MarsvisionError, match=r"\[a, b, c\], which are not binary's .* nor 25"):
        resolve_task(read_predictions(f), data_dir=None)
