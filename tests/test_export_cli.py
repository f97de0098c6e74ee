"""mars-export as a user runs it: the summary table, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_INT8_FLOOR, signal_once_written

from marsvision.export import cli
from marsvision.export.artifacts import MANIFEST
from marsvision.runtime.errors import MarsvisionError
from marsvision.train.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint
from marsvision.train.model import ARCH


def _run(args: list[str], msl_dir: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.main, [*args, "--data", str(msl_dir)])
    return result.exit_code, result.stdout, result.stderr


def _one_line_error(code: int, stdout: str, stderr: str) -> str:
    assert code != 0
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def test_help_lists_the_options() -> None:
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0
    for flag in ("--checkpoint", "--fp16", "--int8", "--calib-method", "--tensorrt", "--max-batch"):
        assert flag in result.output


def test_export_prints_table_and_says_why_no_engines(
    tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path
) -> None:
    if cli_tensorrt_available():
        pytest.skip("TensorRT is installed here: the skip line is not printed")
    code, out, err = _run(
        ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--fp16"], msl_dir
    )
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header[:3] == ["artifact", "precision", "size"]
    assert "resnet50-binary.fp32.onnx" in out and "resnet50-binary.fp16.onnx" in out
    skip = [line for line in err.splitlines() if "skipped the TensorRT engines" in line]
    assert len(skip) == 1 and 'pip install "marsvision[trt]"' in skip[0]
    assert "mars-export:" not in out  # progress stays on stderr
    assert f"wrote 2 artifacts and manifest.json to {tmp_path}" in out
    assert json.loads((tmp_path / MANIFEST).read_text())["artifacts"]


def cli_tensorrt_available() -> bool:
    from marsvision.export.tensorrt import tensorrt_unavailable_reason

    return tensorrt_unavailable_reason() is None


def test_no_checkpoint_and_no_shipped_model(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "_REPO", tmp_path)
    monkeypatch.delenv("MARS_MODELS", raising=False)  # the README's setting would win
    line = _one_line_error(*_run(["--out", str(tmp_path / "o")], msl_dir))
    assert "--checkpoint" in line and "resnet50-binary.pt" in line


def test_shipped_checkpoint_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "resnet50-binary.pt").write_bytes(b"x")
    monkeypatch.setattr(cli, "_REPO", tmp_path)
    monkeypatch.delenv("MARS_MODELS", raising=False)
    assert cli.shipped_checkpoint() == tmp_path / "models" / "resnet50-binary.pt"


def test_a_shipped_checkpoint_that_is_not_its_sha256sums_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shipped checkpoint changed since it shipped (a bit flipped in a weight loads and
    exports) was exported as it was; SHA256SUMS beside it said otherwise."""
    import hashlib

    models = tmp_path / "models"
    models.mkdir()
    (models / "resnet50-binary.pt").write_bytes(b"x")
    monkeypatch.setattr(cli, "_REPO", tmp_path)
    monkeypatch.delenv("MARS_MODELS", raising=False)
    good = hashlib.sha256(b"x").hexdigest()
    for form in (
        "{}  resnet50-binary.pt\n",
        "{} *resnet50-binary.pt\n",  # binary mode
        "\ufeff{}  resnet50-binary.pt\r\n",  # an editor's BOM, Windows' CRLF
        "{}  ./resnet50-binary.pt\n",  # `sha256sum ./*.pt`
        "SHA256 (resnet50-binary.pt) = {}\n",  # BSD form, `sha256sum --tag`
    ):
        for digest, listed in ((good, True), (good.upper(), True), ("ab" * 32, False)):
            (models / "SHA256SUMS").write_text(form.format(digest), encoding="utf-8", newline="")
            if listed:
                assert cli.shipped_checkpoint() == models / "resnet50-binary.pt"
            else:
                with pytest.raises(MarsvisionError, match="is not the shipped file"):
                    cli.shipped_checkpoint()
    (models / "SHA256SUMS").write_text(f"{'0' * 64}  resnet50-msl25.pt\n")  # another file's
    assert cli.shipped_checkpoint() == models / "resnet50-binary.pt"
    (models / "SHA256SUMS").write_text(f"{'0' * 64}  resnet50-msl25.pt\n{'ab' * 32}  "
                                       "resnet50-binary.pt\n")  # fmt: skip
    with pytest.raises(MarsvisionError) as e:
        cli.shipped_checkpoint()
    assert e.value.message == (
        f"{models / 'resnet50-binary.pt'} is not the shipped file: sha256 {good[:12]}..., "
        "SHA256SUMS beside it gives abababababab... (damaged, or changed since it shipped); "
        f"restore it (in a clone: git -C {models} checkout -- resnet50-binary.pt) or pass "
        "--checkpoint PATH"
    )


def test_a_checkpoint_named_by_path_is_checked_against_sha256sums_beside_it(
    msl_dir: Path, tmp_path: Path
) -> None:
    """`--checkpoint models/resnet50-binary.pt` (the README's way after `pip install .`)
    exported a copy with a bit flipped, which the same file as the default was refused for."""
    import hashlib

    models = tmp_path / "mm"
    models.mkdir()
    ckpt = models / "resnet50-binary.pt"
    ckpt.write_bytes(b"x")
    good = hashlib.sha256(b"x").hexdigest()
    (models / "SHA256SUMS").write_text(f"{good}  resnet50-binary.pt\n")
    assert cli.listed_checkpoint(ckpt) == ckpt
    (models / "SHA256SUMS").write_text(f"{'0' * 64}  other.pt\n")  # not listed: as it is
    assert cli.listed_checkpoint(ckpt) == ckpt
    (models / "SHA256SUMS").write_text(f"{'ab' * 32}  resnet50-binary.pt\n")
    line = _one_line_error(*_run(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o")],
                                 msl_dir))  # fmt: skip
    assert line == (
        f"Error: {ckpt} is not the file SHA256SUMS beside it lists: sha256 {good[:12]}..., listed "
        "abababababab... (damaged, or changed since it was listed); restore it, or mend its line "
        "in SHA256SUMS if the change is yours"
    )


def test_missing_checkpoint(msl_dir: Path, tmp_path: Path) -> None:
    line = _one_line_error(
        *_run(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")], msl_dir)
    )
    assert "does not exist" in line


def test_a_file_of_another_stage_as_checkpoint_is_named(
    tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path
) -> None:
    """A run's resume.pt or an exported model given as --checkpoint was "not a marsvision
    checkpoint ...; train one with mars-train" (or "re-copy it"): each is named, with the file
    to pass instead."""
    import shutil

    import torch

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}, "optimizer": {}, "config": {}, "epoch": 1}, run / "resume.pt")
    onnx_file = tmp_path / "m.onnx"
    shutil.copy(tiny_checkpoint, onnx_file)  # any bytes torch cannot read as a checkpoint
    onnx_file.write_bytes(b"\x08\x07\x12\x07pytorch")  # an ONNX file's first bytes
    for given, said in (
        (
            run / "resume.pt",
            f"is a training run's resume file (mars-train "
            f"--resume reads it), not its checkpoint: pass {run / 'checkpoint.pt'}",
        ),
        (onnx_file, "is an exported model, not a checkpoint: pass the .pt"),
    ):
        args = ["--checkpoint", str(given), "--out", str(tmp_path / "o")]
        assert said in _one_line_error(*_run(args, msl_dir))


@pytest.mark.parametrize("kind", ["truncated", "foreign-torch", "foreign-text"])
def test_bad_checkpoint(kind: str, tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path) -> None:
    import torch

    bad = tmp_path / "bad.pt"
    if kind == "truncated":
        data = tiny_checkpoint.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "foreign-torch":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
    else:
        bad.write_text("hello\n")
    line = _one_line_error(*_run(["--checkpoint", str(bad), "--out", str(tmp_path / "o")], msl_dir))
    assert "not a marsvision checkpoint" in line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize(
    ("edit", "refusal"),
    [
        # a traceback before: KeyError 'data_fingerprint', AttributeError on a list
        ("no-fingerprint", "checkpoint lacks data_fingerprint"),
        ("list-state", "its state_dict is not a mapping of names to tensors"),
        ("same-names", "class names ['Rover', 'Rover']: they must be a list of distinct"),
        # these failed after --out was made, leaving it empty
        ("three-names", "names 3 classes but its fc layer has 2 outputs"),
        ("missing-tensor", "fc.bias"),
        ("other-arch", "architecture 'resnet18' is not 'resnet50'"),
    ],
)
def test_a_checkpoint_that_fails_its_checks_makes_no_out(
    edit: str, refusal: str, tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path
) -> None:
    import torch

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    if edit == "no-fingerprint":
        del ckpt["data_fingerprint"]
    elif edit == "list-state":
        ckpt["state_dict"] = list(ckpt["state_dict"].values())
    elif edit == "same-names":
        ckpt["class_names"] = ["Rover", "Rover"]
    elif edit == "three-names":
        ckpt["class_names"] = ["a", "b", "c"]
    elif edit == "other-arch":  # one that says it is another net (its weights fit here)
        ckpt["arch"] = "resnet18"
    else:
        del ckpt["state_dict"]["fc.bias"]
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    out = tmp_path / "o"
    line = _one_line_error(*_run(["--checkpoint", str(bad), "--out", str(out)], msl_dir))
    assert refusal in line
    assert not out.exists()


def test_an_out_dir_in_use_is_refused(tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path) -> None:
    """Two exports into one --out at once (of two checkpoints: a manifest that named one and
    listed the other's FP16) each went on, exit 0 both."""
    from marsvision.runtime.files import FolderLock

    with FolderLock() as other:
        other.acquire(tmp_path, "mars-export")
        line = _one_line_error(
            *_run(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path)], msl_dir)
        )
    assert f"{tmp_path} is in use by another mars-export (it holds the folder's lock)" in line
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line(
    tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk during the export (onnx.save raised OSError ENOSPC on a 60 MiB tmpfs) ended in
    a traceback. Here export_all raises that error: this checks the command's one line."""
    import errno

    def full(_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    from marsvision.export import pipeline

    monkeypatch.setattr(pipeline, "export_all", full)
    line = _one_line_error(
        *_run(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path)], msl_dir)
    )
    assert line == (
        f"Error: cannot write to {tmp_path} (No space left on device): make room, or pass "
        "another --out"
    )


def test_a_model_file_cut_by_a_full_disk_is_one_line(
    tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a 250-400 MB tmpfs the INT8 step ended in protobuf's DecodeError traceback: the
    quantizer's copy of the model was cut by the full disk without an OSError, then read back.
    Here export_all raises that error: this checks the command's one line."""
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

    def cut(_: object) -> None:
        raise DecodeError("Error parsing message with type 'onnx.ModelProto'")

    from marsvision.export import pipeline

    monkeypatch.setattr(pipeline, "export_all", cut)
    line = _one_line_error(
        *_run(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path)], msl_dir)
    )
    assert line.startswith(
        f"Error: a model file written under {tmp_path} could not be read back (Error parsing "
        "message with type 'onnx.ModelProto'): a disk that fills up truncates it without an "
        "error ("
    ) and line.endswith(" MiB free there now); make room, or pass another --out"), line

    def other(_: object) -> None:  # any other failure stays what it is
        raise KeyError("x")

    monkeypatch.setattr(pipeline, "export_all", other)
    args = ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--data", str(msl_dir)]
    assert isinstance(CliRunner().invoke(cli.main, args).exception, KeyError)


def test_unwritable_out_dir(tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = _one_line_error(
        *_run(["--checkpoint", str(tiny_checkpoint), "--out", str(blocker / "out")], msl_dir)
    )
    assert "--out" in line and "a-file is not a folder" in line


def test_an_out_file_and_a_checkpoint_folder_are_one_line_errors(
    tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path
) -> None:
    """They were click's usage errors (exit 2, as for a bad command line), where the other
    commands say so in one line with exit 1; a run folder as the checkpoint names the file in
    it. The --out is checked first (it was refused by the export's first write, after seconds
    of loading and running the checkpoint, and after any fault of the checkpoint)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    missing = str(tmp_path / "missing.pt")
    code, out, err = _run(["--checkpoint", missing, "--out", str(blocker)], msl_dir)
    assert code == 1 and _one_line_error(code, out, err) == (
        f"Error: --out {blocker} is a file, not a folder"
    )
    run = tmp_path / "run"
    run.mkdir()
    code, out, err = _run(["--checkpoint", str(run), "--out", str(tmp_path / "o")], msl_dir)
    assert code == 1 and _one_line_error(code, out, err) == (
        f"Error: {run} is a folder, not a checkpoint: pass the .pt file that mars-train wrote"
    )
    shutil.copy(tiny_checkpoint, run / "checkpoint.pt")
    code, out, err = _run(["--checkpoint", str(run), "--out", str(tmp_path / "o")], msl_dir)
    assert _one_line_error(code, out, err).endswith(f"pass {run / 'checkpoint.pt'}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("moved", "code"), [(6, 0), (7, 1)])
def test_an_int8_file_that_moves_labels_is_refused(
    moved: int,
    code: int,
    tiny_checkpoint: Path,
    msl_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only outputs that are not finite were refused: an INT8 file that moved any number of
    labels (a calibration gone wrong) was written, and became mars-infer's default on a CPU.
    Here both INT8 files give the FP32 file's logits with the first `moved` images' labels
    turned over: at the default floor, 90% of 64 val images, 6 pass and 7 are refused."""
    from marsvision.export import images
    from marsvision.runtime.models import artifact_name

    real = images.ort_logits

    def turned(path: Path, x: np.ndarray) -> np.ndarray:
        if "int8" not in path.name:
            return real(path, x)
        out = real(path.with_name(artifact_name("binary", "fp32")), x)
        out[:moved] = out[:moved, ::-1]
        return out

    monkeypatch.setattr(images, "ort_logits", turned)
    out = tmp_path / "o"
    args = ["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--int8", "--tensorrt", "off"]
    got, stdout, stderr = _run([*args, "--calib-images", "8"], msl_dir)
    if code:
        assert got == code and "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines()[-1] == (
            f"Error: resnet50-binary.int8-cpu.onnx gives PyTorch's labels on {64 - moved} of 64 "
            "val images (89.06%), under --int8-min-agreement 90: a broken INT8, no model file "
            "written (the calibration cache is kept). Calibrate otherwise (--calib-method, "
            "--calib-images), distill the model for INT8 (python -m marsvision.train.int8_distill),"
            " or pass --int8-min-agreement 0 to write it and judge it with mars-bench parity"
        )
        assert not [p for p in out.iterdir() if p.suffix == ".onnx"]
        assert not (out / MANIFEST).exists()
        # again: the ranges come from the cache, trusted by its name; the refusal names it
        (cache,) = (out / "calib-cache").iterdir()
        got, stdout, stderr = _run([*args, "--calib-images", "8"], msl_dir)
        assert (
            got == code
            and (
                f"no model file written (its ranges were read from the calibration cache {cache}, "
                "kept from an earlier export: delete that file to calibrate anew). Calibrate"
            )
            in stderr.strip().splitlines()[-1]
        ), stderr
        return
    assert got == 0, stderr
    manifest = json.loads((out / MANIFEST).read_text())
    agree = {a["flavour"]: a["parity_vs_fp32"]["top1_agreement"] for a in manifest["artifacts"]}
    assert agree == {"fp32": 1.0, "int8-cpu": 58 / 64, "int8-trt": 58 / 64}
    int8 = [a for a in manifest["artifacts"] if a["flavour"].startswith("int8")]
    assert [a["int8_min_agreement"] for a in int8] == [90.0, 90.0]  # each file's own floor


def test_the_int8_floor_is_a_percentage(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """As mars-bench parity's --int8-min-agreement: 0.9 would have been a floor of 0.9%."""
    for value, why in (("0.9", "a percentage, not a fraction: 90 for 90%"),
                       ("101", "must be a percentage in [0, 100]")):  # fmt: skip
        args = ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--int8"]
        result = CliRunner().invoke(cli.main, [*args, "--int8-min-agreement", value])
        assert result.exit_code == 2 and f"--int8-min-agreement {value}: {why}" in result.output
        assert not (tmp_path / "o").exists()


def test_fewer_calibration_images_than_asked(
    tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path
) -> None:
    args = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--out",
        str(tmp_path),
        "--int8",
        "--calib-images",
        "100000",
    ]
    line = _one_line_error(*_run(args, msl_dir))
    assert "100000 train images" in line and "has only 3746" in line
    assert list(tmp_path.iterdir()) == []


def test_out_dir_of_another_model(tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text(
        json.dumps({"source_checkpoint_sha256": "0" * 64, "artifacts": []})
    )
    line = _one_line_error(
        *_run(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path)], msl_dir)
    )
    assert "another model" in line and "--out" in line


@pytest.fixture(scope="module")
def other_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint saved again with another note: another checkpoint sha256."""
    from marsvision.train.checkpoint import atomic_torch_save, load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    path = tmp_path_factory.mktemp("other") / "other.pt"
    atomic_torch_save({**ckpt, "config": {"note": "another model"}}, path)
    return path


def test_out_dir_of_another_model_without_a_manifest(
    tiny_checkpoint: Path,
    tiny_exports: Path,
    other_checkpoint: Path,
    msl_dir: Path,
    tmp_path: Path,
) -> None:
    """With no manifest.json (deleted, or the files copied alone), an export of another
    checkpoint passed the owner check and mixed with the old files, which mars-infer's default
    then picked: the artifacts' own metadata, or an engine's sidecar, now names their model."""
    from marsvision.export.artifacts import check_manifest_owner, onnx_meta
    from marsvision.runtime.errors import MarsvisionError
    from marsvision.runtime.metadata import sha256_file, sidecar_path
    from marsvision.runtime.models import artifact_name

    onnx_out, engine_out = tmp_path / "onnx", tmp_path / "engine"
    onnx_out.mkdir()
    engine_out.mkdir()
    int8 = onnx_out / artifact_name("binary", "int8-cpu")
    shutil.copy(tiny_exports / int8.name, int8)
    engine = engine_out / artifact_name("binary", "int8-engine")
    engine.write_bytes(b"serialized engine")
    sidecar_path(engine).write_text(onnx_meta(int8).to_json())
    for out, name in ((onnx_out, int8.name), (engine_out, engine.name)):
        before = sorted(out.iterdir())
        args = ["--checkpoint", str(other_checkpoint), "--out", str(out)]
        line = _one_line_error(*_run(args, msl_dir))
        assert "another model" in line and name in line and "--out" in line, line
        assert sorted(out.iterdir()) == before
        check_manifest_owner(out, sha256_file(tiny_checkpoint))  # the model that made them
    # beside a manifest of the other model that does not list it: refused as well (it was let be,
    # and `--engine` ran it); a file the manifest lists is the manifest's
    other = sha256_file(other_checkpoint)
    for artifacts, refused in (([], True), (None, True), ([{"file": int8.name}], False)):
        manifest = {"source_checkpoint_sha256": other, "artifacts": artifacts}
        (onnx_out / "manifest.json").write_text(json.dumps(manifest))
        if refused:
            with pytest.raises(MarsvisionError, match=f"another model \\({int8.name}: "):
                check_manifest_owner(onnx_out, other)
        else:
            check_manifest_owner(onnx_out, other)
    (onnx_out / "manifest.json").unlink()
    int8.write_bytes(b"not onnx")  # a file of that name, not an artifact: it names no model
    check_manifest_owner(onnx_out, sha256_file(other_checkpoint))
    # another program's manifest.json: it held "artifacts of another model (sha256 None...)"
    (onnx_out / "manifest.json").write_text('{"name": "my app", "icons": []}')
    with pytest.raises(MarsvisionError, match=r"manifest.json is not a marsvision manifest; "):
        check_manifest_owner(onnx_out, sha256_file(other_checkpoint))


def test_tensorrt_on_without_tensorrt(tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path) -> None:
    if cli_tensorrt_available():
        pytest.skip("TensorRT is installed here")
    out = tmp_path / "o"  # it was made, and left empty
    args = ["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--fp16", "--tensorrt", "on"]
    line = _one_line_error(*_run(args, msl_dir))
    assert 'pip install "marsvision[trt]"' in line
    assert not out.exists()


def test_console_script_error_is_one_line(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("mars-export")
    if not exe.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    proc = subprocess.run(
        [str(exe), "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=120,
    )
    _one_line_error(proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_export_leaves_no_staging_folder(
    sig: signal.Signals, code: int, tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM (`timeout`, a CI cancel) killed the export before its cleanups: the staging
    folder (tens to hundreds of MB) stayed behind. Ctrl-C exited 1 with click's "Aborted!"."""
    args = ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--data", str(msl_dir)]
    returncode, err = signal_once_written(
        ["marsvision.export.cli", *args, "--int8", "--int8-min-agreement", str(TINY_INT8_FLOOR),
         "--tensorrt", "off"], tmp_path, ".staging*", sig,
    )  # fmt: skip
    assert returncode == code, err
    assert "Traceback" not in err and "Aborted!" not in err, err
    assert not list(tmp_path.glob(".staging*"))
    assert not (tmp_path / MANIFEST).exists()


def test_a_reader_of_stderr_that_left_ends_the_export_quietly(
    tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path
) -> None:
    """`mars-export ... 2>&1 | head -2`: the reader gone, its next log line ended it with exit
    1 (click's handling of a broken pipe), which says "an error, said on stderr": now 141, as
    for stdout's reader, after the cleanups (no staging folder left)."""
    import subprocess
    import sys

    args = ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--data",
            str(msl_dir), "--tensorrt", "off"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "marsvision.export.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stderr is not None
    proc.stderr.close()  # the reader leaves before the first line
    assert proc.wait(timeout=300) == 141
    assert not list((tmp_path / "out").glob(".staging*"))


def test_tensorrt_on_needs_an_engine_to_build(
    tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path
) -> None:
    """`--tensorrt on` alone would build no engine: refused, whether TensorRT is here or not, as
    a usage error (exit 2) before the checkpoint and the data are read (exit 1 after them; the
    data's error came first without --data)."""
    args = ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--tensorrt", "on"]
    code, out, err = _run(args, msl_dir)
    assert code == 2 and "add --fp16 and/or --int8" in _one_line_error(code, out, err)
    r = CliRunner().invoke(cli.main, args, env={"MARS_DATA": None})
    assert r.exit_code == 2 and "add --fp16 and/or --int8" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_commands_without_torch_name_the_extra(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runtime-only install ("marsvision[cpu]") has every console script but no torch:
    mars-train, mars-export and mars-bench parity/speed say which extra to install, in one
    line, instead of a traceback; mars-bench score needs no torch and is not stopped."""
    import importlib.util

    from marsvision.benchmarks.cli import main as bench
    from marsvision.runtime import errors
    from marsvision.train.cli import main as train

    real = importlib.util.find_spec
    monkeypatch.setattr(errors, "find_spec", lambda m: None if m == "torch" else real(m))
    for command, args, extra in (
        (train, ["--data", str(msl_dir), "--out", str(tmp_path / "t")], "train"),
        (cli.main, ["--out", str(tmp_path / "e")], "export"),
        (bench, ["parity", "--artifacts", str(tmp_path), "--out", str(tmp_path / "p")], "train"),
        (bench, ["speed", "--out", str(tmp_path / "s")], "train"),
    ):
        r = CliRunner().invoke(command, args)
        assert r.exit_code == 1 and r.exception is not None, (args, r.output)
        line = r.output.strip().splitlines()[-1]
        assert "needs torch, which this install lacks" in line, (args, r.output)
        assert f'pip install "marsvision[cpu,{extra}]"' in line, (args, r.output)
    assert not list(tmp_path.iterdir())  # stopped before writing anything
    # "marsvision[export]" alone: no onnxruntime (it comes with cpu or gpu)
    monkeypatch.setattr(errors, "find_spec", lambda m: None if m == "onnxruntime" else real(m))
    r = CliRunner().invoke(cli.main, ["--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "mars-export needs onnxruntime, which" in r.output, r.output
    assert 'pip install "marsvision[cpu,export]"' in r.output and not (tmp_path / "e").exists()
    r = CliRunner().invoke(bench, ["score", str(tmp_path / "none.csv"), "--data", str(msl_dir)])
    assert r.exit_code == 1 and "cannot read the predictions file" in r.output, r.output


@pytest.mark.parametrize("args", ["--max-batch 4 --tensorrt off --int8", "--max-batch 4"])
def test_max_batch_needs_an_engine_to_size(args: str, tmp_path: Path) -> None:
    """With no engine to build it did nothing, and went into the manifest's config as if used."""
    result = CliRunner().invoke(cli.main, ["--out", str(tmp_path / "o"), *args.split()])
    assert result.exit_code == 2 and "--max-batch sizes the TensorRT engines" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flag", ["--calib-images 64", "--calib-method entropy", "--int8-min-agreement 0"]
)
def test_int8_flags_need_int8(flag: str, tmp_path: Path) -> None:
    """Without --int8 they did nothing (and went into the manifest's config as if used)."""
    args = ["--out", str(tmp_path / "o"), *flag.split()]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2 and f"{flag.split()[0]} is for the INT8 export: add --int8" in (
        result.output
    ), result.output
    assert not (tmp_path / "o").exists()


def test_the_default_out_is_where_mars_infer_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mars-infer looks for its default model in $MARS_EXPORTS, but mars-export wrote to
    ./exports whatever it said: its hint (run mars-export --int8) then did not help."""
    from marsvision.export import pipeline

    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x")
    outs = []

    def export_all(config: object) -> dict[str, list[Any]]:
        outs.append(getattr(config, "out"))
        entry = {"file": "m.fp32.onnx", "precision": "fp32", "size_mb": 1.0,
                 "build_seconds": 1.0, "parity_vs_fp32": {}}  # fmt: skip
        return {"artifacts": [entry], "kept": []}

    monkeypatch.setattr(pipeline, "export_all", export_all)
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine"
    for env, out in (({"MARS_EXPORTS": str(mine)}, mine), ({}, Path("exports"))):
        result = CliRunner().invoke(cli.main, ["--checkpoint", str(ckpt)], env=env)
        assert result.exit_code == 0, result.output
        assert outs.pop() == out
        assert result.stdout.endswith(f"\n\nwrote 1 artifact and manifest.json to {out}\n")


def test_dash_h_is_help_in_every_command() -> None:
    """mars-infer and mars-train took -h; mars-export and mars-bench said "No such option"."""
    from marsvision.benchmarks.cli import main as bench
    from marsvision.runtime.cli import main as infer
    from marsvision.train.cli import main as train

    for command, args in ((cli.main, []), (bench, []), (bench, ["score"]), (infer, []),
                          (train, [])):  # fmt: skip
        short, long = (CliRunner().invoke(command, [*args, h]) for h in ("-h", "--help"))
        assert short.exit_code == 0 and short.output == long.output, short.output
        assert short.output.startswith("Usage: ")
    # mars-train's flags of a few values show them as click's choices do elsewhere (they were
    # TEXT, the values in prose or not at all)
    help_text = " ".join(CliRunner().invoke(train, ["--help"]).output.split())
    shown = ["--task [binary|msl25]", "--recipe [default|blog]", "--device [auto|cpu|cuda]",
             "--balance [loss|group|group-label|sampler|none]", "--amp [auto|bf16|off]",
             "--train-on [train|train+val|train+half-val]"]  # fmt: skip
    assert [s for s in shown if s not in help_text] == []
    from marsvision.train.int8_distill import main as distill
    from marsvision.train.ship import main as ship

    for command in (ship, distill):  # they read TEXT, the values in prose
        assert "--device [auto|cpu|cuda]" in CliRunner().invoke(command, ["--help"]).output


class _Joined:
    """An object whose unpickling calls a function: a file holding one is code to run."""

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return os.path.join, ("a", "b")


def _ckpt(**edits: Any) -> dict[str, Any]:
    """A checkpoint that passes every check (tiny weights: load_checkpoint builds no model)."""
    ckpt = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": ARCH, "task": "binary",
            "class_names": ["Surface", "Rover"], "preprocess": {}, "data_fingerprint": "f",
            "state_dict": {"fc.weight": torch.zeros(2, 4), "fc.bias": torch.zeros(2)}}  # fmt: skip
    return {**ckpt, **edits}


def test_a_valid_checkpoint_loads(tmp_path: Path) -> None:
    torch.save(_ckpt(), tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt")["class_names"] == ["Surface", "Rover"]


@pytest.mark.parametrize(
    ("edits", "refusal"),
    [
        ({"class_names": ["Rover", "Rover"]}, "they must be a list of distinct"),
        ({"class_names": ["Surface", ""]}, "they must be a list of distinct"),
        ({"state_dict": {"fc.weight": torch.zeros(2, 4), "note": "x"}},
         "its state_dict is not a mapping of names to tensors"),
    ],
)  # fmt: skip
def test_a_checkpoint_that_fails_its_checks_is_refused_on_loading(
    edits: dict[str, Any], refusal: str, tmp_path: Path
) -> None:
    """Duplicate or empty class names and a state_dict holding other than tensors are refused
    by load_checkpoint itself, whichever stage reads the file."""
    torch.save(_ckpt(**edits), tmp_path / "c.pt")
    with pytest.raises(MarsvisionError, match=refusal):
        load_checkpoint(tmp_path / "c.pt")


def test_a_checkpoint_that_would_run_code_is_not_loaded(tmp_path: Path) -> None:
    """A .pt file is a pickle: one that calls a function when it is read (an object of any
    class, not only tensors and plain containers) is refused unread, as torch's weights_only
    loading refuses it, rather than run."""
    torch.save(_ckpt(note=_Joined()), tmp_path / "c.pt")
    with pytest.raises(MarsvisionError, match="torch cannot read it"):
        load_checkpoint(tmp_path / "c.pt")


@pytest.mark.parametrize("suffix", [".onnx", ".plan", ".engine", ".trt"])
def test_an_exported_model_given_as_checkpoint_is_named(tmp_path: Path, suffix: str) -> None:
    """A TensorRT engine, like an ONNX file, is named as an exported model, with the file to
    pass instead."""
    model = tmp_path / f"m{suffix}"
    model.write_bytes(b"\x08\x07\x12\x07pytorch")
    with pytest.raises(MarsvisionError, match="is an exported model, not a checkpoint: pass"):
        load_checkpoint(model)
