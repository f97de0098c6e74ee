"""Artifact file names, and the model mars-infer uses when none is named: the export of the
shipped binary model in ./exports (mars-export's default --out) that suits this machine best."""

from __future__ import annotations

import os
from pathlib import Path

from marsvision.runtime.errors import MarsvisionError

DEFAULT_TASK = "binary"
EXPORTS_ENV = "MARS_EXPORTS"  # where to look instead of ./exports
# flavour -> file suffix after `resnet50-<task>`
SUFFIXES = {
    "fp32": ".fp32.onnx",
    "fp16": ".fp16.onnx",
    "int8-cpu": ".int8-cpu.onnx",
    "int8-trt": ".int8-trt.onnx",
    "fp16-engine": ".fp16.plan",
    "int8-engine": ".int8.plan",
}


def artifact_name(task: str, flavour: str) -> str:
    """File name of one artifact, e.g. `resnet50-binary.int8-cpu.onnx`."""
    return f"resnet50-{task}{SUFFIXES[flavour]}"


def _has_tensorrt() -> bool:
    """The TensorRT backend's own test of an install (type stubs alone do not count)."""
    from marsvision.runtime.backends.tensorrt import _import_trt

    try:
        _import_trt()
    except MarsvisionError:
        return False
    return True


def _has_cuda_onnxruntime() -> bool:
    from marsvision.runtime.backends.onnxruntime import _EP, _ort

    try:
        return _EP["cuda"] in _ort().get_available_providers()
    except MarsvisionError:
        return False


def preferred_flavours() -> list[str]:
    """Artifact flavours, best first, for this machine: TensorRT engines where TensorRT is
    installed, FP16 ONNX where onnxruntime has CUDA, else the x86 INT8 and FP32 ONNX."""
    order = []
    if _has_tensorrt():
        order += ["int8-engine", "fp16-engine"]
    if _has_cuda_onnxruntime():
        order += ["fp16"]
    return order + ["int8-cpu", "fp32"]


def default_model(exports: str | os.PathLike[str] | None = None, task: str = DEFAULT_TASK) -> Path:
    """The best existing export of `task` in `exports` (default: $MARS_EXPORTS, else ./exports)."""
    folder = Path(exports if exports is not None else os.environ.get(EXPORTS_ENV) or "exports")
    flavours = preferred_flavours()
    for flavour in flavours:
        path = folder / artifact_name(task, flavour)
        if path.is_file():
            return path
    raise MarsvisionError(
        f"no --engine given and no exported {task} model in {folder}/ "
        f"(looked for {', '.join(artifact_name(task, f) for f in flavours)}): run "
        "`mars-export --int8` first (it exports the shipped model into exports/), or pass "
        "--engine MODEL"
    )
