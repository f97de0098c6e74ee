"""The network: torchvision ResNet-50 with its head sized to the task."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet50

from marsvision.runtime.errors import MarsvisionError

ARCH = "resnet50"


def create_model(num_classes: int, init: str = "random") -> nn.Module:
    """ResNet-50 with a `num_classes` head; `init` is "random" or a torchvision weights file.

    A weights file is a state dict (or a dict holding one under "state_dict"/"model"); its
    classifier head is dropped when its size differs from `num_classes`.
    """
    model = resnet50(weights=None, num_classes=num_classes)
    if init == "random":
        return model
    path = Path(init)
    if not path.is_file():
        raise MarsvisionError(f"--init {init}: no such weights file (or use --init random)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise MarsvisionError(f"--init {init}: not a torch weights file ({e})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict):
        raise MarsvisionError(f"--init {init}: expected a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if state.get("fc.weight") is not None and state["fc.weight"].shape[0] != num_classes:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    body_missing = [k for k in missing if not k.startswith("fc.")]
    if body_missing or unexpected:
        raise MarsvisionError(
            f"--init {init}: not ResNet-50 weights ({len(body_missing)} missing, "
            f"{len(unexpected)} unexpected keys, e.g. {(body_missing + unexpected)[:3]})"
        )
    return model
