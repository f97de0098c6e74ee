"""`mars-bench parity` on real exported artifacts of the tiny checkpoint and real MSL test images.

The verdicts are checked against the thresholds applied to the reported numbers (INT8 of a
barely trained model may honestly fail the 99% bar), the reference numbers against an
independent PyTorch run, and a deliberately broken artifact must FAIL with exit code 3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from marsvision.benchmarks.artifacts import (
    Artifact,
    check_exported_from,
    find_artifacts,
    skip_reason,
)
from marsvision.benchmarks.cli import main
from marsvision.benchmarks.parity import PARITY_FAIL_EXIT, Thresholds, verdict
from marsvision.benchmarks.parity_report import HEADERS, render_markdown, render_text, table_rows
from marsvision.export.tensorrt import tensorrt_unavailable_reason
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.models import UNLISTED, artifact_name

LIMIT = 48  # real test images per run: a few seconds per artifact on 2 cores


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tiny_exports: Path) -> tuple[Path, Path]:
    """(checkpoint, export out dir with fp32, fp16, int8-cpu and int8-trt ONNX)."""
    return tiny_checkpoint, tiny_exports


def _run(args: list[str]) -> tuple[int, str, dict[str, Any]]:
    result = CliRunner().invoke(main, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    out_dir = Path(args[args.index("--out") + 1])
    (report_file,) = sorted(out_dir.glob("parity-*.json"))
    return result.exit_code, result.output, json.loads(report_file.read_text())


def _reference_accuracy(ckpt: Path, msl_dir: Path) -> float:
    """Accuracy of the checkpoint on the first LIMIT test images, computed here independently."""
    import torch
    from PIL import Image

    from marsvision.train.checkpoint import (
        load_checkpoint,
        model_from_checkpoint,
        preprocess_from_checkpoint,
    )
    from marsvision.train.data import read_split
    from marsvision.train.transforms import eval_transform

    c = load_checkpoint(ckpt)
    model = model_from_checkpoint(c)
    tf = eval_transform(preprocess_from_checkpoint(c))
    samples = read_split(msl_dir, "test", "binary", limit=LIMIT)
    x = torch.stack([tf(Image.open(s.path).convert("RGB")) for s in samples])
    with torch.inference_mode():
        pred = model(x).argmax(1).numpy()
    return 100.0 * float(np.mean(pred == np.array([s.label for s in samples])))


def test_parity_table_and_verdicts(
    exported: tuple[Path, Path], msl_dir: Path, tmp_path: Path
) -> None:
    ckpt, art = exported
    out = tmp_path / "res"
    code, output, report = _run(
        [
            "parity",
            "--checkpoint",
            str(ckpt),
            "--artifacts",
            str(art),
            "--data",
            str(msl_dir),
            "--splits",
            "test",
            "--limit",
            str(LIMIT),
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    rows = {r["flavour"]: r for r in report["rows"]}
    assert set(rows) == {"pytorch", "fp32", "fp16", "int8-cpu", "int8-trt"}
    from marsvision.benchmarks.parity_report import render_markdown, render_text

    # a pass on the first LIMIT images said "all" and "all artifacts pass"
    limited = f"the first {LIMIT} of its 1305 images (--limit)"
    assert report["scopes"] == {"test": limited}
    assert render_text(report).startswith(f"test: {limited}\n")
    passing = {**report, "failed": [], "passed": True}  # the tiny model's INT8 fails
    passing["rows"] = [{**r, "failures": []} for r in report["rows"]]
    assert render_text(passing).endswith("parity: all artifacts pass on part of a split "
                                         "(--limit): not a check of the whole split")  # fmt: skip
    assert render_text({**passing, "scopes": {"test": "all"}}).endswith(
        "parity: all artifacts pass"
    )
    assert not render_text({**report, "scopes": {"test": "all"}}).startswith("test:")
    partial = {**report, "scopes": {"test": "held-out half by sol"}}  # how a half is shown
    assert render_text(partial).startswith("test: held-out half by sol\n")
    assert "\nImages of test: held-out half by sol.\n" in render_markdown(partial)
    # F1 is Rover's for a binary model, msl25's macro average for one of 25 classes
    assert " F1 % " in render_text(report) and "macro F1" not in render_markdown(report)
    assert " macro F1 % " in render_text({**report, "task": "msl25"})
    assert "| macro F1 % |" in render_markdown({**report, "task": "msl25"})
    # The reference figures are the checkpoint's own, as an independent run computes them.
    ref = rows["pytorch"]["splits"]["test"]
    assert ref["n"] == LIMIT
    assert ref["accuracy"] == pytest.approx(_reference_accuracy(ckpt, msl_dir))
    # FP32 ONNX must give PyTorch's predictions.
    fp32 = rows["fp32"]["splits"]["test"]
    assert rows["fp32"]["verdict"] == "PASS"
    assert fp32["top1_agreement"] == 100.0 and fp32["accuracy_change"] == 0.0
    assert fp32["max_prob_diff"] < 1e-3
    # Every verdict is the thresholds applied to the reported numbers.
    t = Thresholds()
    for flavour in ("fp32", "fp16", "int8-cpu", "int8-trt"):
        f = rows[flavour]["splits"]["test"]
        agree, change = f["top1_agreement"], abs(f["accuracy_change"])
        expected = {
            "fp32": agree >= t.fp32_min_agreement,
            "fp16": change <= t.fp16_max_accuracy_change and agree >= t.fp16_min_agreement,
            "int8": change <= t.int8_max_accuracy_change and agree >= t.int8_min_agreement,
        }[rows[flavour]["precision"]]
        assert f["passed"] is expected, flavour
        assert rows[flavour]["verdict"] == ("PASS" if expected else "FAIL")
        assert f["disagreements"] == round(LIMIT * (100 - agree) / 100)
        assert rows[flavour]["size_mib"] == pytest.approx(
            (art / rows[flavour]["artifact"]).stat().st_size / 2**20
        )
        assert f["ms_per_image"] > 0 and len(f["per_class"]) == 2
        assert rows[flavour]["artifact"] in output
    assert rows["int8-cpu"]["size_mib"] < rows["fp32"]["size_mib"] / 3
    any_fail = any(r["verdict"] == "FAIL" for r in report["rows"])
    assert code == (PARITY_FAIL_EXIT if any_fail else 0)
    assert report["passed"] is not any_fail
    md = (out / next(out.glob("parity-*.md")).name).read_text()
    assert "Per-class recall, test split" in md and "Surface" in md
    # why an artifact failed or was skipped, and the verdict: the markdown said neither, and a
    # long skip reason was cut short in both tables
    why = "skipped: resnet50-binary.int8-cpu.onnx: " + "not listed " * 6
    last = report["rows"][-1]
    odd = {**report, "failed": ["a.onnx"], "passed": False, "rows": [
        *report["rows"], {**last, "artifact": "a.onnx", "failures": ["agreement 97.0 < 99.0"]},
        {**last, "artifact": "b.onnx", "status": why, "failures": []}]}  # fmt: skip
    odd_md = render_markdown(odd)
    for line in ("FAIL a.onnx: agreement 97.0 < 99.0", f"b.onnx: {why}",
                 "parity: 1 artifact(s) FAIL: a.onnx"):  # fmt: skip
        assert f"\n- {line}\n" in odd_md and f"\n{line}" in render_text(odd), line
    # the label rule every figure follows (it was in no report)
    assert report["decision_threshold"] is None
    assert " preprocessing excluded. Labels: the most probable class.\n" in md
    at = render_markdown({**report, "decision_threshold": 0.9999992})
    assert " Labels: Rover where P(Rover) >= 0.9999992, else Surface.\n" in at


def test_val_of_a_half_val_model_is_its_held_out_half(msl_dir: Path) -> None:
    """Parity scores val as the model's own metrics do: a train+half-val model's held-out half
    only (the other half is training data); a refit's val is all of it, said to be trained on.
    A --limit other than the run's scores none of the images the run trained on (halving the
    first N images by sol made other halves, and put trained-on images in the scored one)."""
    from marsvision.benchmarks.parity import scored_part
    from marsvision.train.data import halve_by_sol, read_split, sol_key

    val = read_split(msl_dir, "val", "binary")
    test = read_split(msl_dir, "test", "binary", limit=LIMIT)
    half = {"train_on": "train+half-val"}
    assert scored_part({"train_on": "train"}, "val", msl_dir, "binary", None) == (val, "all")
    assert scored_part({}, "val", msl_dir, "binary", None) == (val, "all")  # from before the flag
    got, scope = scored_part(half, "val", msl_dir, "binary", None)
    assert got == halve_by_sol(val)[1] and len(got) == 836
    assert scope == "held out (804 images of val's other half by sol were trained on)"
    got, scope = scored_part({"train_on": "train+val"}, "val", msl_dir, "binary", None)
    assert got == val and scope == "all, training data (a train+val refit)"
    limited = f"the first {LIMIT} of its 1305 images (--limit)"  # it said "all"
    for train_on in ("train", "train+half-val", "train+val"):  # test is always all of test
        assert scored_part({"train_on": train_on}, "test", msl_dir, "binary", LIMIT) == (
            test, limited)  # fmt: skip
    assert scored_part({}, "test", msl_dir, "binary", 1305) == (
        read_split(msl_dir, "test", "binary"),
        "all",
    )
    trained = set(halve_by_sol(val)[0])
    for limit in (100, 400, 800):  # the run read all of val; parity reads the first `limit`
        got, _ = scored_part(half, "val", msl_dir, "binary", limit)
        assert got == [s for s in val[:limit] if s not in trained] and not trained & set(got)
    run16 = {**half, "limit": 16}  # a quick run halved its first 16; parity reads all of val
    as_trained = set(halve_by_sol(val[:16])[0])
    got, scope = scored_part(run16, "val", msl_dir, "binary", None)
    # none of its trained sols: the rest of val held 378 more images of them (and frames)
    sols = {sol_key(s.path) for s in as_trained}
    assert got == [s for s in val if sol_key(s.path) not in sols]
    assert len(got) == len(val) - len(as_trained) - 378
    assert scope == (f"held out ({len(as_trained)} images of val's other half by sol were "
                     "trained on; 378 more images of their sols left out)")  # fmt: skip
    got, scope = scored_part(half, "val", msl_dir, "binary", 4)  # counts what it read
    n = len([s for s in val[:4] if s in trained])
    assert len(got) == 4 - n
    assert scope.startswith(f"the first 4 of its 1640 images (--limit); of them, held out ({n} ")
    first = val[0]  # a limit that reads only trained-on images: one line, not an empty split
    assert first in trained
    with pytest.raises(MarsvisionError, match="--limit 1: the run trained on all of the first 1"):
        scored_part(half, "val", msl_dir, "binary", 1)


def _negate_head(src: Path, dst: Path) -> None:
    """Copy an FP32 ONNX with the classifier's weights and bias negated (metadata kept)."""
    model = onnx.load(str(src))
    from onnx import numpy_helper

    changed = 0
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.shape in ((2, 2048), (2,)):
            init.CopyFrom(numpy_helper.from_array(-a, init.name))
            changed += 1
    assert changed == 2, "expected the fc weight and bias of a binary ResNet-50"
    onnx.save_model(model, str(dst))


def test_broken_artifact_fails_with_exit_code(
    exported: tuple[Path, Path], msl_dir: Path, tmp_path: Path
) -> None:
    ckpt, art = exported
    broken = tmp_path / "broken"
    broken.mkdir()
    _negate_head(art / "resnet50-binary.fp32.onnx", broken / "resnet50-binary.fp32.onnx")
    out = tmp_path / "res"
    code, output, report = _run(
        [
            "parity",
            "--checkpoint",
            str(ckpt),
            "--artifacts",
            str(broken),
            "--data",
            str(msl_dir),
            "--splits",
            "test",
            "--limit",
            "16",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    row = report["rows"][1]
    assert row["verdict"] == "FAIL" and row["splits"]["test"]["top1_agreement"] < 100.0
    assert code == PARITY_FAIL_EXIT
    assert "FAIL" in output and report["passed"] is False


@pytest.mark.skipif(
    tensorrt_unavailable_reason() is None,
    reason="TensorRT and a GPU are here: a fake engine would be run, not skipped",
)
def test_engine_without_tensorrt_is_skipped_not_failed(
    exported: tuple[Path, Path], msl_dir: Path, tmp_path: Path
) -> None:
    ckpt, art = exported
    d = tmp_path / "art"
    d.mkdir()
    shutil.copy(art / "resnet50-binary.fp32.onnx", d)
    (d / "resnet50-binary.fp16.plan").write_bytes(b"not an engine")
    args = ["parity", "--checkpoint", str(ckpt), "--artifacts", str(d), "--data", str(msl_dir),
            "--splits", "test", "--limit", "8", "--device", "cpu",
            "--out", str(tmp_path / "res")]  # fmt: skip
    code, output, report = _run(args)
    engine = next(r for r in report["rows"] if r["flavour"] == "fp16-engine")
    assert engine["status"].startswith("skipped: ") and engine["verdict"] == "skipped"
    assert "this run is on the CPU" in engine["status"]
    assert code == 0, output
    # the engine alone: nothing was compared, which is no pass (it said "all artifacts pass")
    (d / "resnet50-binary.fp32.onnx").unlink()
    code, output, report = _run(args[:-1] + [str(tmp_path / "alone")])
    assert code == PARITY_FAIL_EXIT and not report["passed"] and report["compared"] == []
    assert "parity: no artifact was compared (every one was skipped)" in output


@pytest.mark.parametrize(
    ("precision", "agree", "change", "ok"),
    [
        ("fp32", 100.0, 0.0, True),
        ("fp32", 99.9, 0.0, False),
        ("fp16", 99.5, 0.1, True),
        ("fp16", 100.0, -0.11, False),
        # an accuracy that holds while decisions move both ways: not the same model
        ("fp16", 99.4, 0.0, False),
        ("int8", 99.0, -0.5, True),
        ("int8", 98.9, 0.0, False),
        ("int8", 100.0, 0.6, False),
        # exactly at the limit, as floats compute it: one image of 200 or of 1,000
        ("int8", 99.0, 100.0 * (151 / 200 - 150 / 200), True),
        ("fp16", 100.0, 100.0 * (901 / 1000 - 900 / 1000), True),
        ("fp16", 100.0 * (995 / 1000), 0.0, True),
    ],
)
def test_verdict_thresholds(precision: str, agree: float, change: float, ok: bool) -> None:
    passed, reasons = verdict(
        precision, {"top1_agreement": agree, "accuracy_change": change}, Thresholds()
    )
    assert passed is ok and bool(reasons) is not ok


def test_compare_labels_by_the_models_decision_threshold() -> None:
    """With a decision threshold, accuracy and agreement use the model's rule, not argmax:
    here the artifact moves two images across 0.5 but not across the threshold 0.9."""
    from marsvision.benchmarks.parity import compare

    def logits(p_rover: list[float]) -> np.ndarray:
        p = np.array(p_rover)
        return np.log(np.stack([1 - p, p], axis=1))

    y = np.array([0, 0, 1, 1])
    ref = logits([0.40, 0.60, 0.95, 0.97])
    art = logits([0.60, 0.40, 0.95, 0.97])
    argmax = compare(ref, art, y, num_classes=2, task="binary")
    assert argmax["top1_agreement"] == 50.0 and argmax["disagreements"] == 2
    ruled = compare(ref, art, y, num_classes=2, task="binary", threshold=0.9)
    assert ruled["top1_agreement"] == 100.0 and ruled["accuracy"] == 100.0
    assert ruled["accuracy_change"] == 0.0


def test_time_per_image_and_rate() -> None:
    from marsvision.benchmarks.parity import _Model

    y = np.array([0, 1, 1, 0])
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]])
    model = _Model("binary", ["Surface", "Rover"], None)
    f = model.compare(logits, logits, y, 0.5)
    assert f["ms_per_image"] == 125.0 and f["images_per_s"] == 8.0
    assert model.compare(logits, logits, y, 0.0)["images_per_s"] is None  # too fast to time


def test_a_limit_below_the_splits_size_is_said(msl_dir: Path) -> None:
    from marsvision.benchmarks.parity import LIMITED, scored_part
    from marsvision.train.data import read_split

    total = len(read_split(msl_dir, "test", "binary"))
    part, scope = scored_part({}, "test", msl_dir, "binary", total - 1)
    assert len(part) == total - 1
    assert scope == f"the first {total - 1} of its {total} images {LIMITED}"
    for limit in (total, total + 1, None):
        part, scope = scored_part({}, "test", msl_dir, "binary", limit)
        assert (len(part), scope) == (total, "all")


def test_outputs_that_are_not_finite_fail_the_artifact() -> None:
    """A NaN row's argmax is class 0: it was counted as a prediction like any other, and an
    artifact whose NaN rows happened to match passed with 100% agreement."""
    from marsvision.benchmarks.parity import compare

    y = np.array([0, 0, 1, 1])
    ref = np.array([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    art = ref.copy()
    art[0] = np.nan
    art[1, 1] = np.inf
    f = compare(ref, art, y, num_classes=2, task="binary")
    assert f["non_finite"] == 2 and f["disagreements"] == 2 and f["top1_agreement"] == 50.0
    assert f["accuracy"] == 50.0 and f["accuracy_change"] == -50.0
    assert f["max_prob_diff"] == 1.0  # the most rows can differ by: no NaN in the report
    # the reference wrong on the NaN row: the artifact's stand-in label matches it, and is still
    # a disagreement
    wrong_ref = ref.copy()
    wrong_ref[0] = [0.0, 2.0]
    g = compare(wrong_ref, art, y, num_classes=2, task="binary")
    assert g["disagreements"] == 2 and g["top1_agreement"] == 50.0
    for precision in ("fp32", "fp16", "int8"):
        passed, reasons = verdict(precision, f, Thresholds(int8_max_accuracy_change=100.0,
                                                           int8_min_agreement=0.0,
                                                           fp16_max_accuracy_change=100.0,
                                                           fp16_min_agreement=0.0,
                                                           fp32_min_agreement=0.0))  # fmt: skip
        assert not passed and "2 of 4 outputs not finite" in reasons[0]


def test_a_reference_that_is_not_finite_is_refused(
    exported: tuple[Path, Path], msl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every artifact was blamed (agreement, accuracy) for NaN in the PyTorch reference."""
    from marsvision.benchmarks import parity, torch_baseline

    ckpt, art = exported
    monkeypatch.setattr(torch_baseline, "reference_logits",
                        lambda _c, paths, **_: (np.full((len(paths), 2), np.nan), 1.0))  # fmt: skip
    cfg = parity.ParityConfig(checkpoint=ckpt, artifacts=art, data_dir=msl_dir, splits=("test",),
                              limit=4)  # fmt: skip
    with pytest.raises(MarsvisionError, match="reference's outputs are not finite .* on 4 of 4"):
        parity.run_parity(cfg)


def test_a_data_set_the_checkpoint_was_not_trained_on_is_refused(
    exported: tuple[Path, Path], msl_dir: Path, tmp_path: Path
) -> None:
    """A data folder whose val list was test's was scored and reported as val (mars-export
    refuses such a folder)."""
    from marsvision.benchmarks import parity
    from marsvision.train import data as msl

    ckpt, art = exported
    other = tmp_path / "other"
    other.mkdir()
    (other / "calibrated").symlink_to(msl_dir / "calibrated")
    for name in (msl.SYNSET_FILE, *msl.SPLIT_FILES.values()):
        (other / name).write_bytes((msl_dir / name).read_bytes())
    (other / msl.SPLIT_FILES["val"]).write_bytes((msl_dir / msl.SPLIT_FILES["test"]).read_bytes())
    cfg = parity.ParityConfig(checkpoint=ckpt, artifacts=art, data_dir=other, splits=("val",),
                              limit=4)  # fmt: skip
    with pytest.raises(MarsvisionError, match=r"other is not the data set .* was trained on"):
        parity.run_parity(cfg)


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ({"source_checkpoint_sha256": "0" * 64}, "was exported from another checkpoint"),
        ({"class_names": ["Rover", "Surface"]}, "class names differ from the checkpoint's"),
        ({"decision_threshold": 0.3}, "decision threshold 0.3 differs from the checkpoint's"),
    ],
)
def test_an_artifact_of_another_model_is_refused_before_the_reference(
    change: dict[str, Any], exported: tuple[Path, Path], msl_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:  # fmt: skip
    """Refused only after the PyTorch reference had run on every split (minutes on a CPU)."""
    from marsvision.benchmarks import parity, torch_baseline
    from marsvision.runtime.metadata import METADATA_KEY

    ckpt, art = exported
    model = onnx.load(str(art / "resnet50-binary.fp32.onnx"))
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = json.dumps({**json.loads(prop.value), **change})
    (tmp_path / "a").mkdir()
    onnx.save(model, str(tmp_path / "a" / "resnet50-binary.fp32.onnx"))

    def reference(*_: object, **__: object) -> None:
        raise AssertionError("the PyTorch reference ran before the artifacts were checked")

    monkeypatch.setattr(torch_baseline, "reference_logits", reference)
    cfg = parity.ParityConfig(checkpoint=ckpt, artifacts=tmp_path / "a", data_dir=msl_dir,
                              splits=("test",), limit=4)  # fmt: skip
    with pytest.raises(MarsvisionError, match=refusal):
        parity.run_parity(cfg)


def test_a_file_the_manifest_does_not_list_is_not_measured(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    """A file that mars-export left out of manifest.json (replaced by hand, or from an earlier
    export; mars-infer passes over it) was measured and passed under the flavour its name says,
    by parity and speed alike."""
    from marsvision.benchmarks import parity
    from marsvision.benchmarks.artifacts import find_artifacts, skip_reason
    from marsvision.benchmarks.speed import SpeedConfig, plan
    from marsvision.export.artifacts import MANIFEST
    from marsvision.runtime.models import CHANGED, UNLISTED

    ckpt, art = exported
    folder = tmp_path / "export"
    folder.mkdir()
    for f in art.iterdir():
        if f.is_file():
            (folder / f.name).hardlink_to(f)  # the same bytes, no copy
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["flavour"] != "int8-cpu"]
    (folder / MANIFEST).unlink()
    (folder / MANIFEST).write_text(json.dumps(manifest))
    reasons = {a.flavour: skip_reason(a, "cpu") for a in find_artifacts(folder)}
    assert reasons == {"fp32": None, "fp16": None, "int8-cpu": UNLISTED, "int8-trt": None}
    cfg = SpeedConfig(checkpoint=ckpt, artifacts=folder, precisions=("int8-cpu", "int8-trt"),
                      backends=("onnxruntime",), modes=("model",))  # fmt: skip
    jobs, skipped = plan(cfg)
    assert {j.precision for j in jobs} == {"fp32", "int8-trt"}  # the baseline and the listed
    assert [r["status"] for r in skipped] == [f"skipped: resnet50-binary.int8-cpu.onnx: {UNLISTED}"]
    # one it lists with other bytes than its sha256's (a bit flipped in a weight loads and
    # runs): speed passes over it; parity fails it, where a skip let a damaged export pass
    (folder / MANIFEST).write_text(json.dumps({**manifest, "artifacts": [
        {**a, "sha256": "0" * 64} if a["flavour"] == "int8-trt" else a
        for a in manifest["artifacts"]]}))  # fmt: skip
    arts = {a.flavour: a for a in find_artifacts(folder)}
    assert [f for f, a in arts.items() if a.change] == ["int8-trt"]
    jobs, skipped = plan(cfg)
    assert {j.precision for j in jobs} == {"fp32"}
    assert [r["status"] for r in skipped] == [
        f"skipped: resnet50-binary.int8-cpu.onnx: {UNLISTED}",
        f"skipped: resnet50-binary.int8-trt.onnx: {CHANGED}",
    ]
    args: Any = (None, {}, None, {})  # cfg, splits, model, reference: not reached
    row = parity._artifact_row(arts["int8-trt"], *args, ort_device="cpu", decoded={},
                               say=lambda m: None)  # fmt: skip
    assert (row["verdict"], row["status"]) == ("FAIL", f"error: {CHANGED}")


def test_an_engine_whose_sidecar_changed_is_not_measured(tmp_path: Path) -> None:
    """The manifest lists an engine's sidecar (class names, threshold, shapes) with its sha256:
    one changed or deleted since the export is the engine's change, which parity fails and speed
    passes over where TensorRT runs (`plan`, `_artifact_row`: the same `change` as any file's);
    a hand-edited manifest whose entry names no file is one line, not a KeyError."""
    from marsvision.benchmarks.artifacts import find_artifacts
    from marsvision.export.artifacts import MANIFEST
    from marsvision.runtime.metadata import sha256_file, sidecar_path
    from marsvision.runtime.models import CHANGED

    plan = tmp_path / artifact_name("binary", "int8-engine")
    plan.write_bytes(b"engine")
    sidecar_path(plan).write_text("{}")
    side = {"file": sidecar_path(plan).name, "sha256": sha256_file(sidecar_path(plan))}
    entry = {"file": plan.name, "flavour": "int8-engine", "sha256": sha256_file(plan)}
    (tmp_path / MANIFEST).write_text(json.dumps({"artifacts": [{**entry, "sidecar": side}]}))
    assert [a.change for a in find_artifacts(tmp_path)] == [None]
    sidecar_path(plan).write_text('{"classes": ["other"]}')
    (art,) = find_artifacts(tmp_path)
    assert art.change == f"its metadata sidecar {side['file']}: {CHANGED}"
    sidecar_path(plan).unlink()  # deleted: that engine's row says so, the run goes on
    (art,) = find_artifacts(tmp_path)
    assert art.change == f"cannot read {sidecar_path(plan)} (No such file or directory)"
    (tmp_path / MANIFEST).write_text(json.dumps({"artifacts": [entry, {"flavour": "fp32"}]}))
    with pytest.raises(MarsvisionError, match="is not a marsvision manifest .an entry names no"):
        find_artifacts(tmp_path)


def test_artifacts_that_are_no_export_are_said_to_be(msl_dir: Path, tmp_path: Path) -> None:
    """An empty folder (or a training run's) as --artifacts asked for --checkpoint, and given
    it, said only then that it holds no exported models; a model file said "no such directory";
    speed without either named a manifest.json never given. Without --artifacts, both look where
    mars-export writes ($MARS_EXPORTS; parity required --artifacts), speed only where it is."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    none, empty = (
        {"MARS_EXPORTS": str(tmp_path / "none")},
        {"MARS_EXPORTS": str(tmp_path / "empty")},
    )
    for args, env, says in [
        (["parity"], none, f"--artifacts {tmp_path / 'none'}: no such directory"),
        (["parity"], empty, f"{tmp_path / 'empty'} holds no exported models"),
        (["speed"], none, "needs --checkpoint PATH (or --artifacts DIR, an export whose manifest"),
        (["speed"], empty, f"{tmp_path / 'empty'} holds no exported models"),
    ]:
        result = CliRunner().invoke(main, [*args, "--data", str(msl_dir), "--out",
                                           str(tmp_path / "o")], env=env)  # fmt: skip
        assert result.exit_code == 1 and says in result.output, (args, env, result.output)
    cases = [
        (["parity", "--artifacts", str(tmp_path / "run")], "holds no exported models"),
        (["parity", "--artifacts", str(tmp_path / "run" / "checkpoint.pt")],
         "checkpoint.pt is a file, not an export: pass the folder mars-export wrote (its --out)"),
        # a run folder as the checkpoint: "no such file"
        (["speed", "--checkpoint", str(tmp_path / "run")],
         f"run is a folder, not a checkpoint: pass {tmp_path / 'run' / 'checkpoint.pt'}"),
    ]  # fmt: skip
    for args, says in cases:
        result = CliRunner().invoke(main, [*args, "--data", str(msl_dir), "--out",
                                           str(tmp_path / "o")])  # fmt: skip
        assert result.exit_code == 1 and says in result.output, (args, result.output)


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        # nan passed every artifact: no comparison with it is true
        ("--fp32-min-agreement", "nan", "--fp32-min-agreement nan: must be a percentage"),
        ("--int8-max-accuracy-change", "nan", "--int8-max-accuracy-change nan: must be a number"),
        # unreachable or meaningless: every artifact failed, after the whole run
        ("--int8-min-agreement", "101", "--int8-min-agreement 101: must be a percentage"),
        # a fraction (score --require's unit) was a bar of 0.99%, which every artifact passed
        ("--int8-min-agreement", "0.99", "0.99: a percentage, not a fraction: 99 for 99%"),
        ("--int8-min-agreement", "1", "1: a percentage, not a fraction: 100 for 100%"),
        ("--fp16-max-accuracy-change", "-0.1", "--fp16-max-accuracy-change -0.1: must be a num"),
        ("--fp16-min-agreement", "0.995", "0.995: a percentage, not a fraction: 99.5 for 99.5%"),
        ("--fp16-max-accuracy-change", "inf", "--fp16-max-accuracy-change inf: must be a number"),
        # found at that split, after the PyTorch reference of the splits before it
        ("--splits", "val,tset", "--splits: unknown tset; choose from val, test, train"),
    ],
)
def test_parity_refuses_bad_option_values(
    flag: str, value: str, says: str, msl_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "art").mkdir()
    (tmp_path / "c.pt").write_bytes(b"x")
    args = ["parity", "--checkpoint", str(tmp_path / "c.pt"), "--artifacts", str(tmp_path / "art"),
            "--data", str(msl_dir), flag, value, "--out", str(tmp_path / "o")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and says in result.output, result.output  # a usage error
    assert not list((tmp_path / "o").glob("parity*"))


def test_the_largest_probability_change_is_absolute() -> None:
    """The max probability difference of a class whose probability fell (0.8 to 0.4 of three
    classes) is 0.4, not its signed 0.2 from another class; binary outputs alone, where both
    are the same, could not tell (a mutation audit)."""
    from marsvision.benchmarks.parity import _per_class, compare

    ref = np.log(np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]]))
    art = np.log(np.array([[0.4, 0.3, 0.3], [0.1, 0.8, 0.1]]))
    figures = compare(ref, art, np.array([0, 1]), num_classes=3, task="msl25")
    assert figures["max_prob_diff"] == pytest.approx(0.4, abs=1e-6)
    # a class's recall change is the artifact's minus the reference's, in points
    rows = _per_class(["a", "b"], [0.5, 1.0], [0.75, 1.0], np.array([0, 1]))
    assert rows[0]["change"] == pytest.approx(25.0) and rows[1]["change"] == 0


def test_an_artifact_that_fails_one_split_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An artifact that fails val and passes test (the default --splits val,test) is FAIL: with
    the verdict taken from the last split alone the suite passed, and such a file was reported
    PASS, exit 0, beside its val failure (a mutation audit)."""
    from types import SimpleNamespace

    from marsvision.benchmarks import parity
    from marsvision.benchmarks.artifacts import Artifact
    from marsvision.runtime.spec import PreprocessSpec

    f = tmp_path / "resnet50-binary.fp32.onnx"
    f.write_bytes(b"x")

    class Runner:
        name = "fake"
        meta = SimpleNamespace(preprocess=PreprocessSpec.for_input_size(64))

        def __enter__(self) -> Runner:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    val = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    test = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    splits: dict[str, dict[str, Any]] = {
        "val": {"paths": ["a"] * 4, "y_true": np.array([0, 1, 0, 1]), "ref_logits": val,
                "ref_seconds": 1.0},
        "test": {"paths": ["b"] * 5, "y_true": np.array([0, 1, 0, 1, 1]), "ref_logits": test,
                 "ref_seconds": 1.0},
    }  # fmt: skip

    def logits(runner: Any, images: Any, spec: Any, batch: Any) -> tuple[np.ndarray, float]:
        return (val[:, ::-1].copy() if len(images) == 4 else test), 1.0  # val: every label turned

    monkeypatch.setattr(parity, "skip_reason", lambda a, d: None)
    monkeypatch.setattr(parity, "_open", lambda *a: Runner())
    monkeypatch.setattr(parity, "_decode_split", lambda paths, spec: np.zeros((len(paths), 1)))
    monkeypatch.setattr(parity, "_artifact_logits", logits)
    model = parity._Model("binary", ["Surface", "Rover"], None)
    ref_row = {"splits": {s: model.compare(d["ref_logits"], d["ref_logits"], d["y_true"], 1.0)
                          for s, d in splits.items()}}  # fmt: skip
    cfg = SimpleNamespace(threads=None, batch_size=4, thresholds=Thresholds())
    row = parity._artifact_row(Artifact(f, "fp32"), cfg, splits, model, ref_row,  # type: ignore[arg-type]
                               ort_device="cpu", decoded={}, say=lambda m: None)  # fmt: skip
    assert row["failures"] and row["verdict"] == "FAIL"


def _split(agree: float, change: float, passed: bool | None, losses: list[float]) -> dict[str, Any]:
    """One artifact's figures on one split (`passed` None: the reference's own)."""
    figures: dict[str, Any] = {
        "n": 40, "accuracy": 90.0 + change, "accuracy_change": change, "balanced_accuracy": 88.0,
        "f1": 80.0, "top1_agreement": agree, "max_prob_diff": 0.001, "ms_per_image": 2.0,
        "images_per_s": 500.0, "per_class_recall": [0.95, 0.8],
    }  # fmt: skip
    if passed is not None:
        figures["passed"] = passed
        figures["per_class"] = [
            {"class": name, "n_true": 20, "change": loss}
            for name, loss in zip(("Surface", "Rover"), losses, strict=True)
        ]
    return figures


def _report() -> dict[str, Any]:
    """A reference, an FP32 file that passes both splits, an INT8 file that fails val only."""
    ref = {"artifact": "best.pt", "flavour": "pytorch", "backend": "pytorch-cpu", "status": "ok",
           "verdict": "reference", "size_mib": 90.0, "failures": [],
           "splits": {s: _split(100.0, 0.0, None, []) for s in ("val", "test")}}  # fmt: skip
    fp32 = {"artifact": "m.fp32.onnx", "flavour": "fp32", "backend": "onnxruntime-cpu",
            "status": "ok", "verdict": "PASS", "size_mib": 90.0, "failures": [],
            "splits": {"val": _split(100.0, 0.0, True, [0.0, 0.0]),
                       "test": _split(100.0, 0.0, True, [0.0, 2.5])}}  # fmt: skip
    int8 = {"artifact": "m.int8-cpu.onnx", "flavour": "int8-cpu", "backend": "onnxruntime-cpu",
            "status": "ok", "verdict": "FAIL", "size_mib": 23.0,
            "failures": ["val: agreement 97.00 < 98.0"],
            "splits": {"val": _split(97.0, -1.5, False, [0.0, -5.0]),
                       "test": _split(99.0, 0.0, True, [-2.5, 0.0])}}  # fmt: skip
    return {
        "task": "binary", "class_names": ["Surface", "Rover"], "rows": [ref, fp32, int8],
        "failed": ["m.int8-cpu.onnx"], "passed": False, "scopes": {"val": "all", "test": "all"},
        "checkpoint_sha256": "ab" * 32, "decision_threshold": None, "config": {"batch_size": 8},
        "conditions": {"machine": "test-9000-avx2-2c", "cpu": {"model": "Test 9000",
                       "usable_cores": 2}, "gpu": None, "date": "2026-12-07T06:00:00+00:00",
                       "versions": {"numpy": "2.0"}},
        "thresholds": {"fp32_min_agreement": 99.9, "fp16_max_accuracy_change": 0.5,
                       "fp16_min_agreement": 99.0, "int8_max_accuracy_change": 1.0,
                       "int8_min_agreement": 98.0},
    }  # fmt: skip


def test_each_split_row_says_whether_that_split_passed() -> None:
    """A split that failed its thresholds is FAIL in its table row, one that passed is pass,
    the reference's rows are the reference (no change against itself)."""
    cells = {(r[0], r[4]): dict(zip(HEADERS, r, strict=True)) for r in table_rows(_report())}
    assert cells[("m.int8-cpu.onnx", "val")]["verdict"] == "FAIL"
    assert cells[("m.int8-cpu.onnx", "test")]["verdict"] == "pass"
    assert cells[("m.fp32.onnx", "val")]["verdict"] == "pass"
    assert cells[("best.pt", "val")]["verdict"] == "reference"
    assert cells[("best.pt", "val")]["d acc"] == "-" and cells[("best.pt", "val")]["max|dp|"] == "-"
    assert cells[("m.int8-cpu.onnx", "val")]["d acc"] == "-1.50"
    assert cells[("m.int8-cpu.onnx", "val")]["agree %"] == "97.00"


def test_a_long_skip_reason_is_cut_in_the_table_and_given_whole_below() -> None:
    """A skipped row's reason longer than 60 characters is cut to 57 and "..." in the table (its
    other cells "-"), and given whole in the lines under it."""
    report = _report()
    why = "skipped: resnet50-binary.fp16.plan: TensorRT is not installed here"  # 66 characters
    assert len(why) == 66
    report["rows"].append({"artifact": "m.fp16.plan", "flavour": "fp16-engine", "backend": None,
                           "status": why, "verdict": "skipped", "size_mib": 40.0, "splits": {},
                           "failures": []})  # fmt: skip
    row = table_rows(report)[-1]
    assert row[2] == why[:57] + "..." and len(row) == len(HEADERS)
    assert row[4:-1] == ["-"] * (len(HEADERS) - 5) and row[-1] == "skipped"
    assert f"\nm.fp16.plan: {why}\n" in render_text(report)


def test_a_report_where_every_artifact_was_skipped_does_not_say_pass() -> None:
    """No artifact compared (every one skipped, e.g. engines without TensorRT) is no pass; one
    that failed is named in the summary, ahead of any pass."""
    report = _report()
    nothing = {**report, "failed": [], "passed": False, "rows": report["rows"][:1]}
    assert render_text(nothing).endswith(
        "parity: no artifact was compared (every one was skipped): nothing shown to pass"
    )
    assert render_text(report).endswith("parity: 1 artifact(s) FAIL: m.int8-cpu.onnx")
    assert "\nFAIL m.int8-cpu.onnx: val: agreement 97.00 < 98.0\n" in render_text(report)


def test_the_per_class_view_names_only_the_classes_that_lose_recall() -> None:
    """Per split, an artifact "loses recall on" the classes whose recall fell against PyTorch,
    not those unchanged or better; with none fallen it says so."""
    md = render_markdown(_report())
    val, test = md.split("### Per-class recall, test split")
    assert "- m.int8-cpu.onnx: loses recall on Rover (-5.00)" in val
    assert "- m.fp32.onnx: no class loses recall" in val
    assert "- m.int8-cpu.onnx: loses recall on Surface (-2.50)" in test
    assert "- m.fp32.onnx: no class loses recall" in test
    assert "| Rover | 20 | 80.00 | +0.00 | -5.00 |" in val


def _folder(folder: Path, *flavours: str) -> Path:
    """An export folder with files named as mars-export names them (never opened here)."""
    folder.mkdir()
    for f in flavours:
        (folder / artifact_name("binary", f)).write_bytes(b"model")
    return folder


def test_the_source_checkpoint_check_refuses_another_and_lets_an_unrecorded_one_pass() -> None:
    """An artifact that names another source checkpoint is refused; one that names none (made
    before the source was recorded) and one that names this checkpoint are measured."""
    sha = "ab" * 32
    check_exported_from(sha, "m.onnx", Path("best.pt"), sha)
    check_exported_from("", "old.onnx", Path("best.pt"), sha)
    with pytest.raises(MarsvisionError, match=r"^m.onnx was exported from another checkpoint"):
        check_exported_from("cd" * 32, "m.onnx", Path("best.pt"), sha)


def test_artifacts_come_in_flavour_order_whatever_their_names(tmp_path: Path) -> None:
    """The FP32 file first (the reference precision), then by falling precision, engines last:
    not the files' alphabetical order (fp16 before fp32, int8 engine before int8-cpu)."""
    flavours = ["fp32", "fp16", "int8-cpu", "int8-trt", "fp16-engine", "int8-engine"]
    folder = _folder(tmp_path / "export", *reversed(flavours))
    found = find_artifacts(folder)
    assert [a.flavour for a in found] == flavours
    assert [a.precision for a in found] == ["fp32", "fp16", "int8", "int8", "fp16", "int8"]
    assert [a.is_engine for a in found] == [False] * 4 + [True] * 2
    assert not any(a.unlisted for a in found)  # no manifest: the names alone


def test_engines_of_either_precision_need_a_gpu() -> None:
    """An INT8 engine, like an FP16 one, is run by TensorRT: on the CPU it is skipped, saying
    why, not handed to onnxruntime (which cannot read it) and failed."""
    for flavour in ("fp16-engine", "int8-engine"):
        art = Artifact(Path(artifact_name("binary", flavour)), flavour)
        assert art.is_engine
        assert skip_reason(art, "cpu") == (
            "TensorRT engines need a GPU; this run is on the CPU (--device cpu, or no GPU)"
        )
    assert skip_reason(Artifact(Path("m.int8-cpu.onnx"), "int8-cpu"), "cpu") is None


def test_a_manifest_that_lists_a_file_not_there_is_refused(tmp_path: Path) -> None:
    """manifest.json naming a file that is not in the folder (deleted, or copied without it) is
    refused, naming the file; the files it lists are measured, the others are not."""
    folder = _folder(tmp_path / "export", "fp32", "int8-cpu")
    listed = [{"file": artifact_name("binary", "fp32")}]
    (folder / "manifest.json").write_text(json.dumps({"artifacts": listed}))
    found = {a.flavour: a for a in find_artifacts(folder)}
    assert skip_reason(found["fp32"], "cpu") is None
    assert skip_reason(found["int8-cpu"], "cpu") == UNLISTED
    gone = artifact_name("binary", "fp16")
    listed.append({"file": gone})
    (folder / "manifest.json").write_text(json.dumps({"artifacts": listed}))
    with pytest.raises(MarsvisionError, match=rf"lists {gone}, which are not there"):
        find_artifacts(folder)
