"""Classify image files with an exported model: decode in a thread pool, infer in batches.

A producer thread fills preallocated batch buffers with decoded, normalized images (worker
threads: Pillow releases the GIL while decoding and resizing) while the caller's thread runs
inference on the previous batch. Results come back batch by batch, in input order; every
input gets exactly one `Prediction`, with status "error" and a message when its file cannot
be used (a machine's limit met while opening it, out of file descriptors say, raises instead:
`decode_image`).

    from marsvision.runtime.classifier import Classifier
    with Classifier("resnet50-binary.int8-cpu.onnx") as clf:  # tta="flip": image + mirror
        for p in clf.predict(["a.jpg", "b.png"]):
            print(p.path, p.label, p.probs)
"""

from __future__ import annotations

import io
import itertools
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from marsvision.runtime.backends import open_runner
from marsvision.runtime.errors import MarsvisionError, check_count
from marsvision.runtime.files import file_identity
from marsvision.runtime.host import usable_cores
from marsvision.runtime.metadata import sha256_file
from marsvision.runtime.preprocess import (
    ImageError,
    decode_image,
    normalize_into,
    raster_formats,
)

DEFAULT_BATCH_SIZE = 8
# test-time augmentation: "flip" also classifies the left-right mirror of every image and
# averages the two softmax outputs (twice the inference work; decoding is shared)
TTA_MODES = ("none", "flip")
_Ready = tuple[list[str], np.ndarray, list[str | None]]  # a decoded batch
_BUFFERS = 3  # batches in flight: one inferring, up to two being decoded
READ_AHEAD = 2  # batches of the caller's paths read before the next batch is yielded
NOT_FINITE = "the model's output for this image is not finite (NaN or inf); check the model"


def _thread_limit(e: BaseException) -> MarsvisionError | None:
    """The one-line error for Python's "can't start new thread" (a RuntimeError: a traceback
    from the decoding threads, and an --out of its header alone), None for other errors."""
    if not (isinstance(e, RuntimeError) and str(e).startswith("can't start new thread")):
        return None
    return MarsvisionError(
        "cannot start a decoding thread (can't start new thread): a limit of this process or "
        "machine (its memory, ulimit -v: each thread reserves its stack; its processes, ulimit "
        "-u or a container's pids limit), not a fault of the images; use fewer threads "
        "(mars-infer -j 1 --threads 1; the API: workers=1, threads=1) or raise the limit"
    )


def default_workers() -> int:
    """Decode threads: one per core, at most 4 (measured on 2 cores: 2 threads are as fast
    as 1 or slightly faster end to end; MSL JPEGs decode and resize in about 1 ms)."""
    return max(1, min(4, usable_cores()))


@dataclass(frozen=True)
class Prediction:
    """The result for one input file."""

    path: str
    status: str  # "ok" or "error"
    label: str | None = None  # class name by the model's rule (top-1, or a binary threshold)
    probs: tuple[float, ...] | None = None  # softmax probability of each class, in class order
    error: str = ""

    @property
    def ok(self) -> bool:
        """Whether the image was classified (else `error` says why not)."""
        return self.status == "ok"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable). A row with a NaN or inf logit comes out NaN (a -inf
    alone would give a clean 0), without numpy's warnings: the caller tells such rows apart
    (`np.isfinite`)."""
    with np.errstate(invalid="ignore", over="ignore"):
        z = logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    out[non_finite_rows(logits)] = np.nan
    return out


def non_finite_rows(logits: np.ndarray) -> np.ndarray:
    """Which rows hold a NaN or inf (a broken export, an FP16 overflow): argmax gives such a row
    class 0, a wrong label that looks like any other, so it gets no label."""
    return ~np.isfinite(logits).all(axis=1)


def _batch_buffer(batch_size: int, size: int) -> np.ndarray:
    """A batch's decoded images, float32 NCHW; one that does not fit in memory is a one-line
    error (a MemoryError traceback under `ulimit -v` with `--batch-size 4096`)."""
    try:
        return np.empty((batch_size, 3, size, size), np.float32)
    except MemoryError:
        mib = batch_size * 3 * size * size * 4 / 2**20
        raise MarsvisionError(
            f"no memory for a batch of {batch_size} images ({mib:.0f} MiB): use a smaller batch "
            "size"
        ) from None


def _digest(sha256: object) -> str | None:
    """`Classifier`'s `sha256`, checked: 64 hex digits (any case, spaces around), or None."""
    if sha256 is None:
        return None
    if not isinstance(sha256, str):
        raise TypeError(f"sha256 is a str of 64 hex digits, not {type(sha256).__name__}")
    digest = sha256.strip().lower()
    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"sha256 is 64 hex digits, not {sha256!r:.80}")
    return digest


def _hashed(path: str | os.PathLike[str]) -> str:
    """The model file's sha256, a file that cannot be read a one-line error."""
    try:
        return sha256_file(path)
    except OSError as e:
        raise MarsvisionError(f"cannot read {path} ({e.strerror})") from None


class Classifier:
    """An exported model (ONNX file or TensorRT engine) and its preprocessing, ready to classify."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        backend: str = "auto",
        device: str = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
        workers: int | None = None,
        threads: int | None = None,
        fast_decode: bool = False,
        tta: str = "none",
        sha256: str | None = None,
    ) -> None:
        """`sha256`: the digest the model file must have (the one its export's manifest.json
        or a SHA256SUMS gives): any other bytes are refused before the file is loaded. A file
        with bits flipped in its weights (a copy, its storage) loads and runs, with other
        probabilities. It covers the model file alone (not a TensorRT engine's sidecar)."""
        check_count("batch_size", batch_size)
        check_count("workers", workers, default=True)  # threads: open_runner's
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        want = _digest(sha256)
        self.model_path = Path(model_path)
        before = file_identity(model_path)
        got = _hashed(model_path) if want is not None else ""
        if want is not None and got != want:  # refused before a byte of it is loaded
            raise MarsvisionError(
                f"{model_path} is not the file expected: sha256 {got[:12]}..., expected "
                f"{want[:12]}... (damaged in a copy or where it is stored, or another file)"
            )
        self.runner = open_runner(model_path, backend, device, threads=threads)
        try:
            # hashed at once, not when first asked: a file replaced later (a new export over
            # the old, a chdir before a relative path was read) gave its sha256 to rows made
            # by the weights loaded here
            self._sha256 = got or _hashed(model_path)
            if file_identity(model_path) != before:
                raise MarsvisionError(
                    f"{model_path} changed while it was being opened (a new export written over "
                    "it?): open it again"
                )
        except BaseException:
            self.runner.__exit__(None, None, None)
            raise
        self.meta = self.runner.meta
        self.batch_size = batch_size
        self.workers = workers if workers is not None else default_workers()
        self.fast_decode = fast_decode
        self.tta = tta
        self._closed = False
        self._halts: set[Callable[[], None]] = set()  # of the open predict_batches generators

    @property
    def int8_sums(self) -> str | None:
        """How an INT8 model's sums run on ONNX Runtime's CPU kernels: "exact" (u8 x u8, on a
        CPU whose fast ones would saturate, or $MARSVISION_EXACT_INT8=1) or "fast"; None for
        another precision or backend. On such a CPU the two give other probabilities."""
        if self.meta.precision != "int8" or not hasattr(self.runner, "exact_int8"):
            return None
        return "exact" if self.runner.exact_int8 else "fast"

    @property
    def model_sha256(self) -> str:
        """sha256 of the model file as it was opened (provenance for every result row)."""
        return self._sha256

    def __enter__(self) -> Classifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the model; the classifier cannot be used after. The decoding threads of
        predict_batches generators still open end here (they waited for the generator's next
        step or its collection: a notebook's Out[] kept them)."""
        self._closed = True
        try:
            for halt in list(self._halts):
                halt()
        finally:  # released even if a wait for a thread is interrupted
            self.runner.__exit__(None, None, None)

    def predict(self, paths: Iterable[str | os.PathLike[str]]) -> list[Prediction]:
        """One Prediction per path, in input order."""
        return [p for batch in self.predict_batches(paths) for p in batch]

    def predict_encoded(self, frames: Iterable[tuple[str, bytes]]) -> list[Prediction]:
        """One Prediction per (name, encoded image) held in memory, as a file of those bytes
        would get (a JPEG or PNG from a downlink or a socket, never written to disk; the same
        checks, an error row for bytes that are not an image), in input order; `name` is the
        row's `path`. Decoded in the calling thread, a batch at a time."""
        if isinstance(frames, tuple) and len(frames) == 2 and isinstance(frames[0], str):
            raise TypeError("frames is one (name, bytes) pair: pass a list of them")
        self._check_open()
        size = self.meta.preprocess.input_size
        rows: list[Prediction] = []
        it = iter(frames)
        while batch := list(itertools.islice(it, self.batch_size)):
            for frame in batch:
                if not (
                    isinstance(frame, tuple)
                    and len(frame) == 2
                    and isinstance(frame[0], str)
                    and isinstance(frame[1], (bytes, bytearray))
                ):
                    raise TypeError(
                        f"a frame is a (name: str, data: bytes) pair, not {frame!r:.60}"
                    )
            buf = _batch_buffer(len(batch), size)
            errors = [self._fill(io.BytesIO(data), buf[i]) for i, (_, data) in enumerate(batch)]
            rows += self._infer([name for name, _ in batch], buf, errors)
        return rows

    def predict_batches(
        self, paths: Iterable[str | os.PathLike[str]], *, read_ahead: int = READ_AHEAD
    ) -> Generator[list[Prediction], None, None]:
        """Predictions batch by batch, in input order, as soon as each batch is inferred. `paths`
        is read in the caller's thread, `read_ahead` batches at a time: with 2, the next batch
        decodes while this one is inferred, and a generator of paths that arrive over time
        gets each batch's rows once the next batch's paths are in (not at its end: it was read
        to its end first, and an endless one never gave a row). With 1, a batch's rows come
        before the next paths are read: for a live stream (batch_size 1 too, as a batch waits
        for its paths), where a frame's rows waited for the next frame. An exception from
        `paths` is raised after the rows of the paths before it."""
        if isinstance(paths, (str, bytes, os.PathLike)):  # a str would be classified by letter
            raise TypeError(f"paths is one path ({paths!r}): pass a list of paths")
        if type(read_ahead) is not int or read_ahead not in (1, 2):  # not True, not 1.0
            raise ValueError(f"read_ahead is 1 or 2 (batches), not {read_ahead!r}")
        self._check_open()  # here, not at the first next()
        chunks = self._chunks(iter(paths))
        if isinstance(paths, (list, tuple)) and len(paths) == 1:
            return self._one(chunks)
        return self._pipeline(chunks, read_ahead)

    def _one(
        self, chunks: Iterator[tuple[list[str], list[str | bytes]]]
    ) -> Generator[list[Prediction], None, None]:
        """A batch of one image, decoded in the caller's thread: an onboard loop's
        `predict([frame])` started a decoding thread and a pool for each frame, and waited on
        their hand-offs (8.5 ms a frame against 7.3, INT8 at batch 1 on 2 cores)."""
        for names, items in chunks:
            buf = _batch_buffer(1, self.meta.preprocess.input_size)
            yield self._infer(names, buf, [self._fill(items[0], buf[0])])

    def _chunks(
        self, paths: Iterator[str | os.PathLike[str]]
    ) -> Iterator[tuple[list[str], list[str | bytes]]]:
        """`paths` a batch at a time, as (names, paths as given). What `paths` raises (a
        failing source, an element that is not a path) comes after the paths before it, the
        batch's own too: they were read and given no row."""
        while True:
            items: list[str | bytes] = []
            try:
                for p in itertools.islice(paths, self.batch_size):
                    items.append(os.fspath(p))
            except Exception:
                if items:
                    yield [os.fsdecode(p) for p in items], items
                raise
            if not items:
                return
            yield [os.fsdecode(p) for p in items], items

    def _check_open(self) -> None:
        """As a closed file says, rather than an AttributeError of its released runner."""
        if self._closed:
            raise ValueError(f"the classifier of {self.model_path} is closed")

    def _fill(self, path: str | bytes | io.BytesIO, buf: np.ndarray) -> str | None:
        """Decode one file (or encoded bytes) into `buf` (3, H, W); the error message, or None
        when it worked."""
        spec = self.meta.preprocess
        try:
            normalize_into(decode_image(path, spec, fast_decode=self.fast_decode), spec, buf)
        except ImageError as e:
            return str(e)
        except MarsvisionError:  # the run's fault, not the image's (decode_image): it stops
            raise
        except Exception as e:  # an odd decoder failure must not cost the other rows
            return f"cannot read image ({type(e).__name__}: {e})"
        return None

    def _pipeline(
        self, chunks: Iterator[tuple[list[str], list[str | bytes]]], read_ahead: int
    ) -> Generator[list[Prediction], None, None]:
        size = self.meta.preprocess.input_size
        free: queue.Queue[np.ndarray] = queue.Queue()
        todo: queue.Queue[tuple[list[str], list[str | bytes]] | None] = queue.Queue()
        ready: queue.Queue[_Ready | BaseException | None] = queue.Queue()
        stop = threading.Event()
        # the pipeline's own threads: the generator collected by gc in one of them ran halt()
        # there, which waited for the producer, which waited for that thread (a hang, and at exit)
        own: set[threading.Thread] = set()

        def mine() -> None:
            own.add(threading.current_thread())

        def fill(item: str | bytes, buf: np.ndarray) -> str | None:
            # a stopped pipeline's rows are never given: leaving the loop or close() waited
            # for the whole batch to decode (seconds for large images)
            return "not decoded: the generator ended" if stop.is_set() else self._fill(item, buf)

        def produce() -> None:  # waits on queues only: a close never waits for the caller's paths
            mine()
            made = 0  # buffers, made as needed: a short input needs no more than its batches
            try:
                with ThreadPoolExecutor(
                    self.workers, thread_name_prefix="decode", initializer=mine
                ) as pool:
                    while (chunk := todo.get()) is not None:
                        names, items = chunk
                        if made < _BUFFERS and free.empty():
                            made += 1
                            buf = _batch_buffer(self.batch_size, size)
                        else:
                            buf = free.get()
                        if stop.is_set():
                            return
                        errors = list(pool.map(fill, items, buf))
                        ready.put((names, buf, errors))
            except BaseException as e:  # handed to the consumer, which re-raises it
                ready.put(_thread_limit(e) or e)
            finally:
                ready.put(None)

        def halt() -> None:  # the generator's end, or close()
            stop.set()
            todo.put(None)  # wake the producer if it waits for a batch,
            free.put(np.empty(0, dtype=np.float32))  # or for a buffer
            if threading.current_thread() not in own:  # it ends once this thread's image is done
                producer.join()

        producer = threading.Thread(target=produce, name="mars-decode", daemon=True)
        try:
            producer.start()
        except RuntimeError as e:
            raise _thread_limit(e) or e from None
        self._halts.add(halt)
        parent = os.getpid()
        queued, more = 0, True  # batches handed to the producer and not yet yielded
        failed: Exception | None = None  # the caller's paths raised: after the batches before
        try:
            while True:
                # the caller's paths are read here, in its thread (a generator of them may hold
                # a thread-bound resource, a sqlite cursor say), `read_ahead` batches at a time
                while more and queued < read_ahead:
                    try:
                        chunk = next(chunks, None)
                    except Exception as e:  # noqa: BLE001 - raised once the batches before are out
                        chunk, failed = None, e
                    more = chunk is not None
                    if chunk is not None:
                        todo.put(chunk)
                        queued += 1
                if not queued:
                    if failed is not None:
                        raise failed
                    break
                if os.getpid() != parent:  # the decoding thread is not copied: ready.get() hung
                    raise RuntimeError(
                        "a predict_batches generator cannot go on in a forked child (its decoding "
                        "thread stayed in the parent): call predict_batches again there"
                    )
                item = ready.get()
                if item is None:  # after an exception item, raised below, or a close()
                    self._check_open()
                    raise RuntimeError("the decoding thread ended with batches left")
                if isinstance(item, BaseException):
                    raise item
                queued -= 1
                names, buf, errors = item
                yield self._infer(names, buf, errors)
                free.put(buf)
        finally:
            self._halts.discard(halt)
            halt()

    def warmup(self) -> None:
        """Make the first image as quick as the ones after it (an onboard loop's first frame):
        load Pillow's image plugins, which its first decode does (about 25 ms), and infer one
        image of zeros (the backend's first run sets up its memory). The first image took
        about four times the steady latency (39 ms against 8, INT8 on 2 cores)."""
        raster_formats()
        size = self.meta.preprocess.input_size
        self.probabilities(np.zeros((1, 3, size, size), np.float32))

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities (float64) of a preprocessed NCHW batch, with `self.tta` (NaN
        rows for logits that are not finite: `softmax`)."""
        self._check_open()
        probs = softmax(self.runner.infer(x))
        if self.tta == "flip":
            mirror = np.ascontiguousarray(x[..., ::-1])
            probs = 0.5 * (probs + softmax(self.runner.infer(mirror)))
        return probs

    def _infer(
        self, names: list[str], buf: np.ndarray, errors: list[str | None]
    ) -> list[Prediction]:
        self._check_open()  # closed while a predict_batches generator was still open
        ok = [i for i, e in enumerate(errors) if e is None]
        probs = np.empty((0, self.meta.num_classes))
        if ok:
            x = buf[: len(names)] if len(ok) == len(names) else buf[ok]
            probs = self.probabilities(x)
        # NaN or infinite logits (a broken export, an FP16 overflow) would otherwise give class 0
        # by argmax, a wrong label that looks like any other
        rows: dict[int, tuple[np.ndarray, int]] = {}
        for i, p, label, bad in zip(ok, probs, self.meta.decide(probs), non_finite_rows(probs)):
            if bad:
                errors[i] = NOT_FINITE
            else:
                rows[i] = (p, label)
        classes = self.meta.class_names
        out = []
        for i, name in enumerate(names):
            if i in rows:
                p, label = rows[i]
                out.append(
                    Prediction(
                        path=name,
                        status="ok",
                        label=classes[int(label)],
                        probs=tuple(float(v) for v in p),
                    )
                )
            else:
                out.append(Prediction(path=name, status="error", error=str(errors[i])))
        return out
