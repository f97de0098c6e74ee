"""TensorRT engine building (needs tensorrt + a GPU) and mypy --strict on export/tensorrt.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_INT8_FLOOR

from marsvision.export.tensorrt import tensorrt_unavailable_reason

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.tensorrt
def test_engines_from_fp16_and_int8_onnx(
    tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path
) -> None:
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        pytest.skip(f"TensorRT cannot build here: {reason}")
    import tensorrt as trt

    from marsvision.export.config import ExportConfig
    from marsvision.export.pipeline import TIMING_CACHE, export_all
    from marsvision.runtime.metadata import ModelMeta, sidecar_path

    config = ExportConfig(
        checkpoint=tiny_checkpoint,
        out=tmp_path,
        fp16=True,
        int8=True,
        calib_images=16,
        int8_min_agreement=TINY_INT8_FLOOR,
        tensorrt="on",
        max_batch=4,
        data_dir=msl_dir,
    )
    manifest = export_all(config)
    assert (tmp_path / TIMING_CACHE).stat().st_size > 0
    for name, precision in [
        ("resnet50-binary.fp16.plan", "fp16"),
        ("resnet50-binary.int8.plan", "int8"),
    ]:
        engine_path = tmp_path / name
        assert any(a["file"] == name for a in manifest["artifacts"])
        meta = ModelMeta.from_json(sidecar_path(engine_path).read_text())
        assert meta.precision == precision
        assert meta.tensorrt is not None and meta.tensorrt["max_batch"] == 4
        assert meta.tensorrt["version"] == trt.__version__ and meta.tensorrt["gpu_name"]
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        assert engine is not None
        # iterable by __getitem__; the stubs' Dims has no __iter__
        shape: tuple[int, ...] = tuple(engine.get_tensor_profile_shape("input", 0)[2])  # type: ignore[arg-type]
        assert shape == (4, 3, 64, 64)
    json.loads((tmp_path / "manifest.json").read_text())


def test_module_imports_without_tensorrt() -> None:
    code = (
        "import sys; sys.modules['tensorrt'] = None; "
        "import marsvision.export.tensorrt as t, marsvision.export.cli; "
        "print(t.tensorrt_unavailable_reason())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "tensorrt package is not installed" in proc.stdout


def test_a_timing_cache_from_another_gpu_is_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The timing cache in an export folder outlives the GPU and TensorRT that made it: one that
    TensorRT refuses (another GPU) or cannot read (another release) is replaced by a new one
    (ignored before: the build went on without a cache and saving it failed, every export)."""
    from marsvision.export.tensorrt import _attach_timing_cache

    class Config:  # IBuilderConfig's two timing-cache calls
        def create_timing_cache(self, blob: bytes) -> tuple[str, bytes] | None:
            return None if blob == b"garbled" else ("cache", blob)

        def set_timing_cache(self, cache: tuple[str, bytes], ignore_mismatch: bool) -> bool:
            assert ignore_mismatch is False
            return cache[1] != b"other gpu"

    path = tmp_path / "tensorrt-timing.cache"
    assert _attach_timing_cache(Config(), None) == ("cache", b"")  # type: ignore[arg-type]
    assert _attach_timing_cache(Config(), path) == ("cache", b"")  # type: ignore[arg-type]
    path.write_bytes(b"this gpu")
    assert _attach_timing_cache(Config(), path) == ("cache", b"this gpu")  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""
    for blob in (b"other gpu", b"garbled"):
        path.write_bytes(blob)
        assert _attach_timing_cache(Config(), path) == ("cache", b"")  # type: ignore[arg-type]
        assert "is from another GPU or TensorRT version" in capsys.readouterr().err


def test_an_engines_sidecar_is_listed_and_hashed_with_it(
    tiny_checkpoint: Path,
    msl_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The sidecar holds what the runtime takes as it is (class names, threshold, shapes): the
    manifest lists it with its engine's entry, with its sha256, so mars-infer's default model
    passes over an engine whose sidecar changed, as it does an engine that changed, and a later
    export leaves such an engine out of the manifest. TensorRT's own build is stood in for by
    one that writes bytes (the export around it is the real one); on a GPU with TensorRT the
    test above builds real engines."""
    from marsvision.export import pipeline
    from marsvision.export import tensorrt as export_trt
    from marsvision.export.config import ExportConfig
    from marsvision.runtime import models as m
    from marsvision.runtime.backends import tensorrt as trt_backend
    from marsvision.runtime.metadata import sha256_file, sidecar_path

    def build(src: Path, path: Path, **kw: object) -> dict[str, object]:
        path.write_bytes(b"engine of " + src.name.encode())
        return {"version": "10.13.0.35", "compute_capability": "9.0", "max_batch": kw["max_batch"]}

    monkeypatch.setattr(export_trt, "engine_from_onnx", build)
    monkeypatch.setattr(pipeline, "_tensorrt_plan", lambda config: (True, None))
    config = ExportConfig(checkpoint=tiny_checkpoint, out=tmp_path, fp16=True, max_batch=4,
                          data_dir=msl_dir)  # fmt: skip
    entries = {a["flavour"]: a for a in pipeline.export_all(config)["artifacts"]}
    plan = tmp_path / m.artifact_name("binary", "fp16-engine")
    side = sidecar_path(plan)
    assert entries["fp16-engine"]["sidecar"] == {"file": side.name, "sha256": sha256_file(side)}
    assert "sidecar" not in entries["fp16"]
    monkeypatch.setattr(m, "_has_tensorrt", lambda: True)
    monkeypatch.setattr(trt_backend, "_open_checks", lambda path: None)  # where it runs
    assert m.default_model(tmp_path) == (plan, "auto", None)
    # another model's class names in it: the engine runs them, so it is passed over
    side.write_text(side.read_text().replace('"Surface"', '"Ground"'))
    chosen = m.default_model(tmp_path)
    assert chosen.path == tmp_path / m.artifact_name("binary", "fp32")
    assert chosen.note == f"passed over {plan.name}: its metadata sidecar {side.name}: {m.CHANGED}"
    side.unlink()  # gone: a one-line note too
    assert f"passed over {plan.name}: cannot read {side}" in str(m.default_model(tmp_path).note)
    side.write_text("{}")
    capsys.readouterr()
    # a later export (the FP32 file alone) keeps the entries whose files are as written
    kept = pipeline.export_all(ExportConfig(checkpoint=tiny_checkpoint, out=tmp_path,
                                            data_dir=msl_dir, tensorrt="off"))["kept"]  # fmt: skip
    assert kept == [m.artifact_name("binary", "fp16")]
    assert f"{plan.name} is not the file an earlier export wrote (its sha256 differs, or its " \
        "sidecar's)" in capsys.readouterr().err  # fmt: skip
