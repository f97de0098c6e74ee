"""MixUp/CutMix (`--mixup`, `--cutmix`): the mixed pixels, the label shares, the loss that
training minimizes with them, and the flags."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see train/cli.py

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.spec import PreprocessSpec
from marsvision.train.augment import augment_batch
from marsvision.train.config import AugmentSpec, command_line, config_from_flags
from marsvision.train.mix import mix_batch
from marsvision.train.model import create_model


def _batch(n: int = 6, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def test_off_draws_nothing() -> None:
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    assert mix_batch(_batch(), mixup=0.0, cutmix=0.0, generator=g) is None
    assert torch.equal(g.get_state(), state)  # runs without mixing keep their random stream


def test_mixup_blends_each_image_with_the_reversed_batch() -> None:
    x = _batch()
    m = mix_batch(x, mixup=0.2, cutmix=0.0, generator=torch.Generator().manual_seed(0))
    assert m is not None and m.kind == "mixup" and 0 < m.lam < 1
    assert m.partner.tolist() == [5, 4, 3, 2, 1, 0]
    torch.testing.assert_close(m.x, m.lam * x + (1 - m.lam) * x[m.partner])


def test_cutmix_pastes_one_box_and_lam_is_the_area_kept() -> None:
    x = _batch(size=32)
    for seed in range(20):
        m = mix_batch(x, mixup=0.0, cutmix=1.0, generator=torch.Generator().manual_seed(seed))
        assert m is not None and m.kind == "cutmix"
        pasted = (m.x != x).any(dim=1)  # (n, h, w): where an image took its partner's pixels
        assert torch.equal(m.x[pasted.unsqueeze(1).expand_as(x)],
                           x[m.partner][pasted.unsqueeze(1).expand_as(x)])  # fmt: skip
        assert torch.equal(pasted[0], pasted[1])  # the same box in every image
        rows, cols = pasted[0].any(1).nonzero(), pasted[0].any(0).nonzero()
        if len(rows):  # a box, not scattered pixels
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert int(pasted[0].sum()) == int(box)
        assert m.lam == pytest.approx(1 - pasted[0].float().mean().item())


def test_both_alphas_pick_one_kind_per_batch_reproducibly() -> None:
    x = _batch()
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    kinds = []
    for _ in range(40):
        a = mix_batch(x, mixup=0.2, cutmix=1.0, generator=g1)
        b = mix_batch(x, mixup=0.2, cutmix=1.0, generator=g2)
        assert a is not None and b is not None
        assert (a.kind, a.lam) == (b.kind, b.lam) and torch.equal(a.x, b.x)
        kinds.append(a.kind)
    assert 10 < kinds.count("cutmix") < 30  # about half: 40 fair draws


@pytest.mark.parametrize("weighted", [False, True])
def test_training_loss_weighs_both_labels_by_their_shares(weighted: bool) -> None:
    """train_one_epoch's loss on a mixed batch is lam * CE(own label) + (1 - lam) * CE(partner's
    label), each with the images' loss weights (`--balance group`) normalized by their sum."""
    from marsvision.train.loop import train_one_epoch

    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))  # fmt: skip
    labels = torch.tensor([0, 0, 1, 0])
    weights = torch.tensor([1.0, 2.0, 0.5, 4.0]) if weighted else None
    spec, aug = PreprocessSpec.for_input_size(32), AugmentSpec(rotate_deg=0.0, jitter=0.0)

    torch.manual_seed(0)
    model = create_model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no update: compare the loss only
    out = train_one_epoch(
        model, images=images, labels=labels, order=torch.arange(4), optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
        loss_fn=torch.nn.CrossEntropyLoss(reduction="none" if weighted else "mean"),
        batch_size=4, image_size=32, spec=spec, aug=aug,
        generator=torch.Generator().manual_seed(1), ema=None, desc="t",
        sample_weights=weights, mixup=0.4, cutmix=0.0,
    )  # fmt: skip

    # the same step by hand: same draws from the same generator, same model
    torch.manual_seed(0)
    model = create_model(2).train()
    g = torch.Generator().manual_seed(1)
    x = augment_batch(images, out_size=32, spec=spec, aug=aug, generator=g)
    m = mix_batch(x, mixup=0.4, cutmix=0.0, generator=g)
    assert m is not None
    with torch.no_grad():
        logits = model(m.x)
    own = F.cross_entropy(logits, labels, reduction="none")
    other = F.cross_entropy(logits, labels[m.partner], reduction="none")
    w = weights if weights is not None else torch.ones(4)
    expected = (m.lam * own * w + (1 - m.lam) * other * w[m.partner]).sum() / w.sum()
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-5)
    # accuracy counts a prediction by the share of the label it names
    pred = logits.argmax(1)
    acc = m.lam * (pred == labels).float() + (1 - m.lam) * (pred == labels[m.partner]).float()
    assert out["accuracy"] == pytest.approx(acc.mean().item(), rel=1e-5)


def test_flags_round_trip_and_checks() -> None:
    cfg = config_from_flags("default", data=Path("d"), out=Path("o"), mixup=0.2, cutmix=1.0)
    assert (cfg.mixup, cfg.cutmix) == (0.2, 1.0)
    assert "--mixup 0.2 --cutmix 1.0" in command_line(cfg.to_dict())
    plain = command_line(config_from_flags("default", data=Path("d"), out=Path("o")).to_dict())
    assert "--mixup" not in plain and "--cutmix" not in plain  # off: the command stays as before
    with pytest.raises(MarsvisionError, match="--cutmix -1"):
        config_from_flags("default", data=Path("d"), out=Path("o"), cutmix=-1.0)
    with pytest.raises(MarsvisionError, match="--mixup inf"):  # Beta(inf, inf) is nan
        config_from_flags("default", data=Path("d"), out=Path("o"), mixup=float("inf"))


def test_cutmix_boxes_reach_every_pixel() -> None:
    """Over many batches every pixel, the last row and column too, is pasted in some box (a box
    clipped short of an edge left the border always the image's own)."""
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    covered = torch.zeros(12, 12, dtype=torch.bool)
    for _ in range(300):
        m = mix_batch(x, mixup=0.0, cutmix=1.0, generator=g)
        assert m is not None
        covered |= (m.x[0] != x[0]).any(0)
    assert covered.all(), covered
