"""What an ONNX file holds, read from its protobuf bytes without the `onnx` package (the
runtime is installed without it): whether any tensor keeps its data in another file.

A tensor with external data names a file that onnxruntime reads beside the model (older
onnxruntime releases, which the runtime's extras allow, follow `../` and absolute paths out of
the model's folder): a model's sha256, its manifest's hash and `Classifier(sha256=)` vouch for
the .onnx file only, so its weights could change under the same digest. mars-export never
writes external data; the runtime refuses a model that has it.
"""

from __future__ import annotations

import mmap
from pathlib import Path

# Wire types of the protobuf encoding.
_VARINT, _FIXED64, _BYTES, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5

# Where a TensorProto can sit, by message type: field number -> the type of its message. Only
# messages that can hold a tensor somewhere below them are followed.
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _SPARSE, _FUNCTION, _TRAINING, _TENSOR = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTRIBUTE},
    # t, g, tensors, graphs, sparse_tensor, sparse_tensors
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},  # node, attribute_proto (defaults)
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
}
_TENSOR_EXTERNAL_DATA = 13  # repeated StringStringEntryProto: location, offset, length
_TENSOR_DATA_LOCATION = 14  # enum DataLocation: DEFAULT 0, EXTERNAL 1
_EXTERNAL = 1


class NotProtobuf(ValueError):
    """The bytes do not parse as a protobuf message (not an ONNX file, or a cut one)."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise NotProtobuf("a varint runs past its message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _has_external(buf: memoryview, start: int, end: int, kind: int) -> bool:
    children = _CHILDREN.get(kind, {})
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if kind == _TENSOR and wire == _VARINT and field == _TENSOR_DATA_LOCATION:
            value, pos = _varint(buf, pos, end)
            if value == _EXTERNAL:
                return True
        elif kind == _TENSOR and wire == _BYTES and field == _TENSOR_EXTERNAL_DATA:
            _past(buf, pos, end, field, wire)  # a whole field (a cut one: not protobuf)
            return True
        elif wire == _BYTES and field in children:
            size, at = _varint(buf, pos, end)
            pos = _past(buf, pos, end, field, wire)
            if _has_external(buf, at, at + size, children[field]):
                return True
        else:
            pos = _past(buf, pos, end, field, wire)
    if pos != end:
        raise NotProtobuf("a fixed-size field runs past its message")
    return False


def _past(buf: memoryview, pos: int, end: int, field: int, wire: int) -> int:
    """Where the value of the field `field` (of wire type `wire`) that starts at `pos` ends, not
    looked into. A group (wire type 3) is no ONNX field's: an unknown field, which protobuf skips,
    and so does this (a NotProtobuf for it let onnxruntime load a model unchecked)."""
    if wire == _VARINT:
        return _varint(buf, pos, end)[1]
    if wire == _BYTES:
        size, pos = _varint(buf, pos, end)
        if pos + size > end:
            raise NotProtobuf("a field runs past its message")
        return pos + size
    if wire == _FIXED64:
        return pos + 8
    if wire == _FIXED32:
        return pos + 4
    if wire == _START_GROUP:
        while pos < end:
            key, pos = _varint(buf, pos, end)
            if key & 7 == _END_GROUP and key >> 3 == field:
                return pos
            pos = _past(buf, pos, end, key >> 3, key & 7)
        raise NotProtobuf("a group runs past its message")
    # an end of group with none begun (or another group's); 6 and 7 are not wire types
    raise NotProtobuf(f"wire type {wire}")


def has_external_data(model: Path | bytes) -> bool:
    """Whether any tensor of the ONNX model (a file, or its bytes) keeps its data in another
    file: an initializer, a Constant's or an attribute's tensor, in the main graph, a subgraph,
    a function or training info (and True for graphs nested too deep to walk). NotProtobuf
    where the bytes are not a protobuf message (the caller lets onnxruntime say what the file
    is); OSError where the file cannot be read."""
    if isinstance(model, bytes):
        return _walked(memoryview(model))
    with open(model, "rb") as f:
        if f.seek(0, 2) == 0:
            return False  # an empty file: mmap cannot map it, and onnxruntime refuses it
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                return _walked(view)
            finally:
                view.release()


def _walked(view: memoryview) -> bool:
    try:
        return _has_external(view, 0, len(view), _MODEL)
    except RecursionError:  # subgraphs nested hundreds deep (protobuf's own limit is 100)
        return True  # not known to be self-contained: refused, not let through
