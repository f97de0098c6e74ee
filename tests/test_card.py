"""The model card (train/card.py): which figure is which in its tables and rules, and msl25's
class list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from marsvision.runtime.spec import PreprocessSpec
from marsvision.train.card import render_card
from marsvision.train.config import TrainConfig

_METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1")


def _scores(accuracy: float, balanced: float, cm: list[list[int]]) -> dict[str, Any]:
    support = [sum(row) for row in cm]
    recall = [row[i] / s if s else None for i, (row, s) in enumerate(zip(cm, support, strict=True))]
    return {"n": sum(support), "accuracy": accuracy, "balanced_accuracy": balanced,
            "precision": 0.91, "recall": 0.92, "f1": 0.93, "confusion_matrix": cm,
            "per_class_recall": recall}  # fmt: skip


def _shipped(**over: Any) -> dict[str, Any]:
    """A shipped binary checkpoint's fields (no weights): val 80/75, its argmax rule 70/65, with
    --tta flip 60/55; test's confusion [[7, 2], [1, 30]], no cell equal to another."""
    val = _scores(0.80, 0.75, [[3, 1], [1, 5]])
    test = _scores(0.925, 0.88, [[7, 2], [1, 30]])
    ci = {s: {m: [0.5, 0.99] for m in _METRICS} for s in ("val", "test")}
    cfg = TrainConfig(data=Path("d"), out=Path("o"), epochs=1).to_dict()
    shipped = {
        "task": "binary", "class_names": ["Surface", "Rover"], "config": cfg,
        "preprocess": PreprocessSpec.for_input_size(64).to_dict(), "created": "2026-01-01",
        "versions": {"torch": "2.4.0"}, "data_fingerprint": "f" * 64, "decision_threshold": 0.4,
        "shipped": {"date": "2026-01-02", "command": "mars-train --data DATA --out o",
                    "source_checkpoint_sha256": "a" * 64, "notes": []},
        "metrics": {"val": val, "test": test, "ci95": ci, "best_epoch": 1,
                    "fp32_run": {"val": val, "test": test},
                    "val_argmax": _scores(0.70, 0.65, [[2, 2], [1, 5]]),
                    "val_tta_flip": _scores(0.60, 0.55, [[2, 2], [2, 4]])},
    }  # fmt: skip
    shipped.update(over)
    return shipped


def _card(shipped: dict[str, Any], msl_dir: Path) -> list[str]:
    card = render_card(shipped, file_name="m.pt", sha256="0" * 64, size_bytes=1, data_dir=msl_dir)
    return card.splitlines()


def test_card_tables_and_rules_say_which_figure_is_which(msl_dir: Path) -> None:
    lines = _card(_shipped(), msl_dir)
    # test confusion: rows are the truth, columns the decision (swapped, it read as [[2, 7] ...])
    at = lines.index("| true \\ predicted | Surface | Rover |")
    # the shipped weights' confusion, in its own paragraph: after the run's own figures it read
    # as theirs
    assert lines[at - 2] == "Test confusion of the shipped weights:"
    assert lines[at - 4].startswith("The run's own fp32 weights scored 80.00 on val")
    assert lines[at + 2 : at + 4] == ["| Surface | 7 | 2 |", "| Rover | 1 | 30 |"]
    # the label rule names what the most probable class would have scored on val
    (rule,) = [line for line in lines if line.startswith("| label rule |")]
    assert rule.endswith("; the most probable class instead: val accuracy 70.00, balanced 65.00 |")
    # --tta flip's val figures against val's own, each where it belongs
    (tta,) = [line for line in lines if line.startswith("Test-time augmentation")]
    assert "val accuracy is 60.00 and balanced accuracy 55.00, against 80.00 and 75.00 without" in (
        tta)  # fmt: skip
    assert "leave it off" in tta
    # the exports are checked against PyTorch before one runs (every msl25 INT8 file measured
    # failed parity, and the card ran it first)
    at = lines.index("## Use and check it")
    assert [line.split()[1] for line in lines[at + 2 : at + 6]] == [
        "--checkpoint", "parity", "../shared/msl/calibrated", "score"]  # fmt: skip
    # each class's recall: the table's figures are Rover's, and Surface's were nowhere
    assert ("Recall of each class (the share of its images given its label): val Surface 75.00 "
            "and Rover 83.33; test Surface 77.78 and Rover 96.77.") in lines  # fmt: skip
    # and each class's F1 (the table's is Rover's): test Surface 2*7 / (9 + 8), Rover 60 / 63
    assert ("F1 of each class: val Surface 75.00 and Rover 83.33; test Surface 82.35 and Rover "
            "95.24.") in lines  # fmt: skip
    # what val and test were used for: val chose the weights; test no choice of the code's
    # ("test read once" was taken for "seen once")
    assert lines[2].endswith(", the epoch chosen on val alone, test used for no choice the code "
                             "makes.")  # fmt: skip
    (metrics,) = [line for line in lines if line.startswith("PyTorch evaluation of exactly")]
    assert "Val chose these weights (the epoch, and the run by the ship rule), so its " in metrics
    # the limits: the training cameras, and those of each split's Surface images (MSL's own)
    assert any(line.startswith("- Trained on Curiosity images of the cameras MH, ML, MR only (")
               for line in lines)  # fmt: skip
    (cameras,) = [line for line in lines if line.startswith("- Surface images by camera: ")]
    assert "train MR 1,547, ML 1,004, MH 52; val MH 632; test MH 321, MR 5. " in cameras
    assert "(val's drill holes 470, ground 87, horizon 75; test's ground 254, horizon 67)" in (
        cameras)  # fmt: skip


def test_msl25_card_lists_five_classes_then_more_and_no_recall_for_a_class_without_images(
    msl_dir: Path,
) -> None:
    names = [f"class{i}" for i in range(25)]
    cm = [[0] * 25 for _ in range(25)]
    for i in range(1, 25):
        cm[i][i] = 2
    cm[3][4] = 2  # class3: 2 of 4 right
    test = {**_scores(0.9, 0.9, cm), "per_class_recall": [None, *([1.0] * 24)]}
    test["per_class_recall"][3] = 0.5
    shipped = _shipped(task="msl25", class_names=names, decision_threshold=None)
    shipped["metrics"] = {**shipped["metrics"], "test": test}
    lines = _card(shipped, msl_dir)
    assert "25 classes (class0, class1, class2, class3, class4, ...)" in lines[2]
    assert "| class0 | 0 | - |" in lines  # no test image: no recall (not 0.00)
    at = lines.index("| class | test images | recall |")
    assert lines[at - 2] == "Test recall by class of the shipped weights:"
    assert "| class3 | 4 | 50.00 |" in lines and "| class1 | 2 | 100.00 |" in lines
    # binary's lines of Surface and Rover: none
    assert not [line for line in lines if line.startswith(("Recall of each", "- Surface images"))]
