"""`--resume`'s check that it continues the same run, over every setting: each one that changes
what a run learns must match, and a resume.pt or config.json from before a setting existed still
reads as the run it was (the setting at its default, as it was then)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see train/cli.py

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from marsvision.runtime.errors import MarsvisionError
from marsvision.train.config import BEFORE_ITS_FLAG, AugmentSpec, TrainConfig, command_line
from marsvision.train.model import ModelEma
from marsvision.train.resume import (
    RESUME,
    RESUME_KEYS,
    RESUME_MUST_MATCH,
    TrainingState,
    load_resume,
    restore,
    save_resume,
)

# where a run's files go and how it reads its data: the same run either way
FREE_ON_RESUME = {"data", "out", "device", "workers", "resume"}
# a value other than TrainConfig's default for each setting --resume checks
OTHER: dict[str, Any] = {
    "task": "msl25", "recipe": "blog", "epochs": 61, "select_from": 0.75, "batch_size": 32,
    "optimizer": "sgd", "lr": 0.5, "weight_decay": 0.0, "schedule": "constant",
    "warmup_epochs": 0.0, "label_smoothing": 0.0, "balance": "group", "ema_decay": 0.0,
    "augment": AugmentSpec(grayscale=0.5), "image_size": 128, "store_size": 256, "seed": 1,
    "limit": 8, "init": "resnet50.pth", "mixup": 0.2, "cutmix": 1.0, "amp": "bf16",
    "train_on": "train+val", "camera_adversary": 0.5,
}  # fmt: skip
# settings added after the first resume.pt was written, with what a run then did
ADDED_SINCE = ("select_from", "mixup", "cutmix", "amp", "train_on", "store_size",
               "camera_adversary", "augment.grayscale", "augment.policy")  # fmt: skip


def _save(out: Path, config: dict[str, Any]) -> None:
    torch.save({**dict.fromkeys(RESUME_KEYS), "config": config, "data_fingerprint": "f"},
               out / RESUME)  # fmt: skip


def _without(config: dict[str, Any], setting: str) -> dict[str, Any]:
    """`config` as a run from before `setting` existed wrote it."""
    config = {**config, "augment": dict(config["augment"])}
    *parent, key = setting.split(".")
    del (config[parent[0]] if parent else config)[key]
    return config


def test_every_setting_is_checked_or_free() -> None:
    """A new TrainConfig field has to be put in RESUME_MUST_MATCH or declared free here."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(RESUME_MUST_MATCH) == fields - FREE_ON_RESUME
    assert set(OTHER) == set(RESUME_MUST_MATCH)


@pytest.mark.parametrize("key", RESUME_MUST_MATCH)
def test_resume_refuses_another_value(tmp_path: Path, key: str) -> None:
    cfg = TrainConfig(data=Path("d"), out=tmp_path)
    _save(tmp_path, cfg.to_dict())
    assert load_resume(tmp_path, cfg, "f")["config"] == cfg.to_dict()
    other = dataclasses.replace(cfg, **{key: OTHER[key]})
    assert other.to_dict()[key] != cfg.to_dict()[key]
    # the setting that differs, named (an augmentation's too: the whole dicts were printed)
    key_said = f"{key}.grayscale" if key == "augment" else key
    with pytest.raises(MarsvisionError, match=rf"--resume: {key_said} was [^{{]*its settings: "):
        load_resume(tmp_path, other, "f")


def test_resume_free_settings_and_other_data(tmp_path: Path) -> None:
    cfg = TrainConfig(data=Path("d"), out=tmp_path)
    _save(tmp_path, cfg.to_dict())
    moved = dataclasses.replace(cfg, data=Path("e"), device="cpu", workers=1, resume=True)
    assert load_resume(tmp_path, moved, "f")["config"] == cfg.to_dict()
    with pytest.raises(MarsvisionError, match=r"data set differs .* \(d\): pass that folder as"):
        load_resume(tmp_path, cfg, "g")


def test_resume_refuses_a_newer_versions_run_and_other_files(tmp_path: Path) -> None:
    """A resume.pt with a setting this version does not know (begun by a newer marsvision) was
    resumed without it, and a torch file that is no resume.pt (a checkpoint.pt too) was a
    KeyError traceback."""
    cfg = TrainConfig(data=Path("d"), out=tmp_path)
    _save(tmp_path, {**cfg.to_dict(), "label_noise": 0.1})
    with pytest.raises(MarsvisionError, match=r"settings this marsvision does not know \(label_"):
        load_resume(tmp_path, cfg, "f")
    config = cfg.to_dict()
    _save(tmp_path, {**config, "augment": {**config["augment"], "cutout": 0.5}})
    with pytest.raises(MarsvisionError, match=r"does not know \(augment.cutout\)"):
        load_resume(tmp_path, cfg, "f")  # "augment.cutout was ...: pass the same flags"
    for other in ({"a": 1}, [1, 2], {"config": "x"}):
        torch.save(other, tmp_path / RESUME)
        with pytest.raises(MarsvisionError, match="is not a run's resume file"):
            load_resume(tmp_path, cfg, "f")
    torch.save({**dict.fromkeys(RESUME_KEYS), "config": cfg.to_dict()}, tmp_path / RESUME)
    with pytest.raises(MarsvisionError, match="data set differs"):
        load_resume(tmp_path, cfg, "f")
    # one that lacks what restore() reads: a KeyError after every image was decoded
    torch.save({"config": cfg.to_dict(), "data_fingerprint": "f", "model": {}}, tmp_path / RESUME)
    with pytest.raises(MarsvisionError, match=r"is not a whole resume file \(no optimizer, sch"):
        load_resume(tmp_path, cfg, "f")
    # a checkpoint.pt copied to resume.pt: its config matched, then restore() raised KeyError
    torch.save({"config": cfg.to_dict(), "data_fingerprint": "f", "state_dict": {}},
               tmp_path / RESUME)  # fmt: skip
    with pytest.raises(MarsvisionError, match=r"is a model checkpoint \(a checkpoint.pt\), not"):
        load_resume(tmp_path, cfg, "f")


def _then(cfg: TrainConfig, setting: str) -> TrainConfig:
    """`cfg` with `setting` at what a run did before it existed."""
    key = setting.split(".")[0]
    return dataclasses.replace(cfg, **{k: v for k, v in BEFORE_ITS_FLAG.items() if k == key})


@pytest.mark.parametrize("setting", ADDED_SINCE)
def test_resume_of_a_run_from_before_a_setting(tmp_path: Path, setting: str) -> None:
    """Such a resume.pt resumes with the setting at what the run did then, and is refused with
    it set otherwise."""
    cfg = TrainConfig(data=Path("d"), out=tmp_path)
    old = _without(cfg.to_dict(), setting)
    _save(tmp_path, old)
    then = _then(cfg, setting)
    assert load_resume(tmp_path, then, "f")["config"] == old
    key = setting.split(".")[0]
    # another value, and the default now where the run did otherwise then (--select-from)
    for now in [dataclasses.replace(cfg, **{key: OTHER[key]})] + [cfg] * (then != cfg):
        with pytest.raises(MarsvisionError, match=rf"--resume: {key}(\.\w+)? was "):
            load_resume(tmp_path, now, "f")


@pytest.mark.parametrize("setting", ADDED_SINCE)
def test_command_of_a_run_from_before_a_setting(setting: str) -> None:
    """A config.json from before a flag gives the command that repeats what the run did."""
    plain = TrainConfig(data=Path("d"), out=Path("o")).to_dict()
    then = _then(TrainConfig(data=Path("d"), out=Path("o")), setting).to_dict()
    assert command_line(_without(plain, setting)) == command_line(then)


def test_before_select_from_every_epoch_was_eligible() -> None:
    old = _without(TrainConfig(data=Path("d"), out=Path("o")).to_dict(), "select_from")
    assert "--select-from 0.0 " in command_line(old)


def test_the_command_line_quotes_what_the_shell_would_split() -> None:
    """The command a card prints runs as printed: a path with a space in it (an --init weights
    file, an --out folder, --data) is quoted, one argument again when the shell splits it."""
    import shlex

    cfg = TrainConfig(data=Path("d"), out=Path("my runs/a"), init="/tmp/my weights.pt")
    args = shlex.split(command_line(cfg.to_dict(), data="my data"))
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert args[0] == "mars-train"
    assert (flags["--data"], flags["--init"], flags["--out"]) == (
        "my data", "/tmp/my weights.pt", "my runs/a")  # fmt: skip


def test_select_from_counts_epochs_exactly() -> None:
    """--select-from's first epoch is the ceiling of the exact product (0.07 of 100 epochs is
    epoch 7, not the 8 that floating point's 7.000000000000001 gave)."""
    import math
    from fractions import Fraction

    from marsvision.train.config import first_selectable_epoch

    for hundredths in range(1, 100):
        for epochs in range(1, 201):
            exact = max(1, math.ceil(Fraction(hundredths, 100) * epochs))
            assert first_selectable_epoch(hundredths / 100, epochs) == exact, (hundredths, epochs)


def test_a_mismatch_gives_the_runs_own_command(tmp_path: Path) -> None:
    """Every flag to resume with, spelled out: a mismatch was named one setting at a time, to be
    typed again from config.json's resolved values. The data folder, device and run folder are
    this command's (the run's data path was relative to where it began: from elsewhere the
    command it gave named no data)."""
    from marsvision.train.config import command_line

    cfg = TrainConfig(data=Path("d"), out=tmp_path, epochs=6, limit=64, image_size=64,
                      device="cuda")  # fmt: skip
    _save(tmp_path, cfg.to_dict())
    now = dataclasses.replace(cfg, epochs=8, data=Path("../elsewhere/d"), device="cpu")
    with pytest.raises(MarsvisionError) as e:
        load_resume(tmp_path, now, "f")
    said = e.value.message
    assert said.startswith("--resume: epochs was 6 in ") and "\n" not in said
    want = command_line({**cfg.to_dict(), "device": "cpu"}, data="../elsewhere/d",
                        out=str(tmp_path)) + " --resume"  # fmt: skip
    assert "--data ../elsewhere/d " in want and "--device cpu " in want
    assert (
        said.endswith(f"; to resume it: {want}") and "--epochs 6 " in want and "--limit 64" in want
    )


def _parts(seed: int) -> TrainingState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    head = nn.Linear(4, 2)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    gen = torch.Generator().manual_seed(seed)
    return TrainingState(model=model, optimizer=opt, scheduler=sched, ema=ModelEma(model, 0.9),
                         camera_head=head, generator=gen)  # fmt: skip


def _train(parts: TrainingState, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(8, 3, generator=parts.generator)
        assert parts.camera_head is not None
        loss = parts.model(x).square().mean() + parts.camera_head(x.repeat(1, 2)[:, :4]).mean()
        parts.optimizer.zero_grad()
        loss.backward()
        parts.optimizer.step()
        parts.scheduler.step()
        assert parts.ema is not None
        parts.ema.update(parts.model)


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_devices_add_a_part_only_on_a_change() -> None:
    """Resumed twice on the CPU after a GPU start, it read "cuda:0, then cpu, then cpu"."""
    from marsvision.train.resume import run_devices

    assert run_devices(None, "cpu") == "cpu"  # a resume.pt from before devices were kept
    assert run_devices("cpu", "cpu") == "cpu"
    assert run_devices("cuda:0", "cpu") == "cuda:0, then cpu"
    assert run_devices("cuda:0, then cpu", "cpu") == "cuda:0, then cpu"
    assert run_devices("cuda:0, then cpu", "cuda:0") == "cuda:0, then cpu, then cuda:0"


def test_resume_puts_back_every_part_of_the_run(tmp_path: Path) -> None:
    cfg = TrainConfig(data=Path("d"), out=tmp_path)
    run = _parts(0)
    _train(run, 5)
    history = [{"epoch": 1, "val_loss": 0.4}, {"epoch": 2, "val_loss": 0.5}]
    save_resume(tmp_path, run, epoch=2, history=history, best=(0.75, -0.4), best_epoch=1,
                cfg=cfg, fingerprint="f", seconds=12.5, device="cpu")  # fmt: skip
    next_torch, next_gen = torch.rand(4), torch.rand(4, generator=run.generator)

    resumed = _parts(1)  # a new process: other initial weights and random states
    state = load_resume(tmp_path, cfg, "f")
    restore(state, resumed)
    # the selection so far: a later epoch is kept only if it beats epoch 1's score
    assert state["epoch"] == 2 and state["history"] == history
    assert state["seconds"] == 12.5 and state["device"] == "cpu"
    assert tuple(state["best"]) == (0.75, -0.4) and state["best_epoch"] == 1
    assert _same_state(resumed.model.state_dict(), run.model.state_dict())
    assert resumed.camera_head is not None and run.camera_head is not None
    assert _same_state(resumed.camera_head.state_dict(), run.camera_head.state_dict())
    assert resumed.ema is not None and run.ema is not None
    assert resumed.ema.step == run.ema.step == 5
    assert _same_state(resumed.ema.module.state_dict(), run.ema.module.state_dict())
    # AdamW's moments and step counts, and the schedule's position (its lr)
    got, want = resumed.optimizer.state_dict()["state"], run.optimizer.state_dict()["state"]
    assert got.keys() == want.keys() and all(_same_state(got[i], want[i]) for i in want)
    assert resumed.scheduler.last_epoch == run.scheduler.last_epoch == 5
    assert resumed.optimizer.param_groups[0]["lr"] == run.optimizer.param_groups[0]["lr"]
    # both random streams continue where they were
    assert torch.equal(torch.rand(4), next_torch)
    assert torch.equal(torch.rand(4, generator=resumed.generator), next_gen)
