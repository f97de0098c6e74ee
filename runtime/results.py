"""Result rows of mars-infer: CSV or JSONL, written and flushed batch by batch, and read back
(for `--resume`: `marsvision.runtime.resume`; for scoring: `marsvision.benchmarks.predictions`).

One row per input: path, status (ok|error), label (the model's decision: the most probable
class, or a binary model's decision threshold), the probability of every class (`prob_<class>`
columns / a `probs` object) or, with `top_k`, the k best (`label_i`, `prob_i` / a `top_k` list),
error message, and provenance (model sha256, precision, backend, test-time augmentation).

Paths are written losslessly, in any locale: a file name that is not valid UTF-8 keeps its raw
bytes in CSV (Python's surrogateescape: the CSV holds the same bytes as the file system) and
appears as `\\udcXX` escapes in JSONL (valid JSON; `json.loads(line)["path"].encode("utf-8",
"surrogateescape")` gives the bytes).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from marsvision.runtime.classifier import Prediction
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.inputs import utf8_path
from marsvision.runtime.metadata import FORMULA_START

FORMATS = ("csv", "jsonl")
ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


@dataclass(frozen=True)
class Provenance:
    """Where a prediction comes from; repeated on every row."""

    model_sha256: str
    precision: str
    backend: str
    tta: str = "none"


def csv_lines(rows: list[list[Any]]) -> str:
    """The rows as the results file's CSV lines."""
    buf = io.StringIO()
    plain = csv.writer(buf, lineterminator="\n")
    # the writer quotes a field only for the characters of its line terminator: a carriage
    # return in a file name would end the row for every reader, so such rows are quoted whole
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in rows:
        (quoted if any("\r" in str(v) for v in row) else plain).writerow(row)
    return buf.getvalue()


def csv_header(class_names: list[str], top_k: int | None) -> list[str]:
    """CSV columns for a model's classes (all probabilities, or the top k)."""
    if top_k:
        probs = [c for i in range(1, top_k + 1) for c in (f"label_{i}", f"prob_{i}")]
    else:
        probs = [f"prob_{name}" for name in class_names]
    return ["path", "status", "label", *probs, "error", "model_sha256", "precision", "backend",
            "tta"]  # fmt: skip


def sheet_safe_path(path: str) -> str:
    """`path` as the CSV writes it: a relative path that starts as a formula (`=cmd.jpg`,
    `+1.jpg`, in the working folder, from a pattern or an @list) gets `./` before it, which
    names the same file (and --resume takes it as one, `path_keys`); a spreadsheet ran it."""
    if path.startswith(FORMULA_START) and not os.path.isabs(path):
        return os.path.join(os.curdir, path)
    return path


def _ranked(p: Prediction, class_names: list[str], top_k: int) -> list[tuple[str, float]]:
    assert p.probs is not None
    probs = p.probs
    order = sorted(range(len(probs)), key=lambda i: -probs[i])[:top_k]
    return [(class_names[i], probs[i]) for i in order]


class ResultWriter:
    """Appends rows for finished batches and flushes them at once."""

    def __init__(
        self,
        stream: IO[str],
        *,
        fmt: str,
        class_names: list[str],
        top_k: int | None,
        provenance: Provenance,
        write_header: bool,
    ) -> None:
        if fmt not in FORMATS:
            raise MarsvisionError(f"unknown format {fmt!r}; choose csv or jsonl")
        self.stream = stream
        self.fmt = fmt
        self.class_names = class_names
        self.top_k = min(top_k, len(class_names)) if top_k else None
        self.prov = provenance
        self.header = csv_header(class_names, self.top_k)
        if fmt == "csv" and write_header:
            self._write_text(csv_lines([self.header]))

    def _write_text(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _csv_row(self, p: Prediction) -> list[Any]:
        if p.probs is None:
            probs: list[Any] = [""] * (2 * self.top_k if self.top_k else len(self.class_names))
        elif self.top_k:
            probs = [
                v
                for lab, pr in _ranked(p, self.class_names, self.top_k)
                for v in (lab, f"{pr:.6f}")
            ]
        else:
            probs = [f"{v:.6f}" for v in p.probs]
        prov = self.prov
        return [
            sheet_safe_path(utf8_path(p.path)),
            p.status,
            p.label or "",
            *probs,
            p.error,
            prov.model_sha256,
            prov.precision,
            prov.backend,
            prov.tta,
        ]

    def _json_row(self, p: Prediction) -> str:
        d: dict[str, Any] = {"path": utf8_path(p.path), "status": p.status, "label": p.label}
        if self.top_k:
            d["top_k"] = (
                None
                if p.probs is None
                else [[lab, round(pr, 6)] for lab, pr in _ranked(p, self.class_names, self.top_k)]
            )
        else:
            d["probs"] = (
                None
                if p.probs is None
                else {n: round(v, 6) for n, v in zip(self.class_names, p.probs)}
            )
        d.update(
            error=p.error or None,  # null, as an error row's label and probabilities are
            model_sha256=self.prov.model_sha256,
            precision=self.prov.precision,
            backend=self.prov.backend,
            tta=self.prov.tta,
        )
        return json.dumps(d) + "\n"

    def write(self, predictions: list[Prediction]) -> None:
        """Write one finished batch and flush it."""
        if self.fmt == "csv":
            text = csv_lines([self._csv_row(p) for p in predictions])
        else:
            text = "".join(self._json_row(p) for p in predictions)
        self._write_text(text)


def whole_csv_records(data: bytes) -> int:
    """Length of the longest prefix of `data` made of whole CSV records: up to the last newline
    outside quotes (a quoted path may hold newlines; quotes inside a field come doubled)."""
    end = pos = quotes = 0
    while (nl := data.find(b"\n", pos)) >= 0:  # each piece that a newline ends, in place
        quotes += data.count(b'"', pos, nl)
        pos = nl + 1
        if quotes % 2 == 0:
            end = pos
    return end


def text_lines(text: str) -> Iterator[str]:
    """The lines of `text`, each with its newline, split at newlines alone (a CSV field may hold
    a carriage return; JSON escapes both), one at a time: a resumed results file of 500,000 rows
    took 1 GB as lists of lines and rows."""
    pos = 0
    while pos < len(text):
        nl = text.find("\n", pos)
        end = len(text) if nl < 0 else nl + 1
        yield text[pos:end]
        pos = end


def iter_csv_rows(
    path: str | os.PathLike[str], text: str, *, then: str = ""
) -> Iterator[list[str]]:
    """The rows of a results file's whole CSV `text`, one at a time. A field may be as long as
    the text (the csv module refuses fields over 128 KiB by default: an error row's long path);
    malformed CSV is a one-line error naming the line (`then`: what it stops, e.g. "; cannot
    resume from it")."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.reader(text_lines(text))
    try:
        yield from reader
    except csv.Error as e:
        raise MarsvisionError(f"{path}: line {reader.line_num} is not CSV ({e}){then}") from None


def csv_rows(path: str | os.PathLike[str], text: str, *, then: str = "") -> list[list[str]]:
    """The rows of a results file's whole CSV `text` (`iter_csv_rows`)."""
    return list(iter_csv_rows(path, text, then=then))
