"""Checkpoint -> FP32 ONNX (dynamic batch), gated on parity with PyTorch on real images."""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from marsvision.export.artifacts import quiet_logger, set_onnx_meta
from marsvision.export.config import ExportConfig
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.metadata import ModelMeta

OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORTER = f"torch.onnx.export(dynamo=True, opset {OPSET})"


def _export_versions() -> dict[str, str]:
    """Versions of everything that shapes an exported artifact."""
    import onnx
    import onnxscript

    from marsvision.runtime.backends.onnxruntime import ort_module
    from marsvision.train.checkpoint import library_versions

    onnxruntime = ort_module()

    return {
        **library_versions(),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxscript": onnxscript.__version__,
        "exporter": EXPORTER,
    }


def fp32_meta(ckpt: dict[str, Any], source_sha256: str) -> ModelMeta:
    """Metadata of the FP32 ONNX; the other artifacts derive theirs from it."""
    from marsvision.train.checkpoint import preprocess_from_checkpoint

    spec = preprocess_from_checkpoint(ckpt)
    return ModelMeta(
        task=ckpt["task"],
        class_names=list(ckpt["class_names"]),
        preprocess=spec,
        precision="fp32",
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        input_shape=["batch", 3, spec.input_size, spec.input_size],
        output_shape=["batch", len(ckpt["class_names"])],
        input_dtype="float32",
        source_checkpoint_sha256=source_sha256,
        versions=_export_versions(),
        decision_threshold=ckpt.get("decision_threshold"),
    )


def _export_graph(model: Any, size: int) -> Any:
    """torch.onnx dynamo export with a dynamic batch dim; returns an onnx.ModelProto."""
    import torch

    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    # The exporter chats on stdout/stderr and through `logging`; keep our stdout clean.
    with (
        quiet_logger("torch.onnx"),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(sys.stderr),
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
    if program is None:  # only the legacy exporter returns None; dynamo=True never does
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    _drop_stack_traces(proto)
    return proto


# node metadata whose value holds the Python stack of the export, with the absolute paths of
# the installed packages (.../.venv/lib/python3.11/site-packages/...)
_STACK_TRACE = "pkg.torch.onnx.stack_trace"


def _drop_stack_traces(proto: Any) -> None:
    """Remove the exporter's stack traces from every node: they name where marsvision is
    installed, so the same checkpoint exported from two folders gave two files (two sha256s,
    for the manifest, the result rows' provenance and parity). The other node metadata (module
    scopes, class hierarchy) stays for debugging."""
    for node in proto.graph.node:
        kept = [p for p in node.metadata_props if p.key != _STACK_TRACE]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def onnx_from_checkpoint(
    ckpt: dict[str, Any],
    onnx_path: Path,
    *,
    meta: ModelMeta,
    parity_batch: np.ndarray,
    reference: np.ndarray,
    max_abs_diff: float = ExportConfig.parity_tolerance,
) -> dict[str, Any]:
    """Export, check with onnx.checker, run in ONNX Runtime against PyTorch (`reference`: the
    checkpoint's logits of `parity_batch`, `torch_logits`); return parity.

    The file is written to `onnx_path` (callers pass a staging name). A max |logit diff| above
    `max_abs_diff` (times the largest |logit| when that exceeds 1) or any top-1 disagreement
    is a user error.
    """
    import onnx

    from marsvision.export.images import ort_logits, parity
    from marsvision.train.checkpoint import model_from_checkpoint

    proto = _export_graph(model_from_checkpoint(ckpt), meta.preprocess.input_size)
    set_onnx_meta(proto, meta)
    proto.producer_name = "marsvision"
    onnx.save_model(proto, str(onnx_path))
    onnx.checker.check_model(str(onnx_path), full_check=True)

    got = ort_logits(onnx_path, parity_batch)
    figures = parity(reference, got, meta.decision_threshold, onnx_path.name)
    # float32 keeps ~7 digits: beyond |logit| 1 the bound scales with the logits' magnitude.
    bound = max_abs_diff * max(1.0, float(np.abs(reference).max()))
    figures["tolerance"] = bound
    if figures["max_abs_logit_diff"] > bound or figures["top1_agreement"] < 1.0:
        raise MarsvisionError(
            f"ONNX export does not match PyTorch on {figures['images']} val images "
            f"(max |logit diff| {figures['max_abs_logit_diff']:.2e}, allowed {bound:.1e}; "
            f"labels agree on {figures['top1_agreement']:.2%}); nothing written"
        )
    return figures


def torch_logits(ckpt: dict[str, Any], batch: np.ndarray) -> np.ndarray:
    """Reference logits from the checkpoint's PyTorch model; refused when not finite (the
    checkpoint's own fault, not an export's)."""
    import torch

    from marsvision.runtime.classifier import non_finite_rows
    from marsvision.train.checkpoint import model_from_checkpoint

    with torch.inference_mode():
        logits = np.asarray(model_from_checkpoint(ckpt)(torch.from_numpy(batch)).numpy())
    if non_finite_rows(logits).any():
        raise MarsvisionError(
            "the checkpoint's own outputs (PyTorch) are not finite (NaN or inf) on the val "
            "images: its weights are broken; nothing written"
        )
    return logits
