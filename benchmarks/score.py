"""Score a model from what users get: mars-infer's own result file against an official MSL split.

The rows (CSV or JSONL, every probability or --top-k) are matched to the split's images by file
name; their top-1 labels give the metrics, bootstrap confidence intervals and optional pass/fail
requirements. The task and class names come from the file itself.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from marsvision.runtime.errors import MarsvisionError
from marsvision.train.data import CAMERAS, Sample, camera

# Exit code of `mars-bench score` when a --require fails: the same as `mars-bench parity`'s
# PARITY_FAIL_EXIT (1 is a user error, 2 a usage error, as click defines them).
SCORE_FAIL_EXIT = 3
METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1")
N_BOOT = 1000
SEED = 0
_PROVENANCE = ("model_sha256", "precision", "backend")
_SHOW = 3  # file names quoted in an error message
_WORST = 6  # (camera, class) groups listed in the terminal summary


@dataclass(frozen=True)
class PredictionRow:
    """One result row of mars-infer, as far as scoring needs it."""

    line: int  # line number in the file
    path: str  # as the user gave it to mars-infer
    status: str  # ok | error
    label: str | None  # the top-1 class name (None on error rows)
    model_sha256: str
    precision: str
    backend: str

    @property
    def name(self) -> str:
        """The image's file name: the key that matches the row to the split."""
        return os.path.basename(self.path.rstrip("/"))


@dataclass(frozen=True)
class Predictions:
    """A mars-infer result file: its rows and the classes it names."""

    path: Path
    fmt: str  # csv | jsonl
    class_names: list[str] | None  # every class in model order; None in a --top-k file
    top_k: int | None
    labels: frozenset[str]  # every class name that the rows mention
    rows: list[PredictionRow]


@dataclass(frozen=True)
class ScoreConfig:
    """What `run_score` does; the CLI builds it from its flags."""

    predictions: Path
    data_dir: Path
    split: str = "test"
    allow_missing: bool = False
    requirements: dict[str, float] = field(default_factory=dict)
    n_boot: int = N_BOOT
    seed: int = SEED

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready resolved config."""
        return {
            "predictions": str(self.predictions),
            "data_dir": str(self.data_dir),
            "split": self.split,
            "allow_missing": self.allow_missing,
            "requirements": dict(self.requirements),
            "n_boot": self.n_boot,
            "seed": self.seed,
        }


def _names(items: Sequence[str], limit: int = _SHOW) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _row(path: Path, line: int, d: dict[str, Any]) -> PredictionRow:
    status = d.get("status")
    if status not in ("ok", "error"):
        raise MarsvisionError(f"{path}: line {line} has status {status!r}, not ok or error")
    label = d.get("label") or None
    if status == "ok" and label is None:
        raise MarsvisionError(f"{path}: line {line} has status ok but no label")
    return PredictionRow(line, str(d["path"]), status, label, *(str(d[k]) for k in _PROVENANCE))


def _read_csv(path: Path, text: str) -> Predictions:
    table = list(csv.reader(io.StringIO(text, newline="")))
    header = table[0]
    missing = [c for c in ("path", "status", "label", "error", *_PROVENANCE) if c not in header]
    if missing:
        raise MarsvisionError(
            f"{path} is not a mars-infer result file: no {', '.join(missing)} column"
        )
    top_k = sum(1 for c in header if re.fullmatch(r"label_\d+", c)) or None
    names = None if top_k else [c[len("prob_") :] for c in header if c.startswith("prob_")]
    label_keys = ["label", *(f"label_{i}" for i in range(1, (top_k or 0) + 1))]
    rows: list[PredictionRow] = []
    labels: set[str] = set()
    for n, values in enumerate(table[1:], start=2):
        if len(values) != len(header):
            raise MarsvisionError(
                f"{path}: line {n} has {len(values)} columns, the header {len(header)} "
                "(a run cut short? finish it with mars-infer --resume)"
            )
        d = dict(zip(header, values))
        rows.append(_row(path, n, d))
        labels.update(d[k] for k in label_keys if d[k])
    return Predictions(path, "csv", names, top_k, frozenset(labels), rows)


def _read_jsonl(path: Path, text: str) -> Predictions:
    rows: list[PredictionRow] = []
    labels: set[str] = set()
    names: list[str] | None = None
    top_k: int | None = None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            row = _row(path, n, d)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise MarsvisionError(
                f"{path}: line {n} is not a mars-infer result row (a run cut short? finish it "
                "with mars-infer --resume)"
            ) from None
        rows.append(row)
        if row.label:
            labels.add(row.label)
        if d.get("top_k") is not None:
            top_k = max(top_k or 0, len(d["top_k"]))
            labels.update(str(lab) for lab, _ in d["top_k"])
        if isinstance(d.get("probs"), dict):
            keys = list(d["probs"])
            if names is not None and keys != names:
                raise MarsvisionError(
                    f"{path}: line {n} has classes {_names(keys)}, earlier lines {_names(names)}"
                )
            names = keys
    return Predictions(path, "jsonl", names, top_k, frozenset(labels), rows)


def read_predictions(path: Path) -> Predictions:
    """Read a mars-infer result file: JSONL if it starts with '{' (whatever its name), else CSV."""
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        raise MarsvisionError(f"cannot read the predictions file {path} ({e.strerror})") from None
    if not text.strip():
        raise MarsvisionError(f"{path} is empty: no predictions to score")
    if text.lstrip().startswith("{"):
        preds = _read_jsonl(path, text)
    else:
        preds = _read_csv(path, text)
    if not preds.rows:
        raise MarsvisionError(f"{path} has a header but no rows: no predictions to score")
    return preds


def resolve_task(preds: Predictions, *, data_dir: Path) -> tuple[str, list[str]]:
    """(task, class names) of the file: its classes must be binary's or msl25's, in order."""
    from marsvision.train.data import class_names

    tasks = {t: class_names(t, data_dir) for t in ("binary", "msl25")}
    for task, names in tasks.items():
        if preds.class_names is not None:
            fits = preds.class_names == names
        else:  # --top-k: only the labels it names, at most k of every class
            fits = bool(preds.labels) and preds.labels <= set(names)
        if fits:
            unknown = sorted({r.label for r in preds.rows if r.label} - set(names))
            if unknown:
                raise MarsvisionError(
                    f"{preds.path}: label {unknown[0]!r} is not one of its classes {_names(names)}"
                )
            return task, names
    found = preds.class_names if preds.class_names is not None else sorted(preds.labels)
    raise MarsvisionError(
        f"{preds.path} has classes [{_names(found, 5)}], which match neither binary "
        f"[{', '.join(tasks['binary'])}] nor msl25 [{_names(tasks['msl25'], 5)}] of {data_dir}"
    )


def model_provenance(rows: Sequence[PredictionRow], *, path: Path) -> dict[str, str]:
    """The model sha256, precision and backend of the rows; one model per file."""
    shas = sorted({r.model_sha256 for r in rows})
    if len(shas) != 1:
        raise MarsvisionError(
            f"{path} mixes {len(shas)} models (model_sha256 {_names([s[:12] for s in shas])}): "
            "score one model's rows at a time"
        )
    return {
        "sha256": shas[0],
        "precision": ",".join(sorted({r.precision for r in rows})),
        "backend": ",".join(sorted({r.backend for r in rows})),
    }


def score_predictions(
    rows: Sequence[PredictionRow],
    samples: Sequence[Sample],
    class_names: list[str],
    task: str,
    *,
    allow_missing: bool = False,
    n_boot: int = N_BOOT,
    seed: int = SEED,
) -> dict[str, Any]:
    """Metrics and bootstrap CIs of the rows' top-1 labels on the samples, matched by file name.

    Every sample needs exactly one row, with status ok; otherwise a user error, or with
    `allow_missing` the sample is left out and counted. Rows for other images are ignored.
    """
    from marsvision.train.metrics import bootstrap_cis, classification_metrics

    wanted = {s.path.name for s in samples}
    if len(wanted) != len(samples):
        raise MarsvisionError("the split lists the same file name twice: cannot match by name")
    found: dict[str, list[PredictionRow]] = {}
    outside = 0
    for r in rows:
        if r.name in wanted:
            found.setdefault(r.name, []).append(r)
        else:
            outside += 1
    index = {name: i for i, name in enumerate(class_names)}
    excluded: dict[str, list[str]] = {"missing": [], "failed": [], "duplicated": []}
    y_true, y_pred = [], []
    groups: dict[tuple[str, int], list[int]] = {}  # (camera, MSL class) -> [images, errors]
    for s in samples:
        mine = found.get(s.path.name, [])
        if not mine:
            excluded["missing"].append(s.path.name)
        elif len(mine) > 1:
            excluded["duplicated"].append(s.path.name)
        elif mine[0].status != "ok" or mine[0].label is None:
            excluded["failed"].append(s.path.name)
        else:
            y_true.append(s.label)
            y_pred.append(index[mine[0].label])
            g = groups.setdefault((camera(s.path), s.msl_class), [0, 0])
            g[0] += 1
            g[1] += y_pred[-1] != s.label
    problems = [f"{len(v)} {k} ({_names(v)})" for k, v in excluded.items() if v]
    if problems and not allow_missing:
        raise MarsvisionError(
            f"the predictions do not cover the split's {len(samples)} images once each with "
            f"status ok: {'; '.join(problems)}; rerun mars-infer on them, or pass "
            "--allow-missing to score the rest"
        )
    if not y_true:
        raise MarsvisionError(f"none of the split's {len(samples)} images has an ok row")
    metrics = classification_metrics(y_true, y_pred, len(class_names), task)
    return {
        "task": task,
        "class_names": list(class_names),
        "positive_class": class_names[1] if task == "binary" else None,
        "metrics": metrics,
        "cis": bootstrap_cis(y_true, y_pred, len(class_names), task, n_boot=n_boot, seed=seed),
        "counts": {
            "split_images": len(samples),
            "scored": len(y_true),
            **{k: len(v) for k, v in excluded.items()},
            "rows": len(rows),
            "rows_outside_split": outside,
        },
        "excluded": excluded,
        "by_camera_and_class": [
            {"camera": cam, "msl_class": k, "images": n, "errors": e}
            for (cam, k), (n, e) in sorted(groups.items(), key=lambda kv: (-kv[1][1], kv[0]))
        ],
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
    """One {metric, least, value, passed} per requirement."""
    return [
        {"metric": k, "least": v, "value": metrics[k], "passed": metrics[k] >= v}
        for k, v in requirements.items()
    ]


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    """Read, match, score and check one predictions file: the report (JSON-ready)."""
    from marsvision.runtime.metadata import sha256_file
    from marsvision.train.data import data_fingerprint, msl_class_names, read_split

    preds = read_predictions(cfg.predictions)
    if not any(r.status == "ok" for r in preds.rows):
        first = preds.rows[0]
        raise MarsvisionError(
            f"{cfg.predictions}: none of its {len(preds.rows)} rows has status ok "
            f"(e.g. {first.path}); nothing to score"
        )
    task, names = resolve_task(preds, data_dir=cfg.data_dir)
    model = model_provenance(preds.rows, path=cfg.predictions)
    samples = read_split(cfg.data_dir, cfg.split, task)
    scored = score_predictions(
        preds.rows,
        samples,
        names,
        task,
        allow_missing=cfg.allow_missing,
        n_boot=cfg.n_boot,
        seed=cfg.seed,
    )
    msl_names = msl_class_names(cfg.data_dir)
    for g in scored["by_camera_and_class"]:
        g["msl_class_name"] = msl_names[g["msl_class"]]
    checks = check_requirements(scored["metrics"], cfg.requirements)
    return {
        "kind": "score",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "split": cfg.split,
        **scored,
        "model": model,
        "predictions": {
            "path": str(cfg.predictions),
            "sha256": sha256_file(cfg.predictions),
            "format": preds.fmt,
            "top_k": preds.top_k,
        },
        "data_fingerprint": data_fingerprint(cfg.data_dir),
        "requirements": checks,
        "passed": all(c["passed"] for c in checks),
        "config": cfg.to_dict(),
    }


def render_text(report: dict[str, Any]) -> str:
    """The terminal summary: provenance, coverage, the metrics table and the requirements."""
    from marsvision.benchmarks.report import text_table

    c, m, ci = report["counts"], report["metrics"], report["cis"]
    p, model = report["predictions"], report["model"]
    lines = [
        f"score: {p['path']} ({p['format']}{', top-k' if p['top_k'] else ''}), "
        f"{report['task']} task, {report['split']} split",
        f"model: sha256 {model['sha256'][:12]}, {model['precision']}, {model['backend']}",
    ]
    share = 100.0 * c["scored"] / c["split_images"]
    if c["scored"] < c["split_images"]:
        lines.append(
            f"COVERAGE: PARTIAL, {c['scored']} of {c['split_images']} images scored "
            f"({share:.1f}%); excluded: {c['missing']} missing, {c['failed']} failed, "
            f"{c['duplicated']} duplicated"
        )
    else:
        lines.append(f"coverage: all {c['split_images']} images of the split scored")
    if c["rows_outside_split"]:
        lines.append(f"ignored: {c['rows_outside_split']} rows for images outside the split")
    which = f"({report['positive_class']})" if report["positive_class"] else "(macro)"
    rows = [["n", str(m["n"]), ""]]
    for k in METRICS:
        label = f"{k} {which}" if k in ("precision", "recall", "f1") else k
        rows.append([label, f"{m[k]:.4f}", f"[{ci[k][0]:.4f}, {ci[k][1]:.4f}]"])
    lines += ["", text_table(["metric", "value", "95% CI"], rows)]
    worst = [g for g in report.get("by_camera_and_class", []) if g["errors"]][:_WORST]
    if worst:
        lines += ["", "most errors, by camera and MSL class:"]
        lines += [f"  {CAMERAS.get(g['camera'], g['camera'])} {g['msl_class_name']}: "
                  f"{g['errors']} of {g['images']} wrong" for g in worst]  # fmt: skip
    if report["requirements"]:
        lines.append("")
        for r in report["requirements"]:
            verdict = "PASS" if r["passed"] else "FAIL"
            sign = ">=" if r["passed"] else "<"
            lines.append(f"{verdict} {r['metric']} {r['value']:.4f} {sign} {r['least']:g}")
        failed = sum(not r["passed"] for r in report["requirements"])
        total = len(report["requirements"])
        lines.append(
            f"score: {'PASS' if not failed else 'FAIL'} ({total - failed} of {total} "
            "requirements met)"
        )
    return "\n".join(lines)


def write_score(report: dict[str, Any], out: Path) -> Path:
    """score-<split>-<model sha256[:12]>.json in `out`, written atomically."""
    from marsvision.benchmarks.report import write_json

    return write_json(
        out / f"score-{report['split']}-{report['model']['sha256'][:12]}.json", report
    )
