"""TensorRT engines: refusal of foreign engines (runs anywhere), and a real engine (GPU only)."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

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
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, msl_dir: Path
) -> None:
    reason = _gpu_trt_reason()
    if reason:
        pytest.skip(reason)
    import tensorrt as trt
    from marsvision.runtime.backends.tensorrt import running_gpu
    from marsvision.runtime.preprocess import load_image
    from marsvision.train.data import read_split
    from test_runtime_models import runtime_models

    onnx_path = runtime_models(tiny_checkpoint, tmp_path_factory.mktemp("models"), msl_dir)["fp32"]
    meta = load_model_meta(onnx_path)
    size = meta.preprocess.input_size
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 3, size, size), (4, 3, size, size), (8, 3, size, size))
    config.add_optimization_profile(profile)
    plan = tmp_path_factory.mktemp("trt") / "tiny.fp32.plan"
    plan.write_bytes(bytes(builder.build_serialized_network(network, config)))
    gpu, cc = running_gpu()
    engine_meta = dataclasses.replace(
        meta,
        tensorrt={
            "version": trt.__version__,
            "compute_capability": cc,
            "gpu_name": gpu,
            "max_batch": 8,
        },
    )
    sidecar_path(plan).write_text(engine_meta.to_json())

    paths = [s.path for s in read_split(msl_dir, "val", "binary", limit=11)]
    x = np.stack([load_image(p, meta.preprocess) for p in paths])
    with open_runner(onnx_path, "onnxruntime", "cpu") as ort_runner:
        ref = ort_runner.infer(x)
    with open_runner(plan) as runner:
        assert runner.name == "tensorrt"
        got = runner.infer(x)  # 11 > max batch 8: split in two
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=2e-2, rtol=2e-2)
        np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))
    stale = dataclasses.replace(engine_meta, tensorrt={**engine_meta.tensorrt, "version": "9.0"})
    sidecar_path(plan).write_text(stale.to_json())
    with pytest.raises(MarsvisionError, match="re-export"):
        open_runner(plan)
