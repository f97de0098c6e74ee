"""Make a trained model hold its accuracy under INT8: quantization-aware self-distillation.

The student starts as the checkpoint's model with int8 fake quantization on every Conv/Linear
input and BatchNorm output (per tensor, at the 99.999th percentile of |x| on train images, as
`mars-export`'s default calibration picks its ranges) and on the weights (per output channel).
It is trained for a short while to match the unquantized model's softmax (KL divergence, no
labels), BatchNorm frozen, then saved without the fake quantization as a new checkpoint, scored
on val and test, for `mars-export --int8` and `make ship`. Post-training INT8 of the GPU-trained
models missed `mars-bench parity` under every calibration tried (RECIPES.md, "The second GPU
session"); one epoch of this brought a 128 px one within it in both flavours.

    python -m marsvision.train.int8_distill runs/binary/checkpoint.pt --out runs/distilled.pt
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from marsvision.runtime.errors import MarsvisionError, interruptible
from marsvision.train.config import DEVICES

PERCENTILE = 0.99999  # of |x|, as ONNX Runtime's percentile calibration (export/config.py)
SAMPLE_PER_TENSOR = 200_000  # values kept per tensor and batch for the percentile


def fake_quant(x: torch.Tensor, bound: float, signed: bool) -> torch.Tensor:
    """x rounded to the int8 (signed) or uint8 grid over [-bound, bound] or [0, bound]; the
    gradient passes straight through."""
    scale = bound / (127.0 if signed else 255.0)
    lo, hi = (-128, 127) if signed else (0, 255)
    q = torch.clamp(torch.round(x / scale), lo, hi) * scale
    return x + (q - x).detach()


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric int8 fake quantization of a weight (a parametrization)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The weight rounded to its int8 grid, the gradient passed straight through."""
        dims = tuple(range(1, w.ndim))
        scale = w.detach().abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / 127.0
        q = torch.clamp(torch.round(w / scale), -127, 127) * scale
        return w + (q - w).detach()


def _quantized_points(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, "in" or "out"): Conv/Linear inputs and BatchNorm outputs, where the
    exported INT8 graph puts its activation quantizers."""
    points: list[tuple[str, nn.Module, str]] = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            points.append((name, m, "in"))
        elif isinstance(m, nn.BatchNorm2d):
            points.append((name, m, "out"))
    return points


def activation_bounds(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, float]:
    """Each quantized point's bound: the PERCENTILE of |x| over `batches` (a sample of it)."""
    seen: dict[str, list[torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(0)

    def keep(key: str, x: torch.Tensor) -> None:
        flat = x.detach().abs().flatten().float()
        idx = torch.randint(0, flat.numel(), (min(flat.numel(), SAMPLE_PER_TENSOR),), generator=gen)
        seen.setdefault(key, []).append(flat[idx.to(flat.device)].cpu())

    handles = []
    for name, m, where in _quantized_points(model):
        if where == "in":
            handles.append(m.register_forward_pre_hook(lambda _m, a, k=name: keep(k, a[0])))
        else:
            handles.append(m.register_forward_hook(lambda _m, _a, y, k=name: keep(k, y)))
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        for h in handles:
            h.remove()
    return {k: float(torch.quantile(torch.cat(v), PERCENTILE)) for k, v in seen.items()}


def attach_fake_quant(
    model: nn.Module, bounds: dict[str, float], signed: bool
) -> list[torch.utils.hooks.RemovableHandle]:
    """Fake-quantize `model` in place (activations at `bounds`: int8 everywhere if `signed`, as
    TensorRT's flavour; else uint8 after ReLUs, as the CPU flavour); returns the hooks."""
    handles = []
    for name, m, where in _quantized_points(model):
        bound = max(bounds[name], 1e-8)
        if where == "in":
            s = signed or name == "conv1"  # the normalized image is signed
            handles.append(
                m.register_forward_pre_hook(lambda _m, a, b=bound, s=s: (fake_quant(a[0], b, s),))
            )
            parametrize.register_parametrization(m, "weight", WeightFakeQuant())
        else:
            handles.append(
                m.register_forward_hook(lambda _m, _a, y, b=bound: fake_quant(y, b, True))
            )
    return handles


def detach_fake_quant(model: nn.Module, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    """Remove the hooks and the weight parametrizations, keeping the float weights."""
    for h in handles:
        h.remove()
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)


def distill(
    ckpt: dict[str, Any],
    *,
    data_dir: Path,
    epochs: int,
    lr: float,
    batch_size: int,
    signed: bool,
    seed: int,
    limit: int | None,
    workers: int,
    device: str,
    log: Any,
    calib_images: int = 128,  # mars-export's --calib-images default: its observers' images
) -> dict[str, torch.Tensor]:
    """The student's float state dict (on the CPU) after `epochs` over the train split (random
    flips), trained on `device` (fp32: the fake quantization rounds fp32 values)."""
    from marsvision.train.checkpoint import model_from_checkpoint, preprocess_from_checkpoint
    from marsvision.train.data import read_split
    from marsvision.train.device import select_device
    from marsvision.train.images import eval_tensors

    torch.manual_seed(seed)
    rng = random.Random(seed)
    spec = preprocess_from_checkpoint(ckpt)
    samples = read_split(data_dir, "train", ckpt["task"], limit=limit)
    images = eval_tensors(samples, spec=spec, workers=workers)  # N C H W, the eval transform
    dev = select_device(device)
    teacher = model_from_checkpoint(ckpt).eval().to(dev)
    student = model_from_checkpoint(ckpt).eval().to(dev)  # BatchNorm frozen throughout
    calib = [images[i : i + 16].to(dev) for i in range(0, min(calib_images, len(images)), 16)]
    handles = attach_fake_quant(student, activation_bounds(student, calib), signed)
    params = [p for m in student.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
              for p in m.parameters()]  # fmt: skip
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for epoch in range(1, epochs + 1):
        order = list(range(len(images)))
        rng.shuffle(order)
        t0, total, n = time.perf_counter(), 0.0, 0
        for i in range(0, len(order) - batch_size + 1, batch_size):
            x = images[order[i : i + batch_size]].to(dev, non_blocking=True)
            flip = torch.tensor([rng.random() < 0.5 for _ in range(len(x))], device=dev)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            with torch.no_grad():
                target = F.log_softmax(teacher(x), dim=1)
            loss = F.kl_div(F.log_softmax(student(x), dim=1), target, log_target=True,
                            reduction="batchmean")  # fmt: skip
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(x), n + len(x)
        if not n:
            raise MarsvisionError(
                f"{len(images)} train images: fewer than one batch of {batch_size}"
            )
        print(f"epoch {epoch}/{epochs}: KL to the unquantized model {total / n:.5f}, "
              f"{n / (time.perf_counter() - t0):.1f} img/s", file=log)  # fmt: skip
    detach_fake_quant(student, handles)
    return {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}


def _distilled_checkpoint(
    ckpt: dict[str, Any],
    state: dict[str, torch.Tensor],
    *,
    data_dir: Path,
    settings: dict[str, Any],
    source_sha256: str,
    source_path: Path,
    seconds: float,
    device: str = "cpu",
    workers: int = 4,
    limit: int | None = None,
) -> dict[str, Any]:
    """`ckpt` with the student's fp32 weights, its val and test metrics (scored on `device`,
    where `distill` ran), and a `distill` record for the model card: the settings, when, where
    and how long it ran (`seconds`) with which libraries, the source's sha256, metrics and where
    it was trained."""
    import datetime

    from marsvision.train.checkpoint import library_versions
    from marsvision.train.ship import SCORED_SPLITS, score_checkpoint, source_training

    out = {k: v for k, v in ckpt.items() if k not in ("shipped", "decision_threshold")}
    out["state_dict"] = state
    out["weights_dtype"] = "float32"
    scores = score_checkpoint(out, data_dir=data_dir, device=device, workers=workers,
                              limit=limit)  # fmt: skip
    out["metrics"] = {
        **{s: scores[s]["metrics"] for s in SCORED_SPLITS},
        "best_epoch": ckpt["metrics"].get("best_epoch", ckpt.get("epoch")),
        "stopped_early_after_epoch": ckpt["metrics"].get("stopped_early_after_epoch"),
    }
    source_metrics = {s: ckpt["metrics"].get(s) for s in SCORED_SPLITS}
    train_device, train_seconds = source_training(ckpt, source_path)
    out["distill"] = {
        **settings,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),  # where `distill` ran, as `main` passes it
        "seconds": seconds,
        "versions": library_versions(),
        "source_checkpoint_sha256": source_sha256,
        "source_metrics": source_metrics,
        "source_train_device": train_device,
        "source_train_seconds": train_seconds,
    }
    return out


def _device_name(device: str) -> str:
    """The card's device: "cuda (the GPU's name)" or "cpu (the CPU's model name)"."""
    from marsvision.runtime.host import cpu_model
    from marsvision.train.device import select_device

    if select_device(device).type == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({cpu_model()})"


def distill_file(
    checkpoint: Path,
    out: Path,
    *,
    data_dir: Path,
    epochs: int = 1,
    lr: float = 1e-5,
    batch_size: int = 32,
    flavour: str = "trt",
    seed: int = 0,
    limit: int | None = None,
    workers: int = 4,
    device: str = "cpu",
    log: Any = sys.stderr,
) -> dict[str, Any]:
    """Distill the checkpoint file (its data checked against `data_dir`) into `out`, scored;
    returns what it wrote. `flavour`: trt (int8 everywhere) or cpu (uint8 after ReLUs)."""
    from marsvision.runtime.metadata import sha256_file
    from marsvision.train.checkpoint import atomic_torch_save, load_checkpoint
    from marsvision.train.config import SEED_RANGE, seed_in_range
    from marsvision.train.data import check_same_data
    from marsvision.train.device import select_device
    from marsvision.train.ship import check_finished

    if not (math.isfinite(lr) and lr > 0):  # inf wrote a NaN checkpoint; nan, a traceback
        raise MarsvisionError(f"--lr {lr}: must be a positive number")
    if not seed_in_range(seed):  # torch.manual_seed's traceback
        raise MarsvisionError(f"--seed {seed}: must be in {SEED_RANGE}")
    select_device(device)  # refused before the checkpoint is read and the images decoded
    ckpt = load_checkpoint(checkpoint)
    check_finished(ckpt, checkpoint)  # its test metrics go on the card beside the distilled ones
    check_same_data(ckpt, data_dir, checkpoint)
    settings = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "flavour": flavour,
                "seed": seed, "limit": limit}  # fmt: skip
    t0 = time.perf_counter()
    state = distill(ckpt, data_dir=data_dir, epochs=epochs, lr=lr, batch_size=batch_size,
                    signed=flavour == "trt", seed=seed, limit=limit, workers=workers,
                    device=device, log=log)  # fmt: skip
    result = _distilled_checkpoint(ckpt, state, data_dir=data_dir, settings=settings,
                                   source_sha256=sha256_file(checkpoint), source_path=checkpoint,
                                   seconds=time.perf_counter() - t0, device=device,
                                   workers=workers, limit=limit)  # fmt: skip
    atomic_torch_save(result, out)
    return result


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The distilled checkpoint (fp32), for make ship / mars-export.")  # fmt: skip
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="MSL data folder (default: $MARS_DATA).")  # fmt: skip
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--lr", type=float, default=1e-5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--flavour", type=click.Choice(["trt", "cpu"]), default="trt", show_default=True,
              help="Activations to imitate: trt = int8 everywhere (TensorRT's, the stricter), "
              "cpu = uint8 after ReLUs.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most N images per split (tests).")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=0), default=4, show_default=True,
              help="Decoding threads.")  # fmt: skip
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="Where the student trains and is scored (auto: cuda where a GPU "
              "is).")  # fmt: skip
def main(checkpoint: Path, out: Path, data: Path | None, epochs: int, lr: float, batch_size: int,
         flavour: str, seed: int, limit: int | None, workers: int,
         device: str) -> None:  # fmt: skip
    """Distill CHECKPOINT into an INT8-robust copy of itself (see the module's docstring)."""
    from marsvision.runtime.files import check_writable_folder
    from marsvision.train.data import resolve_data_dir

    data_dir = resolve_data_dir(data)
    check_writable_folder(out.parent, "--out")
    with interruptible("int8_distill"):  # the checkpoint being written is removed
        result = distill_file(checkpoint, out, data_dir=data_dir, epochs=epochs, lr=lr,
                              batch_size=batch_size, flavour=flavour, seed=seed, limit=limit,
                              workers=workers, device=device)  # fmt: skip
    for split in ("val", "test"):
        m, was = result["metrics"][split], result["distill"]["source_metrics"][split]
        source = f" (source {was['accuracy']:.4f} / {was['balanced_accuracy']:.4f})" if was else ""
        click.echo(f"{split}: accuracy {m['accuracy']:.4f} balanced "
                   f"{m['balanced_accuracy']:.4f}{source}")  # fmt: skip
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
