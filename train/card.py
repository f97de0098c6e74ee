"""The model card of a shipped checkpoint: what it is, how it was trained, how well it does."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from marsvision.runtime.models import artifact_name
from marsvision.train import data as msl
from marsvision.train.config import (
    HALF_VAL,
    REFIT,
    first_selectable_epoch,
    holds_half_val,
    is_refit,
    saved_setting,
)

_METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1")


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


# What the card says test was used for: every run scores it, the code chooses nothing by it
# ("test read once" was read as "seen once", and people choosing among runs had seen more).
_TEST_USE = " test used for no choice the code makes."
# Val's figures are those of the weights val chose (a reader took its intervals for test's kind).
_VAL_CHOSE = (
    " Val chose these weights (the epoch, and the run by the ship rule), so its figures are "
    "optimistic and its intervals do not say how the model generalises: quote test's. Every run "
    "prints its test figures, so a choice among runs made by hand may have seen them: RECIPES.md "
    "says where one did."
)


def _metric_rows(shipped: dict[str, Any]) -> list[str]:
    m, ci = shipped["metrics"], shipped["metrics"]["ci95"]
    by_sol = m.get("ci95_by_sol")  # cards shipped before 2026-11-25: none
    rows = ["| split | n | " + " | ".join(n.replace("_", " ") for n in _METRICS) + " |",
            "|---|---|" + "---|" * len(_METRICS)]  # fmt: skip
    held = holds_half_val(shipped["config"])
    for split in ("val", "test"):
        name = "val, held-out half" if split == "val" and held else split
        cells = [f"{_pct(m[split][n])} ({_pct(ci[split][n][0])}-{_pct(ci[split][n][1])})"
                 for n in _METRICS]  # fmt: skip
        rows.append(f"| {name} | {m[split]['n']} | " + " | ".join(cells) + " |")
        if by_sol:
            cells = [f"({_pct(by_sol[split][n][0])}-{_pct(by_sol[split][n][1])})"
                     for n in _METRICS]  # fmt: skip
            rows.append(f"| {name}, by sol | | " + " | ".join(cells) + " |")
    return rows


def _class_figures(shipped: dict[str, Any]) -> list[str]:
    """A binary model's recall and F1 of each class: the table's precision, recall and F1 are
    Rover's (the larger class of val and test), so how Surface fared was in no line of the card."""
    names, m = shipped["class_names"], shipped["metrics"]
    if len(names) != 2 or any("per_class_recall" not in m[split] for split in ("val", "test")):
        return []
    held = holds_half_val(shipped["config"])

    def by_split(values: dict[str, list[float | None]]) -> str:
        return "; ".join(
            ("val, held-out half" if split == "val" and held else split) + " "
            + " and ".join(f"{n} {'-' if v is None else _pct(v)}"
                           for n, v in zip(names, values[split], strict=True))
            for split in ("val", "test")
        )  # fmt: skip

    recalls = {split: m[split]["per_class_recall"] for split in ("val", "test")}
    lines = [
        f"Recall of each class (the share of its images given its label): {by_split(recalls)}."
    ]
    if all("confusion_matrix" in m[split] for split in ("val", "test")):
        f1s = {split: _class_f1(m[split]["confusion_matrix"]) for split in ("val", "test")}
        lines.append(f"F1 of each class: {by_split(f1s)}.")
    return [*lines, ""]


def _class_f1(cm: list[list[int]]) -> list[float | None]:
    """Each class's F1 from a confusion matrix (rows true, columns predicted): twice its hits
    over its images and its predictions together; None where it has neither."""
    out: list[float | None] = []
    for c in range(len(cm)):
        images, predicted = sum(cm[c]), sum(row[c] for row in cm)
        out.append(2 * cm[c][c] / (images + predicted) if images + predicted else None)
    return out


def _confusion(shipped: dict[str, Any]) -> list[str]:
    names = shipped["class_names"]
    test = shipped["metrics"]["test"]
    if len(names) == 2:
        cm = test["confusion_matrix"]
        return ["| true \\ predicted | " + " | ".join(names) + " |", "|---|---|---|",
                *(f"| {names[i]} | {cm[i][0]} | {cm[i][1]} |" for i in range(2))]  # fmt: skip
    rows = ["| class | test images | recall |", "|---|---|---|"]
    support = [sum(r) for r in test["confusion_matrix"]]
    for name, n, r in zip(names, support, test["per_class_recall"], strict=True):
        rows.append(f"| {name} | {n} | {'-' if r is None else _pct(r)} |")
    return rows


def _splits(data_dir: Path, task: str, *, half: bool) -> dict[str, list[msl.Sample]]:
    """The official splits by name (with `half`, val's two halves by sol too:
    `data.halve_by_sol`)."""
    sets = {split: msl.read_split(data_dir, split, task) for split in msl.SPLITS}
    if half:
        first, second = msl.halve_by_sol(sets["val"])
        sets["val: first half by sol (trained on)"] = first
        sets["val: second half (held out, selects)"] = second
    return sets


def _frames(samples: list[msl.Sample]) -> int:
    """How many camera frames the samples show (`data.frame_key`)."""
    return len({msl.frame_key(s.path) for s in samples})


def _split_counts(sets: dict[str, list[msl.Sample]], task: str, names: list[str]) -> list[str]:
    """The splits' sizes: images, camera frames (`data.frame_key`), and labels or classes."""
    rows = ["| split | images | frames | " + " | ".join(names) + " |" if task == "binary" else
            "| split | images | frames | classes present |",
            "|---|---|---|" + ("---|" * len(names) if task == "binary" else "---|")]  # fmt: skip
    for split, samples in sets.items():
        labels = Counter(s.label for s in samples)
        head = f"| {split} | {len(samples):,} | {_frames(samples):,} |"
        if task == "binary":
            rows.append(head + " " + " | ".join(f"{labels[i]:,}" for i in range(2)) + " |")
        else:
            rows.append(f"{head} {len(labels)} of {len(names)} |")
    return rows


def _surface_cameras(official: dict[str, list[msl.Sample]], msl_names: list[str]) -> str:
    """Binary: which camera took each split's Surface images, and of what. Val's and test's are
    MAHLI close-ups, train's Mastcam views: the held-out Surface figures are of other pictures
    than most of train's, which no line of the card said."""

    def counted(keys: list[str]) -> str:
        return ", ".join(f"{key} {n:,}" for key, n in Counter(keys).most_common())

    surface = {split: [s for s in got if s.label == 0] for split, got in official.items()}
    mahli = {
        split: [s for s in got if msl.camera(s.path) == "MH"] for split, got in surface.items()
    }
    return (
        "- Surface images by camera: "
        + "; ".join(f"{split} {counted([msl.camera(s.path) for s in got])}"
                    for split, got in surface.items())
        + ". So the Surface figures of val and test are mostly MAHLI close-ups' (val's "
        + counted([msl_names[s.msl_class] for s in mahli["val"]]) + "; test's "
        + counted([msl_names[s.msl_class] for s in mahli["test"]])
        + "), and say little of the Mastcam ground and horizon views that make most of train's."
    )  # fmt: skip


def _data_limits(sets: dict[str, list[msl.Sample]], task: str, msl_names: list[str]) -> list[str]:
    """Limits of the data itself: frames kept in several products; for binary, the cameras of
    the Surface images; for msl25, the classes a split lacks and the frames whose products carry
    two classes."""
    official = {split: sets[split] for split in msl.SPLITS}
    test = official["test"]
    lines = [
        "- Many images are other products of one camera frame (a thumbnail, a full image, a "
        "subframe: names that differ only in the code before `_DRCL`, such as `C00` and `I01`; "
        f"test's {len(test):,} images are {_frames(test):,} frames): "
        "the metrics count each image, and the intervals over images take such copies for "
        "independent draws, one more reason to quote those by sol."
    ]
    if task == "binary":
        lines.append(_surface_cameras(official, msl_names))
    if task == "msl25":
        missing = [(split, sorted(set(range(msl.NUM_MSL_CLASSES)) - {s.msl_class for s in got}))
                   for split, got in official.items()]  # fmt: skip
        lines.append(
            "- MSL classes without images: "
            + "; ".join(f"{split} {', '.join(map(str, gone)) or 'none'}" for split, gone in missing)
            + " (selecting on val cannot see the classes val lacks)."
        )
        classes: dict[str, set[int]] = {}
        for s in (s for got in official.values() for s in got):
            classes.setdefault(msl.frame_key(s.path), set()).add(s.msl_class)
        if two := sum(len(c) > 1 for c in classes.values()):
            lines.append(f"- {two} frames have products labeled with different classes (such as "
                         "ground and horizon): label noise the metrics cannot remove.")  # fmt: skip
    return lines


def _tta(m: dict[str, Any]) -> list[str]:
    """Whether `mars-infer --tta flip` helps, decided on val (cards shipped before: nothing)."""
    flip = m.get("val_tta_flip")
    if flip is None:
        return []
    val = m["val"]
    better = (flip["balanced_accuracy"], flip["accuracy"]) > (
        val["balanced_accuracy"], val["accuracy"])  # fmt: skip
    verdict = ("it helps on val: classify with `--tta flip`" if better else
               "it does not help on val: leave it off (the default)")  # fmt: skip
    return [
        f"Test-time augmentation, decided on val: with `mars-infer --tta flip` (the mean of each "
        f"image and its mirror) val accuracy is {_pct(flip['accuracy'])} and balanced accuracy "
        f"{_pct(flip['balanced_accuracy'])}, against {_pct(val['accuracy'])} and "
        f"{_pct(val['balanced_accuracy'])} without; {verdict}. Test is not read with it.",
        "",
    ]


def _decision(shipped: dict[str, Any]) -> str:
    """The label rule, as the runtime applies it (exports carry the threshold)."""
    t, names, m = shipped.get("decision_threshold"), shipped["class_names"], shipped["metrics"]
    if t is None:
        return "the most probable class"
    argmax = m.get("val_argmax") or {}
    instead = (f"; the most probable class instead: val accuracy {_pct(argmax['accuracy'])}, "
               f"balanced {_pct(argmax['balanced_accuracy'])}") if argmax else ""  # fmt: skip
    return (f"{names[1]} when P({names[1]}) >= {float(t)!r}, else {names[0]}: the threshold "
            f"chosen on val for balanced accuracy (middle of the thresholds within 0.5 points of "
            f"the best){instead}")  # fmt: skip


def _notes(notes: list[str]) -> list[str]:
    """The Notes section (what the shipper said about this model), or nothing."""
    if not notes:
        return []
    return ["## Notes", "", *(f"- {n}" for n in notes), ""]


def _distilled(shipped: dict[str, Any]) -> list[str]:
    """The table row of `python -m marsvision.train.int8_distill`, if this model went through it
    (records from before 2026-12-04's third session lack the date, machine and time)."""
    d = shipped.get("distill")
    if not d:
        return []
    when = ", ".join(x for x in (d.get("device"), d.get("seconds") and
                                 f"{d['seconds'] / 60:.1f} min") if x)  # fmt: skip
    grids = {"trt": "TensorRT's int8 grid", "cpu": "uint8 after ReLUs"}
    grid = grids.get(d["flavour"], d["flavour"])
    epochs = f"{d['epochs']} epoch" + ("s" if d["epochs"] != 1 else "")
    # the settings that change the weights: batch size and images too (a sweep's --set did)
    if "batch_size" in d:
        epochs += f", batch {d['batch_size']}"
    if d.get("limit"):
        epochs += f", at most {d['limit']} images per split"
    return [
        f"| distilled for INT8 | {d.get('date', 'date not recorded')}"
        + (f" ({when})" if when else "")
        + f": `python -m marsvision.train.int8_distill`, {epochs}, {grid}, lr {d['lr']:g}, "
        f"seed {d['seed']}; from the checkpoint sha256 `{d['source_checkpoint_sha256']}` |"
    ]


def _start(cfg: dict[str, Any]) -> str:
    """What training started from: random weights, or the `--init` weights file."""
    init = cfg.get("init") or "random"
    if init == "random":
        return "trained from scratch (no ImageNet weights)"
    return f"trained from the weights file `{Path(init).name}` (`--init`)"


def _fp32_scores(shipped: dict[str, Any]) -> str:
    """The sentence on the fp32 weights' scores (and, if distilled, the source run's)."""
    fp32, d = shipped["metrics"]["fp32_run"], shipped.get("distill")
    val, test = _pct(fp32["val"]["accuracy"]), _pct(fp32["test"]["accuracy"])
    if not d:
        return f"The run's own fp32 weights scored {val} on val and {test} on test (accuracy)."
    src = d["source_metrics"]
    return (f"The distilled fp32 weights scored {val} on val and {test} on test (accuracy); the "
            f"run before the distillation {_pct(src['val']['accuracy'])} and "
            f"{_pct(src['test']['accuracy'])} (balanced {_pct(src['val']['balanced_accuracy'])} "
            f"and {_pct(src['test']['balanced_accuracy'])}).")  # fmt: skip


def _libraries(shipped: dict[str, Any]) -> str:
    def listed(versions: dict[str, str]) -> str:
        return ", ".join(f"{k} {v}" for k, v in versions.items())

    later = (shipped.get("distill") or {}).get("versions")
    if not later or later == shipped["versions"]:
        return listed(shipped["versions"])
    return f"training: {listed(shipped['versions'])}; distillation: {listed(later)}"


def render_card(
    shipped: dict[str, Any], *, file_name: str, sha256: str, size_bytes: int, data_dir: Path
) -> str:
    """Markdown model card of a shipped checkpoint dict (see `marsvision.train.ship`)."""
    task, names = shipped["task"], shipped["class_names"]
    info, m = shipped["shipped"], shipped["metrics"]
    cfg, pre = shipped["config"], shipped["preprocess"]
    seconds = info.get("train_seconds")
    device = info.get("train_device")
    trained = (f"{device}, " + (f"{seconds / 60:.1f} min" if seconds else "time not recorded")
               if device else "device and time not recorded in the checkpoint")  # fmt: skip
    positive = (
        "Rover is the positive class of precision, recall and F1"
        if task == "binary"
        else "precision, recall and F1 are macro averages over the classes with images in the "
        "split or predicted by the model (scikit-learn's default: a class predicted with no "
        "images counts as 0, so recall can fall below balanced accuracy)"
    )
    limited = (f" on at most {info['scored_limit']} images per split (a quick check, not the "
               "whole splits)") if info.get("scored_limit") else ""  # fmt: skip
    stopped = (f" (stopped after epoch {m['stopped_early_after_epoch']}: time budget)"
               if m.get("stopped_early_after_epoch") else "")  # fmt: skip
    refit, half = is_refit(cfg), holds_half_val(cfg)
    sets = _splits(data_dir, task, half=half)
    how = {
        REFIT: " on the official MSL train and val splits together (a refit: the recipe and its "
        "epoch count were chosen on val by an earlier run; this run keeps its last epoch, so its "
        "val numbers below are training-set numbers),"
        + _TEST_USE,
        HALF_VAL: " on the official MSL train split and the first half of val by sol (val's sols "
        "in order, every other one), the epoch chosen on the other half alone (the val numbers "
        "below are that held-out half's),"
        + _TEST_USE,
    }.get(cfg.get("train_on"), " on the official MSL train split, the epoch chosen on val alone,"
          + _TEST_USE)  # fmt: skip
    source_row, source_kind = "source run checkpoint", "fp32"
    if shipped.get("distill"):
        source_row, source_kind = "source checkpoint", "fp32, distilled"
        how = how[: -len(_TEST_USE)] + (
            f" then distilled for INT8 on train images (below);{_TEST_USE}")  # fmt: skip
    chosen = (
        "the last (val is training data)"
        if refit
        else f"selected on {'the held-out half of ' if half else ''}val balanced accuracy"
    )
    if not refit and m["best_epoch"] < first_selectable_epoch(
        saved_setting(cfg, "select_from"), cfg["epochs"]
    ):  # the time budget ended the run before the epochs it selects from: the last is kept
        chosen = "kept as the last one run, before the epochs --select-from selects from"
    # an export folder holds one model: the binary one's (mars-infer's default) is `exports`
    exports = "exports" if task == "binary" else f"exports-{task}"
    run_limit = saved_setting(cfg, "limit")  # its halves are those of its first N val images
    if run_limit:  # the card said "on the official MSL train split" of a 64-image smoke run
        how = how[: -len(".")] + (
            f"; trained and selected on at most the first {run_limit} images of each split "
            f"(`--limit {run_limit}`: a quick check, not a model to use)."
        )
    score_held = (
        "    mars-bench score preds.csv --data ../shared/msl --split val --val-half held"
        + (f" --train-limit {run_limit}" if run_limit else "")
        + "   # val: the held-out half"
    )
    lines = [
        f"# {file_name}: ResNet-50, MSL `{task}` task",
        "",
        f"marsvision's shipped {task} model: {len(names)} classes ({', '.join(names[:5])}"
        + (", ..." if len(names) > 5 else "")
        + "), "
        + _start(cfg)
        + how,
        "",
        "| | |",
        "|---|---|",
        f"| file | `{file_name}`, {size_bytes / 1e6:.1f} MB (fp16 conv/linear weights; BatchNorm "
        "and biases fp32) |",
        f"| sha256 | `{sha256}` |",
        f"| shipped | {info['date']} |",
        f"| trained | {shipped['created']} ({trained}); epoch {m['best_epoch']} of "
        f"{cfg['epochs']} {chosen}{stopped} |",
        f"| input | {pre['input_size']} px RGB: resize shorter side to {pre['resize_size']} "
        f"({pre['interpolation']}), center crop, mean {pre['mean']}, std {pre['std']} |",
        f"| label rule | {_decision(shipped)} |",
        *_distilled(shipped),
        f"| {source_row} | sha256 `{info['source_checkpoint_sha256']}` ({source_kind}) |",
        f"| libraries | {_libraries(shipped)} |",
        "",
        *_notes(info.get("notes") or []),
        "## Data and split",
        "",
        "MSL surface images (Curiosity), Stanboli and Wagstaff 2017, Zenodo doi "
        "10.5281/zenodo.1049137; the official split files, unchanged (by sol: test is later in "
        "the mission). Data fingerprint (sha256 of the split and synset files): "
        f"`{shipped['data_fingerprint']}`."
        + (
            " Binary task: Surface = MSL classes 5 (drill holes), 8 (ground), 9 (horizon); "
            "Rover = every other class."
            if task == "binary"
            else ""
        ),
        "",
        *_split_counts(sets, task, names),
        "",
        "## Training command",
        "",
        "    " + info["command"],
        "",
        "## Metrics of the shipped weights",
        "",
        f"PyTorch evaluation of exactly these fp16 weights (computed in fp32){limited}, in "
        f"percent, with bootstrap 95% intervals from 1,000 resamples of the images; {positive}; "
        'labels by the label rule above. The rows "by sol" resample whole sols instead: '
        "images of one sol often show one scene and are right or wrong together, so these are "
        "the intervals to quote (those over images are too narrow)."
        + ("" if refit else _VAL_CHOSE),
        "",
        *_metric_rows(shipped),
        "",
        *_class_figures(shipped),
        *([] if refit else _tta(m)),  # a refit's val is training data: it decides nothing
        _fp32_scores(shipped),
        "",
        # the shipped weights', as the metrics above (the sentence before is the run's)
        f"{'Test confusion' if task == 'binary' else 'Test recall by class'} of the shipped "
        f"weights{limited}:",
        "",
        *_confusion(shipped),
        "",
        "## Use and check it",
        "",
        f"    mars-export --checkpoint models/{file_name} --data ../shared/msl --int8 "
        f"--out {exports}",
        f"    mars-bench parity --artifacts {exports} --data ../shared/msl   # INT8 against "
        "PyTorch: use an INT8 file where it passes",
        f"    mars-infer ../shared/msl/calibrated --engine "
        f"{exports}/{artifact_name(task, 'int8-cpu')} --out preds.csv",
        "    mars-bench score preds.csv --data ../shared/msl --split test      # the test metrics,"
        " from the runtime",
        *([score_held] if half else []),
        "",
        "## Limits",
        "",
        "- Trained on Curiosity images of the cameras "
        + ", ".join(sorted({msl.camera(s.path) for s in sets["train"]}))
        + " only (MH: MAHLI, the arm's close-up imager; ML, MR: Mastcam, the mast's); other "
        "cameras (Navcam, Hazcam) or missions are out of distribution, and are labelled as "
        "confidently as any (so are blank frames: README, 'What its probabilities mean').",
        "- The splits are by sol: val and test come from later in the mission, with different "
        "content and class balance than train.",
        *_data_limits(sets, task, msl.msl_class_names(data_dir)),
    ]
    return "\n".join(lines) + "\n"
