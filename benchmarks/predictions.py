"""Read mars-infer's result files (CSV or JSONL, every probability or --top-k) back: the rows,
the classes they name, the task those classes belong to, and the model that wrote them."""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import itertools
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.results import ENCODING, csv_rows, whole_csv_records

_PROVENANCE = ("model_sha256", "precision", "backend")
_SHOW = 3  # items quoted in an error message


def short_list(items: Sequence[str], limit: int = _SHOW) -> str:
    """The first `limit` items, then how many there are in all."""
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def file_name(path: str) -> str:
    """The file name a path ends in: the key rows are matched to images by. At `/`, and at a
    backslash too, for paths written on Windows (`C:\\imgs\\0195MH....JPG`), in a result file or
    a labels CSV."""
    return re.split(r"[\\/]", path.rstrip("/\\"))[-1]


@dataclass(frozen=True)
class PredictionRow:
    """One result row of mars-infer, as far as scoring needs it."""

    line: int  # line number in the file
    path: str  # as the user gave it to mars-infer
    status: str  # ok | error
    label: str | None  # the model's decision, a class name (None on error rows)
    model_sha256: str
    precision: str
    backend: str
    tta: str = "none"  # mars-infer --tta (files written before the flag have no tta column)
    confidence: float | None = None  # the probability the row gives its label, where it has it

    @property
    def name(self) -> str:
        """The image's file name: the key that matches the row to an image (`file_name`)."""
        return file_name(self.path)


@dataclass(frozen=True)
class Predictions:
    """A mars-infer result file: its rows and the classes it names."""

    path: Path
    fmt: str  # csv | jsonl
    class_names: list[str] | None  # every class in model order; None in a --top-k file
    top_k: int | None
    labels: frozenset[str]  # every class name that the rows mention
    rows: list[PredictionRow]
    sha256: str = ""  # of the bytes read, which were scored


def _row(path: Path, line: int, d: dict[str, Any], *, ranked: bool = False) -> PredictionRow:
    """One row of a result file (`ranked`: a CSV of --top-k columns)."""
    status = d.get("status")
    if status not in ("ok", "error"):
        raise MarsvisionError(f"{path}: line {line} has status {status!r}, not ok or error")
    label = d.get("label") or None
    if label is not None and not isinstance(label, str):  # a hand-edited JSONL row: a traceback
        raise MarsvisionError(f"{path}: line {line} has label {label!r}, not a class name")
    if status == "ok" and label is None:
        raise MarsvisionError(f"{path}: line {line} has status ok but no label")
    sha, precision, backend = (str(d[k]) for k in _PROVENANCE)
    tta = str(d.get("tta") or "none")
    confidence = _confidence(path, line, d, label, ranked) if status == "ok" else None
    return PredictionRow(
        line, str(d["path"]), status, label, sha, precision, backend, tta, confidence
    )


def _confidence(
    path: Path, line: int, d: dict[str, Any], label: str | None, ranked: bool
) -> float | None:
    """The probability a row gives its label: from every class's (JSONL `probs`, CSV
    `prob_<class>`) or the top k's (JSONL `top_k` pairs, CSV `label_i`/`prob_i` when `ranked`,
    known from the header: a class named "1" has a `prob_1` column too); None where the row
    does not hold it (a decision threshold's label outside the top k)."""
    if isinstance(d.get("probs"), dict):
        value = d["probs"].get(label)
    elif d.get("top_k") is not None:
        value = next((p for lab, p in d["top_k"] if lab == label), None)
    elif ranked:
        ranks = itertools.takewhile(lambda i: f"label_{i}" in d, itertools.count(1))
        value = next((d.get(f"prob_{i}") for i in ranks if d[f"label_{i}"] == label), None)
    else:
        value = d.get(f"prob_{label}")
    if value is None:
        return None
    try:
        p = float(value)
    except (TypeError, ValueError):
        p = math.nan
    if not 0.0 <= p <= 1.0:  # also NaN
        raise MarsvisionError(f"{path}: line {line} gives its label {label} the probability "
                              f"{value!r}, not a number from 0 to 1")  # fmt: skip
    return p


_REQUIRED = ("path", "status", "label", "error", *_PROVENANCE)


def _not_results(path: Path, first: str) -> MarsvisionError:
    return MarsvisionError(
        f"{path} is not a mars-infer result file: its first line is {first}; score the file "
        "that mars-infer wrote (its --out)"
    )


def _check_first_line(path: Path, text: str, *, jsonl: bool) -> None:
    """A file that mars-infer did not write (a checkpoint, a manifest, a score report) is said
    to be one before any row is read: its rows were blamed on a run cut short (finish it with
    mars-infer --resume, which then refused it too)."""
    # a JSONL file's blank lines are skipped; a CSV's are not
    first = (text.lstrip() if jsonl else text).split("\n", 1)[0].rstrip("\r")
    if jsonl:
        try:
            row = json.loads(first)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and {"path", "status"} <= row.keys()):
            raise _not_results(path, "no result row (path, status, label, ...)")
        return
    header = next(csv.reader([first]), [])
    if not all(c in header for c in _REQUIRED):
        raise _not_results(path, f"no header of the columns {', '.join(_REQUIRED)}")


def _read_csv(path: Path, text: str) -> Predictions:
    # mars-infer ends every row with a newline; a kill can cut the last one inside its last
    # column, which still has the header's count of columns (as --resume finds where it ends)
    data = text.encode(ENCODING["encoding"], ENCODING["errors"])
    if whole_csv_records(data) < len(data):
        raise MarsvisionError(
            f"{path}: its last row does not end (a run cut short? finish it with mars-infer "
            "--resume, which drops the unfinished row; or, if that row is whole, end the file "
            "with a newline)"
        )
    table = csv_rows(path, text)
    header = table[0]
    top_k = sum(1 for c in header if re.fullmatch(r"label_\d+", c)) or None
    names = None if top_k else [c[len("prob_") :] for c in header if c.startswith("prob_")]
    label_keys = ["label", *(f"label_{i}" for i in range(1, (top_k or 0) + 1))]
    rows: list[PredictionRow] = []
    labels: set[str] = set()
    for n, values in enumerate(table[1:], start=2):
        if not values:  # a blank line (an editor's trailing newline)
            continue
        if len(values) != len(header):
            raise MarsvisionError(
                f"{path}: line {n} has {len(values)} columns, the header {len(header)} "
                "(a run cut short? finish it with mars-infer --resume)"
            )
        d = dict(zip(header, values))
        rows.append(_row(path, n, d, ranked=top_k is not None))
        labels.update(d[k] for k in label_keys if d[k])
    return Predictions(path, "csv", names, top_k, frozenset(labels), rows)


def _read_jsonl(path: Path, text: str) -> Predictions:
    rows: list[PredictionRow] = []
    labels: set[str] = set()
    names: list[str] | None = None
    top_k: int | None = None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            row = _row(path, n, d)
            ranked = [str(lab) for lab, _ in d.get("top_k") or ()]  # [label, probability] pairs
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
            raise MarsvisionError(
                f"{path}: line {n} is not a mars-infer result row (a run cut short? finish it "
                "with mars-infer --resume)"
            ) from None
        rows.append(row)
        if row.label:
            labels.add(row.label)
        if d.get("top_k") is not None:
            top_k = max(top_k or 0, len(ranked))
            labels.update(ranked)
        if isinstance(d.get("probs"), dict):
            keys = list(d["probs"])
            if names is not None and keys != names:
                raise MarsvisionError(
                    f"{path}: line {n} has classes {short_list(keys)}, earlier lines "
                    f"{short_list(names)}"
                )
            names = keys
    return Predictions(path, "jsonl", names, top_k, frozenset(labels), rows)


def read_predictions(path: Path) -> Predictions:
    """Read a mars-infer result file: JSONL if it starts with '{' (whatever its name), else CSV;
    `-` is stdin (`mars-infer ... --out - | mars-bench score -`), named <stdin>. Read once: its
    sha256 is of the bytes scored (a second read of a pipe, /dev/stdin, hashed nothing)."""
    stdin = str(path) == "-"
    if stdin:
        path = Path("<stdin>")
    try:
        if stdin and sys.stdin is None:  # started with stdin closed (`<&-`)
            raise OSError(errno.EBADF, "stdin is closed")
        if stdin:
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise MarsvisionError(f"cannot read the predictions file {path} ({e.strerror})") from None
    # utf-8-sig: a file saved again by Excel ("CSV UTF-8") starts with a byte-order mark; line
    # ends are kept as they are (a quoted path may hold one)
    text = data.decode("utf-8-sig", errors="surrogateescape")
    if not text.strip():
        raise MarsvisionError(f"{path} is empty: no predictions to score")
    jsonl = text.lstrip().startswith("{")
    _check_first_line(path, text, jsonl=jsonl)
    if jsonl:
        preds = _read_jsonl(path, text)
    else:
        preds = _read_csv(path, text)
    if not preds.rows:
        raise MarsvisionError(f"{path} has a header but no rows: no predictions to score")
    return dataclasses.replace(preds, sha256=hashlib.sha256(data).hexdigest())


def recorded_model_classes(path: Path, model_sha256: str) -> list[str] | None:
    """The class names of the model that wrote the results file `path`, read from the model its
    run record (`<path>.run.json`, mars-infer's) names, where that file is still there with the
    rows' sha256; else None. A --top-k file's rows name the classes they ranked, not all of
    them in order: without this an msl25 one needed the whole MSL data set for the names."""
    from marsvision.runtime.backends import load_model_meta
    from marsvision.runtime.metadata import sha256_file
    from marsvision.runtime.resume import read_record

    try:
        record = read_record(str(path))
        if record is None:
            return None
        model = Path(record["engine"])  # absolute
        if record.get("model_sha256") != model_sha256 or not model.is_file():
            return None  # a device or FIFO the record names (an edited one) was read forever
        if sha256_file(model) != model_sha256:
            return None
        return list(load_model_meta(model).class_names)
    except (OSError, ValueError, KeyError, TypeError, MarsvisionError):
        return None


def resolve_task(
    preds: Predictions, *, data_dir: Path | None, model_classes: list[str] | None = None
) -> tuple[str, list[str]]:
    """(task, class names) of the file: its classes must be binary's or msl25's, in order.
    Without `data_dir` (scoring a user's own labels), msl25's are the file's own 25 names; a
    --top-k file names only some, and then needs the data folder's, or `model_classes` (those
    of the model that wrote it, `recorded_model_classes`)."""
    from marsvision.train.data import BINARY_CLASS_NAMES, NUM_MSL_CLASSES, class_names

    tasks: dict[str, list[str]] = {"binary": list(BINARY_CLASS_NAMES)}
    if data_dir is not None:
        tasks["msl25"] = class_names("msl25", data_dir)
    elif preds.class_names is not None and len(preds.class_names) == NUM_MSL_CLASSES:
        tasks["msl25"] = list(preds.class_names)
    elif model_classes is not None and len(model_classes) == NUM_MSL_CLASSES:
        tasks["msl25"] = list(model_classes)
    for task, names in tasks.items():
        if preds.class_names is not None:
            fits = preds.class_names == names
        else:  # --top-k: only the labels it names, at most k of every class
            fits = bool(preds.labels) and preds.labels <= set(names)
        if fits:
            unknown = sorted({r.label for r in preds.rows if r.label} - set(names))
            if unknown:
                raise MarsvisionError(
                    f"{preds.path}: label {unknown[0]!r} is not one of its classes "
                    f"{short_list(names)}"
                )
            return task, names
    found = preds.class_names if preds.class_names is not None else sorted(preds.labels)
    if "msl25" not in tasks:
        raise MarsvisionError(
            f"{preds.path} has classes [{short_list(found, 5)}], which are not binary's "
            f"[{', '.join(tasks['binary'])}]; "
            + ("an msl25 --top-k file's rows name the classes they ranked, not all 25 in "
               "order: pass --data (the MSL data folder; $MARS_DATA where it is one), or keep "
               f"its run record ({preds.path.name}.run.json) and the model it names"
               if preds.class_names is None else "nor 25 classes (msl25's)")
        )  # fmt: skip
    raise MarsvisionError(
        f"{preds.path} has classes [{short_list(found, 5)}], which match neither binary "
        f"[{', '.join(tasks['binary'])}] nor msl25 [{short_list(tasks['msl25'], 5)}] of {data_dir}"
    )


def model_provenance(rows: Sequence[PredictionRow], *, path: Path) -> dict[str, str]:
    """The model sha256, precision, backend and tta of the rows; one model per file."""
    shas = sorted({r.model_sha256 for r in rows})
    if len(shas) != 1:
        raise MarsvisionError(
            f"{path} mixes {len(shas)} models (model_sha256 {short_list([s[:12] for s in shas])}): "
            "score one model's rows at a time"
        )
    return {
        "sha256": shas[0],
        "precision": ",".join(sorted({r.precision for r in rows})),
        "backend": ",".join(sorted({r.backend for r in rows})),
        "tta": ",".join(sorted({r.tta for r in rows})),
    }
