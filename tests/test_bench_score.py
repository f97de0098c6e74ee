"""`mars-bench score` on real mars-infer output of the tiny model and on full-split result files.

The real runs (CSV, JSONL, --top-k) are checked against metrics computed here from the
runtime's probabilities and read_split's labels; files written with the runtime's own
ResultWriter over the whole test split check exact counts, intervals, --require and errors.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import files_up_to

from marsvision.benchmarks.cli import main as bench_main
from marsvision.benchmarks.parity import PARITY_FAIL_EXIT
from marsvision.benchmarks.score import SCORE_FAIL_EXIT, ScoreConfig, check_requirements
from marsvision.runtime.classifier import Prediction
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.metadata import sha256_file
from marsvision.runtime.results import Provenance, ResultWriter
from marsvision.train.data import class_names, read_split, sol_key
from marsvision.train.metrics import (
    bootstrap_cis,
    classification_metrics,
    confidence_report,
    per_class_metrics,
)

N_REAL = 40  # real test images through mars-infer: 5 batches of 8
SHA = "ab" * 32
BINARY = ["Surface", "Rover"]
SCORE = [sys.executable, "-c", "from marsvision.benchmarks.cli import main; main()", "score"]


def _score(args: list[str]) -> Result:
    result = CliRunner().invoke(bench_main, ["score", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _report(out: Path) -> dict[str, Any]:
    (path,) = sorted(out.glob("score-*.json"))
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def _error_line(result: Result) -> str:
    """The one-line user error (click's 'Error: ...'), with no traceback."""
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _write(
    path: Path,
    preds: list[Prediction],
    *,
    names: list[str] = BINARY,
    fmt: str = "csv",
    top_k: int | None = None,
    sha: str = SHA,
    header: bool = True,
    tta: str = "none",
) -> Path:
    """A result file written by the runtime's own ResultWriter."""
    with open(path, "a", newline="", encoding="utf-8") as f:
        ResultWriter(
            f,
            fmt=fmt,
            class_names=names,
            top_k=top_k,
            provenance=Provenance(sha, "int8", "onnxruntime", tta),
            write_header=header,
        ).write(preds)
    return path


def _pred(path: str, label: int, names: list[str] = BINARY) -> Prediction:
    probs = [0.1 / (len(names) - 1)] * len(names)
    probs[label] = 0.9
    return Prediction(path=path, status="ok", label=names[label], probs=tuple(probs))


# ---------------------------------------------------------------- real mars-infer output


@pytest.fixture(scope="module")
def real_runs(
    tiny_models: dict[str, Path], msl_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """mars-infer (its click entry) on the first N_REAL test images, as CSV, JSONL --top-k 2
    and CSV --top-k 1. Half the paths go through a relative symlink, half are absolute; two
    more rows name a val image and a missing file (outside the test split)."""
    from marsvision.runtime.cli import main as infer_main

    work = tmp_path_factory.mktemp("score-real")
    (work / "imgs").symlink_to(msl_dir.resolve() / "calibrated")
    samples = read_split(msl_dir, "test", "binary", limit=N_REAL)
    lines = [
        f"imgs/{s.path.name}" if i % 2 else str(s.path.resolve()) for i, s in enumerate(samples)
    ]
    lines += [str(read_split(msl_dir, "val", "binary", limit=1)[0].path), "imgs/no-such.JPG"]
    (work / "list.txt").write_text("\n".join(lines) + "\n")
    model = tiny_models["int8-cpu"]
    files = {"csv": "preds.csv", "jsonl-top2": "preds.jsonl", "csv-top1": "top1.csv"}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        for key, name in files.items():
            args = ["@list.txt", "-m", str(model), "-o", name, "-j", "1", "--threads", "1"]
            if "top" in key:
                args += ["--top-k", key[-1]]
            r = CliRunner().invoke(infer_main, args)
            assert r.exit_code == 3, r.output  # the missing file: one error row
            assert f"{N_REAL + 1} ok, 1 failed" in r.output
    return {"work": work, "samples": samples, "model": model, "files": files}


def test_real_output_scores_like_the_runtime(real_runs: dict[str, Any], msl_dir: Path) -> None:
    from marsvision.runtime.classifier import Classifier
    from marsvision.runtime.metadata import sha256_file

    samples, model, work = real_runs["samples"], real_runs["model"], real_runs["work"]
    with Classifier(model, batch_size=8, workers=1, threads=1) as clf:
        probs = np.array([p.probs for p in clf.predict([s.path for s in samples])])
        backend = clf.runner.name
    y_true = [s.label for s in samples]
    y_pred = probs.argmax(axis=1).tolist()
    right = np.array(y_true) == np.array(y_pred)
    want_conf = confidence_report(probs.max(axis=1), right)
    want = classification_metrics(y_true, y_pred, 2, "binary")
    want_cis = bootstrap_cis(y_true, y_pred, 2, "binary", n_boot=1000, seed=0)
    sols = [sol_key(s.path) for s in samples]
    want_by_sol = bootstrap_cis(y_true, y_pred, 2, "binary", n_boot=1000, seed=0, groups=sols)

    for key, name in real_runs["files"].items():
        out = work / f"out-{key}"
        r = _score([str(work / name), "--data", str(msl_dir), "--out", str(out), "--allow-missing"])
        assert r.exit_code == 0, r.output
        assert f"COVERAGE: PARTIAL, {N_REAL} of 1305 images scored" in r.stdout
        rep = _report(out)
        assert rep["metrics"] == want, key
        assert rep["cis"] == want_cis, key
        assert rep["cis_by_sol"] == want_by_sol != want_cis, key
        # the probability of each decision, as the file has it (6 decimals), every format
        conf = rep["confidence"]
        for field in ("mean", "highest", "ece"):
            assert conf[field] == pytest.approx(want_conf[field], abs=2e-6), (key, field)
        assert conf["keep"] == want_conf["keep"] and conf["images"] == N_REAL, key
        assert f"highest {want_conf['highest']:.4f}" in r.stdout, key
        assert rep["counts"] == {
            "split_images": 1305,
            "scored": N_REAL,
            "sols": len(set(sols)),
            "missing": 1305 - N_REAL,
            "failed": 0,
            "duplicated": 0,
            "rows": N_REAL + 2,
            "rows_outside_split": 2,
        }
        assert rep["task"] == "binary" and rep["split"] == "test"
        assert rep["model"] == {
            "sha256": sha256_file(model),
            "precision": "int8",
            "backend": backend,
            "tta": "none",
        }
        assert rep["predictions"]["sha256"] == sha256_file(work / name)
        assert rep["predictions"]["format"] == ("jsonl" if "jsonl" in key else "csv")
        assert rep["predictions"]["top_k"] == ({"csv": None, "jsonl-top2": 2, "csv-top1": 1}[key])

    # Without --allow-missing, a partial file is refused, in one line.
    r = _score([str(work / "preds.csv"), "--data", str(msl_dir), "--out", str(work / "x")])
    assert r.exit_code == 1
    assert f"{1305 - N_REAL} missing" in _error_line(r)
    assert not (work / "x").exists()


# ------------------------------------------------------ constructed files, full test split

WRONG = 100  # the first WRONG Rover images of the split are predicted Surface


@pytest.fixture(scope="module")
def test_split(msl_dir: Path) -> list[Any]:
    return read_split(msl_dir, "test", "binary")


def _full(samples: list[Any]) -> list[Prediction]:
    """Every test image once, true label except the first WRONG Rover images; the paths in
    forms that do not exist (matching is by file name)."""
    preds, wrong = [], 0
    for i, s in enumerate(samples):
        label = s.label
        if label == 1 and wrong < WRONG:
            label, wrong = 0, wrong + 1
        path = f"/elsewhere/{s.path.name}" if i % 2 else f"../x/calibrated/{s.path.name}"
        preds.append(_pred(path, label))
    return preds


def test_full_split_exact_metrics_cis_and_json(
    test_split: list[Any], msl_dir: Path, tmp_path: Path
) -> None:
    from marsvision.train.data import camera, data_fingerprint, msl_class_names

    f = _write(tmp_path / "full.csv", _full(test_split))
    r = _score([str(f), "--data", str(msl_dir), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "coverage: all 1305 images of the split scored" in r.stdout
    assert "f1 (Rover)" in r.stdout and "COVERAGE" not in r.stdout
    assert "per class" not in r.stdout  # two classes: the table says it all
    rep = _report(tmp_path / "out")
    assert (tmp_path / "out" / f"score-test-{SHA[:12]}-onnxruntime.json").is_file()
    tp, fn, tn = 979 - WRONG, WRONG, 326
    m = rep["metrics"]
    assert m["n"] == 1305
    assert m["confusion_matrix"] == [[tn, 0], [fn, tp]]
    assert m["accuracy"] == pytest.approx((tp + tn) / 1305, rel=1e-12)
    assert m["balanced_accuracy"] == pytest.approx((tp / 979 + 1.0) / 2, rel=1e-12)
    assert m["precision"] == 1.0
    assert m["recall"] == pytest.approx(tp / 979, rel=1e-12)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fn), rel=1e-12)
    for k, (lo, hi) in rep["cis"].items():
        assert lo <= m[k] <= hi, k
    assert rep["cis"]["precision"] == [1.0, 1.0]
    assert 0.0 < rep["cis"]["accuracy"][1] - rep["cis"]["accuracy"][0] < 0.06
    assert rep["counts"]["scored"] == 1305 and rep["counts"]["rows_outside_split"] == 0
    assert rep["counts"]["sols"] == len({s.path.name[:4] for s in test_split}) == 97
    for k, (lo, hi) in rep["cis_by_sol"].items():
        assert lo <= m[k] <= hi, k
    assert "95% CI by sol" in r.stdout and "97 sols" in r.stdout
    assert rep["data_fingerprint"] == data_fingerprint(msl_dir)
    assert rep["passed"] is True and rep["requirements"] == []
    assert rep["config"]["allow_missing"] is False
    # the errors by camera and MSL class: exactly the first WRONG Rover images of the split
    from collections import Counter

    wrong = Counter(
        (camera(s.path), s.msl_class) for s in [x for x in test_split if x.label][:WRONG]
    )
    groups = rep["by_camera_and_class"]
    assert {(g["camera"], g["msl_class"]): g["errors"] for g in groups if g["errors"]} == wrong
    assert sum(g["images"] for g in groups) == 1305
    # most errors first; ties by camera, then class
    order = [(-g["errors"], g["camera"], g["msl_class"]) for g in groups]
    assert order == sorted(order) and len(set(order)) == len(order)
    worst = groups[0]
    assert f"{worst['errors']} of {worst['images']} wrong" in r.stdout
    # and the wrong images themselves, to look at
    rover = [x for x in test_split if x.label][:WRONG]
    assert sorted(Path(w["path"]).name for w in rep["wrong"]) == sorted(s.path.name for s in rover)
    names = msl_class_names(msl_dir)
    for w, s in zip(sorted(rep["wrong"], key=lambda w: Path(w["path"]).name),
                    sorted(rover, key=lambda s: s.path.name)):  # fmt: skip
        assert w == {"path": w["path"], "label": "Rover", "decision": "Surface", "confidence": 0.9,
                     "camera": camera(s.path), "msl_class_name": names[s.msl_class]}  # fmt: skip
    assert f"the {WRONG} wrong images, the most confident first" in r.stdout

    # The same rows as JSONL, in a file whose name says nothing: sniffed, same numbers.
    j = _write(tmp_path / "full.txt", _full(test_split), fmt="jsonl")
    r = _score([str(j), "--data", str(msl_dir), "--out", str(tmp_path / "out-j")])
    assert r.exit_code == 0, r.output
    rep_j = _report(tmp_path / "out-j")
    assert (rep_j["metrics"], rep_j["cis"]) == (rep["metrics"], rep["cis"])
    assert rep_j["predictions"]["format"] == "jsonl"


def test_a_byte_order_mark_is_read_past(test_split: list[Any], tmp_path: Path) -> None:
    """A result file saved again by Excel ("CSV UTF-8") or Notepad starts with a UTF-8
    byte-order mark: the same rows as without it (it hid the path column, or the JSONL); so
    does a CSV with a blank last line (it was refused as a run cut short), and one with a field
    longer than the csv module's default limit (an error row's long path)."""
    from marsvision.benchmarks.predictions import read_predictions

    for fmt in ("csv", "jsonl"):
        plain = _write(tmp_path / f"plain.{fmt}", _full(test_split[:5]), fmt=fmt)
        marked = tmp_path / f"marked.{fmt}"
        marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
        a, b = read_predictions(plain), read_predictions(marked)
        assert (b.fmt, b.class_names, b.rows) == (a.fmt, a.class_names, a.rows) and len(a.rows) == 5
    blank = tmp_path / "blank.csv"  # an editor's newline after the last row
    blank.write_bytes((tmp_path / "plain.csv").read_bytes() + b"\n")
    assert read_predictions(blank).rows == read_predictions(tmp_path / "plain.csv").rows
    long = _write(tmp_path / "long.csv", [Prediction("x" * 200_000, "error", error="missing")])
    csv.field_size_limit(131072)  # the default, as a fresh process has it
    assert read_predictions(long).rows[0].path == "x" * 200_000


def test_no_room_for_the_report_is_one_line(
    test_split: list[Any], msl_dir: Path, tmp_path: Path
) -> None:
    """A write refused for want of room (here the file size limit, as `ulimit -f` sets it; a
    full disk is the same path) ended in a traceback after the table was printed."""
    import subprocess

    preds = _write(tmp_path / "p.csv", _full(test_split))
    out = tmp_path / "out"
    r = subprocess.run(
        [*SCORE, str(preds), "--data", str(msl_dir), "--out", str(out)],
        capture_output=True, text=True, preexec_fn=files_up_to(4096), timeout=300, check=False,
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: cannot write to {out} (File too large): make room, or pass another --out"
    )
    assert [p.name for p in out.iterdir()] == []  # atomic writes: no half file
    assert "accuracy" in r.stdout  # the table is still printed (the files are written first)


def test_a_stdout_that_fails_keeps_the_report_and_exits_as_cat_does(
    test_split: list[Any], msl_dir: Path, tmp_path: Path
) -> None:
    """The table was printed before the report was written: `mars-bench ... | true` exited 1
    with no word and no report (a parity run's ten minutes lost), and a full stdout ended in a
    traceback. The report is written first; a reader that left is exit 141, quietly, and a
    full stdout one line."""
    import subprocess

    preds = _write(tmp_path / "p.csv", _full(test_split))
    cmd = [*SCORE, str(preds), "--data", str(msl_dir)]
    r_end, w_end = os.pipe()
    os.close(r_end)  # the reader has left
    try:
        gone = subprocess.run([*cmd, "--out", str(tmp_path / "a")], stdout=w_end,
                              stderr=subprocess.PIPE, text=True, timeout=300)  # fmt: skip
    finally:
        os.close(w_end)
    assert gone.returncode == 141 and "Traceback" not in gone.stderr, gone.stderr
    assert _report(tmp_path / "a")["metrics"]["n"] == len(test_split)
    with open("/dev/full", "w") as full:
        r = subprocess.run([*cmd, "--out", str(tmp_path / "b")], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert (
        r.stderr.strip().splitlines()[-1]
        == "Error: cannot write to stdout (No space left on device)"
    )
    assert _report(tmp_path / "b")["metrics"]["n"] == len(test_split)


def test_predictions_from_stdin(test_split: list[Any], msl_dir: Path, tmp_path: Path) -> None:
    """`mars-infer ... --out - | mars-bench score -`: `-` was a file named "-"; /dev/stdin
    scored, but the report's sha256 came from a second read of the pipe: of nothing."""
    import hashlib
    import subprocess

    preds = _write(tmp_path / "p.csv", _full(test_split))
    cmd = SCORE
    for name in ("-", "/dev/stdin"):
        out = tmp_path / name.replace("/", "_")
        feed = subprocess.Popen(["cat", str(preds)], stdout=subprocess.PIPE)  # a pipe, as `|`
        r = subprocess.run([*cmd, name, "--data", str(msl_dir), "--out", str(out)],
                           stdin=feed.stdout, capture_output=True, text=True)  # fmt: skip
        assert feed.stdout is not None
        feed.stdout.close()
        feed.wait()
        assert r.returncode == 0, r.stderr
        report = _report(out)
        assert report["predictions"]["sha256"] == hashlib.sha256(preds.read_bytes()).hexdigest()
        assert report["predictions"]["path"] == ("<stdin>" if name == "-" else name)
        assert report["metrics"]["n"] == len(test_split)
    r = subprocess.run([*cmd, "-", "--data", str(msl_dir), "--out", str(tmp_path / "x")],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       preexec_fn=lambda: os.close(0))  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "Error: cannot read the predictions file <stdin> (stdin is closed)"]  # fmt: skip


def test_commands_are_interruptible(
    test_split: list[Any], msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mars-bench's commands ran without `interruptible`: Ctrl-C said "Aborted!" and exit 1 (an
    option error's code), and SIGTERM killed speed's runner at once, its measuring process left
    running. Now Ctrl-C is exit 130, and SIGTERM ends the command through its cleanups."""
    import signal

    from marsvision.benchmarks import score
    from marsvision.runtime.errors import EXIT_INTERRUPTED

    preds = _write(tmp_path / "p.csv", _full(test_split))
    handlers = []

    def stopped(cfg: Any) -> Any:
        handlers.append(signal.getsignal(signal.SIGTERM))
        raise KeyboardInterrupt

    monkeypatch.setattr(score, "run_score", stopped)
    result = _score([str(preds), "--data", str(msl_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == EXIT_INTERRUPTED, result.output
    assert "mars-bench: interrupted" in result.stderr and "Aborted" not in result.output
    assert handlers and handlers[0] not in (signal.SIG_DFL, signal.default_int_handler)
    assert signal.getsignal(signal.SIGTERM) is not handlers[0]  # put back after


def test_a_csv_cut_inside_its_last_row_is_refused(test_split: list[Any], tmp_path: Path) -> None:
    """A kill inside the last column (the tta value) left the column count whole: the cut value
    was scored, and named the model line and the report file ("tta no,none")."""
    from marsvision.benchmarks.predictions import read_predictions

    rows = _full(test_split[:3])
    rows[1] = dataclasses.replace(
        rows[1], path='say "hi"\nthere.JPG'
    )  # quotes and a newline in a path
    whole = _write(tmp_path / "whole.csv", rows)
    assert len(read_predictions(whole).rows) == 3
    data = whole.read_bytes()
    for cut in (data[:-3], data[:-1], data[: data.index(b"there.JPG")]):
        (tmp_path / "cut.csv").write_bytes(cut)
        with pytest.raises(MarsvisionError, match="last row does not end .*mars-infer --resume"):
            read_predictions(tmp_path / "cut.csv")


def test_require_pass_fail_and_exit_code(
    test_split: list[Any], msl_dir: Path, tmp_path: Path
) -> None:
    f = _write(tmp_path / "full.csv", _full(test_split))
    base = [str(f), "--data", str(msl_dir), "--out", str(tmp_path / "out")]
    # accuracy 0.9234, recall 0.8979, f1 0.9462
    r = _score([*base, "--require", "accuracy=0.92,f1=0.94"])
    assert r.exit_code == 0, r.output
    assert "PASS accuracy 0.9234 >= 0.92" in r.stdout and "PASS f1" in r.stdout
    r = _score([*base, "--require", "accuracy=0.92, recall=0.9"])
    assert r.exit_code == SCORE_FAIL_EXIT == PARITY_FAIL_EXIT == 3
    assert "PASS accuracy" in r.stdout and "FAIL recall 0.8979 < 0.9" in r.stdout
    rep = _report(tmp_path / "out")
    assert rep["passed"] is False
    assert [(c["metric"], c["passed"]) for c in rep["requirements"]] == [
        ("accuracy", True),
        ("recall", False),
    ]
    for bad in ("top5=0.9", "accuracy=98", "accuracy", "f1=high"):
        r = _score([*base, "--require", bad])
        assert r.exit_code == 2, (bad, r.output)
        assert "--require" in r.stderr and "Traceback" not in r.output


def test_a_requirement_met_exactly_passes() -> None:
    """F1 of exactly 0.9 (tp 27, fp 1, fn 5) computes as 0.8999999999999999: it failed
    `--require f1=0.9` ("FAIL f1 0.9000 < 0.9")."""
    m = classification_metrics([0, 0] + [1] * 32, [0, 1] + [0] * 5 + [1] * 27, 2, "binary")
    checks = check_requirements(m, {"f1": 0.9, "recall": 27 / 32 + 1e-9})
    assert [c["passed"] for c in checks] == [True, False]


def test_a_half_of_val_is_scored_on_its_own(msl_dir: Path, tmp_path: Path) -> None:
    """`--val-half held`: only the half a train+half-val model was selected on; the rows for the
    other half (in the same file, as mars-infer writes them for all of val) are ignored."""
    from marsvision.train.data import halve_by_sol

    val = read_split(msl_dir, "val", "binary")
    held = halve_by_sol(val)[1]
    held_names = {s.path.name for s in held}
    # right on the held half, every image wrong on the other: only the held half counts
    preds = [_pred(str(s.path), s.label if s.path.name in held_names else 1 - s.label)
             for s in val]  # fmt: skip
    f = _write(tmp_path / "val.csv", preds)
    base = [str(f), "--data", str(msl_dir), "--split", "val"]
    r = _score([*base, "--val-half", "held", "--out", str(tmp_path / "held")])
    assert r.exit_code == 0, r.output
    assert "val split, its second half by sol" in r.stdout
    assert "coverage: all 836 images of the half scored" in r.stdout
    assert "ignored: 804 rows for images outside the half" in r.stdout
    assert (tmp_path / "held" / f"score-val-held-{SHA[:12]}-onnxruntime.json").is_file()
    rep = _report(tmp_path / "held")
    assert (rep["split"], rep["val_half"], rep["part"]) == ("val", "held", "val-held")
    assert rep["metrics"]["n"] == 836 and rep["metrics"]["accuracy"] == 1.0
    assert rep["counts"]["sols"] == len({sol_key(s.path) for s in held}) == 51
    r = _score([*base, "--val-half", "trained", "--out", str(tmp_path / "trained")])
    rep = _report(tmp_path / "trained")
    assert r.exit_code == 0 and rep["metrics"]["n"] == 804 and rep["metrics"]["accuracy"] == 0.0
    r = _score([*base, "--out", str(tmp_path / "all")])  # all of val, as before
    rep = _report(tmp_path / "all")
    assert rep["metrics"]["n"] == 1640 and rep["part"] == "val" and rep["val_half"] is None
    assert rep["metrics"]["accuracy"] == pytest.approx(836 / 1640)
    # a half of test is not a thing: a usage error before anything is read
    r = _score([str(f), "--data", str(msl_dir), "--val-half", "held", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--val-half" in r.stderr and "needs --split val" in r.stderr


def test_a_half_of_val_as_a_limited_run_halved_it(msl_dir: Path, tmp_path: Path) -> None:
    """A train+half-val run of `--limit 100` trained on the first half by sol of its first 100
    val images: `--train-limit 100` scores the rest of val from sols it did not train on as its
    held-out half (halving all of val put 10 of the 46 images it trained on in the held half;
    the rest of val put 522 images of its trained sols there), and those 46 as its trained
    half."""
    from marsvision.train.data import halve_by_sol, sol_key

    val = read_split(msl_dir, "val", "binary")
    seen = {s.path for s in halve_by_sol(val[:100])[0]}
    sols = {sol_key(p) for p in seen}
    held = [s for s in val if sol_key(s.path) not in sols]
    assert len(held) == len(val) - len(seen) - 522
    # right on the images the run did not train on, wrong on those it did
    preds = [_pred(str(s.path), 1 - s.label if s.path in seen else s.label) for s in val]
    f = _write(tmp_path / "val.csv", preds)
    base = [str(f), "--data", str(msl_dir), "--split", "val"]
    r = _score([*base, "--val-half", "held", "--train-limit", "100", "--out", str(tmp_path / "h")])
    assert r.exit_code == 0, r.output
    assert "halved as a run of --limit 100 halved its val" in r.stdout
    rep = _report(tmp_path / "h")
    assert rep["metrics"]["n"] == len(held) and rep["metrics"]["accuracy"] == 1.0
    assert rep["train_limit"] == 100 and rep["config"]["train_limit"] == 100
    r = _score(
        [*base, "--val-half", "trained", "--train-limit", "100", "--out", str(tmp_path / "t")]
    )
    rep = _report(tmp_path / "t")
    assert rep["metrics"]["n"] == len(seen) and rep["metrics"]["accuracy"] == 0.0
    r = _score([*base, "--val-half", "held", "--out", str(tmp_path / "all")])  # all of val halved
    assert 0 < _report(tmp_path / "all")["metrics"]["accuracy"] < 1.0  # trained-on images in it
    r = _score([*base, "--train-limit", "100", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--train-limit" in r.stderr and "needs --val-half" in r.stderr
    for bad, error in (({"val_half": "second"}, "unknown half of val 'second'"),
                       ({"train_limit": 100}, "needs --val-half"),
                       ({"val_half": "held", "train_limit": 0}, "not 0")):  # fmt: skip
        with pytest.raises(MarsvisionError, match=error):  # the API's checks
            ScoreConfig(predictions=f, data_dir=msl_dir, split="val", **bad)


def test_msl25_file_is_scored_as_msl25(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = class_names("msl25", msl_dir)
    samples = read_split(msl_dir, "test", "msl25")
    preds = [_pred(str(s.path), s.label, names) for s in samples]
    preds[0] = _pred(str(samples[0].path), (samples[0].label + 1) % 25, names)
    f = _write(tmp_path / "m.jsonl", preds, names=names, fmt="jsonl")
    monkeypatch.setenv("MARS_DATA", str(msl_dir))  # --data defaults to $MARS_DATA
    r = _score([str(f), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    rep = _report(tmp_path / "out")
    assert rep["task"] == "msl25" and "f1 (macro)" in r.stdout
    y_true = [s.label for s in samples]
    y_pred = [(y_true[0] + 1) % 25, *y_true[1:]]
    assert rep["metrics"] == classification_metrics(y_true, y_pred, 25, "msl25")
    assert rep["metrics"]["accuracy"] == pytest.approx(1304 / 1305)
    # which classes fail, behind the macro averages: each class, in the JSON and the summary
    rows = per_class_metrics(y_true, y_pred, 25)
    assert rep["per_class"] == [{"class": c, "class_name": names[c], **row}
                                for c, row in enumerate(rows)]  # fmt: skip
    absent = [names[c] for c, row in enumerate(rows) if not row["images"] + row["decided"]]
    assert absent, "the test split lacks some classes"
    assert (f"per class: the macro averages are over the {25 - len(absent)} classes with an "
            f"image or a decision here ({len(absent)} have neither); -: undefined (0/0)"
            ) in r.stdout  # fmt: skip
    assert re.search(rf"\n{re.escape(absent[0])} +0 +0 +- +- +-\n", r.stdout), r.stdout
    w = rows[y_pred[0]]  # the class of the one wrong decision: decided once more than it has
    assert w["decided"] == w["images"] + 1
    line = rf"\n{re.escape(names[y_pred[0]])} +{w['images']} +{w['decided']} "
    assert re.search(line, r.stdout), r.stdout


def _cases(samples: list[Any], tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a broken result file, what its one-line error must say)."""
    full = _full(samples)
    out: dict[str, tuple[Path, str]] = {}
    names = [os.path.basename(p.path) for p in full]
    out["missing"] = (_write(tmp / "missing.csv", full[5:]), f"5 missing ({', '.join(names[:3])}")
    failed = [*full[:7], Prediction(full[7].path, "error", error="cannot read"), *full[8:]]
    out["failed"] = (_write(tmp / "failed.csv", failed), f"1 failed ({names[7]})")
    out["duplicated"] = (_write(tmp / "dup.csv", [*full, full[3]]), f"1 duplicated ({names[3]})")
    mixed = _write(tmp / "mixed.csv", full[:600])
    _write(mixed, full[600:], sha="cd" * 32, header=False)
    out["mixed"] = (mixed, f"mixes 2 models (model_sha256 {SHA[:12]}, {'cd' * 6})")
    three = [Prediction(p.path, "ok", p.label, (*(p.probs or ()), 0.0)) for p in full]
    out["3 classes"] = (
        _write(tmp / "three.csv", three, names=[*BINARY, "Other"]),
        "has classes [Surface, Rover, Other], which match neither binary [Surface, Rover]",
    )
    swapped = [Prediction(p.path, "ok", p.label, (p.probs or ())[::-1]) for p in full]
    out["order"] = (
        _write(tmp / "swapped.jsonl", swapped, names=BINARY[::-1], fmt="jsonl"),
        "has classes [Rover, Surface], which match neither",
    )
    cut = tmp / "cut.csv"
    text = _write(tmp / "whole.csv", full).read_text()
    cut.write_text(text[:-20])
    out["cut"] = (cut, "its last row does not end (a run cut short?")
    short = tmp / "short.csv"  # a whole row that lacks a column
    short.write_text(text.rsplit(",", 1)[0] + "\n")
    out["short row"] = (short, "line 1306 has")
    (tmp / "empty.csv").write_text("")
    out["empty"] = (tmp / "empty.csv", "is empty")
    whole = _write(tmp / "k.jsonl", full[:2], fmt="jsonl").read_text().splitlines()
    bad = json.loads(whole[1])
    bad["top_k"] = [["Rover"]]  # hand-edited: not a [label, probability] pair
    (tmp / "not-a-pair.jsonl").write_text(f"{whole[0]}\n{json.dumps(bad)}\n")
    out["top-k entry"] = (tmp / "not-a-pair.jsonl", "line 2 is not a mars-infer result row")
    bad = json.loads(whole[1])
    bad["label"] = ["Rover"]  # hand-edited JSON: a list where a class name goes (a traceback
    del bad["probs"]  # where no probs came first to fail on it)
    (tmp / "list-label.jsonl").write_text(f"{whole[0]}\n{json.dumps(bad)}\n")
    out["label a list"] = (tmp / "list-label.jsonl", "line 2 has label ['Rover'], not a class name")
    lines = text.splitlines()
    lines[3] = lines[3].replace(",0.900000,", ",0.9x,", 1)  # a hand-edited probability
    (tmp / "prob.csv").write_text("\n".join(lines) + "\n")
    out["probability"] = (tmp / "prob.csv", "line 4 gives its label")
    # rows of another split's images: it said "1305 missing (...)", and to rerun mars-infer
    others = [dataclasses.replace(p, path=f"/val/other{i}.JPG") for i, p in enumerate(full[:5])]
    out["other split"] = (_write(tmp / "others.csv", others),
                          "none of its 5 rows is of the 1305 images scored: a file of another "
                          "split, or of val's other half? score it with that --split (--val-half)"
                          )  # fmt: skip
    # files mars-infer did not write: their rows were blamed on a run cut short
    not_results = "is not a mars-infer result file: its first line is no"
    (tmp / "model.pt").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)  # a torch zip
    (tmp / "manifest.json").write_text(json.dumps({"artifacts": []}, indent=2) + "\n")
    (tmp / "other.jsonl").write_text('{"a": 1}\n')
    (tmp / "sheet.csv").write_text("name,value\nx,1\n")
    for name in ("model.pt", "manifest.json", "other.jsonl", "sheet.csv"):
        out[name] = (tmp / name, not_results)
    # refusals no case reached (a review's mutations of each passed the suite)
    header = text.split("\n", 1)[0] + "\n"  # what mars-infer leaves when killed in its first batch
    (tmp / "header.csv").write_text(header)
    out["header only"] = (tmp / "header.csv", "has a header but no rows: no predictions to score")
    odd = text.splitlines()
    odd[2] = (
        odd[2].replace(",ok,Surface,", ",ok,Ground,", 1).replace(",ok,Rover,", ",ok,Ground,", 1)
    )
    (tmp / "label.csv").write_text("\n".join(odd) + "\n")
    out["label"] = (tmp / "label.csv", "label 'Ground' is not one of its classes")
    rows = _write(tmp / "c.jsonl", full[:3], fmt="jsonl").read_text().splitlines()
    third = json.loads(rows[2])
    third["probs"] = {"Rover": third["probs"]["Rover"], "Surface": third["probs"]["Surface"]}
    (tmp / "classes.jsonl").write_text("\n".join([*rows[:2], json.dumps(third)]) + "\n")
    out["classes change"] = (
        tmp / "classes.jsonl",
        "line 3 has classes Rover, Surface, earlier lines Surface, Rover",
    )
    status = text.splitlines()
    status[1] = status[1].replace(",ok,", ",done,", 1)
    (tmp / "status.csv").write_text("\n".join(status) + "\n")
    out["status"] = (tmp / "status.csv", "line 2 has status 'done', not ok or error")
    nolabel = text.splitlines()
    nolabel[1] = nolabel[1].replace(",ok,Surface,", ",ok,,", 1).replace(",ok,Rover,", ",ok,,", 1)
    (tmp / "nolabel.csv").write_text("\n".join(nolabel) + "\n")
    out["no label"] = (tmp / "nolabel.csv", "line 2 has status ok but no label")
    out["no file"] = (tmp / "no-such.csv", "cannot read the predictions file")  # exit 1, not 2
    out["a folder"] = (tmp, "cannot read the predictions file")
    return out


def test_broken_files_are_one_line_errors(
    test_split: list[Any], msl_dir: Path, tmp_path: Path
) -> None:
    for case, (path, message) in _cases(test_split, tmp_path).items():
        r = _score([str(path), "--data", str(msl_dir), "--out", str(tmp_path / "out")])
        assert r.exit_code == 1, (case, r.output)
        assert message in _error_line(r), case
    assert not (tmp_path / "out").exists()


def test_allow_missing_reports_and_excludes(
    test_split: list[Any], msl_dir: Path, tmp_path: Path
) -> None:
    full = _full(test_split)
    failed = Prediction(full[1].path, "error", error="cannot read")
    rows = [failed, *full[2:], full[5]]  # 1 missing, 1 failed, 1 duplicated
    f = _write(tmp_path / "p.csv", rows)
    base = [str(f), "--data", str(msl_dir), "--out", str(tmp_path / "out")]
    r = _score(base)
    assert r.exit_code == 1
    assert "1 missing" in _error_line(r) and "1 failed" in _error_line(r)
    r = _score([*base, "--allow-missing"])
    assert r.exit_code == 0, r.output
    assert "COVERAGE: PARTIAL, 1302 of 1305 images scored (99.8%)" in r.stdout
    rep = _report(tmp_path / "out")
    names = [s.path.name for s in test_split]
    assert rep["excluded"] == {
        "missing": [names[0]],
        "failed": [names[1]],
        "duplicated": [names[5]],
    }
    keep = [i for i in range(1305) if i not in (0, 1, 5)]
    y_true = [test_split[i].label for i in keep]
    y_pred = [BINARY.index(full[i].label or "") for i in keep]
    assert rep["metrics"] == classification_metrics(y_true, y_pred, 2, "binary")
    assert rep["passed"]  # no requirement: nothing to fail
    # a requirement met on part of the split is not met: it passed, exit 0, with PASS printed
    r = _score([*base, "--allow-missing", "--require", "accuracy=0.5"])
    assert r.exit_code == SCORE_FAIL_EXIT, r.output
    assert "PASS accuracy" in r.stdout and (
        "score: FAIL (1 of 1 requirements met on 1302 of the 1305 images: a requirement holds "
        "for the whole split)") in r.stdout  # fmt: skip
    assert _report(tmp_path / "out")["passed"] is False
    # a partial score is a file of its own: scoring the whole split beside it replaces neither
    (partial,) = (tmp_path / "out").glob("score-*.json")
    digest = sha256_file(Path(base[0]))[:8]  # another part of it, from another file, is apart
    assert partial.name == f"score-test-abababababab-onnxruntime-partial-{digest}.json"
    whole = _write(tmp_path / "whole.csv", full)
    assert _score([str(whole), *base[1:]]).exit_code == 0
    assert partial.is_file() and len(list((tmp_path / "out").glob("score-*.json"))) == 2
    assert (tmp_path / "out" / partial.name.replace(f"-partial-{digest}", "")).is_file()


def test_tta_provenance_and_files_from_before_the_flag(
    test_split: list[Any], msl_dir: Path, tmp_path: Path
) -> None:
    """--tta flip rows say so in the report; a file without the tta column (written before
    mars-infer had --tta) scores as tta none, with the same numbers."""
    flip = _write(tmp_path / "flip.csv", _full(test_split), tta="flip")
    r = _score([str(flip), "--data", str(msl_dir), "--out", str(tmp_path / "out-flip")])
    assert r.exit_code == 0, r.output
    assert "onnxruntime, tta flip" in r.stdout
    rep_flip = _report(tmp_path / "out-flip")
    assert rep_flip["model"]["tta"] == "flip"

    full = _write(tmp_path / "full.csv", _full(test_split))
    table = list(csv.reader(full.open(newline="")))
    assert table[0][-1] == "tta"
    old = tmp_path / "old.csv"
    with old.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(row[:-1] for row in table)
    r = _score([str(old), "--data", str(msl_dir), "--out", str(tmp_path / "out-old")])
    assert r.exit_code == 0, r.output
    assert "tta" not in r.stdout.splitlines()[1]
    rep_old = _report(tmp_path / "out-old")
    assert rep_old["model"]["tta"] == "none"
    assert (rep_old["metrics"], rep_old["cis"]) == (rep_flip["metrics"], rep_flip["cis"])
    # the same model's plain and flip predictions scored into one folder: two files, not one
    # overwriting the other
    for scored in (flip, full):
        r = _score([str(scored), "--data", str(msl_dir), "--out", str(tmp_path / "both")])
        assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == [
        f"score-test-{SHA[:12]}-onnxruntime-tta-flip.json",
        f"score-test-{SHA[:12]}-onnxruntime.json",
    ]


def test_confidence_where_the_top_k_lacks_the_decision(
    test_split: list[Any], msl_dir: Path, tmp_path: Path
) -> None:
    """A binary model's decision threshold may pick the less probable class: a --top-k 1 row
    then lacks its label's probability, and the report has no confidence section (not a wrong
    one); the metrics stay."""
    full = _full(test_split)
    flipped = Prediction(full[0].path, "ok", "Rover", (0.7, 0.3))  # Rover at a threshold of 0.3
    path = _write(tmp_path / "k1.csv", [flipped, *full[1:]], top_k=1)
    r = _score([str(path), "--data", str(msl_dir), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    rep = _report(tmp_path / "out")
    assert rep["confidence"] is None and rep["metrics"]["n"] == len(full)
    assert (
        "calibration error" not in r.stdout and "confidence: not shown (a --top-k row" in r.stdout
    )
    path = _write(tmp_path / "all.csv", [flipped, *full[1:]])  # every probability: 0.3 of Rover
    r = _score([str(path), "--data", str(msl_dir), "--out", str(tmp_path / "out2")])
    assert _report(tmp_path / "out2")["confidence"]["keep"][0]["images"] == len(full) - 1
    # scored into one folder, the top-k file's score (no confidence) does not replace the full
    # file's, nor the other way round
    assert (
        _score([str(path), "--data", str(msl_dir), "--out", str(tmp_path / "out")]).exit_code == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"score-test-{SHA[:12]}-onnxruntime-top-k.json",
        f"score-test-{SHA[:12]}-onnxruntime.json",
    ]


def test_a_top_k_csv_gives_the_ranked_probability_whatever_the_class_names(
    tmp_path: Path,
) -> None:
    """Classes named like ranks ("1", "2") have prob_1, prob_2 columns in a full file; in a
    --top-k file those are the ranks' columns, and a row's probability was read from the
    class's name (0.2 for a label "2" given 0.7)."""
    from marsvision.benchmarks.predictions import read_predictions

    pred = Prediction("/x/a.JPG", "ok", "2", (0.2, 0.7, 0.1))
    ranked = _write(tmp_path / "k.csv", [pred], names=["1", "2", "3"], top_k=2)
    assert [r.confidence for r in read_predictions(ranked).rows] == [0.7]
    full = _write(tmp_path / "all.csv", [pred], names=["1", "2", "3"])
    assert [r.confidence for r in read_predictions(full).rows] == [0.7]


# ------------------------------------------------------------ a user's own labelled images

# Perseverance-style names (no MSL sol at the start): a labelled set that is no MSL split
PERSEVERANCE = [
    f"ZL0_{100 + i // 4:04d}_067{i:04d}_FDR_N0000000ZCAM0{i:04d}.png" for i in range(40)
]


def _own_set() -> tuple[list[int], list[int], list[Prediction]]:
    """Truth and decisions for PERSEVERANCE: every third image Rover, every fifth decision
    wrong; the rows' paths in another folder (matched by name) and two rows for other images."""
    y_true = [int(i % 3 == 0) for i in range(len(PERSEVERANCE))]
    y_pred = [1 - t if i % 5 == 0 else t for i, t in enumerate(y_true)]
    preds = [_pred(f"/mnt/sorted/{n}", p) for n, p in zip(PERSEVERANCE, y_pred)]
    preds += [_pred("/mnt/sorted/unlabelled-1.png", 0), _pred("/mnt/sorted/unlabelled-2.png", 1)]
    return y_true, y_pred, preds


def test_the_wrong_images_are_listed_most_confident_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The images to look at first: the confident errors (a scientist's check of a sort)."""
    monkeypatch.delenv("MARS_DATA", raising=False)
    names = PERSEVERANCE[:4]
    preds = [Prediction(n, "ok", "Rover", (1 - c, c)) for n, c in zip(names, (0.6, 0.95, 0.8))]
    f = _write(tmp_path / "preds.csv", [*preds, _pred(names[3], 0)])  # the last one right
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{n},Surface\n" for n in names))
    r = _score([str(f), "--labels", str(labels), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    wrong = _report(tmp_path / "out")["wrong"]
    assert [(w["path"], w["confidence"]) for w in wrong] == [
        (names[1], 0.95), (names[2], 0.8), (names[0], 0.6)]  # fmt: skip
    assert {(w["label"], w["decision"], w["class_name"]) for w in wrong} == {
        ("Surface", "Rover", "Surface")}  # fmt: skip
    assert "the 3 wrong images, the most confident first" in r.stdout


def test_a_metric_undefined_on_the_images_is_na_not_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A team's 20 Surface images, all called Surface: precision, recall and F1 of Rover are
    0/0. They were shown as 0.0000 [0.0000, 0.0000] and `--require f1=0.9` failed on a score of
    0; now n/a, and a requirement on one fails as undefined. An accuracy of all right has an
    interval of no width: the exact one is given beside it."""
    monkeypatch.delenv("MARS_DATA", raising=False)
    names = PERSEVERANCE[:20]
    f = _write(tmp_path / "preds.csv", [_pred(n, 0) for n in names])
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{n},Surface\n" for n in names))
    r = _score([str(f), "--labels", str(labels), "--require", "accuracy=0.95,f1=0.9",
                "--out", str(tmp_path / "out")])  # fmt: skip
    assert r.exit_code == SCORE_FAIL_EXIT, r.output
    rep = _report(tmp_path / "out")
    assert rep["metrics"]["accuracy"] == 1.0 and rep["undefined"] == ["precision", "recall", "f1"]
    for m in ("precision", "recall", "f1"):
        assert rep["metrics"][m] is None and rep["cis"][m] is None
        assert rep["cis_by_image"][m] is None
    assert "recall (Rover)     n/a     -                 -" in r.stdout
    assert "precision (no image decided Rover), recall (no Rover among them), f1 (neither)" in (
        r.stdout)  # fmt: skip
    assert "PASS accuracy 1.0000 >= 0.95" in r.stdout
    assert "FAIL f1 n/a (undefined on these images), not >= 0.9" in r.stdout
    assert "all 20 right, so every resample is too" in r.stdout
    assert "the exact 95% interval is [0.8316, 1]" in r.stdout  # Clopper-Pearson, 0.025 ** (1/20)
    # two Rover among them, both found: about one resample in ten has none, where recall is 0/0;
    # counted as 0 those made its interval [0, 1]
    f = _write(tmp_path / "preds2.csv", [_pred(n, int(i < 2)) for i, n in enumerate(names)])
    labels.write_text("path,label\n" + "".join(f"{n},{BINARY[int(i < 2)]}\n"
                                                for i, n in enumerate(names)))  # fmt: skip
    r = _score([str(f), "--labels", str(labels), "--out", str(tmp_path / "out2")])
    rep = _report(tmp_path / "out2")
    assert r.exit_code == 0 and rep["undefined"] == []
    assert rep["cis"]["recall"] == [1.0, 1.0] and rep["cis"]["f1"] == [1.0, 1.0]
    left = rep["left_out"]["recall"][0]
    assert 50 < left < 150 and rep["left_out"]["recall"] == rep["left_out"]["f1"]
    assert "left out of the intervals (undefined there), of 1000 resamples: precision" in r.stdout


def test_own_labels_as_a_csv_or_a_class_folder_score_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MARS_DATA", raising=False)  # a labelled set needs no MSL data
    y_true, y_pred, preds = _own_set()
    f = _write(tmp_path / "preds.csv", preds)
    # extra columns are ignored, a BOM is read past; in another order than the folder's
    csv_labels = tmp_path / "perseverance.csv"
    csv_labels.write_text(
        "\ufeffnote,Label,PATH\n"
        + "".join(reversed([f"x,{BINARY[t]},sol/{n}\n" for n, t in zip(PERSEVERANCE, y_true)]))
    )
    folder = tmp_path / "sorted"
    for n, t in zip(PERSEVERANCE, y_true):
        (folder / BINARY[t] / n[4:8]).mkdir(parents=True, exist_ok=True)  # images anywhere below
        (folder / BINARY[t] / n[4:8] / n).write_bytes(b"")
    (folder / "README.txt").write_text("sorted by hand\n")  # not an image: no class needed
    (folder / ".cache").mkdir()  # hidden: skipped
    want = classification_metrics(y_true, y_pred, 2, "binary")
    # no sol in these names: each image is its own group
    want_by_sol = bootstrap_cis(y_true, y_pred, 2, "binary", n_boot=1000, seed=0,
                                groups=PERSEVERANCE)  # fmt: skip
    reports = {}
    for labels, fmt in ((csv_labels, "csv"), (folder, "folder")):
        out = tmp_path / f"out-{fmt}"
        r = _score([str(f), "--labels", str(labels), "--out", str(out)])
        assert r.exit_code == 0, r.output
        rep = reports[fmt] = _report(out)
        assert rep["metrics"] == want and rep["metrics"]["n"] == 40
        assert rep["cis_by_image"] == want_by_sol and "cis_by_sol" not in rep
        assert rep["split"] is None and rep["data_fingerprint"] is None
        part = f"labels-{labels.stem}-{rep['labels']['sha256'][:8]}"
        assert rep["part"] == part
        assert (out / f"score-{part}-{SHA[:12]}-onnxruntime.json").is_file()
        assert rep["labels"] == {
            "path": str(labels),
            "format": fmt,
            "sha256": rep["labels"]["sha256"],
            "images": 40,
            "group_by": "image",
        }
        assert rep["counts"]["rows_outside_split"] == 2 and rep["counts"]["images"] == 40
        assert f"binary task, labels {labels} ({fmt}, 40 images)" in r.stdout
        assert "coverage: all 40 images of the labelled set scored" in r.stdout
        assert "ignored: 2 rows for images outside the labelled set" in r.stdout
        # no camera in these names: the errors are listed by class alone
        rover = sum(1 for t, p in zip(y_true, y_pred) if t and not p)
        assert f"most errors, by class:\n  Surface: 5 of 26 wrong\n  Rover: {rover} of 14" in (
            r.stdout
        )
    for key in ("metrics", "cis", "cis_by_image", "counts", "confidence", "by_camera_and_class"):
        assert reports["csv"][key] == reports["folder"][key], key
    assert {"camera": "?", "class": 1, "class_name": "Rover", "images": 14, "errors": rover} in (
        reports["csv"]["by_camera_and_class"]
    )
    # the labels' sha256 follows their content: one label changed, another sha
    csv_labels.write_text(csv_labels.read_text().replace(",Rover,", ",Surface,", 1))
    r = _score([str(f), "--labels", str(csv_labels), "--out", str(tmp_path / "out-2")])
    assert r.exit_code == 0, r.output
    changed = _report(tmp_path / "out-2")
    assert changed["labels"]["sha256"] != reports["csv"]["labels"]["sha256"]
    assert changed["metrics"]["accuracy"] != want["accuracy"]


def test_a_group_column_sets_the_grouped_interval(tmp_path: Path) -> None:
    y_true, y_pred, preds = _own_set()
    f = _write(tmp_path / "preds.csv", preds)
    groups = [f"site-{i // 8}" for i in range(len(PERSEVERANCE))]
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,group\n" + "".join(
        f"{n},{BINARY[t]},{g}\n" for n, t, g in zip(PERSEVERANCE, y_true, groups)
    ))  # fmt: skip
    r = _score([str(f), "--labels", str(labels), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    rep = _report(tmp_path / "out")
    assert rep["group_by"] == "group" and rep["counts"]["groups"] == 5
    assert "cis_by_sol" not in rep and "sols" not in rep["counts"]
    want = bootstrap_cis(y_true, y_pred, 2, "binary", n_boot=1000, seed=0, groups=groups)
    assert rep["cis_by_group"] == want != rep["cis"]
    assert "95% CI by group" in r.stdout and "5 groups" in r.stdout


def test_msl_names_in_a_labels_file_group_by_sol_and_list_cameras(
    test_split: list[Any], msl_dir: Path, tmp_path: Path
) -> None:
    """MSL test images given as a labels file score as the test split does, with --require,
    and their errors are listed by camera."""
    f = _write(tmp_path / "full.csv", _full(test_split))
    labels = tmp_path / "test-labels.csv"
    labels.write_text("path,label\n" + "".join(
        f"{s.path},{BINARY[s.label]}\n" for s in test_split
    ))  # fmt: skip
    args = ["--out", str(tmp_path / "out"), "--require", "accuracy=0.99"]
    r = _score([str(f), "--labels", str(labels), *args])
    assert r.exit_code == SCORE_FAIL_EXIT, r.output
    split = _score([str(f), "--data", str(msl_dir), *args[:1], str(tmp_path / "split"), *args[2:]])
    assert split.exit_code == SCORE_FAIL_EXIT, split.output
    own, official = _report(tmp_path / "out"), _report(tmp_path / "split")
    # the same but for the intervals over images: their resamples follow the images' order,
    # here the file names', there the split file's
    for key in ("metrics", "cis_by_sol", "counts", "confidence", "requirements"):
        assert own[key] == official[key], key
    assert own["cis"] != official["cis"]
    assert "MAHLI" in r.stdout.split("most errors, by camera and class:")[1]


def test_labels_errors_are_one_line(
    tmp_path: Path, msl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MARS_DATA", raising=False)
    y_true, _, preds = _own_set()
    f = _write(tmp_path / "preds.csv", preds)
    rows = [f"{n},{BINARY[t]}" for n, t in zip(PERSEVERANCE, y_true)]

    def labels_file(name: str, lines: list[str]) -> Path:
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        return tmp_path / name

    (tmp_path / "m.csv").write_bytes("path,label\r\n".encode("utf-16-le"))
    bad = tmp_path / "bad-folder"
    (bad / "Rover").mkdir(parents=True)
    (bad / "rover").mkdir()
    loose = tmp_path / "loose"
    (loose / "Surface").mkdir(parents=True)
    (loose / "frame.JPG").write_bytes(b"")
    twice = tmp_path / "twice"
    for cls in BINARY:
        (twice / cls).mkdir(parents=True)
        (twice / cls / PERSEVERANCE[0]).write_bytes(b"")
    (tmp_path / "empty-folder" / "Rover").mkdir(parents=True)
    cases = {
        "unknown label": (labels_file("a.csv", ["path,label", *rows[:3], "x.png,rover"]),
                          "a.csv:5: label 'rover' is not one of the model's classes [Surface, "
                          "Rover]"),
        "no label column": (labels_file("b.csv", ["path,class", *rows]),
                            "its first line names no label column"),
        "no header": (labels_file("c.csv", rows), "names no path or label column"),
        "no path": (labels_file("d.csv", ["path,label", ",Rover"]), "d.csv:2: no path"),
        # a mars-infer error row, or a row cut short: no label, rather than "label ''"
        "no label": (labels_file("k.csv", ["path,label", "", rows[0], "x.png"]),
                     "k.csv:4: no label"),
        "two label columns": (labels_file("l.csv", ["path,label,label", *rows]),
                              "its first line names the label column twice"),
        "header only": (labels_file("e.csv", ["path,label"]), "has a header but no rows"),
        "empty": (labels_file("f.csv", [""]), "is empty"),
        "twice": (labels_file("g.csv", ["path,label", *rows, f"other/{rows[2]}"]),
                  f"labels the same file name more than once ({PERSEVERANCE[2]})"),
        "blank group": (labels_file("h.csv", ["path,label,group", f"{rows[0]},a", f"{rows[1]},"]),
                        "h.csv:3: no group"),
        "no file": (tmp_path / "no-such.csv", "cannot read the labels file"),
        "utf-16 without its mark": (tmp_path / "m.csv", "is not a text file (it holds a NUL"),
        "not a class": (bad, "'rover' is not one of them"),
        "loose image": (loose, "lies in the labels folder itself"),
        "same name in two classes": (twice, "labels the same file name more than once"),
        "no images": (tmp_path / "empty-folder", "holds no images in subfolders named after"),
        "none matched": (labels_file("i.csv", ["path,label", "elsewhere.png,Rover"]),
                         "none of its 42 rows is of the 1 images scored: rows are matched by "
                         "file name"),
        "missing": (labels_file("j.csv", ["path,label", *rows, "not-run.png,Rover"]),
                    "do not cover the labelled set's 41 images once each with status ok: 1 "
                    "missing"),
    }  # fmt: skip
    for case, (labels, message) in cases.items():
        r = _score([str(f), "--labels", str(labels), "--out", str(tmp_path / "out")])
        assert r.exit_code == 1, (case, r.output)
        assert message in _error_line(r), case
    assert not (tmp_path / "out").exists()

    # a split option beside --labels is a usage error (it would be ignored)
    good = labels_file("good.csv", ["path,label", *rows])
    for extra in (["--split", "test"], ["--split", "val", "--val-half", "held"]):
        r = _score([str(f), "--labels", str(good), *extra, "--out", str(tmp_path / "out")])
        assert r.exit_code == 2 and "not with --split or --val-half" in r.stderr, extra

    # an msl25 --top-k file names only some classes: the data folder gives all 25
    names = class_names("msl25", msl_dir)
    top = _write(tmp_path / "top.csv", [_pred(PERSEVERANCE[0], 3, names)], names=names, top_k=2)
    msl = labels_file("msl.csv", ["path,label", f"{PERSEVERANCE[0]},{names[3]}"])
    r = _score([str(top), "--labels", str(msl), "--out", str(tmp_path / "m")])
    assert r.exit_code == 1 and "pass --data (the MSL data folder;" in _error_line(r)
    r = _score(
        [str(top), "--labels", str(msl), "--data", str(msl_dir), "--out", str(tmp_path / "m")]
    )
    assert r.exit_code == 0, r.output
    assert _report(tmp_path / "m")["task"] == "msl25"


def test_an_msl25_top_k_file_takes_its_classes_from_the_model_its_run_record_names(
    tiny_exports: Path, msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scoring one against your own labels needed the whole MSL data set, for the class names
    file alone: the model that wrote it has them (its run record names it), where it is still
    the rows' model."""
    import onnx
    from onnx import TensorProto, helper

    from marsvision.export.artifacts import onnx_meta, set_onnx_meta
    from marsvision.runtime.metadata import sha256_file
    from marsvision.runtime.models import artifact_name

    monkeypatch.delenv("MARS_DATA", raising=False)
    names = class_names("msl25", msl_dir)
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y"))
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])],
                                                "g", [x], [y]))  # fmt: skip
    meta = onnx_meta(tiny_exports / artifact_name("binary", "fp32"))
    set_onnx_meta(model, dataclasses.replace(meta, task="msl25", class_names=names))
    path = tmp_path / "msl25.onnx"
    onnx.save_model(model, str(path))
    sha = sha256_file(path)
    top = _write(tmp_path / "top.csv", [_pred(PERSEVERANCE[0], 3, names)], names=names, top_k=2,
                 sha=sha)  # fmt: skip
    labels = tmp_path / "msl.csv"
    labels.write_text(f"path,label\n{PERSEVERANCE[0]},{names[3]}\n")
    args = [str(top), "--labels", str(labels), "--out", str(tmp_path / "m")]
    (tmp_path / "top.csv.run.json").write_text(
        json.dumps({"engine": str(path), "model_sha256": sha})
    )
    r = _score(args)
    assert r.exit_code == 0, r.output
    rep = _report(tmp_path / "m")
    assert rep["task"] == "msl25" and rep["class_names"] == names
    path.write_bytes(path.read_bytes() + b" ")  # the model changed since: not the rows' model
    shutil.rmtree(tmp_path / "m")
    r = _score(args)
    assert r.exit_code == 1 and "or keep its run record (top.csv.run.json) and the model" in (
        _error_line(r))  # fmt: skip


def test_names_that_are_no_msl_products_have_no_sol_or_camera(tmp_path: Path) -> None:
    """A phone's names begin with 4 digits and `sample_001` has two letters after them: they
    made one "sol 2024" (an interval by sol of zero width) and camera "le"."""
    names = [f"20240501_{i:04d}.jpg" for i in range(20)] + [
        f"sample_{i:03d}.jpg" for i in range(20)
    ]
    y_true = [i % 2 for i in range(40)]
    y_pred = [1 - t if i % 7 == 0 else t for i, t in enumerate(y_true)]
    f = _write(tmp_path / "p.csv", [_pred(n, p) for n, p in zip(names, y_pred)])
    labels = tmp_path / "phone.csv"
    labels.write_text("path,label\n" + "".join(f"{n},{BINARY[t]}\n" for n, t in zip(names, y_true)))
    r = _score([str(f), "--labels", str(labels), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    rep = _report(tmp_path / "out")
    assert rep["counts"]["images"] == 40 and rep["group_by"] == "image"
    order = sorted(range(40), key=lambda i: names[i])
    want = bootstrap_cis([y_true[i] for i in order], [y_pred[i] for i in order], 2, "binary",
                         n_boot=1000, seed=0, groups=sorted(names))  # fmt: skip
    assert rep["cis_by_image"] == want
    # it said "95% CI by sol" and "40 sols"
    assert "95% CI by image" in r.stdout and "40 images" in r.stdout and " sol" not in (
        r.stdout.replace("no sol in these file names", ""))  # fmt: skip
    assert "no sol in these file names (none is an MSL product's)" in r.stdout
    assert {g["camera"] for g in rep["by_camera_and_class"]} == {"?"}
    assert "most errors, by class:" in r.stdout


def test_images_of_one_group_get_no_grouped_interval(tmp_path: Path) -> None:
    y_true, _, preds = _own_set()
    f = _write(tmp_path / "p.csv", preds)
    labels = tmp_path / "one.csv"
    labels.write_text("path,label,group\n" + "".join(
        f"{n},{BINARY[t]},site-1\n" for n, t in zip(PERSEVERANCE, y_true)
    ))  # fmt: skip
    r = _score([str(f), "--labels", str(labels), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    rep = _report(tmp_path / "out")
    assert rep["cis_by_group"] is None and rep["counts"]["groups"] == 1
    assert "no interval by group: the images scored are all of one group" in r.stdout
    assert "accuracy           0.8000  [" in r.stdout and "]  -\n" in r.stdout


def test_labels_files_as_windows_and_old_macs_write_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Excel's "Unicode text" (UTF-16 with its mark), Windows paths, CR line ends, and a
    stale $MARS_DATA, which a binary model's labels do not need."""
    monkeypatch.setenv("MARS_DATA", str(tmp_path / "moved-away"))
    y_true, y_pred, preds = _own_set()
    f = _write(tmp_path / "p.csv", preds)
    rows = [f"C:\\imgs\\{n},{BINARY[t]}" for n, t in zip(PERSEVERANCE, y_true)]
    (tmp_path / "utf16.csv").write_bytes("\r\n".join(["path,label", *rows]).encode("utf-16"))
    (tmp_path / "mac.csv").write_bytes("\r".join(["path,label", *rows, ""]).encode())
    want = classification_metrics(y_true, y_pred, 2, "binary")
    for name in ("utf16.csv", "mac.csv"):
        r = _score([str(f), "--labels", str(tmp_path / name), "--out", str(tmp_path / name[:3])])
        assert r.exit_code == 0, (name, r.output)
        assert _report(tmp_path / name[:3])["metrics"] == want, name
    # a mars-infer CSV written on Windows, scored against a corrected copy of itself
    win = _write(tmp_path / "win.csv", [dataclasses.replace(p, path=f"C:\\imgs\\{p.path[12:]}")
                                        for p in preds])  # fmt: skip
    r = _score([str(win), "--labels", str(tmp_path / "utf16.csv"), "--out", str(tmp_path / "w")])
    assert r.exit_code == 0, r.output
    assert _report(tmp_path / "w")["metrics"] == want
    # two labelled sets of one name are two report files
    (tmp_path / "team-b").mkdir()
    (tmp_path / "team-b" / "mac.csv").write_text("path,label\n" + rows[0].replace("\\", "/") + "\n")
    r = _score([str(f), "--labels", str(tmp_path / "team-b" / "mac.csv"), "--out",
                str(tmp_path / "mac"), "--allow-missing"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "mac").glob("score-labels-mac-*.json"))) == 2


def test_a_top_k_file_naming_a_label_outside_the_classes_is_refused() -> None:
    """A --top-k file whose labels are not all of the binary task's classes is no binary file:
    refused, not taken as binary because it shares two names (a mutation audit)."""
    from marsvision.benchmarks.predictions import PredictionRow, Predictions, resolve_task

    rows = [PredictionRow(2, "a.jpg", "ok", "Rover", "s", "fp32", "cpu")]
    labels = frozenset({"Surface", "Rover", "bogus"})
    with pytest.raises(MarsvisionError, match=r"bogus\], which are not binary's \[Surface, Rov"):
        resolve_task(Predictions(Path("p.csv"), "csv", None, 2, labels, rows), data_dir=None)


def test_a_run_record_naming_a_device_or_a_fifo_is_not_read(tmp_path: Path) -> None:
    """The model a results file's run record names is hashed only where it is a regular file:
    an edited record naming /dev/zero (or a FIFO no one writes) kept `mars-bench score` reading
    it, one CPU at 100%, until killed."""
    import os
    import threading

    from marsvision.benchmarks.predictions import recorded_model_classes
    from marsvision.runtime.resume import write_record

    out = tmp_path / "r.csv"
    out.write_text("path,status\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for engine in ("/dev/zero", str(fifo)):
        write_record(str(out), {"engine": engine, "model_sha256": SHA})
        got: list[object] = []
        reader = threading.Thread(target=lambda: got.append(recorded_model_classes(out, SHA)),
                                  daemon=True)  # fmt: skip
        reader.start()
        reader.join(timeout=20)
        assert not reader.is_alive(), f"still reading {engine}"
        assert got == [None]
