"""The runtime's own reading of ONNX files' protobuf (no `onnx` package in a runtime install):
a model that keeps tensors in another file is found wherever the tensor sits, and refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.onnx_proto import NotProtobuf, has_external_data


def _onnx_says(path: Path) -> bool:
    """The `onnx` package's answer: any tensor of the model with its data elsewhere."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    return any(uses_external_data(t) for t in _get_all_tensors(model))


def _externalised(src: Path, out: Path, location: str = "weights.bin") -> Path:
    """`src` saved again with every tensor's data in `location` beside it."""
    import onnx

    model = onnx.load(str(src))
    onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)  # fmt: skip
    return out


def test_exported_files_have_no_external_data_and_onnx_agrees(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """mars-export's four files are self-contained; saved with external data they are found
    (the file, and its bytes); on each, `onnx`'s own walk over all tensors says the same."""
    for flavour, path in tiny_models.items():
        assert has_external_data(path) is False, flavour
        assert _onnx_says(path) is False, flavour
        ext = _externalised(path, tmp_path / f"{flavour}.onnx", f"{flavour}.bin")
        assert has_external_data(ext) is True, flavour
        assert has_external_data(ext.read_bytes()) is True, flavour
        assert _onnx_says(ext) is True, flavour


def _model_with(where: str, tmp_path: Path) -> Path:
    """A tiny model whose one external tensor sits `where`: a Constant node's attribute, an If
    node's subgraph, a function's node."""
    import onnx
    from onnx import TensorProto, helper

    def external(name: str) -> onnx.TensorProto:
        t = helper.make_tensor(name, TensorProto.FLOAT, [2], [1.0, 2.0])
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", "../elsewhere.bin"
        return t

    const = helper.make_node("Constant", [], ["c"], value=external("c"))
    out = [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])]
    functions = []
    if where == "attribute":
        nodes = [const]
    elif where == "subgraph":
        branch = helper.make_graph([const], "branch", [], out)
        nodes = [helper.make_node("If", ["cond"], ["c"], then_branch=branch, else_branch=branch)]
    else:  # a function's body
        functions = [helper.make_function("local", "make_c", [], ["c"], [const],
                                          [helper.make_opsetid("", 17)])]  # fmt: skip
        nodes = [helper.make_node("make_c", [], ["c"], domain="local")]
    cond = [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    graph = helper.make_graph(nodes, "g", cond if where == "subgraph" else [], out)
    model = helper.make_model(graph, functions=functions, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])  # fmt: skip
    path = tmp_path / f"{where}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("where", ["attribute", "subgraph", "function"])
def test_an_external_tensor_is_found_wherever_it_sits(where: str, tmp_path: Path) -> None:
    path = _model_with(where, tmp_path)
    assert _onnx_says(path) or where == "function"  # onnx's helper does not walk functions
    assert has_external_data(path) is True


def test_bytes_that_are_not_protobuf_are_said_so(tmp_path: Path) -> None:
    for junk in (b"\x0f", b"\x0a\x05ab", b"\x08\xff\xff"):  # wire type 7; cut field; cut varint
        with pytest.raises(NotProtobuf):
            has_external_data(junk)
    empty = tmp_path / "empty.onnx"
    empty.touch()
    assert has_external_data(empty) is False  # onnxruntime says what an empty file is


def test_a_model_with_external_weights_is_refused_not_run_under_its_files_sha256(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The .onnx file's sha256 (the rows' provenance, `Classifier(sha256=)`) does not cover a
    weights file beside it: rewriting that file changed every answer under the same digest."""
    from marsvision.runtime.backends.onnxruntime import OnnxRuntimeRunner, meta_from_onnx
    from marsvision.runtime.classifier import Classifier

    ext = _externalised(tiny_models["fp32"], tmp_path / "m.onnx")
    refusal = "keeps weights in another file .*; re-export it with mars-export"
    with pytest.raises(MarsvisionError, match=refusal):
        OnnxRuntimeRunner(ext, device="cpu")
    with pytest.raises(MarsvisionError, match=refusal):
        meta_from_onnx(ext)
    with pytest.raises(MarsvisionError, match=refusal):
        Classifier(ext, device="cpu")
    with OnnxRuntimeRunner(tiny_models["fp32"], device="cpu") as r:  # the self-contained file
        size = r.meta.preprocess.input_size
        assert np.isfinite(r.infer(np.zeros((1, 3, size, size), np.float32))).all()


def test_graphs_nested_too_deep_to_walk_are_not_taken_for_self_contained() -> None:
    """Subgraphs nested past Python's recursion limit (written by hand: protobuf itself stops
    at 100 levels): the walk cannot say, so the model is taken to have external data (refused),
    not let through; 50 levels are walked."""

    def field(number: int, payload: bytes) -> bytes:  # a length-delimited field (< 2**14 bytes)
        size = len(payload)
        head = bytes([size]) if size < 0x80 else bytes([size & 0x7F | 0x80, size >> 7])
        return bytes([number << 3 | 2]) + head + payload

    def nested(levels: int) -> bytes:
        graph = b""
        for _ in range(levels):  # graph.node -> node.attribute -> attribute.g -> graph
            graph = field(1, field(5, field(6, graph)))
        return field(7, graph)  # model.graph

    assert has_external_data(nested(50)) is False
    assert has_external_data(nested(600)) is True


def test_an_unknown_group_field_does_not_hide_external_data(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A field in the old group encoding (wire type 3), which no ONNX field uses: protobuf (and
    so onnxruntime) skips it as an unknown field and loads the model; the walk took it for "not
    protobuf" and let onnxruntime load the model's external weights unchecked."""
    from marsvision.runtime.backends.onnxruntime import OnnxRuntimeRunner

    ext = _externalised(tiny_models["fp32"], tmp_path / "m.onnx")
    # field 99 as a group (key 99 << 3 | 3, a two-byte varint) holding field 1 = 5, then its end
    group = bytes.fromhex("9b06" + "0805" + "9c06")
    hidden = tmp_path / "hidden.onnx"
    hidden.write_bytes(group + ext.read_bytes())
    assert has_external_data(hidden) is True
    with pytest.raises(MarsvisionError, match="keeps weights in another file"):
        OnnxRuntimeRunner(hidden, device="cpu")
    # a group that does not end is not protobuf: onnxruntime says what the file is
    with pytest.raises(NotProtobuf):
        has_external_data(group[:4])
