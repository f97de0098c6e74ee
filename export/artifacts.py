"""Metadata embedding, atomic writes and the out dir's manifest.json (artifact names come from
`marsvision.runtime.models`, which the runtime shares); quieting the exporters' logging."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from marsvision.runtime.errors import MarsvisionError, signals_held
from marsvision.runtime.files import atomic_write_text, make_folder, replace_durably, temporary
from marsvision.runtime.metadata import METADATA_KEY, ModelMeta, sidecar_path
from marsvision.runtime.models import PREFIX, SUFFIXES, export_change, listed_files

if TYPE_CHECKING:
    import onnx

MANIFEST = "manifest.json"


def log(msg: str) -> None:
    """A progress or note line of mars-export, on stderr."""
    print(f"mars-export: {msg}", file=sys.stderr, flush=True)


def prepare_out_dir(out: Path) -> Path:
    """Check the out dir can be written, then create it (a one-line user error otherwise)."""
    return make_folder(out, "--out")


@contextlib.contextmanager
def quiet_logger(name: str | None = None) -> Iterator[None]:
    """Raise one logger (the root logger if no name) to ERROR for the block, then restore it."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A temporary folder inside `out` (same file system, so `os.replace` is atomic); removed."""
    with temporary(out, ".staging.", folder=True) as tmp:
        yield tmp


def remove_dead_staging(out: Path) -> None:
    """Remove the staging folders that exports killed outright (SIGKILL, the OOM killer, a
    power cut) left in `out`, hundreds of MB each; only while holding `out`'s lock, so that none
    is a running export's."""
    for old in out.glob(".staging.*"):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
            log(f"removed {old.name} from {out}: the staging folder of an export that was killed")


def _publish(staged: Path, final: Path) -> None:
    """Move a complete file from the staging dir to its final name (atomic rename)."""
    replace_durably(staged, final)


def set_onnx_meta(model: onnx.ModelProto, meta: ModelMeta) -> None:
    """Store `meta` as JSON under `metadata_props[METADATA_KEY]` (replacing any older entry)."""
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = meta.to_json()


def onnx_meta(path: Path) -> ModelMeta:
    """Read the metadata of an exported ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise MarsvisionError(f"{path} carries no marsvision metadata; export it with mars-export")
    return ModelMeta.from_json(props[METADATA_KEY], source=str(path))


def _embedded_owner(path: Path) -> str:
    """The source checkpoint sha256 that an artifact's own metadata names ('' if none): the ONNX
    metadata, or an engine's sidecar; a damaged or foreign file names none."""
    try:
        if path.suffix == ".plan":
            text = sidecar_path(path).read_text(encoding="utf-8")
            return ModelMeta.from_json(text, source=str(path)).source_checkpoint_sha256
        return onnx_meta(path).source_checkpoint_sha256
    except Exception:  # noqa: BLE001 - damaged or foreign files raise many types: not ours
        return ""


def _refuse_other(out: Path, other: object, file: str = "") -> NoReturn:
    raise MarsvisionError(
        f"{out} holds artifacts of another model ({file and file + ': '}checkpoint sha256 "
        f"{str(other)[:12]}...); pass another --out or delete that directory"
    )


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object `path` holds; {} where it is unreadable or holds something else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_manifest_owner(out: Path, source_sha256: str) -> None:
    """Refuse an out dir that holds artifacts of another checkpoint: as its manifest.json says,
    or as the own metadata of an artifact it does not list (all of them, with no manifest: one
    copied in beside a manifest of this model's was left there for `--engine` to run)."""
    path = out / MANIFEST
    listed: set[object] = set()
    if path.exists():
        manifest = _json_object(path)
        owner = manifest.get("source_checkpoint_sha256")
        if not isinstance(owner, str):  # another program's manifest.json said "sha256 None..."
            raise MarsvisionError(
                f"{path} is not a marsvision manifest; pass another --out or delete it"
            )
        if owner != source_sha256:
            _refuse_other(out, owner)
        entries = manifest.get("artifacts")
        if isinstance(entries, list):
            listed = {a.get("file") for a in entries if isinstance(a, dict)}
    for suffix in SUFFIXES.values():
        for artifact in sorted(out.glob(f"{PREFIX}*{suffix}")):
            if artifact.name in listed:  # the manifest's own, so its owner's
                continue
            other = _embedded_owner(artifact)
            if other and other != source_sha256:
                _refuse_other(out, other, artifact.name)


def _calibration(entry: dict[str, Any]) -> object:
    """How an INT8 entry was quantized: the calibration cache its ranges came from and the op
    types whose outputs it leaves float (its Q/DQ placement); None for other precisions."""
    q = entry.get("quantization") or {}
    if q.get("calibration_cache") is None:
        return None
    return (q["calibration_cache"], q.get("float_outputs"))


def _as_written(path: Path, entry: dict[str, Any]) -> bool:
    """`path` holds the bytes its manifest `entry` gives, and so does an engine's sidecar where
    the entry lists one (`runtime.models.export_change`); an entry without a sha256 vouches for
    nothing, and a file that cannot be read is not as written."""
    if not entry.get("sha256"):
        return False
    try:
        return export_change(path, listed_files({"artifacts": [entry]})) is None
    except (MarsvisionError, KeyError, TypeError, AttributeError):  # unreadable; hand-edited
        return False


def _kept_entries(
    out: Path, old: dict[str, Any], fresh: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The entries of `old` to keep beside `fresh`: files not rewritten now, still there, with
    the bytes `old` vouched for, and an INT8 engine only while it was built from the INT8 ONNX
    of the same calibration as the one written now. A file not kept is left in place, unlisted,
    and said so."""
    names = {a["file"] for a in fresh}
    calibration = {a["flavour"]: _calibration(a) for a in fresh}.get("int8-trt")
    kept = []
    entries = old.get("artifacts")  # a hand-edited manifest may hold anything
    for a in entries if isinstance(entries, list) else []:
        if not isinstance(a, dict) or not isinstance(a.get("file"), str):
            continue
        path = out / a["file"]
        if a["file"] in names or not path.exists():
            continue
        if not _as_written(path, a):
            log(f"{path.name} is not the file an earlier export wrote (its sha256 differs, or "
                 f"its sidecar's): left in {out}, out of {MANIFEST}; export it again or delete "
                 "it")  # fmt: skip
            continue
        if a["flavour"] == "int8-engine" and calibration not in (None, _calibration(a)):
            log(f"{path.name} was built from an INT8 ONNX of another calibration or Q/DQ "
                 f"placement: left in {out}, out of {MANIFEST}; rebuild it with mars-export "
                 "--int8 where TensorRT can build engines")  # fmt: skip
            continue
        kept.append({**a, "exported": a.get("exported", old.get("created"))})
    return kept


def write_manifest(
    out: Path, manifest: dict[str, Any], *, staged: Sequence[tuple[Path, Path]] = ()
) -> dict[str, Any]:
    """Move the `staged` files (staging path, final path) into place and write manifest.json
    atomically, keeping entries of earlier exports of the same model.

    Every entry says when the export that wrote it ran (`exported`): the top-level `created`,
    `config` and `versions` are this export's, and `kept` lists the files an earlier export
    wrote. The renames and the manifest happen with Ctrl-C, SIGTERM and SIGHUP held: a signal
    between them left new files beside the manifest of the old ones. Returns the manifest as
    written.
    """
    path = out / MANIFEST
    fresh = [{**a, "exported": manifest["created"]} for a in manifest["artifacts"]]
    kept: list[dict[str, Any]] = []
    if path.exists():  # read before any file is replaced
        kept = _kept_entries(out, json.loads(path.read_text(encoding="utf-8")), fresh)
    manifest = {**manifest, "artifacts": kept + fresh, "kept": [a["file"] for a in kept]}
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    with signals_held():
        for src, dst in staged:
            _publish(src, dst)
        atomic_write_text(path, text)
    return manifest
