"""The PyTorch eager reference: the checkpoint's model behind the same `infer` as the runtime.

FP32 eager is the baseline every other figure is divided by; bf16/fp16 autocast and
channels_last are its usual cheap speed-ups. This is the only benchmark module that imports
torch (lazily, when a runner is made), so the rest works where torch is absent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from marsvision.runtime.errors import MarsvisionError, require_extra
from marsvision.runtime.metadata import ModelMeta, sha256_file

if TYPE_CHECKING:
    from torch import nn

TORCH_PRECISIONS = ("fp32", "fp16", "bf16")


def _torch() -> Any:
    require_extra("the PyTorch baseline", "train", "torch")
    import torch

    return torch


class TorchRunner:
    """A checkpoint's ResNet-50 in eager PyTorch, with optional autocast and channels_last."""

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        *,
        precision: str = "fp32",
        device: str = "cpu",
        channels_last: bool = False,
        threads: int | None = None,
    ) -> None:
        torch = _torch()
        from marsvision.train.checkpoint import (
            load_checkpoint,
            model_from_checkpoint,
            preprocess_from_checkpoint,
        )
        from marsvision.train.device import select_device

        if precision not in TORCH_PRECISIONS:
            raise MarsvisionError(
                f"PyTorch baseline precision {precision!r}: choose one of "
                + ", ".join(TORCH_PRECISIONS)
            )
        self.device = select_device(device).type
        if precision == "fp16" and self.device == "cpu":
            raise MarsvisionError("fp16 autocast is for GPUs; on CPU use bf16 or fp32")
        ckpt = load_checkpoint(checkpoint)
        model = model_from_checkpoint(ckpt).to(self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model: nn.Module | None = model.to(memory_format=self.memory_format)
        self.precision = precision
        self._autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        n = len(ckpt["class_names"])
        spec = preprocess_from_checkpoint(ckpt)
        s = spec.input_size
        self.meta = ModelMeta(
            task=ckpt["task"],
            class_names=list(ckpt["class_names"]),
            preprocess=spec,
            precision="fp16" if precision == "fp16" else "fp32",
            input_shape=["batch", 3, s, s],
            output_shape=["batch", n],
            source_checkpoint_sha256=sha256_file(checkpoint),
            versions=dict(ckpt.get("versions", {})),
            decision_threshold=ckpt.get("decision_threshold"),
        )
        layout = "-channels_last" if channels_last else ""
        self.name = f"pytorch-{self.device}{layout}"
        self.library = f"torch {torch.__version__}"  # the Runner interface's provenance
        self._torch = torch
        # Process-wide settings, changed last (nothing after can fail) and put back by close().
        self._restore: list[Callable[[], None]] = []
        if threads:
            before = torch.get_num_threads()
            self._restore.append(lambda: torch.set_num_threads(before))
            torch.set_num_threads(threads)
        if precision == "fp32" and self.device == "cuda":
            # True FP32: PyTorch lets cuDNN convolutions use TF32 by default.
            flags = (torch.backends.cudnn, torch.backends.cuda.matmul)
            tf32 = [f.allow_tf32 for f in flags]

            def put_back_tf32() -> None:
                for f, v in zip(flags, tf32, strict=True):
                    f.allow_tf32 = v

            self._restore.append(put_back_tf32)
            for f in flags:
                f.allow_tf32 = False

    def __enter__(self) -> TorchRunner:  # noqa: PYI034 - as runtime's runners
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the model and put back torch's thread count and TF32 flags as they were
        before this runner (a process that goes on, a notebook or a test session, keeps its
        own). Safe to call twice."""
        self.model = None
        while self._restore:
            self._restore.pop()()

    def forward(self, x: Any) -> Any:
        """Tensor in -> float32 logits tensor out (on the runner's device)."""
        torch, model = self._torch, self.model
        if model is None:
            raise ValueError("the PyTorch runner is closed")
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            if self._autocast_dtype is None:
                return model(x).float()
            with torch.autocast(device_type=self.device, dtype=self._autocast_dtype):
                return model(x).float()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW batch -> float32 logits (batch, num_classes), host to host."""
        out = self.forward(self._torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        return np.asarray(out.cpu().numpy(), dtype=np.float32)

    def synchronize(self) -> None:
        """Wait for queued GPU work (a no-op on CPU)."""
        if self.device == "cuda":
            self._torch.cuda.synchronize()

    def reset_peak_memory(self) -> None:
        """Start a fresh GPU peak-memory window (a no-op on CPU)."""
        if self.device == "cuda":
            self._torch.cuda.reset_peak_memory_stats()

    def peak_gpu_mib(self) -> float | None:
        """torch.cuda.max_memory_allocated since the last reset, in MiB; None on CPU."""
        if self.device != "cuda":
            return None
        return float(self._torch.cuda.max_memory_allocated()) / (1024 * 1024)


def reference_logits(
    checkpoint: str | os.PathLike[str],
    paths: list[Path],
    *,
    batch_size: int = 32,
    device: str = "cpu",
    threads: int | None = None,
) -> tuple[np.ndarray, float]:
    """Logits of the checkpoint on image files, preprocessed by train's eval_transform.

    Returns (float32 logits (n, num_classes), seconds spent in forward passes).
    """
    import time

    torch = _torch()
    from marsvision.train.images import open_rgb
    from marsvision.train.transforms import eval_transform

    chunks = []
    seconds = 0.0
    with TorchRunner(checkpoint, device=device, threads=threads) as runner:
        tf = eval_transform(runner.meta.preprocess)  # the checkpoint's, as the runner read it
        for i in range(0, len(paths), batch_size):
            # mars-infer's decoding, as training's; an unreadable image is one line naming it
            x = torch.stack([tf(open_rgb(p)) for p in paths[i : i + batch_size]])
            if i == 0:  # one untimed warm-up pass (allocations, kernel selection)
                runner.forward(x)
                runner.synchronize()
            t0 = time.perf_counter()
            logits = runner.forward(x)
            runner.synchronize()
            seconds += time.perf_counter() - t0
            chunks.append(logits.cpu().numpy().astype(np.float32))
    return np.concatenate(chunks), seconds
