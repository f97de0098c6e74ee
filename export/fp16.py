"""FP32 ONNX -> FP16 ONNX: fp16 weights and compute, float32 input and output.

The boundary stays float32 (one Cast after the input, one before the output), so every
runner feeds the same preprocessed float32 batch and gets float32 logits; the two casts cost
nothing next to ResNet-50. TensorRT builds a strongly typed FP16 engine from this file.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from marsvision.runtime.metadata import ModelMeta


def fp16_meta(fp32: ModelMeta) -> ModelMeta:
    """Metadata of the FP16 ONNX."""
    return replace(fp32, precision="fp16", input_dtype="float32")


def fp16_onnx_from_onnx(fp32_path: Path, fp16_path: Path, *, meta: ModelMeta) -> None:
    """Convert weights and compute to fp16, keeping float32 inputs and outputs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from marsvision.export.artifacts import set_onnx_meta

    model = onnx.load(str(fp32_path))
    half: Any = convert_float_to_float16(model, keep_io_types=True)
    _sort_nodes(half.graph)  # the converter appends its input Casts at the end
    set_onnx_meta(half, meta)
    onnx.save_model(half, str(fp16_path))
    onnx.checker.check_model(str(fp16_path), full_check=True)


def _sort_nodes(graph: Any) -> None:
    """Order nodes topologically (stable), as the ONNX checker requires."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in known for name in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError("FP16 graph has a cycle or a dangling input")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)
