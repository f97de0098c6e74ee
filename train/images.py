"""Decode a split's images ONCE into memory: uint8 tensors for training, eval tensors for val/test.

Training images are stored as uint8 squares (shorter side resized to `store_size`, then
center-cropped) so augmentation runs on whole batches, on the GPU when there is one.
Eval tensors are exactly `eval_transform(spec)` of each image (the PIL reference path).
Inside `decoded_once()` (the sweep) a list of files is decoded once per preprocessing for all
the runs, distillations and scorings in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from marsvision.runtime.errors import MarsvisionError, clipped
from marsvision.runtime.preprocess import raster_formats, to_rgb
from marsvision.runtime.spec import PreprocessSpec
from marsvision.train.data import REDOWNLOAD, Sample
from marsvision.train.transforms import eval_transform, interpolation_mode

T = TypeVar("T")

_decoded: dict[tuple[Hashable, ...], torch.Tensor] | None = None  # set inside decoded_once()


@contextlib.contextmanager
def decoded_once() -> Iterator[None]:
    """Within the block (nested blocks share it), `train_store` and `eval_tensors` keep what
    they decode, by file list and preprocessing, and hand the same tensor to later calls: a
    sweep's runs, distillations and final scoring decode each file once per preprocessing
    instead of once per call (on the GPU machine the decoding, not the GPU, is a run's fixed
    cost). Callers must not change the tensors in place (none does: they index or copy them).
    The memory is freed when the outermost block ends."""
    global _decoded
    outer = _decoded
    if outer is None:
        _decoded = {}
    try:
        yield
    finally:
        _decoded = outer


def _remembered(key: tuple[Hashable, ...], decode: Callable[[], torch.Tensor]) -> torch.Tensor:
    if _decoded is None:
        return decode()
    if key not in _decoded:
        _decoded[key] = decode()
    return _decoded[key]


def _files(samples: Sequence[Sample]) -> tuple[str, ...]:
    return tuple(str(s.path) for s in samples)


def open_rgb(path: Path) -> Image.Image:
    """Decode one image file to RGB; an unreadable file is a user error naming it."""
    try:
        with Image.open(path, formats=raster_formats()) as img:
            rgb = to_rgb(img)  # as mars-infer decodes it: 16-bit files scaled alike, no EPS
            rgb.load()
            return rgb
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MarsvisionError(
            f"listed image {path} cannot be read ({clipped(str(e), 100)}); "
            f"re-download the data set into an empty folder: {REDOWNLOAD}"
        ) from None


def _map(fn: Callable[[Sample], T], samples: Sequence[Sample], workers: int) -> list[T]:
    """fn over samples, on `workers` threads (Pillow releases the GIL while decoding)."""
    if workers <= 1 or len(samples) < 2:
        return [fn(s) for s in samples]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, samples))


def train_store(
    samples: Sequence[Sample], *, store_size: int, interpolation: str, workers: int
) -> torch.Tensor:
    """uint8 (N, 3, store_size, store_size): each image resized (shorter side), center-cropped."""
    from torchvision.transforms import functional as F

    mode = interpolation_mode(interpolation)

    def one(s: Sample) -> np.ndarray:
        img = F.center_crop(F.resize(open_rgb(s.path), store_size, interpolation=mode), store_size)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)

    key = ("train", _files(samples), store_size, interpolation)
    return _remembered(key, lambda: torch.from_numpy(np.stack(_map(one, samples, workers))))


def eval_tensors(samples: Sequence[Sample], *, spec: PreprocessSpec, workers: int) -> torch.Tensor:
    """float32 (N, 3, S, S): `eval_transform(spec)` of each image, computed once per run."""
    tf = eval_transform(spec)

    def one(s: Sample) -> torch.Tensor:
        out: torch.Tensor = tf(open_rgb(s.path))
        return out

    return _remembered(
        ("eval", _files(samples), spec), lambda: torch.stack(_map(one, samples, workers))
    )
