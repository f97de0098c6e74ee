"""TensorRT engines from the FP16 and INT8 (Q/DQ) ONNX files, with the TensorRT 10+ API.

Networks are strongly typed: precision comes from the ONNX (fp16 tensors, Q/DQ nodes), not
from builder flags. `tensorrt` and `cuda-python` are imported inside the functions, so this
module imports (and `mars-export --help` works) without them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from marsvision.runtime.errors import MarsvisionError

if TYPE_CHECKING:
    import tensorrt as trt

TRT_INSTALL_HINT = 'pip install "marsvision[trt]"'


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT can build engines here; otherwise why not, in a few words."""
    try:
        import tensorrt
    except ImportError:
        return "the tensorrt package is not installed"
    if not hasattr(tensorrt, "Builder"):  # tensorrt-stubs alone leaves an importable shell
        return "the tensorrt package is not installed (only its type stubs)"
    try:
        gpu_info()
    except MarsvisionError as e:
        return str(e.message)
    return None


def gpu_info() -> dict[str, str]:
    """Name and compute capability of the current CUDA device, computed by the same code
    (`runtime.backends.tensorrt.running_gpu`) that checks an engine's sidecar at load time."""
    from marsvision.runtime.backends.tensorrt import running_gpu

    name, capability = running_gpu()
    return {"gpu_name": name, "compute_capability": capability}


def _progress_monitor() -> trt.IProgressMonitor:
    """An IProgressMonitor that prints build phases to stderr."""
    import tensorrt as trt

    class _Progress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._start: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
            self._start[phase_name] = time.perf_counter()
            indent = "  " if parent_phase else ""
            print(f"tensorrt: {indent}{phase_name} ({num_steps} steps)", file=sys.stderr)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            took = time.perf_counter() - self._start.pop(phase_name, time.perf_counter())
            if took >= 1.0:
                print(f"tensorrt: {phase_name} done in {took:.1f} s", file=sys.stderr)

    return _Progress()


def _attach_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> trt.ITimingCache:
    """Attach to `config` the timing cache saved at `path` where TensorRT takes it (made on
    this GPU by this TensorRT), else a new one: a cache from another GPU or TensorRT release
    is set aside (said on stderr) and replaced after the build, not an error in every export."""
    saved = path.read_bytes() if path is not None and path.is_file() else b""
    if saved:
        cache = config.create_timing_cache(saved)  # None for a blob this TensorRT cannot read
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        print(f"tensorrt: {path} is from another GPU or TensorRT version; starting a new "
              "timing cache", file=sys.stderr)  # fmt: skip
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise MarsvisionError("TensorRT refused a new timing cache")
    return cache


def engine_from_onnx(
    onnx_path: Path,
    engine_path: Path,
    *,
    input_name: str,
    input_size: int,
    max_batch: int,
    timing_cache: Path | None = None,
) -> dict[str, Any]:
    """Build and write a strongly typed engine for batch 1..max_batch; return its TRT facts.

    The returned dict goes into the sidecar metadata's `tensorrt` field.
    """
    import tensorrt as trt

    gpu = gpu_info()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MarsvisionError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    # the graph's FP32 parts (the INT8 file's unquantized layers) in FP32, as on the CUDA
    # provider: TensorRT's TF32 default rounds their products' inputs to 10-bit mantissas
    config.clear_flag(trt.BuilderFlag.TF32)
    config.progress_monitor = _progress_monitor()
    opt = max(1, max_batch // 2)
    profile = builder.create_optimization_profile()
    shape = (3, input_size, input_size)
    profile.set_shape(
        input_name,
        trt.Dims([1, *shape]),
        trt.Dims([opt, *shape]),
        trt.Dims([max_batch, *shape]),
    )
    config.add_optimization_profile(profile)

    cache = _attach_timing_cache(config, timing_cache)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MarsvisionError(
            f"TensorRT failed to build an engine from {onnx_path} (its log above says why; an "
            f"engine for batches up to {max_batch} may not fit this GPU: try a smaller --max-batch)"
        )
    build_s = time.perf_counter() - start
    engine_path.write_bytes(bytes(serialized))

    if timing_cache is not None:  # the attached cache, with this build's timings added
        tmp = timing_cache.with_name(timing_cache.name + ".tmp")
        tmp.write_bytes(bytes(cache.serialize()))
        tmp.replace(timing_cache)

    return {
        "version": str(trt.__version__),
        **gpu,
        "max_batch": max_batch,
        "opt_batch": opt,
        "strongly_typed": True,
        "build_seconds": round(build_s, 2),
    }
