"""`mars-bench speed` smoke test (tiny repeats, 64 px, real MSL images) and its parts.

Speed is never asserted: the checks are the result files, their schema and conditions, the
internal consistency of the figures, and the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from marsvision.benchmarks import conditions, speed_jobs, speed_report
from marsvision.benchmarks.cli import main
from marsvision.benchmarks.conditions import cpu_info, machine_name
from marsvision.benchmarks.speed import SPEED_FAIL_EXIT
from marsvision.benchmarks.speed_jobs import Job, run_job, run_job_isolated
from marsvision.benchmarks.speed_report import HEADERS, render_text, table_rows, write_speed
from marsvision.benchmarks.timing import summarize, time_calls
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.host import usable_cores


@pytest.fixture(scope="module")
def fp32_dir(
    tiny_checkpoint: Path, msl_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An export out dir with the FP32 ONNX of the tiny checkpoint (helper E's export API)."""
    from marsvision.export.images import load_batch, split_paths
    from marsvision.export.onnx_fp32 import fp32_meta, onnx_from_checkpoint, torch_logits
    from marsvision.runtime.metadata import sha256_file
    from marsvision.train.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("speed-art")
    ckpt = load_checkpoint(tiny_checkpoint)
    meta = fp32_meta(ckpt, sha256_file(tiny_checkpoint))
    batch = load_batch(split_paths(msl_dir, "val", "binary", 2), meta.preprocess)
    onnx_from_checkpoint(ckpt, out / "resnet50-binary.fp32.onnx", meta=meta, parity_batch=batch,
                         reference=torch_logits(ckpt, batch))  # fmt: skip
    return out


@pytest.fixture
def three_torch_threads() -> Iterator[None]:
    """torch at 3 threads for the test (not a job's 1, whatever this machine's default), then
    the session's count back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_speed_cli_writes_results_with_conditions(
    fp32_dir: Path, tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path, three_torch_threads: None
) -> None:
    import torch

    out = tmp_path / "res"
    result = CliRunner().invoke(
        main,
        [
            "speed",
            "--checkpoint",
            str(tiny_checkpoint),
            "--artifacts",
            str(fp32_dir),
            "--batch-sizes",
            "2",
            "--precisions",
            "fp32,int8-cpu",
            "--backends",
            "pytorch,onnxruntime",
            "--images",
            "test",
            "--num-images",
            "4",
            "--data",
            str(msl_dir),
            "--warmup",
            "1",
            "--repeats",
            "3",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--in-process",
            "--out",
            str(out),
        ],
    )
    # Its PyTorch rows ran at 1 thread; the process (here: the test session) keeps its 3.
    assert torch.get_num_threads() == 3
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir())
    machine = machine_name(cpu_info(), None)
    for pair in ("pytorch-fp32", "onnxruntime-fp32"):
        assert any(f.startswith(f"speed-{pair}-{machine}-") and f.endswith(".json") for f in files)
    assert any(f.startswith("speed-skipped-") for f in files)  # no int8-cpu artifact given
    png = next(out.glob("speed-*.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    doc = json.loads(next(out.glob("speed-onnxruntime-fp32-*.json")).read_text())
    assert (doc["backend"], doc["precision"], doc["machine"]) == ("onnxruntime", "fp32", machine)
    c = doc["conditions"]
    assert c["cpu"]["model"] and c["cpu"]["logical_cores"] >= 1 and c["cpu"]["usable_cores"] >= 1
    assert c["threads"] == 1 and "onnxruntime" in c["versions"] and "numpy" in c["versions"]
    assert doc["config"]["warmup"] == 1 and doc["config"]["repeats"] == 3
    assert {r["mode"] for r in doc["rows"]} == {"model", "e2e"}
    base = {r["mode"]: r for r in doc["baseline_rows"]}
    for r in doc["rows"]:
        t = r["timing"]
        assert r["status"] == "ok" and r["batch"] == 2 and r["input_size"] == 64
        assert t["repeats"] == 3
        assert 0 < t["min_ms"] <= t["p50_ms"] <= t["max_ms"]
        assert t["p90_ms"] is None and t["p99_ms"] is None  # 3 calls: the max is the tail
        assert r["throughput_img_s"] == pytest.approx(2e3 / t["mean_ms"])
        b = base[r["mode"]]
        assert r["speedup_vs_pytorch_fp32"] == pytest.approx(
            r["throughput_img_s"] / b["throughput_img_s"]
        )
        assert r["peak_rss_mib"] > 0
        # --in-process: the peak carries over from row to row, so no ratio is made of it
        assert r["peak_rss_ratio_vs_pytorch_fp32"] is None
    assert base["model"]["speedup_vs_pytorch_fp32"] == 1.0
    assert base["e2e"]["images"] == 4
    # The table on stdout: the header, both backends, the skipped pair with its reason.
    assert "p99 ms" in result.output and "onnxruntime-cpu" in result.output
    isa = " ".join(c["cpu"]["isa"]) or "no ISA of note"  # the conditions line names the ISA
    if c["onnxruntime_exact_int8"]:
        isa += "; ONNX Runtime INT8 in exact u8u8 sums"
    assert "in one process (peak RSS: the running peak); " in result.output
    assert f"machine {machine}: {c['cpu']['model']} ({isa})," in result.output
    assert "pytorch-cpu" in result.output and "skipped: no int8-cpu artifact" in result.output
    from marsvision.runtime.metadata import sha256_file

    # what decides the figures: each row's file by its sha256, the machine's load before the
    # rows, and the onnxruntime sessions' options (none of them was in the files)
    fp32 = fp32_dir / "resnet50-binary.fp32.onnx"
    assert {r["model_sha256"] for r in doc["rows"]} == {sha256_file(fp32)}
    assert {r["model_sha256"] for r in doc["baseline_rows"]} == {sha256_file(tiny_checkpoint)}
    assert len(c["load_average_before"]) == 3
    assert c["onnxruntime_session"] == {
        "graph_optimization_level": "ORT_ENABLE_ALL", "execution_mode": "ORT_SEQUENTIAL",
        "intra_op_num_threads": 1, "inter_op_num_threads": 1, "allow_spinning": False,
    }  # fmt: skip
    assert " before the first row; " in result.output
    assert "onnxruntime sessions: 1 intra-op threads, 1 inter-op, no spinning, ORT_ENABLE_AL" in (
        result.output
    )
    # and the code and images that made them: the commit (the version stays 0.1.0), which
    # images, and what else the CPUs did while each row ran
    assert c["source"] == conditions.source_revision()
    if c["source"] is not None:  # a git checkout, as CI's clone
        assert f"(commit {c['source']['commit'][:12]}" in result.output
    assert Path(doc["config"]["images_folder"]).is_relative_to(os.path.abspath(msl_dir))
    assert len(doc["config"]["images_list_sha256"]) == 64
    assert all(0 <= r["other_work_cpu_share"] <= 1 for r in doc["rows"] + doc["baseline_rows"])


def test_which_images_a_speed_run_timed_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The e2e images by the folder that holds them and the digest of their file names in order:
    the count alone (what the records held) did not say whether two runs timed the same images.
    The same images from another folder or working directory give the same digest; relative and
    absolute paths mixed, or one image, are fine."""
    import hashlib

    from marsvision.benchmarks.speed import SpeedConfig

    cfg = SpeedConfig(checkpoint=Path("c.pt"), images=("/d/a/x.jpg", "/d/b/y.jpg"))
    d = cfg.to_dict()
    assert (d["images"], d["images_folder"]) == (2, "/d")
    assert d["images_list_sha256"] == hashlib.sha256(b"x.jpg\ny.jpg").hexdigest()
    monkeypatch.chdir(tmp_path)
    moved = SpeedConfig(checkpoint=Path("c.pt"), images=("a/x.jpg", "/e/y.jpg")).to_dict()
    assert (moved["images_folder"], moved["images_list_sha256"]) == ("/", d["images_list_sha256"])
    one = SpeedConfig(checkpoint=Path("c.pt"), images=("x.jpg",)).to_dict()
    assert one["images_folder"] == str(tmp_path)
    d = SpeedConfig(checkpoint=Path("c.pt"), modes=("model",)).to_dict()
    assert (d["images"], d["images_folder"], d["images_list_sha256"]) == (0, None, None)


def test_the_commit_the_code_ran_at_is_recorded(tmp_path: Path) -> None:
    """A git checkout's commit, and whether tracked files differ from it; None outside one (an
    installed wheel, or a folder inside another checkout: a venv's site-packages)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c",
                               "user.email=t@t", *args], check=True, capture_output=True,
                              text=True).stdout.strip()  # fmt: skip

    assert conditions.source_revision(tmp_path) is None
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert conditions.source_revision(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "new.py").write_text("")  # untracked: not a change to the code that ran
    assert conditions.source_revision(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert conditions.source_revision(tmp_path) == {"commit": head, "dirty": True}
    (tmp_path / "sub").mkdir()
    assert conditions.source_revision(tmp_path / "sub") is None
    c = {"source": {"commit": head, "dirty": True}}
    assert conditions.source_words(c) == f" (commit {head[:12]}, with changes)"
    assert conditions.source_words({}) == conditions.source_words({"source": None}) == ""


def test_other_work_on_the_cpus_is_measured_apart_from_the_runs_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row records the share of its CPUs' time that other processes took while it ran (a
    noisy row says it): the busy time /proc/stat gives for the CPUs this process may run on
    (its affinity), less the run's own (its rusage, children waited for included), over those
    CPUs' time. Counters and clocks stood in for: the real ones move with whatever else runs."""
    stat = tmp_path / "stat"
    hz = os.sysconf("SC_CLK_TCK")

    def write(cpu0: int, cpu1: int, cpu2: int, steal1: int = 0) -> None:
        def line(name: str, busy: int, steal: int = 0) -> str:  # user nice system idle ...
            return f"{name} {busy * hz} 0 0 99999 5 0 0 {steal * hz} 0 0\n"

        lines = [line("cpu", cpu0 + cpu1 + cpu2, steal1), line("cpu0", cpu0),
                 line("cpu1", cpu1, steal1), line("cpu2", cpu2), "intr 1 2\n"]  # fmt: skip
        stat.write_text("".join(lines))

    write(3, 4, 5, steal1=1)
    assert conditions.machine_cpu_seconds(stat) == (12.0, 1.0)
    assert conditions.machine_cpu_seconds(stat, {0, 1}) == (7.0, 1.0)
    assert conditions.machine_cpu_seconds(stat, {7}) is None  # none of its CPUs listed
    stat.write_text("cpu  1 2\n")
    assert conditions.machine_cpu_seconds(stat) is None
    assert conditions.machine_cpu_seconds(tmp_path / "none") is None

    clock, own = [100.0], [50.0]
    monkeypatch.setattr(conditions.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(conditions, "own_cpu_seconds", lambda: own[0])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    write(10, 10, 10)
    with conditions.OtherWork(stat) as span:
        # 2 s on CPUs 0 and 1: 4 CPU-seconds, 3 of them busy (the run's own 2, other work 1)
        # and 1 stolen; CPU 2, which the run may not use, busy the whole time: not counted
        write(10 + 1, 10 + 2, 10 + 2, steal1=1)
        own[0] += 2.0
        clock[0] += 2.0
    assert span.share == pytest.approx((1.0 + 1.0) / 4.0)
    with conditions.OtherWork(stat) as alone:  # the run's own work alone: none
        write(11 + 2, 12 + 2, 12, steal1=1)
        own[0] += 4.0
        clock[0] += 2.0
    assert alone.share == 0.0
    with conditions.OtherWork(tmp_path / "none") as unread:
        clock[0] += 1.0
    assert unread.share is None


def test_ratios_to_the_baseline() -> None:
    """Each ok row's throughput, latency and peak RSS as ratios to PyTorch FP32 at its mode and
    batch (inverted latency and RSS ratios passed every test); no RSS ratio where the rows ran
    in one process, none at all where the row or its baseline did not run."""
    from marsvision.benchmarks.speed import _add_ratios

    def row(backend: str, precision: str, mean: float, p50: float, rss: float) -> dict[str, Any]:
        timing = {"mean_ms": mean, "p50_ms": p50, "p90_ms": None, "p99_ms": None,
                  "max_ms": 2 * mean}  # fmt: skip
        return {"mode": "model", "batch": 8, "backend": backend, "precision": precision,
                "status": "ok", "timing": timing, "throughput_img_s": 8e3 / mean,
                "peak_rss_mib": rss}  # fmt: skip

    rows = [row("pytorch", "fp32", 100.0, 90.0, 400.0), row("onnxruntime", "int8-cpu", 20.0,
            30.0, 100.0), {"mode": "e2e", "batch": 8, "backend": "onnxruntime",
            "precision": "fp32", "status": "error: x"}]  # fmt: skip
    _add_ratios(rows)
    r = rows[1]
    assert r["speedup_vs_pytorch_fp32"] == pytest.approx(5.0)
    assert r["latency_ratio_vs_pytorch_fp32"] == {
        "mean_ms": pytest.approx(0.2), "p50_ms": pytest.approx(1 / 3), "p90_ms": None,
        "p99_ms": None, "max_ms": pytest.approx(0.2),
    }  # fmt: skip
    assert r["peak_rss_ratio_vs_pytorch_fp32"] == pytest.approx(0.25)
    assert rows[0]["speedup_vs_pytorch_fp32"] == 1.0
    assert rows[2]["speedup_vs_pytorch_fp32"] is rows[2]["latency_ratio_vs_pytorch_fp32"] is None
    _add_ratios(rows, own_rss=False)
    assert r["peak_rss_ratio_vs_pytorch_fp32"] is None and r["speedup_vs_pytorch_fp32"] == 5.0


def test_noisy_rows_are_marked() -> None:
    """Rows measured beside other work (a CV of 0.53 gave a 59x speedup where 5x was right)
    looked like any other: a row whose calls' standard deviation is over 10% of their mean is
    marked noisy in the table, and a note under it says what that means."""
    from marsvision.benchmarks.speed_report import render_markdown, render_text

    def row(std: float) -> dict[str, Any]:
        timing = {"repeats": 30, "mean_ms": 100.0, "std_ms": std, "min_ms": 90.0, "p50_ms": 99.0,
                  "p90_ms": 110.0, "p99_ms": None, "max_ms": 120.0}  # fmt: skip
        return {"mode": "model", "backend": "onnxruntime", "precision": "fp32", "batch": 8,
                "status": "ok", "runner": "onnxruntime-cpu", "timing": timing,
                "throughput_img_s": 80.0, "input_size": 64}  # fmt: skip

    cpu = {"model": "a CPU", "isa": [], "usable_cores": 2, "logical_cores": 2}
    report = {"rows": [row(3.0), row(25.0)], "skipped": [], "config": {"device": "cpu",
              "warmup": 1, "repeats": 30}, "conditions": {"machine": "m", "cpu": cpu,
              "threads": 2, "versions": {}}}  # fmt: skip
    for text in (render_text(report), render_markdown(report)):
        assert text.count("ok, noisy (CV 25%)") == 1 and text.count("noisy") == 3
        assert "noisy: its calls' standard deviation is over 10% of their mean (CV)" in text
    report["rows"] = [row(3.0)]
    assert "noisy" not in render_text(report) + render_markdown(report)
    # a ratio to a noisy PyTorch FP32 row (the same mode and batch) is marked too: it was "ok"
    # beside an 18x ratio whose baseline had a CV of 60%
    base = {**row(60.0), "backend": "pytorch", "runner": "pytorch-eager",
            "other_work_cpu_share": 0.45}  # what made it noisy, where measured  # fmt: skip
    report["rows"] = [base, {**row(3.0), "speedup_vs_pytorch_fp32": 18.2},
                      {**row(3.0), "batch": 1, "speedup_vs_pytorch_fp32": 2.0}]  # fmt: skip
    for text in (render_text(report), render_markdown(report)):
        assert text.count("ok, noisy (CV 60%; other work 45% of the CPUs)") == 1, text
        assert text.count("ok, its ratio noisy (the baseline's CV 60%)") == 1, text


def test_torch_runner_puts_back_the_thread_count(
    tiny_checkpoint: Path, msl_dir: Path, three_torch_threads: None
) -> None:
    """torch's thread count is process-wide: a runner's `threads` holds while it is open, and
    the parity reference (`reference_logits`) closes its runner."""
    import torch

    from marsvision.benchmarks.torch_baseline import TorchRunner, reference_logits

    with TorchRunner(tiny_checkpoint, threads=1) as runner:
        assert torch.get_num_threads() == 1
        assert runner.library == f"torch {torch.__version__}"  # as the runtime's runners say
    assert torch.get_num_threads() == 3
    runner.close()  # a second close changes nothing
    assert torch.get_num_threads() == 3
    with pytest.raises(ValueError, match="closed"):  # not "'NoneType' object is not callable"
        runner.infer(np.zeros((1, 3, 32, 32), np.float32))
    paths = sorted((msl_dir / "calibrated").glob("*.JPG"))[:2]
    logits, _ = reference_logits(tiny_checkpoint, paths, threads=1)
    assert logits.shape == (2, 2) and torch.get_num_threads() == 3


def test_isolated_onnxruntime_row_never_imports_torch(fp32_dir: Path, msl_dir: Path) -> None:
    images = tuple(str(p) for p in sorted((msl_dir / "calibrated").glob("*.JPG"))[:2])
    job = Job(
        mode="e2e",
        backend="onnxruntime",
        precision="fp32",
        batch=2,
        model=str(fp32_dir / "resnet50-binary.fp32.onnx"),
        device="cpu",
        warmup=1,
        repeats=2,
        threads=1,
        images=images,
    )
    row = run_job_isolated(job)
    assert row["status"] == "ok", row
    assert row["torch_imported"] is False
    assert row["peak_rss_mib"] >= row["rss_before_mib"] > 0


def test_every_row_runs_at_the_thread_count_the_conditions_state(
    tiny_checkpoint: Path, fp32_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --threads, onnxruntime's rows took the usable cores and PyTorch's its own default
    (OMP_NUM_THREADS=1 gave the baseline 1 thread and onnxruntime 2) while the conditions said
    2: every ratio to the baseline was off by that. Each job now carries the stated count."""
    from marsvision.benchmarks.conditions import capture_conditions
    from marsvision.benchmarks.speed import SpeedConfig, plan
    from marsvision.runtime.host import usable_cores

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    jobs, _ = plan(SpeedConfig(checkpoint=tiny_checkpoint, artifacts=fp32_dir, modes=("model",)))
    assert {j.backend for j in jobs} >= {"pytorch", "onnxruntime"}
    stated = capture_conditions(threads=None, device="cpu")["threads"]
    assert stated == usable_cores() and {j.threads for j in jobs} == {stated}
    jobs, _ = plan(SpeedConfig(checkpoint=tiny_checkpoint, artifacts=fp32_dir, threads=1))
    assert {j.threads for j in jobs} == {1}


def test_a_jobs_peak_rss_is_its_own_not_its_parents() -> None:
    """Linux carries ru_maxrss over fork and exec: every job process that mars-bench started
    after its own peak (it opens each file to check it) reported at least that peak (178 MiB
    for INT8 rows whose own was 118). A process started from a parent of over 1 GiB now reports
    its own."""
    from marsvision.benchmarks.timing import peak_rss_mib

    big = np.ones(1 << 28, dtype=np.float32)  # 1 GiB, touched
    assert peak_rss_mib() > 1024
    code = "from marsvision.benchmarks.timing import peak_rss_mib; print(peak_rss_mib())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout)  # fmt: skip
    del big
    assert 0 < child < 300


@pytest.mark.parametrize("backend", ["onnxruntime", "pytorch"])
def test_e2e_rows_do_not_time_unreadable_images(
    backend: str, fp32_dir: Path, tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path
) -> None:
    """An image that cannot be classified makes the e2e row an error naming it: the runtime's
    error rows were timed as classified images, and PyTorch's raised a traceback in-process."""
    from marsvision.benchmarks.speed_jobs import run_job

    bad = tmp_path / "bad.JPG"
    bad.write_bytes(b"not a jpeg")
    images = (str(sorted((msl_dir / "calibrated").glob("*.JPG"))[0]), str(bad))
    model = tiny_checkpoint if backend == "pytorch" else fp32_dir / "resnet50-binary.fp32.onnx"
    job = Job(mode="e2e", backend=backend, precision="fp32", batch=2, model=str(model),
              device="cpu", warmup=1, repeats=2, threads=1, images=images)  # fmt: skip
    row = run_job(job)
    assert row["status"].startswith(f"error: --images: {bad} cannot be classified ("), row


def test_speed_says_what_it_does_not_measure(
    fp32_dir: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A precision asked for by name that no chosen backend runs is a skipped row saying what
    each runs (it vanished, exit 0), and so is a backend asked for by name that runs none of
    the precisions chosen (`--backends tensorrt` on the CPU measured the baseline alone and
    exited 0); no mode at all is refused; artifacts exported from another
    checkpoint are refused before anything is timed, as parity refuses them."""
    from marsvision.benchmarks.speed import SpeedConfig, plan, run_speed

    cfg = SpeedConfig(checkpoint=tiny_checkpoint, artifacts=fp32_dir, precisions=("int8", "fp16"),
                      backends=("onnxruntime", "pytorch"), modes=("model",))  # fmt: skip
    jobs, skipped = plan(cfg)
    assert {(j.backend, j.precision) for j in jobs} == {("pytorch", "fp32")}
    runs = "onnxruntime fp32, fp16, int8-cpu, int8-trt; pytorch fp32, bf16"
    assert [(r["backend"], r["precision"], r["status"]) for r in skipped] == [
        ("onnxruntime", "fp16", f"skipped: no fp16 artifact in {fp32_dir}"),
        ("onnxruntime,pytorch", "int8", f"skipped: no backend chosen runs int8 ({runs})"),
    ]
    for precisions in (None, ("fp32",)):  # a backend named that none of them is run on: no row
        cfg = SpeedConfig(checkpoint=tiny_checkpoint, artifacts=fp32_dir, precisions=precisions,
                          backends=("tensorrt",), modes=("model",))  # fmt: skip
        jobs, skipped = plan(cfg)
        assert {(j.backend, j.precision) for j in jobs} == {("pytorch", "fp32")}
        chosen = ",".join(precisions or ("fp32", "int8-cpu"))
        assert [(r["backend"], r["precision"], r["status"]) for r in skipped] == [
            ("tensorrt", chosen, "skipped: tensorrt runs fp16, int8, none of them chosen")
        ]
    with pytest.raises(MarsvisionError, match="--modes: give model, e2e or both"):
        SpeedConfig(checkpoint=tiny_checkpoint, modes=())
    other = tmp_path / "other.pt"
    other.write_bytes(tiny_checkpoint.read_bytes() + b"\0")
    with pytest.raises(MarsvisionError, match="fp32.onnx was exported from another checkpoint"):
        run_speed(SpeedConfig(checkpoint=other, artifacts=fp32_dir, modes=("model",),
                              precisions=("fp32",), backends=("onnxruntime",)))  # fmt: skip


def test_speed_exits_3_when_a_measurement_failed(
    fp32_dir: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Every row an error (an --images file that does not decode) exited 0, as if measured."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "cut.JPG").write_bytes(b"not a jpeg")
    args = ["speed", "--checkpoint", str(tiny_checkpoint), "--artifacts", str(fp32_dir),
            "--modes", "e2e", "--images", str(tmp_path / "img"), "--batch-sizes", "2",
            "--precisions", "fp32", "--backends", "pytorch,onnxruntime", "--warmup", "0",
            "--repeats", "1", "--device", "cpu", "--threads", "1", "--in-process",
            "--out", str(tmp_path / "o")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == SPEED_FAIL_EXIT, result.output
    assert "speed: 2 of 2 measurements failed (their error rows above)" in result.output
    assert list((tmp_path / "o").glob("speed-*.json"))  # written all the same
    # all that was asked for skipped (no fp16 file): the baseline alone is no measurement
    args = ["speed", "--checkpoint", str(tiny_checkpoint), "--artifacts", str(fp32_dir),
            "--modes", "model", "--batch-sizes", "2", "--precisions", "fp16", "--backends",
            "onnxruntime", "--warmup", "0", "--repeats", "1", "--device", "cpu", "--threads",
            "1", "--in-process", "--out", str(tmp_path / "o2")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == SPEED_FAIL_EXIT, result.output
    assert "speed: nothing was measured but the PyTorch baseline" in result.output


def test_speed_without_images_for_e2e_is_a_user_error(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        main,
        [
            "speed",
            "--checkpoint",
            str(tiny_checkpoint),
            "--images",
            str(tmp_path),
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1 and "no image files in it" in result.output


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        ("speed", "--threads 0"),
        ("speed", "--threads -1"),
        ("parity", "--threads 0"),
        ("speed", "--num-images 0"),
    ],
)
def test_bench_refuses_counts_below_one(command: str, flag: str, tmp_path: Path) -> None:
    """Usage errors before anything runs: --threads -1 made every PyTorch row an error row
    (torch.set_num_threads refuses it) in result files written as if measured, --threads 0 ran on
    all cores with rows saying 0 threads, and --num-images 0 timed one image of a split."""
    result = CliRunner().invoke(main, [command, *flag.split(), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flag.split()[0]}'" in result.output
    assert not (tmp_path / "o").exists()


def test_e2e_images_of_a_folder_are_those_mars_infer_classifies(tmp_path: Path) -> None:
    """A folder's end-to-end inputs are mars-infer's for it: every image suffix it reads (TIFF
    too), not macOS's hidden `._` copies (not images: every one an error row, timed as if
    classified), nor other files or subfolders."""
    from marsvision.benchmarks.cli import _e2e_images

    for name in ("b.JPG", "a.tif", "._b.JPG", "notes.txt", "sub/c.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    want = [str(tmp_path / "a.tif"), str(tmp_path / "b.JPG")]
    assert list(_e2e_images(str(tmp_path), None, 10)) == want
    assert list(_e2e_images(str(tmp_path), None, 1)) == want[:1]


def test_isolated_job_past_its_timeout_is_an_error_row(tmp_path: Path) -> None:
    """A job that hangs ends as its own error row; the run goes on to the next job."""
    job = Job("model", "onnxruntime", "fp32", 1, str(tmp_path / "m.onnx"), "cpu", 1, 1)
    row = run_job_isolated(job, timeout=0.01)
    assert row["status"] == "error: timed out after 0.01 s"
    assert row["backend"] == "onnxruntime" and row["batch"] == 1 and row["images"] == 0


def test_an_isolated_job_imports_nothing_from_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m` put the folder mars-bench ran in first on the job's import path: a numpy.py
    there was run in every job's process. The job's own row (no model file) comes back."""
    marker = tmp_path / "planted-ran"
    (tmp_path / "numpy.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    job = Job("model", "onnxruntime", "fp32", 1, str(tmp_path / "m.onnx"), "cpu", 1, 1)
    row = run_job_isolated(job, timeout=120)
    assert not marker.exists()
    assert row["status"].startswith("skipped: model ") and "m.onnx not found" in row["status"], row


def test_speed_without_the_baseline_runs_where_torch_is_not_installed(
    fp32_dir: Path, tmp_path: Path
) -> None:
    """An onboard box with the runtime alone (no torch, no checkpoint) is where speed matters
    most: `--no-baseline` times the exported files without PyTorch (rows without ratios); the
    baseline there is refused in one line that names the extra. PyTorch asked for with
    --no-baseline, or no --artifacts, is a usage error."""
    # a runtime-only install: no torch, torchvision, onnx or matplotlib (the PNG chart's)
    block = ("import sys; sys.modules['torch'] = sys.modules['torchvision'] = None; "
             "sys.modules['onnx'] = sys.modules['matplotlib'] = None; ")  # fmt: skip
    code = block + "from marsvision.benchmarks.cli import main; main()"
    out = tmp_path / "res"
    args = ["speed", "--artifacts", str(fp32_dir), "--backends", "onnxruntime", "--modes",
            "model", "--batch-sizes", "2", "--warmup", "0", "--repeats", "2", "--in-process",
            "--out", str(out)]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert r.returncode == 1 and "needs torch, torchvision, which this install lacks" in r.stderr
    r = subprocess.run([sys.executable, "-c", code, *args, "--no-baseline"], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(next(out.glob("speed-onnxruntime-fp32-*.json")).read_text())
    assert [(row["backend"], row["batch"], row["status"]) for row in doc["rows"]] == [
        ("onnxruntime", 2, "ok")
    ]
    assert doc["rows"][0]["speedup_vs_pytorch_fp32"] is None and doc["baseline_rows"] == []
    assert doc["config"]["baseline"] is False and doc["config"]["checkpoint"] is None
    assert not list(out.glob("speed-pytorch-*")) and not list(out.glob("*.png"))  # no chart
    assert len(list(out.glob("speed-*.md"))) == 1
    for extra, says in [
        (["--backends", "pytorch,onnxruntime"], "--no-baseline leaves PyTorch out: drop pytorch"),
        (["--artifacts", str(tmp_path / "none")], "no such directory"),
        (["--checkpoint", str(tmp_path / "none.pt")], "none.pt: cannot read it (No such file"),
    ]:
        r = subprocess.run([sys.executable, "-c", code, *args, "--no-baseline", *extra],
                           capture_output=True, text=True)  # fmt: skip
        assert r.returncode in (1, 2) and says in r.stderr, r.stderr


def test_bench_cli_does_not_import_torch() -> None:
    code = "import sys, marsvision.benchmarks.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_summarize_matches_numpy_percentiles() -> None:
    s = np.array([0.004, 0.001, 0.002, 0.003, 0.010] * 2)
    t = summarize(s)
    assert t.repeats == 10 and t.mean_ms == pytest.approx(4.0)
    assert t.p50_ms == pytest.approx(3.0) and t.max_ms == pytest.approx(10.0)
    assert t.p90_ms == pytest.approx(np.percentile(s * 1e3, 90))
    assert t.p99_ms is None  # 10 calls have no p99
    many = np.random.default_rng(0).random(100)
    assert summarize(many).p99_ms == pytest.approx(np.percentile(many * 1e3, 99))


def test_a_tail_percentile_of_too_few_calls_is_not_reported() -> None:
    """p99 of 30 calls interpolated between the two largest (README quoted the largest of 30 as
    a p99); p90 of 5 calls likewise. They are None below 100 and 10 calls."""
    t = summarize(np.arange(1, 31) / 1e3)
    assert t.p90_ms == pytest.approx(27.1) and t.p99_ms is None and t.max_ms == 30.0
    assert summarize(np.arange(1, 10) / 1e3).p90_ms is None


def test_time_calls_warms_up_and_syncs_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, syncs = [], []
    t = time_calls(lambda: calls.append(1), warmup=3, repeats=4, sync=lambda: syncs.append(1))
    assert len(calls) == 7 and len(syncs) == 5 and t.repeats == 4
    # the sync of each call is inside its timed span (a GPU's queued work is counted): on a
    # clock that a call moves by 1 s and a sync by 10 s, every call takes 11 s
    now = [0.0]

    def advance(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    t = time_calls(lambda: advance(1), warmup=2, repeats=3, sync=lambda: advance(10))
    assert t.min_ms == t.max_ms == pytest.approx(11_000)


def test_cpu_info_reads_model_and_physical_cores(tmp_path: Path) -> None:
    text = "".join(
        f"processor\t: {i}\nmodel name\t: Test CPU 9000\nphysical id\t: 0\ncore id\t: {i // 2}\n"
        "flags\t\t: fpu avx2 avx512f avx512_vnni\n\n"
        for i in range(4)
    )
    (tmp_path / "cpuinfo").write_text(text)
    info = cpu_info(tmp_path / "cpuinfo")
    assert info["model"] == "Test CPU 9000" and info["physical_cores"] == 2
    assert info["isa"] == ["avx2", "avx512f", "avx512_vnni"]
    assert machine_name(info, None) == f"test-9000-avx512-vnni-{info['usable_cores']}c"
    # the same generic model name on a CPU without AVX-512 (a Zen 3 EPYC) is another machine
    assert machine_name({**info, "isa": ["avx2"], "usable_cores": 2}, None) == "test-9000-avx2-2c"
    amx = {**info, "isa": ["avx2", "avx512f", "avx512_vnni", "amx_int8"], "usable_cores": 2}
    assert machine_name(amx, None) == "test-9000-amx-2c"
    assert machine_name({**info, "isa": [], "usable_cores": 1}, None) == "test-9000-1c"
    assert machine_name(info, {"name": "NVIDIA H100 80GB HBM3"}) == "h100-80gb-hbm3"
    import platform  # no /proc/cpuinfo (not Linux): the model is what platform says

    assert cpu_info(tmp_path / "none")["model"] == (platform.processor() or platform.machine())


def test_cpu_runs_on_a_gpu_machine_are_named_by_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cpu results on a GPU machine carry the CPU's name (they were filed under the
    GPU's, and lost the CPU's ISA tier); GPU runs carry the GPU's."""
    from marsvision.benchmarks import conditions

    monkeypatch.setattr(conditions, "gpu_info", lambda: {"name": "NVIDIA H100 80GB HBM3"})
    cpu = conditions.cpu_info()
    assert conditions.capture_conditions(device="cpu")["machine"] == machine_name(cpu, None)
    assert conditions.capture_conditions(device="cuda")["machine"] == "h100-80gb-hbm3"


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU visible to torch")
@pytest.mark.parametrize(("backend", "precision"), [("pytorch", "fp32"), ("pytorch-cl", "fp16")])
def test_gpu_baseline_rows_record_gpu_memory(
    tiny_checkpoint: Path, backend: str, precision: str
) -> None:
    from marsvision.benchmarks.speed_jobs import run_job

    job = Job(
        mode="model",
        backend=backend,
        precision=precision,
        batch=4,
        model=str(tiny_checkpoint),
        device="cuda",
        warmup=2,
        repeats=3,
    )
    row = run_job(job)
    assert row["status"] == "ok" and row["runner"].startswith("pytorch-cuda")
    assert row["gpu_tensor_peak_mib"] > 0 and row["timing"]["repeats"] == 3
    # nvidia-smi's figure for the process, as for the other backends' rows (None where it
    # lists no process of this id, as in some containers)
    assert row["gpu_mem_mib"] is None or row["gpu_mem_mib"] > row["gpu_tensor_peak_mib"]


def test_list_flags_take_each_item_once() -> None:
    """`mars-bench speed --batch-sizes 1,1` timed every batch-1 row twice, in one table;
    `mars-bench parity --splits val,val` ran the PyTorch reference on val twice."""
    from marsvision.benchmarks.cli import _csv

    assert _csv("--batch-sizes", "8, 1,8,,1", int) == (8, 1)
    assert _csv("--splits", "test,val,test") == ("test", "val")
    with pytest.raises(MarsvisionError, match="--batch-sizes '8,x': 'x' is not a whole number"):
        _csv("--batch-sizes", "8,x", int)


def test_a_chart_save_that_fails_leaves_no_cut_png(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart was saved straight under its name: a save cut short (a full disk, a kill) left
    a partial PNG there. It is written beside it and renamed."""
    from matplotlib.figure import Figure

    from marsvision.benchmarks.report import bar_chart

    def cut_short(self: Figure, fname: object, **kw: object) -> None:
        Path(str(fname)).write_bytes(b"\x89PNG\r\n\x1a\n partial")
        raise OSError(28, "No space left on device")

    png = tmp_path / "speed.png"
    bar_chart(png, title="t", labels=["a"], series={"s": [1.0]}, ylabel="y")
    whole = png.read_bytes()
    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(OSError, match="No space"):
        bar_chart(png, title="t", labels=["a"], series={"s": [2.0]}, ylabel="y")
    assert png.read_bytes() == whole
    assert [p.name for p in tmp_path.iterdir()] == ["speed.png"]


def test_end_to_end_options_need_its_mode(tmp_path: Path) -> None:
    """--images, --num-images and --data under --modes model did nothing, unchecked (a folder
    that does not exist: exit 0)."""
    (tmp_path / "c.pt").write_bytes(b"x")
    base = ["speed", "--checkpoint", str(tmp_path / "c.pt"), "--modes", "model"]
    result = CliRunner().invoke(main, [*base, "--images", "none", "--num-images", "7"])
    assert result.exit_code == 2 and result.output == (
        "Error: --images and --num-images choose the end-to-end images, which --modes model does "
        "not measure: add e2e to --modes\n"
    )


def test_without_the_msl_data_the_end_to_end_images_can_be_ones_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default --images is the MSL test split: without the data the error named only
    --data and MARS_DATA, and a user timing their own images did not learn of --images DIR."""
    from marsvision.benchmarks.cli import _e2e_images

    monkeypatch.delenv("MARS_DATA", raising=False)
    with pytest.raises(MarsvisionError, match=r"no MSL data given: .*; or time end to end on a "
                       r"folder of your own images: --images DIR$"):  # fmt: skip
        _e2e_images("test", None, 4)
    (tmp_path / "a.png").write_bytes(b"")
    assert _e2e_images(str(tmp_path), None, 4) == (str(tmp_path / "a.png"),)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--repeats", "0"], "--warmup must be >= 0 and --repeats >= 1"),
        (["--batch-sizes", "0,8"], "--batch-sizes: give positive integers"),
        (["--modes", "fast"], "--modes: unknown fast"),
        (["--precisions", "fp64"], "--precisions: unknown fp64"),
        (["--batch-sizes", "a,8"], "--batch-sizes 'a,8': 'a' is not a whole number (a comma-"),
    ],
)
def test_bad_values_are_usage_errors(args: list[str], says: str, tmp_path: Path) -> None:
    """--num-images 0 (click's range) was exit 2, --repeats 0 (the config's check) exit 1, a
    failure's code: a bad value is exit 2 whichever checks it."""
    (tmp_path / "c.pt").write_bytes(b"x")
    result = CliRunner().invoke(main, ["speed", "--checkpoint", str(tmp_path / "c.pt"), "--modes",
                                       "model", *args, "--out", str(tmp_path / "o")])  # fmt: skip
    assert result.exit_code == 2 and says in result.output, result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "o").exists()
    # found before the data that e2e (the default) needs: exit 1 for that came first
    result = CliRunner().invoke(main, ["speed", "--checkpoint", str(tmp_path / "c.pt"),
                                       "--data", str(tmp_path / "none"), *args])  # fmt: skip
    assert result.exit_code == 2 and says in result.output, result.output


def test_the_gpu_is_read_from_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first GPU's name, driver, memory (MiB, a number) and compute capability, each in its
    field; no nvidia-smi, or a row too short to hold them, is no GPU."""
    rows = [["NVIDIA H100 80GB HBM3", "550.54.15", "81559", "9.0"],
            ["NVIDIA A10", "550.54.15", "23028", "8.6"]]  # fmt: skip
    asked = []

    def smi(query: str) -> list[list[str]] | None:
        asked.append(query)
        return rows

    monkeypatch.setattr(conditions, "nvidia_smi", smi)
    assert conditions.gpu_info() == {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15",
                                     "memory_mib": 81559, "compute_capability": "9.0"}  # fmt: skip
    assert asked == ["gpu=name,driver_version,memory.total,compute_cap"]
    rows[0] = ["NVIDIA H100 80GB HBM3", "550.54.15", "[N/A]"]
    assert conditions.gpu_info() == {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15",
                                     "memory_mib": "[N/A]", "compute_capability": None}  # fmt: skip
    rows[0] = ["NVIDIA H100 80GB HBM3", "550.54.15"]
    assert conditions.gpu_info() is None
    monkeypatch.setattr(conditions, "nvidia_smi", lambda query: None)
    assert conditions.gpu_info() is None


def test_nvidia_smi_rows_are_split_into_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia-smi's CSV (no header, no units) is a list of fields per GPU, stripped; a missing
    or failing nvidia-smi is None, not an exception."""
    import subprocess

    class Done:
        stdout = "NVIDIA H100 80GB HBM3, 550.54.15, 81559, 9.0\nNVIDIA A10, 550.54.15, 23028, 8.6\n"

    calls = []

    def run(args: list[str], **kwargs: object) -> Done:
        calls.append(args)
        return Done()

    monkeypatch.setattr(subprocess, "run", run)
    assert conditions.nvidia_smi("gpu=name") == [
        ["NVIDIA H100 80GB HBM3", "550.54.15", "81559", "9.0"],
        ["NVIDIA A10", "550.54.15", "23028", "8.6"],
    ]
    assert calls == [["nvidia-smi", "--query-gpu=name", "--format=csv,noheader,nounits"]]

    def missing(args: list[str], **kwargs: object) -> Done:
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", missing)
    assert conditions.nvidia_smi("gpu=name") is None


def test_physical_cores_of_two_sockets_are_counted_apart(tmp_path: Path) -> None:
    """Each socket numbers its cores from 0: a machine of two 2-core sockets with two threads
    per core has 4 physical cores, not 2; a cpuinfo without core ids says none."""
    text = "".join(
        f"processor\t: {i}\nmodel name\t: Test CPU 9000\nphysical id\t: {i // 4}\n"
        f"core id\t: {i % 2}\nflags\t\t: fpu avx2\n\n"
        for i in range(8)
    )
    (tmp_path / "cpuinfo").write_text(text)
    assert conditions.cpu_info(tmp_path / "cpuinfo")["physical_cores"] == 4
    (tmp_path / "bare").write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n")
    assert conditions.cpu_info(tmp_path / "bare")["physical_cores"] is None


def test_the_conditions_state_the_threads_the_run_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """--threads N is the count recorded, for the run and for its onnxruntime sessions; without
    it, the usable cores; OMP_NUM_THREADS, which sets PyTorch's, is recorded too."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    given = conditions.capture_conditions(threads=3, device="cpu")
    assert given["threads"] == 3
    assert given["onnxruntime_session"]["intra_op_num_threads"] == 3
    assert given["env"] == {"OMP_NUM_THREADS": "2"}
    usable = given["cpu"]["usable_cores"]
    assert usable == 1  # the affinity's one core, not the machine's
    default = conditions.capture_conditions(threads=None, device="cpu")
    assert default["threads"] == usable
    assert default["onnxruntime_session"]["intra_op_num_threads"] == usable


def test_the_spread_of_the_calls_is_their_standard_deviation() -> None:
    """std_ms is the calls' standard deviation (numpy's, over the calls measured), in ms, min
    the fastest whatever its place, p50 the median: 3, 1, 4, 2 ms have a mean and a median of
    2.5 and a std of 1.118."""
    t = summarize([0.003, 0.001, 0.004, 0.002])
    assert t.std_ms == pytest.approx(np.std([1.0, 2.0, 3.0, 4.0]))
    assert t.min_ms == pytest.approx(1.0) and t.max_ms == pytest.approx(4.0)
    assert t.mean_ms == pytest.approx(2.5) and t.p50_ms == pytest.approx(2.5)
    assert t.to_dict()["std_ms"] == t.std_ms
    with pytest.raises(ValueError, match="no timings"):
        summarize([])


def test_the_peak_rss_is_the_peak_and_the_current_rss_the_resident_set() -> None:
    """peak_rss_mib is the process's highest resident set so far, which freeing memory does not
    lower; current_rss_mib is what is resident now (not the address space, which is larger)."""
    from marsvision.benchmarks.timing import current_rss_mib, peak_rss_mib

    big = np.ones(1 << 26, dtype=np.float32)  # 256 MiB, touched
    during = current_rss_mib()
    assert during > 256 and peak_rss_mib() >= during - 1
    del big
    after = current_rss_mib()
    assert after < during - 200  # freed: numpy gives a buffer this large back to the system
    assert peak_rss_mib() > after + 200


@pytest.fixture(scope="module")
def fp32_onnx(
    tiny_checkpoint: Path, msl_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The FP32 ONNX of the tiny checkpoint."""
    from marsvision.export.images import load_batch, split_paths
    from marsvision.export.onnx_fp32 import fp32_meta, onnx_from_checkpoint, torch_logits
    from marsvision.runtime.metadata import sha256_file
    from marsvision.train.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("speed-jobs-art") / "resnet50-binary.fp32.onnx"
    ckpt = load_checkpoint(tiny_checkpoint)
    meta = fp32_meta(ckpt, sha256_file(tiny_checkpoint))
    batch = load_batch(split_paths(msl_dir, "val", "binary", 2), meta.preprocess)
    onnx_from_checkpoint(ckpt, out, meta=meta, parity_batch=batch,
                         reference=torch_logits(ckpt, batch))  # fmt: skip
    return out


@pytest.fixture
def timed(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Each timing of a job: what its call returns, torch's thread count while it is timed,
    and how many times the call ran (one here, then the warm-up and the timed calls)."""
    import torch

    seen: list[dict[str, Any]] = []
    real = speed_jobs.time_calls

    def spy(call: Any, **kw: Any) -> Any:
        calls = [0]

        def counted() -> Any:
            calls[0] += 1
            return call()

        seen.append({"out": counted(), "torch_threads": torch.get_num_threads(), "calls": calls})
        return real(counted, **kw)

    monkeypatch.setattr(speed_jobs, "time_calls", spy)
    return seen


def _images(msl_dir: Path, n: int) -> tuple[str, ...]:
    return tuple(str(p) for p in sorted((msl_dir / "calibrated").glob("*.JPG"))[:n])


@pytest.mark.parametrize(("backend", "layout"), [("pytorch", ""), ("pytorch-cl", "-channels_last")])
@pytest.mark.parametrize("mode", ["model", "e2e"])
def test_a_pytorch_job_runs_its_layout_threads_and_batch(
    backend: str,
    layout: str,
    mode: str,
    tiny_checkpoint: Path,
    msl_dir: Path,
    three_torch_threads: None,
    timed: list[dict[str, Any]],
) -> None:
    """pytorch-cl rows run channels_last and pytorch rows do not; the job's thread count holds
    while it is timed; each call classifies the job's batch, after the job's warm-up calls; the
    per-image figures divide by the batch."""
    job = Job(mode=mode, backend=backend, precision="fp32", batch=3, model=str(tiny_checkpoint),
              device="cpu", warmup=2, repeats=2, threads=1,
              images=_images(msl_dir, 2) if mode == "e2e" else ())  # fmt: skip
    row = run_job(job)
    assert row["status"] == "ok", row
    assert row["runner"] == f"pytorch-cpu{layout}"
    assert [s["torch_threads"] for s in timed] == [1]
    assert np.asarray(timed[0]["out"]).shape == (3, 2)
    assert timed[0]["calls"] == [1 + 2 + 2] and row["timing"]["repeats"] == 2
    mean = row["timing"]["mean_ms"]
    assert row["mean_ms_per_img"] == pytest.approx(mean / 3)
    assert row["throughput_img_s"] == pytest.approx(3e3 / mean)


@pytest.mark.parametrize("mode", ["model", "e2e"])
def test_an_onnxruntime_job_runs_its_threads_and_batch(
    mode: str, fp32_onnx: Path, msl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's thread count reaches the onnxruntime session (not the usable cores), and every
    inference, end to end too, runs the job's whole batch (more than the Classifier's default
    of 8), not some other."""
    from marsvision.runtime.backends import onnxruntime as ort_backend

    threads = usable_cores() + 1  # unlike the default, on any machine
    intra: list[int] = []
    batches: list[int] = []
    real_options = ort_backend.session_options
    real_infer = ort_backend.OnnxRuntimeRunner.infer

    def options(*a: Any, **kw: Any) -> Any:
        so = real_options(*a, **kw)
        intra.append(so.intra_op_num_threads)
        return so

    def infer(self: Any, x: np.ndarray) -> Any:
        batches.append(len(x))
        return real_infer(self, x)

    monkeypatch.setattr(ort_backend, "session_options", options)
    monkeypatch.setattr(ort_backend.OnnxRuntimeRunner, "infer", infer)
    job = Job(mode=mode, backend="onnxruntime", precision="fp32", batch=9, model=str(fp32_onnx),
              device="cpu", warmup=1, repeats=2, threads=threads,
              images=_images(msl_dir, 5) if mode == "e2e" else ())  # fmt: skip
    row = run_job(job)
    assert row["status"] == "ok", row
    assert intra == [threads]
    assert batches and set(batches) == {9}


def test_end_to_end_batches_cycle_through_the_images() -> None:
    """Each batch takes the next images of the list, from its start again after its end (the
    same first images every call would time a few files, cached, as the whole list)."""
    got = list(islice(speed_jobs._batches(("a", "b", "c"), 2), 4))
    assert got == [["a", "b"], ["c", "a"], ["b", "c"], ["a", "b"]]
    assert next(speed_jobs._batches(("a",), 3)) == ["a", "a", "a"]


def test_a_job_that_cannot_open_its_model_is_skipped_not_failed(tmp_path: Path) -> None:
    """A model the job cannot open (here: no such file) is a skipped row, which mars-bench does
    not count as a failed measurement."""
    job = Job("model", "onnxruntime", "fp32", 1, str(tmp_path / "none.onnx"), "cpu", 0, 1, 1)
    row = run_job(job)
    assert row["status"].startswith("skipped: "), row
    assert "timing" not in row


def test_a_job_whose_process_dies_is_an_error_row_naming_why(fp32_onnx: Path) -> None:
    """A job process that ends in a traceback is an error row with the exception's line (the
    last of the traceback), not "Traceback (most recent call last):"."""
    job = Job("e2e", "onnxruntime", "fp32", 1, str(fp32_onnx), "cpu", 0, 1, 1, images=())
    row = run_job_isolated(job, timeout=120)
    assert row["status"].startswith("error: ZeroDivisionError"), row


def test_an_isolated_jobs_peak_rss_counts_its_model(fp32_onnx: Path) -> None:
    """The row's peak RSS is the process's peak with the model open and run, above what the
    process held before opening it."""
    job = Job("model", "onnxruntime", "fp32", 2, str(fp32_onnx), "cpu", 0, 2, 1)
    row = run_job_isolated(job, timeout=120)
    assert row["status"] == "ok", row
    assert row["peak_rss_mib"] > row["rss_before_mib"] + 10


def _row(mode: str, backend: str, precision: str, batch: int, img_s: float) -> dict[str, Any]:
    timing = {"repeats": 30, "mean_ms": batch * 1e3 / img_s, "std_ms": 0.0, "min_ms": 1.0,
              "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": None, "max_ms": 1.0}  # fmt: skip
    return {"mode": mode, "backend": backend, "precision": precision, "batch": batch,
            "status": "ok", "runner": f"{backend}-cpu", "timing": timing,
            "throughput_img_s": img_s, "input_size": 64, "peak_rss_mib": 100.0}  # fmt: skip


def _report(rows: list[dict[str, Any]], repeats: int = 30, **config: Any) -> dict[str, Any]:
    cpu = {"model": "a CPU", "isa": [], "usable_cores": 2, "logical_cores": 2}
    return {"rows": rows, "skipped": [], "created": "2026-12-07T06:58:26+00:00",
            "config": {"device": "cpu", "warmup": 1, "repeats": repeats, **config},
            "conditions": {"machine": "m", "cpu": cpu, "threads": 2,
                           "versions": {}}}  # fmt: skip


@pytest.fixture
def charted(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What write_speed hands the chart (its labels and series), in place of drawing it."""
    seen: dict[str, Any] = {}

    def chart(path: Path, **kw: Any) -> Path:
        seen.update(kw)
        path.write_bytes(b"png")
        return path

    monkeypatch.setattr(speed_report, "bar_chart", chart)
    return seen


def test_each_pairs_file_holds_its_rows_and_the_baselines(
    tmp_path: Path, charted: dict[str, Any]
) -> None:
    """One JSON per backend x precision, named by machine and the time to the second (two runs
    of a day do not overwrite each other), holding that pair's rows and PyTorch FP32's as its
    baseline (none in the baseline's own file)."""
    rows = [_row("model", "pytorch", "fp32", 1, 10.0), _row("model", "onnxruntime", "fp32", 1,
            30.0), _row("model", "onnxruntime", "int8-cpu", 1, 60.0)]  # fmt: skip
    written = write_speed(_report(rows), tmp_path)
    stem = "m-2026-12-07T065826"
    assert sorted(p.name for p in written) == sorted(
        [
            f"speed-{pair}-{stem}.json"
            for pair in ("onnxruntime-fp32", "onnxruntime-int8-cpu", "pytorch-fp32")
        ]
        + [f"speed-{stem}.md", f"speed-{stem}.png"]  # fmt: skip
    )
    doc = json.loads((tmp_path / f"speed-onnxruntime-int8-cpu-{stem}.json").read_text())
    assert doc["rows"] == [rows[2]] and doc["baseline_rows"] == [rows[0]]
    base = json.loads((tmp_path / f"speed-pytorch-fp32-{stem}.json").read_text())
    assert base["rows"] == [rows[0]] and base["baseline_rows"] == []


def test_the_chart_groups_model_rows_first_and_the_baseline_first_in_each(
    tmp_path: Path, charted: dict[str, Any]
) -> None:
    """Groups: model rows before end-to-end ones, each by batch size; bars: PyTorch FP32
    first, then the others by name, each its own throughput (none where it did not run);
    rows that failed are not drawn."""
    failed = {**_row("model", "onnxruntime", "int8-cpu", 1, 1.0), "status": "error: x"}
    rows = [_row("e2e", "pytorch", "fp32", 8, 5.0), _row("model", "onnxruntime", "fp32", 8, 40.0),
            _row("model", "pytorch", "fp32", 8, 20.0), _row("model", "pytorch", "fp32", 1, 10.0),
            _row("e2e", "onnxruntime", "fp32", 8, 7.0), failed]  # fmt: skip
    write_speed(_report(rows), tmp_path)
    assert charted["labels"] == ["model b1", "model b8", "e2e b8"]
    assert list(charted["series"]) == ["pytorch fp32", "onnxruntime fp32"]
    assert charted["series"] == {"pytorch fp32": [10.0, 20.0, 5.0],
                                 "onnxruntime fp32": [None, 40.0, 7.0]}  # fmt: skip


def test_a_skipped_pair_is_one_table_row_of_every_column(tmp_path: Path) -> None:
    """A pair that could not run fills the table's columns, its reason under "status"."""
    report = _report([_row("model", "pytorch", "fp32", 1, 10.0)])
    report["skipped"] = [{"backend": "tensorrt", "precision": "fp16", "status": "skipped: why"}]
    skipped = table_rows(report)[-1]
    assert len(skipped) == len(HEADERS) and skipped[HEADERS.index("status")] == "skipped: why"


def test_a_short_run_says_which_tails_it_cannot_report() -> None:
    """Under 100 calls a row has no p99 (under 10, no p90): the conditions line says so, and
    says nothing of it for a run long enough."""
    rows = [_row("model", "pytorch", "fp32", 1, 10.0)]
    assert " (p90 from 10 calls, p99 from 100)" in render_text(_report(rows, repeats=30))
    assert "p99 from" not in render_text(_report(rows, repeats=100))


def test_only_a_run_in_one_process_says_its_peak_rss_is_the_running_peak() -> None:
    """The conditions line says the peak RSS is the running peak only where the rows ran in one
    process (--in-process), not where each ran in its own, as by default."""
    rows = [_row("model", "pytorch", "fp32", 1, 10.0)]
    said = "in one process (peak RSS: the running peak)"
    assert said in render_text(_report(rows, isolate=False))
    assert said not in render_text(_report(rows, isolate=True))
    assert said not in render_text(_report(rows))


def test_each_table_column_holds_its_figure() -> None:
    """The table's cells, by header: the runner's name, the throughput, each timing, the
    speedup over PyTorch FP32 (throughput over its, not its inverse), peak RSS and GPU
    memory each in its own column."""
    row = _row("model", "onnxruntime", "int8-cpu", 4, 400.0)
    row["timing"] = {"repeats": 30, "mean_ms": 10.0, "std_ms": 0.1, "min_ms": 8.0,
                     "p50_ms": 9.0, "p90_ms": 11.0, "p99_ms": None, "max_ms": 12.0}  # fmt: skip
    row.update(speedup_vs_pytorch_fp32=4.0, peak_rss_mib=300.0, gpu_mem_mib=None)
    cells = dict(zip(HEADERS, table_rows(_report([row]))[0], strict=True))
    assert cells == {
        "mode": "model", "backend": "onnxruntime-cpu", "precision": "int8-cpu", "batch": "4",
        "img/s": "400.0", "mean ms": "10.00", "p50 ms": "9.00", "p90 ms": "11.00",
        "p99 ms": "-", "max ms": "12.00", "x pt-fp32": "4.00x", "peak RSS MiB": "300",
        "GPU MiB": "-", "status": "ok",
    }  # fmt: skip
