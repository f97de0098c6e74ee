"""Inference backends behind one small interface (see `base.Runner`), and how to pick one.

A model path names its kind by suffix: `.onnx` files run on ONNX Runtime (CPU, CUDA or, with
`backend="tensorrt"`, its TensorRT execution provider); `.plan` / `.engine` / `.trt` files are
serialized TensorRT engines with a `.json` sidecar, run on the TensorRT Python API.
"""

from __future__ import annotations

import os
from pathlib import Path

from marsvision.runtime.backends.base import Runner
from marsvision.runtime.errors import MarsvisionError, check_count
from marsvision.runtime.metadata import ModelMeta

BACKENDS = ("auto", "onnxruntime", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")

__all__ = ["BACKENDS", "DEVICES", "Runner", "is_engine", "load_model_meta", "open_runner"]


def is_engine(model_path: str | os.PathLike[str]) -> bool:
    """True for a serialized TensorRT engine (by suffix), False for an ONNX file."""
    return Path(model_path).suffix.lower() in ENGINE_SUFFIXES


def _check_exists(p: Path) -> None:
    if not p.exists():
        raise MarsvisionError(f"model {p} not found: give an .onnx file or a TensorRT .plan")
    if p.is_dir():  # an export folder: name the models in it
        found = sorted(
            q.name for q in p.iterdir() if q.suffix.lower() in (".onnx", *ENGINE_SUFFIXES)
        )
        inside = (
            f" (in it: {', '.join(found[:4])}{', ...' if len(found) > 4 else ''})" if found else ""
        )
        raise MarsvisionError(
            f"model {p} is a folder: give one .onnx file or TensorRT .plan{inside}"
        )
    if not p.is_file():
        raise MarsvisionError(f"model {p} is not a file: give an .onnx file or a TensorRT .plan")
    if p.stat().st_size == 0:
        raise MarsvisionError(f"model {p} is empty (0 bytes): re-export it with mars-export")
    if not os.access(p, os.R_OK):  # onnxruntime said "system error number 13; re-export it"
        raise MarsvisionError(f"model {p} cannot be read (permission denied)")


def load_model_meta(model_path: str | os.PathLike[str]) -> ModelMeta:
    """The metadata of an ONNX file or TensorRT engine, without loading it for inference."""
    p = Path(model_path)
    _check_exists(p)
    if is_engine(p):
        from marsvision.runtime.backends.tensorrt import meta_from_engine

        return meta_from_engine(p)
    from marsvision.runtime.backends.onnxruntime import meta_from_onnx

    return meta_from_onnx(p)


def open_runner(
    model_path: str | os.PathLike[str],
    backend: str = "auto",
    device: str = "auto",
    *,
    threads: int | None = None,
) -> Runner:
    """Load a model on the chosen backend and device; a mismatch is a one-line user error."""
    check_count("threads", threads, default=True)
    if backend not in BACKENDS:
        raise MarsvisionError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise MarsvisionError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    p = Path(model_path)
    _check_exists(p)
    if is_engine(p):
        if backend == "onnxruntime":
            raise MarsvisionError(
                f"{p} is a TensorRT engine, which onnxruntime cannot run: use --backend tensorrt "
                "(or auto), or pass the .onnx file"
            )
        from marsvision.runtime.backends.tensorrt import TensorRTRunner

        return TensorRTRunner(p, device=device)
    if backend == "tensorrt" and device == "cpu":
        raise MarsvisionError("TensorRT needs a GPU: use --device cuda, or --backend onnxruntime")
    from marsvision.runtime.backends.onnxruntime import OnnxRuntimeRunner

    ort_backend = "tensorrt" if backend == "tensorrt" else "onnxruntime"
    return OnnxRuntimeRunner(p, device=device, backend=ort_backend, threads=threads)
