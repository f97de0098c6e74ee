"""The sweep's bookkeeping (train/sweep.py) with training, distillation and shipping faked and
a fake clock: what each run is given, which time estimates decide a skip, and what is ranked
after a --distill that failed part way. Cases the mutation audit found unchecked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from marsvision.train.sweep import DISTILL_RESERVE_S, RESERVE_S, epoch_pace, run_sweep

SETTINGS = {"image_size": 64, "limit": 16, "device": "cpu"}


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _metrics(value: float) -> dict[str, float]:
    return {"balanced_accuracy": value, "accuracy": value, "f1": value, "n": 16}


def _fake(
    monkeypatch: pytest.MonkeyPatch,
    *,
    epoch_s: dict[str, float],
    val: dict[str, float],
    distilled: dict[str, float | None] | None = None,
    distill_s: float = 0.0,
) -> dict[str, list[Any]]:
    """Training (`epoch_s` seconds an epoch and `val` by run), distillation (`distilled`: its
    val by run, None: it fails) and shipping replaced; the sweep's clock moves as they take
    time. Returns what each was called with."""
    from marsvision.train import int8_distill, loop, ship, sweep

    clock = _Clock()
    monkeypatch.setattr(sweep, "time", clock)
    calls: dict[str, list[Any]] = {"train": [], "distill": [], "ship": [], "t0": [clock.now]}

    def train(cfg: Any, *, deadline: float | None = None) -> dict[str, Any]:
        calls["train"].append((cfg.out.name, deadline))
        clock.now += epoch_s[cfg.out.name] * cfg.epochs
        return {"history": [{"seconds": epoch_s[cfg.out.name]}] * cfg.epochs, "best_epoch": 1,
                "val": _metrics(val[cfg.out.name]), "test": _metrics(0.5),
                "stopped_early_after_epoch": None}  # fmt: skip

    def distill_file(src: Path, dst: Path, **kw: Any) -> dict[str, Any]:
        calls["distill"].append((src.parent.name, kw))
        clock.now += distill_s
        got = (distilled or {})[src.parent.name]
        if got is None:
            raise RuntimeError("no kernel image for this device")
        return {"metrics": {"val": _metrics(got), "test": _metrics(0.5)}}

    def ship_run(chosen: Path, *, models_dir: Path, **kw: Any) -> Any:
        calls["ship"].append(chosen)
        models_dir.mkdir(parents=True, exist_ok=True)
        (models_dir / "resnet50-binary.pt").write_bytes(b"weights")
        (models_dir / "resnet50-binary.md").write_text("card")
        scores = {"test": {"metrics": _metrics(0.5)}}
        return ship.ShipResult(checkpoint=models_dir / "resnet50-binary.pt",
                               card=models_dir / "resnet50-binary.md", sha256="0" * 64,
                               size_bytes=7, scores=scores)  # fmt: skip

    monkeypatch.setattr(loop, "main", train)
    monkeypatch.setattr(int8_distill, "distill_file", distill_file)
    monkeypatch.setattr(ship, "ship_run", ship_run)
    return calls


def test_a_distillation_that_fails_after_one_succeeded_ranks_every_run_as_trained(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--distill off after a later run's failure: the runs are ranked and shipped as trained,
    the earlier run's distilled val too (mixing them ranked a distilled score against trained
    ones, and shipped the trained checkpoint of a run chosen for its distilled one)."""
    calls = _fake(monkeypatch, epoch_s={"default": 1.0, "zoom": 1.0},
                  val={"default": 0.6, "zoom": 0.7},
                  distilled={"default": 0.9, "zoom": None})  # fmt: skip
    summary = run_sweep(data_dir=msl_dir, task="binary", names=["default", "zoom"],
                        settings={**SETTINGS, "epochs": 2}, budget_s=600.0,
                        runs_dir=tmp_path / "r", out_dir=tmp_path / "o", workers=1,
                        distill=True)  # fmt: skip
    assert [r for r, _ in calls["distill"]] == ["default", "zoom"]
    assert not summary["distilled"] and summary["distill_error"].startswith("zoom: RuntimeError")
    assert [r["val"]["balanced_accuracy"] for r in summary["candidates"]] == [0.6, 0.7]
    assert all("trained_val" not in r for r in summary["candidates"])
    assert summary["chosen"] == "zoom"
    assert calls["ship"] == [tmp_path / "r" / "zoom" / "checkpoint.pt"]


def test_a_run_to_be_distilled_leaves_the_distillation_its_time(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --distill each training stops early enough for the distillation after it: the
    reserve until one was timed, then the last one's time. The distillation runs at batch 32 at
    most (its default), whatever the training's batch."""
    calls = _fake(monkeypatch, epoch_s={"default": 1.0, "zoom": 1.0},
                  val={"default": 0.6, "zoom": 0.7}, distilled={"default": 0.8, "zoom": 0.9},
                  distill_s=7.0)  # fmt: skip
    budget = 600.0
    run_sweep(data_dir=msl_dir, task="binary", names=["default", "zoom"],
              settings={**SETTINGS, "epochs": 2, "batch_size": 64}, budget_s=budget,
              runs_dir=tmp_path / "r", out_dir=tmp_path / "o", workers=1, distill=True)  # fmt: skip
    deadline = calls["t0"][0] + budget - RESERVE_S
    assert calls["train"] == [("default", deadline - DISTILL_RESERVE_S), ("zoom", deadline - 7.0)]
    assert [kw["batch_size"] for _, kw in calls["distill"]] == [32, 32]


def test_a_candidate_is_predicted_at_the_slowest_pace_measured_at_its_size(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs at one input size and batch, 5 s and then 1 s an epoch: the third is predicted
    at 5 s an epoch (50 s, with 45 left: skipped), not at the latest run's 1 s."""
    calls = _fake(monkeypatch, epoch_s={"default": 5.0, "zoom": 1.0, "group": 1.0},
                  val={"default": 0.6, "zoom": 0.7, "group": 0.8})  # fmt: skip
    summary = run_sweep(data_dir=msl_dir, task="binary", names=["default", "zoom", "group"],
                        settings={**SETTINGS, "epochs": 10}, budget_s=RESERVE_S + 105.0,
                        runs_dir=tmp_path / "r", out_dir=tmp_path / "o", workers=1)  # fmt: skip
    assert [r for r, _ in calls["train"]] == ["default", "zoom"]
    assert summary["candidates"][2]["status"] == "skipped: predicted 50 s, 45 s left"


def test_a_runs_pace_never_gives_a_negative_rest_nor_mixes_timed_and_untimed_epochs() -> None:
    # a short first epoch below the median: the rest is none, not a negative overhead
    assert epoch_pace([{"seconds": 0.5}, {"seconds": 5.0}, {"seconds": 5.0}], 10.5) == (5.0, 0.0)
    # a resumed history, its first epochs untimed: the mean of the run, no overhead
    history: list[dict[str, Any]] = [{}, {}, {"seconds": 21.0}]
    assert epoch_pace(history, 30.0) == pytest.approx((10.0, 0.0))


def test_an_endless_budget_is_refused(tmp_path: Path) -> None:
    """--budget-min inf: no deadline, every candidate trained in full on a lease that ends."""
    import math

    from marsvision.runtime.errors import MarsvisionError

    with pytest.raises(MarsvisionError, match="--budget-min inf: must be a positive number"):
        run_sweep(data_dir=tmp_path, task="binary", names=["default"], settings=SETTINGS,
                  budget_s=math.inf, runs_dir=tmp_path / "r", out_dir=tmp_path / "o",
                  workers=1)  # fmt: skip


def test_the_mean_over_seeds_is_printed_only_for_several_seeds(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from marsvision.train.sweep import main

    val = {"default": 0.6, "default-seed0": 0.6, "default-seed1": 0.7}
    _fake(monkeypatch, epoch_s=dict.fromkeys(val, 1.0), val=val)
    for seeds, lines in (("0", 0), ("0,1", 1)):
        args = ["--data", str(msl_dir), "--candidates", "default", "--budget-min", "10",
                "--runs", str(tmp_path / seeds / "r"), "--out", str(tmp_path / seeds / "o"),
                "--seeds", seeds, "--set", "image_size=64", "--set", "epochs=2"]  # fmt: skip
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert result.output.count("mean of") == lines, result.output
        assert "chosen on val: default" in result.output
