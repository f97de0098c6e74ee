"""Model metadata: what travels with every exported artifact so the runtime needs nothing else.

ONNX files carry it as JSON under the `marsvision` key of `metadata_props` (readable with
onnxruntime's `custom_metadata_map`, no `onnx` import needed). TensorRT engines carry it in a
JSON sidecar next to the engine: `model.plan` -> `model.plan.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.spec import PreprocessSpec

METADATA_KEY = "marsvision"
FORMAT_VERSION = 1  # raised where a key is added or changed: readers refuse keys they do not know
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class ModelMeta:
    """Everything the runtime needs to serve one artifact."""

    task: str  # "binary" or "msl25"
    class_names: list[str]
    preprocess: PreprocessSpec
    precision: str  # one of PRECISIONS
    input_name: str = "input"
    output_name: str = "logits"
    input_shape: list[int | str] = field(default_factory=list)  # e.g. ["batch", 3, 224, 224]
    output_shape: list[int | str] = field(default_factory=list)  # e.g. ["batch", 2]
    # Input tensor element type the artifact expects: "float32" or "float16".
    input_dtype: str = "float32"
    # INT8 only: {"activations": "uint8"|"int8", "weights": "int8", "per_channel": bool,
    #  "symmetric": bool, "method": ..., "calibrator_options": {...}, "images": N,
    #  "source": "train split", "target": ...}
    quantization: dict[str, Any] | None = None
    source_checkpoint_sha256: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    # TensorRT engines only: {"version": "10.x", "gpu_name": ..., "compute_capability": "9.0",
    #  "max_batch": N}
    tensorrt: dict[str, Any] | None = None
    # Binary models only: the label is class 1 (the positive class) when its probability is at
    # least this, else class 0; chosen on val when the model shipped. None: the most probable.
    decision_threshold: float | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise MarsvisionError(
                f"unknown precision {self.precision!r} in model metadata; expected one of "
                + ", ".join(PRECISIONS)
            )
        check_class_names(self.class_names)
        t = self.decision_threshold
        if t is not None and (len(self.class_names) != 2 or not 0.0 < t < 1.0):
            raise MarsvisionError(
                f"model metadata has decision_threshold {t!r}: only a two-class model can have "
                "one, strictly between 0 and 1"
            )

    @property
    def num_classes(self) -> int:
        """How many classes the model tells apart (its logits' width)."""
        return len(self.class_names)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class index of each row of softmax probabilities (N, classes), by the model's rule."""
        return decide(probs, self.decision_threshold)

    def to_json(self) -> str:
        """Serialize to a JSON string."""
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> ModelMeta:
        """Parse JSON written by `to_json`; anything else is a one-line user error."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise MarsvisionError(f"{source}: metadata is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise MarsvisionError(f"{source}: metadata is not a JSON object")
        # the version first: a newer one's keys are unknown here, and it needs a newer runtime
        check_format_version(d.get("format_version"), FORMAT_VERSION, f"{source}: metadata",
                             older="re-export it with this version of mars-export")  # fmt: skip
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise MarsvisionError(f"{source}: metadata has unknown keys {sorted(unknown)}")
        try:
            d["preprocess"] = PreprocessSpec.from_dict(d["preprocess"])
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise MarsvisionError(f"{source}: incomplete model metadata ({e})") from None
        except MarsvisionError as e:  # which file the bad value came from
            raise MarsvisionError(f"{source}: {e.message}") from None


def check_format_version(version: Any, current: int, what: str, *, older: str) -> None:
    """Refuse a file format's `version` other than `current`: a newer one was written by a newer
    marsvision (which bumps it where a change would be read wrong here), an older one or none
    says `older`, how to make it anew."""
    if version == current:
        return
    if isinstance(version, int) and version > current:
        raise MarsvisionError(
            f"{what} format {version} was written by a newer marsvision (this one reads format "
            f"{current}): upgrade marsvision (a newer clone, installed as this one was)"
        )
    raise MarsvisionError(f"{what} format {version!r} is not {current}; {older}")


# a spreadsheet cell starting with one of these is a formula, which opening the CSV runs
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def check_class_names(names: Any, where: object = None) -> None:
    """Refuse class names other than a list of distinct, non-empty strings: a label would print
    as "0" or "['a']", or two columns would share a name and a label could not say which. Nor
    may a name start as a formula: the CSV's label column would run it in a spreadsheet
    (`=HYPERLINK(...)` in every row). The message starts with `where` (the file) where given."""
    at = "" if where is None else f"{where}: "
    if not (
        isinstance(names, list)
        and names
        and all(isinstance(n, str) and n for n in names)
        and len(set(names)) == len(names)
    ):
        raise MarsvisionError(
            f"{at}class names {names!r}: they must be a list of distinct, non-empty names"
        )
    formulas = [n for n in names if n.startswith(FORMULA_START)]
    if formulas:
        raise MarsvisionError(
            f"{at}class name {formulas[0]!r} starts with {formulas[0][0]!r}: a spreadsheet opening "
            "the results would run it as a formula; rename the class"
        )


def decide(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Class index per row of probabilities: class 1 where its probability is >= `threshold`
    (two classes), or the most probable class when `threshold` is None."""
    if threshold is None:
        return probs.argmax(axis=1)
    return (probs[:, 1] >= threshold).astype(int)


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    """Where a TensorRT engine's metadata lives: `model.plan` -> `model.plan.json`."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def code_versions() -> dict[str, str]:
    """Versions of marsvision and of the torch-free libraries that shape what a model sees
    (Pillow decodes and resizes every image: another version, other pixels)."""
    from importlib.metadata import PackageNotFoundError, version

    import PIL

    try:
        mv = version("marsvision")
    except PackageNotFoundError:
        mv = "unknown"
    return {"marsvision": mv, "numpy": str(np.__version__), "pillow": str(PIL.__version__)}
