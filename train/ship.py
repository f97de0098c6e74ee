"""Ship a finished training run: its selected weights as fp16 under models/, scored again on val
and test with exactly those weights, a model card beside them, and a SHA256SUMS line.

    python -m marsvision.train.ship runs/binary --data ../shared/msl
    -> models/resnet50-binary.pt, models/resnet50-binary.md, models/SHA256SUMS
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning (see train/cli.py). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click
import numpy as np

from marsvision.runtime.errors import MarsvisionError, interruptible, signals_held
from marsvision.runtime.files import (
    atomic_write_text,
    check_writable_folder,
    make_folder,
    replace_durably,
)
from marsvision.runtime.metadata import sha256_file
from marsvision.runtime.models import SUMS_FILE, listed_sums, shipped_name
from marsvision.train.config import DEVICES

SCORED_SPLITS = ("val", "test")


@dataclass(frozen=True)
class ShipResult:
    """What `ship_run` wrote."""

    checkpoint: Path
    card: Path
    sha256: str
    size_bytes: int
    scores: dict[str, Any]  # split -> {"metrics", "ci95"}; val also "tta_flip", "argmax"


def score_checkpoint(
    ckpt: dict[str, Any],
    *,
    data_dir: Path,
    device: str = "auto",
    workers: int = 4,
    batch_size: int = 64,
    limit: int | None = None,
    threshold_on_val: bool = False,
) -> dict[str, Any]:
    """Metrics and bootstrap 95% intervals of a checkpoint's weights on the val and test splits
    (PyTorch, fp32 compute; the runtime's own output is scored by `mars-bench score`).

    Binary models with `threshold_on_val`: the decision threshold on P(positive) is chosen on
    val (`balanced_threshold`) and every label uses it; val's argmax metrics are kept beside.
    Val is also scored with `mars-infer --tta flip` (mean of image and mirror, same rule): both
    choices are made on val, so test is read once, with the chosen rule and no TTA. A model
    trained on half of val (`--train-on train+half-val`) is scored on the other half as val.
    """
    import torch

    from marsvision.runtime.metadata import decide
    from marsvision.train import data as msl
    from marsvision.train.checkpoint import model_from_checkpoint, preprocess_from_checkpoint
    from marsvision.train.config import val_to_score
    from marsvision.train.device import select_device
    from marsvision.train.images import eval_tensors
    from marsvision.train.loop import evaluate
    from marsvision.train.metrics import balanced_threshold, bootstrap_cis, classification_metrics

    dev = select_device(device)
    task, k = ckpt["task"], len(ckpt["class_names"])
    spec = preprocess_from_checkpoint(ckpt)
    model = model_from_checkpoint(ckpt).to(dev)
    labels, probs, sols = {}, {}, {}
    for split in SCORED_SPLITS:
        if split == "val":  # half of val may be training data
            samples = val_to_score(ckpt["config"], data_dir, task, limit)[1]
        else:
            samples = msl.read_split(data_dir, split, task, limit)
        y = np.array([s.label for s in samples])
        sols[split] = [msl.sol_key(s.path) for s in samples]
        x = eval_tensors(samples, spec=spec, workers=workers).to(dev)
        y_dev = torch.from_numpy(y).to(dev)
        _, probs[split] = evaluate(model, inputs=x, labels=y_dev, batch_size=batch_size, amp=False)
        labels[split] = y
        if split == "val":
            _, mirror = evaluate(model, inputs=x.flip(-1), labels=y_dev, batch_size=batch_size,
                                 amp=False)  # fmt: skip
            probs["val_flip"] = (probs[split] + mirror) / 2
    threshold = None
    if threshold_on_val and k == 2:
        if len(np.unique(labels["val"])) < 2:  # balanced accuracy needs both classes
            raise MarsvisionError(
                f"--threshold-on-val: the {len(labels['val'])} val images scored hold one class "
                "only; score more of val (a larger --limit, or none)"
            )
        threshold = balanced_threshold(labels["val"], probs["val"][:, 1])
    scores: dict[str, Any] = {"decision_threshold": threshold}
    for split in SCORED_SPLITS:
        y, pred = labels[split], decide(probs[split], threshold)
        scores[split] = {
            "metrics": classification_metrics(y, pred, k, task),
            "ci95": bootstrap_cis(y, pred, k, task, n_boot=1000, seed=0),
            "ci95_by_sol": bootstrap_cis(y, pred, k, task, n_boot=1000, seed=0, groups=sols[split]),
        }
    y = labels["val"]
    scores["val"]["tta_flip"] = classification_metrics(y, decide(probs["val_flip"], threshold),
                                                       k, task)  # fmt: skip
    scores["val"]["argmax"] = classification_metrics(y, probs["val"].argmax(1), k, task)
    return scores


def _write_sums(models_dir: Path, name: str, sha256: str) -> None:
    """SHA256SUMS with the shipped file `name`'s line new and the other files' lines as they
    were (`sha256sum -c SHA256SUMS` checks them): their bytes as they are now were listed, which
    vouched for a checkpoint changed since it shipped. Lines of files no longer there go."""
    listed = listed_sums(models_dir / SUMS_FILE) | {name: sha256}
    lines = [f"{d}  {n}" for n, d in sorted(listed.items()) if (models_dir / n).is_file()]
    atomic_write_text(models_dir / SUMS_FILE, "\n".join(lines) + "\n")


def source_training(ckpt: dict[str, Any], path: Path) -> tuple[str | None, float | None]:
    """Where and how long the checkpoint at `path` was trained, as far as it is recorded: a
    shipped checkpoint's card fields, else its run folder's metrics.json, else (a distilled
    checkpoint away from its run folder) its distill record. For the card and `int8_distill`."""
    shipped = ckpt.get("shipped") or {}
    if shipped.get("train_device"):
        return shipped["train_device"], shipped.get("train_seconds")
    metrics = path.parent / "metrics.json"
    if metrics.is_file():
        run = json.loads(metrics.read_text())
        return run.get("device"), run.get("seconds")
    earlier = ckpt.get("distill") or {}
    return earlier.get("source_train_device"), earlier.get("source_train_seconds")


def check_finished(ckpt: dict[str, Any], source: Path) -> None:
    """Refuse the checkpoint of an unfinished run (killed, or still training): it has no test
    metrics yet, which its model card reports."""
    from marsvision.train.checkpoint import is_finished

    if not is_finished(ckpt):
        raise MarsvisionError(
            f"{source} is from an unfinished run (no test metrics yet); finish it with "
            "mars-train --resume and the run's flags first"
        )


_REPLACE_HINT = (
    "; pass --replace to ship over it (make ship ... REPLACE=1), or ship to other --models"
)


def val_images(ckpt: dict[str, Any], *, scored_limit: int | None, n: int) -> tuple[Any, ...]:
    """Which val images a checkpoint's shipped val figures are of (`n` of them, scored with
    `scored_limit`): two models compare on val only where these are the same."""
    from marsvision.train.config import saved_setting

    cfg = ckpt["config"]
    return (cfg.get("train_on") or "train", saved_setting(cfg, "limit"), scored_limit, n,
            ckpt.get("data_fingerprint"))  # fmt: skip


def val_to_beat(out: Path, images: tuple[Any, ...]) -> float | None:
    """The val balanced accuracy that a model scored on `images` must reach to replace the
    shipped checkpoint `out` (None: there is none). One scored on other images, or a train+val
    refit's (its val is training data), cannot tell: refused before minutes of scoring.
    (`make ship` of the README's smoke run replaced the production model, its card and
    SHA256SUMS without a word.)"""
    from marsvision.train.checkpoint import load_checkpoint
    from marsvision.train.config import REFIT

    if not out.is_file():
        return None
    try:
        old = load_checkpoint(out)
        val = old["metrics"]["val"]
        old_images = val_images(old, scored_limit=old["shipped"].get("scored_limit"), n=val["n"])
        old_val = float(val["balanced_accuracy"])
    except (MarsvisionError, KeyError, TypeError, ValueError):
        raise MarsvisionError(
            f"{out} is there and is no shipped checkpoint this can compare with{_REPLACE_HINT}"
        ) from None
    if REFIT in (old_images[0], images[0]) or old_images != images:
        raise MarsvisionError(
            f"{out} is not replaced: their val figures are of other images (another --train-on, "
            "--limit, scoring --limit or data), or of training data (a train+val refit)"
            + _REPLACE_HINT
        )
    return old_val


def ship_run(
    run: Path,
    *,
    models_dir: Path,
    data_dir: Path,
    device: str = "auto",
    workers: int = 4,
    limit: int | None = None,
    notes: Sequence[str] = (),
    threshold_on_val: bool = False,
    replace: bool = False,
) -> ShipResult:
    """Write the run's selected checkpoint with fp16 weights, its scores and its model card
    (`notes`: lines for the card's Notes section, e.g. why this model ships and what it misses;
    a shipped model shipped again keeps its notes when none are given). A shipped model already
    in `models_dir` is replaced only by one at least as good on the same val images, or with
    `replace`."""
    from marsvision.train import data as msl
    from marsvision.train.card import render_card
    from marsvision.train.checkpoint import atomic_torch_save, half_state, load_checkpoint
    from marsvision.train.config import command_line, is_refit, val_to_score

    check_writable_folder(models_dir, "--models")  # before minutes of scoring, not after
    source = run / "checkpoint.pt" if run.is_dir() else run
    ckpt = load_checkpoint(source)
    check_finished(ckpt, source)
    if threshold_on_val and len(ckpt["class_names"]) != 2:
        raise MarsvisionError(
            f"--threshold-on-val: binary models only; {source} is a {ckpt['task']} model "
            "(it labels by the most probable class)"
        )
    msl.check_same_data(ckpt, data_dir, source)
    msl.check_all_listed(data_dir, ckpt["task"])  # the card reads all; the scoring --limit
    if threshold_on_val and is_refit(ckpt["config"]):
        raise MarsvisionError(
            f"--threshold-on-val: {source} was trained on val too (--train-on train+val), so "
            "val cannot choose its threshold"
        )
    out = models_dir / shipped_name(ckpt["task"])
    to_beat = None
    if not replace:  # the images compared before the scoring, the score after
        n_val = len(val_to_score(ckpt["config"], data_dir, ckpt["task"], limit)[1])
        to_beat = val_to_beat(out, val_images(ckpt, scored_limit=limit, n=n_val))
    command = command_line(ckpt["config"], data="../shared/msl", out=f"runs/{ckpt['task']}")
    shipped = dict(ckpt)
    shipped["state_dict"] = half_state(ckpt["state_dict"])
    shipped["weights_dtype"] = "float16"
    scores = score_checkpoint(shipped, data_dir=data_dir, device=device, workers=workers,
                              limit=limit, threshold_on_val=threshold_on_val)  # fmt: skip
    shipped["decision_threshold"] = scores["decision_threshold"]
    train_device, train_seconds = source_training(ckpt, source)
    # a shipped checkpoint shipped again (e.g. with --threshold-on-val) keeps its source: its own
    # metrics are the earlier ship's fp16 scores, and its file is not the run's checkpoint
    earlier = ckpt.get("shipped") or {}
    earlier_fp32 = ckpt["metrics"].get("fp32_run") if earlier else None
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    shipped["metrics"] = {
        **{s: scores[s]["metrics"] for s in SCORED_SPLITS},
        "ci95": {s: scores[s]["ci95"] for s in SCORED_SPLITS},
        "ci95_by_sol": {s: scores[s]["ci95_by_sol"] for s in SCORED_SPLITS},
        "best_epoch": ckpt["metrics"].get("best_epoch", ckpt.get("epoch")),
        "stopped_early_after_epoch": ckpt["metrics"].get("stopped_early_after_epoch"),
        "fp32_run": earlier_fp32 or {s: ckpt["metrics"][s] for s in SCORED_SPLITS},
        "val_tta_flip": scores["val"]["tta_flip"],
        "val_argmax": scores["val"]["argmax"],
    }
    shipped["shipped"] = {
        "date": now,
        "command": command,
        "source_checkpoint_sha256": earlier.get("source_checkpoint_sha256") or sha256_file(source),
        "scored_limit": limit,
        "train_device": train_device,
        "train_seconds": train_seconds,
        "notes": list(notes or earlier.get("notes") or ()),
    }
    make_folder(models_dir, "--models")
    card = out.with_suffix(".md")
    # the checkpoint and its card are written aside and go in together: a failure before
    # (rendering the card, a Ctrl-C) leaves the folder's model, card and SHA256SUMS as they were
    staged, staged_card = (p.with_name(f".{p.name}.staged") for p in (out, card))
    try:
        atomic_torch_save(shipped, staged)
        sha, size = sha256_file(staged), staged.stat().st_size
        atomic_write_text(staged_card, render_card(shipped, file_name=out.name, sha256=sha,
                                                   size_bytes=size, data_dir=data_dir))  # fmt: skip
        new_val = scores["val"]["metrics"]["balanced_accuracy"]
        if to_beat is not None and new_val < to_beat:
            raise MarsvisionError(
                f"{out} is not replaced: it scores val balanced accuracy {to_beat:.4f}, this "
                f"model {new_val:.4f}{_REPLACE_HINT}"
            )
        with signals_held():  # the model, its card and SHA256SUMS change together
            replace_durably(staged, out)
            replace_durably(staged_card, card)
            _write_sums(models_dir, out.name, sha)
    finally:
        staged.unlink(missing_ok=True)
        staged_card.unlink(missing_ok=True)
    return ShipResult(out, card, sha, size, scores)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--models",
    "models_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("models"),
    show_default=True,
    help="Folder to ship into.",
)
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="MSL data folder (default: $MARS_DATA).")  # fmt: skip
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where to score (auto: cuda where a GPU is).")  # fmt: skip
@click.option("--workers", type=int, default=4, show_default=True, help="Decoding threads.")
@click.option("--limit", type=int, default=None,
              help="Score on at most N images per split (quick checks only).")  # fmt: skip
@click.option("--note", "notes", multiple=True,
              help="A line for the model card's Notes section (repeatable; a shipped model "
              "shipped again keeps its notes unless --note is given).")  # fmt: skip
@click.option("--replace", is_flag=True,
              help="Ship over the model already in --models even where it scored better on "
              "val (or on other val images, which cannot tell).")  # fmt: skip
@click.option("--threshold-on-val/--argmax", "threshold_on_val", default=False, show_default=True,
              help="Binary models: label by a threshold on P(positive) chosen on val for "
              "balanced accuracy, or by the most probable class (on the MSL splits the "
              "threshold chosen on val does not carry to test: RECIPES.md).")  # fmt: skip
def main(
    run: Path,
    models_dir: Path,
    data: Path | None,
    device: str,
    workers: int,
    limit: int | None,
    notes: tuple[str, ...],
    replace: bool,
    threshold_on_val: bool,
) -> None:
    """Ship RUN (a mars-train run folder or its checkpoint.pt): fp16 weights, val and test
    scores of those weights with 95% intervals, a model card and SHA256SUMS in --models."""
    from marsvision.train.data import resolve_data_dir

    with interruptible("ship"):  # the staged files are removed
        result = ship_run(run, models_dir=models_dir, data_dir=resolve_data_dir(data),
                          device=device, workers=workers, limit=limit, notes=notes,
                          threshold_on_val=threshold_on_val, replace=replace)  # fmt: skip
    t = result.scores["decision_threshold"]
    if t is not None:
        argmax = result.scores["val"]["argmax"]
        click.echo(f"decision threshold, chosen on val: P(positive) >= {float(t)!r} (argmax "
                   f"instead: val accuracy {argmax['accuracy']:.4f} balanced "
                   f"{argmax['balanced_accuracy']:.4f})")  # fmt: skip
    for split in SCORED_SPLITS:
        m, ci = result.scores[split]["metrics"], result.scores[split]["ci95"]
        by_sol = result.scores[split]["ci95_by_sol"]["accuracy"]
        click.echo(f"{split}: accuracy {m['accuracy']:.4f} ({ci['accuracy'][0]:.4f}-"
                   f"{ci['accuracy'][1]:.4f}; by sol {by_sol[0]:.4f}-{by_sol[1]:.4f}) balanced "
                   f"{m['balanced_accuracy']:.4f} f1 {m['f1']:.4f} (n={m['n']})")  # fmt: skip
    flip = result.scores["val"]["tta_flip"]
    click.echo(f"val with mars-infer --tta flip: accuracy {flip['accuracy']:.4f} balanced "
               f"{flip['balanced_accuracy']:.4f}")  # fmt: skip
    click.echo(f"wrote {result.checkpoint} ({result.size_bytes / 1e6:.1f} MB, sha256 "
               f"{result.sha256[:12]}...), {result.card.name} and {SUMS_FILE}")  # fmt: skip


if __name__ == "__main__":
    main()
