"""The runner interface every backend implements; the CLI and the benchmarks use only this."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol

import numpy as np

from marsvision.runtime.metadata import ModelMeta


class Runner(Protocol):
    """A loaded model, used as a context manager.

    `infer` takes a float32 NCHW batch preprocessed per `meta.preprocess` (any batch size the
    artifact accepts) and returns float32 logits of shape (batch, num_classes).
    """

    meta: ModelMeta
    name: str  # backend name for provenance, e.g. "onnxruntime-cpu", "tensorrt"
    library: str  # the library that runs it and its version, e.g. "onnxruntime 1.32.0"

    def __enter__(self) -> Runner: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW batch -> float32 logits (batch, num_classes)."""
        ...


def check_batch(
    batch: np.ndarray, meta: ModelMeta, path: object, feeds: type[np.floating[Any]] = np.float32
) -> None:
    """Refuse a batch that is not a numpy array (TypeError), not (n, 3, size, size) at the
    model's input size, not floating point or not finite (ValueError): a caller's mistake, not
    a fault of the model. Pixels not preprocessed (uint8) and NaN ran: the INT8 model quantizes
    NaN to a number, and called a batch of NaN Rover at 0.95. `feeds`: the type the runner casts
    the batch to, whose range a wider one's values must fit (1e300 in float64 became inf)."""
    if not isinstance(batch, np.ndarray):
        raise TypeError(f"{path}: a batch is a numpy array, not {type(batch).__name__}")
    size = meta.preprocess.input_size
    if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
        raise ValueError(
            f"{path}: a batch of shape {batch.shape}; the model takes (n, 3, {size}, {size}) "
            "(NCHW, preprocessed by its spec)"
        )
    if not np.issubdtype(batch.dtype, np.floating):
        raise ValueError(
            f"{path}: a batch of {batch.dtype}; the model takes float32 pixels preprocessed by "
            "its spec (scaled and normalized)"
        )
    if not np.isfinite(batch).all():
        raise ValueError(f"{path}: a batch with NaN or infinite pixels")
    wider = batch.dtype.itemsize > np.dtype(feeds).itemsize
    if wider and batch.size and float(np.abs(batch).max()) > float(np.finfo(feeds).max):
        raise ValueError(f"{path}: a batch with pixels beyond the range of {np.dtype(feeds)}")
