"""The training loop, in reading order: `train_one_epoch`, `evaluate`, `main`.

Images are decoded once into memory (uint8 for training, eval tensors for val/test) and moved
to the device once. With `amp` bf16 (the default on CUDA; `--amp bf16` on a CPU with AMX) the
loop trains and selects under bf16 autocast with channels_last, else in fp32. The checkpoint is
selected on val only; test is evaluated once, at the end, with it, in fp32. With `train_on`
"train+val" (a refit of a recipe chosen on val) val is training data: it is not scored per
epoch, the last epoch is kept, and its final val numbers are training-set numbers. With
"train+half-val" the first half of val by sol (`data.halve_by_sol`) is training data and "val"
everywhere below is the second half, the held-out one the epoch is selected on.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.files import FolderLock, check_writable_folder, make_folder
from marsvision.runtime.spec import PreprocessSpec
from marsvision.train import data as msl
from marsvision.train.adversary import CameraTask, camera_task, pooled_features
from marsvision.train.augment import augment_batch
from marsvision.train.checkpoint import atomic_torch_save, load_checkpoint, make_checkpoint
from marsvision.train.config import (
    HALF_VAL,
    AugmentSpec,
    TrainConfig,
    first_selectable_epoch,
    val_roles,
)
from marsvision.train.device import select_device, use_bf16, uses_channels_last
from marsvision.train.images import eval_tensors, train_store
from marsvision.train.metrics import bootstrap_cis, classification_metrics
from marsvision.train.mix import Mixed, mix_batch
from marsvision.train.model import ModelEma, create_model
from marsvision.train.objective import (
    objective_from_config,
    optimizer_from_config,
    scheduler_from_config,
)
from marsvision.train.progress import Progress
from marsvision.train.report import write_json, write_results
from marsvision.train.resume import (
    RESUME,
    TrainingState,
    load_resume,
    restore,
    run_devices,
    save_resume,
)

CHECKPOINT = "checkpoint.pt"
# resume.pt (377 MB for ResNet-50 + AdamW + EMA) is saved after the last epoch and after any
# epoch that ends this long after the previous save: a crash loses at most about this much work
RESUME_EVERY_S = 300.0
RUN_FILES = (CHECKPOINT, RESUME, "config.json", "metrics.json", "predictions_test.csv",
             "curves.png", "confusion_test.png")  # fmt: skip


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges; a last batch of one image is dropped (BatchNorm needs two)."""
    ranges = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(ranges) > 1 and ranges[-1][1] - ranges[-1][0] < 2:
        ranges.pop()
    return ranges


_Term = tuple[torch.Tensor, torch.Tensor | None, float]  # labels, per-image weights, share


def _terms(labels: torch.Tensor, w: torch.Tensor | None, mixed: Mixed | None) -> list[_Term]:
    """(labels, weights, share) terms of a loss: the image's own label, then, in a mixed batch,
    its partner's."""
    if mixed is None:
        return [(labels, w, 1.0)]
    p = mixed.partner
    return [(labels, w, mixed.lam), (labels[p], None if w is None else w[p], 1.0 - mixed.lam)]


def _loss(
    loss_fn: nn.Module, logits: torch.Tensor, terms: list[_Term], w_norm: torch.Tensor | None
) -> torch.Tensor:
    """The batch loss: each term's loss against its labels, times its share, summed. With
    per-image weights (a `reduction="none"` loss_fn) a term's loss is its weighted sum over
    `w_norm`'s sum, the images' own weights, so that the shares of a mixed batch add up to the
    unmixed loss's scale."""
    losses = []
    for y, w, share in terms:
        loss: torch.Tensor = loss_fn(logits, y)
        if w is not None and w_norm is not None:
            loss = (loss * w).sum() / w_norm.sum()
        losses.append(share * loss)
    return torch.stack(losses).sum()


def train_one_epoch(
    model: nn.Module,
    *,
    images: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    batch_size: int,
    image_size: int,
    spec: PreprocessSpec,
    aug: AugmentSpec,
    generator: torch.Generator,
    ema: ModelEma | None,
    desc: str,
    sample_weights: torch.Tensor | None = None,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    bf16: bool | None = None,
    camera: CameraTask | None = None,
    progress: tuple[float, float] = (0.0, 1.0),
) -> dict[str, float]:
    """One pass over `order` (indices into the uint8 `images`); returns loss, accuracy, images/s.

    `sample_weights` (one per image, with a `reduction="none"` loss_fn): the batch loss is the
    weighted mean, as CrossEntropyLoss's class `weight` makes it. `mixup`, `cutmix`: Beta alphas
    of the batch mixing (train/mix.py), 0 = off; the loss and the accuracy then weigh each
    image's two labels by their shares. `bf16`: autocast and channels_last (None: on CUDA).
    `camera`: also train the camera adversary (train/adversary.py), its reversal coefficient at
    the run's progress, which goes from `progress[0]` to `progress[1]` over this epoch; the result
    then has the head's balanced accuracy, `camera_balanced_accuracy`."""
    device = images.device
    cuda = device.type == "cuda"
    bf16 = cuda if bf16 is None else bf16
    model.train()
    bar = Progress(len(order), desc)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    camera_hits = torch.zeros(2, device=device)  # per camera (0 Mastcam, 1 MAHLI): right, all
    camera_seen = torch.zeros(2, device=device)
    seen = 0
    order = order.to(device)  # once per epoch, not one host copy per step
    batches = _batches(len(order), batch_size)
    features: contextlib.AbstractContextManager[list[torch.Tensor]] = (
        pooled_features(model) if camera is not None else contextlib.nullcontext([])
    )
    with features as pooled:
        for step, (start, stop) in enumerate(batches):
            idx = order[start:stop]
            x = augment_batch(images[idx], out_size=image_size, spec=spec, aug=aug,
                              generator=generator)  # fmt: skip
            w = sample_weights[idx] if sample_weights is not None else None
            mixed = mix_batch(x, mixup=mixup, cutmix=cutmix, generator=generator)
            if mixed is not None:
                x = mixed.x
            terms = _terms(labels[idx], w, mixed)
            if uses_channels_last(device, bf16):
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
                out = logits.float()
                class_loss = _loss(loss_fn, out, terms, w)
                loss = class_loss
                if camera is not None:
                    t = progress[0] + (progress[1] - progress[0]) * step / len(batches)
                    cam = camera.head(pooled[-1], camera.coef(t)).float()
                    cam_terms = _terms(camera.domains[idx], w, mixed)
                    loss = loss + _loss(camera.loss_fn, cam, cam_terms, w)
                    for dt, _, share in cam_terms:
                        right = (cam.argmax(1) == dt).float()
                        camera_hits.index_add_(0, dt, share * right)
                        camera_seen.index_add_(0, dt, torch.full_like(right, share))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            n = stop - start
            loss_sum += class_loss.detach() * n
            pred = logits.argmax(1)
            for yt, _, share in terms:
                correct += share * (pred == yt).sum()
            seen += n
            if not cuda or step % 10 == 0:  # .item() waits for the GPU: only every 10 steps
                bar.update(n, loss=loss_sum.item() / seen, acc=correct.item() / seen)
            else:
                bar.update(n)
    if cuda:
        torch.cuda.synchronize()
    bar.update(0, loss=loss_sum.item() / max(seen, 1), acc=correct.item() / max(seen, 1))
    rate = bar.rate
    bar.close()
    result = {"loss": loss_sum.item() / max(seen, 1), "accuracy": correct.item() / max(seen, 1),
              "images_per_s": rate}  # fmt: skip
    if camera is not None:  # balanced: each camera's recall counts alike (train is 91% Mastcam)
        recall = camera_hits[camera_seen > 0] / camera_seen[camera_seen > 0]
        result["camera_balanced_accuracy"] = recall.mean().item()
    return result


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    *,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    amp: bool = False,
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and softmax probabilities (N, classes) over precomputed eval tensors;
    `amp`: bf16 autocast and channels_last (the selection pass of a bf16 run), else fp32 (the
    reported numbers)."""
    device = inputs.device
    model.eval()
    logits = []
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = amp and tf32  # fp32 is fp32: cuDNN convs default to TF32
    try:
        for i in range(0, len(inputs), batch_size):
            x = inputs[i : i + batch_size]
            if uses_channels_last(device, amp):
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits.append(model(x).float())
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    out = torch.cat(logits)
    loss = F.cross_entropy(out, labels).item()
    return loss, torch.softmax(out, dim=1).cpu().numpy()


def _check_finite(loss: float, what: str, epoch: int, lr: float) -> None:
    """Stop a run whose weights went NaN or inf: it went on to the end and exited 0, every
    image labelled the first class (argmax of NaN) and NaN in metrics.json."""
    if not math.isfinite(loss):
        raise MarsvisionError(
            f"training diverged in epoch {epoch} ({what} {loss}): the weights are no longer "
            f"finite; run again with a lower --lr (it was {lr:g})"
        )


def _split_metrics(
    task: str, samples: list[msl.Sample], probs: np.ndarray, k: int
) -> dict[str, Any]:
    y_true = np.array([s.label for s in samples])
    return classification_metrics(y_true, probs.argmax(1), k, task)


def main(cfg: TrainConfig, *, deadline: float | None = None) -> dict[str, Any]:
    """Train, select on val, test once; write the run folder. Returns the metrics dict.

    `deadline` (a `time.monotonic()` value): start no epoch that would end after it, at the
    mean epoch time so far (the first epoch always runs); the run is then marked stopped early.
    The run folder is locked from its creation to the end (another run into it is refused).
    """
    with FolderLock() as lock:
        return _train(cfg, deadline, lock)


def _train(cfg: TrainConfig, deadline: float | None, lock: FolderLock) -> dict[str, Any]:
    t0 = time.perf_counter()
    # --- validate everything before the run folder is created
    task = msl.check_task(cfg.task)
    data_dir = msl.resolve_data_dir(cfg.data)
    spec = PreprocessSpec.for_input_size(cfg.image_size)
    device = select_device(cfg.device)
    check_writable_folder(cfg.out, "--out")
    if cfg.out.is_dir():  # another run in it is refused now, not after the decoding
        lock.acquire(cfg.out, "mars-train")
    fingerprint = msl.data_fingerprint(data_dir)
    resume = load_resume(cfg.out, cfg, fingerprint) if cfg.resume else None
    names = msl.class_names(task, data_dir)
    k = len(names)
    splits = {s: msl.read_split(data_dir, s, task, cfg.limit) for s in msl.SPLITS}
    msl.check_disjoint(splits)
    refit = cfg.refit
    # the images the weights learn from (splits["train"] stays the official train split), and
    # the val that selects and is scored
    val_fit, splits["val"] = val_roles(cfg.to_dict(), splits["val"])
    fit = splits["train"] + val_fit
    torch.manual_seed(cfg.seed)  # before the model's random init
    # a resumed run's weights come from resume.pt: the --init file need not be there any more
    model = create_model(k, cfg.init if resume is None else "random")
    log = sys.stderr
    workers = max(cfg.workers, 1)
    decoded = len(fit) + len(splits["val"]) + len(splits["test"])
    print(f"decoding {decoded} images ({workers} threads)", file=log)
    store = train_store(fit, store_size=cfg.store_size or spec.resize_size,
                        interpolation=spec.interpolation, workers=workers)  # fmt: skip
    evals = {s: eval_tensors(splits[s], spec=spec, workers=workers) for s in ("val", "test")}
    print(f"decoded in {time.perf_counter() - t0:.1f} s; training on {device}", file=log)

    # --- set up
    if device.type == "cuda":  # no TF32 flags: training and selection run in bf16 autocast
        torch.backends.cudnn.benchmark = True
    gen = torch.Generator().manual_seed(cfg.seed)
    bf16 = use_bf16(cfg.amp, device, log=log)
    layout = torch.channels_last if uses_channels_last(device, bf16) else torch.contiguous_format
    model = model.to(device, memory_format=layout)  # type: ignore[call-overload]  # torch stub lacks it
    y = {s: torch.tensor([x.label for x in splits[s]], device=device) for s in msl.SPLITS}
    y_fit = torch.tensor([x.label for x in fit], device=device)
    images = store.to(device)
    inputs = {s: t.to(device) for s, t in evals.items()}
    objective = objective_from_config(cfg, train=fit, num_classes=k, device=device)
    camera = None
    if cfg.camera_adversary > 0:
        camera = camera_task(model, fit, weight=cfg.camera_adversary, device=device,
                             weighted=objective.sample_weights is not None)  # fmt: skip
    # the camera head trains with the model (same optimizer and schedule); it is not saved in it
    trainable = model if camera is None else nn.ModuleList([model, camera.head])
    optimizer = optimizer_from_config(trainable, cfg)
    steps = len(_batches(len(fit), cfg.batch_size))
    scheduler = scheduler_from_config(optimizer, cfg, steps_per_epoch=steps)
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    history: list[dict[str, Any]] = []
    best: tuple[float, float] = (-1.0, 0.0)
    best_epoch, start_epoch = 0, 1
    # the seconds of the run's parts before a --resume, and the devices its parts ran on
    earlier_seconds, where = 0.0, str(device)
    parts = TrainingState(model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                          camera_head=camera.head if camera else None, generator=gen)  # fmt: skip
    if resume is not None:
        restore(resume, parts)
        history, best_epoch = resume["history"], resume["best_epoch"]
        best = tuple(resume["best"])
        start_epoch = resume["epoch"] + 1
        # a resume.pt from before they were kept: its epochs' own seconds (and this device)
        earlier_seconds = resume.get("seconds", sum(h.get("seconds", 0.0) for h in history))
        where = run_devices(resume.get("device"), where)
        print(f"resuming {cfg.out} after epoch {resume['epoch']}", file=log)
    make_folder(cfg.out, "--out")  # checked before decoding; refused since: one line too
    lock.acquire(cfg.out, "mars-train")  # a new folder's (before any file in it is replaced)
    if resume is None:
        stale = [p for p in RUN_FILES if (cfg.out / p).exists()]
        if stale:
            print(f"replacing the previous run in {cfg.out}", file=log)
            for p in stale:
                (cfg.out / p).unlink()
    for name in (CHECKPOINT, RESUME):  # a write cut by SIGKILL (or the OOM killer) left these
        for tmp in cfg.out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    write_json(cfg.out / "config.json", cfg.to_dict())
    ckpt_args: dict[str, Any] = {
        "task": task,
        "class_names": names,
        "preprocess": spec,
        "config": cfg.to_dict(),
        "data_fingerprint": fingerprint,
    }

    # --- train; select on val
    stopped_after: int | None = None
    # under-trained early epochs can score well on a shifted val set: select from here on
    first_eligible = first_selectable_epoch(cfg.select_from, cfg.epochs)
    # a bf16 run selects on bf16 scores; the reported val/test numbers are fp32 ones of the kept
    # weights, so they differ from the epoch's selection line in the last digits
    scored_in = ", scored under bf16 autocast (the reported numbers: fp32)" if bf16 else ""
    scored = ema.module if ema is not None else model  # the weights evaluated and kept
    vm: dict[str, Any] = {}
    t_epochs, epochs_run = time.monotonic(), 0
    last_resume_save = t_epochs
    n_train = len(fit)
    for epoch in range(start_epoch, cfg.epochs + 1):
        if deadline is not None and epochs_run:
            per_epoch = (time.monotonic() - t_epochs) / epochs_run
            if time.monotonic() + 1.1 * per_epoch > deadline:
                stopped_after = epoch - 1
                print(f"stopping after epoch {stopped_after} of {cfg.epochs}: the next one "
                      "would pass the deadline", file=log)  # fmt: skip
                if best_epoch == 0:  # stopped before the selection window: the last epoch
                    best_epoch = stopped_after
                    atomic_torch_save(make_checkpoint(scored, metrics={"val": vm},
                                                      epoch=stopped_after, **ckpt_args),
                                      cfg.out / CHECKPOINT)  # fmt: skip
                break
        epochs_run += 1
        t_epoch = time.monotonic()
        if objective.sample_p is None:
            order = torch.randperm(n_train, generator=gen)
        else:
            order = torch.multinomial(objective.sample_p, n_train, replacement=True, generator=gen)
        tr = train_one_epoch(
            model, images=images, labels=y_fit, order=order, optimizer=optimizer,
            scheduler=scheduler, loss_fn=objective.loss_fn,
            sample_weights=objective.sample_weights, mixup=cfg.mixup, cutmix=cfg.cutmix,
            bf16=bf16, batch_size=cfg.batch_size,
            image_size=cfg.image_size, spec=spec, aug=cfg.augment, generator=gen, ema=ema,
            desc=f"epoch {epoch}/{cfg.epochs}", camera=camera,
            progress=((epoch - 1) / cfg.epochs, epoch / cfg.epochs),
        )  # fmt: skip
        _check_finite(tr["loss"], "train loss", epoch, cfg.lr)
        entry = {
            "epoch": epoch,
            "train_loss": tr["loss"],
            "train_accuracy": tr["accuracy"],
            "train_images_per_s": tr["images_per_s"],
            "lr": optimizer.param_groups[0]["lr"],
        }
        if camera is not None:  # near 0.5: the features hide the camera from the head
            entry["train_camera_balanced_accuracy"] = tr["camera_balanced_accuracy"]
            print(f"  camera head balanced accuracy {tr['camera_balanced_accuracy']:.4f}, reversal "
                  f"coefficient {camera.coef(epoch / cfg.epochs):.3f}", file=log)  # fmt: skip
        if refit:  # val is in training: nothing to select on; the last epoch is kept
            score = (float(epoch), 0.0)
        else:
            val_loss, val_probs = evaluate(scored, inputs=inputs["val"], labels=y["val"],
                                           batch_size=2 * cfg.batch_size, amp=bf16)  # fmt: skip
            _check_finite(val_loss, "val loss", epoch, cfg.lr)
            vm = _split_metrics(task, splits["val"], val_probs, k)
            entry.update(val_loss=val_loss, val_accuracy=vm["accuracy"],
                         val_balanced_accuracy=vm["balanced_accuracy"])  # fmt: skip
            print(f"  val loss {val_loss:.4f}  accuracy {vm['accuracy']:.4f}  balanced "
                  f"{vm['balanced_accuracy']:.4f}{' (bf16 autocast)' if bf16 else ''}",
                  file=log)  # fmt: skip
            score = (vm["balanced_accuracy"], -val_loss)
        entry["seconds"] = time.monotonic() - t_epoch  # training and val (the sweep's pace)
        history.append(entry)
        if epoch >= first_eligible and score > best:
            best, best_epoch = score, epoch
            atomic_torch_save(make_checkpoint(scored, metrics={"val": vm}, epoch=epoch,
                                              **ckpt_args), cfg.out / CHECKPOINT)  # fmt: skip
        if epoch != cfg.epochs and time.monotonic() - last_resume_save < RESUME_EVERY_S:
            continue
        last_resume_save = time.monotonic()
        save_resume(cfg.out, parts, epoch=epoch, history=history, best=best,
                    best_epoch=best_epoch, cfg=cfg, fingerprint=fingerprint,
                    seconds=earlier_seconds + time.perf_counter() - t0, device=where)  # fmt: skip

    # --- the selected checkpoint, evaluated once on test
    ckpt = load_checkpoint(cfg.out / CHECKPOINT)
    final = create_model(k).to(device, memory_format=layout)  # type: ignore[call-overload]
    final.load_state_dict(ckpt["state_dict"])
    held = "the held-out half of " if cfg.train_on == HALF_VAL else ""
    last = stopped_after or cfg.epochs
    if refit:
        selected_on = "the last epoch (val is training data: --train-on train+val)"
    elif last < first_eligible:
        selected_on = (f"nothing: the last epoch run, kept (the time budget ended the run after "
                       f"epoch {last}, before epoch {first_eligible}, where --select-from "
                       "starts)")  # fmt: skip
    else:
        span = f"epoch {last}" if first_eligible == last else f"epochs {first_eligible}-{last}"
        selected_on = (f"{held}val balanced_accuracy over {span} (ties: "
                       f"lower val loss){scored_in}")  # fmt: skip
    result: dict[str, Any] = {
        "task": task,
        "class_names": names,
        "best_epoch": best_epoch,
        "selected_on": selected_on,
        "trained_on": cfg.train_on,
        "stopped_early_after_epoch": stopped_after,
    }
    probs = {}
    for split in ("val", "test"):
        loss, probs[split] = evaluate(final, inputs=inputs[split], labels=y[split],
                                      batch_size=2 * cfg.batch_size, amp=False)  # fmt: skip
        # a refit selects nothing on val, and its train loss predates each step's update
        try:
            _check_finite(loss, f"{split} loss of the kept weights", best_epoch, cfg.lr)
        except MarsvisionError:  # the kept weights are NaN: no file may offer them
            for name in (CHECKPOINT, RESUME):
                (cfg.out / name).unlink(missing_ok=True)
            raise
        result[split] = _split_metrics(task, splits[split], probs[split], k)
    y_test, pred_test = np.array([s.label for s in splits["test"]]), probs["test"].argmax(1)
    result["test"]["ci95"] = bootstrap_cis(y_test, pred_test, k, task, n_boot=1000,
                                           seed=cfg.seed)  # fmt: skip
    sols = [msl.sol_key(s.path) for s in splits["test"]]
    result["test"]["ci95_by_sol"] = bootstrap_cis(
        y_test, pred_test, k, task, n_boot=1000, seed=cfg.seed, groups=sols)  # fmt: skip
    # the sols of MSL product names; 0 where none is one (your own images in the MSL layout):
    # each image was then its own group, and the interval above is the one over images
    result["test"]["sols"] = len({sol for sol, s in zip(sols, splits["test"])
                                  if msl.msl_product(s.path)})  # fmt: skip
    result.update(config=cfg.to_dict(), data_fingerprint=fingerprint, device=where,
                  history=history, seconds=earlier_seconds + time.perf_counter() - t0)  # fmt: skip
    ckpt["metrics"] = {"val": result["val"], "test": result["test"], "best_epoch": best_epoch,
                       "stopped_early_after_epoch": stopped_after}  # fmt: skip
    atomic_torch_save(ckpt, cfg.out / CHECKPOINT)
    write_results(cfg.out, result, test=splits["test"], test_probs=probs["test"],
                  data_dir=data_dir)  # fmt: skip
    return result
