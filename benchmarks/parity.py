"""Accuracy parity: every exported artifact against the PyTorch checkpoint on real MSL splits.

The reference is the checkpoint through train's eval_transform and `model_from_checkpoint`;
each artifact runs as users deploy it, through the runtime's preprocessing and runner. Per
artifact and split: accuracy, balanced accuracy, F1, their change against PyTorch, top-1
agreement, max |probability difference|, per-class recall, size and ms per image, and a
pass/fail verdict against the thresholds of its precision.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from marsvision.benchmarks.artifacts import (
    Artifact,
    check_exported_from,
    find_artifacts,
    skip_reason,
)
from marsvision.runtime.backends.base import Runner
from marsvision.runtime.classifier import non_finite_rows, softmax
from marsvision.runtime.errors import MarsvisionError, check_percentage
from marsvision.runtime.spec import PreprocessSpec
from marsvision.train.metrics import at_least

# Exit code of `mars-bench parity` when an artifact fails its thresholds or cannot be run
# (1 is a user error, 2 a usage error, as click defines them).
PARITY_FAIL_EXIT = 3


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail bars, in percent / accuracy points (a change is taken in absolute value)."""

    fp32_min_agreement: float = 100.0
    fp16_max_accuracy_change: float = 0.1
    # FP16 rounding flips only decisions within about 1e-3 of a tie: an accuracy that holds
    # while decisions move both ways is not the same model (measured: 99.77-100.00% on val and
    # test, benchmarks/results)
    fp16_min_agreement: float = 99.5
    int8_max_accuracy_change: float = 0.5
    int8_min_agreement: float = 99.0

    def __post_init__(self) -> None:
        for name in ("fp32_min_agreement", "fp16_min_agreement", "int8_min_agreement"):
            check_percentage("--" + name.replace("_", "-"), getattr(self, name))
        for name in ("fp16_max_accuracy_change", "int8_max_accuracy_change"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0.0):
                flag = "--" + name.replace("_", "-")
                raise MarsvisionError(f"{flag} {v:g}: must be a number of points >= 0")


@dataclass(frozen=True)
class ParityConfig:
    """What `run_parity` does; the CLI builds it from its flags."""

    checkpoint: Path
    artifacts: Path
    data_dir: Path
    splits: tuple[str, ...] = ("val", "test")
    limit: int | None = None
    batch_size: int = 32
    device: str = "cpu"
    threads: int | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self) -> None:
        from marsvision.train.data import SPLITS

        if not self.splits:
            raise MarsvisionError("--splits: give at least one of val, test, train")
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown:  # found after the PyTorch reference of the splits before it: minutes
            raise MarsvisionError(
                f"--splits: unknown {', '.join(unknown)}; choose from val, test, train"
            )
        if self.limit is not None and self.limit < 1:
            raise MarsvisionError(f"--limit {self.limit}: need at least 1 image")
        if self.batch_size < 1:
            raise MarsvisionError(f"--batch-size {self.batch_size}: need at least 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready resolved config."""
        d = asdict(self)
        for k in ("checkpoint", "artifacts", "data_dir"):
            d[k] = str(d[k])
        d["splits"] = list(self.splits)
        return d


def compare(
    ref_logits: np.ndarray,
    logits: np.ndarray,
    y_true: np.ndarray,
    *,
    num_classes: int,
    task: str,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Metrics of `logits` and their change against `ref_logits` on the same images; labels by
    the model's rule (`threshold`: binary decision threshold, None: the most probable class)."""
    from marsvision.runtime.metadata import decide
    from marsvision.train.metrics import classification_metrics

    probs, ref_probs = softmax(logits), softmax(ref_logits)
    pred = decide(probs, threshold)
    ref_pred = decide(ref_probs, threshold)
    # a row with a NaN or inf logit has no label (argmax gave it class 0, as good as any): it is
    # counted wrong and a disagreement, and fails the artifact (`verdict`), as mars-infer makes
    # it an error row
    bad = non_finite_rows(logits)
    pred = np.where(bad, (np.asarray(y_true) + 1) % num_classes, pred)
    m = classification_metrics(y_true, pred, num_classes, task)
    r = classification_metrics(y_true, ref_pred, num_classes, task)
    # a row with no probabilities is as far as rows can be apart: 1
    dp = np.abs(probs - ref_probs) if not bad.any() else np.ones(1)
    return {
        "n": len(y_true),
        "non_finite": int(bad.sum()),
        "accuracy": 100.0 * m["accuracy"],
        "balanced_accuracy": 100.0 * m["balanced_accuracy"],
        "f1": 100.0 * m["f1"],
        "accuracy_change": 100.0 * (m["accuracy"] - r["accuracy"]),
        "balanced_accuracy_change": 100.0 * (m["balanced_accuracy"] - r["balanced_accuracy"]),
        "f1_change": 100.0 * (m["f1"] - r["f1"]),
        "top1_agreement": 100.0 * float(np.mean((pred == ref_pred) & ~bad)),
        "disagreements": int(np.sum((pred != ref_pred) | bad)),
        "max_prob_diff": float(dp.max()) if dp.size else 0.0,
        "per_class_recall": m["per_class_recall"],
        "confusion_matrix": m["confusion_matrix"],
    }


def verdict(precision: str, figures: dict[str, Any], t: Thresholds) -> tuple[bool, list[str]]:
    """(passed, reasons it failed) for one artifact's figures on one split."""
    fails = []
    if figures.get("non_finite"):
        fails.append(f"{figures['non_finite']} of {figures['n']} outputs not finite (NaN or inf)")
    agree = figures["top1_agreement"]
    change = abs(figures["accuracy_change"])
    if precision == "fp32":
        if not at_least(agree, t.fp32_min_agreement):
            fails.append(f"top-1 agreement {agree:.2f}% < {t.fp32_min_agreement:g}%")
    elif precision == "fp16":
        if not at_least(t.fp16_max_accuracy_change, change):
            fails.append(f"|accuracy change| {change:.2f} > {t.fp16_max_accuracy_change:g} points")
        if not at_least(agree, t.fp16_min_agreement):
            fails.append(f"top-1 agreement {agree:.2f}% < {t.fp16_min_agreement:g}%")
    elif precision == "int8":
        if not at_least(t.int8_max_accuracy_change, change):
            fails.append(f"|accuracy change| {change:.2f} > {t.int8_max_accuracy_change:g} points")
        if not at_least(agree, t.int8_min_agreement):
            fails.append(f"top-1 agreement {agree:.2f}% < {t.int8_min_agreement:g}%")
    else:
        raise ValueError(f"no thresholds for precision {precision!r}")
    return not fails, fails


LIMITED = "(--limit)"  # in a scope: part of the split, so no parity check of it


def scored_part(
    config: dict[str, Any], split: str, data_dir: Path, task: str, limit: int | None
) -> tuple[list[Any], str]:
    """The images of a split (at most `limit`) that parity scores for a checkpoint of this
    training config, and what they are: val of a `--train-on train+half-val` model is its
    held-out half by sol (the other half is training data, as in its metrics.json and model
    card); a refit's val is all of val, but training data, and said so; a `limit` below the
    split's size is said first (a pass on 20 images read "all" and "all artifacts pass")."""
    from marsvision.train.data import read_split

    part, scope = _scored_part(config, split, data_dir, task, limit)
    if limit is not None and limit < (total := len(read_split(data_dir, split, task))):
        first = f"the first {limit} of its {total} images {LIMITED}"
        scope = first if scope == "all" else f"{first}; of them, {scope}"
    return part, scope


def _scored_part(
    config: dict[str, Any], split: str, data_dir: Path, task: str, limit: int | None
) -> tuple[list[Any], str]:
    from marsvision.train.config import is_refit, val_to_score
    from marsvision.train.data import read_split

    if split != "val":
        return read_split(data_dir, split, task, limit=limit), "all"
    trained, scored = val_to_score(config, data_dir, task, limit)
    if not trained:
        return scored, "all"
    if is_refit(config):
        return scored, "all, training data (a train+val refit)"
    # a --limit run's trained sols hold more val images than it read: left out too
    left = len(read_split(data_dir, "val", task, limit=limit)) - len(trained) - len(scored)
    more = f"; {left} more images of their sols left out" if left else ""
    return scored, (
        f"held out ({len(trained)} images of val's other half by sol were trained on{more})"
    )


def _decode_split(paths: list[Path], spec: PreprocessSpec) -> np.ndarray:
    """uint8 (n, H, W, 3) of the runtime's decode+resize+crop, shared by all artifacts."""
    from marsvision.runtime.preprocess import decode_image

    return np.stack([decode_image(p, spec) for p in paths])


def _artifact_logits(
    runner: Any, images: np.ndarray, spec: PreprocessSpec, batch_size: int
) -> tuple[np.ndarray, float]:
    """(logits, seconds in `infer`) of a runner over uint8 images, normalized by the runtime."""
    from marsvision.runtime.preprocess import normalize_into

    s = spec.input_size
    buf = np.empty((batch_size, 3, s, s), dtype=np.float32)
    out = []
    seconds = 0.0
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        for j, rgb in enumerate(chunk):
            normalize_into(rgb, spec, buf[j])
        if i == 0:  # one untimed warm-up pass (allocations, kernel selection)
            runner.infer(buf[: len(chunk)])
        t0 = time.perf_counter()
        out.append(np.asarray(runner.infer(buf[: len(chunk)]), dtype=np.float32))
        seconds += time.perf_counter() - t0
    return np.concatenate(out), seconds


def _check_belongs(
    path: Path, names: list[str], threshold: float | None, checkpoint: Path, ckpt_sha: str
) -> None:
    """Refuse an artifact that was not exported from `checkpoint` (its metadata says so); one
    whose metadata cannot be read is left to its own row."""
    from marsvision.runtime.backends import load_model_meta

    try:
        meta = load_model_meta(path)
    except MarsvisionError:
        return
    check_exported_from(meta.source_checkpoint_sha256, path, checkpoint, ckpt_sha)
    if meta.class_names != names:
        raise MarsvisionError(f"{path}: class names differ from the checkpoint's")
    if meta.decision_threshold != threshold:
        raise MarsvisionError(
            f"{path}: decision threshold {meta.decision_threshold} differs from the "
            f"checkpoint's {threshold}; re-export it"
        )


def _open(artifact: Artifact, device: str, threads: int | None) -> Runner:
    from marsvision.runtime.backends import open_runner

    backend = "tensorrt" if artifact.is_engine else "onnxruntime"
    return open_runner(artifact.path, backend, device, threads=threads)


def _per_class(
    names: list[str], ref: list[float | None], art: list[float | None], y_true: np.ndarray
) -> list[dict[str, Any]]:
    rows = []
    for c, name in enumerate(names):
        r, a = ref[c], art[c]
        rows.append(
            {
                "class": name,
                "n_true": int(np.sum(y_true == c)),
                "recall_pytorch": None if r is None else 100.0 * r,
                "recall": None if a is None else 100.0 * a,
                "change": None if r is None or a is None else 100.0 * (a - r),
            }
        )
    return rows


@dataclass(frozen=True)
class _Model:
    """What every row is measured against: the checkpoint's task, classes and label rule."""

    task: str
    names: list[str]
    threshold: float | None  # a binary model's decision threshold (None: the most probable)

    def compare(self, ref: np.ndarray, logits: np.ndarray, y_true: np.ndarray, seconds: float
                ) -> dict[str, Any]:  # fmt: skip
        """`compare`, with the time per image and the rate of the run that made `logits`."""
        figures = compare(ref, logits, y_true, num_classes=len(self.names), task=self.task,
                          threshold=self.threshold)  # fmt: skip
        n = len(y_true)
        figures["ms_per_image"] = 1e3 * seconds / n
        figures["images_per_s"] = n / seconds if seconds > 0 else None
        return figures


def _reference_splits(
    cfg: ParityConfig, ckpt: dict[str, Any], torch_device: str, say: Any
) -> dict[str, dict[str, Any]]:
    """{split: its image paths, labels, PyTorch reference logits and their seconds, scope}."""
    from marsvision.benchmarks.torch_baseline import reference_logits

    splits: dict[str, dict[str, Any]] = {}
    for split in cfg.splits:
        samples, scope = scored_part(
            ckpt.get("config", {}), split, cfg.data_dir, ckpt["task"], cfg.limit
        )
        paths = [s.path for s in samples]
        say(f"{split}: {len(paths)} images{'' if scope == 'all' else f': {scope}'}; "
            f"PyTorch reference on {torch_device}")  # fmt: skip
        logits, secs = reference_logits(
            cfg.checkpoint,
            paths,
            batch_size=cfg.batch_size,
            device=torch_device,
            threads=cfg.threads,
        )
        bad = int(non_finite_rows(logits).sum())
        if bad:  # every artifact would be blamed for the reference's NaN
            raise MarsvisionError(
                f"{cfg.checkpoint}: the PyTorch reference's outputs are not finite (NaN or inf) "
                f"on {bad} of {len(paths)} {split} images; its weights cannot be compared"
            )
        splits[split] = {
            "paths": paths,
            "y_true": np.array([s.label for s in samples]),
            "ref_logits": logits,
            "ref_seconds": secs,
            "scope": scope,
        }
    return splits


def _reference_row(
    cfg: ParityConfig, splits: dict[str, dict[str, Any]], model: _Model, torch_device: str
) -> dict[str, Any]:
    """The PyTorch reference's own row (its figures against itself, and its speed)."""
    return {
        "artifact": Path(cfg.checkpoint).name,
        "flavour": "pytorch",
        "precision": "fp32",
        "backend": f"pytorch-{torch_device}",
        "status": "ok",
        "verdict": "reference",
        "size_mib": Path(cfg.checkpoint).stat().st_size / (1024 * 1024),
        "splits": {
            split: model.compare(d["ref_logits"], d["ref_logits"], d["y_true"], d["ref_seconds"])
            for split, d in splits.items()
        },
    }


def _artifact_row(
    art: Artifact,
    cfg: ParityConfig,
    splits: dict[str, dict[str, Any]],
    model: _Model,
    ref_row: dict[str, Any],
    *,
    ort_device: str,
    decoded: dict[tuple[str, PreprocessSpec], np.ndarray],
    say: Any,
) -> dict[str, Any]:
    """One artifact's row: skipped, an error, or its figures on each split and its verdict
    (`decoded`: the splits' images decoded so far, by preprocessing, shared between rows)."""
    row: dict[str, Any] = {
        "artifact": art.path.name,
        "flavour": art.flavour,
        "precision": art.precision,
        "backend": None,
        "status": "ok",
        "verdict": None,
        "size_mib": art.size_mib,
        "splits": {},
        "failures": [],
    }
    reason = skip_reason(art, ort_device)
    if reason:
        row.update(status=f"skipped: {reason}", verdict="skipped")
        say(f"{art.path.name}: skipped ({reason})")
        return row
    if art.change:  # the export vouches for other bytes: a fail, not a skip (exit 0 passed it)
        row.update(status=f"error: {art.change}", verdict="FAIL", failures=[art.change])
        say(f"{art.path.name}: {row['status']}")
        return row
    try:
        runner = _open(art, ort_device, cfg.threads)
    except MarsvisionError as e:
        if art.is_engine:  # a GPU/TensorRT mismatch here, not a fault of the artifact
            row.update(status=f"skipped: {e.message}", verdict="skipped")
        else:
            row.update(status=f"error: {e.message}", verdict="FAIL", failures=[e.message])
        say(f"{art.path.name}: {row['status']}")
        return row
    with runner:
        spec = runner.meta.preprocess
        row["backend"] = runner.name
        passed = True
        for split, d in splits.items():
            key = (split, spec)
            if key not in decoded:
                decoded[key] = _decode_split(d["paths"], spec)
            try:
                logits, secs = _artifact_logits(runner, decoded[key], spec, cfg.batch_size)
            except Exception as e:  # noqa: BLE001 - a model that cannot run fails, reported
                msg = f"inference failed ({type(e).__name__}: {str(e).strip()[:200]})"
                row.update(status=f"error: {msg}", splits={}, failures=[msg])
                passed = False
                say(f"{art.path.name}: {msg}")
                break
            figures = model.compare(d["ref_logits"], logits, d["y_true"], secs)
            ok, fails = verdict(art.precision, figures, cfg.thresholds)
            figures["passed"] = ok
            figures["per_class"] = _per_class(
                model.names,
                ref_row["splits"][split]["per_class_recall"],
                figures["per_class_recall"],
                d["y_true"],
            )
            row["splits"][split] = figures
            row["failures"] += [f"{split}: {f}" for f in fails]
            passed = passed and ok
            say(
                f"{art.path.name} {split}: acc {figures['accuracy']:.2f} "
                f"agree {figures['top1_agreement']:.2f}% {'pass' if ok else 'FAIL'}"
            )
        row["verdict"] = "PASS" if passed else "FAIL"
    return row


def run_parity(cfg: ParityConfig, *, log: Any = None) -> dict[str, Any]:
    """Run the reference and every artifact on the splits; return the full report dict."""
    from marsvision.benchmarks.conditions import capture_conditions
    from marsvision.runtime.metadata import sha256_file
    from marsvision.train.checkpoint import load_checkpoint
    from marsvision.train.data import check_same_data
    from marsvision.train.device import select_device

    say = log or (lambda msg: None)
    ckpt = load_checkpoint(cfg.checkpoint)
    # another data set's split files: its "val" rows were other images (mars-export refuses it)
    check_same_data(ckpt, cfg.data_dir, cfg.checkpoint)
    model = _Model(ckpt["task"], list(ckpt["class_names"]), ckpt.get("decision_threshold"))
    ckpt_sha = sha256_file(cfg.checkpoint)
    artifacts = find_artifacts(cfg.artifacts)
    torch_device = select_device(cfg.device).type
    # ONNX on the GPU where onnxruntime has CUDA, else on the CPU (still a valid parity check).
    ort_device = "auto" if torch_device == "cuda" else "cpu"

    for art in artifacts:  # before the reference runs: a stranger fails in seconds, not minutes
        if skip_reason(art, ort_device) is None and not art.change:
            _check_belongs(art.path, model.names, model.threshold, cfg.checkpoint, ckpt_sha)

    splits = _reference_splits(cfg, ckpt, torch_device, say)
    ref_row = _reference_row(cfg, splits, model, torch_device)
    decoded: dict[tuple[str, PreprocessSpec], np.ndarray] = {}
    rows = [ref_row] + [
        _artifact_row(
            art, cfg, splits, model, ref_row, ort_device=ort_device, decoded=decoded, say=say
        )  # fmt: skip
        for art in artifacts
    ]
    failed = [r["artifact"] for r in rows if r["verdict"] == "FAIL"]
    # every artifact skipped (engines without TensorRT): nothing was shown to pass
    compared = [r["artifact"] for r in rows if r["verdict"] in ("PASS", "FAIL")]
    return {
        "kind": "parity",
        "task": model.task,
        "class_names": model.names,
        "config": cfg.to_dict(),
        "conditions": capture_conditions(threads=cfg.threads, device=torch_device),
        "checkpoint_sha256": ckpt_sha,
        "decision_threshold": model.threshold,  # every label and figure follows it
        # which images of each split were scored: "all"; the first N (--limit, LIMITED in the
        # text); for val, the half a half-val model held out (or a refit's note that val is
        # training data)
        "scopes": {split: d["scope"] for split, d in splits.items()},
        "thresholds": asdict(cfg.thresholds),
        "rows": rows,
        "failed": failed,
        "compared": compared,
        "passed": bool(compared) and not failed,
    }
