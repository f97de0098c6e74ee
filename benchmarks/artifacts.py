"""Find the artifacts of an export out dir (its manifest.json, else the file names) and say
which backend runs each one, or why it cannot run here."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from marsvision.export.artifacts import MANIFEST
from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.models import SUFFIXES, UNLISTED, export_change, listed_files

# Report order: the reference precision first, then by falling precision.
FLAVOUR_ORDER = tuple(SUFFIXES)
ENGINE_FLAVOURS = ("fp16-engine", "int8-engine")


def check_exported_from(source_sha256: str, artifact: Path | str, checkpoint: Path,
                        checkpoint_sha256: str) -> None:  # fmt: skip
    """Refuse an artifact whose metadata names another source checkpoint than the reference
    (`source_sha256`: its metadata's; empty for files from before it was recorded): parity and
    speed figures would compare two models."""
    if source_sha256 and source_sha256 != checkpoint_sha256:
        raise MarsvisionError(
            f"{artifact} was exported from another checkpoint (sha256 {source_sha256[:12]}..., "
            f"{checkpoint} is {checkpoint_sha256[:12]}...); pass the checkpoint it came from"
        )


@dataclass(frozen=True)
class Artifact:
    """One exported model file."""

    path: Path
    flavour: str  # a key of runtime.models.SUFFIXES, e.g. "int8-cpu", "fp16-engine"
    # a manifest is there and does not list it: not this export's file, never measured
    unlisted: bool = False
    # the files the manifest lists, each with the sha256 it gives (`listed_files`; none without
    # a manifest)
    listed: Mapping[str, str] = field(default_factory=dict, compare=False)

    @cached_property
    def change(self) -> str | None:
        """Why its bytes (or an engine's sidecar's) are not those the manifest vouches for:
        changed since the export (damaged, or replaced by hand); None where they are. Hashed
        when first asked, for an artifact about to be used. One that cannot be read (an engine's
        listed sidecar deleted) is such a change: its row, not the whole run, says so."""
        try:
            return export_change(self.path, self.listed)
        except MarsvisionError as e:
            return e.message

    @property
    def precision(self) -> str:
        """fp32, fp16 or int8: which parity thresholds apply."""
        return self.flavour.split("-")[0]

    @property
    def is_engine(self) -> bool:
        """Whether it is a TensorRT engine (run by TensorRT, not onnxruntime)."""
        return self.flavour in ENGINE_FLAVOURS

    @property
    def size_mib(self) -> float:
        """The file's size on disk."""
        return self.path.stat().st_size / (1024 * 1024)


def _flavour_of(name: str) -> str | None:
    # Longest suffix first: ".int8-cpu.onnx" must not be read as something shorter.
    for flavour, suffix in sorted(SUFFIXES.items(), key=lambda kv: -len(kv[1])):
        if name.endswith(suffix):
            return flavour
    return None


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The out dir's manifest.json as a dict, None when absent; malformed is a user error."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MarsvisionError(f"{path} is not valid JSON ({e}); re-run mars-export") from None
    if not isinstance(data, dict) or not isinstance(data.get("artifacts", []), list):
        raise MarsvisionError(f"{path} is not a marsvision manifest (no 'artifacts' list)")
    return data


def find_artifacts(out_dir: str | Path) -> list[Artifact]:
    """Every artifact of an export out dir, in FLAVOUR_ORDER; none is a user error."""
    d = Path(out_dir)
    if not d.is_dir():
        raise MarsvisionError(f"--artifacts {d}: no such directory (an out dir of mars-export)")
    manifest = read_manifest(d)
    artifacts = (manifest or {}).get("artifacts", [])
    try:
        listed = listed_files({"artifacts": artifacts})
    except (KeyError, TypeError, AttributeError):  # hand-edited: an entry names no file
        raise MarsvisionError(
            f"{d / MANIFEST} is not a marsvision manifest (an entry names no file); re-run "
            "mars-export"
        ) from None
    entries = {str(e["file"]): e for e in artifacts}
    found = []
    for path in sorted(d.iterdir()):
        flavour = _flavour_of(path.name)
        if flavour is None or not path.is_file():
            continue
        unlisted = manifest is not None and path.name not in entries
        found.append(Artifact(path, flavour, unlisted, listed))
    missing = [name for name in entries if not (d / name).is_file()]
    if missing:
        raise MarsvisionError(
            f"{d / MANIFEST} lists {', '.join(missing)}, which are not there; re-run mars-export"
        )
    if not found:
        raise MarsvisionError(
            f"{d} holds no exported models (*{', *'.join(SUFFIXES.values())}); run mars-export"
        )
    return sorted(found, key=lambda a: (FLAVOUR_ORDER.index(a.flavour), a.path.name))


def skip_reason(artifact: Artifact, device: str) -> str | None:
    """Why this artifact cannot run here, or is not measured (None when it runs)."""
    if artifact.unlisted:
        return UNLISTED
    if artifact.is_engine:
        if device == "cpu":
            return "TensorRT engines need a GPU; this run is on the CPU (--device cpu, or no GPU)"
        from marsvision.export.tensorrt import TRT_INSTALL_HINT, tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        if reason:
            return f"{reason} ({TRT_INSTALL_HINT} on a machine with an NVIDIA GPU)"
    return None
