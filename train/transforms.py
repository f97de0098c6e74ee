"""torchvision transforms: the eval transform (the reference implementation of the spec)."""

from __future__ import annotations

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from marsvision.runtime.spec import PreprocessSpec


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision's InterpolationMode for a spec interpolation name."""
    return InterpolationMode(name)


def eval_transform(spec: PreprocessSpec) -> T.Compose:
    """PIL RGB image -> normalized float32 CHW tensor, exactly as the spec says."""
    return T.Compose(
        [
            T.Resize(spec.resize_size, interpolation=interpolation_mode(spec.interpolation)),
            T.CenterCrop(spec.input_size),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )


def normalize_uint8(batch: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 NCHW (any device) -> normalized float32, as step 4 of the spec."""
    mean = torch.tensor(spec.mean, device=batch.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std, device=batch.device).view(1, 3, 1, 1) * 255.0
    return (batch.float() - mean) / std
