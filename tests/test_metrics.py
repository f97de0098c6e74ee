"""train/metrics.py against scikit-learn, on random and edge-case labels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from marsvision.train.metrics import (
    balanced_threshold,
    bootstrap,
    bootstrap_cis,
    classification_metrics,
    confidence_report,
    confusion_matrix,
    per_class_metrics,
    undefined_metrics,
)


def _sk(y_true: np.ndarray, y_pred: np.ndarray, k: int, task: str) -> dict[str, float]:
    kw = {"average": "binary", "pos_label": 1} if task == "binary" else {"average": "macro"}
    return {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
        "precision": skm.precision_score(y_true, y_pred, zero_division=0, **kw),
        "recall": skm.recall_score(y_true, y_pred, zero_division=0, **kw),
        "f1": skm.f1_score(y_true, y_pred, zero_division=0, **kw),
    }


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.filterwarnings("ignore:A single label was found")
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("task", "k"), [("binary", 2), ("msl25", 25)])
def test_matches_sklearn(seed: int, task: str, k: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    # a skewed label distribution so that some classes are absent from y_true or y_pred
    p = rng.dirichlet(np.full(k, 0.3))
    y_true = rng.choice(k, size=n, p=p)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.choice(k, size=n, p=p))
    got = classification_metrics(y_true, y_pred, k, task)
    for key, want in _sk(y_true, y_pred, k, task).items():
        assert got[key] == pytest.approx(want, abs=1e-12), key
    cm = skm.confusion_matrix(y_true, y_pred, labels=list(range(k)))
    assert got["confusion_matrix"] == cm.tolist()
    assert got["n"] == n
    rec = skm.recall_score(y_true, y_pred, labels=list(range(k)), average=None, zero_division=0)
    for c in range(k):
        if (y_true == c).any():
            assert got["per_class_recall"][c] == pytest.approx(rec[c])
        else:
            assert got["per_class_recall"][c] is None


def test_binary_positive_is_rover() -> None:
    # every Rover (1) found, one Surface (0) called Rover: precision 3/4, recall 1
    m = classification_metrics([1, 1, 1, 0, 0], [1, 1, 1, 1, 0], 2, "binary")
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == 1.0
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["confusion_matrix"] == [[1, 1], [0, 3]]


def test_degenerate_predictions_score_zero_not_nan() -> None:
    m = classification_metrics([0, 0, 0], [0, 0, 0], 2, "binary")  # no positives anywhere
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["per_class_recall"] == [1.0, None]


def test_confusion_matrix_rejects_bad_labels() -> None:
    with pytest.raises(ValueError):
        confusion_matrix([0, 2], [0, 1], 2)
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], 2)
    with pytest.raises(ValueError):  # unchecked, -1 would count as the last class
        confusion_matrix([0, -1], [0, 1], 2)
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [-1, 1], 2)


def test_bootstrap_ci() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    pred = np.where(rng.random(400) < 0.8, y, 1 - y)
    acc = float((y == pred).mean())
    lo, hi = bootstrap_cis(y, pred, 2, "binary", n_boot=2000, seed=1)["accuracy"]
    assert lo < acc < hi
    # the normal-approximation half width is 1.96 * sqrt(p(1-p)/n) ~ 0.039 here
    half = 1.96 * np.sqrt(acc * (1 - acc) / 400)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_cis(y, pred, 2, "binary", n_boot=2000, seed=1)["accuracy"] == [lo, hi]
    lo4, hi4 = bootstrap_cis(np.tile(y, 4), np.tile(pred, 4), 2, "binary", n_boot=2000,
                             seed=1)["accuracy"]  # fmt: skip
    assert hi4 - lo4 < (hi - lo) * 0.7  # four times the data: about half the width


@pytest.mark.parametrize(("task", "k"), [("binary", 2), ("msl25", 25)])
def test_bootstrap_cis_match_metrics_on_each_resample(task: str, k: int) -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, k, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, k, 300))
    n_boot = 50
    cis = bootstrap_cis(y, pred, k, task, n_boot=n_boot, seed=4)
    # the reference: classification_metrics on each of the same resamples, one at a time
    idx = np.random.default_rng(4).integers(0, 300, size=(n_boot, 300))
    for name in ("accuracy", "balanced_accuracy", "precision", "recall", "f1"):
        ref = [classification_metrics(y[i], pred[i], k, task)[name] for i in idx]
        assert cis[name] == pytest.approx(list(np.quantile(ref, [0.025, 0.975])), abs=1e-12)
    point = classification_metrics(y, pred, k, task)
    assert all(lo <= point[m] <= hi for m, (lo, hi) in cis.items())
    # accuracy is also the plain mean of correct answers on each resample
    correct = (y == pred).astype(float)[idx].mean(axis=1)
    assert cis["accuracy"] == pytest.approx(list(np.quantile(correct, [0.025, 0.975])))


def test_bootstrap_by_group_resamples_whole_groups() -> None:
    """The cluster bootstrap equals classification_metrics on explicit resamples of the groups,
    and widens the interval when a group's images err together."""
    rng = np.random.default_rng(6)
    groups = np.repeat(np.arange(40), 10)  # 40 observations (sols) of 10 images
    y = rng.integers(0, 2, 400)
    pred = np.where(np.repeat(rng.random(40) < 0.8, 10), y, 1 - y)  # a whole sol right or wrong
    keys = np.array([f"{g:04d}" for g in groups])[rng.permutation(400)]  # any order, strings
    n_boot = 200
    cis = bootstrap_cis(y, pred, 2, "binary", n_boot=n_boot, seed=7, groups=keys)
    # the reference: the same multinomial draws of the (sorted) groups, images repeated by hand
    members = [np.flatnonzero(keys == g) for g in np.unique(keys)]
    draws = np.random.default_rng(7).multinomial(40, np.full(40, 1 / 40), size=n_boot)
    ref = []
    for counts in draws:
        idx = np.concatenate([np.repeat(m, c) for m, c in zip(members, counts, strict=True)])
        ref.append(classification_metrics(y[idx], pred[idx], 2, "binary"))
    for name in ("accuracy", "balanced_accuracy", "precision", "recall", "f1"):
        want = np.quantile([r[name] for r in ref], [0.025, 0.975])
        assert cis[name] == pytest.approx(list(want), abs=1e-12), name

    by_sol = bootstrap_cis(y, pred, 2, "binary", n_boot=2000, seed=1, groups=groups)["accuracy"]
    by_image = bootstrap_cis(y, pred, 2, "binary", n_boot=2000, seed=1)["accuracy"]
    assert by_sol[1] - by_sol[0] > 2.5 * (by_image[1] - by_image[0])  # ~sqrt(10) wider
    # more images of the same 40 sols narrow the interval over images, not over sols
    by_sol4 = bootstrap_cis(np.tile(y, 4), np.tile(pred, 4), 2, "binary", n_boot=2000, seed=1,
                            groups=np.tile(groups, 4))["accuracy"]  # fmt: skip
    assert by_sol4[1] - by_sol4[0] == pytest.approx(by_sol[1] - by_sol[0], rel=0.2)
    with pytest.raises(ValueError, match="3 group keys for 400"):
        bootstrap_cis(y, pred, 2, "binary", groups=[1, 2, 3])


@pytest.mark.parametrize("grouped", [False, True])
def test_bootstrap_drawn_a_few_resamples_at_a_time_gives_the_same_intervals(
    grouped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resamples are drawn in chunks (all 1000 of 500,000 images at once took ~12 GB): the
    same random numbers, so the same intervals, whatever the chunk (one resample, some, all)."""
    import marsvision.train.metrics as m

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 2001)
    pred = np.where(rng.random(2001) < 0.8, y, rng.integers(0, 3, 2001))
    groups = [f"sol{i // 7}" for i in range(2001)] if grouped else None
    size = 286 if grouped else 2001  # what one resample draws: groups, or images
    got = []
    for cells in (1 << 30, size * 37, 1):  # all 500 at once, 37 (and a last 19), one by one
        monkeypatch.setattr(m, "_BOOTSTRAP_CELLS", cells)
        got.append(bootstrap(y, pred, 3, "msl25", n_boot=500, seed=5, groups=groups))
    assert got[0] == got[1] == got[2]


def test_bootstrap_leaves_out_resamples_where_a_metric_is_undefined() -> None:
    """A perfect model on 20 images, 2 of them Rover: about one resample in ten has no Rover,
    where precision, recall and F1 are 0/0. Counted as 0 they made the intervals [0, 1]; left
    out, the intervals are those of the resamples where the metric means something: [1, 1]."""
    y = np.array([1, 1] + [0] * 18)
    cis, left_out = bootstrap(y, y, 2, "binary", n_boot=1000, seed=0)
    assert all(cis[m] == [1.0, 1.0] for m in ("accuracy", "precision", "recall", "f1"))
    idx = np.random.default_rng(0).integers(0, 20, size=(1000, 20))
    no_rover = int((y[idx].sum(axis=1) == 0).sum())  # the same resamples, by hand
    assert 50 < no_rover < 150
    assert left_out == {"accuracy": 0, "balanced_accuracy": 0, "precision": no_rover,
                        "recall": no_rover, "f1": no_rover}  # fmt: skip
    assert bootstrap_cis(y, y, 2, "binary") == cis  # the intervals alone
    # a false alarm: precision is defined wherever an image was decided Rover, recall wherever
    # a Rover was among the truths
    pred = y.copy()
    pred[5] = 1
    cis, left_out = bootstrap(y, pred, 2, "binary", n_boot=1000, seed=0)
    assert left_out["recall"] == no_rover and cis["recall"] == [1.0, 1.0]
    assert 0 < left_out["precision"] < no_rover  # the false alarm is a decision too
    # undefined in every resample: the 0 of the whole set
    none = np.zeros(20, dtype=int)
    cis, left_out = bootstrap(none, none, 2, "binary", n_boot=100)
    assert cis["f1"] == [0.0, 0.0] and left_out["f1"] == 100 and left_out["accuracy"] == 0


def test_undefined_metrics_are_the_ratios_of_zero_over_zero() -> None:
    assert undefined_metrics([0, 0], [0, 0], 2, "binary") == ["precision", "recall", "f1"]
    assert undefined_metrics([0, 0], [0, 1], 2, "binary") == ["recall"]  # f1 = 0: a false alarm
    assert undefined_metrics([1, 0], [0, 0], 2, "binary") == ["precision"]  # f1 = 0: a miss
    assert undefined_metrics([1, 0], [1, 0], 2, "binary") == []
    assert undefined_metrics([3, 3], [3, 3], 25, "msl25") == []  # macro averages: any image


def test_bootstrap_cis_degenerate_and_invalid() -> None:
    y = np.array([0, 1, 1, 0, 1])
    assert bootstrap_cis(y, y, 2, "binary", n_boot=20)["f1"] == [1.0, 1.0]
    with pytest.raises(ValueError):
        bootstrap_cis([], [], 2, "binary")
    with pytest.raises(ValueError):
        bootstrap_cis([0, 2], [0, 1], 2, "binary")


def test_balanced_threshold_sits_in_the_middle_of_the_best_plateau() -> None:
    rng = np.random.default_rng(5)
    neg, pos = rng.uniform(0.0, 0.6, 300), rng.uniform(0.7, 1.0, 100)
    y = np.r_[np.zeros(300, int), np.ones(100, int)]
    t = balanced_threshold(y, np.r_[neg, pos], tolerance=0.0)
    assert neg.max() < t < pos.min()  # separable: any cut in the gap is perfect; one in it
    # one positive sits among the negatives: the best cuts are still the gap (99.5%), and a
    # tolerance of 0.5 points also admits cuts that give up a little, around the gap
    p = np.r_[neg, pos[:-1], 0.3]
    exact = balanced_threshold(y, p, tolerance=0.0)
    assert neg.max() < exact < pos[:-1].min()
    loose = balanced_threshold(y, p, tolerance=0.005)
    bal = lambda c: ((p[y == 1] >= c).mean() + (p[y == 0] < c).mean()) / 2  # noqa: E731
    assert bal(loose) >= bal(exact) - 0.005
    # a worked case: 5 negatives, 3 positives; cuts .15 ... .85 give balanced accuracy .6, .7,
    # .8, .9, 1.0 (.65), .83, .67: the best alone, then with a tolerance of .31 the five cuts
    # from .25 to .75, whose middle one is .5 (not an edge, nor the best cut again)
    y8 = [0, 0, 0, 0, 0, 1, 1, 1]
    p8 = [0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]
    assert balanced_threshold(y8, p8, tolerance=0.0) == pytest.approx(0.65)
    assert balanced_threshold(y8, p8, tolerance=0.31) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        balanced_threshold([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError):
        balanced_threshold([0, 1, 2], [0.2, 0.5, 0.9])


def test_confidence_report_by_hand() -> None:
    """Bins of equal width, (lo, hi]: 0.5 and 0.6 share the bin (0.5, 0.75] of 4 bins, 0.75
    too; 0.76 and 1.0 are in (0.75, 1]."""
    conf = [0.5, 0.6, 0.75, 0.76, 1.0]
    right = [True, False, True, True, True]
    rep = confidence_report(conf, right, bins=4, keep_at=(0.75, 0.99, 1.01))
    # bin (0.25, 0.5]: 0.5, right: |1 - 0.5| = 0.5; (0.5, 0.75]: 0.6 wrong, 0.75 right:
    # |1 - 1.35| = 0.35; (0.75, 1]: both right: |2 - 1.76| = 0.24
    assert rep["ece"] == pytest.approx((0.5 + 0.35 + 0.24) / 5)
    assert rep["bin_images"] == [0, 1, 2, 2]
    assert rep["mean"] == pytest.approx(3.61 / 5) and rep["highest"] == 1.0
    assert rep["accuracy"] == 0.8 and rep["images"] == 5
    assert rep["keep"] == [
        {"least": 0.75, "images": 3, "share": 0.6, "accuracy": 1.0},
        {"least": 0.99, "images": 1, "share": 0.2, "accuracy": 1.0},
        {"least": 1.01, "images": 0, "share": 0.0, "accuracy": None},
    ]
    perfect = confidence_report([1.0, 1.0, 0.0], [True, True, False])
    assert perfect["ece"] == 0.0 and perfect["bin_images"][0] == 1  # 0 goes to the first bin
    with pytest.raises(ValueError):
        confidence_report([0.5], [True, False])
    with pytest.raises(ValueError):
        confidence_report([], [])


def test_every_metric_is_undefined_without_an_image() -> None:
    """No image: every ratio is 0/0, accuracy too (`_defined`'s any_image; counting `>= 0`
    images left accuracy and msl25's macro averages defined)."""
    every = ["accuracy", "balanced_accuracy", "precision", "recall", "f1"]
    assert undefined_metrics([], [], 2, "binary") == every
    assert undefined_metrics([], [], 25, "msl25") == every


def test_balanced_threshold_of_one_probability_is_one_half() -> None:
    """Every val image given the same probability: no cut between two of them, so the rule is
    the plain 0.5 (not that probability, which calls every image Rover)."""
    assert balanced_threshold([0, 1, 0], [0.3, 0.3, 0.3]) == 0.5


def test_balanced_threshold_of_an_even_plateau_is_its_upper_middle() -> None:
    """Cuts .35, .5, .65, .75 lie within .21 of the best (balanced accuracy .8, .9, 1.0,
    .83): of four, the third (index len // 2), the best one here, not .5."""
    y8 = [0, 0, 0, 0, 0, 1, 1, 1]
    p8 = [0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]
    assert balanced_threshold(y8, p8, tolerance=0.21) == pytest.approx(0.65)


def test_per_class_metrics_match_sklearn_and_leave_0_over_0_undefined() -> None:
    """Each class's images, decisions, precision, recall and F1 as scikit-learn computes them;
    a class never decided has no precision, one without images no recall, one with neither no
    F1 (not the 0 the macro averages count); the macro F1 is the mean over the defined ones."""
    y_true = np.array([0, 0, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 4, 2])
    rows = per_class_metrics(y_true, y_pred, 5)
    p, r, f, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=range(5), zero_division=0
    )
    assert [row["images"] for row in rows] == support.tolist() == [2, 1, 3, 0, 0]
    assert [row["decided"] for row in rows] == [1, 3, 1, 0, 1]
    for c in (0, 1, 2):
        assert (rows[c]["precision"], rows[c]["recall"], rows[c]["f1"]) == pytest.approx(
            (p[c], r[c], f[c])
        )
    assert rows[3] == {"images": 0, "decided": 0, "precision": None, "recall": None, "f1": None}
    assert rows[4] == {"images": 0, "decided": 1, "precision": 0.0, "recall": None, "f1": 0.0}
    macro = classification_metrics(y_true, y_pred, 5, "msl25")["f1"]
    assert macro == pytest.approx(np.mean([row["f1"] for row in rows if row["f1"] is not None]))
