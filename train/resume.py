"""A run's resume.pt: what continues a stopped run where it stopped (weights, optimizer,
schedule, EMA, camera head, random states, history), and the check that `--resume` continues
the same run rather than another one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from marsvision.runtime.errors import MarsvisionError, clipped
from marsvision.train.checkpoint import atomic_torch_save
from marsvision.train.config import TrainConfig, command_line, saved_setting
from marsvision.train.model import ModelEma

RESUME = "resume.pt"
# every setting of the run but where its files go and how it decodes: `epochs` too, since the
# learning-rate schedule spans them, and `select_from`, since it sets which epochs were eligible
RESUME_MUST_MATCH = (
    "task", "recipe", "epochs", "select_from", "batch_size", "optimizer", "lr", "weight_decay",
    "schedule", "warmup_epochs", "label_smoothing", "balance", "ema_decay", "augment",
    "image_size", "store_size", "seed", "limit", "init", "mixup", "cutmix", "amp", "train_on",
    "camera_adversary",
)  # fmt: skip


# what `restore` and the training loop read of it (ema and camera_head: None where unused)
RESUME_KEYS = ("model", "optimizer", "scheduler", "ema", "camera_head", "epoch", "rng", "history",
               "best", "best_epoch")  # fmt: skip


@dataclass
class TrainingState:
    """The objects whose state a resume.pt holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: ModelEma | None
    camera_head: nn.Module | None  # the camera adversary's head (train/adversary.py)
    generator: torch.Generator  # the augmentation's and the epoch order's draws


def run_devices(earlier: str | None, now: str) -> str:
    """The devices a run's parts ran on, as metrics.json gives them: `now` added to the earlier
    parts' (None: not kept, taken as `now`) where it is not the last one ("cuda:0, then cpu")."""
    if earlier is None or earlier.rsplit(", then ", 1)[-1] == now:
        return earlier or now
    return f"{earlier}, then {now}"


def save_resume(
    out: Path, parts: TrainingState, *, epoch: int, history: list[dict[str, Any]],
    best: tuple[float, float], best_epoch: int, cfg: TrainConfig, fingerprint: str,
    seconds: float, device: str,
) -> None:  # fmt: skip
    """Write `out`/resume.pt (atomically) after `epoch`; `seconds` and `device`: the run's so
    far, all its parts (a resumed run's metrics.json and card gave the last part's alone)."""
    atomic_torch_save({
        "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema else None,
        "camera_head": parts.camera_head.state_dict() if parts.camera_head else None,
        "epoch": epoch,
        "rng": {"generator": parts.generator.get_state(), "torch": torch.get_rng_state()},
        "history": history, "best": list(best), "best_epoch": best_epoch,
        "config": cfg.to_dict(), "data_fingerprint": fingerprint,
        "seconds": seconds, "device": device,
    }, out / RESUME)  # fmt: skip


def _resume_command(saved: dict[str, Any], cfg: TrainConfig) -> str:
    """'; to resume it: mars-train ... --resume', the run's own flags spelled out (a mismatch
    was named one setting at a time, to be typed again from config.json's values), with this
    command's --data, --device and --out (the run's data path was relative to the folder it
    began in); '' where a setting has no flag."""
    try:
        line = command_line({**saved, "device": cfg.device}, data=str(cfg.data), out=str(cfg.out))
    except (MarsvisionError, KeyError, TypeError):
        return ""
    return f"; to resume it: {line} --resume"


def load_resume(out: Path, cfg: TrainConfig, fingerprint: str) -> dict[str, Any]:
    """`out`/resume.pt, checked to be a run of `cfg`'s settings on the same data."""
    path = out / RESUME
    if not path.is_file():
        raise MarsvisionError(f"--resume: {path} does not exist (start without --resume)")
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise MarsvisionError(f"--resume: {path} cannot be read ({clipped(str(e), 100)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise MarsvisionError(
            f"--resume: {path} is not a run's resume file (start without --resume)"
        )
    if "state_dict" in state and "model" not in state:  # it was a KeyError after the decoding
        raise MarsvisionError(
            f"--resume: {path} is a model checkpoint (a checkpoint.pt), not a run's resume file: "
            "it holds no optimizer or schedule to continue (start without --resume)"
        )
    if missing := [k for k in RESUME_KEYS if k not in state]:
        raise MarsvisionError(
            f"--resume: {path} is not a whole resume file (no {', '.join(missing)}): start "
            "without --resume"
        )
    saved, now = state["config"], cfg.to_dict()
    unknown = sorted(set(saved) - set(now))
    if isinstance(saved.get("augment"), dict):  # its settings too (--jitter, --grayscale, ...)
        unknown += sorted(f"augment.{k}" for k in set(saved["augment"]) - set(now["augment"]))
    if unknown:  # a setting of a newer marsvision: this one would not run it
        raise MarsvisionError(
            f"--resume: {out} was begun with settings this marsvision does not know "
            f"({', '.join(unknown)}): resume it with the version that began it"
        )
    for key in RESUME_MUST_MATCH:
        was = saved_setting(saved, key)  # runs from before a setting existed lack it
        if was != now.get(key):
            if isinstance(was, dict) and isinstance(now.get(key), dict):  # name what differs
                key, was, is_now = next((f"{key}.{k}", v, now[key].get(k)) for k, v in was.items()
                                        if v != now[key].get(k))  # fmt: skip
            else:
                is_now = now.get(key)
            raise MarsvisionError(
                f"--resume: {key} was {was!r} in {out}, now {is_now!r}; pass the same flags as "
                f"the run (its settings: {out / 'config.json'}){_resume_command(saved, cfg)}"
            )
    if state.get("data_fingerprint") != fingerprint:
        raise MarsvisionError(
            f"--resume: the data set differs from the one {out} was trained on ("
            f"{saved.get('data')}): pass that folder as --data"
        )
    return state


def restore(state: dict[str, Any], parts: TrainingState) -> None:
    """Put a loaded resume.pt's states back into `parts` and the global torch RNG."""
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if parts.ema is not None:
        parts.ema.load_state_dict(state["ema"])
    if parts.camera_head is not None:
        parts.camera_head.load_state_dict(state["camera_head"])
    parts.generator.set_state(state["rng"]["generator"])
    torch.set_rng_state(state["rng"]["torch"])
