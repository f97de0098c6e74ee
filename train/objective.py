"""What training minimizes and how: the loss with its class or group balance, the optimizer and
the learning-rate schedule, all built from a `TrainConfig`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from marsvision.train import data as msl
from marsvision.train.config import TrainConfig


@dataclass
class Objective:
    """The loss and how the epoch draws and weighs its images (`--balance`)."""

    loss_fn: nn.Module
    sample_weights: torch.Tensor | None  # per image (`group`); loss_fn then has reduction="none"
    sample_p: torch.Tensor | None  # per-image draw probabilities (`sampler`), else a permutation


def class_weights(labels: np.ndarray, num_classes: int, power: float) -> np.ndarray:
    """Per-class weight proportional to count**-power (0 for absent classes), mean 1 per image."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.zeros(num_classes)
    w[counts > 0] = counts[counts > 0] ** -power
    return w * len(labels) / float((w * counts).sum())


def group_weights(samples: Sequence[msl.Sample]) -> np.ndarray:
    """Per-image loss weight by (camera, MSL class) group, count**-0.5, mean 1: rare kinds
    inside a label (MAHLI drill holes among Mastcam ground) count (`--balance group`). It moves
    weight between the labels too, by how many groups each has: on MSL binary train, Rover (31%
    of the images, in many small groups) takes 63% of the weight (`loss` balance: 40%)."""
    keys = [(msl.camera(x.path), x.msl_class) for x in samples]
    index = {key: i for i, key in enumerate(sorted(set(keys)))}
    groups = np.array([index[key] for key in keys])
    per_group: np.ndarray = class_weights(groups, len(index), 0.5)[groups]
    return per_group


def group_label_weights(samples: Sequence[msl.Sample], num_classes: int) -> np.ndarray:
    """`group_weights` rescaled within each label so that each label's total is the one the
    `loss` balance gives it (count**-0.5 by label), mean 1 (`--balance group-label`): the rare
    kinds inside a label still count, and the label with more groups no longer takes more of
    the loss (binary train under `group`: Rover 63% of the weight; here 40%, as under `loss`)."""
    labels = np.array([x.label for x in samples])
    weights = group_weights(samples)
    target = class_weights(labels, num_classes, 0.5)  # per image of each label
    for c in np.unique(labels):
        mine = labels == c
        weights[mine] *= target[c] * mine.sum() / weights[mine].sum()
    return weights


def objective_from_config(
    cfg: TrainConfig, *, train: Sequence[msl.Sample], num_classes: int, device: torch.device
) -> Objective:
    """Cross-entropy with label smoothing, balanced as `cfg.balance` says."""
    labels = np.array([x.label for x in train])
    weight = sample_weights = sample_p = None
    if cfg.balance == "loss":
        weight = torch.tensor(class_weights(labels, num_classes, 0.5), dtype=torch.float32,
                              device=device)  # fmt: skip
    elif cfg.balance == "group":
        sample_weights = torch.tensor(group_weights(train), dtype=torch.float32, device=device)
    elif cfg.balance == "group-label":
        sample_weights = torch.tensor(group_label_weights(train, num_classes), dtype=torch.float32,
                                      device=device)  # fmt: skip
    elif cfg.balance == "sampler":
        sample_p = torch.tensor(class_weights(labels, num_classes, 1.0)[labels])
    reduction = "mean" if sample_weights is None else "none"
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing,
                                  reduction=reduction)  # fmt: skip
    return Objective(loss_fn=loss_fn, sample_weights=sample_weights, sample_p=sample_p)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Factor on the peak lr at each step: linear warmup, then constant or cosine to 0."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def optimizer_from_config(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (`blog`) or AdamW; no weight decay on BatchNorm and bias parameters."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]  # fmt: skip
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=cfg.recipe != "blog")
    fused = next(model.parameters()).is_cuda  # one kernel for the whole update on GPUs
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


def scheduler_from_config(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per batch, over `cfg.epochs` epochs."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.schedule, warmup, cfg.epochs * steps_per_epoch)
    )
