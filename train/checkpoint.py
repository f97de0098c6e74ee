"""The checkpoint: a plain dict with the weights and everything downstream stages need.

Keys: format, format_version, arch, task, class_names, preprocess (PreprocessSpec.to_dict()),
state_dict, weights_dtype, config, metrics, data_fingerprint, versions, epoch, created.
Training-only state (optimizer, scheduler, EMA, RNG) lives in a separate resume file, so the
checkpoint that ships stays small.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch import nn

from marsvision.runtime.errors import MarsvisionError, stop_inside
from marsvision.runtime.files import atomic_path
from marsvision.runtime.metadata import (
    check_class_names,
    check_format_version,
    code_versions,
)
from marsvision.runtime.spec import PreprocessSpec
from marsvision.train.model import ARCH, create_model

FORMAT = "marsvision-checkpoint"
FORMAT_VERSION = 1  # raised where a key is added or changed that older readers would misread
REQUIRED_KEYS = ("arch", "task", "class_names", "preprocess", "state_dict", "data_fingerprint")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a checkpoint or artifact (Pillow decodes and resizes
    every image the model sees: a change to it changes the pixels, and stales a calibration)."""
    import torchvision

    code = code_versions()
    return {
        "marsvision": code["marsvision"],
        "torch": str(torch.__version__),  # TorchVersion is not loadable with weights_only
        "torchvision": str(torchvision.__version__),
        "numpy": code["numpy"],
        "pillow": code["pillow"],
    }


def is_finished(ckpt: dict[str, Any]) -> bool:
    """Whether the checkpoint is a finished run's: one stopped (or still training) holds the
    best epoch so far, with no test metrics yet."""
    return "test" in ckpt.get("metrics", {})


class _Writes:
    """A file for torch.save that keeps what stopped a write: torch's writer, closing the file on
    the way out, reports it as RuntimeError("unexpected pos ...") instead, for a full disk, a
    quota or the file size limit (an OSError) and for Ctrl-C or SIGTERM in a write (a ship
    stopped so ended in that traceback, exit 1)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        if self.f.closed:  # the writer finishing in its destructor after a stop: the file is
            return memoryview(data).nbytes  # being removed (a ValueError there aborted Python)
        try:
            return int(self.f.write(data))
        except BaseException as e:  # noqa: BLE001 - kept, and raised again as it was
            self.error = e
            raise

    def flush(self) -> None:
        if not self.f.closed:
            self.f.flush()


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary name in the same folder, then rename: never a half file. A
    write that fails for want of room is an OSError with its errno, as for any other write, and
    one that a signal stops is its KeyboardInterrupt or Stopped."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        out = _Writes(f)
        try:
            torch.save(obj, cast(IO[bytes], out))  # it calls write (and flush) only
        except RuntimeError as e:
            # a signal handled as write() is entered, before its try, is only the context
            kept = out.error or stop_inside(e)
            if not isinstance(kept, (KeyboardInterrupt, SystemExit, OSError)):
                raise
            raise kept from None


def half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convolution and linear weights as fp16 (about half the file); BatchNorm statistics and
    affine parameters, biases and counters stay as they are (fp32: small, and precision-prone)."""
    return {k: v.half() if v.is_floating_point() and v.ndim > 1 else v for k, v in state.items()}


def make_checkpoint(
    model: nn.Module,
    *,
    task: str,
    class_names: list[str],
    preprocess: PreprocessSpec,
    config: dict[str, Any],
    metrics: dict[str, Any],
    data_fingerprint: str,
    epoch: int,
) -> dict[str, Any]:
    """Build the checkpoint dict (fp32 weights; `half_state` makes the shipped fp16 ones)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": ARCH,
        "task": task,
        "class_names": list(class_names),
        "preprocess": preprocess.to_dict(),
        "state_dict": state,
        "weights_dtype": "float32",
        "config": config,
        "metrics": metrics,
        "data_fingerprint": data_fingerprint,
        "versions": library_versions(),
        "epoch": epoch,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def folder_refusal(folder: Path) -> MarsvisionError:
    """The error for a folder given as a checkpoint (a run folder, most likely: named its
    checkpoint.pt)."""
    inside = folder / "checkpoint.pt"
    return MarsvisionError(
        f"{folder} is a folder, not a checkpoint: pass "
        + (str(inside) if inside.is_file() else "the .pt file that mars-train wrote")
    )


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate a checkpoint; a missing, truncated or foreign file is a user error."""
    p = Path(path)
    if p.is_dir():
        raise folder_refusal(p)
    if not p.is_file():
        raise MarsvisionError(f"checkpoint {p} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated/foreign files raise many types
        from marsvision.runtime.backends import ENGINE_SUFFIXES

        if p.suffix.lower() in (".onnx", *ENGINE_SUFFIXES):
            raise MarsvisionError(
                f"{p} is an exported model, not a checkpoint: pass the .pt file that mars-train "
                "wrote (an export's manifest.json names it, source_checkpoint)"
            ) from None
        raise MarsvisionError(
            f"{p} is not a marsvision checkpoint: torch cannot read it ({type(e).__name__}); "
            "it may be truncated or another kind of file (re-copy it, or train one with mars-train)"
        ) from None
    if isinstance(ckpt, dict) and "format" not in ckpt and {"optimizer", "config"} <= ckpt.keys():
        raise MarsvisionError(
            f"{p} is a training run's resume file (mars-train --resume reads it), not its "
            f"checkpoint: pass {p.parent / 'checkpoint.pt'}"
        )
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MarsvisionError(
            f"{p} is not a marsvision checkpoint (no '{FORMAT}' marker); train one with mars-train"
        )
    check_format_version(ckpt.get("format_version"), FORMAT_VERSION, f"{p}: checkpoint",
                         older="train it again with mars-train")  # fmt: skip
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise MarsvisionError(f"{p}: checkpoint lacks {', '.join(missing)}")
    if ckpt["arch"] != ARCH:
        raise MarsvisionError(f"{p}: architecture {ckpt['arch']!r} is not {ARCH!r}")
    state = ckpt["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MarsvisionError(f"{p}: its state_dict is not a mapping of names to tensors")
    check_class_names(ckpt["class_names"], where=p)
    return ckpt


def preprocess_from_checkpoint(ckpt: dict[str, Any]) -> PreprocessSpec:
    """The checkpoint's preprocessing spec."""
    return PreprocessSpec.from_dict(ckpt["preprocess"])


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """An fp32 ResNet-50 in eval mode with the checkpoint's weights."""
    n_classes = len(ckpt["class_names"])
    fc = ckpt["state_dict"].get("fc.weight")
    if fc is not None and fc.shape[0] != n_classes:
        raise MarsvisionError(f"the checkpoint names {n_classes} classes but its fc layer has "
                              f"{fc.shape[0]} outputs")  # fmt: skip
    model = create_model(n_classes)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # torch's message: a header line, then one line per tensor
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise MarsvisionError(
            f"checkpoint weights do not fit ResNet-50: {lines[0][:200]}{more}"
        ) from None
    return model.eval()
