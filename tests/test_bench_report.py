"""The benchmark writers (benchmarks/report.py) and speed's plan (benchmarks/speed.py): cases
the mutation audit found unchecked."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest


def test_cells_are_formatted_to_their_digits_and_none_is_a_dash() -> None:
    from marsvision.benchmarks.report import fmt

    assert fmt(None) == "-"
    assert fmt(1.23456) == "1.23" and fmt(78.96, 1) == "79.0" and fmt(412.6, 0) == "413"
    assert fmt(3) == "3" and fmt("onnxruntime-cpu") == "onnxruntime-cpu"


def test_text_tables_align_numbers_right_and_end_lines_without_spaces() -> None:
    """Numbers, negative ones and speedups ("5.1x") included, are right-aligned under their
    header; text is left-aligned; no line ends in spaces."""
    from marsvision.benchmarks.report import text_table

    rows = [["int8", "-0.25", "5.1x", "ok"], ["fp32-long", "12.50", "10.0x", ""]]
    table = text_table(["name", "change", "speedup", "note"], rows)
    assert table.splitlines() == [
        "name       change  speedup  note",
        "---------  ------  -------  ----",
        "int8        -0.25     5.1x  ok",
        "fp32-long   12.50    10.0x",
    ]


def test_markdown_cells_escape_the_column_bar() -> None:
    """A cell holding "|" (an error message, a file name) split its row into more columns."""
    from marsvision.benchmarks.report import markdown_table

    md = markdown_table(["artifact", "status"], [["a|b.onnx", "error: x | y"]])
    assert md.splitlines() == [
        "| artifact | status |",
        "|---|---|",
        "| a\\|b.onnx | error: x \\| y |",
    ]


def test_results_with_nan_are_refused_not_written_as_invalid_json(tmp_path: Path) -> None:
    from marsvision.benchmarks.report import write_json

    path = tmp_path / "r.json"
    write_json(path, {"p": tmp_path, "x": 1.5})
    assert json.loads(path.read_text()) == {"p": str(tmp_path), "x": 1.5}
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json(path, {"x": math.nan})
    assert json.loads(path.read_text())["x"] == 1.5  # the earlier file is left as it was


def test_a_chart_centres_each_group_on_its_label_and_closes_its_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each label's bars straddle its tick (the labels are under the groups), a missing value
    is a bar of 0, and the figure is closed: mars-bench makes one per report, and matplotlib
    keeps every open figure (warning past 20)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    from marsvision.benchmarks.report import bar_chart

    bars: list[tuple[list[float], list[float]]] = []
    real_bar = Axes.bar

    def spy(self: Axes, x: Any, height: Any, *args: Any, **kw: Any) -> Any:
        bars.append((list(x), list(height)))
        return real_bar(self, x, height, *args, **kw)

    monkeypatch.setattr(Axes, "bar", spy)
    before = plt.get_fignums()
    series: dict[str, list[float | None]] = {"s1": [1.0, 2.0], "s2": [None, 4.0], "s3": [5.0, 6.0]}
    bar_chart(tmp_path / "c.png", title="t", labels=["a", "b"], series=series, ylabel="y")
    assert plt.get_fignums() == before
    assert [h for _, h in bars] == [[1.0, 2.0], [0.0, 4.0], [5.0, 6.0]]
    for j in range(2):  # the middle series' bar on the tick, the others either side
        assert [x[j] for x, _ in bars] == pytest.approx([j - 0.8 / 3, j, j + 0.8 / 3])


def _artifacts(folder: Path, names: list[str], listed: list[str] | None = None) -> Path:
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"x")
    if listed is not None:
        manifest = {"artifacts": [{"file": n} for n in listed]}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_speed_plans_no_engine_on_the_cpu_and_no_unlisted_file(tmp_path: Path) -> None:
    """An engine on a --device cpu run, and a file the export's manifest does not list, are
    skipped rows saying why: not jobs that fail, nor a stray file's speed."""
    from marsvision.benchmarks.speed import SpeedConfig, plan
    from marsvision.runtime.models import UNLISTED

    ckpt = tmp_path / "m.pt"
    art = _artifacts(tmp_path / "a", ["m.fp32.onnx", "m.fp16.onnx", "m.fp16.plan"],
                     listed=["m.fp32.onnx", "m.fp16.plan"])  # fmt: skip
    cfg = SpeedConfig(checkpoint=ckpt, artifacts=art, precisions=("fp32", "fp16"),
                      backends=("onnxruntime", "tensorrt"), modes=("model",),
                      batch_sizes=(1,))  # fmt: skip
    jobs, skipped = plan(cfg)
    assert [(j.backend, j.precision, Path(j.model).name) for j in jobs] == [
        ("pytorch", "fp32", "m.pt"), ("onnxruntime", "fp32", "m.fp32.onnx")]  # fmt: skip
    assert [(r["backend"], r["precision"], r["status"]) for r in skipped] == [
        ("onnxruntime", "fp16", f"skipped: m.fp16.onnx: {UNLISTED}"),
        ("tensorrt", "fp16", "skipped: TensorRT needs --device cuda"),
    ]


def test_only_end_to_end_jobs_carry_the_images(tmp_path: Path) -> None:
    """A model row times a random batch: its record says 0 images, not the e2e files'."""
    from marsvision.benchmarks.speed import SpeedConfig, plan

    art = _artifacts(tmp_path / "a", ["m.fp32.onnx"])
    images = ("a.jpg", "b.jpg")
    cfg = SpeedConfig(checkpoint=tmp_path / "m.pt", artifacts=art, images=images,
                      batch_sizes=(2,), precisions=("fp32",))  # fmt: skip
    jobs, _ = plan(cfg)
    assert sorted((j.mode, j.backend, j.images) for j in jobs) == [
        ("e2e", "onnxruntime", images), ("e2e", "pytorch", images),
        ("model", "onnxruntime", ()), ("model", "pytorch", ())]  # fmt: skip
    assert {j.row()["images"] for j in jobs if j.mode == "model"} == {0}


def test_speed_rows_name_their_file_by_name_and_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row's `model` is the file's name (the report is shared: no local folders in it) and
    its sha256 says which file that was."""
    from marsvision.benchmarks import speed
    from marsvision.runtime.metadata import sha256_file

    ckpt = tmp_path / "deep" / "folder" / "m.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    monkeypatch.setattr(speed, "run_job", lambda job: {**job.row(), "status": "error: faked"})
    report = speed.run_speed(speed.SpeedConfig(checkpoint=ckpt, backends=("pytorch",),
                                               precisions=("fp32",), modes=("model",),
                                               batch_sizes=(1,), isolate=False))  # fmt: skip
    assert [(r["model"], r["model_sha256"]) for r in report["rows"]] == [
        ("m.pt", sha256_file(ckpt))
    ]


def test_a_failed_row_beside_its_baseline_gets_no_ratios() -> None:
    """A row that failed where PyTorch FP32 ran at its mode and batch has no figures to divide:
    no ratios (it was a KeyError that lost the run's results)."""
    from marsvision.benchmarks.speed import _add_ratios

    timing = {k: 10.0 for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")}
    base = {"mode": "model", "batch": 8, "backend": "pytorch", "precision": "fp32",
            "status": "ok", "timing": timing, "throughput_img_s": 800.0,
            "peak_rss_mib": 400.0}  # fmt: skip
    failed = {"mode": "model", "batch": 8, "backend": "onnxruntime", "precision": "int8-cpu",
              "status": "error: out of memory"}  # fmt: skip
    rows = [base, failed]
    _add_ratios(rows)
    assert failed["speedup_vs_pytorch_fp32"] is None
    assert failed["latency_ratio_vs_pytorch_fp32"] is None
    assert failed["peak_rss_ratio_vs_pytorch_fp32"] is None
    assert base["speedup_vs_pytorch_fp32"] == 1.0
