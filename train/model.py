"""The network: torchvision ResNet-50 with its head sized to the task."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet50

from marsvision.runtime.errors import MarsvisionError, clipped

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
        # torch's own text is many lines, and advises weights_only=False: running the file's code
        raise MarsvisionError(
            f"--init {init}: not a torch weights file (torch cannot read it: {type(e).__name__}; "
            "a file of weights only, as torchvision publishes, is needed)"
        ) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict):
        raise MarsvisionError(f"--init {init}: expected a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if state.get("fc.weight") is not None and state["fc.weight"].shape[0] != num_classes:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise MarsvisionError(
            f"--init {init}: not ResNet-50 weights ({clipped(str(e).splitlines()[-1], 150)})"
        ) from None
    body_missing = [k for k in missing if not k.startswith("fc.")]
    if body_missing or unexpected:
        raise MarsvisionError(
            f"--init {init}: not ResNet-50 weights ({len(body_missing)} missing, "
            f"{len(unexpected)} unexpected keys, e.g. {(body_missing + unexpected)[:3]})"
        )
    return model


class ModelEma:
    """Exponential moving average of a model's weights and float buffers (BatchNorm's running
    statistics are averaged too; integer buffers are copied), kept on its device.

    The decay ramps up as min(decay, (1 + step) / (10 + step)), so early averages are not
    dominated by the random initialization.
    """

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.decay = decay
        self.step = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average toward the model's current weights."""
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        ema_state, state = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in state.items() if v.is_floating_point()]
        others = [k for k, v in state.items() if not v.is_floating_point()]
        torch._foreach_lerp_([ema_state[k] for k in floats], [state[k] for k in floats], 1.0 - d)
        torch._foreach_copy_([ema_state[k] for k in others], [state[k] for k in others])

    def state_dict(self) -> dict[str, object]:
        """The averaged weights and the step count."""
        return {"module": self.module.state_dict(), "step": self.step, "decay": self.decay}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore from `state_dict()`."""
        self.module.load_state_dict(state["module"])  # type: ignore[arg-type]
        self.step = int(state["step"])  # type: ignore[call-overload]
