"""The preprocessing spec: the one definition of how an image becomes a network input.

It travels inside every checkpoint and exported artifact. The training stage implements it
with torchvision (eval transform), the runtime with Pillow and numpy; both follow this text:

1. Decode the file and convert it to 8-bit RGB.
2. Resize so that the *shorter* side is `resize_size` (aspect kept, the longer side is
   `int(resize_size * long / short)` as torchvision computes it), with `interpolation`
   (Pillow's filter of that name, as torchvision does for PIL images).
3. Center-crop `input_size` x `input_size` (torchvision's CenterCrop rounding).
4. Scale to float32 in [0, 1], subtract `mean`, divide by `std` (per RGB channel).
5. Lay out as NCHW float32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from marsvision.runtime.errors import MarsvisionError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
MIN_INPUT_SIZE = 32  # ResNet-50 downsamples 32x; below this the last stage has no pixels
DEFAULT_CROP_PCT = 0.875


@dataclass(frozen=True)
class PreprocessSpec:
    """How to turn a decoded image into one row of the network input."""

    input_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.input_size < MIN_INPUT_SIZE:
            raise MarsvisionError(
                f"input size {self.input_size} is too small: ResNet-50 needs at least "
                f"{MIN_INPUT_SIZE} px"
            )
        if self.resize_size < self.input_size:
            raise MarsvisionError(
                f"resize size {self.resize_size} is smaller than the crop {self.input_size}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise MarsvisionError(
                f"unknown interpolation {self.interpolation!r}; choose one of "
                + ", ".join(INTERPOLATIONS)
            )
        if (
            len(self.mean) != 3
            or len(self.std) != 3
            or not all(math.isfinite(v) for v in (*self.mean, *self.std))
            or min(self.std) <= 0
        ):  # an inf std passes the check `> 0` and flattens a channel; NaN makes no output
            raise MarsvisionError(
                f"mean {list(self.mean)} and std {list(self.std)}: three finite numbers each, "
                "std positive"
            )

    @classmethod
    def for_input_size(cls, input_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> PreprocessSpec:
        """The default spec for a square input: resize to input/crop_pct, center crop."""
        return cls(input_size=input_size, resize_size=int(round(input_size / crop_pct)))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        """Parse a dict written by `to_dict`; unknown or missing keys fail loudly."""
        if not isinstance(d, dict):
            raise MarsvisionError(f"preprocessing spec {d!r} is not a mapping of its settings")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise MarsvisionError(f"preprocessing spec has unknown keys: {sorted(unknown)}")
        try:
            sizes = {k: d[k] for k in ("input_size", "resize_size")}
            mean, std = d.get("mean", IMAGENET_MEAN), d.get("std", IMAGENET_STD)
            interpolation = d.get("interpolation", "bilinear")
        except KeyError as e:
            raise MarsvisionError(f"preprocessing spec {d!r} has no {e}") from None
        # as written by to_dict: whole numbers, not 64.7 cut to 64 or the text "64"
        if not all(_is_int(v) for v in sizes.values()):
            raise MarsvisionError(f"preprocessing spec {d!r}: sizes must be whole numbers")
        if not all(
            isinstance(v, (list, tuple)) and all(_is_number(x) for x in v) for v in (mean, std)
        ):
            raise MarsvisionError(f"preprocessing spec {d!r}: mean and std must be numbers")
        if not isinstance(interpolation, str):
            raise MarsvisionError(f"preprocessing spec {d!r}: interpolation must be a name")
        return cls(
            interpolation=interpolation,
            mean=tuple(float(x) for x in mean),  # type: ignore[arg-type]
            std=tuple(float(x) for x in std),  # type: ignore[arg-type]
            **sizes,
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
