"""Training augmentation on whole uint8 batches, on whatever device the batch lives on.

One affine resample per image does random-resized crop, horizontal flip and a small rotation;
then mild brightness/contrast/saturation jitter, optionally greying some images
(`AugmentSpec.grayscale`), and the spec's normalization. With `AugmentSpec.policy` "trivial",
each image also gets one TrivialAugment op (Muller & Hutter 2021) between the resample and the
jitter: one of `TRIVIAL_OPS` at a magnitude drawn uniformly from 31 steps of RandAugment's standard
ranges (torchvision's, rotation capped at 30 degrees); the geometric ops fold into the image's
affine, the colour ops are computed for the batch and picked per image, so nothing syncs. No
vertical flips: ground has no canonical orientation but the horizon does, and the label "horizon"
depends on it. Random parameters are drawn on the CPU from the given generator, so a seed
gives the same augmentations on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from marsvision.runtime.spec import PreprocessSpec
from marsvision.train.config import AugmentSpec

__all__ = ["TRIVIAL_OPS", "AugmentSpec", "augment_batch"]

# TrivialAugment's ops; the first six move pixels, the rest change their values
TRIVIAL_OPS = (
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
)
_OP = {name: i for i, name in enumerate(TRIVIAL_OPS)}
_BINS = 31  # magnitude steps, torchvision's default
# the largest magnitude of each op with one (RandAugment's standard space): shear factor,
# translation as a fraction of the side, degrees, enhancement factor 1 +- this
_MAX = {
    "shear_x": 0.3,
    "shear_y": 0.3,
    "translate_x": 150 / 331,
    "translate_y": 150 / 331,
    "rotate": 30.0,
    "brightness": 0.9,
    "color": 0.9,
    "contrast": 0.9,
    "sharpness": 0.9,
}
_TOP = torch.tensor([_MAX.get(name, 0.0) for name in TRIVIAL_OPS])  # by op index, 0 for none


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


def _trivial_draws(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image an op index of TRIVIAL_OPS and its value: a signed shear factor, translation
    (fraction of the side), angle (degrees) or enhancement offset; posterize's bits (8 to 4);
    solarize's threshold in [0, 1] (1 to 0)."""
    op = torch.randint(len(TRIVIAL_OPS), (n,), generator=g)
    step = torch.randint(_BINS, (n,), generator=g).float() / (_BINS - 1)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    value = _TOP[op] * step * sign
    value = torch.where(op == _OP["posterize"], 8 - torch.round(step * 4), value)
    return op, torch.where(op == _OP["solarize"], 1 - step, value)


def _with_trivial_geometry(theta: torch.Tensor, op: torch.Tensor, value: torch.Tensor) -> None:
    """Compose each image's geometric op into its crop affine, in place: the op acts on the
    output square (normalized [-1, 1] coordinates), then the crop maps it into the image."""
    n = theta.shape[0]
    m = torch.eye(3).repeat(n, 1, 1)
    rad = value * (math.pi / 180)
    rotate = op == _OP["rotate"]
    cos, sin = torch.where(rotate, torch.cos(rad), 1.0), torch.where(rotate, torch.sin(rad), 0.0)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
    m[:, 0, 1] += torch.where(op == _OP["shear_x"], value, 0.0)
    m[:, 1, 0] += torch.where(op == _OP["shear_y"], value, 0.0)
    m[:, 0, 2] = torch.where(op == _OP["translate_x"], 2 * value, 0.0)
    m[:, 1, 2] = torch.where(op == _OP["translate_y"], 2 * value, 0.0)
    full = torch.cat([theta, torch.tensor([0.0, 0.0, 1.0]).expand(n, 1, 3)], dim=1)
    theta.copy_(torch.bmm(full, m)[:, :2])


def _blend(x: torch.Tensor, base: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: base + factor * (x - base), clamped to [0, 1]."""
    return (base + factor * (x - base)).clamp(0, 1)


def _smoothed(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre 5, the rest 1, over 13); the border pixels unchanged."""
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5
    k = (k / 13).expand(x.shape[1], 1, 3, 3)
    out = x.clone()
    out[..., 1:-1, 1:-1] = F.conv2d(x, k, groups=x.shape[1])
    return out


def _equalized(u8: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.equalize per image and channel, on integer-valued float pixels in [0, 255]."""
    n, c, h, w = u8.shape
    flat = u8.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, device=u8.device).scatter_add_(
        1, flat, torch.ones_like(flat, dtype=torch.float32)
    )
    # PIL leaves out the highest value present: step = (pixels - its count) // 255
    last = 255 - (hist.flip(1) > 0).float().argmax(1, keepdim=True)
    step = torch.div(h * w - hist.gather(1, last), 255, rounding_mode="floor")
    lut = torch.div(hist.cumsum(1) + step // 2, step.clamp(min=1), rounding_mode="floor")
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp(0, 255)
    out = torch.where(step > 0, lut.gather(1, flat), flat.float())
    return out.view(n, c, h, w)


def _trivial_colour(x: torch.Tensor, op: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Each image's colour op (x in [0, 1], NCHW; op and value on x's device): every op is
    computed for the whole batch and each image keeps its own, so nothing waits on the host."""
    n = x.shape[0]
    op, value = op.view(n, 1, 1, 1), value.view(n, 1, 1, 1)
    factor = 1 + value
    grey = _luma(x)
    u8 = torch.round(x * 255)
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    span = torch.where(hi > lo, hi - lo, 1.0)
    bucket = torch.exp2(8 - value)  # posterize keeps the top `value` bits
    candidates = {
        "brightness": (x * factor).clamp(0, 1),
        "color": _blend(x, grey, factor),
        "contrast": _blend(x, grey.mean(dim=(2, 3), keepdim=True), factor),
        "sharpness": _blend(x, _smoothed(x), factor),
        "posterize": torch.floor(u8 / bucket) * bucket / 255,
        "solarize": torch.where(x >= value, 1 - x, x),
        "autocontrast": torch.where(hi > lo, (x - lo) / span, x),
        "equalize": _equalized(u8) / 255,
    }
    out = x
    for name, y in candidates.items():
        out = torch.where(op == _OP[name], y, out)
    return out


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
    # every random number and constant in one host tensor, one copy: no per-step GPU sync;
    # `cols` names each draw's columns in it
    parts: list[torch.Tensor] = []
    cols: dict[str, slice] = {}

    def add(name: str, column: torch.Tensor) -> None:
        start = sum(part.shape[1] for part in parts)
        cols[name] = slice(start, start + column.shape[1])
        parts.append(column)

    theta = _affine_params(n, aug, generator)
    if aug.jitter > 0:
        add(
            "jitter",
            torch.stack([_uniform(n, 1 - aug.jitter, 1 + aug.jitter, generator) for _ in "bcs"], 1),
        )
    # drawn only when on: runs without them keep their random stream
    if aug.grayscale > 0:
        add("grey", (torch.rand(n, generator=generator) < aug.grayscale).float().view(n, 1))
    if aug.policy == "trivial":
        op, value = _trivial_draws(n, generator)
        _with_trivial_geometry(theta, op, value)
        add("trivial", torch.stack([op.float(), value], 1))
    add("theta", theta.view(n, 6))  # added last, once the policy's geometry is composed in
    host = torch.cat([torch.cat(parts, 1).flatten(), torch.tensor([*spec.mean, *spec.std])])
    if batch.is_cuda:
        host = host.pin_memory()
    p = host.to(batch.device, non_blocking=True)
    params, mean, std = p[:-6].view(n, -1), p[-6:-3].view(1, 3, 1, 1), p[-3:].view(1, 3, 1, 1)
    grid = F.affine_grid(
        params[:, cols["theta"]].reshape(n, 2, 3), [n, 3, out_size, out_size], align_corners=False
    )
    x = F.grid_sample(
        batch.float() / 255.0, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    if "trivial" in cols:
        op_value = params[:, cols["trivial"]]
        x = _trivial_colour(x, op_value[:, 0].long(), op_value[:, 1])
    if "jitter" in cols:
        x = _jitter(x, params[:, cols["jitter"]])
    if "grey" in cols:
        grey = params[:, cols["grey"]].view(n, 1, 1, 1)
        x = grey * _luma(x) + (1 - grey) * x  # the luma broadcasts over the three channels
    return (x - mean) / std
