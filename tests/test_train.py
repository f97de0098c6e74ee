"""mars-train end to end on a few real MSL images at 64 px, its outputs, resume, and bad input."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see train/cli.py

import csv
import io
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import config_started_with, files_up_to, signal_once_written
from torchvision.models import resnet50

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.spec import PreprocessSpec
from marsvision.train import data as msl
from marsvision.train.checkpoint import (
    atomic_torch_save,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    preprocess_from_checkpoint,
)
from marsvision.train.cli import main
from marsvision.train.config import TrainConfig, config_from_flags
from marsvision.train.images import eval_tensors
from marsvision.train.metrics import classification_metrics
from marsvision.train.model import create_model
from marsvision.train.progress import Progress

REPO = Path(__file__).resolve().parents[1]
LIMIT = 16
QUICK = ["--image-size", "64", "--device", "cpu", "--batch-size", "8", "--workers", "2"]


def _train(args: list[str]) -> Any:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def run(msl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs on a few images per split."""
    out = tmp_path_factory.mktemp("run") / "run"
    r = _train(
        ["--data", str(msl_dir), "--epochs", "2", "--limit", str(LIMIT), "--out", str(out), *QUICK]
    )
    assert "a warm-up of 3 epochs is over half the 2-epoch run: 1 (the lr then decays)" in r.output
    # the summary says how the epoch was chosen, and the pace (only metrics.json had them)
    said = r"\nselected on val balanced_accuracy over epochs 1-2 \(ties: lower val loss\); "
    assert re.search(said + r"the run's 2 epochs, \d+\.\d s each\n", r.output), r.output
    assert (
        " f1 (Rover) 0." in r.output and "confusion_test.png, config.json, resume.pt\n" in r.output
    )
    return out


def test_own_images_in_the_msl_layout_get_no_interval_by_sol(msl_dir: Path, tmp_path: Path) -> None:
    """Images of your own written in the MSL layout, under names that are no MSL product's, are
    each a group of their own: the summary called the interval over images "resampling whole
    sols"."""
    import shutil

    data = tmp_path / "own"
    (data / "imgs").mkdir(parents=True)
    shutil.copy(msl_dir / msl.SYNSET_FILE, data / msl.SYNSET_FILE)
    for split, name in msl.SPLIT_FILES.items():
        lines = []
        for i, line in enumerate((msl_dir / name).read_text().splitlines()[:8]):
            path, label = line.split()
            shutil.copy(msl_dir / path, data / "imgs" / f"0830_{split}{i}.jpg")
            lines.append(f"imgs/0830_{split}{i}.jpg {label}")
        (data / name).write_text("\n".join(lines) + "\n")
    r = _train(["--data", str(data), "--epochs", "1", "--out", str(tmp_path / "r"), *QUICK])
    assert "(n=8); no CI by sol (no test file name is an MSL product's, whose sol it gives)\n" in (
        r.output
    ), r.output
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["test"]["sols"] == 0


def test_an_msl25_summary_says_its_f1_is_macro(msl_dir: Path, tmp_path: Path) -> None:
    r = _train(["--data", str(msl_dir), "--task", "msl25", "--epochs", "1", "--limit", "8",
                "--out", str(tmp_path / "m"), *QUICK])  # fmt: skip
    assert re.search(r" f1 \(macro\) \d\.\d{4} \(", r.output), r.output


def test_run_folder(run: Path, msl_dir: Path) -> None:
    names = {p.name for p in run.iterdir()}
    assert {"checkpoint.pt", "resume.pt", "config.json", "metrics.json", "predictions_test.csv",
            "curves.png", "confusion_test.png"} <= names  # fmt: skip
    assert not [n for n in names if n.startswith(".")]  # no temporary files left
    for png in ("curves.png", "confusion_test.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "binary" and config["image_size"] == 64 and config["limit"] == LIMIT
    assert config["recipe"] == "default" and config["optimizer"] == "adamw"

    m = json.loads((run / "metrics.json").read_text())
    assert m["config"] == config and m["data_fingerprint"] == msl.data_fingerprint(msl_dir)
    assert len(m["history"]) == 2
    # the default 3-epoch warm-up, cut to the first epoch of two: the lr peaks, then decays
    assert config["warmup_epochs"] == 1
    first, second = (h["lr"] for h in m["history"])
    assert first == pytest.approx(m["config"]["lr"]) and second < first
    val_scores = [(h["val_balanced_accuracy"], -h["val_loss"]) for h in m["history"]]
    assert m["best_epoch"] == 1 + val_scores.index(max(val_scores))  # selected on val only
    for split in ("val", "test"):
        for key in ("accuracy", "balanced_accuracy", "precision", "recall", "f1",
                    "confusion_matrix", "per_class_recall"):  # fmt: skip
            assert key in m[split]
        assert m[split]["n"] == LIMIT
    for key in ("ci95", "ci95_by_sol"):
        for metric, (lo, hi) in m["test"][key].items():
            assert lo <= m["test"][metric] <= hi, (key, metric)


def test_predictions_agree_with_metrics_and_checkpoint(run: Path, msl_dir: Path) -> None:
    m = json.loads((run / "metrics.json").read_text())
    with (run / "predictions_test.csv").open() as f:
        rows = list(csv.DictReader(f))
    samples = msl.read_split(msl_dir, "test", "binary", limit=LIMIT)
    assert [r["path"] for r in rows] == [s.path.relative_to(msl_dir).as_posix() for s in samples]
    names = ["Surface", "Rover"]
    probs = np.array([[float(r[n]) for n in names] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    y_true = [names.index(r["true_label"]) for r in rows]
    y_pred = [names.index(r["pred_label"]) for r in rows]
    assert y_true == [s.label for s in samples]
    assert y_pred == list(probs.argmax(1))
    assert classification_metrics(y_true, y_pred, 2, "binary") == {
        k: v for k, v in m["test"].items() if k not in ("ci95", "ci95_by_sol", "sols")
    }
    assert m["test"]["sols"] == len({msl.sol_key(s.path) for s in samples}) > 1
    # the intervals: over images, and over sols (whole sols resampled)
    from marsvision.train.metrics import bootstrap_cis

    seed = m["config"]["seed"]
    assert m["test"]["ci95"] == bootstrap_cis(y_true, y_pred, 2, "binary", seed=seed)
    sols = [msl.sol_key(s.path) for s in samples]
    by_sol = bootstrap_cis(y_true, y_pred, 2, "binary", seed=seed, groups=sols)
    assert m["test"]["ci95_by_sol"] == by_sol != m["test"]["ci95"]
    # the checkpoint that ships is the one that made these predictions
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["epoch"] == m["best_epoch"] and ckpt["task"] == "binary"
    assert ckpt["metrics"]["test"] == m["test"]
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    assert spec == PreprocessSpec.for_input_size(64)
    with torch.inference_mode():
        logits = model_from_checkpoint(ckpt)(eval_tensors(samples, spec=spec, workers=2))
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), probs, atol=1e-4)


def test_resume_continues_the_same_run(
    run: Path, msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A two-epoch run stopped after epoch 1 (as by a kill), then --resume: the same history as
    the fixture's straight run."""
    from marsvision.train import loop

    args = ["--data", str(msl_dir), "--limit", str(LIMIT), "--out", str(tmp_path / "r"), *QUICK]
    monkeypatch.setattr(loop, "RESUME_EVERY_S", 0.0)  # resume.pt after every epoch
    cfg = config_from_flags("default", data=msl_dir, out=tmp_path / "r", epochs=2, limit=LIMIT,
                            image_size=64, device="cpu", batch_size=8, workers=2)  # fmt: skip
    assert loop.main(cfg, deadline=time.monotonic())["stopped_early_after_epoch"] == 1
    # the run's time and devices are all its parts': metrics.json and the card gave the last's
    state = torch.load(tmp_path / "r" / "resume.pt", weights_only=True)
    first = state["seconds"]
    assert first > 0 and state["device"] == "cpu"
    # begun on a GPU, resumed on this CPU, resumed there again: one "then cpu"
    torch.save({**state, "device": "cuda:0, then cpu"}, tmp_path / "r" / "resume.pt")
    _train([*args, "--epochs", "2", "--resume"])
    a = json.loads((run / "metrics.json").read_text())["history"]
    resumed = json.loads((tmp_path / "r" / "metrics.json").read_text())
    b = resumed["history"]
    assert [h["epoch"] for h in b] == [1, 2]
    assert resumed["seconds"] > first + b[1]["seconds"] and resumed["device"] == "cuda:0, then cpu"
    for ha, hb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "lr"):
            assert hb[key] == pytest.approx(ha[key], rel=1e-3, abs=1e-4), key
    # resuming with different training flags is refused; more epochs would stretch the
    # learning-rate schedule under the epochs already trained
    r = CliRunner().invoke(main, [*args, "--epochs", "2", "--lr", "0.5", "--resume"])
    assert r.exit_code == 1 and "--resume: lr was 0.001" in r.output
    r = CliRunner().invoke(main, [*args, "--epochs", "3", "--resume"])
    assert r.exit_code == 1 and "--resume: epochs was 2" in r.output
    # (every other setting: tests/test_resume.py)


def test_resume_needs_no_init_file(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resume.pt holds the weights: a run started from --init resumes after the weights file
    is gone (it was loaded again, and its absence refused the resume). A checkpoint's temporary
    file left by a killed write is removed (it stayed, up to 377 MB)."""
    from marsvision.train import loop

    weights = tmp_path / "init.pth"
    torch.save(create_model(2).state_dict(), weights)
    monkeypatch.setattr(loop, "RESUME_EVERY_S", 0.0)
    kw = dict(data=msl_dir, out=tmp_path / "r", epochs=2, limit=LIMIT, image_size=64,
              device="cpu", batch_size=8, workers=2, init=str(weights))  # fmt: skip
    first = loop.main(config_from_flags("default", **kw), deadline=time.monotonic())
    assert first["stopped_early_after_epoch"] == 1
    weights.unlink()
    cut = tmp_path / "r" / ".resume.pt.k1ll3d.tmp"  # a write cut by SIGKILL: removed
    cut.write_bytes(b"half a checkpoint")
    result = loop.main(config_from_flags("default", resume=True, **kw))
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert not cut.exists()


def test_a_diverged_run_stops_with_an_error(msl_dir: Path, tmp_path: Path) -> None:
    """Weights gone NaN: the run went on to the end and exited 0, with NaN in metrics.json and
    every image labelled the first class."""
    out = tmp_path / "nan"
    r = CliRunner().invoke(main, ["--data", str(msl_dir), "--out", str(out), "--limit",
                                  str(LIMIT), "--epochs", "2", "--lr", "1e30", *QUICK])  # fmt: skip
    assert r.exit_code == 1 and "Error: training diverged in epoch 1 (" in r.output, r.output
    assert "run again with a lower --lr (it was 1e+30)" in r.output
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()


def test_a_refit_whose_last_step_diverged_stops(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refit selects nothing on val and its train loss is taken before each step's update:
    weights gone NaN in the last step were kept, and every test image labelled the first class."""
    from marsvision.train import loop

    real = loop.train_one_epoch

    def last_step_diverges(model: torch.nn.Module, **kw: Any) -> dict[str, Any]:
        result = real(model, **kw)
        with torch.no_grad():
            model.get_parameter("fc.weight").fill_(float("nan"))
        return result

    monkeypatch.setattr(loop, "train_one_epoch", last_step_diverges)
    cfg = config_from_flags("default", data=msl_dir, out=tmp_path / "r", epochs=1, limit=LIMIT,
                            image_size=64, device="cpu", batch_size=8, workers=2, ema_decay=0.0,
                            train_on="train+val")  # fmt: skip
    with pytest.raises(
        MarsvisionError, match=r"diverged in epoch 1 \(val loss of the kept weights"
    ):
        loop.main(cfg)
    assert not [
        p for p in ("metrics.json", "checkpoint.pt", "resume.pt") if (tmp_path / "r" / p).exists()
    ]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_run_leaves_no_temporary_checkpoint(
    sig: signal.Signals, code: int, msl_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM (`timeout`, a job scheduler) killed mars-train while it wrote a checkpoint: the
    half-written hidden .tmp file (up to 377 MB for resume.pt) stayed, and no later run removes
    it; Ctrl-C exited 1 with click's "Aborted!", an option error's code."""
    out = tmp_path / "run"
    args = ["--data", str(msl_dir), "--out", str(out), "--limit", str(LIMIT), "--epochs", "20",
            *QUICK]  # fmt: skip
    # signalled while the first epoch's checkpoint.pt is being written
    returncode, err = signal_once_written(["marsvision.train.cli", *args], out, ".*.tmp", sig)
    assert returncode == code, err
    assert "Traceback" not in err and "Aborted!" not in err, err
    assert not list(out.glob(".*.tmp"))
    # what it says is what --resume can do: the first epoch's checkpoint comes before any
    # resume.pt (it said "--resume continues", and --resume then found none to continue from)
    assert not (out / "resume.pt").exists()
    said = {signal.SIGINT: "interrupted", signal.SIGTERM: "stopped by SIGTERM"}[sig]
    assert (
        f"mars-train: {said}; no resume.pt of this run yet to continue from (the first is "
        "saved at the "
        "end of the first epoch that ends 5 minutes or more into training" in err
    )


def test_a_stopped_run_offers_resume_only_of_its_own_resume_file(tmp_path: Path) -> None:
    """Stopped while decoding into the folder of an earlier run, mars-train said "the same
    command with --resume continues" of that run's resume.pt, and --resume then refused it,
    naming the earlier run's flags."""
    from marsvision.runtime.files import file_identity
    from marsvision.train.cli import stop_hint

    path = tmp_path / "resume.pt"
    own = "; the same command with --resume continues from the last resume.pt (saved every 5 "
    none = "; no resume.pt of this run yet to continue from (the first is saved at the end of "
    for resuming in (False, True):
        assert stop_hint(tmp_path, resuming=resuming, before=None, every_s=300).startswith(none)
    path.write_bytes(b"an earlier run's")
    before = file_identity(path)
    assert stop_hint(tmp_path, resuming=False, before=before, every_s=300).startswith(none)
    assert stop_hint(tmp_path, resuming=True, before=before, every_s=300).startswith(own)
    (tmp_path / "new").write_bytes(b"this run's")
    (tmp_path / "new").replace(path)  # as a save puts it in place
    assert stop_hint(tmp_path, resuming=False, before=before, every_s=300).startswith(own)
    path.unlink()  # the earlier run's removed once the images are decoded, none saved yet
    assert stop_hint(tmp_path, resuming=False, before=before, every_s=300).startswith(none)


def test_recipes() -> None:
    blog = config_from_flags("blog", data=Path("d"), out=Path("o"), epochs=None, lr=None)
    assert (blog.optimizer, blog.lr, blog.batch_size, blog.epochs) == ("sgd", 0.01, 32, 50)
    assert (blog.schedule, blog.label_smoothing, blog.ema_decay) == ("constant", 0.0, 0.0)
    default = config_from_flags("default", data=Path("d"), out=Path("o"), lr=0.003)
    assert default.lr == 0.003 and default.schedule == "cosine" and default.balance == "loss"
    assert default.augment.hflip and default.augment.rotate_deg > 0


def test_init_from_a_torchvision_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = resnet50(num_classes=1000)  # an ImageNet-shaped weights file
    torch.save(source.state_dict(), tmp_path / "resnet50.pth")
    model = create_model(2, init=str(tmp_path / "resnet50.pth"))
    assert torch.equal(model.get_parameter("conv1.weight"), source.conv1.weight)
    running_var = "layer4.2.bn3.running_var"
    assert torch.equal(model.get_buffer(running_var), source.get_buffer(running_var))
    assert model.get_parameter("fc.weight").shape[0] == 2  # head re-sized, not loaded
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(MarsvisionError, match="not ResNet-50 weights"):
        create_model(2, init=str(tmp_path / "other.pth"))
    with pytest.raises(MarsvisionError, match="no such weights file"):
        create_model(2, init=str(tmp_path / "absent.pth"))


def _cli(
    args: list[str],
    env: dict[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    code = "from marsvision.train.cli import main; main()"
    environ = {k: v for k, v in os.environ.items() if k != "MARS_DATA"} | (env or {})
    return subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=environ,
                          preexec_fn=preexec)  # fmt: skip


def _one_line_error(r: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for text in expected:
        assert text in lines[0]


def test_no_data_says_how_to_get_it(tmp_path: Path) -> None:
    _one_line_error(_cli(["--out", str(tmp_path / "r")]), "--data", "MARS_DATA", "--download")
    _one_line_error(_cli(["--data", str(tmp_path / "nope")]), "does not exist", "--download")
    assert list(tmp_path.iterdir()) == []


def test_a_run_folder_in_use_is_refused(tmp_path: Path, msl_dir: Path) -> None:
    """Two runs into one --out (the default runs/binary, a script started twice) each replaced
    the other's files; one reported the other's weights under its own metrics, exit 0 both."""
    from marsvision.runtime.files import FolderLock

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"the other run's")
    with FolderLock() as other:
        other.acquire(out, "mars-train")
        r = CliRunner().invoke(main, ["--data", str(msl_dir), "--out", str(out), "--limit", "4",
                                      "--epochs", "1", *QUICK])  # fmt: skip
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "decoding" not in r.output  # refused before it (minutes for a full data set)
    assert r.output.splitlines()[-1] == (
        f"Error: {out} is in use by another mars-train (it holds the folder's lock): let that "
        "one finish, or pass another --out"
    )
    assert (out / "checkpoint.pt").read_bytes() == b"the other run's"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_no_room_for_the_checkpoint_is_one_line(tmp_path: Path, msl_dir: Path) -> None:
    """A full disk, a quota or the file size limit (`ulimit -f`, here) made torch's writer fail
    with RuntimeError("unexpected pos ..."): a traceback that did not say why. The checkpoint's
    bytes go through a Python file now, which keeps the errno: one line."""
    out = tmp_path / "run"
    # config.json fits in 1 MiB; the 94 MB checkpoint does not
    r = _cli(["--data", str(msl_dir), "--out", str(out), "--limit", "4", "--epochs", "1", *QUICK],
             preexec=files_up_to(1 << 20))  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: cannot write to {out} (File too large): make room, or pass another --out"
    )
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # nor a half file


def test_a_signal_inside_a_checkpoint_write_stays_a_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or SIGTERM) inside one of torch.save's writes: its writer, closing the file on
    the way out, raised RuntimeError("unexpected pos ...") over it, and mars-ship stopped so
    ended in a traceback with exit 1 (a CI run met it); no half file is left either way."""
    import builtins

    from marsvision.runtime.errors import Stopped
    from marsvision.train import checkpoint

    class Cut:  # a file whose third write meets the signal
        def __init__(self, f: Any, stop: BaseException) -> None:
            self.f, self.stop, self.writes = f, stop, 0

        def write(self, data: Any) -> int:
            self.writes += 1
            if self.writes == 3:
                raise self.stop
            return int(self.f.write(data))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

    for stop in (KeyboardInterrupt(), Stopped(signal.SIGTERM)):
        monkeypatch.setattr(checkpoint, "open", lambda p, m, s=stop: Cut(builtins.open(p, m), s),
                            raising=False)  # fmt: skip
        with pytest.raises(type(stop)):
            checkpoint.atomic_torch_save({"w": torch.zeros(100_000)}, tmp_path / "c.pt")
        assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # the handler run as write() is entered, before its try (a review's probe: 1 in 20 SIGTERMs
    # to mars-ship still ended in the RuntimeError)
    real = checkpoint._Writes.write
    calls = []

    def entered(self: Any, data: Any) -> int:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, data)

    monkeypatch.setattr(checkpoint._Writes, "write", entered)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_torch_save({"w": torch.zeros(100_000)}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []
    # the writer finishing the file in its destructor, after the stop closed it: a ValueError
    # thrown from a C++ destructor aborted Python (exit 134)
    with open(tmp_path / "closed", "wb") as f:
        writes = checkpoint._Writes(f)
    assert writes.write(b"abc") == 3
    writes.flush()  # no ValueError either


def _bad_input(tmp_path: Path, msl_dir: Path, args: list[str], code: int = 1) -> str:
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["--data", str(msl_dir), "--out", str(out), "--limit", "4",
                                  *QUICK, *args])  # fmt: skip
    assert r.exit_code == code and isinstance(r.exception, SystemExit), r.output
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    assert not out.exists()  # nothing half-written
    return r.output


@pytest.mark.parametrize(
    ("args", "expected", "code"),
    [
        (["--task", "rover"], "--task 'rover': choose one of binary, msl25", 2),
        (["--image-size", "16"], "at least 32 px", 2),
        (["--device", "tpu"], "--device 'tpu'", 2),
        (["--recipe", "fast"], "--recipe 'fast': choose one of default, blog", 2),
        (["--ema-decay", "1"], "--ema-decay 1.0: must be in [0, 1)", 2),
        (["--balance", "oversample"], "--balance 'oversample'", 2),
        (["--lr", "inf"], "--lr inf: must be a positive number", 2),
        (["--cutmix", "nan"], "--cutmix nan", 2),
        # these went on to train: a traceback after decoding (label smoothing 1.5, warm-up
        # nan), or a run that finished with NaN or growing weights (weight decay nan or -1)
        (["--weight-decay", "nan"], "--weight-decay nan: must be a number >= 0", 2),
        (["--weight-decay", "-1"], "--weight-decay -1.0: must be a number >= 0", 2),
        (["--warmup-epochs", "nan"], "--warmup-epochs nan: must be a number >= 0", 2),
        (["--warmup-epochs", "-2"], "--warmup-epochs -2.0: must be a number >= 0", 2),
        (["--label-smoothing", "1.5"], "--label-smoothing 1.5: must be in [0, 1)", 2),
        (["--label-smoothing", "1"], "--label-smoothing 1.0: must be in [0, 1)", 2),
        (["--amp", "fp16"], "--amp 'fp16': choose auto, bf16, off", 2),
        (["--resume"], "resume.pt does not exist", 1),
        # trained to the end, then numpy's bootstrap refused the seed: no metrics.json
        (["--seed", "-1"], "--seed -1: must be in [0, 2^63)", 2),
        (["--seed", str(2**64)], f"--seed {2**64}: must be in [0, 2^63)", 2),  # torch's traceback
        (["--limit", "1"], "--limit 1: need at least 2 (BatchNorm", 2),  # a traceback at 32 px
        (["--init", "/nonexistent/w.pth"], "no such weights file", 1),
    ],
)
def test_bad_flags(
    tmp_path: Path, msl_dir: Path, args: list[str], expected: str, code: int
) -> None:
    """A bad value of a flag is a usage error, exit 2 as click's own checks give (it was 1, a
    failure's code); a file that is not there is exit 1."""
    assert expected in _bad_input(tmp_path, msl_dir, args, code)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(tmp_path: Path, msl_dir: Path) -> None:
    assert "no CUDA GPU" in _bad_input(tmp_path, msl_dir, ["--device", "cuda"])


def test_unwritable_out_dir(tmp_path: Path, msl_dir: Path) -> None:
    (tmp_path / "afile").write_text("x")
    r = _cli(["--data", str(msl_dir), "--out", str(tmp_path / "afile" / "run"), *QUICK])
    _one_line_error(r, "not a folder")
    _one_line_error(_cli(["--data", str(msl_dir), "--out", str(tmp_path / "afile"), *QUICK]),
                    "is a file, not a folder")  # fmt: skip
    # a folder it may not write into (/proc refuses even root, who writes anywhere else)
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    unwritable = ro if os.geteuid() != 0 else Path("/proc")
    _one_line_error(_cli(["--data", str(msl_dir), "--out", str(unwritable / "run"), *QUICK]),
                    "cannot write")  # fmt: skip


def test_split_files_that_do_not_match_the_images(tmp_path: Path, msl_dir: Path) -> None:
    from test_data import mini_data  # tests/ is on sys.path (pytest's prepend import mode)

    d = mini_data(msl_dir, tmp_path / "msl", per_split=3)
    gone = (d / msl.SPLIT_FILES["test"]).read_text().split()[0]
    (d / gone).unlink()
    r = _cli(["--data", str(d), "--out", str(tmp_path / "run"), *QUICK])
    _one_line_error(r, Path(gone).name, "missing")
    assert not (tmp_path / "run").exists()
    # a train image listed as a test image too: it would be scored as held out
    test = d / msl.SPLIT_FILES["test"]
    first_train = (d / msl.SPLIT_FILES["train"]).read_text().splitlines()[0]
    test.write_text(test.read_text().replace(gone, first_train.split()[0]))
    r = _cli(["--data", str(d), "--out", str(tmp_path / "run"), *QUICK])
    _one_line_error(r, "listed in both the train and the test split files")
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")
def test_gpu_epoch(msl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    _train(["--data", str(msl_dir), "--epochs", "2", "--limit", "256", "--image-size", "128",
            "--device", "cuda", "--out", str(out)])  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert m["device"] == "cuda" and m["test"]["n"] == 256
    load_checkpoint(out / "checkpoint.pt")


def test_download_needs_a_destination(msl_dir: Path) -> None:
    r = CliRunner().invoke(main, ["--download"], env={"MARS_DATA": ""})
    assert r.exit_code == 1 and r.output == (
        "Error: --download needs --data DIR or $MARS_DATA (where to put the data set)\n"
    )
    # $MARS_DATA is --data's default here too (it was refused): a complete data set is kept
    kept = f"{msl_dir} holds the MSL data set already: nothing downloaded\n"
    r = CliRunner().invoke(main, ["--download"], env={"MARS_DATA": str(msl_dir)})
    assert (r.exit_code, r.stdout, r.stderr) == (0, f"{msl_dir}\n", kept)
    # with `~` as training reads it (it unpacked into ./~/msl, where training did not look)
    home = msl_dir.parent
    r = CliRunner().invoke(main, ["--download"], env={"MARS_DATA": f"~/{msl_dir.name}",
                                                      "HOME": str(home)})  # fmt: skip
    assert (r.exit_code, r.stdout, r.stderr) == (0, f"{msl_dir}\n", kept)


def test_progress_line() -> None:
    import io

    from marsvision.train.progress import Progress

    stream = io.StringIO()  # not a terminal: one line at the end, no carriage returns
    bar = Progress(10, "epoch 1/3", stream=stream)
    bar.update(4, loss=0.5, acc=0.25)
    bar.update(6, loss=0.4)
    bar.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and "\r" not in text
    assert text.startswith("epoch 1/3 [########################] 10/10  loss 0.4000  acc 0.2500")
    assert text.rstrip().endswith("img/s")


def test_sample_weights_weighted_mean() -> None:
    """Equal sample weights give the plain mean loss (same steps, same numbers); weights that
    single out one image per batch give that image's loss alone."""
    from marsvision.runtime.spec import PreprocessSpec
    from marsvision.train.config import AugmentSpec
    from marsvision.train.loop import train_one_epoch

    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])

    def epoch(reduction: str, weights: torch.Tensor | None) -> float:
        torch.manual_seed(0)
        model = create_model(2)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no updates: compare the losses only
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        out = train_one_epoch(
            model, images=images, labels=labels, order=torch.arange(8), optimizer=opt,
            scheduler=sched, loss_fn=torch.nn.CrossEntropyLoss(reduction=reduction),
            batch_size=4, image_size=32, spec=PreprocessSpec.for_input_size(32),
            aug=AugmentSpec(rotate_deg=0.0, jitter=0.0), generator=torch.Generator().manual_seed(1),
            ema=None, desc="t", sample_weights=weights,
        )  # fmt: skip
        return out["loss"]

    plain = epoch("mean", None)
    assert epoch("none", torch.ones(8)) == pytest.approx(plain, rel=1e-6)
    assert epoch("none", torch.full((8,), 3.0)) == pytest.approx(plain, rel=1e-6)
    one_hot = torch.tensor([1.0, 0, 0, 0, 1.0, 0, 0, 0])
    assert epoch("none", one_hot) != pytest.approx(plain, rel=1e-3)


def test_ema_averages_weights_and_batchnorm_statistics() -> None:
    """ModelEma moves every float tensor (weights and BatchNorm's running statistics) toward the
    model by 1 - d, d = min(decay, (1 + step) / (10 + step)); integer buffers are copied."""
    from marsvision.train.model import ModelEma

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = ModelEma(model, decay=0.998)
    for step in (1, 2):
        start = {k: v.clone() for k, v in ema.module.state_dict().items()}
        with torch.no_grad():
            model.get_parameter("0.weight").add_(1.0)
        model.train()(torch.randn(16, 4))  # moves the running statistics, counts a batch
        ema.update(model)
        d = min(0.998, (1 + step) / (10 + step))
        now = model.state_dict()
        for key, value in ema.module.state_dict().items():
            if value.is_floating_point():
                expected = d * start[key] + (1 - d) * now[key]
                assert torch.allclose(value, expected, atol=1e-6), key
                if not torch.equal(start[key], now[key]):  # moved: averaged, not copied
                    assert not torch.allclose(value, now[key]), key
            else:
                assert torch.equal(value, now[key]), key
    assert int(ema.module.get_buffer("1.num_batches_tracked")) == 2


def test_bf16_on_the_cpu_trains_in_bf16_and_reports_fp32(
    run: Path, msl_dir: Path, tmp_path: Path
) -> None:
    """`--amp bf16` on the CPU, end to end (that it computes in bf16 is the test below): the
    card command carries the flag, and the reported test numbers are fp32 ones of the kept
    weights."""
    from marsvision.train.config import command_line

    out = tmp_path / "bf16"
    _train(["--data", str(msl_dir), "--epochs", "2", "--limit", str(LIMIT), "--out", str(out),
            *QUICK, "--amp", "bf16"])  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["amp"] == "bf16" and "--amp bf16" in command_line(cfg)
    assert "--amp" not in command_line(json.loads((run / "config.json").read_text()))
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    # the epoch was chosen on val scores under bf16: the metrics say so, an fp32 run's do not
    assert metrics["selected_on"].endswith("under bf16 autocast (the reported numbers: fp32)")
    assert "bf16" not in json.loads((run / "metrics.json").read_text())["selected_on"]
    assert all(np.isfinite([h["train_loss"], h["val_loss"]]).all() for h in history)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    floats = [t for t in ckpt["state_dict"].values() if t.is_floating_point()]
    assert all(t.dtype == torch.float32 for t in floats)
    samples = msl.read_split(msl_dir, "test", "binary", limit=LIMIT)
    with open(out / "predictions_test.csv", newline="") as f:
        probs = np.array([[float(r["Surface"]), float(r["Rover"])]
                          for r in csv.DictReader(f)])  # fmt: skip
    spec = PreprocessSpec.for_input_size(64)
    with torch.inference_mode():
        logits = model_from_checkpoint(ckpt)(eval_tensors(samples, spec=spec, workers=2))
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), probs, atol=1e-4)


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_is_autocast_in_training_and_selection_only(bf16: bool) -> None:
    """The convolutions see bf16 in training and in the selection pass of a bf16 run, fp32
    otherwise; the weights stay fp32 and the final evaluation (amp=False) is fp32."""
    from marsvision.train.config import AugmentSpec
    from marsvision.train.loop import evaluate, train_one_epoch

    torch.manual_seed(0)
    model = create_model(2)
    seen: list[torch.dtype] = []
    model.get_submodule("conv1").register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_one_epoch(
        model, images=torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8),
        labels=torch.tensor([0, 1, 0, 1]), order=torch.arange(4), optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
        loss_fn=torch.nn.CrossEntropyLoss(), batch_size=4, image_size=32,
        spec=PreprocessSpec.for_input_size(32), aug=AugmentSpec(),
        generator=torch.Generator().manual_seed(1), ema=None, desc="t", bf16=bf16,
    )  # fmt: skip
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    evaluate(model, inputs=x, labels=y, batch_size=4, amp=bf16)
    evaluate(model, inputs=x, labels=y, batch_size=4, amp=False)
    want = torch.bfloat16 if bf16 else torch.float32
    assert seen == [want, want, torch.float32]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_crop_scale_min_flag_round_trip() -> None:
    from marsvision.train.config import command_line

    cfg = config_from_flags("default", data=Path("d"), out=Path("o"), crop_scale_min=0.08)
    assert cfg.augment.scale == (0.08, 1.0)
    assert "--crop-scale-min 0.08" in command_line(cfg.to_dict())
    assert "--crop-scale-min" not in command_line(
        config_from_flags("default", data=Path("d"), out=Path("o")).to_dict()
    )
    with pytest.raises(MarsvisionError, match="crop-scale-min"):
        config_from_flags("default", data=Path("d"), out=Path("o"), crop_scale_min=1.5)


def test_jitter_flag_round_trip() -> None:
    from marsvision.train.config import command_line

    cfg = config_from_flags("default", data=Path("d"), out=Path("o"), jitter=0.4)
    assert cfg.augment.jitter == 0.4 and cfg.augment.scale == (0.35, 1.0)
    assert "--jitter 0.4" in command_line(cfg.to_dict())
    assert "--jitter" not in command_line(
        config_from_flags("default", data=Path("d"), out=Path("o")).to_dict()
    )
    # blog has no jitter: setting it is a flag there too, and 0 on default is one as well
    assert "--jitter 0.3" in command_line(
        config_from_flags("blog", data=Path("d"), out=Path("o"), jitter=0.3).to_dict()
    )
    assert "--jitter 0.0" in command_line(
        config_from_flags("default", data=Path("d"), out=Path("o"), jitter=0.0).to_dict()
    )
    with pytest.raises(MarsvisionError, match="jitter"):
        config_from_flags("default", data=Path("d"), out=Path("o"), jitter=1.0)


def test_grayscale_flag_round_trip() -> None:
    from marsvision.train.config import command_line

    cfg = config_from_flags("default", data=Path("d"), out=Path("o"), grayscale=0.3)
    assert cfg.augment.grayscale == 0.3 and cfg.augment.jitter == 0.2
    assert "--grayscale 0.3" in command_line(cfg.to_dict())
    plain = config_from_flags("default", data=Path("d"), out=Path("o")).to_dict()
    assert "--grayscale" not in command_line(plain)
    with pytest.raises(MarsvisionError, match="grayscale"):
        config_from_flags("default", data=Path("d"), out=Path("o"), grayscale=1.5)


def test_store_size(msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--store-size: the training images are decoded at that size (not the eval resize size),
    the config, card command and --resume know it; below --image-size it is refused."""
    from marsvision.train import loop
    from marsvision.train.config import command_line

    shapes: list[tuple[int, ...]] = []
    real_store = loop.train_store

    def spy_store(samples: list[msl.Sample], **kw: Any) -> torch.Tensor:
        store = real_store(samples, **kw)
        shapes.append(tuple(store.shape))
        return store

    monkeypatch.setattr(loop, "train_store", spy_store)
    out = tmp_path / "s"
    args = ["--data", str(msl_dir), "--limit", "8", "--out", str(out), *QUICK]
    _train([*args, "--epochs", "1", "--store-size", "96"])
    assert shapes == [(8, 3, 96, 96)]  # 64 px input: the eval resize size would be 73
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["store_size"] == 96 and "--store-size 96" in command_line(cfg)
    r = CliRunner().invoke(main, [*args, "--epochs", "1", "--store-size", "128", "--resume"])
    assert r.exit_code == 1 and "--resume: store_size was 96" in r.output
    plain = config_from_flags("default", data=Path("d"), out=Path("o")).to_dict()
    assert plain["store_size"] is None and "--store-size" not in command_line(plain)
    with pytest.raises(MarsvisionError, match="--store-size 100: must be at least --image-size"):
        config_from_flags("default", data=Path("d"), out=Path("o"), image_size=128, store_size=100)


def test_the_epoch_is_chosen_on_val_balanced_accuracy(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not on plain accuracy (val is 61% Rover): the epochs' val metrics are set so that the
    two choose differently."""
    from marsvision.train import loop

    real = loop._split_metrics
    calls: list[dict[str, Any]] = []
    said = [(0.95, 0.60), (0.50, 0.90), (0.60, 0.70)]  # (accuracy, balanced) of epochs 1-3

    def split_metrics(*args: Any) -> dict[str, Any]:
        m = real(*args)
        if len(calls) < len(said):
            m["accuracy"], m["balanced_accuracy"] = said[len(calls)]
        calls.append(m)
        return m

    monkeypatch.setattr(loop, "_split_metrics", split_metrics)
    cfg = config_from_flags("default", data=msl_dir, out=tmp_path / "run", epochs=3, limit=16,
                            image_size=64, device="cpu", batch_size=8, workers=2,
                            select_from=0.0)  # fmt: skip
    result = loop.main(cfg)
    assert result["best_epoch"] == 2
    assert [e["val_balanced_accuracy"] for e in result["history"]] == [0.60, 0.90, 0.70]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 2


def test_a_last_batch_of_one_image_is_dropped() -> None:
    """BatchNorm in training mode cannot take a batch of one (`--limit 17 -b 8` crashed)."""
    from marsvision.train.loop import _batches

    assert _batches(17, 8) == [(0, 8), (8, 16)]
    assert _batches(18, 8) == [(0, 8), (8, 16), (16, 18)]
    assert _batches(16, 8) == [(0, 8), (8, 16)]
    assert _batches(1, 8) == [(0, 1)]  # a lone image is all there is: left to BatchNorm to say


def test_selection_window(msl_dir: Path, tmp_path: Path) -> None:
    """--select-from 1: only the last epoch is eligible, whatever val says of earlier ones."""
    from marsvision.train.loop import main as train

    cfg = config_from_flags("default", data=msl_dir, out=tmp_path / "run", epochs=3, limit=16,
                            image_size=64, device="cpu", batch_size=8, workers=2,
                            select_from=1.0)  # fmt: skip
    result = train(cfg)
    assert result["best_epoch"] == 3 and "over epoch 3 (" in result["selected_on"]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 3
    with pytest.raises(MarsvisionError, match="select-from"):
        config_from_flags("default", data=msl_dir, out=tmp_path / "x", select_from=1.5)


def test_train_on_train_and_val(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--train-on train+val: the weights learn from train's and val's images (in that order),
    the loss weights count both, val is not scored per epoch, the last epoch is kept, and the
    flag reaches the card command and the card."""
    from marsvision.train import loop
    from marsvision.train.config import command_line
    from marsvision.train.ship import ship_run

    stored: list[list[msl.Sample]] = []
    weighed: list[list[msl.Sample]] = []
    real_store, real_objective = loop.train_store, loop.objective_from_config

    def spy_store(samples: list[msl.Sample], **kw: Any) -> torch.Tensor:
        stored.append(list(samples))
        return real_store(samples, **kw)

    def spy_objective(cfg: Any, *, train: list[msl.Sample], **kw: Any) -> Any:
        weighed.append(list(train))
        return real_objective(cfg, train=train, **kw)

    monkeypatch.setattr(loop, "train_store", spy_store)
    monkeypatch.setattr(loop, "objective_from_config", spy_objective)
    out = tmp_path / "refit"
    _train(["--data", str(msl_dir), "--epochs", "2", "--limit", "8", "--out", str(out), *QUICK,
            "--train-on", "train+val"])  # fmt: skip
    both = [*msl.read_split(msl_dir, "train", "binary", 8),
            *msl.read_split(msl_dir, "val", "binary", 8)]  # fmt: skip
    assert stored == [both] and weighed == [both]
    m = json.loads((out / "metrics.json").read_text())
    assert m["best_epoch"] == 2 and m["trained_on"] == "train+val"
    assert "last epoch" in m["selected_on"]
    assert [sorted(h) for h in m["history"]] == [
        ["epoch", "lr", "seconds", "train_accuracy", "train_images_per_s", "train_loss"]
    ] * 2
    assert m["val"]["n"] == 8 and m["test"]["n"] == 8  # both still scored, once, at the end
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["select_from"] == 1.0
    assert "--select-from 1.0" in command_line(cfg) and "--train-on train+val" in command_line(cfg)
    # the command line it prints parses back to the same config
    again = config_from_flags("default", data=msl_dir, out=out, epochs=2, limit=8, image_size=64,
                              device="cpu", batch_size=8, workers=2, select_from=1.0,
                              train_on="train+val")  # fmt: skip
    assert json.loads(json.dumps(again.to_dict())) == cfg
    models = tmp_path / "models"
    ship_run(out, models_dir=models, data_dir=msl_dir, device="cpu", workers=2, limit=8)
    card = (models / "resnet50-binary.md").read_text()
    assert "train and val splits together" in card and "epoch 2 of 2 the last" in card
    assert "Test-time augmentation, decided on val" not in card
    with pytest.raises(MarsvisionError, match="trained on val too"):
        ship_run(out, models_dir=tmp_path / "m2", data_dir=msl_dir, device="cpu", workers=2,
                 limit=8, threshold_on_val=True)  # fmt: skip


def test_train_on_train_and_half_of_val(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--train-on train+half-val: the weights learn from train and val's first half by sol, the
    epoch is selected on the second half, which is the val the run, its shipped scores and the
    card report; the flag reaches the card command."""
    from marsvision.train import loop
    from marsvision.train.config import command_line
    from marsvision.train.ship import ship_run

    stored: list[list[msl.Sample]] = []
    real_store = loop.train_store

    def spy_store(samples: list[msl.Sample], **kw: Any) -> torch.Tensor:
        stored.append(list(samples))
        return real_store(samples, **kw)

    monkeypatch.setattr(loop, "train_store", spy_store)
    out = tmp_path / "half"
    _train(["--data", str(msl_dir), "--epochs", "2", "--limit", "8", "--out", str(out), *QUICK,
            "--train-on", "train+half-val"])  # fmt: skip
    first, second = msl.halve_by_sol(msl.read_split(msl_dir, "val", "binary", 8))
    assert first and second
    assert stored == [[*msl.read_split(msl_dir, "train", "binary", 8), *first]]
    m = json.loads((out / "metrics.json").read_text())
    assert m["trained_on"] == "train+half-val" and m["val"]["n"] == len(second)
    assert m["selected_on"].startswith("the held-out half of val balanced_accuracy over epochs 1-2")
    assert all("val_balanced_accuracy" in h for h in m["history"])  # selected on, every epoch
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["select_from"] == 0.5 and "--train-on train+half-val" in command_line(cfg)
    models = tmp_path / "models"
    # the held-out half is not training data: it may choose a decision threshold
    ship_run(out, models_dir=models, data_dir=msl_dir, device="cpu", workers=2, limit=8,
             threshold_on_val=True)  # fmt: skip
    shipped = load_checkpoint(models / "resnet50-binary.pt")
    assert shipped["metrics"]["val"]["n"] == len(second)
    card = (models / "resnet50-binary.md").read_text()
    assert "the first half of val by sol" in card and "selected on the held-out half of val" in card
    assert f"| val: second half (held out, selects) | {836:,} |" in card  # counted on all of val
    assert f"| val, held-out half | {len(second)} |" in card  # the scores: on the run's images
    # the run halved its first 8 val images: the command says so (else its held half would hold
    # images it trained on)
    assert (
        "mars-bench score preds.csv --data ../shared/msl --split val --val-half held "
        "--train-limit 8   # val" in card
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"train_on": "val"}, "--train-on 'val'"),
     ({"train_on": "train+val", "select_from": 0.5}, "--select-from 0.5: with --train-on")],
)  # fmt: skip
def test_train_on_refuses(msl_dir: Path, tmp_path: Path, flags: dict[str, Any],
                          expected: str) -> None:  # fmt: skip
    with pytest.raises(MarsvisionError, match=expected.replace("+", r"\+")):
        config_from_flags("default", data=msl_dir, out=tmp_path / "x", **flags)


@pytest.mark.parametrize(("every_s", "saved_after"), [(0.0, [1, 2, 3]), (1e9, [3])])
def test_resume_saves_by_time(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every_s: float,
    saved_after: list[int],
) -> None:  # fmt: skip
    """resume.pt is written after the last epoch, and after any epoch that ends at least
    RESUME_EVERY_S after the previous save."""
    from marsvision.train import loop

    saves: list[int] = []
    real_save = loop.save_resume

    def spy(out: Path, parts: Any, *, epoch: int, **kw: Any) -> None:
        saves.append(epoch)
        real_save(out, parts, epoch=epoch, **kw)

    monkeypatch.setattr(loop, "save_resume", spy)
    monkeypatch.setattr(loop, "RESUME_EVERY_S", every_s)
    cfg = config_from_flags("default", data=msl_dir, out=tmp_path / "run", epochs=3, limit=8,
                            image_size=64, device="cpu", batch_size=4, workers=2)  # fmt: skip
    loop.main(cfg)
    assert saves == saved_after


def test_init_from_a_file_that_is_not_weights_is_one_line(tmp_path: Path, msl_dir: Path) -> None:
    """torch's refusal was the message: many lines, one of them advising weights_only=False,
    which would run the code a pickle holds."""
    preds = tmp_path / "preds.csv"
    preds.write_text("path,status\na.jpg,ok\n")
    said = _bad_input(tmp_path, msl_dir, ["--init", str(preds)])
    assert said.startswith(f"Error: --init {preds}: not a torch weights file (torch cannot read")
    assert "weights_only" not in said


def test_predictions_csv_paths_that_start_as_a_formula(tmp_path: Path) -> None:
    """predictions_test.csv wrote a split file's path as it stands: one starting `=` (a split
    file edited by hand, an image so named) was a formula a spreadsheet runs, as in
    mars-infer's CSV before."""
    import csv as csv_module

    import numpy as np

    from marsvision.train.data import Sample
    from marsvision.train.report import write_predictions

    samples = [Sample(tmp_path / "=cmd.JPG", 0, 8), Sample(tmp_path / "cal" / "a.JPG", 1, 4)]
    out = tmp_path / "p.csv"
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    write_predictions(out, samples=samples, data_dir=tmp_path, probs=probs,
                      class_names=["Surface", "Rover"])  # fmt: skip
    with open(out, newline="") as f:
        assert [row[0] for row in csv_module.reader(f)] == ["path", "./=cmd.JPG", "cal/a.JPG"]


def test_the_checkpoint_keeps_what_the_run_had(msl_dir: Path, tmp_path: Path) -> None:
    """The class names stay in label order (index i names output i: sorted, binary's would be
    swapped), with the task, epoch, preprocessing, config and the weights as fp32 copies."""
    names = msl.class_names("binary", msl_dir)
    assert names == ["Surface", "Rover"]  # label order, not alphabetical
    torch.manual_seed(0)
    model = create_model(2)
    spec = PreprocessSpec.for_input_size(64)
    ckpt = make_checkpoint(model, task="binary", class_names=names, preprocess=spec,
                           config={"epochs": 3}, metrics={"val": {"accuracy": 0.5}},
                           data_fingerprint="f", epoch=2)  # fmt: skip
    atomic_torch_save(ckpt, tmp_path / "checkpoint.pt")
    back = load_checkpoint(tmp_path / "checkpoint.pt")
    assert back["class_names"] == ["Surface", "Rover"]
    assert (back["task"], back["epoch"], back["config"]) == ("binary", 2, {"epochs": 3})
    assert back["weights_dtype"] == "float32" and preprocess_from_checkpoint(back) == spec
    loaded = model_from_checkpoint(back)
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_stays_within_its_width() -> None:
    """An epoch of no batches draws an empty bar (no ZeroDivisionError), and a count past the
    total fills the bar, never longer than its width."""
    stream = io.StringIO()
    empty = Progress(0, "epoch 1/1", stream=stream, width=10)
    assert empty.line().startswith("epoch 1/1 [..........] 0/1")
    over = Progress(4, "epoch 1/1", stream=stream, width=10)
    over.update(6)
    assert over.line().startswith("epoch 1/1 [##########] 6/4")


def test_progress_redraws_a_terminal_at_most_every_tenth_of_a_second() -> None:
    """On a terminal the line is redrawn in place, but not on every batch: a burst of updates
    is one redraw, then the closing line."""
    stream = _Terminal()
    bar = Progress(1000, "epoch 1/1", stream=stream)
    for _ in range(1000):
        bar.update(1, loss=0.5)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") <= 3 and text.endswith("img/s\n")
    assert "1000/1000" in text.rsplit("\r", 1)[1]


def _weights(num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return create_model(num_classes).state_dict()


def test_init_keeps_a_head_of_the_tasks_size(tmp_path: Path) -> None:
    """A weights file whose classifier head has `num_classes` outputs (a run's own weights) is
    loaded whole, head included; only a head of another size is left at its initialization."""
    source = _weights(2, seed=1)
    torch.save(source, tmp_path / "w.pth")
    torch.manual_seed(2)
    model = create_model(2, init=str(tmp_path / "w.pth"))
    for key in ("fc.weight", "fc.bias", "conv1.weight"):
        assert torch.equal(model.state_dict()[key], source[key]), key


@pytest.mark.parametrize(
    "layout",
    ["state_dict", "model", "module."],
)
def test_init_reads_wrapped_and_data_parallel_weights(tmp_path: Path, layout: str) -> None:
    """A state dict held under "state_dict" or "model" (a training checkpoint), or with the
    "module." prefix nn.DataParallel gives its keys, loads as the plain one does."""
    source = _weights(2, seed=3)
    saved: dict[str, Any]
    if layout == "module.":
        saved = {f"module.{k}": v for k, v in source.items()}
    else:
        saved = {layout: source, "epoch": 4}
    torch.save(saved, tmp_path / "w.pth")
    model = create_model(2, init=str(tmp_path / "w.pth"))
    for key in ("conv1.weight", "layer4.2.bn3.running_var", "fc.weight"):
        assert torch.equal(model.state_dict()[key], source[key]), key


def test_init_refuses_weights_that_leave_the_body_random_or_have_keys_to_spare(
    tmp_path: Path,
) -> None:
    """A file that names only part of ResNet-50's body (the rest would stay random), or holds
    keys ResNet-50 has not (another network's, another layout's), is refused: loading what
    matched and training on would be a silently random start."""
    source = _weights(2, seed=4)
    head_only = {k: v for k, v in source.items() if k.startswith("fc.")}
    torch.save(head_only, tmp_path / "head.pth")
    with pytest.raises(MarsvisionError, match="not ResNet-50 weights .* missing"):
        create_model(2, init=str(tmp_path / "head.pth"))
    torch.save({**source, "adapter.weight": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(MarsvisionError, match="1 unexpected keys"):
        create_model(2, init=str(tmp_path / "extra.pth"))


class _Opens:
    """Unpickles as a call of open(): the kind of code a pickle can run when loaded in full."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (os.fspath(self.path), "w"))


def test_init_never_runs_code_a_weights_file_holds(tmp_path: Path) -> None:
    """The weights file is read as weights only: a pickle that would call a function (here one
    that makes a file) is refused as no weights file, and the call is not made."""
    marker = tmp_path / "ran"
    torch.save({**_weights(2, seed=5), "hook": _Opens(marker)}, tmp_path / "w.pth")
    with pytest.raises(MarsvisionError, match="not a torch weights file"):
        create_model(2, init=str(tmp_path / "w.pth"))
    assert not marker.exists()


def _config(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> TrainConfig:
    """The TrainConfig that `mars-train *args` starts its training loop with."""
    from marsvision.train import loop

    cfg: TrainConfig = config_started_with(monkeypatch, main, loop, "main", args)
    return cfg


def test_every_flag_reaches_the_run_config(
    monkeypatch: pytest.MonkeyPatch, msl_dir: Path, tmp_path: Path
) -> None:
    """Each training flag, given a value its recipe does not have, is the run's value: none is
    dropped on the way (its default would train silently in its place)."""
    args = ["--data", str(msl_dir), "--out", str(tmp_path / "run"), "--task", "msl25",
            "--recipe", "blog", "--epochs", "7", "--batch-size", "6", "--lr", "0.02",
            "--weight-decay", "0.01", "--warmup-epochs", "1", "--label-smoothing", "0.05",
            "--balance", "group", "--ema-decay", "0.9", "--crop-scale-min", "0.5",
            "--jitter", "0.3", "--grayscale", "0.25", "--augment-policy", "trivial",
            "--mixup", "0.4", "--cutmix", "0.3", "--camera-adversary", "0.6",
            "--select-from", "0.25", "--image-size", "64", "--store-size", "80",
            "--device", "cpu", "--amp", "off", "--train-on", "train+half-val", "--seed", "5",
            "--limit", "9", "--workers", "3"]  # fmt: skip
    cfg = _config(monkeypatch, args)
    got = {k: getattr(cfg, k) for k in (
        "task", "recipe", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
        "label_smoothing", "balance", "ema_decay", "mixup", "cutmix", "camera_adversary",
        "select_from", "image_size", "store_size", "device", "amp", "train_on", "seed", "limit",
        "workers")}  # fmt: skip
    assert got == {
        "task": "msl25", "recipe": "blog", "epochs": 7, "batch_size": 6, "lr": 0.02,
        "weight_decay": 0.01, "warmup_epochs": 1.0, "label_smoothing": 0.05, "balance": "group",
        "ema_decay": 0.9, "mixup": 0.4, "cutmix": 0.3, "camera_adversary": 0.6,
        "select_from": 0.25, "image_size": 64, "store_size": 80, "device": "cpu", "amp": "off",
        "train_on": "train+half-val", "seed": 5, "limit": 9, "workers": 3,
    }  # fmt: skip
    aug = cfg.augment
    assert (aug.scale[0], aug.jitter, aug.grayscale, aug.policy) == (0.5, 0.3, 0.25, "trivial")
    assert cfg.out == tmp_path / "run" and cfg.data == msl_dir


def test_the_run_folder_defaults_to_runs_of_the_task(
    monkeypatch: pytest.MonkeyPatch, msl_dir: Path, tmp_path: Path
) -> None:
    """Without --out, a run goes to runs/<task>, relative to the working folder."""
    monkeypatch.chdir(tmp_path)
    args = ["--data", str(msl_dir), "--task", "msl25", "--device", "cpu"]
    assert _config(monkeypatch, args).out == Path("runs") / "msl25"


def test_openmp_threads_wait_passively() -> None:
    """mars-train sets OMP_WAIT_POLICY=PASSIVE before torch loads (torch's OpenMP threads spun
    while waiting, and made training steps 10-20x slower on a shared 2-vCPU machine); a user's
    own setting is kept."""
    code = "import os, marsvision.train.cli; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.stdout.strip() == "PASSIVE", r.stderr
    r = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                       capture_output=True, text=True)  # fmt: skip
    assert r.stdout.strip() == "ACTIVE", r.stderr
