"""Camera-adversarial training (`--camera-adversary W`; Ganin & Lempitsky 2015, DANN): a small
head predicts the camera (Mastcam or MAHLI) from the pooled features through a gradient reversal
layer, so the backbone learns features that do not give the camera away. Train's MAHLI images
are 84% Rover, so "close-up = Rover" is a shortcut; val's and test's Surface images are MAHLI.

Only training uses it: the head is not part of the checkpoint, and export and the runtime never
see it. With `--balance group` the camera loss takes the class loss's per-image weights (by
camera and MSL class), so that within each camera both labels count; otherwise it is unweighted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from marsvision.train import data as msl

MAHLI = "MH"


def camera_domains(samples: Sequence[msl.Sample]) -> np.ndarray:
    """Per image: 1 for a MAHLI file (MH), 0 for any other camera (Mastcam ML/MR)."""
    return np.array([int(msl.camera(x.path) == MAHLI) for x in samples], dtype=np.int64)


def reversal_coef(progress: float, weight: float) -> float:
    """The reversed gradient's scale at `progress` (0-1) of training: `weight` times DANN's ramp
    2 / (1 + exp(-10 p)) - 1, so the random early features are not pushed around."""
    return weight * (2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coef: float) -> torch.Tensor:
        ctx.coef = coef
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coef * grad, None


def grad_reverse(x: torch.Tensor, coef: float) -> torch.Tensor:
    """Identity forward; the backward pass multiplies the gradient by -coef."""
    out: torch.Tensor = _GradReverse.apply(x, coef)
    return out


class CameraAdversary(nn.Module):
    """Camera logits (2) from pooled backbone features, behind a gradient reversal."""

    def __init__(self, in_features: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, 2))  # fmt: skip

    def forward(self, features: torch.Tensor, coef: float) -> torch.Tensor:
        """Camera logits; the backbone receives the gradient reversed and scaled by `coef`."""
        out: torch.Tensor = self.net(grad_reverse(features, coef))
        return out


@contextmanager
def pooled_features(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, each forward pass of the torchvision ResNet `model` puts the features its
    classifier `fc` receives (N, 2048) into the yielded list (the last one at [-1])."""
    seen: list[torch.Tensor] = []

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen[:] = [args[0]]

    fc = model.fc
    assert isinstance(fc, nn.Module)
    handle = fc.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@dataclass
class CameraTask:
    """What a training epoch needs for the camera adversary."""

    head: CameraAdversary
    domains: torch.Tensor  # per training image, on the device: 1 MAHLI, 0 other
    weight: float  # --camera-adversary: the largest reversal coefficient
    loss_fn: nn.Module  # cross-entropy; reduction "none" when the images carry weights

    def coef(self, progress: float) -> float:
        """The reversal coefficient at `progress` (0-1) of the whole run."""
        return reversal_coef(progress, self.weight)


def camera_task(
    model: nn.Module, samples: Sequence[msl.Sample], *, weight: float, weighted: bool,
    device: torch.device,
) -> CameraTask:  # fmt: skip
    """The head (sized to `model.fc`'s input) and the camera labels of `samples`."""
    fc = model.fc
    assert isinstance(fc, nn.Linear)
    return CameraTask(
        head=CameraAdversary(fc.in_features).to(device),
        domains=torch.tensor(camera_domains(samples), device=device),
        weight=weight,
        loss_fn=nn.CrossEntropyLoss(reduction="none" if weighted else "mean"),
    )
