"""Training augmentation on whole uint8 batches, on whatever device the batch lives on.

One affine resample per image does random-resized crop, horizontal flip and a small rotation;
then mild brightness/contrast/saturation jitter, optionally greying some images
(`AugmentSpec.grayscale`), and the spec's normalization. No vertical
flips: ground has no canonical orientation but the horizon does, and the label "horizon"
depends on it. Random parameters are drawn on the CPU from the given generator, so a seed
gives the same augmentations on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from marsvision.runtime.spec import PreprocessSpec
from marsvision.train.config import AugmentSpec

__all__ = ["AugmentSpec", "augment_batch"]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float32)


def _affine_params(n: int, aug: AugmentSpec, g: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) affine_grid matrices: output [-1, 1]^2 -> input coordinates."""
    area = _uniform(n, aug.scale[0], aug.scale[1], g)
    log_r = _uniform(n, math.log(aug.ratio[0]), math.log(aug.ratio[1]), g)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # half-extent in normalized units
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (2 * torch.rand(n, generator=g) - 1) * (1 - w)
    cy = (2 * torch.rand(n, generator=g) - 1) * (1 - h)
    angle = _uniform(n, -aug.rotate_deg, aug.rotate_deg, g) * (math.pi / 180)
    flip = torch.ones(n)
    if aug.hflip:
        flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.empty(n, 2, 3)
    theta[:, 0, 0] = cos * w * flip
    theta[:, 0, 1] = -sin * h
    theta[:, 0, 2] = cx
    theta[:, 1, 0] = sin * w * flip
    theta[:, 1, 1] = cos * h
    theta[:, 1, 2] = cy
    return theta


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, h, w) grey of NCHW RGB, ITU-R 601 weights (as Pillow's convert("L"))."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation `factors` (n, 3); x in [0, 1], NCHW."""
    b, c, s = factors.T.reshape(3, -1, 1, 1, 1)
    x = x * b
    mean = _luma(x).clamp(0, 1).mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * c + mean
    gray = _luma(x)
    x = (x - gray) * s + gray
    return x.clamp(0, 1)


def augment_batch(
    batch: torch.Tensor,
    *,
    out_size: int,
    spec: PreprocessSpec,
    aug: AugmentSpec,
    generator: torch.Generator,
) -> torch.Tensor:
    """uint8 NCHW -> augmented, normalized float32 NCHW of `out_size` on the batch's device."""
    n = batch.shape[0]
    # every random number and constant in one host tensor, one copy: no per-step GPU sync
    parts = [_affine_params(n, aug, generator).view(n, 6)]
    if aug.jitter > 0:
        parts += [_uniform(n, 1 - aug.jitter, 1 + aug.jitter, generator).view(n, 1) for _ in "bcs"]
    if aug.grayscale > 0:  # drawn only when on: runs without it keep their random stream
        parts.append((torch.rand(n, generator=generator) < aug.grayscale).float().view(n, 1))
    host = torch.cat([torch.cat(parts, 1).flatten(), torch.tensor([*spec.mean, *spec.std])])
    if batch.is_cuda:
        host = host.pin_memory()
    p = host.to(batch.device, non_blocking=True)
    params, mean, std = p[:-6].view(n, -1), p[-6:-3].view(1, 3, 1, 1), p[-3:].view(1, 3, 1, 1)
    theta = params[:, :6].reshape(n, 2, 3)
    grid = F.affine_grid(theta, [n, 3, out_size, out_size], align_corners=False)
    x = F.grid_sample(
        batch.float() / 255.0, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    if aug.jitter > 0:
        x = _jitter(x, params[:, 6:9])
    if aug.grayscale > 0:
        grey = params[:, -1].view(n, 1, 1, 1)
        x = grey * _luma(x) + (1 - grey) * x  # the luma broadcasts over the three channels
    return (x - mean) / std
