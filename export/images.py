"""Real MSL images as network inputs (via the checkpoint's eval transform) and parity figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.spec import PreprocessSpec


def split_paths(data_dir: Path, split: str, task: str, n: int) -> list[Path]:
    """The first `n` images of a split; fewer than `n` available is a user error."""
    from marsvision.train.data import read_split

    samples = read_split(data_dir, split, task, limit=n)
    if len(samples) < n:
        raise MarsvisionError(
            f"asked for {n} {split} images but the {split} split of {data_dir} has only "
            f"{len(samples)}; pass a smaller number"
        )
    return [s.path for s in samples]


def calibration_paths(data_dir: Path, task: str, n: int, sample: str = "first") -> list[Path]:
    """The `n` train images that calibrate INT8. "first": the split list's first `n` (the list
    is shuffled, so about as MAHLI-poor as train, 8.5%); "camera": the cameras in turn (MAHLI,
    Mastcam left, Mastcam right; each in list order), so each camera has a third while it lasts.
    Val is 83% MAHLI and test 56%: an even draw gives the close-ups' activations their share of
    the ranges without reading a val or test image."""
    if sample == "first":
        return split_paths(data_dir, "train", task, n)
    if sample != "camera":
        raise MarsvisionError(f"calibration sample {sample!r}: choose first or camera")
    from marsvision.train.data import camera, read_split

    samples = read_split(data_dir, "train", task)
    if len(samples) < n:
        raise MarsvisionError(
            f"asked for {n} train images but the train split of {data_dir} has only "
            f"{len(samples)}; pass a smaller number"
        )
    queues: dict[str, list[Path]] = {}
    for s in samples:
        queues.setdefault(camera(s.path), []).append(s.path)
    order = sorted(queues, key=lambda c: ({"MH": 0, "ML": 1, "MR": 2}.get(c, 3), c))
    picked: list[Path] = []
    depth = 0
    while len(picked) < n:
        for c in order:
            if depth < len(queues[c]) and len(picked) < n:
                picked.append(queues[c][depth])
        depth += 1
    return picked


def load_batch(paths: list[Path], spec: PreprocessSpec) -> np.ndarray:
    """float32 NCHW batch, preprocessed by the torchvision reference transform."""
    import torch
    from PIL import Image

    from marsvision.train.transforms import eval_transform

    tf = eval_transform(spec)
    rows = []
    for p in paths:
        with Image.open(p) as img:
            rows.append(tf(img.convert("RGB")))
    return torch.stack(rows).numpy().astype(np.float32, copy=False)


def ort_logits(onnx_path: Path, batch: np.ndarray, threads: int = 0) -> np.ndarray:
    """Run an ONNX file in ONNX Runtime (CPU) and return float32 logits."""
    import onnxruntime as ort

    from marsvision.runtime.backends.onnxruntime import session_options

    # the runtime's options (exact INT8 sums where this CPU's would saturate): the export's
    # check sees what mars-infer will compute
    so = session_options(threads or None)
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = batch.astype(np.float16) if inp.type == "tensor(float16)" else batch
    out = sess.run(None, {inp.name: x})[0]
    return np.asarray(out, dtype=np.float32)


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Max |logit diff| and top-1 agreement of `candidate` against `reference`."""
    agree = reference.argmax(1) == candidate.argmax(1)
    return {
        "images": len(reference),
        "max_abs_logit_diff": float(np.abs(reference - candidate).max()),
        "top1_agreement": float(agree.mean()),
    }
