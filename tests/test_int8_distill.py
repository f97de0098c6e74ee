"""Quantization-aware self-distillation: fake quantization, its removal, the CLI on a tiny run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import signal_once_written
from torch import nn
from torch.nn.utils import parametrize

from marsvision.runtime.errors import MarsvisionError
from marsvision.train.int8_distill import (
    activation_bounds,
    attach_fake_quant,
    detach_fake_quant,
    distill_file,
    fake_quant,
    main,
)


def test_fake_quant_rounds_to_the_grid_and_passes_the_gradient() -> None:
    x = torch.tensor([-3.0, -0.26, 0.0, 0.26, 1.0, 3.0], requires_grad=True)
    q = fake_quant(x, 1.27, signed=True)  # step 0.01, [-1.28, 1.27]
    assert q.detach().tolist() == pytest.approx([-1.28, -0.26, 0.0, 0.26, 1.0, 1.27])
    u = fake_quant(x, 2.55, signed=False)  # step 0.01, [0, 2.55]
    assert u.detach().tolist() == pytest.approx([0.0, 0.0, 0.0, 0.26, 1.0, 2.55])
    q.sum().backward()
    assert x.grad is not None and x.grad.tolist() == [1.0] * 6  # straight through


def _tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    return net.eval()


def test_fake_quant_attaches_and_detaches_without_a_trace() -> None:
    net = _tiny_net()
    x = torch.randn(4, 3, 8, 8)
    before = net(x).detach()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    bounds = activation_bounds(net, [x])
    assert set(bounds) == {"0", "1", "3"}  # conv inputs and the BatchNorm output
    handles = attach_fake_quant(net, bounds, signed=True)
    quantized = net(x).detach()
    assert not torch.equal(quantized, before)
    assert (quantized - before).abs().max() < 0.2 * before.abs().max()  # close, not equal
    assert parametrize.is_parametrized(net[0], "weight")
    detach_fake_quant(net, handles)
    assert not parametrize.is_parametrized(net[0], "weight")
    assert torch.equal(net(x), before)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


@pytest.fixture(scope="module")
def run_checkpoint(msl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished mars-train run's checkpoint: one epoch on a few images at 64 px."""
    from marsvision.train.cli import main as train_main

    out = tmp_path_factory.mktemp("distillrun") / "run"
    args = ["--data", str(msl_dir), "--epochs", "1", "--limit", "16", "--out", str(out),
            "--image-size", "64", "--device", "cpu", "--batch-size", "8",
            "--workers", "2"]  # fmt: skip
    result = CliRunner().invoke(train_main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out / "checkpoint.pt"


def test_cli_distills_a_run_and_keeps_what_ship_needs(
    run_checkpoint: Path, msl_dir: Path, tmp_path: Path
) -> None:
    from marsvision.train.checkpoint import load_checkpoint

    out = tmp_path / "distilled.pt"
    args = [str(run_checkpoint), "--out", str(out), "--data", str(msl_dir), "--limit", "16",
            "--batch-size", "8", "--lr", "1e-3", "--workers", "2"]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "val: accuracy" in result.output and "test: accuracy" in result.output
    src, new = load_checkpoint(run_checkpoint), load_checkpoint(out)
    assert set(new["state_dict"]) == set(src["state_dict"])
    old = {k: v.float() for k, v in src["state_dict"].items()}
    changed = [k for k, v in new["state_dict"].items() if not torch.equal(v.float(), old[k])]
    assert changed and all("bn" not in k and "downsample.1" not in k for k in changed)
    assert new["weights_dtype"] == "float32" and "shipped" not in new
    assert new["metrics"]["val"]["n"] == 16 and new["metrics"]["test"]["n"] == 16
    assert new["distill"]["flavour"] == "trt" and new["distill"]["epochs"] == 1
    assert new["distill"]["source_metrics"]["val"] == src["metrics"]["val"]
    assert "(source " in result.output
    # make ship takes it as it takes a run's checkpoint
    from marsvision.train.ship import ship_run

    shipped = ship_run(out, models_dir=tmp_path / "models", data_dir=msl_dir, device="cpu",
                       workers=2, limit=16)  # fmt: skip
    assert load_checkpoint(shipped.checkpoint)["distill"]["lr"] == pytest.approx(1e-3)
    # where the source trained (its run folder's metrics.json) and where it was distilled
    d = new["distill"]
    assert d["source_train_device"] == "cpu" and d["source_train_seconds"] > 0
    assert d["device"].startswith("cpu (") and 0 < d["seconds"] and d["versions"]["torch"]
    card = shipped.card.read_text()
    trained = next(line for line in card.splitlines() if line.startswith("| trained |"))
    assert "(cpu, " in trained and "not recorded" not in trained
    row = next(line for line in card.splitlines() if line.startswith("| distilled for INT8 |"))
    assert (
        d["date"] in row
        and "1 epoch, batch 8, at most 16 images per split, TensorRT's int8 grid, lr 0.001" in row
    )
    assert d["source_checkpoint_sha256"] in row
    assert "then distilled for INT8" in card and "the run before the distillation" in card


@pytest.mark.parametrize(("command", "sig", "code"), [("distill", signal.SIGTERM, 143),
                                                      ("ship", signal.SIGINT, 130)])  # fmt: skip
def test_a_stopped_distillation_or_ship_leaves_no_temporary_file(
    command: str, sig: signal.Signals, code: int, run_checkpoint: Path, msl_dir: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """SIGTERM left the half-written checkpoint (a hidden .tmp of ~94 MB; for ship inside
    models/), and Ctrl-C exited 1 with click's "Aborted!"."""
    if command == "distill":
        args = ["marsvision.train.int8_distill", str(run_checkpoint), "--out",
                str(tmp_path / "d.pt"), "--batch-size", "8", "--workers", "2"]  # fmt: skip
    else:
        args = ["marsvision.train.ship", str(run_checkpoint), "--models", str(tmp_path),
                "--device", "cpu", "--workers", "2"]  # fmt: skip
    args += ["--data", str(msl_dir), "--limit", "16"]
    returncode, err = signal_once_written(args, tmp_path, ".*.tmp", sig)
    assert returncode == code, err
    assert "Traceback" not in err and "Aborted!" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == []


def test_distilling_a_shipped_model_keeps_where_it_trained(
    run_checkpoint: Path, msl_dir: Path, tmp_path: Path
) -> None:
    """A shipped model has no run folder: its card's fields say where it was trained."""
    from marsvision.train.checkpoint import load_checkpoint
    from marsvision.train.ship import ship_run, source_training

    shipped = load_checkpoint(
        ship_run(
            run_checkpoint,
            models_dir=tmp_path / "models",
            data_dir=msl_dir,
            device="cpu",
            workers=2,
            limit=16,
        ).checkpoint
    )
    alone = tmp_path / "elsewhere" / "model.pt"  # no metrics.json beside it
    assert source_training(shipped, alone) == (
        "cpu", pytest.approx(shipped["shipped"]["train_seconds"]))  # fmt: skip
    again = {**shipped, "shipped": {}, "distill": {"source_train_device": "cuda",
                                                  "source_train_seconds": 71.0}}  # fmt: skip
    assert source_training(again, alone) == ("cuda", 71.0)
    assert source_training({"metrics": {}}, alone) == (None, None)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--lr", "nan"], "--lr nan: must be a positive number"),  # a traceback after decoding
        (["--lr", "inf"], "--lr inf: must be a positive number"),  # wrote a NaN checkpoint
        (["--lr", "0"], "--lr 0.0: must be a positive number"),
        (["--limit", "0"], "0 is not in the range x>=1"),  # ran on one image, then failed
        (["--workers", "-1"], "-1 is not in the range x>=0"),
        (["--seed", str(2**64)], f"--seed {2**64}: must be in [0, 2^63)"),  # a traceback
        (["--device", "gpu"], "'gpu' is not one of 'auto', 'cpu', 'cuda'"),  # after decoding
    ],
)
def test_bad_flags_are_refused_before_the_checkpoint_is_read(
    flags: list[str], says: str, msl_dir: Path, tmp_path: Path
) -> None:
    junk = tmp_path / "checkpoint.pt"
    junk.write_bytes(b"not a checkpoint")
    args = [str(junk), "--out", str(tmp_path / "d.pt"), "--data", str(msl_dir), *flags]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and says in result.output, result.output
    assert not (tmp_path / "d.pt").exists()


def test_an_unfinished_run_is_refused(tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path) -> None:
    """A run with no test metrics yet (killed, or still training): distilled before, its
    checkpoint then failed `make ship` with a traceback, after the card's scoring, leaving a
    shipped file without card or SHA256SUMS line."""
    with pytest.raises(MarsvisionError, match="unfinished run"):
        distill_file(tiny_checkpoint, tmp_path / "d.pt", data_dir=msl_dir, limit=16)
    assert not (tmp_path / "d.pt").exists()


def test_distillation_calibrates_on_as_many_images_as_the_export() -> None:
    """Its observers see mars-export's default number of calibration images (train may not
    import export, so the number is written twice: this holds them together)."""
    import inspect

    from marsvision.export.config import ExportConfig
    from marsvision.train.int8_distill import distill

    assert inspect.signature(distill).parameters["calib_images"].default == (
        ExportConfig.calib_images
    )


def test_the_distilled_checkpoint_scores_its_own_weights(
    tiny_checkpoint: Path, msl_dir: Path
) -> None:
    """The distilled checkpoint's metrics (which go on the card) are its own weights', and a
    decision threshold chosen for the source weights is dropped; the source's metrics, or its
    threshold riding on other weights, passed the suite (a mutation audit)."""
    from marsvision.train.checkpoint import load_checkpoint
    from marsvision.train.int8_distill import _distilled_checkpoint
    from marsvision.train.ship import score_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["metrics"] = {"val": None, "test": None}
    ckpt["decision_threshold"] = 0.9
    state = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    state["fc.weight"], state["fc.bias"] = state["fc.weight"].flip(0), state["fc.bias"].flip(0)
    out = _distilled_checkpoint(ckpt, state, data_dir=msl_dir, settings={}, source_sha256="s",
                                source_path=tiny_checkpoint, seconds=1.0, workers=1,
                                limit=16)  # fmt: skip
    assert "decision_threshold" not in out
    own, source = (
        score_checkpoint(
            {**ckpt, "state_dict": s, "decision_threshold": None},
            data_dir=msl_dir,
            device="cpu",
            workers=1,
            limit=16,
        )  # fmt: skip
        for s in (state, ckpt["state_dict"])
    )
    assert own["val"]["metrics"] != source["val"]["metrics"]  # the two can be told apart
    assert out["metrics"]["val"] == own["val"]["metrics"]
    assert torch.equal(out["state_dict"]["fc.weight"], state["fc.weight"])


def test_flavour_trt_distills_on_the_signed_grid(
    tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--flavour trt trains on TensorRT's signed int8 grid, cpu on the x86 file's uint8 one (the
    comparison turned over passed the suite, and the card said "TensorRT's int8 grid")."""
    from marsvision.train import int8_distill, ship

    seen: dict[str, object] = {}

    class Stop(Exception):
        """Raised in place of the distillation: its arguments are all this test needs."""

    def distill(ckpt: object, **kw: object) -> None:
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(ship, "check_finished", lambda *a: None)
    monkeypatch.setattr(int8_distill, "distill", distill)
    for flavour, signed in (("trt", True), ("cpu", False)):
        with pytest.raises(Stop):
            distill_file(tiny_checkpoint, tmp_path / "d.pt", data_dir=msl_dir, flavour=flavour)
        assert seen["signed"] is signed, flavour
