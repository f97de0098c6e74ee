"""One speed measurement (a "job"): a backend x precision x batch size, model-only or end to end.

A job is plain JSON so that it can run in a fresh subprocess (`python -m
marsvision.benchmarks.speed_jobs`), which makes each row's peak RSS its own. Model-only jobs
time `Runner.infer` on one preallocated batch; end-to-end jobs time the runtime's
`Classifier.predict` on real image files (decode, preprocess, infer, softmax), or for PyTorch
the same done with Pillow + train's eval_transform.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from marsvision.benchmarks.conditions import nvidia_smi
from marsvision.benchmarks.timing import Timing, current_rss_mib, peak_rss_mib, time_calls
from marsvision.runtime.errors import MarsvisionError

TORCH_BACKENDS = ("pytorch", "pytorch-cl")


@dataclass(frozen=True)
class Job:
    """What one row measures."""

    mode: str  # "model" or "e2e"
    backend: str  # pytorch, pytorch-cl, onnxruntime, tensorrt
    precision: str  # fp32, fp16, bf16, int8-cpu, int8-trt, int8
    batch: int
    model: str  # checkpoint path for PyTorch, artifact path otherwise
    device: str  # cpu or cuda
    warmup: int
    repeats: int
    threads: int | None = None
    images: tuple[str, ...] = ()  # e2e only: the files to cycle through

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-ready values (it travels to an isolated row's process this way)."""
        d = asdict(self)
        d["images"] = list(self.images)
        return d

    def row(self) -> dict[str, Any]:
        """The job as the first fields of its result row: the image count, not the list."""
        return {**self.to_dict(), "images": len(self.images)}


def _open_runner(job: Job) -> Any:
    if job.backend in TORCH_BACKENDS:
        from marsvision.benchmarks.torch_baseline import TorchRunner

        return TorchRunner(
            job.model,
            precision=job.precision,
            device=job.device,
            channels_last=job.backend == "pytorch-cl",
            threads=job.threads,
        )
    from marsvision.runtime.backends import open_runner

    return open_runner(job.model, job.backend, job.device, threads=job.threads)


def _gpu_used_mib(pid: int) -> float | None:
    """GPU memory this process holds now, per nvidia-smi (None without a GPU)."""
    for parts in nvidia_smi("compute-apps=pid,used_memory") or []:
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return float(parts[1])
    return None


def _batches(images: tuple[str, ...], batch: int) -> Any:
    """Endless batches of `batch` paths cycling through the image list."""
    i = 0
    n = len(images)
    while True:
        yield [images[(i + k) % n] for k in range(batch)]
        i = (i + batch) % n


def _model_call(runner: Any, job: Job) -> Any:
    s = runner.meta.preprocess.input_size
    x = np.random.default_rng(0).standard_normal((job.batch, 3, s, s)).astype(np.float32)
    return lambda: runner.infer(x)


def _unreadable(path: str, why: str) -> MarsvisionError:
    # timing it would count a file that was not classified as classified
    return MarsvisionError(f"--images: {path} cannot be classified ({why}); give readable images")


def _torch_e2e_call(runner: Any, job: Job) -> Any:
    import torch
    from PIL import Image

    from marsvision.runtime.preprocess import raster_formats, to_rgb
    from marsvision.train.transforms import eval_transform

    tf = eval_transform(runner.meta.preprocess)
    batches = _batches(job.images, job.batch)

    def call() -> Any:
        xs = []
        for p in next(batches):
            try:
                with Image.open(p, formats=raster_formats()) as img:
                    xs.append(tf(to_rgb(img)))  # mars-infer's decoding
            except Exception as e:  # noqa: BLE001 (Pillow raises many kinds)
                raise _unreadable(p, f"{type(e).__name__}: {e}") from None
        return torch.softmax(runner.forward(torch.stack(xs)), dim=1).cpu().numpy()

    return call


def run_job(job: Job) -> dict[str, Any]:
    """Measure one job in this process; returns its result row (status "ok" or why not). The
    runner is closed before it returns (a PyTorch runner puts back torch's thread count)."""
    row = job.row()
    rss_before = current_rss_mib()
    with contextlib.ExitStack() as opened:
        try:
            if job.mode == "e2e" and job.backend not in TORCH_BACKENDS:
                from marsvision.runtime.classifier import Classifier

                clf = opened.enter_context(
                    Classifier(
                        job.model,
                        backend=job.backend,
                        device=job.device,
                        batch_size=job.batch,
                        threads=job.threads,
                    )
                )
                runner = clf.runner
                batches = _batches(job.images, job.batch)

                def call() -> object:
                    predictions = clf.predict(next(batches))
                    for p in predictions:
                        if not p.ok:
                            raise _unreadable(p.path, p.error)
                    return predictions

            else:
                runner = opened.enter_context(_open_runner(job))
                call = (
                    _torch_e2e_call(runner, job) if job.mode == "e2e" else _model_call(runner, job)
                )
        except MarsvisionError as e:
            return {**row, "status": f"skipped: {e.message}"}
        sync = getattr(runner, "synchronize", None)
        reset = getattr(runner, "reset_peak_memory", None)
        if reset:
            reset()
        try:
            timing: Timing = time_calls(call, warmup=job.warmup, repeats=job.repeats, sync=sync)
        except MarsvisionError as e:
            return {**row, "status": f"error: {e.message}"}
        # One probe for every backend, so that the column compares like with like: what
        # nvidia-smi says this process holds after its calls (the CUDA context, allocator caches,
        # the model). PyTorch's peak of its own tensors (a fraction of that) is kept beside it:
        # it stood in the same column, and made PyTorch look the leanest.
        tensor_peak = runner.peak_gpu_mib() if hasattr(runner, "peak_gpu_mib") else None
        gpu_used = _gpu_used_mib(os.getpid()) if job.device == "cuda" else None
        return {
            **row,
            "status": "ok",
            "runner": runner.name,
            "input_size": runner.meta.preprocess.input_size,
            "model_precision": runner.meta.precision,
            "timing": timing.to_dict(),
            "throughput_img_s": job.batch * 1e3 / timing.mean_ms,
            # a batch's mean time shared over its images: above batch 1 not any image's
            # latency (each waits for its whole batch: mean_ms)
            "mean_ms_per_img": timing.mean_ms / job.batch,
            "peak_rss_mib": peak_rss_mib(),
            "rss_before_mib": rss_before,
            "gpu_mem_mib": gpu_used,
            "gpu_tensor_peak_mib": tensor_peak,
            "torch_imported": "torch" in sys.modules,
        }


# The job's process: `python -m` put the working folder first on the import path, so a
# `numpy.py` (or any module's name) in the folder mars-bench ran in was imported and run in the
# child; `-c` puts it there too (as ''), which is dropped (unless -P or PYTHONSAFEPATH did).
_CHILD = (
    "import runpy, sys\n"
    "if not getattr(sys.flags, 'safe_path', False) and sys.path[:1] == ['']:\n"
    "    del sys.path[0]\n"
    "runpy.run_module('marsvision.benchmarks.speed_jobs', run_name='__main__', alter_sys=True)\n"
)


def run_job_isolated(job: Job, *, timeout: float = 3600) -> dict[str, Any]:
    """Run one job in a fresh Python process, so that its peak RSS is its own. A job that fails
    or outlives `timeout` seconds (a hung GPU driver, an engine build that never ends) becomes an
    error row, and the other rows are still measured."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD],
            input=json.dumps(job.to_dict()),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {**job.row(), "status": f"error: timed out after {timeout:g} s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {**job.row(), "status": f"error: {tail[0]}"}
    return dict(json.loads(proc.stdout))


def _main() -> None:
    d = json.load(sys.stdin)
    d["images"] = tuple(d.get("images", ()))
    json.dump(run_job(Job(**d)), sys.stdout)


if __name__ == "__main__":
    _main()
