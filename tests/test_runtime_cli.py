"""mars-infer end to end: real MSL images, malformed files, kill and --resume, exit codes."""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import confident_agreement

from marsvision.runtime import cli as infer_cli
from marsvision.runtime.classifier import Classifier
from marsvision.train.checkpoint import load_checkpoint

MARS_INFER = [sys.executable, "-m", "marsvision.runtime.cli"]


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, Path]:
    return {"fp32": tiny_models["fp32"], "int8": tiny_models["int8-cpu"]}


def _images(msl_dir: Path, n: int, split: str = "test") -> list[Path]:
    from marsvision.train.data import read_split

    return [s.path for s in read_split(msl_dir, split, "binary", limit=n)]


def _infer(
    *args: str | os.PathLike[str], cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*MARS_INFER, *(os.fspath(a) for a in args)], capture_output=True, cwd=cwd
    )


def _csv_rows(path: Path) -> list[dict[str, str]]:
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def test_classifier_matches_torch_top1(
    models: dict[str, Path], tiny_checkpoint: Path, msl_dir: Path
) -> None:
    import torch
    from PIL import Image

    from marsvision.train.checkpoint import model_from_checkpoint, preprocess_from_checkpoint
    from marsvision.train.transforms import eval_transform

    ckpt = load_checkpoint(tiny_checkpoint)
    tf = eval_transform(preprocess_from_checkpoint(ckpt))
    paths = _images(msl_dir, 20)
    with torch.no_grad():
        ref = torch.softmax(
            model_from_checkpoint(ckpt)(
                torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
            ),
            1,
        ).numpy()
    with Classifier(models["fp32"], device="cpu", batch_size=6, workers=2) as clf:
        preds = clf.predict(paths)
    assert [p.path for p in preds] == [str(p) for p in paths]
    assert all(p.ok for p in preds)
    got = np.array([p.probs for p in preds])
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert [p.label for p in preds] == [ckpt["class_names"][i] for i in ref.argmax(1)]
    with Classifier(models["int8"], device="cpu", batch_size=4) as clf:
        q = clf.predict(paths)
    assert clf.meta.precision == "int8"
    assert [p.path for p in q] == [p.path for p in preds]
    assert confident_agreement(np.array([p.probs for p in q]), got) >= 0.9


def test_flip_tta_matches_torch_on_image_and_mirror(
    models: dict[str, Path], tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path
) -> None:
    """--tta flip: the mean of the softmax of each image and of its left-right mirror, as
    PyTorch computes it on the same preprocessed tensors; the CLI marks its rows."""
    import torch
    from PIL import Image

    from marsvision.train.checkpoint import model_from_checkpoint, preprocess_from_checkpoint
    from marsvision.train.transforms import eval_transform

    ckpt = load_checkpoint(tiny_checkpoint)
    tf = eval_transform(preprocess_from_checkpoint(ckpt))
    paths = _images(msl_dir, 12)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    model = model_from_checkpoint(ckpt)
    with torch.no_grad():
        plain = torch.softmax(model(x), 1).numpy()
        ref = 0.5 * (plain + torch.softmax(model(x.flip(-1)), 1).numpy())
    assert np.abs(ref - plain).max() > 1e-3  # the mirror changes the answer: the test can fail
    with Classifier(models["fp32"], device="cpu", batch_size=5, workers=2, tta="flip") as clf:
        got = np.array([p.probs for p in clf.predict(paths)])
    np.testing.assert_allclose(got, ref, atol=1e-4)
    with pytest.raises(ValueError, match="tta"):
        Classifier(models["fp32"], tta="vflip")

    out = tmp_path / "flip.csv"
    r = _infer(*paths[:3], "--engine", models["fp32"], "--out", out, "--tta", "flip")
    assert r.returncode == 0, r.stderr
    assert b"tta flip" in r.stderr
    rows = _csv_rows(out)
    assert [row["tta"] for row in rows] == ["flip"] * 3
    np.testing.assert_allclose([float(row["prob_Rover"]) for row in rows], ref[:3, 1], atol=1e-5)
    r = _infer(paths[0], "--engine", models["fp32"], "--tta", "rotate")
    assert r.returncode == 2 and b"--tta" in r.stderr


def test_cli_real_images_csv_and_jsonl(
    models: dict[str, Path], msl_dir: Path, tmp_path: Path
) -> None:
    paths = _images(msl_dir, 11)
    out = tmp_path / "r.csv"
    r = _infer(*paths, "--engine", models["int8"], "--out", out, "-b", "4")
    assert r.returncode == 0, r.stderr
    assert b"11 ok, 0 failed" in r.stderr
    rows = _csv_rows(out)
    assert [row["path"] for row in rows] == [str(p) for p in paths]
    for row in rows:
        assert row["status"] == "ok" and row["label"] in ("Surface", "Rover")
        p = float(row["prob_Surface"]) + float(row["prob_Rover"])
        assert abs(p - 1) < 1e-5
        assert row["precision"] == "int8" and row["backend"] == "onnxruntime-cpu"
        assert row["tta"] == "none"
        assert len(row["model_sha256"]) == 64
    # JSONL with --top-k on stdout, from a folder listing via @list
    lst = tmp_path / "list.txt"
    lst.write_text("# inputs\n" + "\n".join(map(str, paths[:3])) + "\n\n")
    r = _infer(f"@{lst}", "--engine", models["int8"], "--format", "jsonl", "--top-k", "1")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [d["path"] for d in lines] == [str(p) for p in paths[:3]]
    assert all(len(d["top_k"]) == 1 and d["top_k"][0][0] == d["label"] for d in lines)
    # what a row lacks is null in JSON, either way: an ok row's error (it was "", where an
    # error row's label and probabilities were null: `isna` told them apart by format)
    r = _infer(paths[0], tmp_path / "none.JPG", "--engine", models["int8"], "--format", "jsonl")
    ok, bad = (json.loads(x) for x in r.stdout.decode().splitlines())
    assert (ok["status"], ok["error"]) == ("ok", None) and ok["label"] and ok["probs"]
    assert (bad["status"], bad["label"], bad["probs"]) == ("error", None, None) and bad["error"]


def test_malformed_corpus_one_row_each(
    models: dict[str, Path], msl_dir: Path, tmp_path: Path
) -> None:
    from PIL import Image

    good = _images(msl_dir, 3)
    d = tmp_path / "in"
    d.mkdir()
    src = Image.open(good[0]).convert("RGB")
    raw = good[0].read_bytes()
    (d / "a_good.JPG").write_bytes(raw)
    (d / "b_empty.jpg").write_bytes(b"")
    (d / "c_truncated.jpg").write_bytes(raw[: len(raw) // 4])
    (d / "d_text.png").write_text("hello")
    (d / "e_corrupt.jpg").write_bytes(raw[:200] + bytes(range(256)) * 20)
    (d / "f_broken.jpg").symlink_to(d / "nowhere.jpg")
    src.convert("L").save(d / "g_gray.png")
    src.convert("CMYK").save(d / "h_cmyk.jpg")
    src.convert("RGBA").save(d / "i_rgba.png")
    src.convert("P").save(d / "j_palette.gif")
    Image.fromarray(np.asarray(src.convert("L"), dtype=np.uint16) * 257).save(d / "k_16bit.png")
    Image.new("L", (12000, 9000)).save(d / "l_huge.png")
    weird = os.fsencode(d) + b"/m_caf\xe9.jpg"  # not valid UTF-8
    with open(weird, "wb") as f:
        f.write(raw)
    (d / "notes.txt").write_text("not an image suffix: not listed from a folder")
    before = sorted(os.listdir(d))
    out = tmp_path / "r.csv"
    r = _infer(d, "--engine", models["int8"], "--out", out, "-b", "4")
    assert r.returncode == 3, r.stderr
    assert b"Traceback" not in r.stderr
    rows = {os.path.basename(row["path"]): row for row in _csv_rows(out)}
    expected_ok = {
        "a_good.JPG",
        "g_gray.png",
        "h_cmyk.jpg",
        "i_rgba.png",
        "j_palette.gif",
        "k_16bit.png",
        "m_caf\udce9.jpg",
    }
    expected_err = {
        "b_empty.jpg",
        "c_truncated.jpg",
        "d_text.png",
        "e_corrupt.jpg",
        "f_broken.jpg",
        "l_huge.png",
    }
    assert set(rows) == expected_ok | expected_err
    for name in expected_ok:
        assert rows[name]["status"] == "ok", (name, rows[name]["error"])
    for name in expected_err:
        assert rows[name]["status"] == "error" and rows[name]["error"], name
    assert "decompression-bomb" in rows["l_huge.png"]["error"]
    assert b"DecompressionBombWarning" not in r.stderr  # Pillow's own, on top of the error row
    # the non-UTF-8 name is written losslessly: its bytes are in the file
    assert weird in out.read_bytes()
    assert sorted(os.listdir(d)) == before  # nothing written next to the inputs
    assert b"7 ok, 6 failed; 7 images in " in r.stderr  # the rate counts classified images


def test_an_unreadable_file_leaves_its_batchs_good_images_as_they_were(
    models: dict[str, Path], msl_dir: Path, tmp_path: Path
) -> None:
    """The good images of a batch that holds an unreadable file are run on their own rows: the
    same probabilities as without it, wherever it stands (the status column alone, which the
    corpus test checks, would not show a row shifted onto its neighbour's image)."""
    good = [str(p) for p in _images(msl_dir, 3)]
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    with Classifier(models["int8"], batch_size=4) as clf:
        alone = {p.path: p.probs for p in clf.predict(good)}
        assert len(set(alone.values())) == 3  # three distinct images
        for at in range(4):
            mixed = clf.predict([*good[:at], str(bad), *good[at:]])
            assert [p.ok for p in mixed] == [i != at for i in range(4)]
            for p in mixed:
                if p.ok:
                    np.testing.assert_array_equal(p.probs, alone[p.path])


def test_kill_then_resume_loses_and_duplicates_nothing(
    models: dict[str, Path], msl_dir: Path, tmp_path: Path
) -> None:
    paths = [str(p) for p in _images(msl_dir, 400, split="train")]
    lst = tmp_path / "all.txt"
    lst.write_text("\n".join(paths) + "\n")
    out = tmp_path / "r.jsonl"
    cmd = [
        *MARS_INFER,
        f"@{lst}",
        "--engine",
        str(models["int8"]),
        "--out",
        str(out),
        "-b",
        "1",
        "-j",
        "1",
        "--threads",
        "1",
    ]

    def start_then(sig: signal.Signals, rows: int) -> subprocess.Popen[bytes]:
        # a row of this run's own, too: the last run's stop may have written `rows` already,
        # and a signal then met this one before its handlers (SIGHUP's default: exit -1)
        had = out.read_bytes().count(b"\n") if out.exists() else 0
        proc = subprocess.Popen(
            [*cmd, "--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= max(rows, had + 1):
                break
            time.sleep(0.01)
        else:  # the signal would have met a run in another state: the asserts below misled
            proc.kill()
            pytest.fail(f"no {rows} rows in {out} after 120 s: {proc.communicate()[1]!r}")
        proc.send_signal(sig)
        return proc

    # Ctrl-C: exit 130 and one line that says how to go on
    proc = start_then(signal.SIGINT, 10)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    assert not err.startswith(b"\n") and b"\n\n" not in err  # no blank line in a log
    assert err.decode().strip().splitlines()[-1] == (
        f"mars-infer: interrupted; the rows written so far are in {out}: --resume continues"
    )
    # SIGTERM (a scheduler, `timeout`) and SIGHUP (the terminal closed): the same, with their
    # exit codes (they killed it before its cleanups, silently: a run record's .tmp stayed)
    for sig, code, rows in ((signal.SIGTERM, 143, 14), (signal.SIGHUP, 129, 18)):
        proc = start_then(sig, rows)
        _, err = proc.communicate()
        assert proc.returncode == code, err
        assert err.decode().strip().splitlines()[-1] == (
            f"mars-infer: stopped by {sig.name}; the rows written so far are in {out}: --resume "
            "continues"
        )
        assert not list(tmp_path.glob(".*.tmp"))
    proc = start_then(signal.SIGKILL, 20)
    assert proc.wait() == -signal.SIGKILL
    n_before = out.read_bytes().count(b"\n")
    assert 20 <= n_before < len(paths)
    with open(out, "ab") as f:  # as if the kill had cut a row in half
        f.write(b'{"path": "/half/a/row", "sta')
    r = subprocess.run([*cmd, "--resume", "-b", "16", "-j", "2"], capture_output=True)
    assert r.returncode == 0, r.stderr
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [d["path"] for d in written] == paths  # input order, each once, the cut row dropped
    assert all(d["status"] == "ok" for d in written)
    assert b"already in" in r.stderr
    # resuming a finished file writes nothing
    r = subprocess.run([*cmd, "--resume"], capture_output=True)
    assert r.returncode == 0 and out.read_text().count("\n") == len(paths)
    # another --tta, or another model file, would mix two models in one file: refused
    for other in (["--tta", "flip"], ["--engine", str(models["fp32"])]):
        r = subprocess.run([*cmd, "--resume", *other], capture_output=True)
        assert r.returncode == 1, (other, r.stderr)
        assert b"resume with the same model, backend (--backend, --device) and --tta" in r.stderr
    assert out.read_text().count("\n") == len(paths)


def test_a_stop_ends_a_run_that_waits_for_a_fifo(
    models: dict[str, Path], msl_dir: Path, tmp_path: Path
) -> None:
    """A FIFO named like an image in a folder, its writer holding it open and sending nothing:
    the run waited for it, and SIGTERM (a scheduler's stop of a nightly job) too, until the
    writer closed it (for ever). Now the stop ends the run at once, without a row for the FIFO
    (--resume reads it again)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(_images(msl_dir, 1)[0].read_bytes())
    fifo = folder / "b.jpg"
    os.mkfifo(fifo)
    out = tmp_path / "r.csv"
    cmd = [*MARS_INFER, str(folder), "--engine", str(models["int8"]), "--out", str(out), "-b", "1"]
    writer = os.open(fifo, os.O_RDWR)  # held open, nothing sent (O_RDWR: no wait for a reader)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        time.sleep(0.5)  # into the FIFO's read
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        os.close(writer)
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, err
    assert err.decode().strip().splitlines()[-1].startswith("mars-infer: stopped by SIGTERM; ")
    assert [row[0] for row in csv.reader(out.open())] == ["path", str(folder / "a.jpg")]


def test_cli_errors_and_exit_codes(models: dict[str, Path], msl_dir: Path, tmp_path: Path) -> None:
    img = _images(msl_dir, 1)[0]
    cases: list[tuple[list[str | Path], int, bytes]] = [
        (["--engine", tmp_path / "missing.onnx"], 1, b"not found"),
        (["--engine", models["int8"], "--batch-size", "0"], 2, b"batch-size"),
        (["--engine", models["int8"], "--backend", "tflite"], 2, b"backend"),
        (["--engine", models["int8"], "--resume"], 2, b"--resume needs --out"),
        (["--engine", models["int8"], "--device", "cuda"], 1, b"CUDA"),
        # not --device cpu, which TensorRT refuses in turn
        (["--engine", models["int8"], "--backend", "tensorrt"], 1, b"or use --backend onnxruntime"),
    ]
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    cases.append((["--engine", bad], 1, b"re-export"))
    folder = tmp_path / "exports"  # an export folder given as the model: its models named
    folder.mkdir()
    (folder / "m.int8-cpu.onnx").write_bytes(b"x")
    cases.append((["--engine", folder], 1, b"is a folder: give one .onnx file or TensorRT .plan "
                  b"(in it: m.int8-cpu.onnx)"))  # fmt: skip
    import zipfile

    ckpt = tmp_path / "run.ckpt"  # a checkpoint by its bytes (a torch.save zip), any name
    with zipfile.ZipFile(ckpt, "w") as z:
        z.writestr("run/data.pkl", b"\x80\x02}q\x00.")
    cases.append((["--engine", ckpt], 1, b"is a PyTorch checkpoint, not an exported model: export"))
    cut = tmp_path / "cut.pt"  # a truncated (or old-format) .pt is no zip: named by its suffix
    cut.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    cases.append((["--engine", cut], 1, b"is a PyTorch checkpoint, not an exported model: export"))
    other_zip = tmp_path / "images.zip"  # any other zip is no checkpoint
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("msl-images/a.JPG", b"x")
    cases.append((["--engine", other_zip], 1, b"onnxruntime cannot load this model"))
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine bytes")
    cases.append((["--engine", plan, "--backend", "onnxruntime"], 1, b"TensorRT engine"))
    cases.append((["--engine", plan], 1, b"sidecar"))
    exists = tmp_path / "exists.csv"
    exists.write_text("x\n")
    cases.append((["--engine", models["int8"], "--out", exists], 1, b"--resume"))
    # a folder as --out: click's usage error (exit 2) before
    cases.append((["--engine", models["int8"], "--out", tmp_path], 1,
                  f"--out {tmp_path} is a folder: give a file name, e.g. ".encode()))  # fmt: skip
    for args, code, msg in cases:
        r = _infer(img, *args)
        assert r.returncode == code, (args, r.stderr)
        assert msg in r.stderr, (args, r.stderr)
        assert b"Traceback" not in r.stderr, args
    r = _infer("--help")
    assert r.returncode == 0 and b"Exit codes" in r.stdout
    r = _infer(tmp_path / "no-such.jpg", "--engine", models["int8"])
    assert r.returncode == 3 and b",error," in r.stdout
    # stdout's reader gone (`| head`): quiet, and not exit 1, which says the model failed
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "wb") as closed:
        p = subprocess.run([*MARS_INFER, img, "--engine", models["int8"]], stdout=closed,
                           stderr=subprocess.PIPE)  # fmt: skip
    assert p.returncode == 141 and p.stderr.count(b"\n") <= 1, p.stderr


def test_default_model_is_the_best_export_here(
    models: dict[str, Path], msl_dir: Path, tmp_path: Path
) -> None:
    """No --engine: the shipped binary model's export in $MARS_EXPORTS (else ./exports); on this
    CPU machine the INT8 file when it is there, else FP32; none is one line and exit 1."""
    from marsvision.runtime.models import artifact_name

    img = _images(msl_dir, 1)[0]
    exports = tmp_path / "exports"
    exports.mkdir()
    env = {**os.environ, "MARS_EXPORTS": str(exports)}
    r = subprocess.run([*MARS_INFER, str(img)], capture_output=True, env=env)
    assert r.returncode == 1 and b"no --engine given" in r.stderr and b"mars-export" in r.stderr
    # the command it suggests names the data (without $MARS_DATA, it stopped: no MSL data given)
    assert f"`mars-export --int8 --data DIR --out {exports}`".encode() in r.stderr
    assert b"Traceback" not in r.stderr
    for flavour, precision in (("fp32", b"fp32"), ("int8-cpu", b"int8")):
        os.symlink(models["int8" if flavour == "int8-cpu" else flavour],
                   exports / artifact_name("binary", flavour))  # fmt: skip
        r = subprocess.run([*MARS_INFER, str(img)], capture_output=True, env=env)
        assert r.returncode == 0, r.stderr
        assert f"model {exports / artifact_name('binary', flavour)}".encode() in r.stderr
        row = next(csv.DictReader(io.StringIO(r.stdout.decode())))
        assert row["status"] == "ok" and row["precision"].encode() == precision


def test_default_model_passes_over_fp16_where_cuda_does_not_run(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime-gpu without a GPU (or without its CUDA libraries) lists the CUDA provider
    but runs on the CPU, where the FP16 export is several times slower than the INT8 one: the
    default is then the INT8 export, on the CPU, with a note; --device cpu never takes FP16."""
    from marsvision.runtime import models as m
    from marsvision.runtime.errors import MarsvisionError

    names = {f: m.artifact_name("binary", f) for f in ("fp16", "int8-cpu", "fp32")}
    for flavour, name in names.items():
        os.symlink(tiny_models[flavour], tmp_path / name)
    monkeypatch.setattr(m, "_has_cuda_onnxruntime", lambda: True)  # as onnxruntime-gpu says
    chosen = m.default_model(tmp_path)  # the CPU onnxruntime here cannot start CUDA
    assert (chosen.path, chosen.device) == (tmp_path / names["int8-cpu"], "cpu")
    assert chosen.note is not None and chosen.note.startswith(f"passed over {names['fp16']}")
    assert "CUDA" in chosen.note
    assert m.default_model(tmp_path, device="cpu") == (tmp_path / names["int8-cpu"], "cpu", None)
    monkeypatch.setattr(m, "_cuda_refusal", lambda path: None)  # where CUDA runs it
    assert m.default_model(tmp_path) == (tmp_path / names["fp16"], "auto", None)
    # a file mars-export left out of manifest.json (replaced by hand, or from an export before)
    # is passed over, with a note: it had been picked by its name alone
    listed = [{"file": names["fp16"]}, {"file": names["fp32"]}]
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts": listed}))
    chosen = m.default_model(tmp_path, device="cpu")
    assert (chosen.path, chosen.device) == (tmp_path / names["fp32"], "cpu")
    assert chosen.note == (
        f"passed over {names['int8-cpu']}: manifest.json does not list it (mars-export left it "
        "out: replaced by hand, or made before the last export)"
    )
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts": []}))
    none = f"no exported binary model .*passed over {names['fp32']}: manifest.json does not"
    with pytest.raises(MarsvisionError, match=none):
        m.default_model(tmp_path, device="cpu")  # the notes say why none was taken
    # one it lists with other bytes (a flipped bit loads and runs) is passed over too; the
    # sha256 the manifest gives is checked, where it gives one
    listed = [{"file": names["int8-cpu"], "sha256": "0" * 64},
              {"file": names["fp32"], "sha256": m.sha256_file(tiny_models["fp32"])}]  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts": listed}))
    chosen = m.default_model(tmp_path, device="cpu")
    assert (chosen.path, chosen.device) == (tmp_path / names["fp32"], "cpu")
    assert chosen.note == (
        f"passed over {names['int8-cpu']}: its sha256 is not the one manifest.json gives "
        "(changed since mars-export wrote it: damaged in a copy or where it is stored, or "
        "replaced by hand)"
    )
    listed[0]["sha256"] = m.sha256_file(tiny_models["int8-cpu"])
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts": listed}))
    assert m.default_model(tmp_path, device="cpu") == (tmp_path / names["int8-cpu"], "cpu", None)
    hashed = m.sha256_file

    def unreadable(path: Any) -> str:  # a read error of a damaged medium: not a traceback
        if Path(path).name == names["int8-cpu"]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return hashed(path)

    monkeypatch.setattr(m, "sha256_file", unreadable)
    chosen = m.default_model(tmp_path, device="cpu")
    assert (chosen.path, chosen.note) == (
        tmp_path / names["fp32"],
        f"passed over {names['int8-cpu']}: cannot read {tmp_path / names['int8-cpu']} "
        "(Input/output error)",
    )


def test_no_default_model_beside_another_tasks_export_names_that_one(tmp_path: Path) -> None:
    """An msl25 model exported to the default folder: no binary model there, and the message
    names the msl25 export to pass as --engine and another folder to export the shipped model
    to (it said to export into this folder, which mars-export refuses: another model's)."""
    from marsvision.runtime import models as m
    from marsvision.runtime.errors import MarsvisionError

    for flavour in ("fp32", "int8-cpu"):
        (tmp_path / m.artifact_name("msl25", flavour)).write_bytes(b"onnx")
    best = tmp_path / m.artifact_name("msl25", "int8-cpu")
    with pytest.raises(MarsvisionError) as e:
        m.default_model(tmp_path, device="cpu")
    said = e.value.message
    assert said.startswith(f"no --engine given and no exported binary model in {tmp_path}/")
    assert f"pass `--engine {best}` to run that one" in said
    assert f"--out {tmp_path}-binary`" in said and f"--out {tmp_path}`" not in said
    (tmp_path / m.artifact_name("msl25", "int8-cpu")).unlink()
    (tmp_path / m.artifact_name("msl25", "fp32")).unlink()
    with pytest.raises(MarsvisionError, match=f"--out {tmp_path}` first"):
        m.default_model(tmp_path, device="cpu")  # an empty folder: export into it


def test_non_finite_model_output_is_an_error_row(
    models: dict[str, Path], msl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN or infinite logits (a broken export, an FP16 overflow) make that image's row an error,
    not class 0 by argmax with NaN probabilities; the other rows of the batch are unchanged."""
    from marsvision.runtime.classifier import NOT_FINITE

    paths = _images(msl_dir, 4)
    with Classifier(models["fp32"], device="cpu", batch_size=4, workers=1) as clf:
        good = clf.predict(paths)
        real_infer = clf.runner.infer

        def broken(x: np.ndarray) -> np.ndarray:
            logits = np.array(real_infer(x))
            logits[1, 0], logits[2, :], logits[3, 0] = np.nan, np.inf, -np.inf
            return logits

        monkeypatch.setattr(clf.runner, "infer", broken)
        got = clf.predict(paths)
    # -inf is no less broken, though softmax turns it into a clean probability of 0
    assert [p.status for p in got] == ["ok", "error", "error", "error"]
    assert got[1].error == got[2].error == got[3].error == NOT_FINITE and got[1].label is None
    assert got[0].probs == good[0].probs
    # large finite logits are no fault: the softmax is taken after the row's largest is
    # subtracted (exp(1000) is inf; logits near 1e6 came from a training run here)
    from marsvision.runtime.classifier import softmax

    big = softmax(np.array([[1000.0, 0.0], [-1e6, 1e6], [1e6, 1e6]], np.float32))
    np.testing.assert_array_equal(big, [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])


def test_default_model_passes_over_engines_that_cannot_run_here(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TensorRT installed says nothing of a GPU, cuda-python or the engine's build: an engine
    that cannot run here is passed over for the next export, with a note (it was taken, and
    mars-infer failed where the INT8 ONNX would have run)."""
    from marsvision.runtime import models as m
    from marsvision.runtime.backends import load_model_meta
    from marsvision.runtime.metadata import sidecar_path

    plan = tmp_path / m.artifact_name("binary", "int8-engine")
    plan.write_bytes(b"serialized engine")
    meta = load_model_meta(tiny_models["int8-cpu"])
    trt = {"version": "10.13.0.35", "compute_capability": "9.0"}
    sidecar_path(plan).write_text(dataclasses.replace(meta, tensorrt=trt).to_json())
    int8 = tmp_path / m.artifact_name("binary", "int8-cpu")
    os.symlink(tiny_models["int8-cpu"], int8)
    monkeypatch.setattr(m, "_has_tensorrt", lambda: True)  # as a tensorrt install says
    chosen = m.default_model(tmp_path)  # no TensorRT runtime, cuda-python or GPU here
    assert chosen.path == int8 and chosen.device == "auto"
    assert chosen.note is not None and chosen.note.startswith(f"passed over {plan.name}: ")
    import marsvision.runtime.backends.tensorrt as trt_backend

    monkeypatch.setattr(trt_backend, "_open_checks", lambda path: None)  # where it runs
    assert m.default_model(tmp_path) == (plan, "auto", None)


class _Stderr(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _progress_at(
    monkeypatch: pytest.MonkeyPatch, times: list[float], *, tty: bool, rows_on_terminal: bool
) -> str:
    """What mars-infer's progress writes for an update at each of `times` (seconds after its
    start, one image each) and its close."""
    from marsvision.runtime import cli as infer_cli

    err = _Stderr(tty)
    clock = iter([0.0, *times, times[-1]])
    monkeypatch.setattr(infer_cli.sys, "stderr", err)
    monkeypatch.setattr(infer_cli.time, "perf_counter", lambda: next(clock))
    progress = infer_cli._Progress(len(times), rows_on_terminal=rows_on_terminal, every=30.0)
    for done in range(1, len(times) + 1):
        progress.update(done)
    progress.close()
    return err.getvalue()


def test_progress_in_a_log_is_a_line_every_half_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr a file or pipe: a plain line now and then (it printed nothing until the summary)."""
    out = _progress_at(monkeypatch, [10.0, 31.0, 45.0, 62.0], tty=False, rows_on_terminal=False)
    assert out == ("mars-infer: 2/4 images  0.1 images/s\nmars-infer: 4/4 images  0.1 images/s\n")


def test_progress_on_a_terminal_is_redrawn_ten_times_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = _progress_at(monkeypatch, [0.05, 0.2, 0.25, 0.4], tty=True, rows_on_terminal=False)
    # 0.05 and 0.25 are too soon after the last draw; close draws the final count and ends it
    drawn = ["2/4 images  10.0 images/s", "4/4 images  10.0 images/s"] + [
        "4/4 images  10.0 images/s"
    ]
    assert out == "".join(f"\r{line} " for line in drawn) + "\n"


def test_progress_stays_off_a_terminal_that_shows_the_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Results on the terminal too (no --out): the progress line ran into the next row."""
    assert _progress_at(monkeypatch, [0.5, 1.0], tty=True, rows_on_terminal=True) == ""


def test_a_failing_stderr_silences_the_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """A log on a full device (or a reader of stderr that left): the progress line raised, and
    the run stopped, blamed on the results file (or exit 141); the summary was already guarded."""
    from marsvision.runtime import cli as infer_cli

    class Full(_Stderr):
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

    clock = iter([0.0, 31.0, 62.0, 93.0, 93.0])
    monkeypatch.setattr(infer_cli.sys, "stderr", Full(tty=False))
    monkeypatch.setattr(infer_cli.time, "perf_counter", lambda: next(clock))
    progress = infer_cli._Progress(3, rows_on_terminal=False, every=30.0)
    progress.update(1)  # fails quietly, and no line is tried again
    assert progress.silent
    progress.update(2)
    progress.update(3)
    progress.close()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_no_blas_thread_pool_beside_threads_and_workers() -> None:
    """numpy's OpenBLAS started a thread pool when mars-infer imported it (a thread per core it
    sees: one here, beside --threads and --workers); the command does no BLAS. A user's own
    OPENBLAS_NUM_THREADS is kept."""
    code = (
        "import os, marsvision.runtime.cli; "
        "print(len(os.listdir('/proc/self/task')), os.environ['OPENBLAS_NUM_THREADS'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.stdout.split() == ["1", "1"], r.stderr  # the main thread alone
    r = subprocess.run([sys.executable, "-c", code], env={**env, "OPENBLAS_NUM_THREADS": "2"},
                       capture_output=True, text=True)  # fmt: skip
    assert r.stdout.split()[1] == "2", r.stderr


def _exports(folder: Path, *flavours: str) -> dict[str, Path]:
    """Files named as mars-export names them (their contents are never read here)."""
    from marsvision.runtime import models as m

    paths = {f: folder / m.artifact_name("binary", f) for f in flavours}
    for p in paths.values():
        p.write_bytes(b"model")
    return paths


def test_device_cpu_or_backend_onnxruntime_never_takes_a_tensorrt_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--device cpu takes the INT8 ONNX even beside an engine that would run on this machine's
    GPU: an engine needs the GPU the user ruled out (and TensorRTRunner refuses device cpu)."""
    import marsvision.runtime.backends.tensorrt as trt_backend
    from marsvision.runtime import models as m

    paths = _exports(tmp_path, "int8-engine", "fp16-engine", "int8-cpu", "fp32")
    monkeypatch.setattr(m, "_has_tensorrt", lambda: True)
    monkeypatch.setattr(trt_backend, "_open_checks", lambda path: None)  # where it runs
    assert m.default_model(tmp_path) == (paths["int8-engine"], "auto", None)
    assert m.default_model(tmp_path, device="cpu") == (paths["int8-cpu"], "cpu", None)
    # --backend onnxruntime cannot run an engine: it was taken, then refused
    assert m.default_model(tmp_path, backend="onnxruntime") == (paths["int8-cpu"], "auto", None)


def test_device_cuda_takes_the_fp16_export_without_a_cpu_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --device cuda the FP16 export is taken where onnxruntime lists CUDA, and runs on
    CUDA or fails saying why: only --device auto falls back to the INT8 export on the CPU (a
    user who asked for the GPU got CPU figures with exit 0)."""
    from marsvision.runtime import models as m

    paths = _exports(tmp_path, "fp16", "int8-cpu", "fp32")
    monkeypatch.setattr(m, "_has_cuda_onnxruntime", lambda: True)
    monkeypatch.setattr(m, "_cuda_refusal", lambda path: "CUDA cannot start here")
    assert m.default_model(tmp_path, device="cuda") == (paths["fp16"], "cuda", None)
    auto = m.default_model(tmp_path)
    assert (auto.path, auto.device) == (paths["int8-cpu"], "cpu")


@pytest.mark.parametrize(
    "manifest",
    [{"files": ["resnet50-binary.fp32.onnx"]}, [], {"artifacts": [{"name": "x"}]}, "text"],
)
def test_a_manifest_that_is_not_mars_exports_is_not_a_list_of_files(
    tmp_path: Path, manifest: object
) -> None:
    """A manifest.json of another shape (another tool's, a newer format's) names no files: the
    exports then go by their names, as without one (a KeyError or TypeError was a traceback),
    with a note."""
    from marsvision.runtime import models as m

    paths = _exports(tmp_path, "int8-cpu", "fp32")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    note = (  # and says so: the files' sha256 are not checked then either
        "manifest.json there is not mars-export's (unreadable, or of another shape): the files "
        "go by their names alone, unchecked"
    )
    assert m.default_model(tmp_path, device="cpu") == (paths["int8-cpu"], "cpu", note)


def test_an_empty_mars_exports_is_the_default_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """MARS_EXPORTS set but empty (`MARS_EXPORTS= mars-infer ...`) is ./exports, where
    mars-export writes, not the working folder itself."""
    from marsvision.runtime import models as m

    monkeypatch.setenv(m.EXPORTS_ENV, "")
    assert m.default_exports_dir() == Path("exports")
    monkeypatch.setenv(m.EXPORTS_ENV, "/srv/models")
    assert m.default_exports_dir() == Path("/srv/models")


def test_a_folder_of_only_unlisted_binary_exports_is_not_another_models(tmp_path: Path) -> None:
    """Exports of the task asked for that were passed over (manifest.json lists none of them)
    are not "another model's export" to pass as --engine: the message says to export anew."""
    from marsvision.runtime import models as m
    from marsvision.runtime.errors import MarsvisionError

    _exports(tmp_path, "int8-cpu", "fp32")
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts": []}))
    with pytest.raises(MarsvisionError) as e:
        m.default_model(tmp_path, device="cpu")
    assert "another model's export" not in e.value.message
    assert f"--out {tmp_path}` first" in e.value.message


def _image_args(msl_dir: Path, n: int) -> list[str]:
    return [str(p) for p in _images(msl_dir, n)]


def _infer_keeping_the_classifier(
    monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> tuple[Any, dict[str, Any]]:
    """Run mars-infer's click entry; its result and the settings of the Classifier it ran with
    (onnxruntime's intra-op threads read while its session is open)."""
    made: list[dict[str, Any]] = []

    def keep(*a: Any, **kw: Any) -> Classifier:
        clf = Classifier(*a, **kw)
        options = clf.runner._sess.get_session_options()  # type: ignore[attr-defined]
        made.append({"workers": clf.workers, "batch_size": clf.batch_size,
                     "fast_decode": clf.fast_decode, "tta": clf.tta,
                     "threads": options.intra_op_num_threads})  # fmt: skip
        return clf

    monkeypatch.setattr(infer_cli, "Classifier", keep)
    result = CliRunner().invoke(infer_cli.main, args)
    assert len(made) == 1, result.output
    return result, made[0]


def test_options_reach_the_classifier(
    models: dict[str, Path], msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-j, --threads, -b, --fast-decode and --tta are the classifier's settings (decode threads,
    onnxruntime's intra-op threads, batch, decode, augmentation), not only the run record's."""
    from marsvision.runtime.host import usable_cores

    threads = 1 if usable_cores() > 1 else 2  # not the default, the usable cores
    out = tmp_path / "r.csv"
    args = [*_image_args(msl_dir, 3), "-m", str(models["fp32"]), "-o", str(out), "-j", "3",
            "--threads", str(threads), "-b", "5", "--fast-decode", "--tta", "flip"]  # fmt: skip
    result, made = _infer_keeping_the_classifier(monkeypatch, args)
    assert result.exit_code == 0, result.output
    assert made == {"workers": 3, "batch_size": 5, "fast_decode": True, "tta": "flip",
                    "threads": threads}  # fmt: skip
    record = json.loads((tmp_path / "r.csv.run.json").read_text())
    assert (record["workers"], record["threads"], record["batch_size"]) == (3, threads, 5)


def test_a_json_out_is_written_as_jsonl(
    models: dict[str, Path], msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --format, an --out named .json (as .jsonl) gets one JSON object a line; any
    other name gets CSV."""
    images = _image_args(msl_dir, 2)
    monkeypatch.chdir(tmp_path)
    for name in ("r.JSON", "r.jsonl"):
        result = CliRunner().invoke(
            infer_cli.main, [*images, "-m", str(models["fp32"]), "-o", name]
        )
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in Path(name).read_text().splitlines()]
        assert [row["path"] for row in rows] == images


def test_a_run_stopped_before_its_first_row_leaves_no_out(
    models: dict[str, Path], msl_dir: Path, tmp_path: Path
) -> None:
    """A run refused after it made --out (its run record cannot be written) removes the empty
    file it made: left there, the rerun was refused for an existing --out."""
    out = tmp_path / "r.csv"
    (tmp_path / "r.csv.run.json").mkdir()  # the record cannot be written
    args = [*_image_args(msl_dir, 1), "-m", str(models["fp32"]), "-o", str(out)]
    result = CliRunner().invoke(infer_cli.main, args)
    assert result.exit_code == 1 and "choose another --out" in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_results_file_gone_while_written_is_an_error(
    how: str,
    models: dict[str, Path],
    msl_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--out deleted or replaced during the run (a cleanup, a log rotation): the rows went into
    a file no name leads to, and mars-infer said "2 ok" and exited 0."""
    out = tmp_path / "r.csv"

    class Meddled(Classifier):
        def predict_batches(self, paths: Any, **kw: Any) -> Any:
            for n, batch in enumerate(super().predict_batches(paths, **kw)):
                if n == 1:  # after the first batch's rows
                    if how == "deleted":
                        out.unlink()
                    else:
                        (tmp_path / "new.csv").write_text("path\n")
                        os.replace(tmp_path / "new.csv", out)
                yield batch

    monkeypatch.setattr(infer_cli, "Classifier", Meddled)
    args = [*_image_args(msl_dir, 2), "-m", str(models["fp32"]), "-o", str(out), "-b", "1"]
    result = CliRunner().invoke(infer_cli.main, args)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {out} was deleted, moved or replaced while mars-infer wrote it: this run's 2 "
        "rows are not in it; run again"
    )
    monkeypatch.setattr(infer_cli, "Classifier", Classifier)
    if out.exists():
        out.unlink()
    result = CliRunner().invoke(infer_cli.main, args)  # left alone: written, exit 0
    assert result.exit_code == 0 and len(_csv_rows(out)) == 2, result.output


def test_resume_with_a_top_k_above_the_class_count(
    models: dict[str, Path], msl_dir: Path, tmp_path: Path
) -> None:
    """--top-k 3 of a binary model is --top-k 2, and its file continues with the same flags."""
    images, out = _image_args(msl_dir, 2), str(tmp_path / "r.csv")
    first = CliRunner().invoke(infer_cli.main, [images[0], "-m", str(models["fp32"]), "-o", out,
                                                "--top-k", "3"])  # fmt: skip
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(infer_cli.main, [*images, "-m", str(models["fp32"]), "-o", out,
                                                "--top-k", "3", "--resume"])  # fmt: skip
    assert again.exit_code == 0 and "1 already in" in again.output, again.output
    assert len(Path(out).read_text().splitlines()) == 3


def test_the_results_file_never_takes_a_standard_streams_number(
    models: dict[str, Path], msl_dir: Path, tmp_path: Path
) -> None:
    """Started with stderr closed (`2>&-`), the results file was opened as fd 2, where native
    code (onnxruntime's log) writes: stderr is reopened on /dev/null first."""
    code = (
        "import sys; from marsvision.runtime import cli, resume; real = resume.open_output\n"
        "def spy(*a, **kw):\n"
        "    stream = real(*a, **kw); print(stream.fileno(), file=sys.__stdout__); return stream\n"
        "resume.open_output = spy; cli.main()"
    )
    args = [*_image_args(msl_dir, 1), "-m", str(models["fp32"]), "-o", str(tmp_path / "r.csv")]
    r = subprocess.run([sys.executable, "-c", code, *args], preexec_fn=lambda: os.close(2),
                       stdout=subprocess.PIPE, stderr=None)  # fmt: skip
    assert r.returncode == 0
    assert int(r.stdout.split()[0]) > 2, r.stdout


def test_the_default_model_runs_on_the_device_it_was_chosen_for(
    tiny_exports: Path, msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --engine, where the FP16 export was passed over because CUDA cannot run here
    (onnxruntime-gpu without a GPU lists CUDA all the same), the INT8 export chosen in its
    place runs on the CPU it was chosen for, not on --device auto's pick."""
    from marsvision.runtime import models

    monkeypatch.setattr(models, "_has_cuda_onnxruntime", lambda: True)
    monkeypatch.setenv("MARS_EXPORTS", str(tiny_exports))
    out = tmp_path / "r.csv"
    result = CliRunner().invoke(infer_cli.main, [*_image_args(msl_dir, 1), "-o", str(out)])
    assert result.exit_code == 0 and "passed over" in result.output, result.output
    record = json.loads((tmp_path / "r.csv.run.json").read_text())
    assert record["engine"].endswith(".int8-cpu.onnx") and record["device"] == "cpu", record
