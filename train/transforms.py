"""torchvision transforms: the eval transform (the reference implementation of the spec)."""

from __future__ import annotations

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
