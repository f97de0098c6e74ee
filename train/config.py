"""The training configuration: one typed dataclass, and the two recipes that fill its defaults.

`default`: AdamW, linear warmup then cosine decay, label smoothing, class-balanced loss weights,
rover-fit augmentation, EMA of the weights.
`blog`: the blog post's recipe: SGD with momentum, lr 0.01, batch 32, 50 epochs, constant lr,
plain random-resized crop and horizontal flip, no smoothing, balancing or EMA.
Flags given on the command line override the recipe's value.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.spec import MIN_INPUT_SIZE
from marsvision.train.data import Sample, halve_by_sol, read_split, sol_key


@dataclass(frozen=True)
class AugmentSpec:
    """What the training augmentation does."""

    scale: tuple[float, float] = (0.35, 1.0)  # crop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio
    rotate_deg: float = 10.0  # uniform in +-rotate_deg
    hflip: bool = True
    jitter: float = 0.2  # brightness/contrast/saturation factor in 1 +- jitter
    grayscale: float = 0.0  # probability that an image is made grey (after the jitter)
    policy: str = "none"  # an AUGMENT_POLICIES value: "trivial" adds a TrivialAugment op per image


AUGMENT_POLICIES = ("none", "trivial")


RECIPES: dict[str, dict[str, Any]] = {
    "default": {
        "epochs": 60,
        "batch_size": 64,
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.05,
        "schedule": "cosine",
        "warmup_epochs": 3.0,
        "label_smoothing": 0.1,
        "balance": "loss",
        "ema_decay": 0.998,
        "augment": AugmentSpec(),
    },
    "blog": {
        "epochs": 50,
        "batch_size": 32,
        "optimizer": "sgd",
        "lr": 0.01,
        "weight_decay": 0.0,
        "schedule": "constant",
        "warmup_epochs": 0.0,
        "label_smoothing": 0.0,
        "balance": "none",
        "ema_decay": 0.0,
        "augment": AugmentSpec(scale=(0.08, 1.0), rotate_deg=0.0, jitter=0.0),
    },
}
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
BALANCES = ("loss", "group", "group-label", "sampler", "none")
DEVICES = ("auto", "cpu", "cuda")
AMPS = ("auto", "bf16", "off")
# what the weights learn from: the official train split; train and val together (a refit:
# the recipe and epoch count are chosen on val by an earlier run, then the last epoch is kept);
# or train and the first half of val by sol, the epoch selected on the second (data.halve_by_sol)
REFIT = "train+val"
HALF_VAL = "train+half-val"
TRAIN_ON = ("train", REFIT, HALF_VAL)


def is_refit(config: Mapping[str, Any]) -> bool:
    """Whether a config (a `TrainConfig.to_dict()`, or flag settings) trains on all of val."""
    return config.get("train_on") == REFIT


def holds_half_val(config: Mapping[str, Any]) -> bool:
    """Whether a config trains on half of val: its val scores are the other half's."""
    return config.get("train_on") == HALF_VAL


def val_roles(config: Mapping[str, Any], val: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """Val's images that a config trains on, and those its val scores are taken on: none and all
    (train), all and all (train+val: training-set numbers), or the halves by sol (train+half-val).
    """
    if is_refit(config):
        return val, val
    return halve_by_sol(val) if holds_half_val(config) else ([], val)


def val_to_score(
    config: Mapping[str, Any], data_dir: Path, task: str, limit: int | None
) -> tuple[list[Sample], list[Sample]]:
    """`val_roles` of the first `limit` val images (ship's, parity's --limit) for a checkpoint of
    `config`: (those the run trained on, those to score). Halving by sol depends on which images
    are halved, so a train+half-val model's trained-on half is taken as its training took it
    (val read with the run's own --limit), and every image read from a sol it did not train on
    is scored: halving another number of images put trained-on images in the scored half, and
    a run's --limit N left the rest of its trained sols' images (and other products of its
    trained frames) to the scored part."""
    val = read_split(data_dir, "val", task, limit)
    if not holds_half_val(config):
        return val_roles(config, val)
    run_limit = saved_setting(config, "limit")
    as_trained = val if run_limit == limit else read_split(data_dir, "val", task, run_limit)
    learned = val_roles(config, as_trained)[0]
    seen, sols = {s.path for s in learned}, {sol_key(s.path) for s in learned}
    trained = [s for s in val if s.path in seen]
    scored = [s for s in val if sol_key(s.path) not in sols]
    if not scored:
        raise MarsvisionError(
            f"--limit {limit}: the run trained on all of the first {limit} val images (its half "
            "of val by sol); a larger --limit reaches its held-out half"
        )
    return trained, scored


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (written to RUN_DIR/config.json)."""

    data: Path
    out: Path
    task: str = "binary"
    recipe: str = "default"
    epochs: int = 60
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    schedule: str = "cosine"
    warmup_epochs: float = 3.0
    label_smoothing: float = 0.1
    balance: str = "loss"
    ema_decay: float = 0.998
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    mixup: float = 0.0  # Beta alpha of MixUp, 0 = off (train/mix.py)
    # largest gradient-reversal coefficient of the camera adversary, 0 = off (train/adversary.py)
    camera_adversary: float = 0.0
    cutmix: float = 0.0  # Beta alpha of CutMix, 0 = off; with both, one of them per batch
    select_from: float = 0.5  # the checkpoint is the best on val from this fraction of epochs on
    image_size: int = 224
    # training images are decoded once at this shorter side (None: the eval resize size, e.g.
    # 146 for 128 px); larger keeps more of the file's pixels for zoomed crops to sample
    store_size: int | None = None
    device: str = "auto"
    amp: str = "auto"  # bf16 autocast + channels_last: auto = on CUDA only; bf16; off (fp32)
    train_on: str = "train"  # a TRAIN_ON value; train+val keeps the last epoch
    seed: int = 0
    limit: int | None = None
    init: str = "random"
    resume: bool = False
    workers: int = 4

    @property
    def refit(self) -> bool:
        """Whether val is training data (`train_on` train+val): nothing left to select on."""
        return self.train_on == REFIT

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["data"], d["out"] = str(self.data), str(self.out)
        d["augment"] = dataclasses.asdict(self.augment)
        return d


# what a run did before a setting existed, where that is not the setting's default: until
# --select-from (2026-11-24) the checkpoint was the best on val over all epochs
BEFORE_ITS_FLAG: dict[str, Any] = {"select_from": 0.0}


SEED_RANGE = "[0, 2^63)"


def seed_in_range(seed: int) -> bool:
    """Whether a run can take `seed`: numpy's generators (the bootstrap at the end of a run)
    refuse a negative one, torch's one of 2^64 or more."""
    return 0 <= seed < 2**63


def first_selectable_epoch(select_from: float, epochs: int) -> int:
    """The first epoch `--select-from` lets a run keep (<= epochs: the last always counts)."""
    # rounded first: 0.07 * 100 is 7.000000000000001 in floating point, whose ceiling is 8
    return max(1, math.ceil(round(select_from * epochs, 9)))


def saved_setting(saved: Mapping[str, Any], key: str) -> Any:
    """A saved config's (config.json's, resume.pt's) `key`; for a config from before the
    setting existed, what the run did: `BEFORE_ITS_FLAG`, else the setting's default."""
    if key not in saved:
        field = next((f for f in dataclasses.fields(TrainConfig) if f.name == key), None)
        default = None if field is None or field.default is dataclasses.MISSING else field.default
        return BEFORE_ITS_FLAG.get(key, default)
    return _saved_augment(saved[key]) if key == "augment" else saved[key]


def _saved_augment(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config's augment settings as `TrainConfig.to_dict()` writes them now: tuples
    back from JSON lists, settings added since (grayscale, policy) at their defaults."""
    got = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    return {**dataclasses.asdict(AugmentSpec()), **got}


# the mars-train flags that set an AugmentSpec field, and the field each sets (--crop-scale-min
# sets the crop scale's lower end; its upper end is then 1)
AUGMENT_FLAGS = {"crop_scale_min": "scale", "jitter": "jitter", "grayscale": "grayscale",
                 "augment_policy": "policy"}  # fmt: skip


def _augment_flags(augment: Mapping[str, Any]) -> dict[str, Any]:
    """The value of each of AUGMENT_FLAGS that gives these augment settings (`asdict`'s)."""
    return {
        flag: augment[field][0] if field == "scale" else augment[field]
        for flag, field in AUGMENT_FLAGS.items()
    }


def _with_augment_flags(spec: AugmentSpec, flags: Mapping[str, Any]) -> AugmentSpec:
    """`spec` with what each of AUGMENT_FLAGS that is not None in `flags` sets."""
    fields = {AUGMENT_FLAGS[flag]: value for flag, value in flags.items() if value is not None}
    if "scale" in fields:
        fields["scale"] = (fields["scale"], 1.0)
    return dataclasses.replace(spec, **fields)


def config_from_flags(recipe: str, **flags: Any) -> TrainConfig:
    """The recipe's values, overridden by every flag that is not None; checks the values."""
    if recipe not in RECIPES:
        raise MarsvisionError(f"--recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    values = dict(RECIPES[recipe])
    flagged = {flag: flags.pop(flag, None) for flag in AUGMENT_FLAGS}
    crop_min, jitter, grayscale = (flagged[f] for f in ("crop_scale_min", "jitter", "grayscale"))
    if crop_min is not None and not 0 < crop_min <= 1:
        raise MarsvisionError(f"--crop-scale-min {crop_min}: must be in (0, 1]")
    if jitter is not None and not 0 <= jitter < 1:
        raise MarsvisionError(f"--jitter {jitter}: must be in [0, 1)")
    if grayscale is not None and not 0 <= grayscale <= 1:
        raise MarsvisionError(f"--grayscale {grayscale}: must be a probability in [0, 1]")
    values["augment"] = _with_augment_flags(values["augment"], flagged)
    values.update({k: v for k, v in flags.items() if v is not None})
    if is_refit(values):
        # val is training data: nothing is left to select on, so the last epoch is kept
        if values.get("select_from", 1.0) != 1.0:
            raise MarsvisionError(
                f"--select-from {values['select_from']}: with --train-on train+val val is "
                "training data and the last epoch is kept (--select-from 1, or leave it out)"
            )
        values["select_from"] = 1.0
    cfg = TrainConfig(recipe=recipe, **values)
    checks = [
        (cfg.epochs >= 1, f"--epochs {cfg.epochs}: need at least 1"),
        (cfg.batch_size >= 2, f"--batch-size {cfg.batch_size}: need at least 2 (BatchNorm)"),
        (math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr {cfg.lr}: must be a positive number"),
        (
            math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
            f"--weight-decay {cfg.weight_decay}: must be a number >= 0 (0 = off)",
        ),
        (
            math.isfinite(cfg.warmup_epochs) and cfg.warmup_epochs >= 0,
            f"--warmup-epochs {cfg.warmup_epochs}: must be a number >= 0 (0 = off)",
        ),
        (
            0 <= cfg.label_smoothing < 1,
            f"--label-smoothing {cfg.label_smoothing}: must be in [0, 1) (0 = off)",
        ),
        (
            cfg.limit is None or cfg.limit >= 2,
            f"--limit {cfg.limit}: need at least 2 (BatchNorm trains on two images or more)",
        ),
        (seed_in_range(cfg.seed), f"--seed {cfg.seed}: must be in {SEED_RANGE}"),
        (cfg.workers >= 0, f"--workers {cfg.workers}: cannot be negative"),
        (
            cfg.image_size >= MIN_INPUT_SIZE,
            f"--image-size {cfg.image_size}: must be at least {MIN_INPUT_SIZE} px (ResNet-50 "
            f"downsamples {MIN_INPUT_SIZE}x)",
        ),
        (
            cfg.store_size is None or cfg.store_size >= cfg.image_size,
            f"--store-size {cfg.store_size}: must be at least --image-size {cfg.image_size} "
            "(leave it out for the eval resize size)",
        ),
        (0 <= cfg.ema_decay < 1, f"--ema-decay {cfg.ema_decay}: must be in [0, 1)"),
        (
            math.isfinite(cfg.mixup) and cfg.mixup >= 0,
            f"--mixup {cfg.mixup}: must be a number >= 0 (0 = off)",
        ),
        (
            math.isfinite(cfg.cutmix) and cfg.cutmix >= 0,
            f"--cutmix {cfg.cutmix}: must be a number >= 0 (0 = off)",
        ),
        (
            math.isfinite(cfg.camera_adversary) and cfg.camera_adversary >= 0,
            f"--camera-adversary {cfg.camera_adversary}: must be a number >= 0 (0 = off)",
        ),
        (0 <= cfg.select_from <= 1, f"--select-from {cfg.select_from}: must be in [0, 1]"),
        (cfg.optimizer in OPTIMIZERS, f"optimizer {cfg.optimizer!r}: choose {OPTIMIZERS}"),
        (cfg.schedule in SCHEDULES, f"schedule {cfg.schedule!r}: choose {SCHEDULES}"),
        (
            cfg.augment.policy in AUGMENT_POLICIES,
            f"--augment-policy {cfg.augment.policy!r}: choose {', '.join(AUGMENT_POLICIES)}",
        ),
        (cfg.balance in BALANCES, f"--balance {cfg.balance!r}: choose {', '.join(BALANCES)}"),
        (cfg.device in DEVICES, f"--device {cfg.device!r}: choose {', '.join(DEVICES)}"),
        (cfg.amp in AMPS, f"--amp {cfg.amp!r}: choose {', '.join(AMPS)}"),
        (cfg.train_on in TRAIN_ON, f"--train-on {cfg.train_on!r}: choose {', '.join(TRAIN_ON)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise MarsvisionError(message)
    if 2 * cfg.warmup_epochs > cfg.epochs:  # it would end the run at the peak lr, never decayed
        cfg = dataclasses.replace(cfg, warmup_epochs=cfg.epochs / 2)
    return cfg


# TrainConfig fields that mars-train sets from a flag of the same name (`--batch-size` ...)
FLAG_FIELDS = ("task", "recipe", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
               "label_smoothing", "balance", "ema_decay", "image_size", "store_size", "seed",
               "limit", "init", "device", "amp", "crop_scale_min", "jitter", "grayscale",
               "augment_policy", "select_from", "mixup", "cutmix", "camera_adversary",
               "train_on")  # fmt: skip


def command_line(config: dict[str, Any], *, data: str = "DATA", out: str | None = None) -> str:
    """The mars-train command that reproduces `config` (a `TrainConfig.to_dict()`), every flag
    spelled out. Fails if the config holds a value no flag can set (optimizer, schedule,
    augmentation differing from its recipe's)."""
    recipe = RECIPES.get(config["recipe"])
    if recipe is None:
        raise MarsvisionError(f"config names an unknown recipe {config['recipe']!r}")
    config = dict(config)
    augment = _saved_augment(config["augment"])
    flagged = _augment_flags(augment)
    default = _augment_flags(dataclasses.asdict(recipe["augment"]))
    config.update({flag: v if v != default[flag] else None for flag, v in flagged.items()})
    for key in ("optimizer", "schedule", "augment"):
        want = recipe[key]
        got = config[key]
        if key == "augment":
            want = dataclasses.asdict(_with_augment_flags(want, flagged))
            got = augment
        if got != want:
            raise MarsvisionError(
                f"the config's {key} {got!r} differs from recipe {config['recipe']!r}; "
                "no mars-train flag sets it"
            )
    parts = ["mars-train", "--data", data]
    for name in FLAG_FIELDS:
        value = saved_setting(config, name)  # older configs lack newer flags
        if value is None or (name == "init" and value == "random"):
            continue
        if name in ("mixup", "cutmix", "camera_adversary") and value == 0:  # off, as before them
            continue
        if (name, value) in (("amp", "auto"), ("train_on", "train")):  # defaults, as in every
            continue  # run before their flag
        parts += [f"--{name.replace('_', '-')}", str(value)]
    parts += ["--out", out if out is not None else str(config["out"])]
    return " ".join(map(shlex.quote, parts))  # a path with a space stays one argument
