"""TensorRT engines: refusal of foreign engines (runs anywhere), and a real engine (GPU only)."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from marsvision.runtime.backends import load_model_meta, open_runner
from marsvision.runtime.backends.tensorrt import check_compatible
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.metadata import ModelMeta, sidecar_path
from marsvision.runtime.spec import PreprocessSpec


def _meta(**trt: object) -> ModelMeta:
    return ModelMeta(
        task="binary",
        class_names=["Surface", "Rover"],
        preprocess=PreprocessSpec.for_input_size(64),
        precision="fp16",
        tensorrt={"version": "10.13.0.35", "compute_capability": "9.0", "gpu_name": "H100", **trt},
    )


def test_engine_needs_its_sidecar(tmp_path: Path) -> None:
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"serialized engine")
    with pytest.raises(MarsvisionError, match="sidecar"):
        load_model_meta(plan)
    sidecar_path(plan).write_text(_meta().to_json())
    assert load_model_meta(plan).tensorrt == _meta().tensorrt
    with pytest.raises(MarsvisionError, match="onnxruntime cannot run"):
        open_runner(plan, backend="onnxruntime")
    with pytest.raises(MarsvisionError, match="needs a GPU"):
        open_runner(plan, device="cpu")
    if _gpu_trt_reason():  # no TensorRT or no GPU here: a one-line error, not a traceback
        with pytest.raises(MarsvisionError, match="marsvision\\[trt\\]|CUDA error"):
            open_runner(plan)
    no_trt = dataclasses.replace(_meta(), tensorrt=None)
    sidecar_path(plan).write_text(no_trt.to_json())
    with pytest.raises(MarsvisionError, match="no 'tensorrt' section"):
        load_model_meta(plan)


def test_foreign_engines_are_refused() -> None:
    meta, p = _meta(), Path("m.plan")
    check_compatible(meta, p, "10.13.0.35", "9.0")
    with pytest.raises(MarsvisionError, match="TensorRT 10.13.0.35, this is TensorRT 10.9.0.34"):
        check_compatible(meta, p, "10.9.0.34", "9.0")
    with pytest.raises(MarsvisionError, match="compute capability 9.0 .*has 8.6: re-export"):
        check_compatible(meta, p, "10.13.0.35", "8.6")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # a stub-only or broken install counts as absent
        return False
    return True


def _gpu_trt_reason() -> str | None:
    """Why the real-engine test cannot run here, or None when it can."""
    trt_ok = _importable("tensorrt") and hasattr(sys.modules["tensorrt"], "Runtime")
    if not (trt_ok and _importable("cuda.bindings.runtime")):
        return "needs the tensorrt and cuda-python packages"
    from cuda.bindings import runtime as cudart

    err, n = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or n == 0:
        return "needs an NVIDIA GPU"
    return None


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_runner_matches_onnxruntime(
    tiny_checkpoint: Path, tiny_models: dict[str, Path], tmp_path: Path, msl_dir: Path
) -> None:
    """An FP16 engine from mars-export, served by the runtime, agrees with ORT FP32."""
    reason = _gpu_trt_reason()
    if reason:
        pytest.skip(reason)
    from marsvision.export.config import ExportConfig
    from marsvision.export.pipeline import export_all
    from marsvision.runtime.models import artifact_name
    from marsvision.runtime.preprocess import load_image
    from marsvision.train.data import read_split

    export_all(
        ExportConfig(
            checkpoint=tiny_checkpoint, out=tmp_path, fp16=True, tensorrt="on", max_batch=8,
            data_dir=msl_dir,
        )
    )  # fmt: skip
    plan = tmp_path / artifact_name("binary", "fp16-engine")
    engine_meta = load_model_meta(plan)
    onnx_path = tiny_models["fp32"]
    meta = load_model_meta(onnx_path)
    paths = [s.path for s in read_split(msl_dir, "val", "binary", limit=11)]
    x = np.stack([load_image(p, meta.preprocess) for p in paths])
    with open_runner(onnx_path, "onnxruntime", "cpu") as ort_runner:
        ref = ort_runner.infer(x)
    with open_runner(plan) as runner:
        assert runner.name == "tensorrt"
        got = runner.infer(x)  # 11 > max batch 8: split in two
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=5e-2, rtol=5e-2)
        np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))
    assert engine_meta.tensorrt is not None
    stale = dataclasses.replace(engine_meta, tensorrt={**engine_meta.tensorrt, "version": "9.0"})
    sidecar_path(plan).write_text(stale.to_json())
    with pytest.raises(MarsvisionError, match="re-export"):
        open_runner(plan)


class _FakeCudart:
    """The few cuda.bindings.runtime calls TensorRTRunner makes, with (err, value) tuples as the
    real bindings return; `fail_malloc_at` makes the n-th cudaMalloc (1-based) fail."""

    class cudaError_t:  # the real enum's name
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    def __init__(self, fail_malloc_at: int | None = None) -> None:
        self.fail_malloc_at = fail_malloc_at
        self.mallocs = 0
        self.live: set[int] = set()  # device pointers and streams not yet freed
        self._next = 0x1000

    def _handle(self) -> int:
        self._next += 0x100
        self.live.add(self._next)
        return self._next

    def cudaGetErrorString(self, err: int) -> tuple[int, bytes]:
        oom = err == self.cudaError_t.cudaErrorMemoryAllocation
        return 0, b"cudaErrorMemoryAllocation" if oom else b"unknown"

    def cudaStreamCreate(self) -> tuple[int, int]:
        return 0, self._handle()

    def cudaMalloc(self, size: int) -> tuple[int, int | None]:
        self.mallocs += 1
        if self.mallocs == self.fail_malloc_at:
            return self.cudaError_t.cudaErrorMemoryAllocation, None
        return 0, self._handle()

    def cudaFree(self, ptr: int) -> tuple[int]:
        self.live.remove(ptr)
        return (0,)

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:
        self.live.remove(stream)
        return (0,)


def _fake_trt(
    meta: ModelMeta,
    *,
    refuse_address: str | None = None,
    size: int | None = None,
    classes: int | None = None,
) -> object:
    """A tensorrt module whose engine has the metadata's two tensors and a max batch of 8 (and
    whose context refuses a device address for the tensor `refuse_address`; an engine of
    another input `size` or number of `classes` than the metadata's where given)."""
    from types import SimpleNamespace

    data_type = SimpleNamespace(FLOAT="float", HALF="half")
    modes = SimpleNamespace(INPUT="input", OUTPUT="output")
    size = size or meta.preprocess.input_size
    names = [meta.input_name, meta.output_name]
    profile = [(1, 3, size, size), (8, 3, size, size), (8, 3, size, size)]  # min, opt, max
    context = SimpleNamespace(set_tensor_address=lambda name, ptr: name != refuse_address)
    engine = SimpleNamespace(
        num_io_tensors=2,
        get_tensor_name=names.__getitem__,
        get_tensor_dtype=lambda name: data_type.HALF,
        get_tensor_mode=lambda name: modes.INPUT if name == meta.input_name else modes.OUTPUT,
        get_tensor_shape=lambda name: (-1, classes or meta.num_classes),  # the output's
        get_tensor_profile_shape=lambda name, i: profile,
        create_execution_context=lambda: context,
    )
    runtime = SimpleNamespace(deserialize_cuda_engine=lambda blob: engine)

    class Logger:  # trt.Logger(trt.Logger.WARNING)
        WARNING = "warning"

        def __init__(self, level: str) -> None:
            self.level = level

    return SimpleNamespace(
        __version__="10.13.0.35",
        DataType=data_type,
        TensorIOMode=modes,
        Logger=Logger,
        Runtime=lambda log: runtime,
    )


@pytest.mark.parametrize("fail_malloc_at", [None, 1, 2])
def test_runner_frees_its_buffers_when_opening_fails_part_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_malloc_at: int | None
) -> None:
    """Out of GPU memory at the input or the output buffer: a one-line error, and the stream and
    any buffer already allocated are freed (TensorRT's own objects are faked, runs anywhere)."""
    import marsvision.runtime.backends.tensorrt as trt_backend

    meta = _meta()
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"serialized engine")
    sidecar_path(plan).write_text(meta.to_json())
    cudart = _FakeCudart(fail_malloc_at)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt(meta))
    monkeypatch.setattr(trt_backend, "_import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_backend, "running_gpu", lambda: ("H100", "9.0"))
    if fail_malloc_at is None:
        with trt_backend.TensorRTRunner(plan) as runner:
            assert runner.max_batch == 8
            assert len(cudart.live) == 3  # a stream and two buffers
        assert not cudart.live
        runner.close()  # a second close frees nothing twice
        return
    in_bytes = 8 * 3 * 64 * 64 * 2  # fp16 input
    out_bytes = 8 * 2 * 2
    failed = in_bytes if fail_malloc_at == 1 else out_bytes
    oom = f"cudaMalloc\\({failed} bytes\\): cudaErrorMemoryAllocation"
    with pytest.raises(MarsvisionError, match=oom):
        trt_backend.TensorRTRunner(plan)
    assert cudart.mallocs == fail_malloc_at
    assert not cudart.live


def test_runner_refused_a_buffer_address_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """set_tensor_address says False where TensorRT refuses an address: it was ignored, and the
    run failed later as "TensorRT execution failed"."""
    import marsvision.runtime.backends.tensorrt as trt_backend

    meta = _meta()
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"serialized engine")
    sidecar_path(plan).write_text(meta.to_json())
    cudart = _FakeCudart(None)
    fake = _fake_trt(meta, refuse_address=meta.output_name)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_backend, "_import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_backend, "running_gpu", lambda: ("H100", "9.0"))
    with pytest.raises(
        MarsvisionError, match=f"TensorRT refused the device buffer of {meta.output_name!r}"
    ):
        trt_backend.TensorRTRunner(plan)
    assert not cudart.live  # the stream and both buffers freed


def test_an_engine_of_other_shapes_than_its_sidecar_is_refused_before_buffers_are_sized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device buffers are sized by the sidecar's input size and classes: an engine beside
    another export's sidecar would have TensorRT read and write past them."""
    import marsvision.runtime.backends.tensorrt as trt_backend

    meta = _meta()
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"serialized engine")
    sidecar_path(plan).write_text(meta.to_json())
    cudart = _FakeCudart(None)
    monkeypatch.setattr(trt_backend, "_import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_backend, "running_gpu", lambda: ("H100", "9.0"))
    for fake, says in ((_fake_trt(meta, size=128), "takes (n, 3, 128, 128)"),
                       (_fake_trt(meta, classes=25), "(n, 25)")):  # fmt: skip
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        with pytest.raises(MarsvisionError, match=r"the engine .*; its sidecar says") as e:
            trt_backend.TensorRTRunner(plan)
        assert says in str(e.value) and "(n, 3, 64, 64) and (n, 2)" in str(e.value)
        assert cudart.mallocs == 0 and not cudart.live


def test_runner_runs_one_call_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One execution context, stream and pair of device buffers served every call: two threads
    of one Classifier could run one's batch on the other's input, and close() freed the buffers
    under a call. Calls take turns, and a closed runner says so (TensorRT faked)."""
    import threading
    import time
    from types import SimpleNamespace

    import marsvision.runtime.backends.tensorrt as trt_backend

    meta = _meta()
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"serialized engine")
    sidecar_path(plan).write_text(meta.to_json())
    cudart: Any = _FakeCudart(None)
    busy, overlaps = [0], [0]

    def execute(stream: int) -> bool:
        busy[0] += 1
        overlaps[0] += busy[0] > 1
        time.sleep(0.01)
        busy[0] -= 1
        return True

    fake: Any = _fake_trt(meta)
    context = fake.Runtime(None).deserialize_cuda_engine(b"").create_execution_context()
    context.set_input_shape = lambda name, shape: True
    context.execute_async_v3 = execute
    cudart.cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudart.cudaMemcpyAsync = lambda *args: (0,)
    cudart.cudaStreamSynchronize = lambda stream: (0,)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_backend, "_import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_backend, "running_gpu", lambda: ("H100", "9.0"))
    runner = trt_backend.TensorRTRunner(plan)
    x = np.zeros((2, 3, 64, 64), np.float32)
    threads = [threading.Thread(target=lambda: [runner.infer(x) for _ in range(10)])
               for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert overlaps[0] == 0 and busy[0] == 0
    with pytest.raises(ValueError, match=r"a batch of shape \(2, 64, 64, 3\); the model takes"):
        runner.infer(np.zeros((2, 64, 64, 3), np.float32))  # NHWC: the caller's mistake
    # an empty batch has no rows, as on onnxruntime (it was "need at least one array")
    assert runner.infer(x[:0]).shape == (0, meta.num_classes)
    runner.close()
    assert not cudart.live
    with pytest.raises(ValueError, match="is closed"):
        runner.infer(x)
