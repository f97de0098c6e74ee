"""The loss balance, optimizer and lr schedule that mars-train builds from its config."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see train/cli.py

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from marsvision.train.config import config_from_flags
from marsvision.train.data import camera, read_split
from marsvision.train.objective import (
    class_weights,
    group_label_weights,
    group_weights,
    lr_lambda,
    objective_from_config,
    optimizer_from_config,
    scheduler_from_config,
)


def test_class_weights() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    w = class_weights(labels, 3, 1.0)
    assert w[2] == 0.0  # absent class
    assert (w[labels]).mean() == pytest.approx(1.0)
    assert w[1] * 10 == pytest.approx(w[0] * 90)  # power 1: each class weighs the same in total
    sqrt = class_weights(labels, 2, 0.5)  # power 0.5: the rare class 3 times the common one
    assert sqrt[1] / sqrt[0] == pytest.approx(3.0) and sqrt[labels].mean() == pytest.approx(1.0)


def test_camera_codes_and_group_balance(msl_dir: Path) -> None:
    """Every MSL file name carries its camera; group weights make the rare (camera, class)
    pairs count: MAHLI drill holes weigh far more than Mastcam ground."""
    train = read_split(msl_dir, "train", "msl25")
    cams = {camera(s.path) for s in train}
    assert cams == {"ML", "MR", "MH"}
    assert camera(Path("x.jpg")) == "?"
    w = group_weights(train)
    assert w.shape == (len(train),) and w.mean() == pytest.approx(1.0)
    weight = {(camera(s.path), s.msl_class): float(v) for s, v in zip(train, w)}  # one per group
    assert weight[("MH", 5)] > 5 * weight[("MR", 8)]


@pytest.mark.parametrize("balance", ["loss", "group", "group-label", "sampler", "none"])
def test_objective_per_balance(balance: str, msl_dir: Path) -> None:
    train = read_split(msl_dir, "train", "binary", limit=200)
    labels = np.array([x.label for x in train])
    cfg = config_from_flags("default", data=msl_dir, out=Path("o"), balance=balance)
    obj = objective_from_config(cfg, train=train, num_classes=2, device=torch.device("cpu"))
    assert isinstance(obj.loss_fn, nn.CrossEntropyLoss)
    assert obj.loss_fn.label_smoothing == cfg.label_smoothing
    loss_weight = obj.loss_fn.weight
    if balance == "loss":
        assert loss_weight is not None
        np.testing.assert_allclose(loss_weight.numpy(), class_weights(labels, 2, 0.5), rtol=1e-6)
    else:
        assert loss_weight is None
    if balance in ("group", "group-label"):
        assert obj.loss_fn.reduction == "none" and obj.sample_weights is not None
        want = group_weights(train) if balance == "group" else group_label_weights(train, 2)
        np.testing.assert_allclose(obj.sample_weights.numpy(), want, rtol=1e-6)
    else:
        assert obj.loss_fn.reduction == "mean" and obj.sample_weights is None
    if balance == "sampler":
        assert obj.sample_p is not None
        drawn = labels[obj.sample_p.numpy() > 0]
        per_label = [obj.sample_p.numpy()[labels == c].sum() for c in (0, 1)]
        assert len(drawn) == len(labels) and per_label == pytest.approx([per_label[1]] * 2)
    else:
        assert obj.sample_p is None


def test_lr_schedule() -> None:
    cosine = lr_lambda("cosine", warmup_steps=10, total_steps=110)
    assert [cosine(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cosine(60) == pytest.approx(0.5) and cosine(110) == pytest.approx(0.0, abs=1e-12)
    assert cosine(500) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    constant = lr_lambda("constant", warmup_steps=0, total_steps=100)
    assert constant(0) == constant(99) == 1.0


def _lrs(opt: torch.optim.Optimizer, cfg: Any, *, steps_per_epoch: int) -> list[float]:
    """The lr of each step of the whole run under cfg's schedule."""
    sched = scheduler_from_config(opt, cfg, steps_per_epoch=steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_optimizer_and_scheduler_from_config() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(2, 3, 8, 8))
    cfg = config_from_flags("default", data=Path("d"), out=Path("o"), epochs=2, warmup_epochs=1)
    opt = optimizer_from_config(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    lrs = _lrs(opt, cfg, steps_per_epoch=5)
    assert lrs[0] == pytest.approx(cfg.lr / 5) and lrs[4] == pytest.approx(cfg.lr)  # warmup
    assert lrs[5] == pytest.approx(cfg.lr) and lrs[9] < 0.1 * cfg.lr  # cosine over epoch 2
    sgd = optimizer_from_config(model, config_from_flags("blog", data=Path("d"), out=Path("o")))
    assert isinstance(sgd, torch.optim.SGD) and not sgd.param_groups[0]["nesterov"]


def test_warmup_longer_than_half_the_run_is_cut_to_half() -> None:
    # the default 3-epoch warm-up in a 1-epoch run ended it at the peak lr, never decayed; the
    # resolved config (config.json, metrics.json) says what the run does
    model = nn.Linear(2, 2)
    cfg = config_from_flags("default", data=Path("d"), out=Path("o"), epochs=1)
    assert cfg.warmup_epochs == 0.5
    lrs = _lrs(optimizer_from_config(model, cfg), cfg, steps_per_epoch=10)
    assert lrs[4] == pytest.approx(cfg.lr) and lrs[9] < 0.1 * cfg.lr
    flags = {"data": Path("d"), "out": Path("o"), "epochs": 4, "warmup_epochs": 5.0}
    assert config_from_flags("default", **flags).warmup_epochs == 2
    long_run = config_from_flags("default", data=Path("d"), out=Path("o"), epochs=30)
    assert long_run.warmup_epochs == 3  # as asked when it fits


def test_sampler_balance_draws_the_epoch_by_sample_p(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--balance sampler: the training loop draws each epoch's images with replacement at the
    objective's sample_p, so each class fills about half of a binary epoch (class 1 is a third
    of the first 1000 train images). With sample_p ignored (a plain permutation) the suite
    passed: no test trained with the sampler."""
    from marsvision.train import loop

    class Drawn(Exception):
        """Raised by the first epoch: the order is all this test needs."""

    orders: list[torch.Tensor] = []

    def first_epoch(model: nn.Module, *, order: torch.Tensor, **kw: Any) -> dict[str, float]:
        orders.append(order.clone())
        raise Drawn

    # no decoding and no training: the order depends on the labels only
    def blank_store(samples: list[Any], **kw: Any) -> torch.Tensor:
        return torch.zeros(len(samples), 3, 8, 8, dtype=torch.uint8)

    def blank_eval(samples: list[Any], **kw: Any) -> torch.Tensor:
        return torch.zeros(len(samples), 3, 8, 8)

    monkeypatch.setattr(loop, "train_one_epoch", first_epoch)
    monkeypatch.setattr(loop, "train_store", blank_store)
    monkeypatch.setattr(loop, "eval_tensors", blank_eval)
    n = 1000
    labels = np.array([s.label for s in read_split(msl_dir, "train", "binary", n)])
    assert 0.25 < labels.mean() < 0.35  # class 1's share of the images
    shares = {}
    for balance in ("sampler", "loss"):
        cfg = config_from_flags("default", data=msl_dir, out=tmp_path / balance, epochs=1,
                                limit=n, image_size=64, device="cpu", workers=1,
                                balance=balance)  # fmt: skip
        with pytest.raises(Drawn):
            loop.main(cfg)
        order = orders.pop().numpy()
        assert len(order) == n and order.min() >= 0 and order.max() < n
        shares[balance] = labels[order].mean()
        unique = len(np.unique(order))
        if balance == "sampler":  # with replacement: about 61% of the images drawn at all
            assert 0.45 < shares[balance] < 0.55 and unique < 0.7 * n
        else:  # loss weights: every image once
            assert shares[balance] == labels.mean() and unique == n


def test_group_weights_are_the_inverse_square_root_of_the_group_sizes(msl_dir: Path) -> None:
    """--balance group weighs an image by count**-0.5 of its (camera, MSL class) group: a group
    4 times as large weighs half as much per image (count**-1 would make it a quarter)."""
    train = read_split(msl_dir, "train", "msl25", limit=400)
    groups = [(camera(s.path), s.msl_class) for s in train]
    counts = Counter(groups)
    w = group_weights(train)
    assert w.mean() == pytest.approx(1.0)
    per_group = dict(zip(groups, w.tolist(), strict=True))
    (big, n_big), (small, n_small) = counts.most_common()[0], counts.most_common()[-1]
    assert n_big > 4 * n_small  # groups of very different sizes among these images
    assert per_group[small] / per_group[big] == pytest.approx((n_big / n_small) ** 0.5)


def test_group_label_weights_keep_the_groups_inside_a_label_and_the_labels_shares(
    msl_dir: Path,
) -> None:
    """--balance group gives the label of more (camera, class) groups more of the loss (binary
    train: Rover, 31% of the images, 63% of the weight); group-label keeps group's ratios inside
    each label and gives each label the share the class balance (`loss`) gives it (40%)."""
    train = read_split(msl_dir, "train", "binary")
    labels = np.array([x.label for x in train])
    group, both = group_weights(train), group_label_weights(train, 2)
    assert labels.mean() == pytest.approx(0.305, abs=0.001)
    assert group[labels == 1].sum() / len(train) == pytest.approx(0.631, abs=0.001)
    loss_share = (class_weights(labels, 2, 0.5) * np.bincount(labels))[1] / len(train)
    assert both[labels == 1].sum() / len(train) == pytest.approx(loss_share)
    assert loss_share == pytest.approx(0.399, abs=0.001)
    assert both.mean() == pytest.approx(1.0)
    for c in (0, 1):  # inside a label, the same ratios as group's
        ratio = both[labels == c] / group[labels == c]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)


@pytest.mark.parametrize("recipe", ["default", "blog"])
def test_every_parameter_is_optimized_once(recipe: str) -> None:
    """Each weight, the classifier's 2-D one and the convolutions' 4-D ones alike, is in exactly
    one of the two groups: decayed (more than one dimension) or not (biases, BatchNorm)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))
    cfg = config_from_flags(recipe, data=Path("d"), out=Path("o"))
    decay, no_decay = optimizer_from_config(model, cfg).param_groups
    grouped = [id(p) for p in [*decay["params"], *no_decay["params"]]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}


def test_sgd_uses_momentum_and_nesterov_but_for_the_blog_recipe() -> None:
    """SGD takes momentum 0.9 in both recipes that use it; Nesterov's form except for `blog`."""
    model = nn.Linear(3, 2)
    blog = optimizer_from_config(model, config_from_flags("blog", data=Path("d"), out=Path("o")))
    sgd = optimizer_from_config(
        model, config_from_flags("default", data=Path("d"), out=Path("o"), optimizer="sgd")
    )
    assert isinstance(blog, torch.optim.SGD) and isinstance(sgd, torch.optim.SGD)
    for opt, nesterov in ((blog, False), (sgd, True)):
        assert all(g["momentum"] == 0.9 and g["nesterov"] == nesterov for g in opt.param_groups)


def test_the_cosine_schedule_spans_the_whole_run() -> None:
    """The lr decays over every step of every epoch: the last epoch still trains (its lr is
    above 0 until the last step), reaching 0 only after the run's last step."""
    model = nn.Linear(2, 2)
    cfg = config_from_flags("default", data=Path("d"), out=Path("o"), epochs=4, warmup_epochs=1)
    opt = optimizer_from_config(model, cfg)
    sched = scheduler_from_config(opt, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(cfg.epochs * 10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[9] == pytest.approx(cfg.lr)  # the warm-up's last step: the peak
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then strictly down
    assert lrs[-1] > 0 and lrs[25] == pytest.approx(cfg.lr / 2)  # the cosine's middle
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # after the last step
