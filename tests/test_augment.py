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
