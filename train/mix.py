"""MixUp and CutMix on a training batch: each image is blended with (MixUp) or has a box pasted
from (CutMix) its partner in the reversed batch, and the loss weighs the two labels by the
share `lam` each image keeps. Regularization for training from scratch on few images.

The mixing share is drawn from Beta(alpha, alpha); with both alphas set, each batch uses one
of the two at random, as timm's `Mixup` does. Draws come from the run's CPU generator, so a seed
gives the same mixing on any device and a resumed run continues the same stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Mixed:
    """A mixed batch: every image i keeps share `lam` of its own label and gives 1 - lam to the
    label of image `partner[i]`."""

    x: torch.Tensor
    partner: torch.Tensor  # index of each image's partner in the batch
    lam: float
    kind: str  # "mixup" or "cutmix"


def _cutmix_box(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """[y0, y1) x [x0, x1) of area about (1 - lam) * h * w, centred uniformly, clipped."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = round(h * cut), round(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
    return y0, y1, x0, x1


def mix_batch(
    x: torch.Tensor, *, mixup: float, cutmix: float, generator: torch.Generator
) -> Mixed | None:
    """MixUp (`mixup` alpha > 0) or CutMix (`cutmix` alpha > 0) of the NCHW batch `x`; None when
    both are 0 (then nothing is drawn from `generator`)."""
    if mixup <= 0 and cutmix <= 0:
        return None
    # one draw from the run's generator seeds this batch's numpy draws (Beta, box position)
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    partner = torch.arange(x.shape[0] - 1, -1, -1, device=x.device)
    if use_cutmix:
        h, w = x.shape[-2:]
        y0, y1, x0, x1 = _cutmix_box(h, w, lam, rng)
        out = x.clone()
        out[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the share the box really left
        return Mixed(out, partner, lam, "cutmix")
    return Mixed(x * lam + x.flip(0) * (1.0 - lam), partner, lam, "mixup")
