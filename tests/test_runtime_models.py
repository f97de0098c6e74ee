"""Runtime backends on the tiny model's exported ONNX files: metadata, parity with torch."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from marsvision.runtime.backends import is_engine, load_model_meta, open_runner
from marsvision.runtime.errors import MarsvisionError
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


def _edited(src: Path, out: Path, *, meta: dict[str, Any] | None = None,
            batch: int | None = None) -> Path:  # fmt: skip
    """A copy of the ONNX file `src` with metadata keys replaced, or a fixed batch dimension."""
    import json

    import onnx

    from marsvision.runtime.metadata import METADATA_KEY

    model = onnx.load(str(src))
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = json.dumps({**json.loads(prop.value), **(meta or {})})
    if batch is not None:
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, str(out))
    return out


def test_a_file_format_of_a_newer_marsvision_says_upgrade(
    models: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Metadata or a checkpoint of a newer format (with a key this version does not know) was
    refused for its unknown keys, or told to re-export with this older version; an older
    format still says how to make it anew."""
    import re

    import torch

    from marsvision.runtime.backends.onnxruntime import OnnxRuntimeRunner
    from marsvision.runtime.errors import MarsvisionError

    newer = re.escape(
        "format 2 was written by a newer marsvision (this one reads format 1): upgrade"
    )
    newer_metas: list[dict[str, Any]] = [{"format_version": 2, "labels_from": "x"},
                                         {"format_version": 2}]  # fmt: skip
    for n, meta in enumerate(newer_metas):
        path = _edited(models["fp32"], tmp_path / f"new{n}.onnx", meta=meta)
        with pytest.raises(MarsvisionError, match=rf"^{path}: metadata {newer}"):
            OnnxRuntimeRunner(path, device="cpu")
    path = _edited(models["fp32"], tmp_path / "old.onnx", meta={"format_version": 0})
    with pytest.raises(MarsvisionError, match="format 0 is not 1; re-export it with this"):
        OnnxRuntimeRunner(path, device="cpu")
    ckpt = load_checkpoint(tiny_checkpoint)
    for version, refusal in ((2, newer), (0, "format 0 is not 1; train it again")):
        torch.save({**ckpt, "format_version": version}, tmp_path / "c.pt")
        with pytest.raises(MarsvisionError, match=rf"c.pt: checkpoint {refusal}"):
            load_checkpoint(tmp_path / "c.pt")


def test_a_graph_its_metadata_does_not_describe_is_refused(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """An ONNX file whose graph and metadata disagree (input size, output name, class count, a
    fixed batch) is refused when it opens, in one line, not at its first batch with a traceback."""
    from marsvision.runtime.backends.onnxruntime import OnnxRuntimeRunner
    from marsvision.runtime.errors import MarsvisionError
    from marsvision.runtime.spec import PreprocessSpec

    src = models["fp32"]
    with OnnxRuntimeRunner(src, device="cpu") as runner:
        size = runner.meta.preprocess.input_size
        assert runner.infer(np.zeros((3, 3, size, size), np.float32)).shape == (3, 2)
    bigger = PreprocessSpec.for_input_size(size + 32).to_dict()
    cases: list[tuple[dict[str, Any] | None, int | None, str]] = [
        ({"preprocess": bigger}, None, rf"input is \['batch', 3, {size}, {size}\], its metadata "),
        ({"output_name": "probs"}, None, r"no output 'probs' \(its outputs: \['logits'\]\)"),
        ({"class_names": ["a", "b", "c"]}, None, r"output is \['batch', 2\], its metadata names 3"),
        (None, 1, "input has a fixed batch of 1"),
    ]
    for n, (meta, batch, refusal) in enumerate(cases):
        edited = _edited(src, tmp_path / f"m{n}.onnx", meta=meta, batch=batch)
        with pytest.raises(MarsvisionError, match=refusal + ".*; re-export it with mars-export"):
            OnnxRuntimeRunner(edited, device="cpu")


def _graph(out: Path, *, names: Any = ("Surface", "Rover"), elem: int = 1,
           dims: tuple[Any, ...] = ("batch", 3, 64, 64), width: Any = 2, matmul: bool = True,
           mean_axes: tuple[int, ...] = (2, 3), preprocess: Any = None) -> Path:  # fmt: skip
    """A tiny ONNX classifier with marsvision metadata: input (`elem` type, `dims`) -> channel
    means over `mean_axes` -> a (3, 2) MatMul (or none: one output per channel) -> output
    (batch, `width`), the metadata naming `names`."""
    import json

    import onnx
    from onnx import TensorProto, helper

    from marsvision.runtime.metadata import FORMAT_VERSION, METADATA_KEY
    from marsvision.runtime.spec import PreprocessSpec

    w = np.arange(6, dtype=np.float32).reshape(3, 2) / 10
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["x"], ["m"], axes=list(mean_axes), keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["logits"])
            if matmul
            else helper.make_node("Identity", ["m"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", elem, list(dims))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor("w", TensorProto.FLOAT, list(w.shape), w.ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {
        "task": "binary",
        "class_names": list(names) if isinstance(names, tuple) else names,
        "preprocess": preprocess or PreprocessSpec.for_input_size(64).to_dict(),
        "precision": "fp32",
        "format_version": FORMAT_VERSION,
    }
    helper.set_model_props(model, {METADATA_KEY: json.dumps(meta)})
    onnx.save(model, str(out))
    return out


def test_a_graph_that_fits_its_metadata_runs(tmp_path: Path) -> None:
    """The tiny graph itself (symbolic sizes, run once when it opens) classifies: the refusals
    below are the edits', not the graph's."""
    from marsvision.runtime.backends.onnxruntime import OnnxRuntimeRunner

    for n, dims in enumerate([("batch", 3, 64, 64), ("batch", "c", "h", "w")]):
        with OnnxRuntimeRunner(_graph(tmp_path / f"ok{n}.onnx", dims=dims), device="cpu") as r:
            assert r.infer(np.ones((5, 3, 64, 64), np.float32)).shape == (5, 2)


def test_class_names_and_spec_values_that_would_mislabel_are_refused(tmp_path: Path) -> None:
    """Metadata class names that are not distinct, non-empty names (a duplicate made the CSV's
    columns share a name, an integer printed an empty label, a string became one class per
    letter) and spec values that are not finite or whole (an inf std flattened a channel and
    changed every probability, 64.7 was cut to 64) are refused when the model opens, naming
    the file; they ran with exit 0 before."""
    from marsvision.runtime.backends.onnxruntime import OnnxRuntimeRunner
    from marsvision.runtime.errors import MarsvisionError
    from marsvision.runtime.spec import PreprocessSpec

    spec = PreprocessSpec.for_input_size(64).to_dict()
    names = "must be a list of distinct, non-empty names"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"names": ("Rover", "Rover")}, names),
        ({"names": [0, 1]}, names),
        ({"names": "ab"}, names),
        ({"names": [["a"], ["b"]]}, names),
        ({"names": ["", "Rover"]}, names),
        ({"names": ["Surface", "=HYPERLINK(1)"]}, "name '=HYPERLINK\\(1\\)' starts with '='"),
        ({"names": ["@SUM(1)", "Rover"]}, "a spreadsheet opening the results would run it"),
        ({"preprocess": {**spec, "std": [0.2, float("inf"), 0.2]}}, "three finite numbers"),
        ({"preprocess": {**spec, "mean": [0.5, float("nan"), 0.5]}}, "three finite numbers"),
        ({"preprocess": {**spec, "input_size": 64.7}}, "sizes must be whole numbers"),
        ({"preprocess": {**spec, "resize_size": "73"}}, "sizes must be whole numbers"),
        ({"preprocess": {**spec, "std": ["0.2", 0.2, 0.2]}}, "mean and std must be numbers"),
        ({"preprocess": [1, 2]}, "is not a mapping of its settings"),
        ({"preprocess": {**spec, "input_size": -64}}, "input size -64 is too small"),
    ]
    for n, (edit, refusal) in enumerate(cases):
        path = _graph(tmp_path / f"m{n}.onnx", **edit)
        with pytest.raises(MarsvisionError, match=rf"^{path}: .*{refusal}") as e:
            OnnxRuntimeRunner(path, device="cpu")
        assert "--image-size" not in e.value.message  # mars-train's option, not this file's


def test_a_graph_that_cannot_run_its_input_fails_when_it_opens(tmp_path: Path) -> None:
    """A graph whose input is not float (onnxruntime refused the batch with a traceback, after
    the header was written), or whose symbolic sizes hide a layout or width its metadata does
    not describe (NHWC: a traceback; a third output column shifted the CSV's columns, exit 0),
    is refused in one line when it opens."""
    from onnx import TensorProto

    from marsvision.runtime.backends.onnxruntime import OnnxRuntimeRunner
    from marsvision.runtime.errors import MarsvisionError

    cases: list[tuple[dict[str, Any], str]] = [
        ({"elem": TensorProto.UINT8}, r"input is tensor\(uint8\); mars-infer feeds float32"),
        ({"elem": TensorProto.DOUBLE}, r"input is tensor\(double\)"),
        (
            {"dims": ("batch", "c", 64, 64), "width": "k", "matmul": False},
            r"outputs of shape \(1, 3\), not \(1, 2\)",
        ),
        (
            {"dims": ("batch", "h", "w", "c"), "mean_axes": (1, 2)},
            r"cannot run this model on a batch of \(1, 3, 64, 64\) \(",
        ),
    ]
    for n, (edit, refusal) in enumerate(cases):
        path = _graph(tmp_path / f"m{n}.onnx", **edit)
        with pytest.raises(MarsvisionError, match=rf"^{path}: .*{refusal}"):
            OnnxRuntimeRunner(path, device="cpu")


def test_the_model_sha256_is_of_the_file_that_was_loaded(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sha256 was read when first asked: after a new export replaced the file (or a chdir
    with a relative path), rows made by the weights loaded earlier named the new file. A file
    replaced while it is opened is refused."""
    import os
    import shutil

    from marsvision.runtime import classifier
    from marsvision.runtime.classifier import Classifier
    from marsvision.runtime.errors import MarsvisionError
    from marsvision.runtime.metadata import sha256_file

    path, new = tmp_path / "m.onnx", tmp_path / "new.onnx"
    shutil.copy(models["fp32"], path)
    shutil.copy(models["int8"], new)
    loaded = sha256_file(path)
    with Classifier(path, device="cpu") as clf:
        os.replace(new, path)  # a redeploy
        assert clf.model_sha256 == loaded != sha256_file(path)
    shutil.copy(models["fp32"], new)
    opened = classifier.open_runner

    def replaced_meanwhile(*args: Any, **kw: Any) -> Any:
        runner = opened(*args, **kw)
        os.replace(new, path)
        return runner

    monkeypatch.setattr(classifier, "open_runner", replaced_meanwhile)
    with pytest.raises(MarsvisionError, match=r"changed while it was being opened"):
        Classifier(path, device="cpu")

    def rewritten_meanwhile(*args: Any, **kw: Any) -> Any:  # in place, as `cp -p` rewrites
        runner = opened(*args, **kw)
        st = os.stat(path)
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same size and mtime
        return runner

    monkeypatch.setattr(classifier, "open_runner", rewritten_meanwhile)
    with pytest.raises(MarsvisionError, match=r"changed while it was being opened"):
        Classifier(path, device="cpu")


def test_close_ends_the_threads_of_an_open_generator(
    models: dict[str, Path], msl_dir: Path
) -> None:
    """close() left the decoding threads (and their buffers) of a predict_batches generator
    that was still open until the generator was advanced or collected; they end in close()."""
    import threading

    from marsvision.runtime.classifier import Classifier
    from marsvision.train.data import read_split

    images = [s.path for s in read_split(msl_dir, "val", "binary", limit=6)]
    clf = Classifier(models["fp32"], device="cpu", batch_size=2)
    batches = clf.predict_batches(images)
    assert len(next(batches)) == 2
    assert any(t.name == "mars-decode" for t in threading.enumerate())
    clf.close()
    assert not any(t.name == "mars-decode" or t.name.startswith("decode_")
                   for t in threading.enumerate())  # fmt: skip
    with pytest.raises(ValueError, match="is closed"):
        next(batches)


def _decode_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate()
            if t.name == "mars-decode" or t.name.startswith("decode_")]  # fmt: skip


def test_a_generator_ended_in_its_own_decoding_thread_does_not_hang(
    models: dict[str, Path], msl_dir: Path
) -> None:
    """gc may collect an abandoned predict_batches generator in any thread, one of its own
    decoding threads too: its end there waited for the producer, which waited for that thread,
    and the process then hung at exit. Ending it in its own thread returns, and its threads end."""
    import threading
    import time

    from marsvision.runtime.classifier import Classifier
    from marsvision.train.data import read_split

    images = [s.path for s in read_split(msl_dir, "val", "binary", limit=8)]
    yielded, ended, filled = threading.Event(), threading.Event(), []
    with Classifier(models["int8"], device="cpu", batch_size=2, workers=1) as clf:
        fill = clf._fill

        def ending(path: str | bytes | io.BytesIO, buf: np.ndarray) -> str | None:
            filled.append(path)
            if len(filled) == 3:  # the next batch's first image, once the first is out
                yielded.wait(20)
                batches.close()  # as gc would, in this thread
                ended.set()
            return fill(path, buf)

        clf._fill = ending  # type: ignore[method-assign]
        batches = clf.predict_batches(images)
        assert len(next(batches)) == 2
        yielded.set()
        assert ended.wait(20), "ending the generator in its own decoding thread hung"
        for _ in range(200):
            if not _decode_threads():
                break
            time.sleep(0.05)
        assert _decode_threads() == []


def test_leaving_a_generator_does_not_wait_for_its_next_batch(
    models: dict[str, Path], msl_dir: Path
) -> None:
    """Leaving a predict_batches loop (or close(), or Ctrl-C) waited for the whole batch being
    read ahead to decode: seconds for large images. The images not yet started are skipped."""
    import threading
    import time

    from marsvision.runtime.classifier import Classifier
    from marsvision.train.data import read_split

    images = [s.path for s in read_split(msl_dir, "val", "binary", limit=8)]
    started, filled = threading.Event(), []
    with Classifier(models["int8"], device="cpu", batch_size=4, workers=1) as clf:
        fill = clf._fill

        def slow(path: str | bytes | io.BytesIO, buf: np.ndarray) -> str | None:
            filled.append(path)
            if len(filled) == 5:  # the next batch's first image: a large one
                started.set()
                time.sleep(0.5)
            return fill(path, buf)

        clf._fill = slow  # type: ignore[method-assign]
        batches = clf.predict_batches(images)
        assert len(next(batches)) == 4
        assert started.wait(20)
        batches.close()
        assert len(filled) == 5  # not 8: the three after it were not decoded


def test_one_image_is_classified_in_the_callers_thread(
    models: dict[str, Path], msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An onboard loop's predict([frame]) started a decoding thread and a pool for every frame
    and waited on their hand-offs (8.5 ms a frame against 7.3, INT8 on 2 cores); one image is
    decoded and inferred in the caller's thread, with the rows the pipeline gives."""
    import threading

    from marsvision.runtime.classifier import Classifier
    from marsvision.train.data import read_split

    image = read_split(msl_dir, "val", "binary", limit=1)[0].path
    broken = tmp_path / "broken.JPG"
    broken.write_bytes(b"not a jpeg")
    with Classifier(models["int8"], device="cpu", batch_size=4) as clf:
        piped = {p: clf.predict(iter([p])) for p in (image, broken)}  # the decoding pipeline
        started: list[threading.Thread] = []
        start = threading.Thread.start

        def counted(thread: threading.Thread) -> None:
            started.append(thread)
            start(thread)

        monkeypatch.setattr(threading.Thread, "start", counted)
        for p in (image, broken):
            assert clf.predict([p]) == piped[p]
            assert list(clf.predict_batches((str(p),))) == [piped[p]]
        assert started == []
    assert piped[image][0].ok and not piped[broken][0].ok
    with pytest.raises(ValueError, match="is closed"):
        clf.predict([image])


def test_a_generator_in_a_forked_child_raises(models: dict[str, Path], msl_dir: Path) -> None:
    """A child forked while a predict_batches generator was open hung for ever on its next
    batch (the decoding thread is not copied); it raises, and the parent's goes on."""
    import os
    import warnings

    from marsvision.runtime.classifier import Classifier
    from marsvision.train.data import read_split

    images = [s.path for s in read_split(msl_dir, "val", "binary", limit=8)]
    with Classifier(models["fp32"], device="cpu", batch_size=1) as clf:
        batches = clf.predict_batches(images)
        next(batches)
        with warnings.catch_warnings():  # 3.12: a fork of a process with threads may deadlock
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: 0 when it raised as it should, 1 otherwise, 2 on anything else
            code = 2
            try:
                signal.alarm(60)
                for _ in batches:
                    pass
                code = 1
            except RuntimeError as e:
                code = 0 if "forked child" in str(e) else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert len([b for b in batches]) >= 1  # the parent's goes on


def test_a_closed_classifier_says_so(models: dict[str, Path], msl_dir: Path) -> None:
    from marsvision.runtime.classifier import Classifier
    from marsvision.train.data import read_split

    image = read_split(msl_dir, "val", "binary", limit=1)[0].path
    with Classifier(models["fp32"], device="cpu") as clf:
        assert clf.predict([image])[0].ok
    with pytest.raises(ValueError, match=r"^the classifier of .* is closed$"):
        clf.predict([image])
    # closed while a generator of batches is under way: its next batch says so too (it was an
    # AttributeError of the released runner)
    with Classifier(models["fp32"], device="cpu", batch_size=1) as clf:
        batches = clf.predict_batches([image] * 3)
        assert next(batches)[0].ok
    with pytest.raises(ValueError, match=r"^the classifier of .* is closed$"):
        next(batches)
    # at the call, not at the first next(); and probabilities() too, which blamed the model
    # ("onnxruntime cannot run this model ... 'NoneType' object has no attribute 'run'")
    with pytest.raises(ValueError, match=r"^the classifier of .* is closed$"):
        clf.predict_batches([image])
    size = clf.meta.preprocess.input_size
    with pytest.raises(ValueError, match=r"^the classifier of .* is closed$"):
        clf.probabilities(np.zeros((1, 3, size, size), np.float32))
    with pytest.raises(ValueError, match=r"^the onnxruntime session of .* is closed$"):
        clf.runner.infer(np.zeros((1, 3, size, size), np.float32))


def test_a_batch_in_another_layout_is_the_callers_mistake(models: dict[str, Path]) -> None:
    """An NHWC batch (or one at another size) given to probabilities() or a runner's infer()
    is a ValueError naming the shape the model takes: it was a MarsvisionError blaming the
    model ("onnxruntime cannot run this model"), the one-line user error that hides a bug."""
    from marsvision.runtime.classifier import Classifier

    with Classifier(models["fp32"], device="cpu") as clf:
        size = clf.meta.preprocess.input_size
        takes = rf"the model takes \(n, 3, {size}, {size}\)"
        for shape in ((2, size, size, 3), (2, 3, size + 1, size + 1), (3, size, size)):
            with pytest.raises(ValueError, match=rf"a batch of shape \({shape[0]}, .*; {takes}"):
                clf.probabilities(np.zeros(shape, np.float32))
        assert clf.probabilities(np.zeros((2, 3, size, size), np.float32)).shape == (2, 2)


def test_a_batch_of_raw_or_nan_pixels_is_the_callers_mistake(models: dict[str, Path]) -> None:
    """uint8 pixels not preprocessed, NaN or infinite ones, and a list are refused by every
    runner: they ran, and the INT8 model, which quantizes NaN to a number, called a batch of
    NaN a confident Rover (the non-finite guard on its outputs never saw it). float16 and
    float64 batches are cast and run."""
    from marsvision.runtime.backends import open_runner

    for flavour in ("fp32", "int8"):
        with open_runner(models[flavour], device="cpu") as runner:
            size = runner.meta.preprocess.input_size
            shape = (2, 3, size, size)
            with pytest.raises(ValueError, match="a batch of uint8; the model takes float32"):
                runner.infer(np.zeros(shape, np.uint8))
            for bad in (np.nan, np.inf):
                batch = np.zeros(shape, np.float32)
                batch[1, 2, 3, 4] = bad
                with pytest.raises(ValueError, match="a batch with NaN or infinite pixels"):
                    runner.infer(batch)
            with pytest.raises(TypeError, match="a batch is a numpy array, not list"):
                runner.infer(np.zeros(shape, np.float32).tolist())
            for dtype in (np.float16, np.float64):
                assert runner.infer(np.zeros(shape, dtype)).shape == (2, 2)
            huge = np.zeros(shape, np.float64)
            huge[0, 0, 0, 0] = 1e300  # inf once cast to the model's float32
            with pytest.raises(ValueError, match="pixels beyond the range of float32"):
                runner.infer(huge)


def test_running_out_of_memory_is_said_so_not_blamed_on_the_model(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a memory limit (`ulimit -v`) onnxruntime fails to load a model with std::bad_alloc
    (it said "re-export it with mars-export": the file was fine) or to run a batch with its
    arena's "Failed to allocate memory" (400 characters, no remedy): both now say what to do.
    onnxruntime's own messages, as it gave them under `ulimit -v 400000` and `-b 256`."""
    from marsvision.runtime.backends import onnxruntime as ort_backend

    def no_memory(*args: Any, **kw: Any) -> Any:
        raise RuntimeError(
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: "
            "std::bad_alloc"
        )

    with ort_backend.OnnxRuntimeRunner(models["fp32"], device="cpu") as runner:
        size = runner.meta.preprocess.input_size

        class Session:
            def run(self, *args: Any) -> Any:
                raise RuntimeError(
                    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned "
                    "while running Conv node. ... BFCArena::AllocateRawInternal Failed to "
                    "allocate memory for requested buffer of size 822083584"
                )

        runner._sess = Session()
        with pytest.raises(MarsvisionError, match=r"not enough memory to run a batch of 2 "
                           r"images: .*use a smaller batch size \(mars-infer -b\)"):  # fmt: skip
            runner.infer(np.zeros((2, 3, size, size), np.float32))
    monkeypatch.setattr(ort_backend.ort_module(), "InferenceSession", no_memory)
    with pytest.raises(MarsvisionError, match=r"not enough memory to load this model \(.*"
                       r"std::bad_alloc\): .*run the INT8 file") as e:  # fmt: skip
        ort_backend.OnnxRuntimeRunner(models["fp32"], device="cpu")
    assert "re-export" not in e.value.message


def test_no_thread_to_decode_with_is_one_line_not_a_traceback(
    models: dict[str, Path], msl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `ulimit -v` (each thread reserves its stack) or a pids limit, Python cannot start
    the decoding threads: a RuntimeError's traceback from the pool. Now a MarsvisionError that
    names the limit and the flags that use fewer threads, whichever thread failed to start."""
    import threading

    from marsvision.runtime.classifier import Classifier

    images = sorted((msl_dir / "calibrated").glob("*.JPG"))[:3]
    start = threading.Thread.start
    with Classifier(models["int8"], device="cpu", batch_size=2) as clf:
        for name in ("mars-decode", "decode_0"):  # the producer, a worker of its pool

            def refused(thread: threading.Thread, name: str = name) -> None:
                if thread.name == name:
                    raise RuntimeError("can't start new thread")
                start(thread)

            monkeypatch.setattr(threading.Thread, "start", refused)
            with pytest.raises(MarsvisionError, match=r"^cannot start a decoding thread .*"
                               r"ulimit -v.*mars-infer -j 1 --threads 1"):  # fmt: skip
                clf.predict(images)
        monkeypatch.setattr(threading.Thread, "start", start)
        assert [p.status for p in clf.predict(images)] == ["ok"] * 3  # once it can


def test_a_model_file_of_other_bytes_than_the_sha256_given_is_refused(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """A bit flipped in a weight (a copy, its storage) loads and runs, with other probabilities:
    `Classifier(path, sha256=...)` refuses any bytes but those of the digest given (from the
    export's manifest.json), as mars-infer's default model does; without it, it runs."""
    from marsvision.runtime.classifier import Classifier
    from marsvision.runtime.metadata import sha256_file

    want = sha256_file(models["fp32"])
    with Classifier(models["fp32"], device="cpu", sha256=f" {want.upper()}\n") as clf:
        assert clf.model_sha256 == want
    data = bytearray(models["fp32"].read_bytes())
    data[len(data) // 2] ^= 0x01  # a weight, past the graph and metadata
    flipped = tmp_path / models["fp32"].name
    flipped.write_bytes(bytes(data))
    with Classifier(flipped, device="cpu") as clf:  # it loads and runs
        size = clf.meta.preprocess.input_size
        assert clf.probabilities(np.zeros((1, 3, size, size), np.float32)).shape == (1, 2)
    says = rf"^{flipped} is not the file expected: sha256 {sha256_file(flipped)[:12]}\.\.\., "
    with pytest.raises(MarsvisionError, match=says + rf"expected {want[:12]}\.\.\. \(damaged"):
        Classifier(flipped, device="cpu", sha256=want)
    # refused before the file is loaded (an engine would be deserialized from the bytes vetted)
    import marsvision.runtime.classifier as classifier

    def never(*args: Any, **kw: Any) -> Any:
        raise AssertionError("loaded")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(classifier, "open_runner", never)
        with pytest.raises(MarsvisionError, match="is not the file expected"):
            Classifier(flipped, device="cpu", sha256=want)
    # a digest that is none: "" (which a manifest uses for "unchecked") refused every file
    for bad, error in (("", ValueError), ("abc", ValueError), ("g" * 64, ValueError),
                       (want.encode(), TypeError)):  # fmt: skip
        with pytest.raises(error, match="sha256 is a str of 64 hex|sha256 is 64 hex digits"):
            Classifier(models["fp32"], device="cpu", sha256=bad)  # type: ignore[arg-type]


def test_images_held_in_memory_are_classified_as_their_files_are(
    models: dict[str, Path], msl_dir: Path
) -> None:
    """`predict_encoded` takes (name, encoded bytes) pairs, a downlink's frames never written to
    disk: the same rows as the files of those bytes (every batch size), an error row for bytes
    that are not an image or are cut short, and a TypeError for what is not such a pair."""
    from marsvision.runtime.classifier import Classifier

    files = sorted((msl_dir / "calibrated").glob("*.JPG"))[:5]
    jpeg = files[0].read_bytes()
    frames = [(f.name, f.read_bytes()) for f in files]
    frames += [("text", b"not an image"), ("cut", jpeg[: len(jpeg) // 2])]
    with Classifier(models["int8"], device="cpu", batch_size=3) as clf:
        rows = clf.predict_encoded(frames)
        want = clf.predict(files)
        assert [(r.path, r.status) for r in rows[:5]] == [(f.name, "ok") for f in files]
        assert [(r.label, r.probs) for r in rows[:5]] == [(w.label, w.probs) for w in want]
        assert rows[5].error == "not an image Pillow can read (unknown format or empty file)"
        assert rows[6].status == "error" and "truncated" in str(rows[6].error)
        assert clf.predict_encoded(iter(frames[:1])) == rows[:1] and clf.predict_encoded([]) == []
        with pytest.raises(TypeError, match="frames is one .name, bytes. pair"):
            clf.predict_encoded(frames[0])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="frames is one .name, bytes. pair"):
            clf.predict_encoded(("a", bytearray(jpeg)))  # type: ignore[arg-type]
        for wrong in ([(str(files[0]), files[0])], [jpeg], [("a", jpeg, "b")], {"a": jpeg}):
            with pytest.raises(TypeError, match=r"a frame is a \(name: str, data: bytes\) pair"):
                clf.predict_encoded(wrong)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is closed"):
        clf.predict_encoded(frames)


def test_paths_are_read_a_batch_at_a_time(models: dict[str, Path], msl_dir: Path) -> None:
    """predict_batches read all of `paths` before its first batch: a generator of paths that
    arrive over time gave nothing until its end, an endless one nothing at all. Now a batch's
    rows come once the next batch's paths are in, read in the caller's thread (a generator
    bound to it, a sqlite cursor, works), and a close does not wait for the next path; an
    exception from the paths comes after the batches before it."""
    import itertools
    import threading
    import time

    from marsvision.runtime.classifier import Classifier
    from marsvision.train.data import read_split

    image = read_split(msl_dir, "val", "binary", limit=1)[0].path
    pulled, threads = 0, set()
    release = threading.Event()

    def arriving() -> Iterator[Path]:  # its 9th path keeps the test waiting up to 30 s
        nonlocal pulled
        while True:
            pulled += 1
            threads.add(threading.current_thread())
            if pulled > 8:
                release.wait(30)
            yield image

    with Classifier(models["int8"], device="cpu", batch_size=4) as clf:
        batches = clf.predict_batches(arriving())
        t0 = time.monotonic()
        (first,) = itertools.islice(batches, 1)
        batches.close()  # stops the decoding thread
        waited = time.monotonic() - t0
        release.set()
    assert len(first) == 4 and all(p.ok for p in first)
    assert pulled == 8  # the batch and the next one's paths
    assert waited < 25  # neither the batch nor the close waited for the 9th path
    assert threads == {threading.current_thread()}

    def failing() -> Iterator[Path]:
        yield from [image] * 20
        raise OSError("the source went away")

    got: list[int] = []
    with Classifier(models["int8"], device="cpu", batch_size=8) as clf:
        with pytest.raises(OSError, match="the source went away"):
            got.extend(len(b) for b in clf.predict_batches(failing()))
        assert got == [8, 8, 4]  # the paths before it, the last 4 too (they got no row)
        got.clear()
        odd: list[Any] = [image] * 10 + [None, image]
        with pytest.raises(TypeError):  # an element that is not a path: the same
            got.extend(len(b) for b in clf.predict_batches(odd))
        assert got == [8, 2]
    with Classifier(models["int8"], device="cpu", batch_size=4) as clf:  # and a short one
        assert [len(b) for b in clf.predict_batches(iter([image] * 5))] == [4, 1]
        assert clf.predict([]) == []


def test_a_live_stream_gets_each_frame_before_the_next(
    models: dict[str, Path], msl_dir: Path
) -> None:
    """read_ahead=1: a batch's rows come before the next paths are read. With the read-ahead
    that overlaps decoding and inference (2), a frame from a camera, one path at a time, got its
    row only once the next frame had come."""
    from marsvision.runtime.classifier import Classifier
    from marsvision.train.data import read_split

    image = read_split(msl_dir, "val", "binary", limit=1)[0].path
    for read_ahead, pulled_at_first in ((1, 1), (2, 2)):
        pulled = 0

        def frames() -> Iterator[Path]:
            nonlocal pulled
            for _ in range(3):
                pulled += 1
                yield image

        with Classifier(models["int8"], device="cpu", batch_size=1) as clf:
            rows = clf.predict_batches(frames(), read_ahead=read_ahead)
            first = next(rows)
            assert pulled == pulled_at_first and first[0].ok
            assert [len(b) for b in rows] == [1, 1] and pulled == 3
    with Classifier(models["int8"], device="cpu") as clf:
        for bad in (0, 3, True, 1.0):
            with pytest.raises(ValueError, match="read_ahead is 1 or 2"):
                clf.predict_batches([image], read_ahead=bad)  # type: ignore[arg-type]


def test_classifier_arguments_that_would_misbehave(models: dict[str, Path], msl_dir: Path) -> None:
    from marsvision.runtime.classifier import Classifier
    from marsvision.train.data import read_split

    image = read_split(msl_dir, "val", "binary", limit=1)[0].path
    with Classifier(models["fp32"], device="cpu") as clf:
        for one in (str(image), Path(image)):  # a str was classified letter by letter
            with pytest.raises(TypeError, match="pass a list of paths"):
                clf.predict(one)  # type: ignore[arg-type]
    # workers=-1 failed only at predict, in ThreadPoolExecutor; 0 meant the default; a
    # batch_size of 2.5 failed in predict with islice's words; threads=-1 ran as the default
    for name, bad in (("workers", 0), ("workers", -1), ("batch_size", 2.5), ("batch_size", 0),
                      ("threads", -1), ("threads", 1.5), ("workers", True)):  # fmt: skip
        with pytest.raises(ValueError, match=f"{name} must be a whole number of at least 1.*, "
                           f"got {bad!r}$"):  # fmt: skip
            Classifier(models["fp32"], device="cpu", **{name: bad})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threads must be a whole number of at least 1"):
        open_runner(models["fp32"], device="cpu", threads=0)  # the benchmarks open runners too
    two = np.int64(2)  # numpy's whole numbers are counts too
    with Classifier(models["fp32"], device="cpu", batch_size=two, threads=1) as clf:  # type: ignore[arg-type]
        assert clf.predict([image])[0].ok


def test_a_model_path_that_is_not_utf8(models: dict[str, Path], tmp_path: Path) -> None:
    """onnxruntime takes only UTF-8 path strings: a model under another name (Latin-1, say)
    still loads, and is not called a broken model."""
    import os
    import shutil

    from marsvision.runtime.backends.onnxruntime import OnnxRuntimeRunner

    odd = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"mod\xe9le.onnx")))
    shutil.copy(models["fp32"], odd)
    with OnnxRuntimeRunner(odd, device="cpu") as runner:
        size = runner.meta.preprocess.input_size
        assert runner.infer(np.zeros((1, 3, size, size), np.float32)).shape == (1, 2)


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
        t = float(np.sort(p_rover)[8])  # half the images on each side, one of them on it
        clf.meta = dataclasses.replace(clf.meta, decision_threshold=t)
        ruled = clf.predict(paths)
    assert [p.probs for p in ruled] == [p.probs for p in plain]
    assert [p.label for p in ruled] == [("Surface", "Rover")[int(q >= t)] for q in p_rover]
    assert {p.label for p in ruled} == {"Surface", "Rover"}
    assert sum(p.label == "Rover" for p in ruled) == 8  # the image at t itself too
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


def test_an_onnxruntime_that_cannot_import_is_not_called_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """onnxruntime 1.18 under numpy 2 fails to import: that said "onnxruntime is not installed:
    pip install ...", and pip then said it was."""
    import sys

    from marsvision.runtime.backends import onnxruntime as ort_backend
    from marsvision.runtime.errors import MarsvisionError

    class Broken:
        def find_spec(self, name: str, *_: object) -> None:
            if name == "onnxruntime":
                raise ImportError("A module that was compiled using NumPy 1.x cannot be run in\n"
                                  "NumPy 2.2.6 as it may crash.")  # fmt: skip

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(MarsvisionError) as e:
        ort_backend.ort_module()
    assert e.value.message == (
        "onnxruntime is installed but cannot be imported (A module that was compiled using NumPy "
        "1.x cannot be run in); reinstall it, or one built for this numpy and Python"
    )

    class PartMissing:  # a broken install: onnxruntime there, one of its modules not
        def find_spec(self, name: str, *_: object) -> None:
            if name == "onnxruntime":
                raise ModuleNotFoundError("No module named 'onnxruntime.capi'",
                                          name="onnxruntime.capi")  # fmt: skip

    monkeypatch.setattr(sys, "meta_path", [PartMissing(), *sys.meta_path[1:]])
    with pytest.raises(MarsvisionError, match=r"^onnxruntime is installed but cannot be import"):
        ort_backend.ort_module()  # it was a ModuleNotFoundError traceback
    monkeypatch.setattr(sys, "meta_path", sys.meta_path[1:])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed
    with pytest.raises(MarsvisionError, match=r'^onnxruntime is not installed: pip install "mar'):
        ort_backend.ort_module()


def test_no_cuda_error_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda on an onnxruntime without CUDA: with the CPU build alone, replace it; with
    both builds (`marsvision[gpu]` over an install that had onnxruntime), untangle them."""
    from marsvision.runtime.backends import onnxruntime as ort_backend
    from marsvision.runtime.errors import MarsvisionError

    if "CUDAExecutionProvider" in ort_backend.ort_module().get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    cpu, gpu = ort_backend.ORT_CPU, ort_backend.ORT_GPU
    monkeypatch.setattr(ort_backend, "ort_distributions", lambda: [cpu])
    with pytest.raises(MarsvisionError, match=r'uninstall -y onnxruntime && pip install "marsv'):
        ort_backend.providers_for("cuda")
    monkeypatch.setattr(ort_backend, "ort_distributions", lambda: [cpu, gpu])
    both = "both installed .*: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxrun"
    with pytest.raises(MarsvisionError, match=both):
        ort_backend.providers_for("cuda")


def test_the_cuda_provider_runs_fp32_in_fp32(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions ask the CUDA provider for FP32 math (`use_tf32` 0; its default is TF32 on Ampere
    and later, which the FP32 parity bounds against PyTorch's FP32 do not allow); the providers
    without options are passed as names. What onnxruntime is handed is checked here, on a CPU
    build: the effect on a GPU is unverified."""
    from marsvision.runtime.backends import onnxruntime as ort_backend

    handed: list[Any] = []
    real = ort_backend.ort_module().InferenceSession

    def spy(model: Any, sess_options: Any = None, providers: Any = None, **kw: Any) -> Any:
        handed.append((providers, kw))
        return real(model, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort_backend.ort_module(), "InferenceSession", spy)
    so = ort_backend.session_options(1)
    ort_backend._session(models["fp32"], ["CUDAExecutionProvider", "CPUExecutionProvider"], so)
    assert handed == [
        ([("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
         {"enable_fallback": 0})
    ]  # fmt: skip


class _ProvidersSession:
    """A CPU session that says it runs on the providers it was handed (as a GPU's would)."""

    def __init__(self, real: Any, model: Any, sess_options: Any, providers: list[Any]) -> None:
        self._sess = real(model, sess_options=sess_options, providers=["CPUExecutionProvider"])
        self._providers = [p[0] if isinstance(p, tuple) else p for p in providers]

    def get_providers(self) -> list[str]:
        return self._providers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sess, name)


def test_no_silent_fallback_from_a_gpu_provider(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--backend tensorrt with an .onnx file where the TensorRT provider does not start:
    onnxruntime's own fallback printed a banner to stdout (into mars-infer's rows), dropped the
    providers' options and ran on CUDA, in rows named onnxruntime-tensorrt. Now onnxruntime is
    asked for no fallback, a session without the TensorRT provider is refused, and a provider
    that fails to load the model is named with what to try (re-exporting does not mend it).
    Checked on a CPU build by faking what onnxruntime returns: unverified on a GPU."""
    from marsvision.runtime.backends import onnxruntime as ort_backend
    from marsvision.runtime.errors import MarsvisionError

    trt, cuda, cpu = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
    real = ort_backend.ort_module().InferenceSession
    started = [cuda, cpu]  # the TensorRT provider skipped, as without libnvinfer

    def without_trt(model: Any, sess_options: Any = None, providers: Any = None, **kw: Any) -> Any:
        assert kw == {"enable_fallback": 0}
        return _ProvidersSession(real, model, sess_options, started)

    monkeypatch.setattr(ort_backend.ort_module(), "InferenceSession", without_trt)
    monkeypatch.setattr(ort_backend, "providers_for", lambda device, backend: [trt, cuda, cpu])
    with pytest.raises(MarsvisionError, match=r"could not start TensorRT .*\['CUDAExecutionPr"):
        ort_backend.OnnxRuntimeRunner(tiny_models["int8-trt"], backend="tensorrt")
    started = [trt, cuda, cpu]
    runner = ort_backend.OnnxRuntimeRunner(tiny_models["int8-trt"], backend="tensorrt")
    assert runner.name == "onnxruntime-tensorrt"

    def failing(model: Any, sess_options: Any = None, providers: Any = None, **kw: Any) -> Any:
        if providers == [cpu]:  # the metadata's session
            return real(model, sess_options=sess_options, providers=providers)
        raise RuntimeError("TensorRT EP failed to create engine from network")

    monkeypatch.setattr(ort_backend.ort_module(), "InferenceSession", failing)
    with pytest.raises(
        MarsvisionError,
        match=r"with TensorrtExecutionProvider and CUDAExecution"
        r"Provider \(TensorRT EP failed .*\); try --backend onnxruntime, and if",
    ):
        ort_backend.OnnxRuntimeRunner(tiny_models["int8-trt"], backend="tensorrt")
    monkeypatch.setattr(ort_backend, "providers_for", lambda device, backend: [cuda, cpu])
    with pytest.raises(MarsvisionError, match=r"with CUDAExecutionProvider \(.*\); try --device c"):
        ort_backend.OnnxRuntimeRunner(tiny_models["fp32"], device="cuda")
    monkeypatch.setattr(
        ort_backend.ort_module(), "InferenceSession", lambda *a, **kw: failing(None, None, None)
    )  # a file onnxruntime cannot load on the CPU: re-exporting is the advice
    with pytest.raises(MarsvisionError, match=r"cannot load this model \(TensorRT .*\); re-export"):
        ort_backend._session(tiny_models["fp32"], [cpu], ort_backend.session_options(1))


def test_the_tensorrt_provider_gets_the_models_precision_profile_and_cache(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--backend tensorrt with an .onnx file: onnxruntime's TensorRT provider was handed no
    options, so it refused Q/DQ models (no INT8 in its builder), rebuilt its engine for each new
    batch size and cached nothing. What onnxruntime is handed is checked here, on a CPU build
    (the sessions run on the CPU provider): the effect on a GPU is unverified."""
    from marsvision.runtime.backends import onnxruntime as ort_backend
    from marsvision.runtime.errors import MarsvisionError
    from marsvision.runtime.metadata import sha256_file

    trt, cuda, cpu = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
    handed: list[Any] = []
    real = ort_backend.ort_module().InferenceSession

    def spy(model: Any, sess_options: Any = None, providers: Any = None, **kw: Any) -> Any:
        handed.append(providers)
        return _ProvidersSession(real, model, sess_options, providers)

    monkeypatch.setattr(ort_backend.ort_module(), "InferenceSession", spy)
    monkeypatch.setattr(ort_backend, "providers_for", lambda device, backend: [trt, cuda, cpu])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    loads: list[int] = []  # TensorRT's pip libraries, loaded for the provider only
    monkeypatch.setattr(ort_backend, "_load_tensorrt_libraries", lambda: loads.append(1))
    model = tiny_models["int8-trt"]
    runner = ort_backend.OnnxRuntimeRunner(model, backend="tensorrt")
    assert len(loads) == 1
    size = runner.meta.preprocess.input_size
    # an engine of another onnxruntime or TensorRT is not loaded: it fails rather than rebuilds
    versions = f"ort-{ort_backend.ort_module().__version__}-trt-system"  # no TensorRT here
    cache = tmp_path / "cache" / "marsvision" / "ort-tensorrt" / sha256_file(model)[:16] / versions
    assert cache.is_dir()
    assert handed[-1] == [
        (trt, {"trt_profile_min_shapes": f"input:1x3x{size}x{size}",
               "trt_profile_opt_shapes": f"input:32x3x{size}x{size}",
               "trt_profile_max_shapes": f"input:32x3x{size}x{size}",
               "trt_int8_enable": "True",
               "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
               "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache)}),
        (cuda, {"use_tf32": "0"}),
        cpu,
    ]  # fmt: skip
    # a batch over the profile's 32 runs in pieces, with the same logits
    sizes: list[int] = []
    run = runner._sess.run

    def counted_run(names: Any, feed: dict[str, Any]) -> Any:
        sizes.append(len(feed["input"]))
        return run(names, feed)

    runner._sess.run = counted_run
    x = np.random.default_rng(0).normal(size=(70, 3, size, size)).astype(np.float32)
    got = runner.infer(x)
    assert sizes == [32, 32, 6]
    assert runner.infer(x[:0]).shape == (0, runner.meta.num_classes) and len(sizes) == 3
    with ort_backend.OnnxRuntimeRunner(model, device="cpu") as plain:
        np.testing.assert_allclose(got, plain.infer(x), rtol=1e-5, atol=1e-5)
    fp16 = ort_backend.OnnxRuntimeRunner(tiny_models["fp16"], backend="tensorrt")
    assert handed[-1][0][1]["trt_fp16_enable"] == "True"
    assert fp16.meta.precision == "fp16"
    # the x86 flavour's uint8 activations are not for TensorRT
    with pytest.raises(MarsvisionError, match="uint8 .*use the .int8-trt.onnx file"):
        ort_backend.OnnxRuntimeRunner(tiny_models["int8-cpu"], backend="tensorrt")
    # no cache where none can be made (a read-only home), nor in a relative folder
    for unusable in ("/proc/no-cache", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", unusable)
        ort_backend.OnnxRuntimeRunner(model, backend="tensorrt")
        assert not any("cache" in key for key in handed[-1][0][1])
    loaded = len(loads)
    ort_backend.meta_from_onnx(model)  # a CPU session
    assert len(loads) == loaded


def test_tensorrt_libraries_are_loaded_for_the_provider_where_pip_installed_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """onnxruntime's TensorRT provider dlopens libnvinfer by name, which TensorRT's pip wheels
    keep off the loader's path; importing tensorrt loads it. A tensorrt that fails to import
    (no GPU driver, a library missing) is left for the provider to report; its version names
    the engine cache (see the test above)."""
    import sys
    from importlib import metadata

    from marsvision.runtime.backends import onnxruntime as ort_backend

    fake = tmp_path / "site" / "tensorrt"
    fake.mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    bodies = [
        ("raise OSError('libcudart.so.13: cannot open')", False),
        ("import pathlib; pathlib.Path(__file__).with_name('loaded').touch()", True),
        ("raise ImportError('no module named tensorrt_bindings')", False),
    ]
    for body, loaded in bodies:
        (fake / "__init__.py").write_text(body + "\n")
        (fake / "loaded").unlink(missing_ok=True)
        monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
        ort_backend._load_tensorrt_libraries()
        assert (fake / "loaded").exists() == loaded, body
    versions = {"tensorrt-cu13-libs": "10.13.3.9", "tensorrt": "10.13.3.9"}

    def version(dist: str) -> str:
        if dist not in versions:
            raise metadata.PackageNotFoundError(dist)
        return versions[dist]

    monkeypatch.setattr(metadata, "version", version)
    assert ort_backend._tensorrt_version() == "10.13.3.9"
    versions = {}
    assert ort_backend._tensorrt_version() == "system"


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


def test_the_packages_say_they_are_typed() -> None:
    """PEP 561: without a py.typed marker in the installed package, a user's type checker reads
    none of marsvision's annotations (`Classifier(model, batch_size="8")` passed as Any)."""
    tool = _pyproject()["tool"]["setuptools"]
    assert "py.typed" in tool["package-data"]["*"]
    for folder in tool["package-dir"].values():
        assert (ROOT / folder / "py.typed").is_file(), folder


def test_warmup_loads_the_decoders_and_runs_the_model(
    models: dict[str, Path], msl_dir: Path
) -> None:
    """warmup() does what the first image did besides its own work (Pillow's plugins, the
    backend's first run), in a fresh process, and leaves the classifier as it was."""
    code = (
        "import sys\n"
        "from PIL import Image\n"
        "from marsvision.runtime.classifier import Classifier\n"
        "clf = Classifier(sys.argv[1], device='cpu')\n"
        "before = Image._initialized\n"
        "clf.warmup()\n"
        "print(before, Image._initialized, clf.predict([sys.argv[2]])[0].ok)\n"
    )
    image = str(next((msl_dir / "calibrated").glob("*.JPG")))
    out = subprocess.run([sys.executable, "-c", code, str(models["int8"]), image],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.split() == ["0", "2", "True"]


def test_engine_suffixes_are_read_in_any_case() -> None:
    """.plan, .engine and .trt files are TensorRT engines whatever the case of their suffix (a
    Windows share's M.PLAN); .onnx files, and names that only contain a suffix, are not."""
    for name in ("m.plan", "M.PLAN", "m.Engine", "m.trt", "dir.plan/m.TRT"):
        assert is_engine(name), name
    for name in ("m.onnx", "m.ONNX", "m.plan.onnx", "plan"):
        assert not is_engine(name), name


class _Recorder:
    """Stands in for a runner class: records how it was opened."""

    opened: list[tuple[Path, dict[str, Any]]] = []

    def __init__(self, path: Path, **kwargs: Any) -> None:
        _Recorder.opened.append((path, kwargs))


def test_open_runner_passes_the_backend_device_and_threads_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An .onnx file opens on ONNX Runtime with the device and thread count asked for, and
    --backend tensorrt asks ONNX Runtime for its TensorRT provider; an engine opens on TensorRT
    with the device asked for."""
    from marsvision.runtime.backends import onnxruntime, tensorrt

    monkeypatch.setattr(onnxruntime, "OnnxRuntimeRunner", _Recorder)
    monkeypatch.setattr(tensorrt, "TensorRTRunner", _Recorder)
    monkeypatch.setattr(_Recorder, "opened", [])
    onnx, plan = tmp_path / "m.onnx", tmp_path / "m.plan"
    onnx.write_bytes(b"model")
    plan.write_bytes(b"engine")
    open_runner(onnx, "auto", "cpu", threads=3)
    open_runner(onnx, "tensorrt", "cuda")
    open_runner(onnx, "onnxruntime", "auto", threads=1)
    open_runner(plan, "auto", "cuda")
    assert _Recorder.opened == [
        (onnx, {"device": "cpu", "backend": "onnxruntime", "threads": 3}),
        (onnx, {"device": "cuda", "backend": "tensorrt", "threads": None}),
        (onnx, {"device": "auto", "backend": "onnxruntime", "threads": 1}),
        (plan, {"device": "cuda"}),
    ]


def test_options_that_cannot_run_an_onnx_file_are_refused_before_it_loads(tmp_path: Path) -> None:
    """--backend tensorrt with --device cpu, an unknown backend or device, and an empty file are
    one-line errors, before onnxruntime reads the file."""
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    with pytest.raises(MarsvisionError, match="^TensorRT needs a GPU: use --device cuda"):
        open_runner(model, "tensorrt", "cpu")
    with pytest.raises(MarsvisionError, match="^unknown backend 'trt'; choose one of auto, onnx"):
        open_runner(model, "trt")
    with pytest.raises(MarsvisionError, match="^unknown device 'gpu'; choose one of auto, cpu"):
        open_runner(model, device="gpu")
    model.write_bytes(b"")
    for call in (open_runner, load_model_meta):
        with pytest.raises(MarsvisionError, match=r"is empty \(0 bytes\): re-export it"):
            call(model)


def test_a_folder_given_as_the_model_names_at_most_four_of_its_models(tmp_path: Path) -> None:
    """A folder as the model says so and names the models in it (the first four, then "..."),
    engines of any suffix case included, other files left out."""
    folder = tmp_path / "exports"
    folder.mkdir()
    for name in ("a.onnx", "b.PLAN", "c.trt", "notes.txt"):
        (folder / name).write_bytes(b"x")
    with pytest.raises(MarsvisionError, match=r"\(in it: a\.onnx, b\.PLAN, c\.trt\)$"):
        open_runner(folder)
    for name in ("d.engine", "e.onnx"):
        (folder / name).write_bytes(b"x")
    four = r"\(in it: a\.onnx, b\.PLAN, c\.trt, d\.engine, \.\.\.\)$"
    with pytest.raises(MarsvisionError, match=four):
        load_model_meta(folder)
