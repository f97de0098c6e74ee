"""The TrivialAugment policy (`--augment-policy trivial`): each op against Pillow's own, the
geometry folded into the crop's affine, and the random stream of runs without it kept."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.spec import PreprocessSpec
from marsvision.train import augment
from marsvision.train import data as msl
from marsvision.train.augment import TRIVIAL_OPS, AugmentSpec, augment_batch
from marsvision.train.config import TrainConfig, command_line, config_from_flags
from marsvision.train.images import train_store


def _images(msl_dir: Path, n: int = 4, size: int = 48) -> torch.Tensor:
    """n real MSL images, uint8 NCHW, `size` square (the store centre-crops them square)."""
    samples = msl.read_split(msl_dir, "train", "binary", limit=n)
    return train_store(samples, store_size=size, interpolation="bilinear", workers=2)


def _pil(u8: torch.Tensor) -> Image.Image:
    return Image.fromarray(u8.permute(1, 2, 0).contiguous().numpy())


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()


# op, its value (as _trivial_draws gives it), Pillow's op, the largest difference allowed in
# 0-255 levels (Pillow rounds to integers at each stage and takes an integer grey)
PIL_OPS: list[tuple[str, float, Callable[[Image.Image], Image.Image], float]] = [
    ("brightness", 0.45, lambda im: ImageEnhance.Brightness(im).enhance(1.45), 1),
    ("brightness", -0.6, lambda im: ImageEnhance.Brightness(im).enhance(0.4), 1),
    ("color", 0.9, lambda im: ImageEnhance.Color(im).enhance(1.9), 3),
    ("color", -0.9, lambda im: ImageEnhance.Color(im).enhance(0.1), 2),
    ("contrast", 0.6, lambda im: ImageEnhance.Contrast(im).enhance(1.6), 2),
    ("contrast", -0.5, lambda im: ImageEnhance.Contrast(im).enhance(0.5), 1),
    ("sharpness", 0.9, lambda im: ImageEnhance.Sharpness(im).enhance(1.9), 2),
    ("sharpness", -0.9, lambda im: ImageEnhance.Sharpness(im).enhance(0.1), 1),
    ("posterize", 4.0, lambda im: ImageOps.posterize(im, 4), 0),
    ("posterize", 6.0, lambda im: ImageOps.posterize(im, 6), 0),
    ("solarize", 0.5, lambda im: ImageOps.solarize(im, 128), 0),  # i >= 127.5 for 8-bit i
    ("solarize", 0.0, lambda im: ImageOps.solarize(im, 0), 0),
    ("autocontrast", 0.0, ImageOps.autocontrast, 1),
    ("equalize", 0.0, ImageOps.equalize, 0),
]


@pytest.mark.parametrize(("name", "value", "pil_op", "levels"), PIL_OPS)
def test_colour_ops_match_pillow(
    msl_dir: Path, name: str, value: float, pil_op: Callable[[Image.Image], Image.Image],
    levels: float,
) -> None:  # fmt: skip
    u8 = _images(msl_dir)
    n = u8.shape[0]
    op = torch.full((n,), TRIVIAL_OPS.index(name))
    got = augment._trivial_colour(u8.float() / 255, op, torch.full((n,), value)) * 255
    want = torch.stack([_tensor(pil_op(_pil(im))) for im in u8])
    assert (got.round() - want).abs().max() <= levels
    assert not torch.equal(want, u8.float())  # the op did something to these images


def test_each_image_keeps_its_own_op(msl_dir: Path) -> None:
    u8 = _images(msl_dir)
    x = u8.float() / 255
    names = ("identity", "solarize", "rotate", "equalize")
    op = torch.tensor([TRIVIAL_OPS.index(n) for n in names])
    value = torch.tensor([0.3, 0.0, 20.0, 0.0])
    got = augment._trivial_colour(x, op, value)
    assert torch.equal(got[0], x[0]) and torch.equal(got[2], x[2])  # rotate is geometry
    assert torch.allclose(got[1], 1 - x[1])  # threshold 0: every pixel inverted
    want = _tensor(ImageOps.equalize(_pil(u8[3]))) / 255
    assert torch.allclose(got[3], want)


def test_geometry_composes_into_the_crop() -> None:
    names = ("identity", "rotate", "shear_x", "translate_y", "brightness")
    op = torch.tensor([TRIVIAL_OPS.index(n) for n in names])
    value = torch.tensor([0.2, 90.0, 0.3, -0.25, 0.5])
    crop = torch.tensor([[0.5, 0.0, 0.1], [0.0, 0.25, -0.2]]).repeat(5, 1, 1)
    theta = crop.clone()
    augment._with_trivial_geometry(theta, op, value)
    for i in (0, 4):  # not geometric: the crop as drawn
        assert torch.equal(theta[i], crop[i])
    # the op acts on the output square first: crop o op
    rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
    shear = torch.tensor([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0]])
    shift = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, -0.5]])  # a quarter of the side = 0.5
    for i, m in ((1, rot), (2, shear), (3, shift)):
        full = torch.cat([m, torch.tensor([[0.0, 0.0, 1.0]])])
        assert torch.allclose(theta[i], crop[i] @ full, atol=1e-6)


def test_draws_cover_the_ops_and_ranges() -> None:
    op, value = augment._trivial_draws(20000, torch.Generator().manual_seed(0))
    counts = torch.bincount(op, minlength=len(TRIVIAL_OPS))
    assert counts.min() > 20000 / len(TRIVIAL_OPS) * 0.85
    for name, top in (("rotate", 30.0), ("shear_x", 0.3), ("brightness", 0.9)):
        v = value[op == TRIVIAL_OPS.index(name)]
        assert math.isclose(v.max().item(), top, rel_tol=1e-6)
        assert math.isclose(v.min().item(), -top, rel_tol=1e-6)
    bits = value[op == TRIVIAL_OPS.index("posterize")]
    assert set(bits.tolist()) == {4.0, 5.0, 6.0, 7.0, 8.0}
    threshold = value[op == TRIVIAL_OPS.index("solarize")]
    assert threshold.min() == 0 and threshold.max() == 1


def test_policy_off_keeps_the_stream_and_on_changes_only_some(msl_dir: Path) -> None:
    u8 = _images(msl_dir, n=8, size=64)
    spec = PreprocessSpec.for_input_size(64)
    plain = AugmentSpec(rotate_deg=0.0, jitter=0.0)
    trivial = dataclasses.replace(plain, policy="trivial")
    g_off = torch.Generator().manual_seed(5)
    off = augment_batch(u8, out_size=64, spec=spec, aug=plain, generator=g_off)
    # off, the policy draws nothing: the stream goes on as before it existed (the crop's draws)
    g_crop = torch.Generator().manual_seed(5)
    augment._affine_params(8, plain, g_crop)
    assert torch.equal(g_off.get_state(), g_crop.get_state())
    on = augment_batch(u8, out_size=64, spec=spec, aug=trivial,
                       generator=torch.Generator().manual_seed(5))  # fmt: skip
    again = augment_batch(u8, out_size=64, spec=spec, aug=trivial,
                          generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert torch.equal(on, again)
    # the policy's draws come after the crop's: an image whose op is identity is the same (so
    # may one whose op leaves it be, e.g. solarize above its brightest pixel); most are not
    g = torch.Generator().manual_seed(5)
    augment._affine_params(8, plain, g)
    op, _ = augment._trivial_draws(8, g)
    same = [bool(torch.allclose(a, b, atol=1e-5)) for a, b in zip(on, off, strict=True)]
    identity = [o == TRIVIAL_OPS.index("identity") for o in op.tolist()]
    assert any(identity) and all(s for s, i in zip(same, identity, strict=True) if i)
    assert sum(same) <= 3
    # with the jitter and --grayscale 1 on top: every image still grey
    grey = augment_batch(u8, out_size=64, spec=spec,
                         aug=dataclasses.replace(trivial, jitter=0.2, grayscale=1.0),
                         generator=torch.Generator().manual_seed(5))  # fmt: skip
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    rgb = grey * std + mean
    assert (rgb - rgb[:, :1]).abs().max() < 1e-5


def test_augment_policy_flag_round_trip() -> None:
    cfg = config_from_flags("default", data=Path("d"), out=Path("o"), augment_policy="trivial")
    assert cfg.augment.policy == "trivial" and cfg.augment.jitter == 0.2
    assert "--augment-policy trivial" in command_line(cfg.to_dict())
    plain = TrainConfig(data=Path("d"), out=Path("o")).to_dict()
    assert "--augment-policy" not in command_line(plain)
    with pytest.raises(MarsvisionError, match="augment-policy"):
        config_from_flags("default", data=Path("d"), out=Path("o"), augment_policy="rand")


# --- the base augmentation's crop, rotation and colour jitter, measured on the outputs

_IDENTITY = AugmentSpec(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotate_deg=0.0, hflip=False, jitter=0.0)


def _rgb(out: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """augment_batch's normalized output back in [0, 1]."""
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    return out * std + mean


def _ramps(n: int, size: int = 64) -> torch.Tensor:
    """n uint8 images whose red is 4 x the column and green 4 x the row (blue 128): bilinear
    resampling keeps them linear, so an output pixel's red and green say where in the input it
    was sampled."""
    ramp = torch.arange(size) * 4
    img = torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size),
                       torch.full((size, size), 128)])  # fmt: skip
    return img.to(torch.uint8).expand(n, 3, size, size).contiguous()


def _steps(out: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """(n, 2, 2): input pixels moved (x, y) per output pixel along a row (d/dcolumn) and down a
    column (d/drow), from augmented `_ramps`; a least-squares plane over the central half of
    each output, inside the image whatever the crop or angle."""
    px = _rgb(out, spec).double() * 255 / 4  # the input pixel coordinates sampled
    size = out.shape[-1]
    c = slice(size // 4, 3 * size // 4)
    row, col = torch.meshgrid(torch.arange(size, dtype=torch.float64),
                              torch.arange(size, dtype=torch.float64), indexing="ij")  # fmt: skip
    a = torch.stack([torch.ones_like(col[c, c]), col[c, c], row[c, c]], -1).reshape(-1, 3)
    steps = torch.empty(out.shape[0], 2, 2, dtype=torch.float64)
    for k in range(out.shape[0]):
        for ch in (0, 1):
            fit = torch.linalg.lstsq(a, px[k, ch, c, c].reshape(-1, 1)).solution.flatten()
            steps[k, ch] = fit[1:]
    return steps


def test_crop_area_sets_the_zoom() -> None:
    """The random-resized crop covers the area fraction drawn from `scale` at an aspect ratio
    from `ratio`: a fixed quarter of the image, 64 px sampled to 32, steps one input pixel per
    output pixel. With the drawn area ignored (every crop the whole image) the suite passed."""
    spec = PreprocessSpec.for_input_size(32)
    quarter = dataclasses.replace(_IDENTITY, scale=(0.25, 0.25))
    out = augment_batch(_ramps(8), out_size=32, spec=spec, aug=quarter,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    want = torch.eye(2, dtype=torch.float64).expand(8, 2, 2)  # half the side: 32 of 64 px
    steps = _steps(out, spec)
    assert torch.allclose(steps, want, atol=1e-4), steps.diagonal(dim1=1, dim2=2)  # (w, h) steps
    # drawn areas: w, h the crop's sides as fractions of the image's (64 / 32 px per step)
    ranged = dataclasses.replace(_IDENTITY, scale=(0.1, 1.0), ratio=(3 / 4, 4 / 3))
    out = augment_batch(_ramps(16), out_size=32, spec=spec, aug=ranged,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    steps = _steps(out, spec)
    w, h = steps[:, 0, 0] / 2, steps[:, 1, 1] / 2
    assert torch.allclose(steps[:, 0, 1], torch.zeros(16, dtype=torch.float64), atol=1e-4)
    area = w * h
    assert area.min() >= 0.1 - 1e-4 and area.max() <= 1 + 1e-4
    assert area.min() < 0.25 and area.max() > 0.75  # spread over the range, not one scale
    free = (w < 1 - 1e-4) & (h < 1 - 1e-4)  # a side cut at the image's is not the drawn ratio
    assert free.sum() >= 12
    ratio = (w / h)[free]
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert ratio.min() < 0.9 and ratio.max() > 1.1


def test_rotation_turns_by_the_drawn_angle(msl_dir: Path) -> None:
    """Each image turns by its own angle, uniform in +-rotate_deg, as torchvision's rotate turns
    it: the angle is read off rotated `_ramps`, and real images drawn the same (same seed, same
    batch size) then match `rotate` inside the inscribed disc. With the angle forced to 0 the
    suite passed."""
    import torchvision.transforms.functional as tvf
    from torchvision.transforms import InterpolationMode

    n, size = 8, 64
    spec = PreprocessSpec.for_input_size(size)
    aug = dataclasses.replace(_IDENTITY, rotate_deg=30.0)
    ramps = augment_batch(_ramps(n, size), out_size=size, spec=spec, aug=aug,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    steps = _steps(ramps, spec)
    angle = torch.rad2deg(torch.atan2(steps[:, 1, 0], steps[:, 1, 1]))  # y_in moves with the column
    rad = torch.deg2rad(angle)
    rigid = torch.stack([torch.cos(rad), -torch.sin(rad), torch.sin(rad), torch.cos(rad)], 1)
    assert torch.allclose(steps.reshape(n, 4), rigid, atol=1e-4)  # a turn, no zoom or shear
    assert angle.abs().max() <= 30 + 1e-3
    assert angle.min() < -20 and angle.max() > 20 and angle.std() > 10  # per image, both ways
    u8 = _images(msl_dir, n=n, size=size)
    got = _rgb(augment_batch(u8, out_size=size, spec=spec, aug=aug,
                             generator=torch.Generator().manual_seed(0)), spec)  # fmt: skip
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    disc = r.view(-1, 1) ** 2 + r.view(1, -1) ** 2 < (size / 2 - 4) ** 2  # rotate fills outside
    for k in range(n):
        want = tvf.rotate(u8[k].float() / 255, angle[k].item(),
                          interpolation=InterpolationMode.BILINEAR)  # fmt: skip
        assert (got[k] - want)[:, disc].abs().max() < 1e-4, k


def _patches(n: int, size: int = 32) -> tuple[torch.Tensor, tuple[int, int], tuple[int, ...]]:
    """n uint8 images: left half grey A, top right grey B, bottom right one colour; and A, B
    and the colour. Mid-range levels: no jitter of +-0.3 clips them."""
    a, b, colour = 90, 150, (160, 110, 80)
    img = torch.full((3, size, size), a, dtype=torch.uint8)
    half = size // 2
    img[:, :half, half:] = b
    img[:, half:, half:] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
    return img.expand(n, 3, size, size).contiguous(), (a, b), colour


def _luma_of(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def test_jitter_draws_its_own_brightness_contrast_and_saturation() -> None:
    """Each image's colour jitter scales brightness, contrast and saturation by three factors
    of its own, each in 1 +- jitter: measured on flat grey and colour patches (brightness: the
    mean luma; contrast: the grey step; saturation: the colour's red-green gap). With the jitter
    step skipped, or the contrast taking the saturation factor, the suite passed."""
    n, size = 8, 32
    spec = PreprocessSpec.for_input_size(size)
    u8, (a, b), colour = _patches(n, size)
    x = u8.float() / 255
    plain = augment_batch(u8, out_size=size, spec=spec, aug=_IDENTITY,
                          generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.allclose(_rgb(plain, spec), x, atol=1e-5)  # the geometry alone leaves them be
    aug = dataclasses.replace(_IDENTITY, jitter=0.3)
    out = _rgb(augment_batch(u8, out_size=size, spec=spec, aug=aug,
                             generator=torch.Generator().manual_seed(1)), spec)  # fmt: skip
    half = size // 2
    # contrast keeps the mean luma and saturation every pixel's: the mean moves by brightness
    bright = _luma_of(out).mean(dim=(1, 2)) / _luma_of(x).mean(dim=(1, 2))
    step = out[:, 1, :half, half:].mean(dim=(1, 2)) - out[:, 1, :, :half].mean(dim=(1, 2))
    contrast = step / (bright * (b - a) / 255)  # greys: saturation leaves them alone
    gap = out[:, 0, half:, half:].mean(dim=(1, 2)) - out[:, 1, half:, half:].mean(dim=(1, 2))
    saturation = gap / (bright * contrast * (colour[0] - colour[1]) / 255)
    for factor in (bright, contrast, saturation):
        assert factor.min() >= 0.7 - 1e-4 and factor.max() <= 1.3 + 1e-4
        assert factor.max() - factor.min() > 0.15  # drawn per image
    assert (contrast - saturation).abs().max() > 0.1 and (bright - contrast).abs().max() > 0.1
    grey = out[:, :, :, :half]  # the grey patch stays grey
    assert (grey - grey[:, :1]).abs().max() < 1e-5


def test_jitter_factors_match_torchvision(msl_dir: Path) -> None:
    """`_jitter` with known factors is torchvision's adjust_brightness, adjust_contrast and
    adjust_saturation, each with its own factor, in that order. The contrast computed with the
    saturation factor passed the suite before."""
    import torchvision.transforms.functional as tvf

    x = _images(msl_dir, n=4, size=48).float() / 255
    one = [
        ((1.3, 1.0, 1.0), lambda im: tvf.adjust_brightness(im, 1.3)),
        ((1.0, 1.6, 1.0), lambda im: tvf.adjust_contrast(im, 1.6)),
        ((1.0, 0.5, 1.0), lambda im: tvf.adjust_contrast(im, 0.5)),
        ((1.0, 1.0, 0.3), lambda im: tvf.adjust_saturation(im, 0.3)),
        ((1.0, 1.0, 1.8), lambda im: tvf.adjust_saturation(im, 1.8)),
    ]
    for factors, tv in one:
        got = augment._jitter(x, torch.tensor([factors] * 4))
        want = torch.stack([tv(im) for im in x])
        assert (got - want).abs().max() < 2e-3, factors  # torchvision's grey: 0.2989 red
        assert (got - x).abs().mean() > 0.01, factors  # the factor did something
    # all three, a factor of its own each and per image, on images kept off the clip
    mid = x * 0.4 + 0.3
    each = torch.tensor([[1.15, 1.25, 0.6], [0.8, 1.2, 1.3], [1.1, 0.75, 1.4], [0.9, 1.3, 0.7]])
    got = augment._jitter(mid, each)
    for im, g, (fb, fc, fs) in zip(mid, got, each.tolist(), strict=True):
        want = tvf.adjust_saturation(tvf.adjust_contrast(tvf.adjust_brightness(im, fb), fc), fs)
        assert (g - want).abs().max() < 2e-3
