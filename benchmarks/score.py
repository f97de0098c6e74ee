"""Score a model from what users get: mars-infer's own result file against an official MSL split,
or against a user's own labelled images (`benchmarks.labels`).

The rows (CSV or JSONL, read by `benchmarks.predictions`) are matched to the images by file
name; their labels (the model's decisions) give the metrics, bootstrap confidence intervals and
optional pass/fail requirements. The task and class names come from the file itself.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from marsvision.benchmarks.labels import Truth, read_labels
from marsvision.benchmarks.predictions import (
    PredictionRow,
    model_provenance,
    read_predictions,
    recorded_model_classes,
    resolve_task,
    short_list,
)
from marsvision.runtime.errors import MarsvisionError
from marsvision.train.data import CAMERAS, VAL_HALVES, Sample, camera, sol_key
from marsvision.train.metrics import at_least

# Exit code of `mars-bench score` when a --require fails: the same as `mars-bench parity`'s
# PARITY_FAIL_EXIT (1 is a user error, 2 a usage error, as click defines them).
SCORE_FAIL_EXIT = 3
METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1")
N_BOOT = 1000
SEED = 0
_WORST = 6  # (camera, class) groups listed in the terminal summary
LABELLED = "labelled set"  # a user's own labelled images, in messages
_HALF_TEXT = {
    "held": ", its second half by sol (held out by a train+half-val model: its val)",
    "trained": ", its first half by sol (a train+half-val model's training data)",
}


@dataclass(frozen=True)
class ScoreConfig:
    """What `run_score` does; the CLI builds it from its flags."""

    predictions: Path
    # the MSL data; with `labels` only needed for an msl25 --top-k file (its class names)
    data_dir: Path | None
    split: str = "test"
    # with split "val": only one half of val by sol ("trained" or "held", `data.VAL_HALVES`): a
    # `--train-on train+half-val` model's own val is the held half, the other is its training data
    val_half: str | None = None
    # with val_half: the --limit of that model's training run, which halved its first N val
    # images (`config.val_to_score`); None: it read all of val
    train_limit: int | None = None
    # a user's labelled images (a CSV file or a class-per-subfolder folder, `labels.py`),
    # scored instead of the split
    labels: Path | None = None
    allow_missing: bool = False
    requirements: dict[str, float] = field(default_factory=dict)
    n_boot: int = N_BOOT
    seed: int = SEED

    def __post_init__(self) -> None:
        if self.labels is not None and self.val_half is not None:
            raise MarsvisionError("--val-half is a half of val: not with --labels")
        if self.labels is None and self.data_dir is None:
            raise MarsvisionError("scoring a split needs the MSL data folder (--data)")
        if self.val_half is not None and self.val_half not in VAL_HALVES:
            raise MarsvisionError(
                f"unknown half of val {self.val_half!r}; choose from {', '.join(VAL_HALVES)}"
            )
        if self.val_half is not None and self.split != "val":
            raise MarsvisionError(
                f"--val-half is a half of val: it needs --split val, not {self.split}"
            )
        if self.train_limit is not None and self.val_half is None:
            raise MarsvisionError("--train-limit says how a model halved val: it needs --val-half")
        if self.train_limit is not None and self.train_limit < 1:
            raise MarsvisionError(f"--train-limit is a number of images, not {self.train_limit}")

    @property
    def part(self) -> str:
        """What is scored: the split's name, "val-held" / "val-trained" for a half of val, or
        "labels-<the labels' name>" (as given: a link's own; `run_score` adds their sha256)."""
        if self.labels is not None:
            given = self.labels if self.labels.name not in ("", "..") else self.labels.resolve()
            return f"labels-{given.stem}"
        return f"{self.split}-{self.val_half}" if self.val_half else self.split

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready resolved config."""
        return {
            "predictions": str(self.predictions),
            "data_dir": None if self.data_dir is None else str(self.data_dir),
            "split": None if self.labels else self.split,
            "val_half": self.val_half,
            "train_limit": self.train_limit,
            "labels": None if self.labels is None else str(self.labels),
            "allow_missing": self.allow_missing,
            "requirements": dict(self.requirements),
            "n_boot": self.n_boot,
            "seed": self.seed,
        }


def split_truths(samples: Sequence[Sample]) -> list[Truth]:
    """The truths of an MSL split's samples: grouped by sol, errors listed by camera and MSL
    class."""
    return [
        Truth(s.path.name, s.label, sol_key(s.path), (camera(s.path), s.msl_class)) for s in samples
    ]


def score_predictions(
    rows: Sequence[PredictionRow],
    truths: Sequence[Truth],
    class_names: list[str],
    task: str,
    *,
    listed: tuple[str, Sequence[str]],
    allow_missing: bool = False,
    group_by: str = "sol",
    what: str = "split",
    n_boot: int = N_BOOT,
    seed: int = SEED,
) -> dict[str, Any]:
    """Metrics and bootstrap CIs of the rows' labels (the model's decisions) against the truths,
    matched by file name; the second interval resamples whole groups (`group_by`: "sol", or a
    labels file's "group"), reported as cis_by_<group_by>: None for images of one group, whose
    resamples are all the same. Errors are counted by the truths' `listed` (camera, class id)
    under the key `listed[0]` ("msl_class", "class"), and named by `listed[1]`, the names of
    those ids. `what` names the truths in messages ("split", "half", "labelled set").
    A metric undefined on these images (`metrics.undefined_metrics`: binary recall with no
    positive truth, say) is None, its intervals too; `left_out` counts the resamples each
    interval leaves out, where the metric is undefined.

    Every truth needs exactly one row, with status ok; otherwise a user error, or with
    `allow_missing` the image is left out and counted. Rows for other images are ignored.
    """
    from marsvision.train.metrics import (
        bootstrap,
        classification_metrics,
        confidence_report,
        per_class_metrics,
        undefined_metrics,
    )

    counted = collections.Counter(t.name for t in truths)
    twice = sorted(name for name, k in counted.items() if k > 1)
    if twice:
        raise MarsvisionError(
            f"the {what} labels the same file name more than once ({short_list(twice)}): rows "
            "are matched by file name"
        )
    wanted = set(counted)
    found: dict[str, list[PredictionRow]] = {}
    outside = 0
    for r in rows:
        if r.name in wanted:
            found.setdefault(r.name, []).append(r)
        else:
            outside += 1
    index = {name: i for i, name in enumerate(class_names)}
    excluded: dict[str, list[str]] = {"missing": [], "failed": [], "duplicated": []}
    y_true, y_pred, groups = [], [], []
    confidence: list[float | None] = []
    errors: dict[tuple[str, int], list[int]] = {}  # (camera, class) -> [images, errors]
    key, names = listed
    wrong: list[dict[str, Any]] = []  # each image labelled wrong
    for t in truths:
        mine = found.get(t.name, [])
        if not mine:
            excluded["missing"].append(t.name)
        elif len(mine) > 1:
            excluded["duplicated"].append(t.name)
        elif mine[0].status != "ok" or mine[0].label is None:
            excluded["failed"].append(t.name)
        else:
            y_true.append(t.label)
            y_pred.append(index[mine[0].label])
            confidence.append(mine[0].confidence)
            groups.append(t.group)
            g = errors.setdefault(t.listed, [0, 0])
            g[0] += 1
            g[1] += y_pred[-1] != t.label
            if y_pred[-1] != t.label:
                wrong.append({"path": mine[0].path, "label": class_names[t.label],
                              "decision": mine[0].label, "confidence": mine[0].confidence,
                              "camera": t.listed[0],
                              f"{key}_name": names[t.listed[1]]})  # fmt: skip
    problems = [f"{len(v)} {k} ({short_list(v)})" for k, v in excluded.items() if v]
    if not found:  # a file of another split's images: not "1305 missing"
        hint = (
            "rows are matched by file name"
            if what == LABELLED
            else "a file of another split, or of val's other half? score it with that --split "
            "(--val-half)"
        )
        raise MarsvisionError(
            f"none of its {outside} rows is of the {len(truths)} images scored: {hint}"
        )
    if problems and not allow_missing:
        raise MarsvisionError(
            f"the predictions do not cover the {what}'s {len(truths)} images once each with "
            f"status ok: {'; '.join(problems)}; rerun mars-infer on them, or pass "
            "--allow-missing to score the rest"
        )
    if not y_true:
        raise MarsvisionError(f"none of the {what}'s {len(truths)} images has an ok row")
    k = len(class_names)
    undefined = undefined_metrics(y_true, y_pred, k, task)
    cis, left_out = bootstrap(y_true, y_pred, k, task, n_boot=n_boot, seed=seed)
    # images of one sol are one observation and err together: the honest interval
    by_group, left_out_by_group = (
        bootstrap(y_true, y_pred, k, task, n_boot, seed, groups=groups)
        if len(set(groups)) > 1
        else (None, {})
    )
    metrics = classification_metrics(y_true, y_pred, k, task)
    return {
        "task": task,
        "class_names": list(class_names),
        "positive_class": class_names[1] if task == "binary" else None,
        # a metric undefined on these images (0/0) is None, not the 0 it counts as in training
        "metrics": {**metrics, **dict.fromkeys(undefined)},
        "undefined": undefined,
        "cis": {**cis, **dict.fromkeys(undefined)},
        "group_by": group_by,
        f"cis_by_{group_by}": by_group and {**by_group, **dict.fromkeys(undefined)},
        # resamples each interval leaves out, [by image, by group]: the metric is undefined there
        "left_out": {
            name: [n, left_out_by_group.get(name)]
            for name, n in left_out.items()
            if name not in undefined and (n or left_out_by_group.get(name))
        },
        "n_boot": n_boot,
        "counts": {
            "split_images": len(truths),
            "scored": len(y_true),
            f"{group_by}s": len(set(groups)),
            **{k: len(v) for k, v in excluded.items()},
            "rows": len(rows),
            "rows_outside_split": outside,
        },
        "excluded": excluded,
        # None where a row lacks its label's probability (a threshold's label outside the top k)
        "confidence": None
        if None in confidence
        else confidence_report(confidence, [t == p for t, p in zip(y_true, y_pred)]),
        "per_class": [
            {"class": c, "class_name": name, **row}
            for c, (name, row) in enumerate(
                zip(class_names, per_class_metrics(y_true, y_pred, k), strict=True)
            )
        ],
        "by_camera_and_class": [
            {"camera": cam, key: k, f"{key}_name": names[k], "images": n, "errors": e}
            for (cam, k), (n, e) in sorted(errors.items(), key=lambda kv: (-kv[1][1], kv[0]))
        ],
        # the images to look at: the most confident errors first (no confidence: last)
        "wrong": sorted(
            wrong, key=lambda w: (w["confidence"] is None, -(w["confidence"] or 0.0), w["path"])
        ),
    }


def parse_requirements(text: str | None) -> dict[str, float]:
    """'accuracy=0.98,f1=0.97' -> {metric: least value}; ValueError names what is wrong."""
    out: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = (s.strip() for s in item.partition("="))
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
        try:
            least = float(value) if sep else float("nan")
        except ValueError:
            least = float("nan")
        if not 0.0 <= least <= 1.0:
            raise ValueError(f"{item.strip()!r}: expected {name}=<fraction 0..1>, e.g. 0.98")
        out[name] = least
    return out


def check_requirements(
    metrics: dict[str, Any], requirements: dict[str, float]
) -> list[dict[str, Any]]:
    """One {metric, least, value, passed} per requirement; an undefined metric (None) meets none."""
    return [
        {
            "metric": k,
            "least": v,
            "value": metrics[k],
            "passed": metrics[k] is not None and at_least(metrics[k], v),
        }
        for k, v in requirements.items()
    ]


def _what(labels: bool, val_half: str | None) -> str:
    """What the images scored are called in messages."""
    return LABELLED if labels else "half" if val_half else "split"


def _partial(report: dict[str, Any]) -> bool:
    """Whether some images to score were not scored (`--allow-missing`)."""
    return bool(report["counts"]["scored"] < report["counts"]["split_images"])


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    """Read, match, score and check one predictions file: the report (JSON-ready)."""
    from marsvision.train.config import HALF_VAL, val_to_score
    from marsvision.train.data import data_fingerprint, msl_class_names, read_split

    preds = read_predictions(cfg.predictions)
    if not any(r.status == "ok" for r in preds.rows):
        first = preds.rows[0]
        raise MarsvisionError(
            f"{preds.path}: none of its {len(preds.rows)} rows has status ok "
            f"(e.g. {first.path}); nothing to score"
        )
    model = model_provenance(preds.rows, path=preds.path)
    model_classes = None
    if cfg.data_dir is None and preds.class_names is None:  # a --top-k file, no data folder
        model_classes = recorded_model_classes(preds.path, model["sha256"])
    task, names = resolve_task(preds, data_dir=cfg.data_dir, model_classes=model_classes)
    labels, fingerprint = None, None
    if cfg.labels is not None:
        labels = read_labels(cfg.labels, names)
        truths, group_by = labels.truths, labels.group_by
        listed: tuple[str, Sequence[str]] = ("class", names)  # errors by the task's class
    else:
        assert cfg.data_dir is not None  # ScoreConfig checks it
        if cfg.val_half:  # halved as the model's training halved it
            trained_on = {"train_on": HALF_VAL, "limit": cfg.train_limit}
            halves = val_to_score(trained_on, cfg.data_dir, task, None)
            samples = halves[VAL_HALVES.index(cfg.val_half)]
        else:
            samples = read_split(cfg.data_dir, cfg.split, task)
        truths, group_by = split_truths(samples), "sol"
        listed = ("msl_class", msl_class_names(cfg.data_dir))  # errors by MSL class
        fingerprint = data_fingerprint(cfg.data_dir)
    scored = score_predictions(
        preds.rows,
        truths,
        names,
        task,
        allow_missing=cfg.allow_missing,
        listed=listed,
        group_by=group_by,
        what=_what(labels is not None, cfg.val_half),
        n_boot=cfg.n_boot,
        seed=cfg.seed,
    )
    checks = check_requirements(scored["metrics"], cfg.requirements)
    return {
        "kind": "score",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "split": None if labels else cfg.split,
        "val_half": cfg.val_half,
        "train_limit": cfg.train_limit,
        # two labelled sets of one name (teamA/labels.csv, teamB/labels.csv) are two files
        "part": f"{cfg.part}-{labels.sha256[:8]}" if labels else cfg.part,
        "labels": labels and labels.describe(),
        **scored,
        "model": model,
        "predictions": {
            "path": str(preds.path),
            "sha256": preds.sha256,
            "format": preds.fmt,
            "top_k": preds.top_k,
        },
        "data_fingerprint": fingerprint,
        "requirements": checks,
        # a requirement speaks for the split: one met on part of it (--allow-missing) fails
        "passed": all(c["passed"] for c in checks) and (not checks or not _partial(scored)),
        "config": cfg.to_dict(),
    }


def render_text(report: dict[str, Any]) -> str:
    """The terminal summary: provenance, coverage, the metrics table and the requirements."""
    from marsvision.benchmarks.report import text_table

    c, m, ci, group_by = report["counts"], report["metrics"], report["cis"], report["group_by"]
    p, model, labels = report["predictions"], report["model"], report["labels"]
    by_group = report[f"cis_by_{group_by}"]  # None: one group
    if labels:
        truth = f"labels {labels['path']} ({labels['format']}, {labels['images']} images)"
    else:
        truth = f"{report['split']} split" + (
            _HALF_TEXT[half] if (half := report.get("val_half")) else ""
        )
        if report.get("train_limit"):
            truth += f", halved as a run of --limit {report['train_limit']} halved its val"
    lines = [
        f"score: {p['path']} ({p['format']}{', top-k' if p['top_k'] else ''}), "
        f"{report['task']} task, {truth}",
        f"model: sha256 {model['sha256'][:12]}, {model['precision']}, {model['backend']}"
        + (f", tta {model['tta']}" if model.get("tta", "none") != "none" else ""),
    ]
    share = 100.0 * c["scored"] / c["split_images"]
    what = _what(bool(labels), report["val_half"])
    if _partial(report):
        lines.append(
            f"COVERAGE: PARTIAL, {c['scored']} of {c['split_images']} images scored "
            f"({share:.1f}%); excluded: {c['missing']} missing, {c['failed']} failed, "
            f"{c['duplicated']} duplicated"
        )
    else:
        lines.append(f"coverage: all {c['split_images']} images of the {what} scored")
    if c["rows_outside_split"]:
        lines.append(f"ignored: {c['rows_outside_split']} rows for images outside the {what}")
    which = f"({report['positive_class']})" if report["positive_class"] else "(macro)"
    rows = [["n", str(m["n"]), "", f"{c[group_by + 's']} {group_by}s"]]
    for k in METRICS:
        label = f"{k} {which}" if k in ("precision", "recall", "f1") else k
        value = "n/a" if m[k] is None else f"{m[k]:.4f}"
        rows.append([label, value, _interval(ci[k]), _interval(by_group and by_group[k])])
    lines += ["", text_table(["metric", "value", "95% CI", f"95% CI by {group_by}"], rows)]
    if not by_group:
        lines.append(f"no interval by {group_by}: the images scored are all of one {group_by}")
    if group_by == "image":
        lines.append("no sol in these file names (none is an MSL product's): the second "
                     "interval resamples images, as the first; give the labels CSV a group "
                     "column")  # fmt: skip
    lines += _interval_notes(report)
    if report["task"] != "binary":
        lines += ["", *_per_class_text(report["per_class"])]
    if conf := report.get("confidence"):
        lines += ["", *_confidence_text(conf)]
    elif "confidence" in report:  # None: not computable for these rows
        lines += ["", "confidence: not shown (a --top-k row lacks its decision's probability: a "
                  "decision threshold chose a class outside the top k)"]  # fmt: skip
    worst = [g for g in report.get("by_camera_and_class", []) if g["errors"]][:_WORST]
    if worst:
        name = "class_name" if labels else "msl_class_name"
        cameras = "camera and " if any(g["camera"] != "?" for g in worst) else ""
        lines += ["", f"most errors, by {cameras}{'class' if labels else 'MSL class'}:"]
        lines += [f"  {_camera_text(g['camera'])}{g[name]}: {g['errors']} of {g['images']} wrong"
                  for g in worst]  # fmt: skip
    if report.get("wrong"):
        n = len(report["wrong"])
        lines.append(f"the {n} wrong image{'s' * (n > 1)}, the most confident first: \"wrong\" in "
                     "the JSON")  # fmt: skip
    if report["requirements"]:
        lines.append("")
        for r in report["requirements"]:
            verdict = "PASS" if r["passed"] else "FAIL"
            sign = ">=" if r["passed"] else "<"
            if r["value"] is None:
                lines.append(f"FAIL {r['metric']} n/a (undefined on these images), not >= "
                             f"{r['least']:g}")  # fmt: skip
            else:
                lines.append(f"{verdict} {r['metric']} {r['value']:.4f} {sign} {r['least']:g}")
        failed = sum(not r["passed"] for r in report["requirements"])
        total = len(report["requirements"])
        lines.append(
            f"score: {'PASS' if report['passed'] else 'FAIL'} ({total - failed} of {total} "
            "requirements met"
            + (f" on {c['scored']} of the {c['split_images']} images: a requirement holds for "
               f"the whole {what})" if _partial(report) else ")")
        )  # fmt: skip
    return "\n".join(lines)


def _per_class_text(per_class: list[dict[str, Any]]) -> list[str]:
    """msl25's classes one by one: which fail, behind the macro averages."""
    from marsvision.benchmarks.report import text_table

    present = sum(1 for r in per_class if r["images"] or r["decided"])
    absent = len(per_class) - present

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    rows = [
        [r["class_name"], str(r["images"]), str(r["decided"]), cell(r["precision"]),
         cell(r["recall"]), cell(r["f1"])]
        for r in per_class
    ]  # fmt: skip
    neither = f" ({absent} {'has' if absent == 1 else 'have'} neither)" if absent else ""
    return [
        f"per class: the macro averages are over the {present} classes with an image or a "
        f"decision here{neither}; -: undefined (0/0)",
        text_table(["class", "images", "decided", "precision", "recall", "f1"], rows),
    ]


def _interval(ci: list[float] | None) -> str:
    """An interval's table cell: "-" for none (one group; an undefined metric)."""
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"


def _interval_notes(report: dict[str, Any]) -> list[str]:
    """Why a metric is n/a, how many resamples the intervals leave out where it is, and what an
    accuracy interval of no width (all right or all wrong: every resample alike) leaves unsaid."""
    positive, lines = report["positive_class"], []
    n, accuracy = report["metrics"]["n"], report["metrics"]["accuracy"]
    if accuracy in (0.0, 1.0):  # the exact interval of a count of 0 or n (Clopper-Pearson)
        bound = 0.025 ** (1 / n)
        exact = f"[{bound:.4f}, 1]" if accuracy else f"[0, {1 - bound:.4f}]"
        lines.append(f"accuracy: all {n} {'right' if accuracy else 'wrong'}, so every "
                     f"resample is too and its interval has no width; the exact 95% interval is "
                     f"{exact}")  # fmt: skip
    if undefined := report.get("undefined"):
        why = {"precision": f"no image decided {positive}",
               "recall": f"no {positive} among them", "f1": "neither"}  # fmt: skip
        lines.append("n/a, undefined on these images (0/0, not 0): "
                     + ", ".join(f"{k} ({why[k]})" for k in undefined))  # fmt: skip
    if left_out := report.get("left_out"):
        by = report["group_by"]
        parts = [f"{k} {a}" + ("" if b is None else f" ({b} by {by})")
                 for k, (a, b) in left_out.items()]  # fmt: skip
        lines.append(f"left out of the intervals (undefined there), of {report['n_boot']} "
                     f"resamples: {'; '.join(parts)}")  # fmt: skip
    return lines


def _camera_text(code: str) -> str:
    """The camera's name and a space, or nothing for a name that does not say ("?")."""
    return "" if code == "?" else f"{CAMERAS.get(code, code)} "


def _confidence_text(conf: dict[str, Any]) -> list[str]:
    """The probability of each decision: its calibration, and what keeping the confident gives."""
    from marsvision.benchmarks.report import text_table

    rows = [[f">= {k['least']:g}", str(k["images"]), f"{100 * k['share']:.1f}",
             "" if k["accuracy"] is None else f"{k['accuracy']:.4f}"]
            for k in conf["keep"]]  # fmt: skip
    return [
        f"confidence (the probability of each decision): mean {conf['mean']:.4f} "
        f"(accuracy {conf['accuracy']:.4f}), highest {conf['highest']:.4f}",
        f"calibration error {conf['ece']:.4f} (mean |accuracy - confidence| over "
        f"{conf['bins']} equal bins, by images)",
        text_table(["confidence", "images", "share %", "accuracy"], rows),
    ]


def _score_name(report: dict[str, Any]) -> str:
    """score-<split>-<model sha256[:12]>-<backend>[-tta-<mode>][-top-k].json (score-val-held-...,
    score-val-trained-... for a half of val, score-labels-<name>-<labels sha256[:8]>-... for a
    labels file or folder; -partial-<predictions file sha256[:8]> added where `--allow-missing`
    left images out): one file per model, backend, --tta and kind of predictions file, so that
    scoring the same model's flip-TTA, GPU or --top-k predictions does not overwrite the plain
    ones (a top-k score has no confidence section), nor a score of part of the images the whole
    one, nor one part another."""
    model, preds = report["model"], report["predictions"]
    tta = model.get("tta", "none")
    name = (
        f"score-{report.get('part', report['split'])}-{model['sha256'][:12]}-{model['backend']}"
        + (f"-tta-{tta}" if tta != "none" else "")
        + ("-top-k" if preds.get("top_k") else "")
        + (f"-partial-{preds['sha256'][:8]}" if _partial(report) else "")
    )
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) + ".json"  # the file's own values: no "/"


def write_score(report: dict[str, Any], out: Path) -> Path:
    """The report as `_score_name` in `out`, written atomically."""
    from marsvision.benchmarks.report import write_json

    return write_json(out / _score_name(report), report)
