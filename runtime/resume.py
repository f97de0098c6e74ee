"""Continuing a results file (mars-infer --resume) and the file's life: which images its rows
already hold (`read_done`), the run record beside it (`write_record`) that a resume must match,
and opening it (new, appended to, or a stream) and locking it while a run writes.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from typing import IO, Any, Literal

from marsvision.runtime.errors import DISK_FULL, MarsvisionError
from marsvision.runtime.files import atomic_write_text, try_exclusive_lock
from marsvision.runtime.inputs import fs_path, path_keys
from marsvision.runtime.results import (
    ENCODING,
    Provenance,
    csv_lines,
    iter_csv_rows,
    text_lines,
    whole_csv_records,
)


def _check_same_run(path: str, n: int, row: dict[str, Any], prov: Provenance) -> None:
    """A row written by another model file, backend (onnxruntime on CUDA, a GPU run resumed
    with --device cpu) or --tta must not be continued."""
    for key, want in (("model_sha256", prov.model_sha256), ("backend", prov.backend),
                      ("tta", prov.tta)):  # fmt: skip
        if row.get(key) != want:
            raise MarsvisionError(
                f"{path}: row {n} has {key} {str(row.get(key))[:16]!r}, this run "
                f"{want[:16]!r}; resume with the same model, backend (--backend, --device) and "
                "--tta, or write to a new --out"
            )


def _json_layout_matches(row: dict[str, Any], header: list[str]) -> bool:
    """Whether a JSONL row holds what `header` (this run's CSV columns) says: the probability of
    each of the same classes, or the same number of top-k entries."""
    k = sum(c.startswith("label_") for c in header)
    if k:
        return "top_k" in row and (row["top_k"] is None or len(row["top_k"]) == k)
    names = [c.removeprefix("prob_") for c in header if c.startswith("prob_")]
    return "probs" in row and (row["probs"] is None or list(row["probs"]) == names)


def _csv_done(path: str, text: str, header: list[str], prov: Provenance) -> dict[str, str]:
    rows = iter_csv_rows(path, text, then="; cannot resume from it")
    first = next(rows)
    if first[:2] != header[:2]:  # not a results file at all (an image, the wrong --out)
        raise MarsvisionError(
            f"{path} is not a mars-infer results file (its first line is not a header that "
            "starts path,status); cannot resume from it: write to a new --out file"
        )
    if first != header:
        raise MarsvisionError(
            f"{path} has columns {first[:4]}... that do not match this model and --top-k; "
            "resume with the same options, or write to a new --out file"
        )
    done: dict[str, str] = {}
    for n, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise MarsvisionError(f"{path}: row {n} is malformed; cannot resume from it")
        _check_same_run(path, n, dict(zip(header, row)), prov)
        done[fs_path(row[0])] = row[1]
    return done


def _jsonl_done(path: str, text: str, header: list[str], prov: Provenance) -> dict[str, str]:
    done: dict[str, str] = {}
    for n, line in enumerate(text_lines(text), start=1):
        try:
            d = json.loads(line)
            done[fs_path(d["path"])] = d["status"]
            layout_matches = _json_layout_matches(d, header)
        except (ValueError, KeyError, TypeError, AttributeError):  # a path no name can have too
            raise MarsvisionError(f"{path}: line {n} is not a result row; cannot resume") from None
        _check_same_run(path, n, d, prov)
        if not layout_matches:
            raise MarsvisionError(
                f"{path}: line {n} was written for other classes or another --top-k; resume "
                "with the same options, or write to a new --out file"
            )
    return done


def _a_cut_first_line(data: bytes, fmt: str, header: list[str]) -> bool:
    """Whether `data`, a file with no whole line, is the start of this run's first line, as a
    kill while it was written leaves it (the CSV header, a JSONL row): only such a file is
    emptied to begin again (a one-line file of something else named as --out was)."""
    first = csv_lines([header]) if fmt == "csv" else '{"path": '
    line = first.encode("utf-8", "surrogateescape")
    return line.startswith(data) or (fmt == "jsonl" and data.startswith(line))


def _whole_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:  # UnicodeDecodeError too
        return False
    return True


def read_done(
    path: str,
    *,
    fmt: str,
    header: list[str],
    provenance: Provenance,
    check: Callable[[dict[str, str]], None] | None = None,
) -> dict[str, str]:
    """{path: status} of the rows already in a results file (after repairing a cut last line).

    A file written for another model's classes or another --top-k is refused, and so is one
    written by another model file, backend or --tta (its rows would mix two models), one in
    the other format, and one that `check` (given the rows) refuses. A refused file is left as
    it was: the cut last line of a kill is dropped only from a file whose whole rows were all
    checked to be this run's.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise MarsvisionError(f"cannot resume the results file {path} ({e.strerror})") from None
    if data and (data[:1] == b"{") != (fmt == "jsonl"):
        other = "csv" if fmt == "jsonl" else "jsonl"
        raise MarsvisionError(
            f"{path} holds {other.upper()} rows, not {fmt.upper()}; resume with --format {other}"
        )
    # the whole rows; what follows them is a last row left unfinished by a kill
    keep = whole_csv_records(data) if fmt == "csv" else data.rfind(b"\n") + 1
    if keep == 0 and data and not _a_cut_first_line(data, fmt, header):  # it would be emptied
        raise MarsvisionError(
            f"{path} is not a mars-infer results file (no whole line, nor the start of one); "
            "cannot resume from it: write to a new --out file"
        )
    if keep == 0 and fmt == "jsonl" and _whole_json(data):
        # not cut: another program's one-line JSON (a config.json named as --out was emptied),
        # or this run's first row but for its line break, which alone passes (and is redone)
        _jsonl_done(path, str(data, **ENCODING), header, provenance)
    size, text = len(data), str(memoryview(data)[:keep], **ENCODING)  # no copy of the bytes
    del data
    done: dict[str, str] = {}
    if text:
        read = _csv_done if fmt == "csv" else _jsonl_done
        done = read(path, text, header, provenance)
    if check is not None:
        check(done)
    if keep < size:  # so that appending starts on a fresh row
        try:
            with open(path, "rb+") as f:
                f.truncate(keep)
        except OSError as e:
            raise MarsvisionError(f"cannot resume the results file {path} ({e.strerror})") from None
    return done


RECORD_SUFFIX = ".run.json"


def _record_path(out: str) -> str:
    """The run record beside a results file (`results.csv.run.json`)."""
    return out + RECORD_SUFFIX


def write_record(out: str, options: dict[str, Any]) -> None:
    """Write the resolved options of the run that starts a results file, with the folder it ran
    in (its rows' relative paths are from there), as the record --resume checks."""
    from datetime import datetime, timezone

    here = os.stat(".")
    record = {
        "command": "mars-infer",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cwd": os.getcwd(),
        "cwd_id": [here.st_dev, here.st_ino],  # the same folder under another name or mount
        **options,
    }
    _save_record(out, record)


def read_record(out: str) -> dict[str, Any] | None:
    """The run record beside `out` (None: it has none); one that cannot be read is an error
    (also how `mars-bench score` finds the model that wrote a results file)."""
    try:
        with open(_record_path(out), "rb") as f:
            record = json.loads(f.read())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise MarsvisionError(
            f"cannot read the run record {_record_path(out)} ({e}); delete it to resume without "
            "its checks"
        ) from None
    return record


def _save_record(out: str, record: dict[str, Any]) -> None:
    try:
        atomic_write_text(_record_path(out), json.dumps(record, indent=2) + "\n")
    except OSError as e:
        full = e.errno in DISK_FULL
        raise MarsvisionError(
            f"cannot write the run record {_record_path(out)} ({e.strerror}); "
            + ("make room, or " if full else "")
            + "choose another --out"
        ) from None


def _folder_id(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino]


def _resume_base(
    out: str,
    *,
    run: dict[str, Any],
    inputs: list[str],
    rows: dict[str, str],
) -> tuple[str | None, dict[str, Any] | None]:
    """The folder that the relative paths of `out`'s rows are from when it is not this one (None:
    this one, under any name, or a file without a run record that passes the check below), and
    the file's run record (None: it has none). A
    resume that would mix its rows with this run's (`run`: the options its record would keep,
    `write_record`) is refused: another --fast-decode (the same image decodes to other pixels),
    relative inputs from another folder (its rows would be keyed from two folders; they were
    matched against this one, so every row was written twice), and, for a file with relative
    rows, any resume from elsewhere once that folder is gone (moved: they lead nowhere), and INT8
    sums of the other kind (`int8_sums`: exact or fast; on a CPU without VNNI they give other
    probabilities, and $MARSVISION_EXACT_INT8 switched them between a run and its resume), and
    another version of the library that runs the model (`library`: onnxruntime 1.19 and 1.32 give
    an int8-trt model's probabilities apart by up to 0.012 on a CPU). A file without a record
    (from before records, or copied without it; `rows`: {path: status}) whose relative rows of
    images read lead to none from here is refused too: begun elsewhere (or its images moved
    since), none of its rows would be skipped, and every image was written again."""
    fast_decode, int8_sums, library = run["fast_decode"], run["int8_sums"], run["library"]
    relative = [p for p in rows if not os.path.isabs(p)]
    record = read_record(out)
    if record is None:
        read = [p for p in relative if rows[p] == "ok"]
        if read and not any(os.path.exists(p) for p in read):
            raise MarsvisionError(
                f"{out} has no run record ({_record_path(out)}), and none of the {len(read)} "
                f"images its rows name by relative paths (e.g. {read[0]}) is found from this "
                "folder, so none of its rows would be skipped: resume it from the folder it was "
                "begun in, or write to a new --out"
            )
        return None, None
    if record.get("fast_decode", False) != fast_decode:
        was = "with" if record.get("fast_decode") else "without"
        raise MarsvisionError(
            f"{out} was written {was} --fast-decode (its run record, {_record_path(out)}): resume "
            "it the same way, or write to a new --out"
        )
    was = record.get("int8_sums", int8_sums)  # a record from before it: not known
    if was != int8_sums:
        from marsvision.runtime.backends.onnxruntime import EXACT_INT8_ENV

        raise MarsvisionError(
            f"{out} was written with {was} INT8 sums, and this run's are {int8_sums} (its run "
            f"record, {_record_path(out)}): resume it with {EXACT_INT8_ENV}="
            f"{1 if was == 'exact' else 0}, or write to a new --out"
        )
    was = record.get("library", library)  # a record from before it: not known
    if was != library:
        raise MarsvisionError(
            f"{out} was written with {was}, and this run has {library} (its run record, "
            f"{_record_path(out)}): other versions may give other probabilities; resume it with "
            f"{was}, or write to a new --out"
        )
    cwd, cwd_id = str(record.get("cwd") or os.getcwd()), record.get("cwd_id")
    if cwd_id == _folder_id(".") or os.path.realpath(cwd) == os.path.realpath(os.getcwd()):
        return None, record
    begun = f"{out} was begun in {cwd}, and its rows' relative paths are from there"
    if relative and not os.path.isdir(cwd):
        raise MarsvisionError(
            f"{begun}; that folder is gone (moved?): resume it from where that folder is now"
        )
    if any(not os.path.isabs(p) for p in inputs):
        raise MarsvisionError(
            f"{begun}: resume it from that folder, or name the inputs by absolute paths"
        )
    return cwd, record


def read_resumed(
    out: str,
    *,
    fmt: str,
    header: list[str],
    provenance: Provenance,
    run: dict[str, Any],
    inputs: list[str],
    deeper: Callable[[], list[str]],
) -> dict[str, str]:
    """{path key: status} of the rows already in `out` (`read_done`), keyed by `path_keys` from
    the folder they were written in, for a run that continues it; refused as `read_done` and
    `_resume_base` say, and, for a file begun with --recursive and a run without it, when the
    inputs that --recursive would add to this run's (`deeper`) are not all in it: passed over,
    their rows would never be written and the file would look finished. A run with --recursive
    marks the record of a file begun without it, so that a later resume is held to it too. A
    file with no row yet (a CSV killed in its first batch: its header) holds nothing to mix
    with, and is not checked against its run record."""
    base, record = None, None

    def same_run(rows: dict[str, str]) -> None:
        nonlocal base, record
        if not rows:
            return
        base, record = _resume_base(out, run=run, inputs=inputs, rows=rows)
        if record is None or run["recursive"] or not record.get("recursive"):
            return
        keys, extra = set(path_keys(rows, base=base)), deeper()
        missed = sum(key not in keys for key in path_keys(extra))
        if missed:
            raise MarsvisionError(
                f"{out} was begun with --recursive (its run record, {_record_path(out)}): "
                f"without it this run passes over {missed} image{'s' * (missed != 1)} in "
                "subfolders that it has no row for, and the file would look finished; resume it "
                "with --recursive, or write to a new --out"
            )

    rows = read_done(out, fmt=fmt, header=header, provenance=provenance, check=same_run)
    if record is not None and run["recursive"] and not record.get("recursive"):
        _save_record(out, {**record, "recursive": True})
    return dict(zip(path_keys(rows, base=base), rows.values()))


def lock_output(stream: IO[str], path: str) -> None:
    """Hold an exclusive lock on the results file while this run writes it (released when the
    stream closes): two `--resume` runs on one file (a job relaunched while the first still
    runs) each read the same rows as done and both wrote the rest, every row twice. Where the
    file system has no locks (some network mounts), the run goes on unlocked."""
    try:
        try_exclusive_lock(stream.fileno())
    except BlockingIOError:
        raise MarsvisionError(
            f"{path} is being written by another mars-infer (it holds the file's lock): let that "
            "one finish, or write to another --out"
        ) from None


def out_exists(path: str) -> MarsvisionError:
    """The refusal of a new run's --out that exists."""
    return MarsvisionError(f"{path} exists: pass --resume to continue it, or choose another --out")


def open_output(path: str | None, *, append: bool) -> io.TextIOWrapper:
    """The text stream for --out (appended to, or created), or stdout; lossless for non-UTF-8
    paths."""
    if path is None:
        import sys

        if sys.stdout is None:  # started with it closed (`>&-`): an AttributeError traceback
            raise MarsvisionError("stdout is closed: pass --out FILE for the results")
        stream = io.TextIOWrapper(
            sys.stdout.buffer,
            encoding="utf-8",
            errors="surrogateescape",
            newline="",
            write_through=True,
        )
        return stream
    try:
        mode: Literal["a", "x"] = "a" if append else "x"
        stream = open(
            path, mode, newline="", encoding=ENCODING["encoding"], errors=ENCODING["errors"]
        )
    except FileExistsError:  # made since the run checked (another run started at the same time)
        raise out_exists(path) from None
    except OSError as e:
        raise MarsvisionError(f"cannot write the results file {path} ({e.strerror})") from None
    return stream
