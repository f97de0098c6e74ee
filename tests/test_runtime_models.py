"""Runtime backends on the tiny model's exported ONNX files: metadata, parity with torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from marsvision.train.checkpoint import load_checkpoint

ROOT = Path(__file__).parents[1]  # the repository: pyproject.toml and the stage folders


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, Path]:
    return {"fp32": tiny_models["fp32"], "int8": tiny_models["int8-cpu"]}


def test_metadata_travels_in_onnx(models: dict[str, Path], tiny_checkpoint: Path) -> None:
    from marsvision.runtime.backends import load_model_meta

    ckpt = load_checkpoint(tiny_checkpoint)
    for precision, path in (("fp32", models["fp32"]), ("int8", models["int8"])):
        meta = load_model_meta(path)
        assert meta.precision == precision
        assert meta.class_names == list(ckpt["class_names"])
        assert meta.preprocess.to_dict() == ckpt["preprocess"]


def test_onnxruntime_fp32_matches_torch(
    models: dict[str, Path], tiny_checkpoint: Path, msl_dir: Path
) -> None:
    import torch

    from marsvision.runtime.backends import open_runner
    from marsvision.runtime.preprocess import load_image
    from marsvision.train.checkpoint import model_from_checkpoint
    from marsvision.train.data import read_split

    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    with open_runner(models["fp32"], "onnxruntime", "cpu") as runner:
        assert runner.name == "onnxruntime-cpu"
        paths = [s.path for s in read_split(msl_dir, "val", "binary", limit=5)]
        x = np.stack([load_image(p, runner.meta.preprocess) for p in paths])
        got = runner.infer(x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert got.shape == (5, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-3)


def test_decision_threshold_rule(models: dict[str, Path], msl_dir: Path) -> None:
    """A binary model's decision threshold (chosen on val when it ships) makes the labels:
    Rover where P(Rover) >= t; it travels in the metadata JSON; only binary models have one."""
    import dataclasses

    from marsvision.runtime.classifier import Classifier
    from marsvision.runtime.errors import MarsvisionError
    from marsvision.runtime.metadata import ModelMeta
    from marsvision.train.data import read_split

    paths = [s.path for s in read_split(msl_dir, "val", "binary", limit=16)]
    with Classifier(models["fp32"], device="cpu", batch_size=8) as clf:
        assert clf.meta.decision_threshold is None
        plain = clf.predict(paths)
        p_rover = np.array([p.probs[1] for p in plain])  # type: ignore[index]
        assert [p.label for p in plain] == [("Surface", "Rover")[int(q >= 0.5)] for q in p_rover]
        t = float(np.median(p_rover))  # half the images on each side of the threshold
        clf.meta = dataclasses.replace(clf.meta, decision_threshold=t)
        ruled = clf.predict(paths)
    assert [p.probs for p in ruled] == [p.probs for p in plain]
    assert [p.label for p in ruled] == [("Surface", "Rover")[int(q >= t)] for q in p_rover]
    assert {p.label for p in ruled} == {"Surface", "Rover"}
    meta = dataclasses.replace(clf.meta, decision_threshold=0.9)
    assert ModelMeta.from_json(meta.to_json()).decision_threshold == 0.9
    for bad in (0.0, 1.0):
        with pytest.raises(MarsvisionError, match="decision_threshold"):
            dataclasses.replace(meta, decision_threshold=bad)
    with pytest.raises(MarsvisionError, match="two-class"):
        dataclasses.replace(meta, class_names=["a", "b", "c"])


def _pyproject() -> dict[str, Any]:
    """The project's pyproject.toml, parsed."""
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_onnxruntime_build_per_install() -> None:
    """onnxruntime and onnxruntime-gpu install the same module, and with both installed the CPU
    build's files can win (no CUDA): no dependency list pulls one in beside an extra that pulls
    the other, and this environment (make setup: the cpu extra) holds one of them."""
    from marsvision.runtime.backends.onnxruntime import ORT_CPU, ORT_GPU, ort_distributions

    project = _pyproject()["project"]

    def builds(requirements: list[str]) -> set[str]:
        names = {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requirements}
        return names & {ORT_CPU, ORT_GPU}

    extras = project["optional-dependencies"]
    assert not builds(project["dependencies"])
    assert builds(extras["cpu"]) == {ORT_CPU} and builds(extras["gpu"]) == {ORT_GPU}
    assert all(not builds(reqs) for name, reqs in extras.items() if name not in ("cpu", "gpu"))
    assert len(ort_distributions()) == 1


def test_no_cuda_error_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda on an onnxruntime without CUDA: with the CPU build alone, replace it; with
    both builds (`marsvision[gpu]` over an install that had onnxruntime), untangle them."""
    from marsvision.runtime.backends import onnxruntime as ort_backend
    from marsvision.runtime.errors import MarsvisionError

    if "CUDAExecutionProvider" in ort_backend._ort().get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    cpu, gpu = ort_backend.ORT_CPU, ort_backend.ORT_GPU
    monkeypatch.setattr(ort_backend, "ort_distributions", lambda: [cpu])
    with pytest.raises(MarsvisionError, match=r'uninstall -y onnxruntime && pip install "marsv'):
        ort_backend.providers_for("cuda")
    monkeypatch.setattr(ort_backend, "ort_distributions", lambda: [cpu, gpu])
    both = "both installed .*: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxrun"
    with pytest.raises(MarsvisionError, match=both):
        ort_backend.providers_for("cuda")


def test_every_package_goes_into_the_wheel() -> None:
    """setuptools puts only the listed packages into a wheel: a subpackage left out (the runtime's
    backends were) breaks `pip install marsvision` while editable installs and the tests work."""
    tool = _pyproject()["tool"]["setuptools"]
    on_disk = {
        ".".join([package, *init.parent.relative_to(ROOT / folder).parts])
        for package, folder in tool["package-dir"].items()
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert sorted(tool["packages"]) == sorted(on_disk)
