"""Export stage on the tiny real checkpoint: ONNX FP32/FP16/INT8 artifacts, metadata, cache."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import TINY_CALIB_IMAGES as CALIB_IMAGES
from conftest import TINY_INT8_FLOOR, confident_agreement

from marsvision.export.artifacts import MANIFEST, onnx_meta
from marsvision.export.config import ExportConfig
from marsvision.export.images import load_batch, ort_logits, split_paths
from marsvision.export.int8 import CALIB_OPTIONS
from marsvision.export.onnx_fp32 import torch_logits
from marsvision.export.pipeline import CALIB_CACHE_DIR, export_all
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.metadata import METADATA_KEY, ModelMeta, sha256_file
from marsvision.runtime.models import artifact_name

AGREEMENT_IMAGES = 32
MIN_INT8_AGREEMENT = 0.9  # on the surer half of the images (confident_agreement)
LOGGERS = (None, "torch.onnx")  # the root logger and the torch exporter's


@pytest.fixture(scope="module")
def ckpt_path(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def exported(tiny_exports: Path) -> Path:
    """One export of everything (TensorRT off: engines are tested in test_export_tensorrt)."""
    return tiny_exports


@pytest.fixture(scope="module")
def val32(ckpt_path: Path, msl_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """32 real val images and the PyTorch FP32 logits for them."""
    from marsvision.train.checkpoint import load_checkpoint, preprocess_from_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    batch = load_batch(
        split_paths(msl_dir, "val", "binary", AGREEMENT_IMAGES), preprocess_from_checkpoint(ckpt)
    )
    return batch, torch_logits(ckpt, batch)


def _path(out: Path, flavour: str) -> Path:
    return out / artifact_name("binary", flavour)


def test_writes_every_onnx_artifact_and_manifest(exported: Path, ckpt_path: Path) -> None:
    manifest = json.loads((exported / MANIFEST).read_text())
    files = {a["file"] for a in manifest["artifacts"]}
    expected = {artifact_name("binary", f) for f in ("fp32", "fp16", "int8-cpu", "int8-trt")}
    assert files == expected
    assert manifest["source_checkpoint_sha256"] == sha256_file(ckpt_path)
    for a in manifest["artifacts"]:
        assert (exported / a["file"]).stat().st_size == a["size_bytes"]
    # nothing half-written or staged is left behind
    assert not [p for p in exported.iterdir() if p.name.startswith(".")]


def test_the_manifests_parity_figures_are_each_files_own(
    exported: Path, ckpt_path: Path, msl_dir: Path
) -> None:
    """Each artifact's `parity_vs_fp32` (what the export summary prints) is its own file's
    against PyTorch on the first val images: figures made of the reference against itself
    (perfect, whatever the file) passed every test."""
    from marsvision.export.images import parity
    from marsvision.train.checkpoint import load_checkpoint, preprocess_from_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    n = ExportConfig.parity_images
    batch = load_batch(split_paths(msl_dir, "val", "binary", n), preprocess_from_checkpoint(ckpt))
    ref = torch_logits(ckpt, batch)
    manifest = json.loads((exported / MANIFEST).read_text())
    diffs = {}
    for a in manifest["artifacts"]:
        want = parity(ref, ort_logits(exported / a["file"], batch), None, a["file"])
        got = a["parity_vs_fp32"]
        assert got["images"] == n and got["top1_agreement"] == want["top1_agreement"], a["file"]
        assert got["reference"] == "pytorch", a["file"]  # the FP32 ONNX's alone said so
        assert got["max_abs_logit_diff"] == pytest.approx(want["max_abs_logit_diff"], rel=1e-3)
        diffs[a["flavour"]] = got["max_abs_logit_diff"]
    assert diffs["fp32"] < diffs["fp16"] < min(diffs["int8-cpu"], diffs["int8-trt"])


def test_artifacts_do_not_depend_on_where_marsvision_is_installed(exported: Path) -> None:
    """The exporter's node metadata held Python stack traces with the absolute paths of the
    installed packages: the same checkpoint exported from two folders gave files with two
    sha256s (manifest, result rows' provenance). No artifact names a path of this install."""
    import sys

    for a in json.loads((exported / MANIFEST).read_text())["artifacts"]:
        model = onnx.load(str(exported / a["file"]))
        keys = {p.key for n in model.graph.node for p in n.metadata_props}
        assert "pkg.torch.onnx.stack_trace" not in keys, a["file"]
        raw = (exported / a["file"]).read_bytes()
        assert sys.prefix.encode() not in raw and b"site-packages" not in raw, a["file"]


def test_fp32_passes_checker_with_dynamic_batch(exported: Path, val32) -> None:
    path = _path(exported, "fp32")
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    batch, ref = val32
    for n in (1, 3, 32):
        got = ort_logits(path, batch[:n])
        assert got.shape == (n, 2)
        # the export's own bound: 1e-4, times the largest |logit| beyond 1 (float32 keeps ~7
        # digits; an AVX2 CPU's kernels differ from PyTorch's by 1.2e-4 at |logit| 17 here)
        bound = 1e-4 * max(1.0, float(np.abs(ref[:n]).max()))
        assert np.abs(got - ref[:n]).max() <= bound
        assert (got.argmax(1) == ref[:n].argmax(1)).all()


def test_fp16_is_half_size_with_float32_boundary(exported: Path, val32) -> None:
    fp16 = onnx.load(str(_path(exported, "fp16")))
    elem = onnx.TensorProto
    assert fp16.graph.input[0].type.tensor_type.elem_type == elem.FLOAT
    assert fp16.graph.output[0].type.tensor_type.elem_type == elem.FLOAT
    conv_weights = {n.input[1] for n in fp16.graph.node if n.op_type == "Conv"}
    types = {t.data_type for t in fp16.graph.initializer if t.name in conv_weights}
    assert types == {elem.FLOAT16}
    half = _path(exported, "fp16").stat().st_size / _path(exported, "fp32").stat().st_size
    assert 0.45 < half < 0.55, half
    batch, ref = val32
    got = ort_logits(_path(exported, "fp16"), batch)
    assert np.abs(got - ref).max() < 0.05 * max(1.0, float(np.abs(ref).max()))
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95


def _qdq(
    model: onnx.ModelProto,
) -> tuple[dict[str, onnx.TensorProto], set[int], list[onnx.NodeProto]]:
    """Zero-point types of QuantizeLinear, weight types feeding DequantizeLinear, weight DQs."""
    inits = {t.name: t for t in model.graph.initializer}
    q_zp: dict[str, onnx.TensorProto] = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            q_zp[n.input[2]] = inits[n.input[2]]
    weight_dqs = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and len(inits[n.input[0]].dims) == 4
    ]
    weight_types = {inits[n.input[0]].data_type for n in weight_dqs}
    return q_zp, weight_types, weight_dqs


@pytest.mark.parametrize(
    ("flavour", "act_type"),
    [("int8-cpu", onnx.TensorProto.UINT8), ("int8-trt", onnx.TensorProto.INT8)],
)
def test_int8_carries_qdq_of_the_right_types(exported: Path, flavour: str, act_type: int) -> None:
    from onnx import numpy_helper

    model = onnx.load(str(_path(exported, flavour)))
    q_zp, weight_types, weight_dqs = _qdq(model)
    assert len(q_zp) >= 50  # activations of ~53 convs are quantized
    assert {zp.data_type for zp in q_zp.values()} == {act_type}
    assert weight_types == {onnx.TensorProto.INT8}
    inits = {t.name: t for t in model.graph.initializer}
    # per-channel symmetric weights: one scale per output channel, zero points all 0
    for n in weight_dqs:
        assert numpy_helper.to_array(inits[n.input[1]]).size == inits[n.input[0]].dims[0]
        assert not numpy_helper.to_array(inits[n.input[2]]).any()
    # biases: float for TensorRT (QuantizeBias off), INT32 through a DequantizeLinear for the
    # CPU's (onnxruntime's default); each of the ~54 Conv/Gemm nodes has one
    int32_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                 and inits.get(n.input[0]) is not None
                 and inits[n.input[0]].data_type == onnx.TensorProto.INT32]  # fmt: skip
    biased = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2]
    assert len(biased) >= 50
    # the logits stay in float: the graph's output is the Gemm's, not a Q/DQ pair's after it
    (gemm,) = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert [o.name for o in model.graph.output] == list(gemm.output)
    # where the Q/DQ pairs sit: the TensorRT file quantizes what a Conv or a residual Add takes
    # in, never an Add's output and a Conv's only where an Add takes it in (NVIDIA's advice);
    # the CPU file every Conv's output (ONNX Runtime's default, which its kernels fuse)
    made_by = {o: n for n in model.graph.node for o in n.output}
    taken_by: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            taken_by.setdefault(i, []).append(n.op_type)
    quantized = [made_by[n.input[0]] for n in model.graph.node
                 if n.op_type == "QuantizeLinear" and n.input[0] in made_by]  # fmt: skip
    convs = [m for m in quantized if m.op_type == "Conv"]
    adds = sum(n.op_type == "Add" for n in model.graph.node)
    if flavour == "int8-trt":
        assert all(not numpy_helper.to_array(zp).any() for zp in q_zp.values())
        assert not int32_dqs
        assert all(inits[n.input[2]].data_type == onnx.TensorProto.FLOAT for n in biased)
        assert adds and not [m for m in quantized if m.op_type == "Add"]
        dq_takers = {n.output[0]: taken_by[n.output[0]] for n in model.graph.node
                     if n.op_type == "DequantizeLinear"}  # fmt: skip
        q_of = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
        dq_of = {n.input[0]: n.output[0] for n in model.graph.node
                 if n.op_type == "DequantizeLinear"}  # fmt: skip
        assert all(dq_takers[dq_of[q_of[c.output[0]]]] == ["Add"] for c in convs)
    else:
        assert any(numpy_helper.to_array(zp).any() for zp in q_zp.values())
        assert len(int32_dqs) == len(biased)
        assert len(convs) >= 50


@pytest.mark.parametrize("flavour", ["int8-cpu", "int8-trt"])
def test_int8_agrees_with_fp32_on_val_images(exported: Path, val32, flavour: str) -> None:
    batch, ref = val32
    # The check can only fail if the reference predicts both classes on these images.
    assert len(set(ref.argmax(1).tolist())) == 2, "val images all predicted one class"
    got = ort_logits(_path(exported, flavour), batch)
    agreement = confident_agreement(got, ref)
    assert agreement >= MIN_INT8_AGREEMENT, f"{flavour}: top-1 agreement {agreement:.0%}"
    assert np.corrcoef(got[:, 1] - got[:, 0], ref[:, 1] - ref[:, 0])[0, 1] > 0.9


def test_metadata_round_trips(exported: Path, ckpt_path: Path) -> None:
    from marsvision.train.checkpoint import load_checkpoint, preprocess_from_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    for flavour, precision in [
        ("fp32", "fp32"),
        ("fp16", "fp16"),
        ("int8-cpu", "int8"),
        ("int8-trt", "int8"),
    ]:
        path = _path(exported, flavour)
        meta = onnx_meta(path)
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert ModelMeta.from_json(props[METADATA_KEY]) == meta
        assert meta.precision == precision
        assert meta.class_names == ckpt["class_names"]
        assert meta.preprocess == preprocess_from_checkpoint(ckpt)
        assert meta.input_shape == ["batch", 3, 64, 64] and meta.output_shape == ["batch", 2]
        assert meta.input_dtype == "float32"
        assert meta.source_checkpoint_sha256 == sha256_file(ckpt_path)
        assert {"torch", "onnx", "onnxruntime", "marsvision"} <= set(meta.versions)
        if precision == "int8":
            q = meta.quantization
            assert q is not None
            expected = (ExportConfig.calib_method, CALIB_IMAGES, "train split")
            assert (q["method"], q["images"], q["source"]) == expected
            assert q["activations"] == ("uint8" if flavour == "int8-cpu" else "int8")
            assert q["logits"] == "float"
            assert q.get("float_outputs") == (["Conv", "Add", "Gemm"] if flavour == "int8-trt"
                                              else None)  # fmt: skip
            assert q["calibrator_options"] == CALIB_OPTIONS[ExportConfig.calib_method]
        else:
            assert meta.quantization is None
        assert meta.decision_threshold is None  # the tiny checkpoint has none: argmax


def test_decision_threshold_travels_from_the_checkpoint(ckpt_path: Path) -> None:
    """A shipped binary checkpoint's val-chosen threshold goes into every artifact's metadata
    (the FP16 and INT8 metadata are copies of the FP32's with another precision)."""
    from marsvision.export.onnx_fp32 import fp32_meta
    from marsvision.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    assert fp32_meta(ckpt, "ab" * 32).decision_threshold is None
    meta = fp32_meta({**ckpt, "decision_threshold": 0.93}, "ab" * 32)
    assert meta.decision_threshold == 0.93
    assert ModelMeta.from_json(meta.to_json()) == meta


def test_export_parity_labels_by_the_models_rule() -> None:
    """A model shipped with a decision threshold is compared by the labels it gives (as
    mars-infer and mars-bench parity give them), not by argmax: INT8 can move an image across
    the threshold while both agree on the most probable class."""
    from marsvision.export.images import parity

    # P(class 1) 0.45 against 0.35: class 0 by argmax in both, apart at a threshold of 0.4
    ref = np.log(np.array([[0.55, 0.45], [0.9, 0.1]], dtype=np.float32))
    got = np.log(np.array([[0.65, 0.35], [0.9, 0.1]], dtype=np.float32))
    assert parity(ref, got, None, "m.onnx")["top1_agreement"] == 1.0
    fig = parity(ref, got, 0.4, "m.onnx")
    assert fig["top1_agreement"] == 0.5 and fig["label_rule"] == "P(class 1) >= 0.4"
    # the threshold as it is: "0.999999" for 0.9999992 named another
    assert parity(ref, got, 0.9999992, "m.onnx")["label_rule"] == "P(class 1) >= 0.9999992"
    # a NaN row was the first class by argmax and agreed, and its NaN difference passed the bound
    got[1] = np.nan
    with pytest.raises(MarsvisionError, match=r"^m.onnx gives outputs that are not finite "
                       r"\(NaN or inf\) on 1 of 2 val images; nothing written$"):  # fmt: skip
        parity(ref, got, None, "m.onnx")


def _int8_again(ckpt_path: Path, out: Path, msl_dir: Path) -> ExportConfig:
    """An INT8-only export of the test checkpoint into `out` (a copy of the shared export)."""
    return ExportConfig(checkpoint=ckpt_path, out=out, int8=True, calib_images=CALIB_IMAGES,
                        int8_min_agreement=TINY_INT8_FLOOR, tensorrt="off",
                        data_dir=msl_dir)  # fmt: skip


def test_calibration_cache_is_reused(
    exported: Path,
    ckpt_path: Path,
    msl_dir: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "export"
    shutil.copytree(exported, out)  # the shared export stays as it was
    caches = list((out / CALIB_CACHE_DIR).glob("*.json"))
    assert len(caches) == 1
    before = caches[0].stat().st_mtime_ns
    config = _int8_again(ckpt_path, out, msl_dir)
    # the exporters quiet these loggers while they run; the caller's levels come back after
    for name in LOGGERS:
        caplog.set_level(logging.INFO, logger=name)  # pytest restores them after the test
    manifest = export_all(config)
    assert [logging.getLogger(n).level for n in LOGGERS] == [logging.INFO] * len(LOGGERS)
    assert "reusing cached ranges" in capfd.readouterr().err
    assert caches[0].stat().st_mtime_ns == before
    int8 = [a for a in manifest["artifacts"] if a["flavour"].startswith("int8")]
    assert [a["calibration_reused"] for a in int8] == [True, True]
    # the earlier FP16 entry survives in the merged manifest, said to be an earlier export's
    # (the top-level config, this export's, says int8 only: it described every entry before)
    fp16 = next(a for a in manifest["artifacts"] if a["flavour"] == "fp16")
    earlier = json.loads((exported / "manifest.json").read_text())
    assert manifest["kept"] == [fp16["file"]] and fp16["exported"] == earlier["created"]
    assert all(a["exported"] == manifest["created"] for a in int8)
    assert [a["quantization"]["images"] for a in int8] == [CALIB_IMAGES] * 2


def test_the_calibration_key_is_what_is_calibrated_and_how(exported: Path) -> None:
    """The key names the preprocessed graph's bytes and the calibration pixels (so a change that
    no version names is another calibration), the method, and the calibrator's libraries.
    Pillow's version stays in the export's metadata."""
    import PIL

    from marsvision.export.int8 import calibration_key
    from marsvision.runtime.backends import load_model_meta

    (fp32,) = exported.glob("*.fp32.onnx")
    versions = load_model_meta(fp32).versions
    assert versions["pillow"] == PIL.__version__

    def key(**changes: Any) -> str:
        given = {"model_sha256": "m", "inputs_sha256": "i", "method": "percentile",
                 "versions": versions, **changes}  # fmt: skip
        return calibration_key(**given)

    others = [key(model_sha256="m2"), key(inputs_sha256="i2"), key(method="entropy"),
              key(method="minmax"),
              key(versions={**versions, "onnxruntime": "0.0.1"}),
              key(versions={**versions, "numpy": "0.0.1"})]  # fmt: skip
    assert len({key(), *others}) == 1 + len(others)
    # what the graph's bytes and the pixels already say is not asked twice
    assert key(versions={**versions, "pillow": "0", "torch": "0", "onnxscript": "0"}) == key()


def test_the_calibrator_options_are_given_and_key_the_cache(
    exported: Path,
    ckpt_path: Path,
    msl_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """onnxruntime's defaults were the settings (a percentile of 99.999 on 2048 bins), so that
    another onnxruntime could change them unseen; the metadata did not say them."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    from marsvision.export import int8

    out = tmp_path / "export"
    shutil.copytree(exported, out)
    (cache,) = (out / CALIB_CACHE_DIR).glob("*.json")
    lower = {**int8.CALIB_OPTIONS["percentile"], "percentile": 90.0}
    monkeypatch.setitem(int8.CALIB_OPTIONS, "percentile", lower)
    manifest = export_all(_int8_again(ckpt_path, out, msl_dir))
    (other,) = set((out / CALIB_CACHE_DIR).glob("*.json")) - {cache}  # another key
    int8_files = [a for a in manifest["artifacts"] if a["flavour"].startswith("int8")]
    assert [a["calibration_reused"] for a in int8_files] == [False, False]
    q = onnx_meta(_path(out, "int8-cpu")).quantization
    assert q is not None and q["calibrator_options"] == lower
    before, after = load_tensors_data(cache).data, load_tensors_data(other).data
    tensor = next(t for t in sorted(before) if float(before[t].range_value[1]) > 0)
    assert float(after[tensor].range_value[1]) < float(before[tensor].range_value[1])


@pytest.fixture
def reexport_recalibrates(
    exported: Path,
    ckpt_path: Path,
    msl_dir: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> Callable[[], None]:
    """Checks that an INT8 re-export into a copy of the shared export calibrates anew, into a
    cache file of its own, named in both INT8 files' metadata."""

    def check() -> None:
        out = tmp_path / "export"
        shutil.copytree(exported, out)
        (before,) = (out / CALIB_CACHE_DIR).glob("*.json")
        manifest = export_all(_int8_again(ckpt_path, out, msl_dir))
        assert "reusing cached ranges" not in capfd.readouterr().err
        int8 = [a for a in manifest["artifacts"] if a["flavour"].startswith("int8")]
        assert [a["calibration_reused"] for a in int8] == [False, False]
        (made,) = {p.name for p in (out / CALIB_CACHE_DIR).glob("*.json")} - {before.name}
        assert [a["quantization"]["calibration_cache"] for a in int8] == [
            f"{CALIB_CACHE_DIR}/{made}"
        ] * 2

    return check


def test_other_calibration_pixels_are_another_calibration(
    monkeypatch: pytest.MonkeyPatch, reexport_recalibrates: Callable[[], None]
) -> None:
    """The key named the image files and the libraries' versions, not the pixels: a change to
    how they are decoded or resized that no version names (marsvision's own image code, an
    image file replaced) reused the other pixels' ranges."""
    import marsvision.export.images as images

    decode = images.load_batch
    monkeypatch.setattr(images, "load_batch", lambda *a, **k: decode(*a, **k) * 0.5)
    reexport_recalibrates()


def test_another_graph_is_another_calibration(
    monkeypatch: pytest.MonkeyPatch, reexport_recalibrates: Callable[[], None]
) -> None:
    """The ranges are stored by tensor name, and the names are the exporter's (onnxscript's,
    whose version the key did not name): another graph from the same checkpoint reused ranges
    made for other tensors."""
    import marsvision.export.int8 as int8

    pre_pass = int8.preprocess_for_quantization

    def other_graph(fp32_path: Path, pre_path: Path) -> None:
        pre_pass(fp32_path, pre_path)
        model = onnx.load(str(pre_path))
        model.doc_string = "another exporter"
        onnx.save_model(model, str(pre_path))

    monkeypatch.setattr(int8, "preprocess_for_quantization", other_graph)
    reexport_recalibrates()


def test_calibration_cache_has_the_usual_file_mode(exported: Path) -> None:
    """ONNX Runtime writes it by mkstemp (0600); every other artifact gets 0666 less the umask."""
    from marsvision.runtime.files import default_file_mode

    (cache,) = (exported / CALIB_CACHE_DIR).glob("*.json")
    assert cache.stat().st_mode & 0o777 == default_file_mode()


def test_calibration_reads_the_train_split(
    ckpt_path: Path, msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The INT8 ranges come from train images (the metadata says "train split"); val is the
    parity check's, and calibrating on it would grade the ranges on the images they came from."""
    import marsvision.export.images as images

    asked, real = [], images.split_paths

    class Enough(Exception):
        pass

    def split_paths(data_dir: Path, split: str, task: str, n: int) -> list[Path]:
        asked.append((split, n))
        if len(asked) == 2:
            raise Enough
        return real(data_dir, split, task, n)

    monkeypatch.setattr(images, "split_paths", split_paths)
    with pytest.raises(Enough):
        export_all(ExportConfig(checkpoint=ckpt_path, out=tmp_path / "x", int8=True,
                                calib_images=7, tensorrt="off", data_dir=msl_dir))  # fmt: skip
    assert asked == [("train", 7), ("val", ExportConfig.parity_images)]


def test_a_calibration_cache_of_another_method_is_not_used(exported: Path, tmp_path: Path) -> None:
    """Its file name is the key of its method too, so only an edit or a move makes one file hold
    another method's ranges: they would quantize the graph as if they were this method's."""
    import marsvision.export.int8 as int8

    (cache,) = (exported / CALIB_CACHE_DIR).glob("*.json")
    pre = tmp_path / "pre-quant.onnx"
    int8.preprocess_for_quantization(_path(exported, "fp32"), pre)
    assert int8._cache_refusal(cache, "percentile", pre) is None  # the export's own method
    for other in ("entropy", "minmax"):
        assert int8._cache_refusal(cache, other, pre) == f"not {other} ranges"
    assert int8._cache_refusal(tmp_path / "none.json", "percentile", pre) == ""  # no cache


def test_a_calibration_cache_that_lacks_tensors_is_recomputed(
    exported: Path,
    ckpt_path: Path,
    msl_dir: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Its file name is the key of what it calibrated, so only an edit makes a cache lack a
    tensor; then the export ended in a traceback from inside ONNX Runtime (a ValueError or a
    KeyError, by which tensor was missing)."""
    out = tmp_path / "export"
    shutil.copytree(exported, out)
    (cache,) = (out / CALIB_CACHE_DIR).glob("*.json")
    ranges = json.loads(cache.read_text())
    gone = sorted(ranges["data"])[:2]
    for tensor in gone:
        del ranges["data"][tensor]
    cache.write_text(json.dumps(ranges))
    manifest = export_all(_int8_again(ckpt_path, out, msl_dir))
    err = capfd.readouterr().err
    assert (f"cannot use cached ranges {cache} (no ranges for 2 of the graph's tensors, "
            f"{gone[0]} the first); recomputing") in err  # fmt: skip
    int8 = [a for a in manifest["artifacts"] if a["flavour"].startswith("int8")]
    assert [a["calibration_reused"] for a in int8] == [False, False]
    assert set(gone) <= set(json.loads(cache.read_text())["data"])


def test_a_calibration_cache_that_cannot_be_used_is_recomputed(
    exported: Path,
    ckpt_path: Path,
    msl_dir: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A cache file was trusted unread: a damaged one failed the export with a traceback (an
    unreadable one too); one that cannot be written (here a folder in its place) as well."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    from marsvision.runtime.files import default_file_mode

    out = tmp_path / "export"
    shutil.copytree(exported, out)
    (cache,) = (out / CALIB_CACHE_DIR).glob("*.json")
    config = _int8_again(ckpt_path, out, msl_dir)
    cache.write_text('{"calibration_method": "cut here')
    dead = out / ".staging.0badf00d"  # an export killed outright (SIGKILL) left its staging
    dead.mkdir()
    (dead / "pre-quant.onnx").write_bytes(b"half")
    manifest = export_all(config)
    out_text, err = capfd.readouterr()
    assert "mars-export: calibration: cannot use cached ranges" in err
    # our lines, prefixed; not ONNX Runtime's ("Collecting tensor data ...", once a batch)
    assert f"mars-export: calibration (percentile) on {CALIB_IMAGES} images" in err
    assert f"mars-export: calibration (percentile): {CALIB_IMAGES}/{CALIB_IMAGES} images" in err
    assert "Collecting" not in out_text + err and "Number of tensors" not in out_text + err
    assert f"removed .staging.0badf00d from {out}" in err and not dead.exists()
    int8 = [a for a in manifest["artifacts"] if a["flavour"].startswith("int8")]
    assert [a["calibration_reused"] for a in int8] == [False, False]
    assert load_tensors_data(cache).data  # overwritten with the new ranges
    assert cache.stat().st_mode & 0o777 == default_file_mode()
    cache.unlink()
    cache.mkdir()  # neither read nor written: the export goes on without a cache
    export_all(config)
    err = capfd.readouterr().err
    assert "cannot use cached ranges" in err and "cannot save the ranges" in err, err
    assert "Traceback" not in err and not list(out.glob(".staging*"))


def test_failed_parity_writes_nothing(ckpt_path: Path, msl_dir: Path, tmp_path: Path) -> None:
    config = ExportConfig(
        checkpoint=ckpt_path,
        out=tmp_path,
        tensorrt="off",
        data_dir=msl_dir,
        parity_tolerance=0.0,
    )
    with pytest.raises(MarsvisionError, match="does not match PyTorch"):
        export_all(config)
    assert list(tmp_path.iterdir()) == []


def test_a_label_that_changes_within_the_logit_bound_fails_parity(
    ckpt_path: Path, msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The FP32 gate refuses an export whose label differs from PyTorch's on one image even
    where every logit is within the bound (a near-tie turned over): only the bound was tested,
    and the gate passed without its label half."""
    from marsvision.export import images
    from marsvision.export.onnx_fp32 import fp32_meta, onnx_from_checkpoint
    from marsvision.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    meta = fp32_meta(ckpt, sha256_file(ckpt_path))
    batch = load_batch(split_paths(msl_dir, "val", "binary", 2), meta.preprocess)
    reference = np.array([[0.0, 1e-6], [1.0, -1.0]], np.float32)  # a near-tie: Rover
    turned = np.array([[1e-6, 0.0], [1.0, -1.0]], np.float32)  # 1e-6 away: Surface
    monkeypatch.setattr(images, "ort_logits", lambda path, x: turned)
    kw: dict[str, Any] = {"meta": meta, "parity_batch": batch}
    with pytest.raises(MarsvisionError, match=r"max \|logit diff\| 1.00e-06, .*agree on 50.00%"):
        onnx_from_checkpoint(ckpt, tmp_path / "a.onnx", reference=reference, **kw)
    figures = onnx_from_checkpoint(ckpt, tmp_path / "b.onnx", reference=turned, **kw)
    assert figures["top1_agreement"] == 1.0  # the same logits pass


def test_export_refuses_other_data_unreadable_images_and_misfit_weights(
    ckpt_path: Path, msl_dir: Path, tmp_path: Path
) -> None:
    """Another data set's "train split" was calibrated on without a word (here: test images);
    an unreadable calibration or val image ended in a traceback; a checkpoint whose class names
    do not fit its fc layer gave torch's message cut off mid-word over several lines."""
    from marsvision.runtime.spec import PreprocessSpec
    from marsvision.train import data as msl
    from marsvision.train.checkpoint import load_checkpoint, model_from_checkpoint

    other = tmp_path / "swapped"
    other.mkdir()
    for name in (*msl.SPLIT_FILES.values(), msl.SYNSET_FILE):
        shutil.copy(msl_dir / name, other / name)
    (other / "calibrated").symlink_to(msl_dir / "calibrated")
    shutil.copy(msl_dir / msl.SPLIT_FILES["test"], other / msl.SPLIT_FILES["train"])
    config = ExportConfig(checkpoint=ckpt_path, out=tmp_path / "o", int8=True, tensorrt="off",
                          data_dir=other)  # fmt: skip
    with pytest.raises(MarsvisionError, match="swapped is not the data set .* was trained on"):
        export_all(config)
    assert not (tmp_path / "o").exists()
    junk = tmp_path / "junk.JPG"
    junk.write_bytes(b"not a jpeg")
    with pytest.raises(MarsvisionError, match="junk.JPG cannot be read .*re-download"):
        load_batch([junk], PreprocessSpec.for_input_size(64))
    ckpt = load_checkpoint(ckpt_path)
    with pytest.raises(MarsvisionError, match="^the checkpoint names 3 classes but its fc layer "
                       "has 2 outputs$"):  # fmt: skip
        model_from_checkpoint({**ckpt, "class_names": ["a", "b", "c"]})
    state = dict(ckpt["state_dict"])
    del state["layer1.0.conv1.weight"], state["layer2.0.conv1.weight"]
    with pytest.raises(MarsvisionError) as e:
        model_from_checkpoint({**ckpt, "state_dict": state})
    assert e.value.message.startswith("checkpoint weights do not fit ResNet-50: Missing key(s)")
    assert "\n" not in e.value.message
    # weights gone NaN: the checkpoint is named, not the ONNX file made from it, before --out
    # is made (it was refused after, by the FP32 export's own second PyTorch run)
    import torch

    fc = ckpt["state_dict"]["fc.weight"]
    broken = {
        **ckpt,
        "state_dict": {**ckpt["state_dict"], "fc.weight": torch.full_like(fc, torch.nan)},
    }
    torch.save(broken, tmp_path / "nan.pt")
    config = ExportConfig(checkpoint=tmp_path / "nan.pt", out=tmp_path / "nan", int8=False,
                          tensorrt="off", data_dir=msl_dir)  # fmt: skip
    with pytest.raises(MarsvisionError, match="the checkpoint's own outputs .* are not finite"):
        export_all(config)
    assert not (tmp_path / "nan").exists()


def _manifest(created: str, files: dict[str, Path]) -> dict[str, Any]:
    """A manifest of `files` (flavour -> path) as export_all hands it to write_manifest."""
    entries = [{"file": p.name, "flavour": f, "sha256": sha256_file(p)} for f, p in files.items()]
    return {"created": created, "source_checkpoint_sha256": "ab" * 32, "artifacts": entries}


def test_a_kept_file_replaced_by_hand_leaves_the_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An earlier export's file that now holds other bytes (another model's int8-cpu copied in)
    was kept in manifest.json on a re-export, vouched for by its old sha256."""
    from marsvision.export.artifacts import write_manifest

    files = {f: _path(tmp_path, f) for f in ("fp32", "fp16", "int8-cpu")}
    for flavour, path in files.items():
        path.write_bytes(flavour.encode())
    write_manifest(tmp_path, _manifest("earlier", files))
    files["int8-cpu"].write_bytes(b"another model's int8-cpu")
    files["fp32"].write_bytes(b"fp32 again")
    manifest = write_manifest(tmp_path, _manifest("now", {"fp32": files["fp32"]}))
    assert manifest["kept"] == [files["fp16"].name]
    assert [a["file"] for a in manifest["artifacts"]] == [files["fp16"].name, files["fp32"].name]
    assert json.loads((tmp_path / MANIFEST).read_text()) == manifest
    assert files["int8-cpu"].read_bytes() == b"another model's int8-cpu"  # left in place
    err = capsys.readouterr().err
    assert f"{files['int8-cpu'].name} is not the file an earlier export wrote" in err, err


def test_a_hand_edited_manifest_keeps_nothing_it_does_not_list(tmp_path: Path) -> None:
    """`"artifacts": null`, or entries that are not files, in the earlier manifest: nothing of it
    is kept (a TypeError ended the export)."""
    from marsvision.export.artifacts import write_manifest

    fp32 = _path(tmp_path, "fp32")
    fp32.write_bytes(b"fp32")
    for artifacts in (None, [None, "x", {"file": 7}], {"file": fp32.name}):
        (tmp_path / MANIFEST).write_text(json.dumps({"artifacts": artifacts}))
        manifest = write_manifest(tmp_path, _manifest("now", {"fp32": fp32}))
        assert manifest["kept"] == [] and [a["file"] for a in manifest["artifacts"]] == [fp32.name]


def test_files_and_their_manifest_change_together_under_a_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM just after the new files were renamed into place, before the manifest was
    written, left the manifest of the old files beside them (its sha256s and calibration no
    longer the files'): the renames and the manifest now happen with signals held."""
    import signal

    from marsvision.export.artifacts import write_manifest
    from marsvision.runtime.errors import interruptible

    old = {f: _path(tmp_path, f) for f in ("fp32", "int8-cpu")}
    for flavour, path in old.items():
        path.write_bytes(b"old " + flavour.encode())
    write_manifest(tmp_path, _manifest("earlier", old))
    stage = tmp_path / "stage"
    stage.mkdir()
    new = {f: stage / p.name for f, p in old.items()}
    for flavour, path in new.items():
        path.write_bytes(b"new " + flavour.encode())
    manifest = _manifest("now", new)
    real_replace = os.replace

    def replace_then_signal(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGTERM)  # right after the first file is in place

    monkeypatch.setattr(os, "replace", replace_then_signal)
    with pytest.raises(SystemExit) as stopped:
        with interruptible("mars-export"):
            write_manifest(tmp_path, manifest, staged=[(new[f], old[f]) for f in new])
    monkeypatch.undo()
    assert stopped.value.code == 143
    written = json.loads((tmp_path / MANIFEST).read_text())
    assert written["created"] == "now"
    for entry in written["artifacts"]:
        assert entry["sha256"] == sha256_file(tmp_path / entry["file"])
    assert sorted(p.name for p in stage.iterdir()) == []


def test_an_int8_engine_of_another_calibration_leaves_the_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Re-exporting with another --calib-method rewrote int8-trt.onnx but kept the INT8 engine
    built from the one before; the FP16 engine, and the INT8 one after a re-export of the same
    calibration, are still kept."""
    from marsvision.export.artifacts import write_manifest
    from marsvision.runtime.metadata import sidecar_path
    from marsvision.runtime.spec import PreprocessSpec

    def calibrated(created: str, files: dict[str, Path], key: str) -> dict[str, Any]:
        manifest = _manifest(created, files)
        for a in manifest["artifacts"]:
            if a["flavour"].startswith("int8"):
                a["quantization"] = {"method": key, "calibration_cache": f"calib-cache/{key}.json"}
        return manifest

    files = {f: _path(tmp_path, f) for f in ("int8-trt", "fp16-engine", "int8-engine")}
    for flavour, path in files.items():
        path.write_bytes(flavour.encode())
    for flavour in ("fp16-engine", "int8-engine"):
        meta = ModelMeta(
            task="binary",
            class_names=["Surface", "Rover"],
            preprocess=PreprocessSpec.for_input_size(64),
            precision=flavour.split("-")[0],
            tensorrt={"version": "10.13.0.35", "compute_capability": "9.0", "gpu_name": "H100"},
        )
        sidecar_path(files[flavour]).write_text(meta.to_json())
    write_manifest(tmp_path, calibrated("earlier", files, "minmax"))
    engines = [files["fp16-engine"].name, files["int8-engine"].name]
    trt_onnx = {"int8-trt": files["int8-trt"]}
    assert write_manifest(tmp_path, calibrated("same", trt_onnx, "minmax"))["kept"] == engines
    assert "rebuild" not in capsys.readouterr().err
    files["int8-trt"].write_bytes(b"int8-trt of entropy ranges")
    manifest = write_manifest(tmp_path, calibrated("now", trt_onnx, "entropy"))
    assert manifest["kept"] == [files["fp16-engine"].name]
    assert json.loads((tmp_path / MANIFEST).read_text())["kept"] == manifest["kept"]
    assert files["int8-engine"].exists() and sidecar_path(files["int8-engine"]).exists()
    err = capsys.readouterr().err
    assert f"{files['int8-engine'].name} was built from an INT8 ONNX of another calibration" in err
    assert "rebuild it with mars-export --int8 where TensorRT can build engines" in err, err
    # the same calibration, another Q/DQ placement (an export before the TensorRT file's outputs
    # of Conv and Add were left float): the engine is of the old graph, so it leaves too
    write_manifest(tmp_path, calibrated("then", files, "minmax"))
    placed = calibrated("placed", trt_onnx, "minmax")
    placed["artifacts"][0]["quantization"]["float_outputs"] = ["Conv", "Add", "Gemm"]
    assert write_manifest(tmp_path, placed)["kept"] == [files["fp16-engine"].name]
    assert "another calibration or Q/DQ placement" in capsys.readouterr().err


def test_the_checkpoint_of_an_unfinished_run_is_named_so(
    ckpt_path: Path,
    msl_dir: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run stopped before its end leaves checkpoint.pt, the best epoch so far, with no test
    metrics: it exported without a word, though ship refuses it. Said once the checks passed
    (a user error stays one line), before the work."""
    from marsvision.export import pipeline
    from marsvision.train.checkpoint import atomic_torch_save, load_checkpoint

    class Stop(Exception):
        pass

    def stop(out: Path) -> None:  # where the work would begin
        raise Stop

    monkeypatch.setattr(pipeline, "staging_dir", stop)
    note = f"mars-export: note: {ckpt_path} is from an unfinished run (no test metrics yet"
    with pytest.raises(Stop):
        export_all(ExportConfig(checkpoint=ckpt_path, out=tmp_path / "o", data_dir=msl_dir))
    assert note in capfd.readouterr().err  # the fixture's metrics are empty
    ckpt = load_checkpoint(ckpt_path)
    ckpt["metrics"] = {"test": {"accuracy": 0.5}}
    done = tmp_path / "done.pt"
    atomic_torch_save(ckpt, done)
    with pytest.raises(Stop):
        export_all(ExportConfig(checkpoint=done, out=tmp_path / "o2", data_dir=msl_dir))
    assert "unfinished" not in capfd.readouterr().err
