"""TensorRT backend: a serialized engine run with the tensorrt Python API and cuda-python.

All TensorRT code of the runtime lives here. `tensorrt` and `cuda.bindings.runtime` are
imported when a runner is opened, so the rest of the runtime works without them. An engine
only runs on the TensorRT version and GPU architecture it was built for: both are checked
against the engine's sidecar metadata (`model.plan.json`) before deserializing.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from marsvision.runtime.backends.base import check_batch
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.metadata import ModelMeta, sidecar_path

if TYPE_CHECKING:
    import tensorrt as trt

_INSTALL = (
    'pip install "marsvision[trt]" (tensorrt and cuda-python) on a machine with an NVIDIA GPU'
)


def _require_trt() -> None:
    """A MarsvisionError unless TensorRT is installed. Its users then `import tensorrt` where
    they need it, so that mypy checks each call against the stubs (a module handed around as Any
    was not checked)."""
    try:
        import tensorrt
    except ImportError:
        raise MarsvisionError(f"TensorRT is not installed: {_INSTALL}") from None
    if not hasattr(tensorrt, "Runtime"):  # e.g. only tensorrt-stubs: a bare namespace package
        raise MarsvisionError(f"TensorRT is not installed (only its type stubs): {_INSTALL}")


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise MarsvisionError(
            f"cuda-python 12.6.1 or later (its cuda.bindings) is not installed: {_INSTALL}"
        ) from None
    return cudart


def _check(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python (err, *values) tuple; a CUDA error is a user-facing error."""
    err = result[0]
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        name = text.decode() if isinstance(text, bytes) else str(text)
        raise MarsvisionError(f"CUDA error in {what}: {name}; check the GPU and driver")
    values = result[1:]
    if len(values) == 1:
        return values[0]
    return values if values else None


def meta_from_engine(path: str | os.PathLike[str]) -> ModelMeta:
    """Read an engine's metadata from its JSON sidecar (`model.plan.json`)."""
    side = sidecar_path(path)
    if not side.is_file():
        raise MarsvisionError(
            f"{path}: TensorRT engine has no metadata sidecar {side.name}; "
            "re-export it with mars-export (it writes both files)"
        )
    meta = ModelMeta.from_json(side.read_text(encoding="utf-8"), source=str(side))
    if not meta.tensorrt:
        raise MarsvisionError(f"{side}: metadata has no 'tensorrt' section; re-export the engine")
    return meta


def running_gpu() -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of the current CUDA device."""
    cudart = _import_cudart()
    dev = _check(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
    prop = _check(cudart, cudart.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
    raw = prop.name
    name = raw.split(b"\0", 1)[0].decode() if isinstance(raw, bytes) else str(raw)
    return name, f"{prop.major}.{prop.minor}"


def check_compatible(meta: ModelMeta, path: Path, trt_version: str, capability: str) -> None:
    """Refuse an engine built for another TensorRT version or GPU architecture."""
    built = meta.tensorrt or {}
    if str(built.get("version")) != trt_version:
        raise MarsvisionError(
            f"{path} was built with TensorRT {built.get('version')}, this is TensorRT "
            f"{trt_version}: re-export the engine here (mars-export --fp16 or --int8 with "
            "--tensorrt on)"
        )
    if str(built.get("compute_capability")) != capability:
        raise MarsvisionError(
            f"{path} was built for a GPU of compute capability {built.get('compute_capability')} "
            f"({built.get('gpu_name')}), this GPU has {capability}: "
            "re-export the engine on this GPU"
        )


def _open_checks(path: Path) -> tuple[ModelMeta, Any]:
    """(metadata, cuda runtime) for the engine at `path` where it suits this machine:
    its sidecar there, TensorRT and cuda-python installed, a GPU, and the engine built with this
    TensorRT version for this GPU's architecture; else a MarsvisionError saying which is not."""
    meta = meta_from_engine(path)
    _require_trt()
    import tensorrt as trt

    cudart = _import_cudart()
    _, capability = running_gpu()
    check_compatible(meta, path, str(trt.__version__), capability)
    return meta, cudart


def engine_refusal(path: str | os.PathLike[str]) -> str | None:
    """None where the engine at `path` can run here, else why not (the checks a runner makes
    before deserializing, without deserializing: for choosing a default model)."""
    try:
        _open_checks(Path(path))
    except MarsvisionError as e:
        return str(e.message)
    return None


def _np_dtype(dtype: trt.DataType) -> type[np.floating[Any]]:
    import tensorrt as trt  # installed: the runner checked

    if dtype == trt.DataType.FLOAT:
        return np.float32
    if dtype == trt.DataType.HALF:
        return np.float16
    raise MarsvisionError(f"engine tensor type {dtype} is not supported; re-export the engine")


class TensorRTRunner:
    """A deserialized TensorRT engine with preallocated device buffers for `max_batch` images."""

    def __init__(self, path: str | os.PathLike[str], *, device: str = "auto") -> None:
        if device == "cpu":
            raise MarsvisionError("a TensorRT engine needs a GPU: use --device cuda (or auto)")
        self.path = Path(path)
        self.name = "tensorrt"
        # one execution context, stream and pair of device buffers: a call at a time (two
        # threads of one Classifier would run one's batch on the other's input), and close()
        # waits for the call it would free the buffers under
        self._lock = threading.Lock()
        self.meta, self._cudart = _open_checks(self.path)
        import tensorrt as trt  # installed: _open_checks checked

        self.library = f"tensorrt {trt.__version__}"
        self._logger: trt.ILogger = trt.Logger(trt.Logger.WARNING)
        self._runtime: trt.Runtime = trt.Runtime(self._logger)
        engine: trt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(
            self.path.read_bytes()
        )
        if engine is None:
            raise MarsvisionError(f"{self.path}: TensorRT cannot deserialize it; re-export it")
        self._engine: trt.ICudaEngine = engine
        context: trt.IExecutionContext | None = engine.create_execution_context()
        if context is None:  # its activation memory (for max batch) could not be allocated
            raise MarsvisionError(
                f"{self.path}: TensorRT cannot create an execution context (out of GPU memory?); "
                "free the GPU or re-export with a smaller --max-batch"
            )
        self._context: trt.IExecutionContext = context
        self._in = self.meta.input_name
        self._out = self.meta.output_name
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if set(names) != {self._in, self._out}:
            raise MarsvisionError(
                f"{self.path}: engine tensors {names} do not match its metadata; re-export it"
            )
        self._in_dtype = _np_dtype(engine.get_tensor_dtype(self._in))
        self._out_dtype = _np_dtype(engine.get_tensor_dtype(self._out))
        profile = engine.get_tensor_profile_shape(self._in, 0)  # [min, opt, max]
        self.max_batch = int(profile[2][0])
        size = self.meta.preprocess.input_size
        # the device buffers are sized by the sidecar: an engine that takes or gives other
        # shapes (a sidecar of another export beside it) would read and write past them
        takes: tuple[int, ...] = tuple(profile[2][1:])
        gives: tuple[int, ...] = tuple(engine.get_tensor_shape(self._out)[1:])
        modes = (engine.get_tensor_mode(self._in), engine.get_tensor_mode(self._out))
        if modes != (trt.TensorIOMode.INPUT, trt.TensorIOMode.OUTPUT):
            raise MarsvisionError(
                f"{self.path}: the engine's input and output are not its sidecar's {self._in!r} "
                f"and {self._out!r}: they are not of one export; re-export it"
            )
        if (takes, gives) != ((3, size, size), (self.meta.num_classes,)):
            raise MarsvisionError(
                f"{self.path}: the engine takes (n, {', '.join(map(str, takes))}) as "
                f"{self._in!r} and gives (n, {', '.join(map(str, gives))}); its sidecar says "
                f"(n, 3, {size}, {size}) and (n, {self.meta.num_classes}) as {self._out!r}: "
                "they are not of one export; re-export it"
            )
        in_bytes = self.max_batch * 3 * size * size * np.dtype(self._in_dtype).itemsize
        out_bytes = self.max_batch * self.meta.num_classes * np.dtype(self._out_dtype).itemsize
        cu = self._cudart
        self._stream: Any = None
        self._d_in: Any = None
        self._d_out: Any = None
        try:  # a failure part-way frees what was already allocated
            self._stream = _check(cu, cu.cudaStreamCreate(), "cudaStreamCreate")
            self._d_in = _check(cu, cu.cudaMalloc(in_bytes), f"cudaMalloc({in_bytes} bytes)")
            self._d_out = _check(cu, cu.cudaMalloc(out_bytes), f"cudaMalloc({out_bytes} bytes)")
            for name, ptr in ((self._in, self._d_in), (self._out, self._d_out)):
                if not self._context.set_tensor_address(name, int(ptr)):
                    raise MarsvisionError(f"TensorRT refused the device buffer of {name!r}")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> TensorRTRunner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Free the device buffers and the stream (after the call that uses them)."""
        cu = self._cudart
        with self._lock:
            for ptr in (self._d_in, self._d_out):
                if ptr is not None:
                    cu.cudaFree(ptr)
            if self._stream is not None:
                cu.cudaStreamDestroy(self._stream)
            self._d_in = self._d_out = self._stream = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW batch -> float32 logits; batches above the engine's maximum are split."""
        check_batch(batch, self.meta, self.path, self._in_dtype)
        if len(batch) == 0:  # no rows, as on onnxruntime (TensorRT's profiles start at 1)
            return np.empty((0, self.meta.num_classes), np.float32)
        parts = [
            self._infer_chunk(batch[i : i + self.max_batch])
            for i in range(0, len(batch), self.max_batch)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _infer_chunk(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:  # one call at a time: they share the context and the buffers
            cu = self._cudart
            if self._stream is None:
                raise ValueError(f"the TensorRT runner of {self.path} is closed")
            n = int(batch.shape[0])
            x = np.ascontiguousarray(batch, dtype=self._in_dtype)
            out = np.empty((n, self.meta.num_classes), dtype=self._out_dtype)
            if not self._context.set_input_shape(self._in, tuple(x.shape)):
                raise MarsvisionError(
                    f"{self.path}: the engine does not accept input shape {tuple(x.shape)}"
                )
            h2d = cu.cudaMemcpyKind.cudaMemcpyHostToDevice
            d2h = cu.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(
                cu,
                cu.cudaMemcpyAsync(self._d_in, x.ctypes.data, x.nbytes, h2d, self._stream),
                "cudaMemcpyAsync",
            )
            if not self._context.execute_async_v3(int(self._stream)):
                raise MarsvisionError(f"{self.path}: TensorRT execution failed")
            _check(
                cu,
                cu.cudaMemcpyAsync(out.ctypes.data, self._d_out, out.nbytes, d2h, self._stream),
                "cudaMemcpyAsync",
            )
            _check(cu, cu.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            return out.astype(np.float32, copy=False)
