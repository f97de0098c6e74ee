"""FP32 ONNX -> INT8 ONNX by explicit quantization (Q/DQ), calibrated on real train images.

Two flavours from one calibration (tensor ranges, cached in `<out>/calib-cache/<key>.json`):
- `int8-cpu`: uint8 activations (asymmetric), int8 per-channel symmetric weights: the fast
  path of ONNX Runtime on x86 CPUs (VNNI u8s8 kernels).
- `int8-trt`: int8 activations and weights, symmetric (zero point 0), per-channel weights,
  float biases: what TensorRT 10+ needs for explicit quantization.
Both leave the logits in float.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from marsvision.export.artifacts import log, quiet_logger, set_onnx_meta
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.files import atomic_path
from marsvision.runtime.metadata import ModelMeta
from marsvision.runtime.spec import PreprocessSpec

CALIB_BATCH = 8  # images per calibration forward pass (memory: all activations are kept)
# The classifier's output (the logits) stays in float: rounded to the activations' grid, near
# ties between classes flipped (RECIPES.md, "The logits left in float"). int8-cpu still fuses
# the Gemm into a QGemm.
FLOAT_LOGITS = {"OpTypesToExcludeOutputQuantization": ["Gemm"]}
# int8-trt: no Q/DQ on the outputs of Conv and Add either, only on what they take in (a Conv's
# input, both inputs of a residual Add), NVIDIA's placement advice for TensorRT, which fuses a
# Conv with the Add and ReLU after it. ONNX Runtime's default rounds every Conv's output to int8
# before the Add and the Add's again after it (and both sides of each ReLU: 121 Q nodes, 70 now).
# Measured on the shipped binary model from the same calibration, against its FP32 ONNX labels:
# 99.82 / 99.77% agreement on val / test against 99.45 / 99.62% (flips 9 and 5 down to 3 and 3),
# mean |logit difference| 0.037 / 0.042 against 0.061 / 0.063 (RECIPES.md, "Q/DQ placement of
# the TensorRT file"). TensorRT's speed with it is not measured (no TensorRT here).
TRT_FLOAT_OUTPUTS = ["Conv", "Add", "Gemm"]
FLAVOURS: dict[str, dict[str, Any]] = {
    "int8-cpu": {
        "activations": "uint8",
        "symmetric": False,
        "target": "onnxruntime x86 CPU",
        "extra": {"ActivationSymmetric": False, "WeightSymmetric": True, **FLOAT_LOGITS},
    },
    "int8-trt": {
        "activations": "int8",
        "symmetric": True,
        "target": "TensorRT",
        "extra": {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": TRT_FLOAT_OUTPUTS,
        },
    },
}


# The calibrators' settings: every option onnxruntime's create_calibrator reads for the method,
# at its own defaults in onnxruntime 1.32, pinned here so that another version cannot change
# them unseen, and kept in the INT8 files' metadata. "symmetric": ranges as [-t, t].
CALIB_OPTIONS: dict[str, dict[str, Any]] = {
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
    "entropy": {"num_bins": 128, "num_quantized_bins": 128, "symmetric": False},
    "minmax": {
        "symmetric": False,
        "moving_average": False,
        "averaging_constant": 0.01,
        "max_intermediate_outputs": None,
        "per_channel": False,
    },
}


def calibration_key(
    *, model_sha256: str, inputs_sha256: str, method: str, versions: dict[str, str]
) -> str:
    """Cache key: what is calibrated, by content (the preprocessed graph's sha256: its tensor
    names are the exporter's, and the ranges are stored by name; the calibration batches'
    sha256: a change to decoding or resizing that no version names is other pixels), and how
    (method and its options, batch size, the calibrator's onnxruntime and numpy)."""
    payload = json.dumps(
        {
            "model": model_sha256,
            "inputs": inputs_sha256,
            "method": method,
            "options": CALIB_OPTIONS[method],
            "batch": CALIB_BATCH,
            "versions": {k: versions.get(k, "") for k in ("onnxruntime", "numpy")},
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def calibration_batches(paths: list[Path], spec: PreprocessSpec) -> Iterator[np.ndarray]:
    """The calibration images as the calibrator sees them, CALIB_BATCH at a time."""
    from marsvision.export.images import load_batch

    for i in range(0, len(paths), CALIB_BATCH):
        yield load_batch(paths[i : i + CALIB_BATCH], spec)


def calibration_inputs_sha256(paths: list[Path], spec: PreprocessSpec) -> str:
    """sha256 of the calibration batches (shape, dtype and values)."""
    digest = hashlib.sha256()
    for batch in calibration_batches(paths, spec):
        digest.update(f"{batch.shape} {batch.dtype.str}".encode())
        digest.update(np.ascontiguousarray(batch).tobytes())
    return digest.hexdigest()


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[name]


def _op_types() -> list[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def _tensors_to_calibrate(pre_path: Path) -> set[str]:
    """The tensors of the graph that ONNX Runtime's calibrators range: a superset of those
    quantize_static needs ranges for (the logits, left in float, need none)."""
    from onnxruntime.quantization.calibrate import CalibraterBase

    calibrator = CalibraterBase(pre_path, _op_types())
    return set(calibrator.select_tensors_to_calibrate(calibrator.model)[0])


def _cache_refusal(cache_path: Path, method: str, pre_path: Path) -> str | None:
    """None where `cache_path` holds tensor ranges of `method` for every tensor of `pre_path`
    to calibrate; '' where there is no such file; else why it cannot be used (unreadable,
    damaged, another method's, short of tensors: a file named by what it calibrated lacks
    some only by an edit, and quantize_static then failed in a traceback)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    try:
        ranges = load_tensors_data(cache_path)
    except FileNotFoundError:
        return ""
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
    if ranges.calibration_method != _method(method) or not ranges.data:
        return f"not {method} ranges"
    missing = sorted(_tensors_to_calibrate(pre_path) - set(ranges.data))
    if missing:
        return f"no ranges for {len(missing)} of the graph's tensors, {missing[0]} the first"
    return None


def calibrate(
    pre_path: Path,
    cache_path: Path,
    *,
    paths: list[Path],
    spec: PreprocessSpec,
    method: str,
    workdir: Path,
) -> tuple[Path, bool]:
    """Tensor ranges: read from `cache_path` where it holds them, else computed into `workdir`
    and saved to `cache_path` where it can be written. Returns the ranges file and whether the
    cache was reused."""
    why = _cache_refusal(cache_path, method, pre_path)
    if why is None:
        log(f"calibration: reusing cached ranges {cache_path}")
        return cache_path, True
    if why:
        log(f"calibration: cannot use cached ranges {cache_path} ({why}); recomputing")
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(
        pre_path,
        _op_types(),
        augmented_model_path=str(workdir / "augmented.onnx"),
        calibrate_method=_method(method),
        extra_options=dict(CALIB_OPTIONS[method]),
    )
    log(f"calibration ({method}) on {len(paths)} images")
    batches = math.ceil(len(paths) / CALIB_BATCH)
    every = math.ceil(batches / 10)  # at most ten lines, whatever the number of images
    done = 0
    # ONNX Runtime's calibrators print on stdout ("Collecting tensor data and making histogram
    # ...", once a batch, "Number of tensors : 123"): not ours to show, and not stdout's.
    with contextlib.redirect_stdout(io.StringIO()):
        for n, batch in enumerate(calibration_batches(paths, spec), 1):
            calibrator.collect_data(_OneBatch(batch))
            done += len(batch)
            if n % every == 0 or n == batches:
                log(f"calibration ({method}): {done}/{len(paths)} images")
        ranges = calibrator.compute_data()
    computed = workdir / "calibration-ranges.json"
    save_tensors_data(ranges, computed)
    try:  # the cache saves a later export the calibration; this one goes on without it
        with atomic_path(cache_path) as tmp:  # the usual file mode, not mkstemp's 0600
            shutil.copyfile(computed, tmp)
    except OSError as e:
        log(
            f"calibration: cannot save the ranges to {cache_path} ({e.strerror or e}); "
            "the next export calibrates again"
        )
    return computed, False


class _OneBatch:
    """A CalibrationDataReader over one batch."""

    def __init__(self, batch: np.ndarray) -> None:
        self._items = [{"input": batch}]

    def get_next(self) -> dict[str, np.ndarray] | None:
        return self._items.pop() if self._items else None

    def __len__(self) -> int:
        return len(self._items)


def int8_meta(fp32: ModelMeta, flavour: str, *, method: str, images: int) -> ModelMeta:
    """Metadata of an INT8 ONNX of one flavour."""
    f = FLAVOURS[flavour]
    return replace(
        fp32,
        precision="int8",
        input_dtype="float32",
        quantization={
            "format": "QDQ",
            "flavour": flavour,
            "activations": f["activations"],
            "logits": "float",
            "weights": "int8",
            "per_channel": True,
            "symmetric": f["symmetric"],
            "method": method,
            "calibrator_options": dict(CALIB_OPTIONS[method]),
            "images": images,
            "source": "train split",
            "target": f["target"],
            # the op types whose outputs stay float beside the logits (int8-cpu: none)
            **({"float_outputs": TRT_FLOAT_OUTPUTS} if flavour == "int8-trt" else {}),
        },
    )


def int8_onnx_from_onnx(
    pre_path: Path,
    int8_path: Path,
    *,
    flavour: str,
    cache_path: Path,
    meta: ModelMeta,
) -> None:
    """Quantize the preprocessed FP32 ONNX with the cached ranges into one flavour."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    f = FLAVOURS[flavour]
    act = QuantType.QUInt8 if f["activations"] == "uint8" else QuantType.QInt8
    # quantize_static logs chatty warnings through the root logger
    with quiet_logger(), contextlib.redirect_stdout(sys.stderr):
        quantize_static(
            str(pre_path),
            str(int8_path),
            calibration_data_reader=None,
            calibration_cache_path=str(cache_path),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=act,
            weight_type=QuantType.QInt8,
            calibrate_method=_method(str(meta.quantization["method"]) if meta.quantization else ""),
            extra_options=dict(f["extra"]),
        )
    model = onnx.load(str(int8_path))
    set_onnx_meta(model, meta)
    onnx.save_model(model, str(int8_path))
    onnx.checker.check_model(str(int8_path), full_check=True)


def refuse_disagreement(
    fig: dict[str, Any], name: str, floor: float, reused: Path | None = None
) -> None:
    """Refuse the INT8 file `name` whose labels agree with PyTorch's on fewer than `floor`
    percent of the parity images (`fig`: its `parity()` figures): written, it would be
    mars-infer's default on a CPU. `reused`: the calibration cache its ranges were read from,
    named, since the cache is trusted by its name (a damaged one is refused here each time)."""
    from marsvision.train.metrics import at_least

    if at_least(100 * fig["top1_agreement"], floor):
        return
    n = fig["images"]
    agree = round(fig["top1_agreement"] * n)
    raise MarsvisionError(
        f"{name} gives PyTorch's labels on {agree} of {n} val images ({100 * agree / n:.2f}%), "
        f"under --int8-min-agreement {floor:g}: a broken INT8, no model file written ("
        + (
            "the calibration cache is kept"
            if reused is None
            else f"its ranges were read from the calibration cache {reused}, kept from an "
            "earlier export: delete that file to calibrate anew"
        )
        + "). Calibrate otherwise (--calib-method, --calib-images), "
        "distill the model for INT8 (python -m marsvision.train.int8_distill), or pass "
        "--int8-min-agreement 0 to write it and judge it with mars-bench parity"
    )


def preprocess_for_quantization(fp32_path: Path, pre_path: Path) -> None:
    """ONNX Runtime's recommended pre-pass: shape inference and graph optimization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(pre_path))
