"""The recipe sweep for short GPU leases (train/sweep.py), run tiny on the CPU, and the
training loop's deadline."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from marsvision.runtime.errors import MarsvisionError
from marsvision.train.checkpoint import load_checkpoint
from marsvision.train.config import config_from_flags
from marsvision.train.sweep import (
    CANDIDATES,
    epoch_pace,
    main,
    parse_settings,
    predicted_s,
    rank_candidates,
    run_overhead,
    run_sweep,
    split_file,
)

TINY = ("image_size=64", "limit=16", "epochs=1", "device=cpu", "batch_size=8")


def test_sweep_ships_the_best_on_val_in_parts(msl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--data", str(msl_dir), "--candidates", "group-zoom,default", "--budget-min", "5",
            "--runs", str(tmp_path / "runs"), "--out", str(out), "--workers", "2"]  # fmt: skip
    for s in TINY:
        args += ["--set", s]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "sweep.json").read_text())
    done = [c for c in summary["candidates"] if c["status"] == "done"]
    assert [c["name"] for c in done] == ["group-zoom", "default"]
    best = max(done, key=lambda c: (c["val"]["balanced_accuracy"], c["val"]["accuracy"]))
    assert summary["chosen"] == best["name"]
    assert [("test" in c) for c in done] == [c is best for c in done]  # test: the chosen only
    parts = sorted(out.glob("resnet50-binary.pt.part*"))
    assert [p.name for p in parts] == summary["shipped"]["parts"] and len(parts) == 3
    assert all(p.stat().st_size < 16 * 2**20 for p in parts)
    joined = tmp_path / "resnet50-binary.pt"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    sha = hashlib.sha256(joined.read_bytes()).hexdigest()
    assert (out / "SHA256SUMS").read_text() == f"{sha}  resnet50-binary.pt\n"
    ckpt = load_checkpoint(joined)
    assert ckpt["weights_dtype"] == "float16" and ckpt["config"]["out"].endswith(best["name"])
    assert sha in (out / "resnet50-binary.md").read_text()
    assert len(list(out.iterdir())) <= 8  # the device tool returns at most 8 files


def test_sweep_refits_one_candidate_on_train_and_val(msl_dir: Path, tmp_path: Path) -> None:
    """--set train_on=train+val with one candidate: trained on both, shipped without a val
    ranking, and the card says so."""
    summary = run_sweep(data_dir=msl_dir, task="binary", names=["zoom"], budget_s=600.0,
                        settings=parse_settings((*TINY, "train_on=train+val")),
                        runs_dir=tmp_path / "r", out_dir=tmp_path / "o", workers=2)  # fmt: skip
    assert summary["selected_on"].startswith("nothing: one refit")
    (row,) = summary["candidates"]
    assert row["config"]["train_on"] == "train+val" and row["config"]["select_from"] == 1.0
    card = (tmp_path / "o" / "resnet50-binary.md").read_text()
    assert "train and val splits together" in card and "--train-on train+val" in card


def test_sweep_on_half_of_val_ranks_on_the_other_half(msl_dir: Path, tmp_path: Path) -> None:
    """--set train_on=train+half-val: runs train on val's first half by sol and are ranked on the
    second, the val the summary and the card report."""
    from marsvision.train import data as msl

    summary = run_sweep(data_dir=msl_dir, task="binary", names=["default", "zoom"],
                        budget_s=600.0, settings=parse_settings((*TINY, "train_on=train+half-val")),
                        runs_dir=tmp_path / "r", out_dir=tmp_path / "o", workers=2)  # fmt: skip
    held = len(msl.halve_by_sol(msl.read_split(msl_dir, "val", "binary", 16))[1])
    assert [r["val"]["n"] for r in summary["candidates"]] == [held, held]
    assert summary["selected_on"].endswith(
        "val: its second half by sol, the first is training data (train+half-val)"
    )
    card = (tmp_path / "o" / "resnet50-binary.md").read_text()
    assert "the first half of val by sol" in card and "--train-on train+half-val" in card


def test_sweep_over_seeds_ranks_by_the_mean_and_ships_the_best_seed(
    msl_dir: Path, tmp_path: Path
) -> None:
    args = ["--data", str(msl_dir), "--candidates", "group-zoom,default", "--budget-min", "10",
            "--runs", str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--workers", "2",
            "--seeds", "3,4"]  # fmt: skip
    for s in TINY:
        args += ["--set", s]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "sweep.json").read_text())
    rows = summary["candidates"]
    assert [(r["run"], r["status"]) for r in rows] == [
        ("group-zoom-seed3", "done"), ("group-zoom-seed4", "done"),
        ("default-seed3", "done"), ("default-seed4", "done")]  # fmt: skip
    assert [r["config"]["seed"] for r in rows] == [3, 4, 3, 4]
    assert summary["ranking"] == rank_candidates(rows)
    chosen = summary["ranking"][0]
    own = [r for r in rows if r["name"] == chosen["name"]]
    best = max(own, key=lambda r: (r["val"]["balanced_accuracy"], r["val"]["accuracy"]))
    assert summary["shipped_run"] == best["run"] == chosen["best_run"]
    assert [("test" in r) for r in rows] == [r is best for r in rows]
    assert result.output.count("mean of 2 seeds") == 2
    assert f"chosen on val: {chosen['name']} ({best['run']})" in result.output
    ckpt = load_checkpoint(tmp_path / "r" / "models" / "resnet50-binary.pt")
    assert ckpt["config"]["out"].endswith(best["run"]) and ckpt["config"]["seed"] == best["seed"]


def test_sweep_distills_each_run_and_ranks_and_ships_the_distilled(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from marsvision.train import images

    opened: Counter[str] = Counter()
    decode = images.open_rgb

    def counted(path: Path) -> Any:
        opened[str(path)] += 1
        return decode(path)

    monkeypatch.setattr(images, "open_rgb", counted)
    summary = run_sweep(data_dir=msl_dir, task="binary", names=["default"], budget_s=600.0,
                        settings=parse_settings(TINY), runs_dir=tmp_path / "r",
                        out_dir=tmp_path / "o", workers=2, seeds=(3, 4), distill=True,
                        distill_epochs=2)  # fmt: skip
    rows = summary["candidates"]
    assert summary["distilled"] and [r["status"] for r in rows] == ["done", "done"]
    for r in rows:
        distilled = load_checkpoint(tmp_path / "r" / r["run"] / "distilled.pt")
        trained = load_checkpoint(tmp_path / "r" / r["run"] / "checkpoint.pt")
        assert r["val"] == distilled["metrics"]["val"] and r["distill_seconds"] > 0
        assert r["trained_val"] == trained["metrics"]["val"]
    best = max(rows, key=lambda r: (r["val"]["balanced_accuracy"], r["val"]["accuracy"]))
    assert summary["shipped_run"] == best["run"]
    assert [("test" in r) for r in rows] == [r is best for r in rows]
    shipped = load_checkpoint(tmp_path / "r" / "models" / "resnet50-binary.pt")
    assert shipped["distill"]["source_train_device"] == "cpu" and shipped["distill"]["epochs"] == 2
    assert shipped["metrics"]["fp32_run"]["val"] == best["val"]
    card = (tmp_path / "o" / "resnet50-binary.md").read_text()
    assert "| distilled for INT8 |" in card and "(cpu, " in card
    # Two runs, two distillations and the shipping scored val and test five times and trained
    # on train four times (twice stored, twice as eval tensors): each file decoded once per
    # preprocessing, train's twice (uint8 store and eval tensors), val's and test's once.
    from marsvision.train.data import read_split

    names = ("train", "val", "test")
    split = {s: {str(x.path) for x in read_split(msl_dir, s, "binary", 16)} for s in names}
    assert set(opened) == split["train"] | split["val"] | split["test"]
    assert {opened[f] for f in split["train"]} == {2}
    assert {opened[f] for f in split["val"] | split["test"]} == {1}
    assert images._decoded is None  # the sweep's decodings are freed when it returns


def test_a_failed_distillation_keeps_the_trained_runs(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--distill failing (say on a GPU it never ran on) must not cost the call its models."""
    import marsvision.train.int8_distill as int8_distill

    calls = []

    def fails(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(int8_distill, "distill_file", fails)
    summary = run_sweep(data_dir=msl_dir, task="binary", names=["default", "zoom"],
                        budget_s=600.0, settings=parse_settings(TINY), runs_dir=tmp_path / "r",
                        out_dir=tmp_path / "o", workers=2, distill=True)  # fmt: skip
    assert len(calls) == 1  # off after the first failure
    assert not summary["distilled"]
    assert summary["distill_error"].startswith("default: RuntimeError: no kernel")
    assert [r["status"] for r in summary["candidates"]] == ["done", "done"]
    assert all("trained_val" not in r and "distilled" not in r for r in summary["candidates"])
    shipped = load_checkpoint(tmp_path / "r" / "models" / "resnet50-binary.pt")
    assert "distill" not in shipped and (tmp_path / "o" / "SHA256SUMS").is_file()


def test_ranking_is_by_mean_val_over_finished_seeds() -> None:
    def row(name: str, seed: int, bal: float, acc: float = 0.5) -> dict[str, object]:
        return {"name": name, "seed": seed, "run": f"{name}-seed{seed}", "status": "done",
                "val": {"balanced_accuracy": bal, "accuracy": acc}}  # fmt: skip

    rows = [row("a", 0, 0.90), row("a", 1, 0.60),  # one lucky seed, mean 0.75
            row("b", 0, 0.80), row("b", 1, 0.78),  # mean 0.79
            {"name": "c", "seed": 0, "run": "c-seed0", "status": "failed: OOM"}]  # fmt: skip
    ranked = rank_candidates(rows)
    assert [c["name"] for c in ranked] == ["b", "a"]
    assert ranked[0]["best_run"] == "b-seed0" and ranked[0]["seeds"] == [0, 1]
    assert ranked[0]["val_mean"]["balanced_accuracy"] == pytest.approx(0.79)
    assert ranked[1]["val_balanced_accuracy"] == [0.90, 0.60]
    # the best seed is shipped, not the first; ties of balanced accuracy go by val accuracy
    rows = [row("a", 0, 0.80, acc=0.70), row("a", 1, 0.80, acc=0.90),
            row("b", 0, 0.80, acc=0.75), row("b", 1, 0.80, acc=0.85)]  # fmt: skip
    ranked = rank_candidates(rows)
    assert ranked[0]["best_run"] == "a-seed1" and ranked[1]["best_run"] == "b-seed1"
    rows = [row("a", 0, 0.80, acc=0.70), row("b", 0, 0.80, acc=0.90)]
    assert [c["name"] for c in rank_candidates(rows)] == ["b", "a"]


def test_a_candidates_time_is_predicted_from_epochs_measured_at_its_size_and_batch() -> None:
    assert predicted_s(60, 224, {}) is None  # nothing measured yet: the first candidate runs
    measured = {(224, 64): 2.6}  # s per epoch
    assert predicted_s(60, 224, measured) == pytest.approx(156.0)
    assert predicted_s(120, 224, measured, 64) == pytest.approx(312.0)
    # a smaller input is not assumed faster (on the H200 a 128 px epoch took 2.9 s, a 224 px
    # one 2.6), a larger one is scaled up by the area
    assert predicted_s(60, 128, measured) == pytest.approx(156.0)
    assert predicted_s(60, 448, measured) == pytest.approx(624.0)
    # once measured, a size's own time counts; the nearest measured size stands for the others
    measured[128, 64] = 2.9
    assert predicted_s(60, 128, measured) == pytest.approx(174.0)
    assert predicted_s(150, 160, measured) == pytest.approx(2.9 * 150 * (160 / 128) ** 2)
    assert predicted_s(50, 224, measured) == pytest.approx(2.6 * 50)
    # a larger batch is not assumed faster; a smaller one is scaled up by the batch ratio
    assert predicted_s(60, 224, measured, 256) == pytest.approx(156.0)
    only_b256 = {(224, 256): 0.8}
    assert predicted_s(120, 224, only_b256, 256) == pytest.approx(96.0)
    assert predicted_s(120, 224, only_b256, 64) == pytest.approx(0.8 * 120 * 4)
    # the same batch is preferred over a nearer size measured at another batch
    both = {(224, 256): 0.8, (128, 64): 2.9}
    assert predicted_s(60, 224, both, 64) == pytest.approx(2.9 * 60 * (224 / 128) ** 2)


def test_a_runs_pace_is_its_median_epoch_and_the_rest_is_overhead() -> None:
    # the H200's first run: a 21 s first epoch (warm-up), then about 1.0 s an epoch
    history = [{"seconds": 21.0}] + [{"seconds": 1.0}] * 58 + [{"seconds": 1.2}]
    typical, rest = epoch_pace(history, seconds=123.0)
    assert typical == pytest.approx(1.0)
    assert rest == pytest.approx(123.0 - 60.0)
    assert epoch_pace([{"seconds": 2.0}, {"seconds": 4.0}], 10.0) == pytest.approx((3.0, 4.0))
    # no epoch times (a history from before they were kept): the mean, no overhead
    assert epoch_pace([{}, {}], 10.0) == pytest.approx((5.0, 0.0))
    # the overhead is added once, whatever the epochs
    assert predicted_s(120, 224, {(224, 256): 1.0}, 256, overhead_s=63.0) == pytest.approx(183.0)


def test_a_runs_overhead_is_the_latest_at_its_size_and_batch() -> None:
    assert run_overhead({}, (128, 256)) == 0.0  # nothing measured: the pace alone
    # the call's first run decoded the images and warmed cuDNN up; the second shared both
    rest_s = {(128, 256): 63.0}
    assert run_overhead(rest_s, (128, 256)) == 63.0
    rest_s[128, 256] = 34.0
    assert run_overhead(rest_s, (128, 256)) == 34.0
    overhead = run_overhead(rest_s, (128, 256))
    assert predicted_s(60, 128, {(128, 256): 0.6}, 256, overhead) == pytest.approx(36.0 + 34.0)
    # a new input size decodes again and tunes new shapes: the largest measured stands for it
    rest_s[224, 256] = 40.0
    assert run_overhead(rest_s, (160, 256)) == 40.0
    assert run_overhead(rest_s, (224, 64)) == 40.0


def test_sweep_seeds_are_checked(msl_dir: Path, tmp_path: Path) -> None:
    kw = dict(data_dir=msl_dir, task="binary", names=["default"], budget_s=600.0,
              runs_dir=tmp_path / "r", out_dir=tmp_path / "o", workers=2)  # fmt: skip
    with pytest.raises(MarsvisionError, match="--seeds"):
        run_sweep(settings=parse_settings((*TINY, "seed=1")), **kw)  # type: ignore[arg-type]
    with pytest.raises(MarsvisionError, match="distinct"):
        run_sweep(settings=parse_settings(TINY), seeds=(1, 1), **kw)  # type: ignore[arg-type]
    # seed 0 trained, then -1 was refused by its run's config and nothing shipped
    with pytest.raises(MarsvisionError, match=r"--seeds 0,-1: each must be in \[0, 2\^63\)"):
        run_sweep(settings=parse_settings(TINY), seeds=(0, -1), **kw)  # type: ignore[arg-type]
    for budget in (math.nan, 0.0, -60.0):  # nan ran every candidate in full, past any budget
        with pytest.raises(MarsvisionError, match="--budget-min .*positive"):
            run_sweep(settings=parse_settings(TINY), **{**kw, "budget_s": budget})  # type: ignore[arg-type]
    with pytest.raises(MarsvisionError, match="each candidate once"):
        run_sweep(settings=parse_settings(TINY), **{**kw, "names": ["default", "default"]})  # type: ignore[arg-type]
    refit = parse_settings((*TINY, "train_on=train+val"))
    with pytest.raises(MarsvisionError, match="cannot rank runs"):
        run_sweep(settings=refit, seeds=(0, 1), **kw)  # type: ignore[arg-type]
    with pytest.raises(MarsvisionError, match="cannot rank runs"):
        run_sweep(settings=refit, **{**kw, "names": ["default", "zoom"]})  # type: ignore[arg-type]
    result = CliRunner().invoke(main, ["--data", str(msl_dir), "--budget-min", "1", "--out",
                                       str(tmp_path / "o"), "--seeds", "0,x"])  # fmt: skip
    assert result.exit_code != 0 and "--seeds '0,x'" in result.output
    # an image past --limit missing: the training would not see it, the ship at the end would
    from test_data import mini_data  # tests/ is on sys.path (pytest's prepend import mode)

    data = mini_data(msl_dir, tmp_path / "msl", per_split=20)
    last = (data / "train-calibrated-shuffled.txt").read_text().split()[-2]
    (data / last).unlink()
    with pytest.raises(MarsvisionError, match=f"{Path(last).name} is missing"):
        run_sweep(settings=parse_settings(TINY), **{**kw, "data_dir": data})  # type: ignore[arg-type]
    # a setting the first candidate takes and the second refuses: refused before any training
    # (it was refused after the first had trained, and the sweep shipped nothing)
    small = parse_settings(("store_size=140", *(s for s in TINY if "image_size" not in s)))
    with pytest.raises(
        MarsvisionError, match="--store-size 140: must be at least --image-size 224"
    ):
        run_sweep(settings=small, **{**kw, "names": ["group-zoom-128", "default"]})  # type: ignore[arg-type]
    assert not (tmp_path / "r").exists()


def test_sweep_skips_what_cannot_fit_and_says_so(msl_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MarsvisionError, match="no candidate finished.*skipped"):
        run_sweep(data_dir=msl_dir, task="binary", names=["default"],
                  settings=parse_settings(TINY), budget_s=60.0, runs_dir=tmp_path / "r",
                  out_dir=tmp_path / "o", workers=2)  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_settings_and_candidates_are_mars_train_flags() -> None:
    assert parse_settings(("epochs=3", "lr=0.002", "device=cuda", "limit=none")) == {
        "epochs": 3, "lr": 0.002, "device": "cuda", "limit": None}  # fmt: skip
    with pytest.raises(MarsvisionError, match="KEY=VALUE"):
        parse_settings(("optimizer=sgd",))  # no mars-train flag sets it
    # each value is read as mars-train reads its flag, so a typo fails here, not in a candidate
    for pair, says in [("batch_size=abc", "not a valid integer"), ("epochs=1.5", "not a valid "
                       "integer"), ("lr=fast", "not a valid float"), ("image_size=none", "not a "
                       "valid integer"), ("augment_policy=rand", "not one of"),
                       ("task=msl25", "--task")]:  # fmt: skip
        with pytest.raises(MarsvisionError, match=f"--set '{pair}': .*{says}"):
            parse_settings((pair,))
    for name, flags in CANDIDATES.items():
        flags = dict(flags)
        config_from_flags(flags.pop("recipe", "default"), data=Path("d"), out=Path(name), **flags)


def test_split_file_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "blob.bin"
    src.write_bytes(bytes(range(256)) * 41)
    (tmp_path / "parts").mkdir()
    parts = split_file(src, tmp_path / "parts", part_bytes=4096)
    assert [p.stat().st_size for p in parts] == [4096, 4096, 2304]
    assert b"".join(p.read_bytes() for p in parts) == src.read_bytes()


def test_training_stops_at_the_deadline(msl_dir: Path, tmp_path: Path) -> None:
    from marsvision.train.loop import main as train

    cfg = config_from_flags("default", data=msl_dir, out=tmp_path / "run", epochs=3, limit=16,
                            image_size=64, device="cpu", batch_size=8, workers=2)  # fmt: skip
    result = train(cfg, deadline=time.monotonic())  # past: only the first epoch runs
    assert result["stopped_early_after_epoch"] == 1 and len(result["history"]) == 1
    assert result["best_epoch"] == 1  # before the selection window (epoch 2 on): the last
    said = "nothing: the last epoch run, kept (the time budget ended the run after epoch 1, "
    assert result["selected_on"].startswith(said + "before epoch 2")  # said 'over epochs 2-3'
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["metrics"][
        "stopped_early_after_epoch"] == 1  # fmt: skip
