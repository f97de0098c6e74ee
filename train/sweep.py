"""Recipe search on val inside a time budget, made for a short GPU lease: train the candidate
recipes in turn while the budget allows, ship the best on val (fp16 checkpoint, scores, card),
and split the shipped file into parts small enough to come back from the machine.

    python -m marsvision.train.sweep --data DATA --task binary --budget-min 8 \\
        --runs /tmp/runs --out $OUT          # $OUT: parts, card, SHA256SUMS, sweep.json
    cat resnet50-binary.pt.part* > resnet50-binary.pt && sha256sum -c SHA256SUMS   # here

Every candidate is a set of mars-train flags, so the shipped model's card holds the one command
that reproduces it. Candidates are selected on val alone; only the shipped run's test metrics are
reported. With `--seeds 0,1` each candidate is trained once per seed and ranked by its mean val
score (the seed alone moved the CPU recipe by up to 11.6 points on val: RECIPES.md, "Seed noise");
the chosen candidate's best seed on val ships. `--set train_on=train+val` refits one candidate with
one seed on train and val together (its val is training data: nothing is ranked) and ships it;
`--set train_on=train+half-val` trains every run on train and the first half of val by sol and
ranks them on the second half (`mars-train --train-on`). With `--distill` every finished run is
then put through quantization-aware self-distillation (`python -m marsvision.train.int8_distill`,
`--distill-epochs` epochs, on the same device) and ranked, shipped and reported by its distilled
checkpoint: the GPU runs' own INT8 failed parity, and the distillation moves val scores by more
than most recipes differ (-4.6 to +3.4 points: RECIPES.md, "Distilling further"), so the choice is
made on the model that would ship.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning (see train/cli.py). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click

from marsvision.runtime.errors import MarsvisionError, interruptible
from marsvision.runtime.files import atomic_write_text, check_writable_folder, make_folder

# name -> mars-train flags over the default recipe (224 px, 60 epochs), in the order they run:
# the most promising first, since a short budget may reach only the first few.
GROUP_ZOOM: dict[str, Any] = {"balance": "group", "crop_scale_min": 0.08}  # DEVELOPERS.md: MAHLI
B256: dict[str, Any] = {"batch_size": 256, "lr": 2e-3}  # group-zoom-b256's batch (below)
CANDIDATES: dict[str, dict[str, Any]] = {
    "default": {},
    "group-zoom": GROUP_ZOOM,
    # the CPU-shipped recipe at its 128 px, 60 epochs: a third of a 224 px run (160 px on the
    # CPU was no better on val in one run; RECIPES.md, "Seed noise")
    "group-zoom-128": {**GROUP_ZOOM, "image_size": 128},
    # batch 256 (learning rate x2, the square root of the batch ratio): on the H200 batch 64 ran
    # at about 1,700 img/s at 224 and 128 px, bound by the step's host side; batch 256 at 4,440
    # img/s at 224 px and up to 11,600 at 128 px, and 74.0 on val at 224 px against group-zoom's
    # 77.3 (one seed each; RECIPES.md, "The second GPU session"). The EMA needs no change: its
    # ramp (1 + step) / (10 + step) stays under 0.998 for either run.
    "group-zoom-b256": {**GROUP_ZOOM, "batch_size": 256, "lr": 2e-3},
    # the same for 120 epochs (70.4 on val at 224 px, one seed)
    "group-zoom-b256-long": {**GROUP_ZOOM, "batch_size": 256, "lr": 2e-3, "epochs": 120},
    # untried: group-zoom-b256 with each label's share of the loss as the class balance gives it
    # (under `group`, binary train's Rover, 31% of the images, took 63% of the weight, and most
    # of the shipped model's errors are Surface called Rover)
    "group-label-zoom-b256": {**B256, **GROUP_ZOOM, "balance": "group-label"},
    "zoom": {"crop_scale_min": 0.08},
    "group": {"balance": "group"},
    "group-zoom-long": {**GROUP_ZOOM, "epochs": 120},
    # MixUp 0.2 or CutMix 1.0, one per batch: regularization for long from-scratch runs (at 128
    # px for 15 epochs on the CPU it scored below the seed mean on val: RECIPES.md, "MixUp and
    # CutMix")
    "group-zoom-mix": {**GROUP_ZOOM, "mixup": 0.2, "cutmix": 1.0, "epochs": 120},
    # on the CPU (128 px, over the shipped recipe: 30 epochs seed 2, 15 epochs seed 0) within
    # noise of 0.1 in both runs
    "no-smoothing": {"label_smoothing": 0.0},
    "px160-long": {"image_size": 160, "epochs": 150},
    "blog": {"recipe": "blog"},
    # last: on the CPU (128 px, 30 and 15 epochs) below its controls on val and test in both runs
    # (RECIPES.md, "No label smoothing, strong weight decay")
    "strong-wd": {"weight_decay": 0.2, "lr": 2e-3},
}
PART_BYTES = 16 * 2**20 - 4096  # under the device tool's 16 MiB per returned file
RESERVE_S = 45.0  # kept back at the end: shipping, splitting, writing the summary
DISTILL_RESERVE_S = 60.0  # kept back per run for --distill until one was timed (~7 min on CPU)
DISTILLED = "distilled.pt"  # --distill's checkpoint, in the run's folder


def parse_settings(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`key=value` pairs (TrainConfig field names) applied over every candidate, each value read
    as mars-train reads its flag (`none`: unset, for a flag that has no default)."""
    from marsvision.train.cli import main as train_cli
    from marsvision.train.config import FLAG_FIELDS

    options = {p.name: p for p in train_cli.params}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in FLAG_FIELDS:
            raise MarsvisionError(
                f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(FLAG_FIELDS)}"
            )
        if key == "task":
            raise MarsvisionError(f"--set {pair!r}: give the task with --task")
        option = options[key]
        if value == "none" and option.default is None:
            out[key] = None
            continue
        try:
            out[key] = option.type.convert(value, option, None)
        except click.BadParameter as e:
            raise MarsvisionError(f"--set {pair!r}: {e.message}") from None
    return out


def split_file(path: Path, out_dir: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """Copy `path` into `out_dir` as `<name>.part0`, `.part1`, ... of at most `part_bytes`."""
    parts: list[Path] = []
    with open(path, "rb") as f:
        while chunk := f.read(part_bytes):
            part = out_dir / f"{path.name}.part{len(parts)}"
            part.write_bytes(chunk)
            parts.append(part)
    return parts


def predicted_s(
    epochs: int,
    size: int,
    s_per_epoch: dict[tuple[int, int], float],
    batch: int = 64,
    overhead_s: float = 0.0,
) -> float | None:
    """A candidate's seconds for `epochs` at input `size` and `batch`, from the seconds per epoch
    measured so far for each (input size, batch size) (None before the first run), plus a run's
    `overhead_s` (decoding, the first epoch's warm-up, the final scoring): its own pair's, else
    the nearest measured pair's (the same batch first, then the nearest size), scaled up, never
    down: by the area for a larger input, and by the batch ratio for a smaller batch (more steps
    an epoch). On the H200 a 128 px epoch took as long as a 224 px one at batch 64 (2.9 against
    2.6 s: the step's host side, not its arithmetic, set the time), so scaling down by the area
    ran a 60-epoch candidate predicted at 59 s into the deadline at epoch 47; batch 256 ran 2.5
    times faster than 64 at 224 px (RECIPES.md, "The second GPU session"), so a batch-256 epoch
    does not stand for a batch-64 one, which is assumed up to 4 times slower."""
    if not s_per_epoch:
        return None
    if (size, batch) in s_per_epoch:
        return float(s_per_epoch[size, batch] * epochs + overhead_s)
    near = min(s_per_epoch, key=lambda k: (k[1] != batch, abs(k[0] - size), k[0], k[1]))
    scale = max(1.0, (size / near[0]) ** 2) * max(1.0, near[1] / batch)
    return float(s_per_epoch[near] * epochs * scale + overhead_s)


def epoch_pace(history: list[dict[str, Any]], seconds: float) -> tuple[float, float]:
    """(typical seconds per epoch, the rest of the run's `seconds`) of a finished run: the median
    epoch, so that the first epoch's warm-up (21 s of 60 epochs' 123 s on the H200) counts once
    as overhead, not in every epoch's pace. A history without epoch times (an older checkpoint's
    resume) gives the mean and no overhead."""
    times = [e["seconds"] for e in history if "seconds" in e]
    if len(times) != len(history) or not times:
        return seconds / len(history), 0.0
    typical = statistics.median(times)
    return typical, max(0.0, seconds - typical * len(times))


def run_overhead(rest_s: dict[tuple[int, int], float], key: tuple[int, int]) -> float:
    """The seconds a run at `key` (input size, batch) is predicted to spend outside its epochs
    (the final scoring, the distillation, any decoding and warm-up), from `rest_s`, the rest of
    the latest finished run at each key: the latest at the same key, since a call's first run
    alone pays for decoding the images (the sweep's later runs share them) and for cuDNN's
    warm-up (on the H200 about 8 and 21 s, against runs of 40-75 s), else the largest measured
    (a new input size decodes its images again and tunes new shapes)."""
    if key in rest_s:
        return rest_s[key]
    return max(rest_s.values(), default=0.0)


def _val_key(val: dict[str, float]) -> tuple[float, float]:
    return val["balanced_accuracy"], val["accuracy"]


def rank_candidates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each candidate's finished runs summed up (mean val over its seeds), best first. A candidate
    whose later seeds did not fit the budget is ranked on those that did (`seeds` lists them)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "done":
            by_name.setdefault(r["name"], []).append(r)
    ranked = []
    for name, runs in by_name.items():
        mean = {k: sum(r["val"][k] for r in runs) / len(runs)
                for k in ("balanced_accuracy", "accuracy")}  # fmt: skip
        best = max(runs, key=lambda r: _val_key(r["val"]))
        ranked.append({"name": name, "seeds": [r["seed"] for r in runs], "val_mean": mean,
                       "val_balanced_accuracy": [r["val"]["balanced_accuracy"] for r in runs],
                       "best_run": best["run"]})  # fmt: skip
    return sorted(ranked, key=lambda c: _val_key(c["val_mean"]), reverse=True)


def run_sweep(
    *,
    data_dir: Path,
    task: str,
    names: list[str],
    settings: dict[str, Any],
    budget_s: float,
    runs_dir: Path,
    out_dir: Path,
    workers: int,
    seeds: tuple[int, ...] = (0,),
    distill: bool = False,
    distill_epochs: int = 1,
) -> dict[str, Any]:
    """Train each candidate once per seed, in order, within `budget_s`; ship into `out_dir` the
    best seed on val of the candidate with the best mean val (`distill`: of the runs' distilled
    checkpoints, see the module's docstring)."""
    if "seed" in settings:
        raise MarsvisionError("--set seed=...: give the seeds with --seeds (e.g. --seeds 0,1)")
    if not (math.isfinite(budget_s) and budget_s > 0):
        raise MarsvisionError(f"--budget-min {budget_s / 60:g}: must be a positive number")
    if len(set(names)) != len(names):  # a repeat trained into the same run folder again
        raise MarsvisionError(f"--candidates {','.join(names)}: name each candidate once")
    if not seeds or len(set(seeds)) != len(seeds):
        raise MarsvisionError(f"--seeds {seeds}: give one or more distinct seeds, e.g. 0,1")
    from marsvision.train.config import (
        SEED_RANGE,
        config_from_flags,
        holds_half_val,
        is_refit,
        seed_in_range,
    )

    if not all(map(seed_in_range, seeds)):  # one message for them all
        raise MarsvisionError(f"--seeds {','.join(map(str, seeds))}: each must be in {SEED_RANGE}")
    check_writable_folder(out_dir, "--out")  # before the budget is spent, not after
    from marsvision.train.data import check_all_listed

    check_all_listed(data_dir, task)  # as the ship at the end reads them all

    refit = is_refit(settings)
    if refit and len(names) * len(seeds) > 1:
        raise MarsvisionError(
            "--set train_on=train+val: a refit's val is training data and cannot rank runs; "
            "refit one candidate with one seed (--candidates NAME --seeds N)"
        )
    from marsvision.runtime.models import SUMS_FILE, shipped_name
    from marsvision.train.images import decoded_once
    from marsvision.train.int8_distill import distill_file
    from marsvision.train.loop import main as train
    from marsvision.train.ship import ship_run

    plan = []  # every run's config, checked before the first trains: not after a lease is spent
    for name, seed in [(n, s) for n in names for s in seeds]:
        flags = {**CANDIDATES[name], **settings, "seed": seed}
        recipe = flags.pop("recipe", "default")
        run = name if len(seeds) == 1 else f"{name}-seed{seed}"
        cfg = config_from_flags(recipe, data=data_dir, out=runs_dir / run, task=task,
                                workers=workers, **flags)  # fmt: skip
        plan.append((name, seed, run, cfg))
    t_start = time.monotonic()
    deadline = t_start + budget_s - RESERVE_S
    rows: list[dict[str, Any]] = []
    s_per_epoch: dict[tuple[int, int], float] = {}  # (size, batch) -> slowest typical epoch
    rest_s: dict[tuple[int, int], float] = {}  # (size, batch) -> the latest run's rest there
    distill_s = DISTILL_RESERVE_S  # the last distillation's time
    distill_error = None  # the first failure turns --distill off: the runs are not lost
    with decoded_once():  # each file decoded once per preprocessing for all runs
        for name, seed, run, cfg in plan:
            row: dict[str, Any] = {"name": name, "seed": seed, "run": run, "config": cfg.to_dict()}
            left = deadline - time.monotonic()
            key = (cfg.image_size, cfg.batch_size)
            predicted = predicted_s(
                cfg.epochs, cfg.image_size, s_per_epoch, cfg.batch_size, run_overhead(rest_s, key)
            )
            if left < 30 or (predicted is not None and predicted > left):
                row["status"] = f"skipped: predicted {predicted or 0:.0f} s, {left:.0f} s left"
                rows.append(row)
                print(f"sweep: {run} {row['status']}", file=sys.stderr)
                continue
            print(f"sweep: training {run} ({left:.0f} s left)", file=sys.stderr)
            t0 = time.monotonic()
            try:
                result = train(cfg, deadline=deadline - (distill_s if distill else 0.0))
            except Exception as e:  # noqa: BLE001 - one failed candidate must not lose the others
                row["status"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                print(f"sweep: {run} {row['status']}", file=sys.stderr)
                continue
            if distill:
                t_distill = time.monotonic()
                try:
                    d = distill_file(cfg.out / "checkpoint.pt", cfg.out / DISTILLED,
                                     data_dir=data_dir, limit=cfg.limit, workers=workers,
                                     batch_size=min(32, cfg.batch_size),  # its default
                                     epochs=distill_epochs, device=str(cfg.device))  # fmt: skip
                except Exception as e:  # noqa: BLE001 - keep the trained runs, ranked as trained
                    distill, distill_error = False, f"{run}: {type(e).__name__}: {str(e)[:300]}"
                    print(f"sweep: --distill failed, off from here on ({distill_error})",
                          file=sys.stderr)  # fmt: skip
                else:
                    distill_s = time.monotonic() - t_distill
                    row["distilled"] = {"val": d["metrics"]["val"], "test": d["metrics"]["test"],
                                        "seconds": distill_s}  # fmt: skip
            seconds = time.monotonic() - t0
            epochs_done = len(result["history"])
            if epochs_done:
                typical, rest = epoch_pace(result["history"], seconds)
                s_per_epoch[key] = max(s_per_epoch.get(key, 0.0), typical)
                rest_s[key] = rest
            row.update(status="done", seconds=seconds, epochs_done=epochs_done,
                       best_epoch=result["best_epoch"], val=result["val"],
                       stopped_early_after_epoch=result["stopped_early_after_epoch"],
                       test=result["test"])  # fmt: skip
            rows.append(row)
        for r in rows:  # all distilled: ranked, shipped and reported so (the trained val kept)
            done = r.pop("distilled", None)
            if done and distill:
                r.update(trained_val=r["val"], distill_seconds=done["seconds"], val=done["val"],
                         test=done["test"])  # fmt: skip
        ranked = rank_candidates(rows)
        if not ranked:
            raise MarsvisionError("no candidate finished: " + "; ".join(r["status"] for r in rows))
        best_run = ranked[0]["best_run"]
        for r in rows:  # selection is on val: only the shipped run's test metrics are reported
            if r["status"] == "done" and r["run"] != best_run:
                del r["test"]
        make_folder(out_dir, "--out")
        chosen = runs_dir / best_run / (DISTILLED if distill else "checkpoint.pt")
        shipped = ship_run(chosen, models_dir=runs_dir / "models", data_dir=data_dir,
                           device=settings.get("device", "auto"), workers=workers,
                           limit=settings.get("limit"), replace=True)  # fmt: skip
    parts = split_file(shipped.checkpoint, out_dir)
    shutil.copy(shipped.card, out_dir / shipped.card.name)
    atomic_write_text(out_dir / SUMS_FILE, f"{shipped.sha256}  {shipped_name(task)}\n")
    summary = {
        "task": task,
        "chosen": ranked[0]["name"],
        "shipped_run": best_run,
        "seeds": list(seeds),
        "distilled": distill,
        "distill_error": distill_error,
        "selected_on": "nothing: one refit on train and val (--set train_on=train+val)"
        if refit
        else "mean val balanced accuracy over the seeds (ties: val accuracy); "
        "then the chosen candidate's best seed on val"
        + (
            "; val: its second half by sol, the first is training data (train+half-val)"
            if holds_half_val(settings)
            else ""
        ),
        "ranking": ranked,
        "budget_s": budget_s,
        "seconds": time.monotonic() - t_start,
        "shipped": {
            "file": shipped_name(task),
            "sha256": shipped.sha256,
            "size_bytes": shipped.size_bytes,
            "parts": [p.name for p in parts],
            "scores": shipped.scores,
        },
        "candidates": rows,
    }
    atomic_write_text(out_dir / "sweep.json", json.dumps(summary, indent=2) + "\n")
    return summary


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="MSL data folder (default: $MARS_DATA).")  # fmt: skip
@click.option("--task", default="binary", show_default=True, help="binary or msl25.")
@click.option("--candidates", default=",".join(CANDIDATES), show_default=True,
              help="Candidate names, in the order they run.")  # fmt: skip
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="A mars-train setting for every candidate (e.g. device=cuda).")  # fmt: skip
@click.option("--budget-min", type=float, required=True, help="Wall-clock budget in minutes.")
@click.option("--runs", type=click.Path(path_type=Path), default=Path("runs/sweep"),
              show_default=True, help="Folder of the candidates' run folders.")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Where the shipped parts, card, SHA256SUMS and sweep.json go.")  # fmt: skip
@click.option("--seeds", default="0", show_default=True,
              help="Comma-separated seeds: each candidate trains once per seed, ranked by its "
                   "mean val.")  # fmt: skip
@click.option("--workers", type=int, default=8, show_default=True, help="Decoding threads.")
@click.option("--distill/--no-distill", default=False, show_default=True,
              help="Distill each run for INT8 (int8_distill) and rank, ship and report the "
                   "distilled checkpoints.")  # fmt: skip
@click.option("--distill-epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Epochs of each --distill.")  # fmt: skip
def main(
    data: Path | None, task: str, candidates: str, sets: tuple[str, ...], budget_min: float,
    runs: Path, out: Path, seeds: str, workers: int, distill: bool, distill_epochs: int,
) -> None:  # fmt: skip
    """Train candidate recipes within a time budget; ship the best on val, in parts."""
    from marsvision.train.data import check_task, resolve_data_dir

    names = [n for n in candidates.split(",") if n]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        raise MarsvisionError(
            f"--candidates: unknown {unknown}; choose from {', '.join(CANDIDATES)}"
        )
    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise MarsvisionError(f"--seeds {seeds!r}: expected integers like 0,1,2") from None
    with interruptible("sweep"):  # a checkpoint being written is removed, not left as .tmp
        summary = run_sweep(data_dir=resolve_data_dir(data), task=check_task(task), names=names,
                            settings=parse_settings(sets), budget_s=60 * budget_min,
                            runs_dir=runs, out_dir=out, workers=workers, seeds=seed_list,
                            distill=distill, distill_epochs=distill_epochs)  # fmt: skip
    for r in summary["candidates"]:
        val = r.get("val")
        click.echo(f"{r['run']:>22}  {r['status']:<8}" + (
            f"  val acc {val['accuracy']:.4f} bal {val['balanced_accuracy']:.4f}  epochs "
            f"{r['epochs_done']}  {r['seconds']:.0f} s" if val else ""))  # fmt: skip
    if len(seed_list) > 1:
        for c in summary["ranking"]:
            mean = c["val_mean"]
            click.echo(f"{c['name']:>22}  mean of {len(c['seeds'])} seeds: val acc "
                       f"{mean['accuracy']:.4f} bal {mean['balanced_accuracy']:.4f}")  # fmt: skip
    test = summary["shipped"]["scores"]["test"]["metrics"]
    click.echo(f"chosen on val: {summary['chosen']} ({summary['shipped_run']}); shipped weights: "
               f"test accuracy {test['accuracy']:.4f} balanced {test['balanced_accuracy']:.4f} f1 "
               f"{test['f1']:.4f}; parts in {out}")  # fmt: skip


if __name__ == "__main__":
    main()
