"""Shared fixtures: the real MSL data and a small ResNet-50 trained briefly on real images."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# torch's OpenMP threads spin while waiting by default; on a shared 2-vCPU machine that made
# training steps 10-20x slower. Set before any test imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The runtime's settings a user may have exported (README) would change what tests check: the
# default model's folder, and INT8's kernels (0 on a CPU without VNNI brings back saturated
# sums). Tests that need them set them. ($MARS_MODELS stays: the shipped-model tests take it.)
for _var in ("MARS_EXPORTS", "MARSVISION_EXACT_INT8"):
    os.environ.pop(_var, None)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def signal_once_written(
    args: list[str], folder: Path, pattern: str, sig: signal.Signals
) -> tuple[int, str]:
    """Run `python -m *args`, send it `sig` as soon as a file matching `pattern` is in `folder`
    (its work under way, e.g. a temporary file being written); its exit status as a shell gives
    it (`$?`), and stderr.

    A death by SIGINT reads 130, as a shell reports it: CPython 3.11 run with `-m` ends by
    SIGINT after a KeyboardInterrupt it saw pass through a C-level `PyRun_String` call, even
    one caught and turned into `sys.exit(130)` (the flag of bpo-41602 stays set: reproduced with
    `ctypes.pythonapi.PyRun_String`; something in the export path makes such a call, and one CI
    run in many got -2 there). Console scripts (`mars-export`) run as files: 130 either way."""
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(folder.glob(pattern)):
            assert proc.poll() is None, f"it ended before writing {pattern}"
            assert time.monotonic() < deadline, f"no {pattern} after 120 s"
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return 130 if proc.returncode == -signal.SIGINT else proc.returncode, err


def _msl_dir() -> Path:
    d = Path(os.environ.get("MARS_DATA") or REPO.parent / "shared" / "msl")
    return d.resolve()  # absolute: some tests change directory (make exports a relative one)


@pytest.fixture(scope="session")
def msl_dir() -> Path:
    """The real MSL data set (../shared/msl or $MARS_DATA). Its absence is a failure, not a skip."""
    d = _msl_dir()
    if not (d / "train-calibrated-shuffled.txt").is_file():
        pytest.fail(f"MSL data not found at {d}: put it at ../shared/msl or set MARS_DATA")
    return d


TINY_SIZE = 64  # input size of the test model: tiny, still a real ResNet-50
TINY_CALIB_IMAGES = 16  # train images the tiny exports calibrate INT8 on
# The tiny exports' --int8-min-agreement: off. The tiny model's near-ties make its INT8
# agreement depend on the CPU (confident_agreement); the floor has its own tests.
TINY_INT8_FLOOR = 0.0


def files_up_to(size: int) -> Callable[[], None]:
    """A subprocess `preexec_fn` that sets the file size limit (`ulimit -f`) to `size` bytes: a
    write past it fails with EFBIG, as a full disk fails with ENOSPC (Python ignores SIGXFSZ)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


class _Started(Exception):
    """Raised by a stand-in run function, with the config it was given."""

    def __init__(self, cfg: Any) -> None:
        super().__init__("started")
        self.cfg = cfg


def config_started_with(
    monkeypatch: pytest.MonkeyPatch, command: Any, target: object, name: str, args: list[str]
) -> Any:
    """The config that the click `command` with `args` starts `target.name` (its run function)
    with, the run itself not made: each flag's way from the command line to the run."""
    from click.testing import CliRunner

    def started(cfg: Any, **_: Any) -> Any:
        raise _Started(cfg)

    monkeypatch.setattr(target, name, started)
    result = CliRunner().invoke(command, args)
    assert isinstance(result.exception, _Started), result.output
    return result.exception.cfg


def confident_agreement(got: Any, ref: Any) -> float:
    """Top-1 agreement of `got` with `ref` (rows of logits or probabilities) on the surer half
    of the images of each class `ref` predicts (top-two margin at least the class's median),
    taken together. INT8 may flip the tiny model's near-ties, and which images are near-ties
    changes with the CPU: its few steps at a high rate take another path under other float
    sums (oneDNN limited to SSE4.1 gave a model whose INT8 agreed on 69% of 32 val images, and
    on all of these). Per class, so that a constant output misses the minority's surer half (3
    of 16 images of 32 here: 81%; the surer half overall was one class), while one flip there
    still passes 0.9."""
    import numpy as np

    ref, pred = np.asarray(ref), np.asarray(ref).argmax(1)
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    classes = np.unique(pred)
    assert len(classes) >= 2, "the reference predicts one class: agreement could not fail"
    sure = np.zeros(len(pred), dtype=bool)
    for c in classes:
        sure |= (pred == c) & (margin >= np.median(margin[pred == c]))
    return float((np.asarray(got).argmax(1) == pred)[sure].mean())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, msl_dir: Path) -> Path:
    """A binary-task ResNet-50 checkpoint at 64 px, trained a few steps on 48 real train images,
    BatchNorm statistics re-estimated on them.

    Made directly with the model and checkpoint modules (not the training loop), so that the
    export, runtime and benchmark tests do not depend on the loop's speed.
    """
    import torch
    from PIL import Image

    from marsvision.runtime.spec import PreprocessSpec
    from marsvision.train.checkpoint import atomic_torch_save, make_checkpoint
    from marsvision.train.data import class_names, data_fingerprint, read_split
    from marsvision.train.model import create_model
    from marsvision.train.transforms import eval_transform

    torch.manual_seed(0)
    spec = PreprocessSpec.for_input_size(TINY_SIZE)
    samples = read_split(msl_dir, "train", "binary", limit=48)
    tf = eval_transform(spec)
    x = torch.stack([tf(Image.open(s.path).convert("RGB")) for s in samples])
    y = torch.tensor([s.label for s in samples])
    model = create_model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(6):
        for i in range(0, len(x), 16):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[i : i + 16]), y[i : i + 16])
            loss.backward()
            opt.step()
    # A few SGD steps at a high rate leave BatchNorm's running statistics far from the batch
    # statistics (eval logits near 1e6, one class for every image). Re-estimate them as a
    # cumulative average over the same images so the eval model has logits of a sane scale
    # and predicts both classes: parity and agreement figures can then move.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for i in range(0, len(x), 16):
            model(x[i : i + 16])
    model.eval()
    ckpt = make_checkpoint(
        model,
        task="binary",
        class_names=class_names("binary", msl_dir),
        preprocess=spec,
        config={"note": "test fixture: 6 epochs over 48 train images"},
        metrics={},
        data_fingerprint=data_fingerprint(msl_dir),
        epoch=6,
    )
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    atomic_torch_save(ckpt, path)
    return path


@pytest.fixture(scope="session")
def tiny_exports(
    tiny_checkpoint: Path, msl_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """One `mars-export --fp16 --int8` of the tiny checkpoint (TensorRT off), shared by the
    export, runtime and benchmark tests. Returns the out dir (manifest.json, the ONNX files)."""
    from marsvision.export.config import ExportConfig
    from marsvision.export.pipeline import export_all

    out = tmp_path_factory.mktemp("export")
    export_all(
        ExportConfig(
            checkpoint=tiny_checkpoint,
            out=out,
            fp16=True,
            int8=True,
            calib_images=TINY_CALIB_IMAGES,
            int8_min_agreement=TINY_INT8_FLOOR,
            tensorrt="off",
            data_dir=msl_dir,
        )
    )
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_exports: Path) -> dict[str, Path]:
    """{"fp32", "fp16", "int8-cpu", "int8-trt"} -> the tiny model's ONNX files."""
    from marsvision.runtime.models import artifact_name

    flavours = ("fp32", "fp16", "int8-cpu", "int8-trt")
    models = {f: tiny_exports / artifact_name("binary", f) for f in flavours}
    missing = [str(p) for p in models.values() if not p.is_file()]
    assert not missing, f"export did not write {missing}"
    return models
