"""Classification metrics with numpy alone (no torch), matching scikit-learn's definitions.

Binary task: precision, recall and F1 of the positive class (label 1, "Rover").
msl25: macro averages over the labels present in y_true or y_pred (scikit-learn's default).
Undefined ratios (0/0) count as 0, as scikit-learn's `zero_division` default does; bootstrap
intervals leave out the resamples where a metric is undefined (a resample without a Rover, for
recall), and `undefined_metrics` names those undefined on the whole set (mars-bench score shows
them as n/a, not 0).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def at_least(value: float, least: float) -> bool:
    """`value >= least`, where a value equal to `least` but for float rounding counts as equal:
    an F1 of exactly 0.9 computes as 0.8999999999999999, an accuracy change of one image in
    200 as 0.5000000000000004 points. The tolerance (relative 1e-12) is far below the step
    between two ratios of counts of any split (about 1 / n**2)."""
    return value >= least or math.isclose(value, least, rel_tol=1e-12)


def _labels(y: Any) -> np.ndarray:
    a = np.asarray(y, dtype=np.int64).reshape(-1)
    return a


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; rows are true labels, columns predictions."""
    t, p = _labels(y_true), _labels(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels, y_pred {p.size}")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def _class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each class's precision, recall and F1 of confusion matrices (..., k, k), 0 where 0/0."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    precision_c = _ratio(tp, cm.sum(axis=-2))
    recall_c = _ratio(tp, cm.sum(axis=-1))
    return precision_c, recall_c, _ratio(2 * precision_c * recall_c, precision_c + recall_c)


def _scores(cm: np.ndarray, task: str) -> dict[str, np.ndarray]:
    """accuracy, balanced_accuracy, precision, recall, f1 of confusion matrices (..., k, k)."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum(axis=(-2, -1))
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)  # true count per class
    predicted = cm.sum(axis=-2)
    precision_c, recall_c, f1_c = _class_scores(cm)
    has_true = support > 0
    out = {
        "accuracy": _ratio(tp.sum(axis=-1), n),
        "balanced_accuracy": _ratio((recall_c * has_true).sum(axis=-1), has_true.sum(axis=-1)),
    }
    if task == "binary":
        out.update(precision=precision_c[..., 1], recall=recall_c[..., 1], f1=f1_c[..., 1])
    else:
        present = has_true | (predicted > 0)
        count = present.sum(axis=-1)
        for name, per_class in (("precision", precision_c), ("recall", recall_c), ("f1", f1_c)):
            out[name] = _ratio((per_class * present).sum(axis=-1), count)
    return out


def _defined(cm: np.ndarray, task: str) -> dict[str, np.ndarray]:
    """Where each of `_scores`'s values is defined rather than a 0/0 counted as 0, for confusion
    matrices (..., k, k): binary precision needs an image decided positive, recall a positive
    truth, F1 either; accuracy, balanced accuracy and msl25's macro averages any image."""
    cm = np.asarray(cm)
    any_image = cm.sum(axis=(-2, -1)) > 0
    out = {name: any_image for name in ("accuracy", "balanced_accuracy")}
    if task == "binary":
        truth, decided = cm[..., 1, :].sum(axis=-1) > 0, cm[..., :, 1].sum(axis=-1) > 0
        out.update(precision=decided, recall=truth, f1=truth | decided)
    else:
        out.update(precision=any_image, recall=any_image, f1=any_image)
    return out


def undefined_metrics(y_true: Any, y_pred: Any, num_classes: int, task: str) -> list[str]:
    """The metrics of `classification_metrics` that are 0/0 on these labels (reported there as 0):
    for a binary task with no positive truth, recall; with no positive decision, precision; with
    neither, F1 too."""
    defined = _defined(confusion_matrix(y_true, y_pred, num_classes), task)
    return [name for name, ok in defined.items() if not ok]


def classification_metrics(y_true: Any, y_pred: Any, num_classes: int, task: str) -> dict[str, Any]:
    """n, accuracy, balanced_accuracy, precision, recall, f1, confusion_matrix, per_class_recall."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    scores = {k: float(v) for k, v in _scores(cm, task).items()}
    return {
        "n": int(cm.sum()),
        **scores,
        "confusion_matrix": cm.tolist(),
        "per_class_recall": [c["recall"] for c in _per_class(cm)],
    }


def per_class_metrics(y_true: Any, y_pred: Any, num_classes: int) -> list[dict[str, Any]]:
    """Per class: images (its true count), decided (how many were given it), precision, recall
    and F1, each None where undefined (0/0: precision of a class never decided, recall of one
    with no image, F1 of one with neither), not the 0 the macro averages count."""
    return _per_class(confusion_matrix(y_true, y_pred, num_classes))


def _per_class(cm: np.ndarray) -> list[dict[str, Any]]:
    """`per_class_metrics` of a confusion matrix."""
    support, decided = cm.sum(axis=1), cm.sum(axis=0)
    precision, recall, f1 = _class_scores(cm)
    return [
        {
            "images": int(support[c]),
            "decided": int(decided[c]),
            "precision": float(precision[c]) if decided[c] else None,
            "recall": float(recall[c]) if support[c] else None,
            "f1": float(f1[c]) if support[c] or decided[c] else None,
        }
        for c in range(len(cm))
    ]


def bootstrap_cis(
    y_true: Any,
    y_pred: Any,
    num_classes: int,
    task: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: Any = None,
) -> dict[str, list[float]]:
    """`bootstrap`'s intervals alone."""
    return bootstrap(y_true, y_pred, num_classes, task, n_boot, seed, level, groups)[0]


# How many resampled draws `bootstrap` holds at a time (int64: 128 MiB, and as much again for
# the cells they pick).
_BOOTSTRAP_CELLS = 1 << 24


def bootstrap(
    y_true: Any,
    y_pred: Any,
    num_classes: int,
    task: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: Any = None,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Percentile bootstrap intervals [lo, hi] of accuracy, balanced accuracy, precision,
    recall and F1 (the same resamples for every metric), and for each metric how many resamples
    its interval leaves out: those where it is undefined (`_defined`; counted as 0 they pulled
    the interval down to 0: [0, 1] for a perfect model on 20 images of which 2 Rover). A metric
    undefined in every resample keeps the 0 it has on the whole set.

    Resamples images; with `groups` (one key per image, e.g. its sol), resamples whole groups
    instead (a cluster bootstrap): images of one observation err together, so the interval
    over images alone is too narrow."""
    t, p = _labels(y_true), _labels(y_pred)
    confusion_matrix(t, p, num_classes)  # validates shapes and label range
    if t.size == 0:
        raise ValueError("no predictions to bootstrap")
    k = num_classes
    rng = np.random.default_rng(seed)
    if groups is None:
        cell, size = t * k + p, t.size  # each image's confusion cell
    else:
        keys = np.asarray(groups).reshape(-1)
        if keys.size != t.size:
            raise ValueError(f"{keys.size} group keys for {t.size} predictions")
        gid = np.unique(keys, return_inverse=True)[1].reshape(-1)
        size = int(gid.max()) + 1
        # each group's confusion counts; a resample's matrix is their sum, weighted by how many
        # times the resample drew each group
        per_group = np.bincount(gid * k * k + t * k + p, minlength=size * k * k)
        per_group = per_group.reshape(size, k * k)
    # the resamples drawn a few at a time, the same numbers as drawn at once: all 1000 of
    # 500,000 images at once took about 12 GB (a score of a sort's own labels ran out of memory)
    step = max(1, _BOOTSTRAP_CELLS // size)
    parts = []
    for start in range(0, n_boot, step):
        m = min(step, n_boot - start)
        if groups is None:
            idx = rng.integers(0, size, size=(m, size))
            flat = (np.arange(m)[:, None] * k * k + cell[idx]).ravel()
            parts.append(np.bincount(flat, minlength=m * k * k).reshape(m, k, k))
        else:
            draws = rng.multinomial(size, np.full(size, 1.0 / size), size=m)
            parts.append((draws @ per_group).reshape(m, k, k))
    cms = np.concatenate(parts)
    alpha = (1.0 - level) / 2.0
    defined = _defined(cms, task)
    cis, left_out = {}, {}
    for name, values in _scores(cms, task).items():
        kept = values[defined[name]] if defined[name].any() else values
        cis[name] = [float(q) for q in np.quantile(kept, [alpha, 1.0 - alpha])]
        left_out[name] = n_boot - int(defined[name].sum())
    return cis, left_out


def balanced_threshold(y_true: Any, p_positive: Any, tolerance: float = 0.005) -> float:
    """The decision threshold on the positive class's probability chosen for balanced accuracy:
    of the thresholds (midpoints between distinct probabilities) whose balanced accuracy is
    within `tolerance` of the best, the middle one, so the rule sits on a plateau, not an edge."""
    y = _labels(y_true)
    p = np.asarray(p_positive, dtype=np.float64).reshape(-1)
    if y.shape != p.shape or not np.isin(y, (0, 1)).all():
        raise ValueError("expected binary labels (0/1) and one probability per label")
    if y.min(initial=1) == y.max(initial=0):
        raise ValueError("balanced accuracy needs both classes among the labels")
    u = np.unique(p)
    cuts = (u[:-1] + u[1:]) / 2.0
    if cuts.size == 0:
        return 0.5
    positive = p[None, :] >= cuts[:, None]  # (thresholds, images)
    tpr = positive[:, y == 1].mean(axis=1)
    tnr = (~positive[:, y == 0]).mean(axis=1)
    bal = (tpr + tnr) / 2.0
    near = cuts[bal >= bal.max() - tolerance]
    return float(near[len(near) // 2])


KEEP_AT = (0.8, 0.9, 0.95, 0.99)  # least confidences of `confidence_report`'s keep table


def confidence_report(
    confidence: Any, correct: Any, *, bins: int = 15, keep_at: tuple[float, ...] = KEEP_AT
) -> dict[str, Any]:
    """How far the probability a model gave each decision reads as the chance that it is right.

    `ece`: the expected calibration error, |accuracy - mean confidence| of `bins` bins of equal
    width over (0, 1], weighted by their images. `keep`: for each least confidence in
    `keep_at`, the images whose confidence reaches it, their share and accuracy (None where no
    image does): what keeping only the confident decisions gives."""
    c = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct, dtype=bool).reshape(-1)
    if c.shape != ok.shape or c.size == 0:
        raise ValueError("expected one confidence per decision, and at least one decision")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, c, side="left") - 1, 0, bins - 1)  # (lo, hi]
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, ok, bins) - np.bincount(which, c, bins))  # per-bin sums
    keep = []
    for least in keep_at:
        kept = c >= least
        n = int(kept.sum())
        keep.append({"least": least, "images": n, "share": n / c.size,
                     "accuracy": float(ok[kept].mean()) if n else None})  # fmt: skip
    return {
        "images": int(c.size),
        "accuracy": float(ok.mean()),
        "mean": float(c.mean()),
        "highest": float(c.max()),
        "ece": float(gap.sum() / c.size),
        "bins": bins,
        "bin_images": count.tolist(),
        "keep": keep,
    }
