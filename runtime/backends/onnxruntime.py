"""ONNX Runtime backend: CPU, CUDA or TensorRT execution providers behind the Runner interface."""

from __future__ import annotations

import os
import shlex
import zipfile
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from marsvision.runtime.backends.base import check_batch
from marsvision.runtime.errors import MarsvisionError, stop_inside
from marsvision.runtime.host import int8_sums_saturate, usable_cores
from marsvision.runtime.metadata import METADATA_KEY, ModelMeta, sha256_file
from marsvision.runtime.onnx_proto import NotProtobuf, has_external_data

_EP = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


# The two pip packages of ONNX Runtime: both install the one `onnxruntime` module.
ORT_CPU, ORT_GPU = "onnxruntime", "onnxruntime-gpu"
_ORT_INSTALL = 'pip install "marsvision[cpu]" (or "marsvision[gpu]" on a machine with a GPU)'


def no_telemetry() -> None:
    """For the commands, before onnxruntime is imported: onnxruntime 1.32 writes a device id and
    an event queue (the Python path, OS, CPU, container) under ~/.cache/Microsoft when imported,
    and warns on stderr where HOME cannot be written. Unless the user chose (ORT_DISABLE_TELEMETRY
    set), the commands turn it off; a program that embeds the runtime decides for itself."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def ort_module() -> Any:
    """The onnxruntime module; its absence, or an install that fails to import (built for another
    numpy, a part missing), is a one-line user error saying which."""
    try:
        import onnxruntime
    except ImportError as e:
        if (stop := stop_inside(e)) is not None:  # in its C module's setup
            raise stop from None
        if isinstance(e, ModuleNotFoundError) and e.name == "onnxruntime":
            raise MarsvisionError(f"onnxruntime is not installed: {_ORT_INSTALL}") from None
        raise MarsvisionError(
            f"onnxruntime is installed but cannot be imported ({_first_line(e)}); reinstall it, "
            "or one built for this numpy and Python"
        ) from None
    return onnxruntime


def ort_distributions() -> list[str]:
    """Which of the ONNX Runtime pip packages are installed (by their metadata)."""
    from importlib.metadata import PackageNotFoundError, distribution

    found = []
    for name in (ORT_CPU, ORT_GPU):
        try:
            distribution(name)
        except PackageNotFoundError:
            continue
        found.append(name)
    return found


def _no_cuda_hint() -> str:
    """How to get the CUDA provider: replace the CPU build, or untangle both builds."""
    if ort_distributions() == [ORT_CPU, ORT_GPU]:
        return (
            f"{ORT_CPU} and {ORT_GPU} are both installed and share one module, in which the CPU "
            f"build's files won: pip uninstall -y {ORT_CPU} {ORT_GPU} && pip install {ORT_GPU}"
        )
    return (
        f'pip uninstall -y {ORT_CPU} && pip install "marsvision[gpu]" on a machine with an '
        "NVIDIA GPU"
    )


# ONNX Runtime's switch to exact INT8 products on x86 CPUs without VNNI (u8 x u8 kernels
# instead of u8 x s8 ones that saturate); it changes nothing where those do not saturate.
EXACT_INT8_KEY = "session.x64quantprecision"
# 1 or 0 forces the exact kernels on or off (to measure the fast path's speed and error on such
# a CPU); unset or auto: on where this CPU's sums would saturate.
EXACT_INT8_ENV = "MARSVISION_EXACT_INT8"


def exact_int8_default() -> bool:
    """Whether sessions use exact INT8 sums: $MARSVISION_EXACT_INT8, else this CPU's need."""
    value = os.environ.get(EXACT_INT8_ENV, "auto").strip().lower()
    if value in ("", "auto"):
        return int8_sums_saturate()
    if value in ("1", "0"):
        return value == "1"
    raise MarsvisionError(f"{EXACT_INT8_ENV}={value!r}: use 1 (exact), 0 (fast) or auto")


def session_options(
    threads: int | None = None, *, optimize: bool = True, exact_int8: bool | None = None
) -> Any:
    """Tuned session options: full graph optimization, sequential execution, no spinning, and
    exact INT8 sums (`exact_int8`; default `exact_int8_default()`: where this CPU's INT8 sums
    would saturate, an x86 without VNNI or AMX, where the shipped model's INT8 agrees 98.90%
    with PyTorch on val, 99.51% exact, at about 60-85% of the fast kernels' speed)."""
    ort = ort_module()
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or usable_cores()
    so.inter_op_num_threads = 1
    # Spinning threads steal the CPU from the decode workers between batches.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if exact_int8_default() if exact_int8 is None else exact_int8:
        so.add_session_config_entry(EXACT_INT8_KEY, "1")
    # fatal only: its error lines ("[E:onnxruntime:...] ... std::bad_alloc", in colour even into
    # a file) said again what the exception says, which the runtime words in one line
    so.log_severity_level = 4
    return so


# ONNX Runtime's CUDA provider runs FP32 convolutions and GEMMs in TF32 (a 10-bit mantissa) by
# default on Ampere and later GPUs (its `use_tf32` option, onnxruntime PRs 19357 and 19426): an
# "fp32" model would not run in FP32, nor match PyTorch's FP32 (the benchmarks' baseline turns
# TF32 off) within the FP32 parity bounds. FP16 models are unaffected; INT8 QDQ ones compute
# between their Q/DQ pairs in FP32, and so keep to it too. Unverified here: no CUDA build of
# onnxruntime on these machines.
PROVIDER_OPTIONS: dict[str, dict[str, str]] = {"CUDAExecutionProvider": {"use_tf32": "0"}}

# onnxruntime's TensorRT provider (--backend tensorrt with an .onnx file) builds TensorRT engines
# from the ONNX file when it loads it. On its defaults it refused a Q/DQ model ("int8 is not
# configured in the builder": onnxruntime issue 13381), sized an engine's batch range by the
# batches it had seen and rebuilt the engine (a minute or more) for a batch outside it, such as a
# smaller last one (onnxruntime PR 15546), and kept no engine from one run to the next. So it gets
# the model's precision, a profile of batches 1 to TRT_EP_MAX_BATCH (larger batches run in
# pieces; mars-export's --max-batch default) and an engine cache per model file. Unverified here:
# no TensorRT on these machines.
TRT_EP_MAX_BATCH = 32


def _tensorrt_ep_options(meta: ModelMeta, path: Path) -> dict[str, str]:
    """The TensorRT provider's options for the model `path` that `meta` describes."""
    if meta.precision == "int8" and (meta.quantization or {}).get("activations") != "int8":
        raise MarsvisionError(
            f"{path} quantizes activations to uint8 (the x86 CPU flavour), which TensorRT cannot "
            "run: use the .int8-trt.onnx file of the same export"
        )
    size = meta.preprocess.input_size
    dims = [f"{meta.input_name}:{n}x3x{size}x{size}" for n in (1, TRT_EP_MAX_BATCH)]
    options = {
        "trt_profile_min_shapes": dims[0],
        "trt_profile_opt_shapes": dims[1],
        "trt_profile_max_shapes": dims[1],
    }
    if meta.precision in ("int8", "fp16"):
        options[f"trt_{meta.precision}_enable"] = "True"
    cache = _tensorrt_ep_cache(path)
    if cache is not None:
        for kind in ("engine", "timing"):
            options |= {f"trt_{kind}_cache_enable": "True", f"trt_{kind}_cache_path": str(cache)}
    return options


def _tensorrt_ep_cache(path: Path) -> Path | None:
    """A folder for the TensorRT provider's engines of the model `path`, named by its sha256
    and the onnxruntime and TensorRT versions: the provider names cached engines by the graph,
    not its weights, so a re-exported model of the same name would run on the old engine; and
    it fails on an engine of another TensorRT ("could not deserialize engine from cache") rather
    than build a new one, so an upgrade would stop every run. None where no such folder can be
    made (nor where $XDG_CACHE_HOME is relative, or no home is known: `~` stays as it is)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        return None
    versions = f"ort-{ort_module().__version__}-trt-{_tensorrt_version()}"
    folder = Path(base) / "marsvision" / "ort-tensorrt" / sha256_file(path)[:16] / versions
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder


# TensorRT's pip distributions that give its version, newest naming first
_TENSORRT_DISTS = ("tensorrt-cu13-libs", "tensorrt-cu12-libs", "tensorrt-libs", "tensorrt")


def _tensorrt_version() -> str:
    """The pip-installed TensorRT's version; "system" where none is (a system library, whose
    version the provider alone knows)."""
    from importlib import metadata

    for dist in _TENSORRT_DISTS:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "system"


def _load_tensorrt_libraries() -> None:
    """Load a pip-installed TensorRT's libraries for onnxruntime's TensorRT provider: its
    wheels hold libnvinfer in their own folder, off the loader's path, so the provider's
    dlopen("libnvinfer.so.10") fails there (onnxruntime issues 13501 and 18597); `import
    tensorrt` loads it from that folder, after which the provider's dlopen finds it by its
    soname. Nothing where none is installed or it fails to import (the provider then says what
    it cannot find). Unverified here: no TensorRT on these machines."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # ImportError, or OSError from a library that does not load
        pass


def _refuse_external_data(path: Path, model: str | bytes) -> None:
    """A model whose weights are kept in another file is refused: its sha256 (the rows'
    provenance, the manifest's check, `Classifier(sha256=)`) would not cover them, and older
    onnxruntime releases read such a file from anywhere. mars-export never writes one. A file
    that is not a protobuf message, or cannot be read, is left to onnxruntime to name."""
    try:
        external = has_external_data(model if isinstance(model, bytes) else path)
    except (NotProtobuf, OSError):
        return
    if external:
        raise MarsvisionError(
            f"{path}: the model keeps weights in another file (ONNX external data), which "
            "marsvision does not load: its sha256 would not cover them; re-export it with "
            "mars-export (one self-contained file)"
        )


def _session(
    path: Path, providers: list[Any], so: Any, options: dict[str, dict[str, str]] | None = None
) -> Any:
    ort = ort_module()
    options, names = PROVIDER_OPTIONS | (options or {}), list(providers)
    providers = [(p, options[p]) if p in options else p for p in providers]
    model: str | bytes = str(path)
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:  # onnxruntime takes only UTF-8 path strings: hand it the bytes
        try:
            model = path.read_bytes()
        except OSError as e:
            raise MarsvisionError(f"{path}: cannot read the model ({e.strerror})") from None
    _refuse_external_data(path, model)
    if _EP["tensorrt"] in names:
        _load_tensorrt_libraries()
    try:
        # no fallback: where a GPU provider fails, onnxruntime's own fallback prints a banner
        # to stdout (into mars-infer's rows there), drops the providers' options and goes on
        # on CUDA or the CPU under the name of the backend that was asked for
        return ort.InferenceSession(model, sess_options=so, providers=providers, enable_fallback=0)
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        if _is_torch_file(path):  # "re-export it" sent a checkpoint's user the wrong way
            raise MarsvisionError(
                f"{path} is a PyTorch checkpoint, not an exported model: export it first "
                f"(mars-export --checkpoint {shlex.quote(str(path))} --data DIR --int8) and pass "
                "the .onnx file"
            ) from None
        gpu = [p for p in (_EP["tensorrt"], _EP["cuda"]) if p in names]
        if gpu:  # the provider may be what failed (no TensorRT libraries, an engine build)
            instead = "--backend onnxruntime" if _EP["tensorrt"] in gpu else "--device cpu"
            raise MarsvisionError(
                f"{path}: onnxruntime cannot load this model with {' and '.join(gpu)} "
                f"({_first_line(e)}); try {instead}, and if that fails too, re-export it with "
                "mars-export"
            ) from None
        if _out_of_memory(e):  # not the file's fault: "re-export it" sent the user astray
            raise MarsvisionError(
                f"{path}: not enough memory to load this model ({_first_line(e)}): a limit of "
                "this process or machine (ulimit -v, a container's memory limit); free memory, "
                "raise the limit, or run the INT8 file (a quarter of the FP32 file's weights)"
            ) from None
        raise MarsvisionError(
            f"{path}: onnxruntime cannot load this model ({_first_line(e)}); re-export it with "
            "mars-export"
        ) from None


def _out_of_memory(e: BaseException) -> bool:
    """Whether onnxruntime's exception says it ran out of memory (a failed allocation in C++, or
    its arena's), rather than that the model is at fault."""
    text = str(e)
    return "bad_alloc" in text or "Failed to allocate memory" in text


def _is_torch_file(path: Path) -> bool:
    """Whether `path` is a torch.save file: a .pt/.pth name (a truncated or old-format one
    too), or a zip archive with a pickle (`<name>/data.pkl`)."""
    if path.suffix.lower() in (".pt", ".pth"):
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.count("/") == 1 and n.endswith("/data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def meta_from_onnx(path: str | os.PathLike[str]) -> ModelMeta:
    """Read the marsvision metadata of an ONNX file (no `onnx` import: onnxruntime's map)."""
    p = Path(path)
    sess = _session(p, ["CPUExecutionProvider"], session_options(1, optimize=False))
    return _meta_of(sess, p)


def _meta_of(sess: Any, path: Path) -> ModelMeta:
    text = sess.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise MarsvisionError(
            f"{path}: this ONNX file has no '{METADATA_KEY}' metadata (not made by mars-export); "
            "export it with mars-export"
        )
    return ModelMeta.from_json(text, source=str(path))


def providers_for(device: str, backend: str = "onnxruntime") -> list[str]:
    """The ordered provider list for a device ("auto", "cpu", "cuda") and backend."""
    available = set(ort_module().get_available_providers())
    if device == "cpu":
        return [_EP["cpu"]]
    want = [_EP["tensorrt"]] if backend == "tensorrt" else []
    want.append(_EP["cuda"])
    missing = [p for p in want if p not in available]
    if device == "auto" and missing and backend != "tensorrt":
        return [_EP["cpu"]]
    if missing:  # TensorRT runs on a GPU only: --device cpu would be refused in turn
        instead = "--backend onnxruntime" if backend == "tensorrt" else "--device cpu"
        raise MarsvisionError(
            f"onnxruntime here has no {', '.join(missing)} "
            f"(it has {', '.join(sorted(available))}): {_no_cuda_hint()}; or use {instead}"
        )
    return want + [_EP["cpu"]]


def _check_graph(sess: Any, meta: ModelMeta, path: Path) -> bool:
    """Refuse a graph that its metadata does not describe (an edited file, or one from another
    tool with marsvision metadata pasted in): one float input of (batch, 3, size, size) with a
    free batch dimension, and an output of (batch, classes), named as the metadata says.
    Unchecked, such a file fails at its first batch, after the header is written. Returns
    whether a dimension other than the batch is symbolic (only a run can check it)."""
    redo = "; re-export it with mars-export"
    inputs = sess.get_inputs()
    if len(inputs) != 1 or inputs[0].name != meta.input_name:
        raise MarsvisionError(
            f"{path}: model inputs {[i.name for i in inputs]} do not match its metadata "
            f"({meta.input_name!r}){redo}"
        )
    if inputs[0].type not in ("tensor(float)", "tensor(float16)"):
        raise MarsvisionError(
            f"{path}: the model's input is {inputs[0].type}; mars-infer feeds float32 or float16 "
            f"images{redo}"
        )
    shape, size = list(inputs[0].shape), meta.preprocess.input_size
    want: list[Any] = ["batch", 3, size, size]
    if len(shape) != 4 or any(
        isinstance(got, int) and got != w for got, w in zip(shape[1:], want[1:])
    ):
        raise MarsvisionError(
            f"{path}: the model's input is {shape}, its metadata says {want}{redo}"
        )
    if isinstance(shape[0], int):
        raise MarsvisionError(
            f"{path}: the model's input has a fixed batch of {shape[0]}; mars-infer needs a free "
            f"batch dimension{redo}"
        )
    outputs = {o.name: list(o.shape) for o in sess.get_outputs()}
    out = outputs.get(meta.output_name)
    if out is None:
        raise MarsvisionError(
            f"{path}: the model has no output {meta.output_name!r} (its outputs: "
            f"{sorted(outputs)}){redo}"
        )
    if len(out) != 2 or (isinstance(out[1], int) and out[1] != meta.num_classes):
        raise MarsvisionError(
            f"{path}: the model's output is {out}, its metadata names {meta.num_classes} "
            f"classes{redo}"
        )
    return not all(isinstance(d, int) for d in (*shape[1:], out[1]))


class OnnxRuntimeRunner:
    """An ONNX model in an onnxruntime InferenceSession."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "auto",
        backend: str = "onnxruntime",
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        providers = providers_for(device, backend)
        self.exact_int8 = exact_int8_default()  # INT8 in exact sums (this CPU's would saturate)
        options, self._max_batch = None, None
        if _EP["tensorrt"] in providers:  # its options come from the metadata: read it first
            trt = _tensorrt_ep_options(meta_from_onnx(self.path), self.path)
            options, self._max_batch = {_EP["tensorrt"]: trt}, TRT_EP_MAX_BATCH
        self._sess = _session(
            self.path, providers, session_options(threads, exact_int8=self.exact_int8), options
        )
        self.meta = _meta_of(self._sess, self.path)
        used = self._sess.get_providers()
        if backend == "tensorrt" and _EP["tensorrt"] not in used:  # e.g. no libnvinfer
            raise MarsvisionError(
                f"onnxruntime could not start TensorRT for {self.path} (providers in use: "
                f"{used}); check that TensorRT 10's libraries are installed where onnxruntime "
                "finds them, or use --backend onnxruntime"
            )
        if device == "cuda" and _EP["cuda"] not in used:
            raise MarsvisionError(
                f"onnxruntime could not start CUDA for {self.path} (providers in use: {used}); "
                "check the GPU and driver, or use --device cpu"
            )
        kind = {
            _EP["tensorrt"]: "tensorrt",
            _EP["cuda"]: "cuda",
        }.get(used[0], "cpu")
        self.name = f"onnxruntime-{kind}"
        self.library = f"onnxruntime {ort_module().__version__}"
        symbolic = _check_graph(self._sess, self.meta, self.path)
        self._dtype = np.float16 if "float16" in self._sess.get_inputs()[0].type else np.float32
        self._output = self.meta.output_name
        if symbolic:  # one image now: a graph that cannot take the input fails before any output
            size = self.meta.preprocess.input_size
            self.infer(np.zeros((1, 3, size, size), np.float32))

    def __enter__(self) -> OnnxRuntimeRunner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._sess = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW batch -> float32 logits (batch, num_classes)."""
        check_batch(batch, self.meta, self.path, self._dtype)
        x = batch if batch.dtype == self._dtype else batch.astype(self._dtype)
        if len(x) == 0:  # outside the TensorRT provider's profile of 1 to TRT_EP_MAX_BATCH
            return np.zeros((0, self.meta.num_classes), np.float32)
        n = self._max_batch or len(x)
        if len(x) > n:
            return np.concatenate([self.infer(x[i : i + n]) for i in range(0, len(x), n)])
        sess = self._sess
        if sess is None:  # not a fault of the model (the except below would say so)
            raise ValueError(f"the onnxruntime session of {self.path} is closed")
        try:
            (out,) = sess.run([self._output], {self.meta.input_name: x})
        except Exception as e:  # onnxruntime's own types: a graph its metadata does not fit
            if _out_of_memory(e):  # its arena's message: one line of 400 characters, no remedy
                raise MarsvisionError(
                    f"{self.path}: not enough memory to run a batch of {len(x)} images: a "
                    "limit of this process or machine; use a smaller batch size (mars-infer -b) "
                    "or raise the limit"
                ) from None
            raise MarsvisionError(
                f"{self.path}: onnxruntime cannot run this model on a batch of {x.shape} "
                f"({_first_line(e)})"
            ) from None
        want = (len(x), self.meta.num_classes)
        if out.shape != want:  # a symbolic output width: columns would shift under the header
            raise MarsvisionError(
                f"{self.path}: the model gave outputs of shape {out.shape}, not {want}: its "
                "metadata does not describe it; re-export it with mars-export"
            )
        return np.asarray(out, dtype=np.float32)
