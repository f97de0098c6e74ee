"""Test models for the runtime tests: ONNX FP32 and INT8 from the tiny checkpoint, and checks.

Other runtime test modules import `runtime_models(...)` and `load_ckpt(...)` from here. FP32
comes from the exporter's `onnx_from_checkpoint` (marsvision.export.onnx_fp32) when it works,
else from a plain torch.onnx export; INT8 from onnxruntime's static QDQ quantization (uint8
activations, per-channel int8 weights, as the `int8-cpu` flavour). The metadata is attached
under `metadata_props["marsvision"]`. Models are built once per test session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

_CACHE: dict[str, dict[str, Path]] = {}


def _meta_for(ckpt: dict[str, Any], precision: str, quantization: dict[str, Any] | None) -> str:
    from marsvision.runtime.metadata import ModelMeta
    from marsvision.train.checkpoint import library_versions, preprocess_from_checkpoint

    spec = preprocess_from_checkpoint(ckpt)
    return ModelMeta(
        task=ckpt["task"],
        class_names=list(ckpt["class_names"]),
        preprocess=spec,
        precision=precision,
        input_shape=["batch", 3, spec.input_size, spec.input_size],
        output_shape=["batch", len(ckpt["class_names"])],
        quantization=quantization,
        source_checkpoint_sha256="test",
        versions=library_versions(),
    ).to_json()


def _attach(path: Path, meta_json: str) -> None:
    import onnx

    from marsvision.runtime.metadata import METADATA_KEY

    m = onnx.load(str(path))
    del m.metadata_props[:]
    m.metadata_props.add(key=METADATA_KEY, value=meta_json)
    onnx.save(m, str(path))


def _fp32_fallback(ckpt_path: Path, out: Path) -> None:
    import torch

    from marsvision.train.checkpoint import model_from_checkpoint

    ckpt = load_ckpt(ckpt_path)
    model = model_from_checkpoint(ckpt)
    size = ckpt["preprocess"]["input_size"]
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, size, size),),
        str(out),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    _attach(out, _meta_for(ckpt, "fp32", None))


def _int8_fallback(ckpt_path: Path, fp32: Path, out: Path, images: list[Path]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from marsvision.runtime.metadata import ModelMeta
    from marsvision.runtime.preprocess import load_image

    ckpt = load_ckpt(ckpt_path)
    meta = ModelMeta.from_json(_meta_for(ckpt, "fp32", None))
    batches = [{"input": load_image(p, meta.preprocess)[None]} for p in images]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Fold the exporter's Identity-fed conv biases into initializers, so that every Conv
    # becomes a fused integer QLinearConv in onnxruntime (else it stays a float Conv).
    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    q = {
        "activations": "uint8",
        "weights": "int8",
        "per_channel": True,
        "symmetric": False,
        "method": "minmax",
        "images": len(images),
        "source": "train split",
        "target": "cpu",
    }
    pre.unlink()
    _attach(out, _meta_for(ckpt, "int8", q))


def load_ckpt(path: Path) -> dict[str, Any]:
    """train.checkpoint.load_checkpoint, allowing torch's TorchVersion in the versions dict."""
    import torch

    from marsvision.train.checkpoint import load_checkpoint

    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
        return load_checkpoint(path)


def _try_exporter(ckpt_path: Path, out: Path, images: list[Path]) -> bool:
    """Export FP32 with marsvision.export when it is there and its API fits; False otherwise."""
    try:
        from marsvision.export.onnx_fp32 import fp32_meta, onnx_from_checkpoint
        from marsvision.runtime.preprocess import load_image

        ckpt = load_ckpt(ckpt_path)
        meta = fp32_meta(ckpt, "test")
        batch = np.stack([load_image(p, meta.preprocess) for p in images[:4]])
        onnx_from_checkpoint(ckpt, out, meta=meta, parity_batch=batch)
    except Exception:
        return False
    return out.is_file()


def runtime_models(ckpt_path: Path, out_dir: Path, msl_dir: Path) -> dict[str, Path]:
    """{"fp32": .onnx, "int8": .int8-cpu.onnx} for the tiny checkpoint, built once per session."""
    key = str(ckpt_path)
    if key in _CACHE:
        return _CACHE[key]
    from marsvision.train.data import read_split

    images = [s.path for s in read_split(msl_dir, "train", "binary", limit=16)]
    models = {"fp32": out_dir / "tiny.fp32.onnx", "int8": out_dir / "tiny.int8-cpu.onnx"}
    if not _try_exporter(ckpt_path, models["fp32"], images):
        _fp32_fallback(ckpt_path, models["fp32"])
    _int8_fallback(ckpt_path, models["fp32"], models["int8"], images)
    _CACHE[key] = models
    return models


@pytest.fixture(scope="module")
def models(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, msl_dir: Path
) -> dict[str, Path]:
    return runtime_models(tiny_checkpoint, tmp_path_factory.mktemp("models"), msl_dir)


def test_metadata_travels_in_onnx(models: dict[str, Path], tiny_checkpoint: Path) -> None:
    from marsvision.runtime.backends import load_model_meta

    ckpt = load_ckpt(tiny_checkpoint)
    for precision, path in (("fp32", models["fp32"]), ("int8", models["int8"])):
        meta = load_model_meta(path)
        assert meta.precision == precision
        assert meta.class_names == list(ckpt["class_names"])
        assert meta.preprocess.to_dict() == ckpt["preprocess"]


def test_onnxruntime_fp32_matches_torch(
    models: dict[str, Path], tiny_checkpoint: Path, msl_dir: Path
) -> None:
    import torch

    from marsvision.runtime.backends import open_runner
    from marsvision.runtime.preprocess import load_image
    from marsvision.train.checkpoint import model_from_checkpoint
    from marsvision.train.data import read_split

    model = model_from_checkpoint(load_ckpt(tiny_checkpoint))
    with open_runner(models["fp32"], "onnxruntime", "cpu") as runner:
        assert runner.name == "onnxruntime-cpu"
        paths = [s.path for s in read_split(msl_dir, "val", "binary", limit=5)]
        x = np.stack([load_image(p, runner.meta.preprocess) for p in paths])
        got = runner.infer(x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert got.shape == (5, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-3)
