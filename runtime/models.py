"""Artifact file names, and the model mars-infer uses when none is named: the export of the
shipped binary model in ./exports (mars-export's default --out) that suits this machine best."""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.metadata import sha256_file, sidecar_path

DEFAULT_TASK = "binary"
EXPORTS_ENV = "MARS_EXPORTS"  # where to look instead of ./exports
# flavour -> file suffix after `resnet50-<task>`
SUFFIXES = {
    "fp32": ".fp32.onnx",
    "fp16": ".fp16.onnx",
    "int8-cpu": ".int8-cpu.onnx",
    "int8-trt": ".int8-trt.onnx",
    "fp16-engine": ".fp16.plan",
    "int8-engine": ".int8.plan",
}


def default_exports_dir() -> Path:
    """$MARS_EXPORTS where set, else ./exports: where mars-export writes and mars-infer looks."""
    return Path(os.environ.get(EXPORTS_ENV) or "exports")


# Every file of a model, shipped checkpoint and artifacts, is named PREFIX + task + suffix.
PREFIX = "resnet50-"


def artifact_name(task: str, flavour: str) -> str:
    """File name of one artifact, e.g. `resnet50-binary.int8-cpu.onnx`."""
    return f"{PREFIX}{task}{SUFFIXES[flavour]}"


def shipped_name(task: str) -> str:
    """File name of the shipped checkpoint of a task, e.g. `resnet50-binary.pt`."""
    return f"{PREFIX}{task}.pt"


SUMS_FILE = "SHA256SUMS"  # beside the shipped checkpoints: `sha256sum -c SHA256SUMS`


def listed_sums(sums: Path) -> dict[str, str]:
    """{file name: sha256} of the `sha256sum` file `sums` (GNU lines, text or binary mode, and
    `--tag` lines; a leading `./` dropped); {} where there is no such file."""
    try:
        lines = sums.read_text(encoding="utf-8-sig").splitlines()  # a BOM an editor added
    except (OSError, ValueError):
        return {}
    listed: dict[str, str] = {}
    for line in lines:
        if line.startswith("SHA256 (") and ") = " in line:  # BSD form, `sha256sum --tag`
            name, _, digest = line[len("SHA256 (") :].rpartition(") = ")
        else:  # GNU form: "digest  name", or "digest *name" (binary mode)
            digest, _, name = line.partition(" ")
            if name[:1] not in (" ", "*"):
                continue
            name = name[1:]
        listed.setdefault(name.removeprefix("./"), digest.strip().lower())
    return listed


def listed_sha256(sums: Path, name: str) -> str:
    """The sha256 that the `sha256sum` file `sums` gives for the file `name`; '' where it gives
    none (or there is no such file)."""
    return listed_sums(sums).get(name, "")


def _has_tensorrt() -> bool:
    """The TensorRT backend's own test of an install (type stubs alone do not count)."""
    from marsvision.runtime.backends.tensorrt import _require_trt

    try:
        _require_trt()
    except MarsvisionError:
        return False
    return True


def _has_cuda_onnxruntime() -> bool:
    """Whether this onnxruntime lists the CUDA provider: built with it (onnxruntime-gpu), which
    says nothing of a GPU, a driver or the CUDA libraries being there (`_cuda_refusal`)."""
    from marsvision.runtime.backends.onnxruntime import _EP, ort_module

    try:
        return _EP["cuda"] in ort_module().get_available_providers()
    except MarsvisionError:
        return False


def _cuda_refusal(path: Path) -> str | None:
    """None where onnxruntime runs `path` on CUDA here, else why not (its own one-line error):
    onnxruntime-gpu on a machine without a GPU, or without the CUDA and cuDNN libraries it was
    built for, lists the CUDA provider but runs on the CPU."""
    from marsvision.runtime.backends.onnxruntime import OnnxRuntimeRunner

    try:
        with OnnxRuntimeRunner(path, device="cuda"):
            return None
    except MarsvisionError as e:
        return e.message


def _preferred_flavours(device: str = "auto", backend: str = "auto") -> list[str]:
    """Artifact flavours, best first, for this machine, a --device and a --backend: TensorRT
    engines where TensorRT is installed (not for --backend onnxruntime, which cannot run one),
    FP16 ONNX where onnxruntime lists CUDA (neither for --device cpu), then the x86 INT8 and
    FP32 ONNX."""
    order = []
    if device != "cpu" and backend != "onnxruntime" and _has_tensorrt():
        order += ["int8-engine", "fp16-engine"]
    if device != "cpu" and _has_cuda_onnxruntime():
        order += ["fp16"]
    return order + ["int8-cpu", "fp32"]


# Why a file of an export folder that its manifest.json does not list is not used or measured
UNLISTED = (
    "manifest.json does not list it (mars-export left it out: replaced by hand, or made before "
    "the last export)"
)
# ... and one it lists with other bytes: a bit flipped in a weight loads and runs, wrongly
CHANGED = (
    "its sha256 is not the one manifest.json gives (changed since mars-export wrote it: "
    "damaged in a copy or where it is stored, or replaced by hand)"
)


def listed_files(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The file names an export's manifest lists, each with the sha256 it gives for it ('' where
    none): its artifacts, and a TensorRT engine's metadata sidecar (its class names, threshold
    and shapes, which the runtime takes as they are), listed with its engine."""
    files = {}
    for entry in manifest["artifacts"]:
        files[str(entry["file"])] = str(entry.get("sha256") or "")
        side = entry.get("sidecar")
        if isinstance(side, dict):
            files[str(side["file"])] = str(side.get("sha256") or "")
    return files


def manifest_files(folder: Path) -> dict[str, str] | None:
    """`listed_files` of the export folder's manifest.json; None without a readable one (then
    the files go by their names alone)."""
    try:
        return listed_files(json.loads((folder / "manifest.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def changed_since_export(path: Path, sha256: str) -> bool:
    """`path`'s bytes are not those a manifest.json or SHA256SUMS gave `sha256` for (False
    where it gave none); a file that cannot be read is a one-line error."""
    if not sha256:
        return False
    try:
        return sha256_file(path) != sha256
    except OSError as e:
        raise MarsvisionError(f"cannot read {path} ({e.strerror or e})") from None


def export_change(path: Path, listed: Mapping[str, str]) -> str | None:
    """Why `path`, a file of an export folder whose manifest lists `listed` (`listed_files`),
    is not what the export wrote: CHANGED, or for an engine, its sidecar's change; None where
    neither changed (or the manifest gives no sha256). A file that cannot be read is a one-line
    error."""
    if changed_since_export(path, listed.get(path.name, "")):
        return CHANGED
    side = sidecar_path(path)  # listed only for an engine
    if changed_since_export(side, listed.get(side.name, "")):
        return f"its metadata sidecar {side.name}: {CHANGED}"
    return None


class DefaultModel(NamedTuple):
    """The model mars-infer runs when none is named, the --device to run it on, and a note for
    the user when a better export was passed over."""

    path: Path
    device: str
    note: str | None = None


def default_model(
    exports: str | os.PathLike[str] | None = None,
    task: str = DEFAULT_TASK,
    device: str = "auto",
    backend: str = "auto",
) -> DefaultModel:
    """The best existing export of `task` in `exports` (default: $MARS_EXPORTS, else ./exports)
    for `device` and `backend`. A TensorRT engine is taken only where it runs here (a GPU,
    cuda-python, and an engine built with this TensorRT for this GPU; not for backend
    onnxruntime). With device auto, the FP16 ONNX is taken only where onnxruntime really runs
    it on CUDA (FP16 on a CPU is several times slower than the INT8 export: 61 against 210
    images/s on the Xeon with AMX), else the next export runs on the CPU. The note says what
    was passed over, and why."""
    from marsvision.runtime.backends.tensorrt import engine_refusal

    folder = Path(exports) if exports is not None else default_exports_dir()
    flavours = _preferred_flavours(device, backend)
    listed = manifest_files(folder)
    notes = []
    if listed is None and (folder / "manifest.json").exists():  # the check would be off unseen
        notes.append(
            "manifest.json there is not mars-export's (unreadable, or of another shape): the "
            "files go by their names alone, unchecked"
        )
    for flavour in flavours:
        path = folder / artifact_name(task, flavour)
        if not path.is_file():
            continue
        if listed is not None and path.name not in listed:
            notes.append(f"passed over {path.name}: {UNLISTED}")
            continue
        if flavour.endswith("-engine"):  # TensorRT installed says nothing of a GPU or its build
            refusal = engine_refusal(path)
            if refusal is not None:
                notes.append(f"passed over {path.name}: {refusal}")
                continue
        if flavour == "fp16" and device == "auto":
            refusal = _cuda_refusal(path)
            if refusal is not None:
                notes.append(f"passed over {path.name}, made for a GPU: {refusal}")
                device = "cpu"
                continue
        if listed is not None:  # last: hashed only for the file about to be taken
            try:
                change = export_change(path, listed)
            except MarsvisionError as e:
                notes.append(f"passed over {path.name}: {e.message}")
                continue
            if change is not None:
                notes.append(f"passed over {path.name}: {change}")
                continue
        return DefaultModel(path, device, "; ".join(notes) or None)
    passed = f"; {'; '.join(notes)}" if notes else ""
    looked = f"looked for {', '.join(artifact_name(task, f) for f in flavours)}{passed}"
    other = _other_task_model(folder, task, flavours)
    if other is not None:  # mars-export refuses an --out holding another model's export
        raise MarsvisionError(
            f"no --engine given and no exported {task} model in {folder}/ ({looked}); it holds "
            f"another model's export: pass `--engine {shlex.quote(str(other))}` to run that one, "
            f"or export the shipped model to another folder (`mars-export --int8 --data DIR "
            f"--out {shlex.quote(str(folder) + '-' + task)}`) and pass --engine from there"
        )
    raise MarsvisionError(
        f"no --engine given and no exported {task} model in {folder}/ ({looked}): run "
        f"`mars-export --int8 --data DIR --out {shlex.quote(str(folder))}` first (it exports "
        "the shipped model; DIR: the MSL data set, for calibration), or pass --engine MODEL"
    )


def _other_task_model(folder: Path, task: str, flavours: list[str]) -> Path | None:
    """The best export of another task in `folder` by name (an msl25 model exported to the
    default folder), in the order of `flavours`; None without one."""
    for flavour in flavours:
        suffix = SUFFIXES[flavour]
        for path in sorted(folder.glob(f"{PREFIX}*{suffix}")):
            name = path.name.removeprefix(PREFIX).removesuffix(suffix)
            if name != task and "." not in name and path.is_file():
                return path
    return None
