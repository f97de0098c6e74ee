"""mars-infer: classify image files with an exported model, one result row per input."""

# ruff: noqa: E402 (the environment is set before numpy is imported)
from __future__ import annotations

import os

# numpy starts OpenBLAS's thread pool when it is imported, a thread per core it sees beside
# --threads and --workers (and on a box with a CPU quota, per core of the whole machine); the
# command does no BLAS, so one thread, unless the user chose (an embedding program decides)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import contextlib
import platform
import stat
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import IO, Any

import click

from marsvision.runtime.backends import BACKENDS, DEVICES
from marsvision.runtime.backends.onnxruntime import no_telemetry
from marsvision.runtime.classifier import DEFAULT_BATCH_SIZE, TTA_MODES, Classifier
from marsvision.runtime.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_HANGUP,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    MarsvisionError,
    echo_note,
    interruptible,
)
from marsvision.runtime.metadata import code_versions
from marsvision.runtime.results import FORMATS

EXIT_OK = 0
EXIT_MODEL = 1  # model or option error (one line on stderr)
EXIT_USAGE = 2  # bad command line (click)
EXIT_SOME_FAILED = 3  # every input has a row, but some rows have status "error"

_HELP = f"""Classify images with an exported model (ONNX file or TensorRT engine).

PATH is an image file, a folder (its image files; --recursive for subfolders), a quoted glob
pattern ('data/*.JPG'), or @LIST: a text file with one path per line. Every input gets exactly
one row (status ok or error) in input order, flushed batch by batch; results go to --out or
stdout, progress and a summary to stderr.

\b
Exit codes:
  {EXIT_OK}  every input was classified
  {EXIT_MODEL}  model or option error (missing/corrupt model, --out exists without --resume)
  {EXIT_USAGE}  usage error (unknown option, bad value)
  {EXIT_SOME_FAILED}  some inputs could not be read or classified (their rows have status error)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); the rows written so far stay, --resume continues
  {EXIT_TERMINATED}, {EXIT_HANGUP}  stopped by SIGTERM, SIGHUP (the terminal closed): the same
  {EXIT_BROKEN_PIPE}  stdout closed by its reader (e.g. `| head`): stopped quietly
"""


@dataclass(frozen=True, kw_only=True)
class InferConfig:
    """The resolved options of one mars-infer run."""

    paths: tuple[str, ...]
    engine: str
    out: str | None
    fmt: str
    batch_size: int
    backend: str
    device: str
    workers: int | None
    threads: int | None
    recursive: bool
    resume: bool
    top_k: int | None
    fast_decode: bool
    tta: str


class _Progress:
    """Progress on stderr. On a terminal, one line redrawn in place, at most ten times a second;
    none when the rows go to that terminal too (the line ran into the next row, and the rows show
    the progress there). In a log (stderr a file or pipe), a line every `every` seconds: a long
    run was silent until its summary."""

    def __init__(self, total: int, *, rows_on_terminal: bool, every: float = 30.0) -> None:
        self.total = total
        self.every = every
        self.start = time.perf_counter()
        self._last = self.start
        self._drawn = False  # a line on the terminal, which close() ends
        self._done = 0
        err = sys.stderr  # None: started with it closed
        self.tty = err is not None and err.isatty()
        self.silent = err is None or (self.tty and rows_on_terminal)

    def _line(self, done: int, now: float) -> str:
        rate = done / max(now - self.start, 1e-9)
        return f"{done}/{self.total} images  {rate:.1f} images/s"

    def update(self, done: int) -> None:
        self._done = done
        now = time.perf_counter()
        if self.silent or now - self._last < (0.1 if self.tty else self.every):
            return
        self._last = now
        if self.tty:
            self._drawn = True
            self._write(f"\r{self._line(done, now)} ")
        else:
            self._write(f"mars-infer: {self._line(done, now)}\n")

    def _write(self, text: str) -> None:
        """Progress is optional: a stderr that fails (a log on a full device, a reader that
        left) silences it; it ended the run, blamed on the results file (or exit 141), where
        the summary line is written under the same guard."""
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except OSError:
            self.silent, self._drawn = True, False

    def close(self) -> None:
        """End the terminal's line, at the final count (a redraw may have been skipped)."""
        if self._drawn:
            self._write(f"\r{self._line(self._done, time.perf_counter())} \n")


def _standard_fds() -> None:
    """Open a closed stdin, stdout or stderr (`2>&-`) on /dev/null: the next file opened took
    its number, and the results file became fd 2, where native code (onnxruntime's log)
    writes. Python's own stream stays None (`_Progress`, `open_output`)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest number free: `fd`


_STDOUT_NAMES = ("-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1")


def _is_stream(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _still_named(stream: IO[Any], path: str) -> bool:
    """`path` still names the open file `stream` writes (not deleted, moved or replaced, e.g.
    by a log rotation or a cleanup while the run went on)."""
    try:
        here, named = os.fstat(stream.fileno()), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (named.st_dev, named.st_ino)


def _record(cfg: InferConfig, clf: Classifier, inputs: int) -> dict[str, Any]:
    """The resolved options a results file's run record keeps (`write_record`), and the
    versions that made its rows (for provenance; --resume checks only `library`'s)."""
    options = {k: v for k, v in asdict(cfg).items() if k not in ("paths", "resume")}
    options.update(engine=os.path.abspath(cfg.engine), model_sha256=clf.model_sha256,
                   backend=clf.runner.name, library=clf.runner.library, int8_sums=clf.int8_sums,
                   inputs=inputs, versions={**code_versions(),
                                            "python": platform.python_version()})  # fmt: skip
    return options


def run(cfg: InferConfig) -> int:
    """Classify every input of `cfg` and write its row; returns the exit code."""
    from marsvision.runtime.inputs import expand_inputs, is_list_arg, path_keys
    from marsvision.runtime.results import Provenance, ResultWriter, csv_header
    from marsvision.runtime.resume import (
        lock_output,
        open_output,
        out_exists,
        read_resumed,
        write_record,
    )

    t0 = time.perf_counter()
    notes: list[str] = []
    inputs = expand_inputs(list(cfg.paths), recursive=cfg.recursive, notes=notes)
    for note in notes:
        with contextlib.suppress(OSError):
            click.echo(f"mars-infer: {note}", err=True)
    # a device or pipe (/dev/null, a FIFO a script reads) is written to as it is: never read back
    # (--resume read /dev/zero until memory ran out), locked or refused for existing
    if cfg.out is not None and os.path.isdir(cfg.out):
        raise MarsvisionError(
            f"--out {cfg.out} is a folder: give a file name, e.g. "
            f"{os.path.join(cfg.out, 'results.' + cfg.fmt)}"
        )
    passing = cfg.out is not None and _is_stream(cfg.out)
    if passing and cfg.resume:
        raise MarsvisionError(
            f"{cfg.out} is a device or pipe: --resume reads the rows of a results file back; "
            "leave --resume out"
        )
    if cfg.out is not None and os.path.exists(cfg.out) and not cfg.resume and not passing:
        raise out_exists(cfg.out)
    with Classifier(
        cfg.engine,
        backend=cfg.backend,
        device=cfg.device,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        threads=cfg.threads,
        fast_decode=cfg.fast_decode,
        tta=cfg.tta,
    ) as clf:
        meta = clf.meta
        provenance = Provenance(clf.model_sha256, meta.precision, clf.runner.name, cfg.tta)
        done: dict[str, str] = {}
        existed = cfg.out is not None and os.path.exists(cfg.out)
        stream = open_output(cfg.out, append=cfg.resume or passing)
        made = False  # --out made by this run, and locked
        try:  # from here until it is closed, this run alone writes --out (lock_output)
            if cfg.out is not None and not passing:
                lock_output(stream, cfg.out)
                made = not existed and not os.path.islink(cfg.out)  # a link's target stays
            record = _record(cfg, clf, len(inputs))  # what a file this run continues must match
            if cfg.resume and existed and cfg.out is not None:
                header = csv_header(
                    meta.class_names, min(cfg.top_k, meta.num_classes) if cfg.top_k else None
                )

                def deeper() -> list[str]:  # the inputs --recursive would add to this run's
                    # (not from @lists, which --recursive does not change: `@<(find ...)` read
                    # again would be empty)
                    these, args = set(inputs), [a for a in cfg.paths if not is_list_arg(a)]
                    return [p for p in expand_inputs(args, recursive=True)
                            if p not in these]  # fmt: skip

                done = read_resumed(cfg.out, fmt=cfg.fmt, header=header, provenance=provenance,
                                    run=record, inputs=inputs, deeper=deeper)  # fmt: skip
            # after read_done, which cuts a last row left unfinished (a cut header leaves nothing)
            is_new = cfg.out is None or os.fstat(stream.fileno()).st_size == 0
            if cfg.out is not None and not done and stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                write_record(cfg.out, record)
        except BaseException:
            if made and cfg.out is not None:  # stopped before its first row: no empty file
                with contextlib.suppress(OSError):
                    os.unlink(cfg.out)  # a rerun would refuse it
            if cfg.out is not None:
                stream.close()
            raise
        todo, prev_failed = inputs, 0
        if done:  # each input's row already in --out, matched by path_keys
            status = [done.get(key) for key in path_keys(inputs)]
            todo = [p for p, s in zip(inputs, status) if s is None]
            prev_failed = status.count("error")
            del done, status  # ~100 MB at 500,000 rows, held for the hours of the run
        ok = failed = 0
        progress = _Progress(len(todo), rows_on_terminal=stream.isatty())
        write_error: OSError | None = None
        gone = False  # --out no longer names the file written
        try:
            writer = ResultWriter(
                stream,
                fmt=cfg.fmt,
                class_names=meta.class_names,
                top_k=cfg.top_k,
                provenance=provenance,
                write_header=is_new,
            )
            t_run = time.perf_counter()
            for batch in clf.predict_batches(todo):
                writer.write(batch)
                ok += sum(p.ok for p in batch)
                failed += sum(not p.ok for p in batch)
                progress.update(ok + failed)
        except BrokenPipeError:
            raise
        except OSError as e:  # the results cannot be written: disk full, quota, file size limit
            write_error = e
        finally:
            progress.close()
            gone = cfg.out is not None and not passing and not _still_named(stream, cfg.out)
            try:
                if cfg.out is not None:
                    stream.close()  # flushes: fails again after a failed write
                else:
                    stream.flush()
                    stream.detach()  # leave sys.stdout usable
            except BrokenPipeError:
                raise
            except OSError as e:
                write_error = write_error or e
        if write_error is not None:
            where = cfg.out or "stdout"
            # a device or pipe is never read back: --resume is refused there
            hint = "; make room and rerun with --resume" if cfg.out and not passing else ""
            raise MarsvisionError(
                f"cannot write the results to {where} ({write_error.strerror or write_error}){hint}"
            )
        if gone:  # the rows went into a file no name leads to: exit 0 said all was written
            raise MarsvisionError(
                f"{cfg.out} was deleted, moved or replaced while mars-infer wrote it: this run's "
                f"{ok + failed} rows are not in it; run again"
            )
        secs = time.perf_counter() - t_run
    skipped = len(inputs) - len(todo)
    kept = ""
    if skipped:
        again = f"; {prev_failed} of them with status error: a new --out tries them again"
        kept = f", {skipped} already in {cfg.out} (skipped{again if prev_failed else ''})"
    # INT8 in ONNX Runtime's exact (slower) kernels, on a CPU whose fast ones would saturate
    exact = clf.int8_sums == "exact"
    summary = (
        f"mars-infer: {ok} ok, {failed} failed"
        + kept
        + (
            f"; {ok} image{'s' * (ok != 1)} in {secs:.2f} s = {ok / max(secs, 1e-9):.1f} images/s"
            if ok
            else f"; no image classified in {secs:.2f} s"
        )
        # the INT8 file's flavour: int8-cpu and int8-trt were both "int8"
        + f" ({clf.runner.name}, {(meta.quantization or {}).get('flavour') or meta.precision}"
        + (", exact sums" if exact else "")
        + f", batch {cfg.batch_size}"
        + (f", tta {cfg.tta}" if cfg.tta != "none" else "")
        + (", fast decode" if cfg.fast_decode else "")
        + ";"
        + f" {time.perf_counter() - t0:.2f} s in all)"
    )
    with contextlib.suppress(OSError):  # stderr on a full device: the rows are all written
        click.echo(summary, err=True)
    return EXIT_SOME_FAILED if failed or prev_failed else EXIT_OK


@click.command(help=_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option(
    "--engine",
    "-m",
    "engine",
    default=None,
    metavar="MODEL",
    help="ONNX file (.onnx) or TensorRT engine (.plan, with its .plan.json sidecar) "
    "[default: the export of the shipped binary model in ./exports (or $MARS_EXPORTS) that "
    "suits this machine, --device and --backend: TensorRT engine, else FP16 ONNX on a GPU, else "
    "INT8 ONNX, else FP32 ONNX].",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(),
    default=None,
    help="Result file (default, or -: stdout). Refused if it exists, unless --resume (a device "
    "or pipe, such as /dev/null, is written to as it is).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Result format [default: jsonl (one JSON object a line) for a .jsonl or .json --out, "
    "else csv].",
)
@click.option(
    "--batch-size",
    "-b",
    type=click.IntRange(1, 4096),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="auto: TensorRT for .plan, onnxruntime for .onnx; tensorrt with an .onnx "
    "file uses onnxruntime's TensorRT execution provider.",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="auto: CUDA when onnxruntime-gpu and a GPU are there, else CPU.",
)
@click.option(
    "--workers",
    "-j",
    type=click.IntRange(1, 64),
    default=None,
    help="Image decoding threads [default: cores, at most 4].",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=None,
    help="onnxruntime intra-op threads [default: cores].",
)
@click.option("--recursive", "-r", is_flag=True, help="Descend into subfolders (and ** in globs).")
@click.option(
    "--resume",
    is_flag=True,
    help="Append to --out, skipping inputs it already has a row for (a row cut by "
    "a kill is dropped first); never writes a duplicate row. Run it with the options, and "
    "relative inputs from the folder, of the run that began --out (its .run.json record).",
)
@click.option(
    "--top-k",
    type=click.IntRange(1, None),
    default=None,
    help="Write the k most probable classes instead of every class's probability.",
)
@click.option(
    "--fast-decode",
    is_flag=True,
    help="Let Pillow decode large JPEGs at reduced scale before resizing: faster, "
    "approximate (pixels differ from the training preprocessing).",
)
@click.option(
    "--tta",
    type=click.Choice(TTA_MODES),
    default="none",
    show_default=True,
    help="Test-time augmentation. flip: also classify each image's left-right mirror and "
    "average the probabilities (twice the inference work).",
)
def main(
    paths: tuple[str, ...],
    engine: str | None,
    out: str | None,
    fmt: str | None,
    batch_size: int,
    backend: str,
    device: str,
    workers: int | None,
    threads: int | None,
    recursive: bool,
    resume: bool,
    top_k: int | None,
    fast_decode: bool,
    tta: str,
) -> None:
    no_telemetry()
    _standard_fds()
    try:
        os.getcwd()
    except FileNotFoundError:  # relative paths and the run record start from it: tracebacks
        raise MarsvisionError(
            "the working folder was deleted under this shell: cd to a folder that exists"
        ) from None
    # stdout under any of its names: `--out /dev/stdout` with stdout redirected to a file (`>
    # f.csv`) was refused as an existing file, and with --resume wrote /dev/stdout.run.json
    if out in _STDOUT_NAMES:
        out = None
    # Pillow warns on stderr of an image between 1x and 2x its pixel limit, which the runtime's
    # own limit (the same) refuses with an error row anyway (over 2x, Pillow raises)
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    if resume and out is None:
        raise click.UsageError("--resume needs --out (the file to continue, not stdout)")
    if engine is None:
        from marsvision.runtime.models import default_model

        # a MarsvisionError: one line, exit 1 (EXIT_MODEL)
        chosen = default_model(device=device, backend=backend)
        if chosen.note:
            echo_note(f"mars-infer: {chosen.note}")
        engine, device = str(chosen.path), chosen.device
        echo_note(f"mars-infer: model {engine} (the default; --engine to choose)")
    if fmt is None:
        fmt = "jsonl" if out is not None and out.lower().endswith((".jsonl", ".json")) else "csv"
    cfg = InferConfig(paths=paths, engine=engine, out=out, fmt=fmt, batch_size=batch_size,
                      backend=backend, device=device, workers=workers, threads=threads,
                      recursive=recursive, resume=resume, top_k=top_k, fast_decode=fast_decode,
                      tta=tta)  # fmt: skip

    def kept() -> str:  # said once stopped: a run stopped before its first row leaves no file
        return f"; the rows written so far are in {out}: --resume continues" if (
            out is not None and os.path.isfile(out)) else ""  # fmt: skip

    # Ctrl-C, SIGTERM, SIGHUP: the run's cleanups (an empty --out, a record's .tmp) first; a
    # reader that left (`mars-infer ... | head`): quietly, exit 141 (1 said model error)
    with interruptible("mars-infer", hint=kept):
        code = run(cfg)
    sys.exit(code)


if __name__ == "__main__":
    main()
