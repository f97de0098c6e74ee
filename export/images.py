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


def load_batch(paths: list[Path], spec: PreprocessSpec) -> np.ndarray:
    """float32 NCHW batch, preprocessed by the torchvision reference transform."""
    import torch

    from marsvision.train.images import open_rgb
    from marsvision.train.transforms import eval_transform

    tf = eval_transform(spec)
    rows = [tf(open_rgb(p)) for p in paths]  # an unreadable image: one line naming it
    return torch.stack(rows).numpy().astype(np.float32, copy=False)


def ort_logits(onnx_path: Path, batch: np.ndarray) -> np.ndarray:
    """Run an ONNX file in ONNX Runtime (CPU) and return float32 logits."""
    from marsvision.runtime.backends.onnxruntime import ort_module, session_options

    ort = ort_module()

    # the runtime's options (exact INT8 sums where this CPU's would saturate): the export's
    # check sees what mars-infer will compute
    so = session_options()
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: batch})[0]  # FP16 files keep float32 I/O
    return np.asarray(out, dtype=np.float32)


def parity(
    reference: np.ndarray, candidate: np.ndarray, threshold: float | None, name: str
) -> dict[str, Any]:
    """Max |logit diff| and label agreement of `candidate` (the model file `name`) against
    `reference`, the labels by the model's rule (`threshold`: a binary model's decision
    threshold, as mars-infer and mars-bench parity label; None: the most probable class).
    `top1_agreement` keeps its name from before the rule counted. Outputs that are not finite
    are refused (argmax made a NaN row the first class, which could agree, and the NaN
    difference passed every bound)."""
    from marsvision.runtime.classifier import non_finite_rows, softmax
    from marsvision.runtime.metadata import decide

    bad = int(non_finite_rows(candidate).sum())
    if bad:
        raise MarsvisionError(
            f"{name} gives outputs that are not finite (NaN or inf) on {bad} of "
            f"{len(candidate)} val images; nothing written"
        )
    agree = decide(softmax(reference), threshold) == decide(softmax(candidate), threshold)
    return {
        "images": len(reference),
        "max_abs_logit_diff": float(np.abs(reference - candidate).max()),
        "top1_agreement": float(agree.mean()),
        "label_rule": "argmax" if threshold is None else f"P(class 1) >= {float(threshold)!r}",
    }
