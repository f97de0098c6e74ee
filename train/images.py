"""Decode a split's images ONCE into memory: uint8 tensors for training, eval tensors for val/test.

Training images are stored as uint8 squares (shorter side resized to `store_size`, then
center-cropped) so augmentation runs on whole batches, on the GPU when there is one.
Eval tensors are exactly `eval_transform(spec)` of each image (the PIL reference path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.spec import PreprocessSpec
from marsvision.train.data import Sample
from marsvision.train.transforms import eval_transform, interpolation_mode

T = TypeVar("T")


def open_rgb(path: Path) -> Image.Image:
    """Decode one image file to RGB; an unreadable file is a user error naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MarsvisionError(
            f"listed image {path} cannot be read ({str(e).splitlines()[0][:100]}); "
            "re-download the data set"
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

    return torch.from_numpy(np.stack(_map(one, samples, workers)))


def eval_tensors(samples: Sequence[Sample], *, spec: PreprocessSpec, workers: int) -> torch.Tensor:
    """float32 (N, 3, S, S): `eval_transform(spec)` of each image, computed once per run."""
    tf = eval_transform(spec)

    def one(s: Sample) -> torch.Tensor:
        out: torch.Tensor = tf(open_rgb(s.path))
        return out

    return torch.stack(_map(one, samples, workers))
