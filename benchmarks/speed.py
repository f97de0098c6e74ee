"""Throughput and latency of every backend x precision x batch size, against PyTorch eager FP32.

The plan: which (backend, precision) pairs make sense on this device, which artifact file each
one runs, and the PyTorch baseline that every figure is divided by. Measuring is done by
`speed_jobs` (one job per row, by default each in its own process).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from marsvision.benchmarks.artifacts import find_artifacts
from marsvision.benchmarks.speed_jobs import TORCH_BACKENDS, Job, run_job, run_job_isolated
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.host import usable_cores
from marsvision.runtime.models import UNLISTED

# Exit code of `mars-bench speed` when a measurement failed or none was made: parity's and
# score's failure code (1 is a user error, 2 a usage error, as click defines them)
SPEED_FAIL_EXIT = 3

BACKENDS = ("pytorch", "pytorch-cl", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8-cpu", "int8-trt", "int8")
MODES = ("model", "e2e")
# (backend, precision) -> artifact flavour (see runtime.models.SUFFIXES); PyTorch needs none.
ARTIFACT_FLAVOUR = {
    ("onnxruntime", "fp32"): "fp32",
    ("onnxruntime", "fp16"): "fp16",
    ("onnxruntime", "int8-cpu"): "int8-cpu",
    ("onnxruntime", "int8-trt"): "int8-trt",
    ("tensorrt", "fp16"): "fp16-engine",
    ("tensorrt", "int8"): "int8-engine",
}
TORCH_PRECISIONS = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}
DEFAULTS: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {"backends": ("pytorch", "onnxruntime"), "precisions": ("fp32", "int8-cpu")},
    "cuda": {"backends": BACKENDS, "precisions": ("fp32", "fp16", "bf16", "int8")},
}
BASELINE = ("pytorch", "fp32")


@dataclass(frozen=True)
class SpeedConfig:
    """What `run_speed` measures; the CLI builds it from its flags (None: device default)."""

    checkpoint: Path | None  # None only without the baseline
    artifacts: Path | None = None
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    precisions: tuple[str, ...] | None = None
    backends: tuple[str, ...] | None = None
    modes: tuple[str, ...] = MODES
    images: tuple[str, ...] = ()  # e2e files (resolved by the CLI from --images)
    warmup: int = 5
    repeats: int = 30
    device: str = "cpu"  # resolved: cpu or cuda
    threads: int | None = None
    isolate: bool = True
    # PyTorch eager FP32, the rows' ratios; off (--no-baseline): the exported files alone, on a
    # runtime-only install (no torch, no checkpoint), the onboard box whose speed matters most
    baseline: bool = True

    def __post_init__(self) -> None:
        for name, values, valid in (
            ("--precisions", self.precisions or (), PRECISIONS),
            ("--backends", self.backends or (), BACKENDS),
            ("--modes", self.modes, MODES),
        ):
            bad = [v for v in values if v not in valid]
            if bad:
                raise MarsvisionError(
                    f"{name}: unknown {', '.join(bad)}; choose from {', '.join(valid)}"
                )
        if not self.modes:
            raise MarsvisionError("--modes: give model, e2e or both")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise MarsvisionError("--batch-sizes: give positive integers, e.g. 1,8,32")
        if self.warmup < 0 or self.repeats < 1:
            raise MarsvisionError("--warmup must be >= 0 and --repeats >= 1")
        if self.device not in ("cpu", "cuda"):
            raise MarsvisionError(f"device {self.device!r}: choose cpu or cuda")
        if self.baseline and self.checkpoint is None:
            raise MarsvisionError("the PyTorch baseline needs --checkpoint (or --no-baseline)")
        if not self.baseline:
            torch = [b for b in self.backends or () if b in TORCH_BACKENDS]
            if torch:
                raise MarsvisionError(
                    f"--no-baseline leaves PyTorch out: drop {','.join(torch)} from --backends"
                )
            if self.artifacts is None:
                raise MarsvisionError("--no-baseline times exported files: pass --artifacts DIR")

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values (paths as strings), for the result file."""
        d = asdict(self)
        d["checkpoint"] = str(self.checkpoint) if self.checkpoint else None
        d["artifacts"] = str(self.artifacts) if self.artifacts else None
        d["images"] = len(self.images)
        # which images: the folder that holds them all, and the digest of their file names in
        # order (the same images from another folder or working directory, the same digest)
        folders = [os.path.dirname(os.path.abspath(p)) for p in self.images]
        d["images_folder"] = os.path.commonpath(folders) if folders else None
        names = "\n".join(os.path.basename(p) for p in self.images).encode()
        d["images_list_sha256"] = hashlib.sha256(names).hexdigest() if self.images else None
        return d


def _runs(backend: str, device: str) -> list[str]:
    """The precisions `backend` measures on `device`."""
    if backend in TORCH_BACKENDS:
        return list(TORCH_PRECISIONS[device])
    return [p for b, p in ARTIFACT_FLAVOUR if b == backend]


def plan(cfg: SpeedConfig) -> tuple[list[Job], list[dict[str, Any]]]:
    """The jobs to run (baseline first) and rows for pairs that cannot run (with the reason)."""
    backends = cfg.backends or tuple(
        b for b in DEFAULTS[cfg.device]["backends"] if cfg.baseline or b not in TORCH_BACKENDS
    )
    precisions = cfg.precisions or DEFAULTS[cfg.device]["precisions"]
    found = {a.flavour: a for a in find_artifacts(cfg.artifacts)} if cfg.artifacts else {}
    pairs: list[tuple[str, str, str]] = [(*BASELINE, str(cfg.checkpoint))] if cfg.baseline else []
    skipped: list[dict[str, Any]] = []

    def skip(backend: str, precision: str, why: str) -> None:
        skipped.append({"backend": backend, "precision": precision, "status": f"skipped: {why}"})

    for backend in backends:
        for precision in precisions:
            if (backend, precision) == BASELINE:
                continue
            if backend in TORCH_BACKENDS:
                if cfg.baseline and precision in TORCH_PRECISIONS[cfg.device]:
                    pairs.append((backend, precision, str(cfg.checkpoint)))
                continue
            flavour = ARTIFACT_FLAVOUR.get((backend, precision))
            if flavour is None:
                continue  # not a combination that exists (e.g. onnxruntime bf16)
            if flavour not in found:
                where = cfg.artifacts or "(no --artifacts given)"
                skip(backend, precision, f"no {flavour} artifact in {where}")
                continue
            if found[flavour].unlisted:
                skip(backend, precision, f"{found[flavour].path.name}: {UNLISTED}")
                continue
            if change := found[flavour].change:  # a damaged file's speed says nothing of the model
                skip(backend, precision, f"{found[flavour].path.name}: {change}")
                continue
            if backend == "tensorrt" and cfg.device == "cpu":
                skip(backend, precision, "TensorRT needs --device cuda")
                continue
            pairs.append((backend, precision, str(found[flavour].path)))
    planned = {p for _, p, _ in pairs} | {r["precision"] for r in skipped}
    for precision in cfg.precisions or ():  # asked for by name, and no backend runs it
        if precision not in planned:
            runs = "; ".join(f"{b} {', '.join(_runs(b, cfg.device))}" for b in backends)
            skip(",".join(backends), precision, f"no backend chosen runs {precision} ({runs})")
    given = {b for b, _, _ in pairs} | {b for r in skipped for b in r["backend"].split(",")}
    for backend in cfg.backends or ():  # asked for by name, and none of its precisions chosen
        if backend not in given:  # it had no row: `--backends tensorrt` on the CPU exited 0
            runs = ", ".join(_runs(backend, cfg.device))
            skip(backend, ",".join(precisions), f"{backend} runs {runs}, none of them chosen")
    jobs = [
        Job(
            mode=mode,
            backend=b,
            precision=p,
            batch=bs,
            model=m,
            device=cfg.device,
            warmup=cfg.warmup,
            repeats=cfg.repeats,
            # the count the conditions state, for every row: without it onnxruntime took the
            # usable cores and PyTorch its own default (OMP_NUM_THREADS=1: 1 against 2)
            threads=cfg.threads or usable_cores(),
            images=cfg.images if mode == "e2e" else (),
        )
        for mode in cfg.modes
        for b, p, m in pairs
        for bs in cfg.batch_sizes
    ]
    return jobs, skipped


def _add_ratios(rows: list[dict[str, Any]], *, own_rss: bool = True) -> None:
    """Each ok row gets throughput and latency as ratios to PyTorch FP32 (same mode and batch),
    and peak RSS too where each row's is its own (`own_rss`: rows run in their own process;
    in one process the peak so far carries over from row to row)."""
    base = {
        (r["mode"], r["batch"]): r
        for r in rows
        if (r.get("backend"), r.get("precision")) == BASELINE and r.get("status") == "ok"
    }
    for r in rows:
        b = base.get((r.get("mode"), r.get("batch")))
        if r.get("status") != "ok" or b is None:
            r["speedup_vs_pytorch_fp32"] = None
            r["latency_ratio_vs_pytorch_fp32"] = None
            r["peak_rss_ratio_vs_pytorch_fp32"] = None
            continue
        r["speedup_vs_pytorch_fp32"] = r["throughput_img_s"] / b["throughput_img_s"]
        r["latency_ratio_vs_pytorch_fp32"] = {
            k: r["timing"][k] / b["timing"][k]
            if r["timing"].get(k) and b["timing"].get(k)
            else None
            for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")
        }
        r["peak_rss_ratio_vs_pytorch_fp32"] = (
            r["peak_rss_mib"] / b["peak_rss_mib"] if own_rss else None
        )


def _check_sources(jobs: list[Job], checkpoint: Path, want: str) -> None:
    """Refuse artifacts exported from another checkpoint than the baseline's (`want`: its
    sha256; their speedups would compare two models: another input size, say), as parity
    does."""
    from marsvision.benchmarks.artifacts import check_exported_from
    from marsvision.runtime.backends import load_model_meta

    for model in sorted({j.model for j in jobs if j.backend not in TORCH_BACKENDS}):
        check_exported_from(
            load_model_meta(model).source_checkpoint_sha256, model, checkpoint, want
        )


def run_speed(cfg: SpeedConfig, *, log: Any = None) -> dict[str, Any]:
    """Measure every planned job; return the report (conditions, config, rows)."""
    from marsvision.benchmarks.conditions import OtherWork, capture_conditions

    say = log or (lambda msg: None)
    if "e2e" in cfg.modes and not cfg.images:  # here: a config is made before its images
        raise MarsvisionError("end-to-end timing needs images: pass --images DIR or a split")
    from marsvision.runtime.metadata import sha256_file

    jobs, skipped = plan(cfg)
    # which file each row measured: its name alone does not say (a re-export keeps it); the
    # baseline's is the checkpoint, whose sha256 the artifacts must name
    sha = {m: sha256_file(m) for m in sorted({j.model for j in jobs})}
    if cfg.checkpoint is not None:
        try:  # with --no-baseline, a checkpoint that is no row's, read here first
            want = sha.get(str(cfg.checkpoint)) or sha256_file(cfg.checkpoint)
        except OSError as e:
            raise MarsvisionError(f"--checkpoint {cfg.checkpoint}: cannot read it ({e.strerror})")
        _check_sources(jobs, cfg.checkpoint, want)
    # the machine's load before the first row (a busy machine's rows are slow and noisy)
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    rows: list[dict[str, Any]] = []
    for i, job in enumerate(jobs, 1):
        say(f"[{i}/{len(jobs)}] {job.mode} {job.backend} {job.precision} batch {job.batch}")
        with OtherWork() as other:  # the CPUs' other work while it ran
            row = run_job_isolated(job) if cfg.isolate else run_job(job)
        row["other_work_cpu_share"] = other.share
        row["model_sha256"] = sha[row["model"]]
        row["model"] = os.path.basename(row["model"])
        rows.append(row)
    _add_ratios(rows, own_rss=cfg.isolate)
    conditions = capture_conditions(threads=cfg.threads, device=cfg.device)
    conditions["load_average_before"] = load
    return {
        "kind": "speed",
        "config": cfg.to_dict(),
        "conditions": conditions,
        "rows": rows,
        "skipped": skipped,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
