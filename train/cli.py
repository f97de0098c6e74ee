"""`mars-train`: train and validate ResNet-50 on the MSL splits, or download the data set.

Flags become a `TrainConfig` here; everything below takes explicit arguments.
Progress and logs go to stderr; the final summary to stdout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a small shared CPU, spinning threads made
# training 10-20x slower (measured on 2 vCPUs under load). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click

from marsvision.runtime.files import file_identity
from marsvision.train.config import (
    AMPS,
    AUGMENT_POLICIES,
    BALANCES,
    DEVICES,
    RECIPES,
    TRAIN_ON,
    TrainConfig,
    config_from_flags,
)
from marsvision.train.data import TASKS

_DEFAULTS = TrainConfig(data=Path("."), out=Path("."))  # the defaults, in one place


def _choices(values: Iterable[str]) -> str:
    """A flag's values as the help shows a click Choice's (`[a|b]`): mars-train checks them in
    config_from_flags, which --set and sweeps go through too, with one-line errors."""
    return "[" + "|".join(values) + "]"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="MSL data folder (default: $MARS_DATA).",
)
@click.option(
    "--download",
    is_flag=True,
    help="Download msl-images.zip from Zenodo into --data DIR (or $MARS_DATA), then exit.",
)
@click.option("--task", default=_DEFAULTS.task, show_default=True, metavar=_choices(TASKS),
              help="Surface vs Rover, or all 25 MSL classes.")  # fmt: skip
@click.option(
    "--recipe",
    default=_DEFAULTS.recipe,
    show_default=True,
    metavar=_choices(RECIPES),
    help="Defaults for the flags below.",
)
@click.option("--epochs", type=int, default=None, help="[recipe: 60; blog 50]")
@click.option("--batch-size", type=int, default=None, help="[recipe: 64; blog 32]")
@click.option(
    "--lr", type=float, default=None, help="Peak learning rate [1e-3 AdamW; blog 0.01 SGD]."
)
@click.option("--weight-decay", type=float, default=None, help="[0.05; blog 0]")
@click.option(
    "--warmup-epochs", type=float, default=None, help="[3; blog 0] (at most half the run)"
)
@click.option("--label-smoothing", type=float, default=None, help="[0.1; blog 0]")
@click.option(
    "--balance",
    default=None,
    metavar=_choices(BALANCES),
    help="Class imbalance: loss (weights by label), group (weights by camera and MSL class, so "
    "rare kinds inside a label count: MAHLI ground, drill holes; it also gives the label with "
    "more groups more weight), group-label (group weights with each label's total as loss "
    "gives it), sampler or none [loss; blog none].",
)
@click.option(
    "--ema-decay",
    type=float,
    default=None,
    help="EMA of weights per step, 0 = off [0.998; blog 0].",
)
@click.option(
    "--crop-scale-min",
    type=float,
    default=None,
    help="Smallest random-resized-crop area, as a fraction: smaller zooms in further "
    "[0.35; blog 0.08].",
)
@click.option(
    "--jitter",
    type=float,
    default=None,
    help="Colour jitter strength: brightness, contrast and saturation each scaled by a factor "
    "in 1 +- this [0.2; blog 0].",
)
@click.option(
    "--grayscale",
    type=float,
    default=None,
    help="Probability that a training image is made grey, so that colour alone cannot say "
    "hardware or ground [0].",
)
@click.option(
    "--augment-policy",
    type=click.Choice(AUGMENT_POLICIES),
    default=None,
    help="Augmentation policy on top of the crop, flip and jitter: 'trivial' gives each "
    "training image one TrivialAugment op at a random strength [none].",
)
@click.option(
    "--mixup",
    type=float,
    default=None,
    help="MixUp: blend each image with another, labels weighted by a share drawn from "
    "Beta(this, this); 0 = off [0].",
)
@click.option(
    "--cutmix",
    type=float,
    default=None,
    help="CutMix: paste a box of another image, labels weighted by area, Beta(this, this); "
    "0 = off; with --mixup too, one of the two per batch [0].",
)
@click.option(
    "--camera-adversary",
    type=float,
    default=None,
    help="Camera-adversarial training: a head learns to tell MAHLI from Mastcam from the "
    "features while the network, through a reversed gradient scaled up to this, learns to hide "
    "it, so that 'close-up = Rover' is no shortcut; 0 = off [0].",
)
@click.option(
    "--select-from",
    type=float,
    default=None,
    help="Keep the best epoch on val from this fraction of the epochs on (0 = any epoch; 1 = "
    "the last) [0.5].",
)
@click.option(
    "--image-size",
    type=int,
    default=_DEFAULTS.image_size,
    show_default=True,
    help="Input size (>= 32).",
)
@click.option(
    "--store-size",
    type=int,
    default=None,
    help="Decode the training images once at this shorter side (>= --image-size), the crops "
    "and zooms then sample it: more of the file's pixels than the eval resize size [the eval "
    "resize size, image-size / 0.875].",
)
@click.option("--device", default=_DEFAULTS.device, show_default=True,
              metavar=_choices(DEVICES), help="auto: cuda where a GPU is.")  # fmt: skip
@click.option(
    "--amp",
    default=_DEFAULTS.amp,
    show_default=True,
    metavar=_choices(AMPS),
    help="bf16 autocast and channels_last for training and selection: auto (on CUDA only), "
    "bf16 (also on a CPU with AMX: about 2.5x faster there) or off (fp32). Reported val/test "
    "numbers are fp32 either way.",
)
@click.option(
    "--train-on",
    default=_DEFAULTS.train_on,
    show_default=True,
    metavar=_choices(TRAIN_ON),
    help="train; train+val: a refit of a recipe chosen on val by an earlier run (same flags, "
    "its epoch count); val is then training data, the last epoch is kept, and the val numbers "
    "reported are training-set numbers; or train+half-val: train and the first half of val by "
    "sol (every other sol), the epoch selected on the second half, whose numbers are the val "
    "numbers reported.",
)
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option("--limit", type=int, default=None, help="At most N images per split (quick runs).")
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Run folder [runs/<task>]."
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its resume.pt.")
@click.option(
    "--init",
    default=_DEFAULTS.init,
    show_default=True,
    help="'random' or a torchvision ResNet-50 weights file.",
)
@click.option(
    "--workers",
    type=int,
    default=_DEFAULTS.workers,
    show_default=True,
    help="Image decoding threads.",
)
def main(
    data: Path | None, download: bool, task: str, recipe: str, epochs: int | None,
    batch_size: int | None, lr: float | None, weight_decay: float | None,
    warmup_epochs: float | None, label_smoothing: float | None, balance: str | None,
    ema_decay: float | None, crop_scale_min: float | None, jitter: float | None,
    grayscale: float | None, augment_policy: str | None, mixup: float | None, cutmix: float | None,
    camera_adversary: float | None, select_from: float | None, image_size: int,
    store_size: int | None, device: str, amp: str, train_on: str, seed: int, limit: int | None,
    out: Path | None, resume: bool, init: str, workers: int,
) -> None:  # fmt: skip
    """Train ResNet-50 on the MSL images; write checkpoint, metrics and plots to --out."""
    from marsvision.runtime.errors import (
        MarsvisionError,
        echo_note,
        echo_result,
        interruptible,
        option_values,
        out_of_room,
        require_extra,
    )

    if download:
        from marsvision.train.data import DATA_ENV, data_dir_setting
        from marsvision.train.download import download_msl

        dest = data_dir_setting(data)
        if dest is None:
            raise MarsvisionError(
                f"--download needs --data DIR or ${DATA_ENV} (where to put the data set)"
            )
        with interruptible("mars-train"):  # the partial download is removed
            path = download_msl(dest)
        echo_result(str(path))
        return
    require_extra("mars-train", "train", "torch", "torchvision")
    from marsvision.train.data import check_task, resolve_data_dir

    with option_values():
        check_task(task)
    data_dir = resolve_data_dir(data)
    with option_values():
        cfg = config_from_flags(
            recipe, data=data_dir, out=out or Path("runs") / task, task=task,
            epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, balance=balance,
            ema_decay=ema_decay, crop_scale_min=crop_scale_min, jitter=jitter, grayscale=grayscale,
            augment_policy=augment_policy, mixup=mixup, cutmix=cutmix,
            camera_adversary=camera_adversary, select_from=select_from, image_size=image_size,
            store_size=store_size, device=device, amp=amp, train_on=train_on, seed=seed,
            limit=limit, init=init, resume=resume, workers=workers,
        )  # fmt: skip
    asked = RECIPES[recipe]["warmup_epochs"] if warmup_epochs is None else warmup_epochs
    if cfg.warmup_epochs < asked:
        echo_note(f"mars-train: a warm-up of {asked:g} epochs is over half the {cfg.epochs}-"
                  f"epoch run: {cfg.warmup_epochs:g} (the lr then decays)")  # fmt: skip
    from marsvision.train.loop import RESUME_EVERY_S
    from marsvision.train.loop import main as train
    from marsvision.train.resume import RESUME

    before = file_identity(cfg.out / RESUME)  # an earlier run's, until this one saves its own

    def hint() -> str:  # said once stopped
        return stop_hint(cfg.out, resuming=cfg.resume, before=before, every_s=RESUME_EVERY_S)

    with interruptible("mars-train", hint=hint), out_of_room(cfg.out):
        result = train(cfg)
    test = result["test"]
    (lo, hi), (f1_lo, f1_hi) = test["ci95"]["accuracy"], test["ci95"]["f1"]
    sol_lo, sol_hi = test["ci95_by_sol"]["accuracy"]
    by_sol = f"accuracy CI resampling whole sols {sol_lo:.4f}-{sol_hi:.4f}"
    if not test["sols"]:  # each image was its own group: that interval is the one over images
        by_sol = "no CI by sol (no test file name is an MSL product's, whose sol it gives)"
    seen = " (trained on: not a held-out score)" if cfg.refit else ""
    secs = [h["seconds"] for h in result["history"] if "seconds" in h]
    ran = len(secs)
    of_f1 = "Rover" if cfg.task == "binary" else "macro"
    each = sum(secs) / max(ran, 1)  # a resumed run's too: the run's, not this command's
    pace = f"; the run's {ran} epoch{'s' * (ran != 1)}, {each:.1f} s each" if ran else ""
    echo_result(f"{'kept' if cfg.refit else 'best'} epoch {result['best_epoch']}: val accuracy "
                f"{result['val']['accuracy']:.4f} balanced "
                f"{result['val']['balanced_accuracy']:.4f}{seen}\n"
                f"selected on {result['selected_on']}{pace}\n"
                f"test accuracy {test['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f}) balanced "
                f"{test['balanced_accuracy']:.4f} f1 ({of_f1}) "
                f"{test['f1']:.4f} ({f1_lo:.4f}-{f1_hi:.4f}) "
                f"(n={test['n']}); {by_sol}\n"
                f"wrote {cfg.out}/checkpoint.pt, metrics.json, predictions_test.csv, "
                "curves.png, confusion_test.png, config.json, resume.pt")  # fmt: skip


def stop_hint(out: Path, *, resuming: bool, before: tuple[int, ...] | None, every_s: float) -> str:
    """What a stopped mars-train adds: whether `--resume` can continue it. Before the first
    save there is nothing to resume, and a resume.pt as it was when the run began (`before`,
    `file_identity`) is an earlier run's, kept until this one's images are decoded: "--resume
    continues" led to a refusal naming that run's flags. A `resuming` run's is its own."""
    from marsvision.train.resume import RESUME

    every = f"{every_s / 60:g} minutes"
    now = file_identity(out / RESUME)
    if now is not None and (resuming or now != before):
        return (f"; the same command with --resume continues from the last {RESUME} (saved "
                f"every {every})")  # fmt: skip
    return (f"; no {RESUME} of this run yet to continue from (the first is saved at the end of "
            f"the first epoch that ends {every} or more into training, after the images are "
            "decoded)")  # fmt: skip


if __name__ == "__main__":
    main()
