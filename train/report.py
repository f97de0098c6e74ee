"""A run folder's outputs, written atomically: JSON, the test predictions CSV, PNG plots."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from marsvision.runtime.files import atomic_write_bytes
from marsvision.runtime.results import sheet_safe_path
from marsvision.train.data import Sample


def write_json(path: Path, obj: Any) -> None:
    """Pretty JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_predictions(
    path: Path,
    *,
    samples: Sequence[Sample],
    data_dir: Path,
    probs: np.ndarray,
    class_names: Sequence[str],
) -> None:
    """One row per image: path (relative to the data dir; `./` before one that would start as a
    spreadsheet formula), true and predicted class, P(class)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "true_label", "pred_label", *class_names])
    for s, p in zip(samples, probs, strict=True):
        rel = sheet_safe_path(s.path.relative_to(data_dir).as_posix())  # as mars-infer writes
        pred = int(np.argmax(p))
        w.writerow([rel, class_names[s.label], class_names[pred], *(f"{v:.6f}" for v in p)])
    atomic_write_bytes(path, buf.getvalue().encode())


def _save_figure(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _plot_curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss, accuracy and learning rate per epoch (train, and val where it was scored)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    scored = all("val_loss" in h for h in history)  # a train+val refit scores no val per epoch
    ax[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    ax[1].plot(ep, [h["train_accuracy"] for h in history], "o-", label="train")
    if scored:
        ax[0].plot(ep, [h["val_loss"] for h in history], "o-", label="val")
        ax[1].plot(ep, [h["val_accuracy"] for h in history], "o-", label="val")
        ax[1].plot(ep, [h["val_balanced_accuracy"] for h in history], "o-", label="val balanced")
    ax[0].set_title("loss")
    ax[1].set_title("accuracy")
    ax[2].plot(ep, [h["lr"] for h in history], "o-")
    ax[2].set_title("learning rate (end of epoch)")
    for a in ax:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    ax[0].legend()
    ax[1].legend()
    _save_figure(fig, path)
    plt.close(fig)


def _plot_confusion(
    cm: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str
) -> None:
    """Confusion matrix heat map with counts (rows = true class)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    m = np.asarray(cm)
    k = len(class_names)
    side = max(4.0, 0.42 * k + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(k), labels=class_names, rotation=90 if k > 4 else 0)
    ax.set_yticks(range(k), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = m.max() if m.size else 0
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                color = "white" if m[i, j] > top / 2 else "black"
                ax.text(j, i, str(m[i, j]), ha="center", va="center", color=color, fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save_figure(fig, path)
    plt.close(fig)


def write_results(
    out: Path,
    result: dict[str, Any],
    *,
    test: Sequence[Sample],
    test_probs: np.ndarray,
    data_dir: Path,
) -> None:
    """A finished run's outputs beside its checkpoint: the test predictions, the curves, the
    test confusion matrix and metrics.json (`result`, as `loop.main` returns it)."""
    names = result["class_names"]
    write_predictions(out / "predictions_test.csv", samples=test, data_dir=data_dir,
                      probs=test_probs, class_names=names)  # fmt: skip
    _plot_curves(result["history"], out / "curves.png")
    _plot_confusion(result["test"]["confusion_matrix"], names, out / "confusion_test.png",
                    f"test, checkpoint of epoch {result['best_epoch']}")  # fmt: skip
    write_json(out / "metrics.json", result)
