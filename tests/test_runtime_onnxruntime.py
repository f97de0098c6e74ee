"""The ONNX Runtime backend (runtime/backends/onnxruntime.py): provider lists, the CUDA
check, float16 inputs and the environment switches, cases the mutation audit found
unchecked. GPU providers are faked on the CPU build."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from marsvision.runtime.errors import MarsvisionError

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


def _available(monkeypatch: pytest.MonkeyPatch, providers: list[str]) -> None:
    from marsvision.runtime.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend.ort_module(), "get_available_providers", lambda: providers)


def test_gpu_providers_keep_the_cpu_provider_behind_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU provider runs what a GPU provider does not support; without it such a graph
    fails to load on the GPU."""
    from marsvision.runtime.backends.onnxruntime import providers_for

    _available(monkeypatch, [TRT, CUDA, CPU])
    assert providers_for("cpu") == [CPU]
    assert providers_for("cuda") == [CUDA, CPU]
    assert providers_for("auto") == [CUDA, CPU]
    assert providers_for("auto", "tensorrt") == [TRT, CUDA, CPU]


def test_auto_device_without_tensorrt_is_refused_not_run_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--backend tensorrt on an onnxruntime without the TensorRT provider: refused, also on
    --device auto (which falls back to the CPU for --backend onnxruntime alone); rows named
    tensorrt must not be the CPU's."""
    from marsvision.runtime.backends.onnxruntime import providers_for

    _available(monkeypatch, [CPU])
    assert providers_for("auto") == [CPU]
    with pytest.raises(MarsvisionError, match=f"has no {TRT}, {CUDA} .*--backend onnxruntime"):
        providers_for("auto", "tensorrt")


def test_cuda_asked_for_and_not_started_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--device cuda where the session came up on the CPU alone (no GPU, a driver too old):
    refused, not run on the CPU as onnxruntime-cpu."""
    from test_runtime_models import _graph, _ProvidersSession

    from marsvision.runtime.backends import onnxruntime as ort_backend

    real = ort_backend.ort_module().InferenceSession
    started = [CPU]

    def session(model: Any, sess_options: Any = None, providers: Any = None, **kw: Any) -> Any:
        return _ProvidersSession(real, model, sess_options, started)

    monkeypatch.setattr(ort_backend.ort_module(), "InferenceSession", session)
    monkeypatch.setattr(ort_backend, "providers_for", lambda device, backend: [CUDA, CPU])
    path = _graph(tmp_path / "m.onnx")
    with pytest.raises(MarsvisionError, match=r"could not start CUDA .*\['CPUExecutionProvider'\]"):
        ort_backend.OnnxRuntimeRunner(path, device="cuda")
    started = [CUDA, CPU]
    assert ort_backend.OnnxRuntimeRunner(path, device="cuda").name == "onnxruntime-cuda"


def test_a_float16_input_is_fed_float16(tmp_path: Path) -> None:
    """A model whose input is float16 (an FP16 export with FP16 inputs) gets the float32
    batches the classifier makes, cast: onnxruntime refuses a float32 tensor there."""
    from onnx import TensorProto
    from test_runtime_models import _graph

    from marsvision.runtime.backends.onnxruntime import OnnxRuntimeRunner

    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    with OnnxRuntimeRunner(_graph(tmp_path / "fp32.onnx"), device="cpu") as fp32:
        want = fp32.infer(x)
    path = _graph(tmp_path / "fp16.onnx", elem=TensorProto.FLOAT16)
    with OnnxRuntimeRunner(path, device="cpu") as fp16:
        got = fp16.infer(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3)


def test_an_empty_exact_int8_variable_is_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """`export MARSVISION_EXACT_INT8=` (set, empty) is the default, as the docstring says."""
    from marsvision.runtime.backends import onnxruntime as backend

    for value in ("", " ", "AUTO"):
        monkeypatch.setenv(backend.EXACT_INT8_ENV, value)
        for saturate in (True, False):
            monkeypatch.setattr(backend, "int8_sums_saturate", lambda s=saturate: s)
            assert backend.exact_int8_default() is saturate


def test_a_users_telemetry_choice_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from marsvision.runtime.backends.onnxruntime import no_telemetry

    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")
    no_telemetry()
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "0"
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY")
    no_telemetry()
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"
