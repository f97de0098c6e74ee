"""The one exception type for user errors (bad input, missing files, wrong options), the
check that a command's optional dependencies are installed, the exit code of an interrupted
command, a full disk as one line, and a command's result printed on stdout."""

from __future__ import annotations

import contextlib
import errno
import numbers
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from types import FrameType

import click

# The exit codes of a command stopped by Ctrl-C, SIGTERM or SIGHUP (128 + the signal, as the
# shell reports it): click would say "Aborted!" and exit 1, an option error's code, and the
# default handlers of SIGTERM and SIGHUP killed the process before its cleanups.
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # `timeout`, a job scheduler, a CI cancel
EXIT_HANGUP = 129  # the terminal (or ssh session) the command ran in closed
# the signals that stop a command with its cleanups run (SIGHUP: POSIX only)
_STOPS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
EXIT_BROKEN_PIPE = 141  # SIGPIPE: the reader of stdout left (`| head`), as cat or grep report it
# A write that failed for want of room: a full disk, a quota, the file size limit (ulimit -f).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def clipped(text: str, limit: int) -> str:
    """`text`'s first non-blank line, at most `limit` characters, cut at a word with " ..." (a
    library's message quoted in one of ours was cut mid-word: "the shape in current model is
    torch."; one that starts with a line break was quoted as nothing)."""
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0] + " ..."


class MarsvisionError(click.ClickException):
    """A user error: shown by the CLIs as one line on stderr, no traceback, exit code 1.

    The message says what failed, why, and what to do about it.
    """

    exit_code = 1


class OptionValueError(MarsvisionError):
    """A bad option value found after click parsed the command line (a range, a choice or a
    list checked by the command's config): one line, with click's usage-error exit code 2, as a
    value click checks itself gets; it was 1, a failure's code, in mars-train and mars-bench."""

    exit_code = 2


@contextlib.contextmanager
def option_values() -> Iterator[None]:
    """The MarsvisionErrors of the block, a command's checks of its option values, as
    OptionValueError (exit 2). Keep file and data checks out of it: those are exit 1."""
    try:
        yield
    except MarsvisionError as e:
        raise OptionValueError(e.message) from None


def check_percentage(flag: str, value: float) -> None:
    """A bar in percent: nan would pass everything (no comparison with it is true), > 100 fail
    everything, and 0.99 meant 99% (mars-bench score --require takes fractions)."""
    if not 0.0 <= value <= 100.0:
        raise MarsvisionError(f"{flag} {value:g}: must be a percentage in [0, 100]")
    if 0.0 < value <= 1.0:
        raise MarsvisionError(
            f"{flag} {value:g}: a percentage, not a fraction: {100 * value:g} for "
            f"{100 * value:g}% (0 for no bar)"
        )


def check_count(name: str, value: object, *, default: bool = False) -> None:
    """A count argument of the Python API is a whole number of at least 1 (or None where
    `default`): `batch_size=2.5` failed later with islice's words, `threads=-1` ran as the
    default and `threads=1.5` was a pybind TypeError."""
    if value is None and default:
        return
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1:
        return
    or_default = " (or None: the default)" if default else ""
    raise ValueError(f"{name} must be a whole number of at least 1{or_default}, got {value!r}")


def flags_given(*names: str) -> list[str]:
    """The options of `names` (parameter names) given on the command line, not left at their
    default or taken from the environment, as flags (`--num-images`): for refusing flags that
    would do nothing in the command as given."""
    given = click.get_current_context().get_parameter_source
    return [
        "--" + name.replace("_", "-")
        for name in names
        if given(name) == click.core.ParameterSource.COMMANDLINE
    ]


def require_extra(command: str, extra: str, *modules: str) -> None:
    """A MarsvisionError naming the pip extra to install when a module `command` needs is not
    installed: every install has all four commands, a runtime-only one ("marsvision[cpu]") has
    no torch, and without this check mars-train, mars-export and mars-bench's PyTorch commands
    ended in a traceback."""
    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        raise MarsvisionError(
            f"{command} needs {', '.join(missing)}, which this install lacks: "
            f'pip install "marsvision[cpu,{extra}]" ("marsvision[gpu,{extra}]" on a machine with a '
            "GPU)"
        )


class Stopped(SystemExit):
    """A command stopped by SIGTERM or SIGHUP: exits 128 + the signal, once its cleanups ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name


def stop_inside(e: BaseException) -> BaseException | None:
    """The Ctrl-C or SIGTERM (KeyboardInterrupt, Stopped) that library code reported as its own
    exception `e` (its cause or context): C code that meets a Python exception, one a signal's
    handler raised in it included, raises its own over it (torch's zip writer: RuntimeError;
    onnxruntime's import: ImportError "initialization failed")."""
    inner = e.__cause__ or e.__context__
    return inner if isinstance(inner, (KeyboardInterrupt, SystemExit)) else None


# the signals that came while `signals_held` held them (None: not holding)
_held: list[int] | None = None
# set by a stop (Ctrl-C, SIGTERM, SIGHUP) under `interruptible`, held or not: other threads'
# waits on the world outside (a FIFO's writer) give up, so that the command's cleanups end
stopping = threading.Event()
# stdout and stderr where they were a terminal when `interruptible` began (once it hangs up,
# isatty says no: it asks the terminal, which answers EIO)
_terminal_fds: tuple[int, ...] = ()


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _to_devnull(*fds: int) -> None:
    """Put /dev/null on these file descriptors (a reader that left, a terminal gone); where
    /dev/null cannot be opened (no descriptor left), they stay as they are."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.dup2(null, fd)
    finally:
        os.close(null)


def _stop(signum: int, frame: FrameType | None) -> None:
    stopping.set()
    # a second Ctrl-C or SIGTERM (pressed again, a scheduler's repeat) would cut the cleanups
    for sig in _STOPS:
        signal.signal(sig, signal.SIG_IGN)
    if signum == getattr(signal, "SIGHUP", None):  # a terminal gone: writing to it fails (EIO),
        # in the cleanups too; one still there (`kill -HUP`) keeps the command's last words
        _to_devnull(*(fd for fd in _terminal_fds if not _isatty(fd)))
    if _held is not None:
        _held.append(signum)
    elif signum == signal.SIGINT:
        raise KeyboardInterrupt
    else:
        raise Stopped(signum)


@contextlib.contextmanager
def interruptible(command: str, *, hint: str | Callable[[], str] = "") -> Iterator[None]:
    """Run the block so that Ctrl-C, SIGTERM and SIGHUP end it with its cleanups run (temporary
    files and folders of up to hundreds of MB are removed; a second signal waits for them), then
    say "`command`: interrupted" (or "stopped by SIGTERM") and `hint` (a callable: what it says
    once stopped), exit 130 (143, 129; after a SIGHUP, nothing more goes to a terminal that has
    closed). A reader of its stdout or stderr that left ends it quietly, exit 141. For the main
    thread (where signal handlers are set)."""
    global _terminal_fds
    _terminal_fds = tuple(fd for fd in (1, 2) if _isatty(fd))
    stopping.clear()
    # a signal the process was started with ignored (`cmd &` in a script) stays ignored
    previous = {sig: signal.signal(sig, _stop) for sig in _STOPS
                if signal.getsignal(sig) is not signal.SIG_IGN}  # fmt: skip

    def said(what: str) -> None:
        # on a terminal, after the progress line or the ^C it echoed; in a log, no blank line
        start = "\n" if 2 in _terminal_fds else ""
        with contextlib.suppress(OSError):  # stderr closed or full: the exit code still says it
            click.echo(f"{start}{command}: {what}{hint() if callable(hint) else hint}", err=True)

    try:
        yield
    except KeyboardInterrupt:
        said("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Stopped as e:
        said(f"stopped by {e.signal_name}")
        raise
    except BrokenPipeError:  # its output's reader left (`2>&1 | head`): click said nothing, exit 1
        sys.exit(outputs_gone())
    finally:
        for sig, handler in previous.items():  # None: a handler not set from Python
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        stopping.clear()  # the stop is over: a later FIFO read in this process (the API's) waits


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold the stop that Ctrl-C, SIGTERM or SIGHUP makes under `interruptible` until the block
    is done, for steps that must happen together (files renamed into place and the manifest
    that lists them); the command then stops as it would have. (Not by blocking the signals: any
    thread of the process, torch's or onnxruntime's, may receive them.) Outside `interruptible`
    (the Python API) and in another thread than the main one, it holds nothing."""
    global _held
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers run in the main thread: another's hold would defer its stop
        return
    outer, _held = _held, _held if _held is not None else []
    try:
        yield
    finally:
        came, _held = _held, outer
        if came and outer is None:
            _stop(came[0], None)


def stdout_gone() -> int:
    """After stdout's reader left (`| head`): stdout on /dev/null, so that the flush at exit
    raises nothing more; returns the exit code to end with, EXIT_BROKEN_PIPE."""
    _to_devnull(sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def outputs_gone() -> int:
    """After the reader of stdout or stderr left (`2>&1 | head`): both on /dev/null, nothing
    more to say and nowhere to say it; returns EXIT_BROKEN_PIPE."""
    _to_devnull(1, 2)
    return EXIT_BROKEN_PIPE


def echo_note(text: str) -> None:
    """Say a note on stderr before a command's work (outside `interruptible`): a reader of
    stderr that left ends it quietly with EXIT_BROKEN_PIPE, where click's handling exited 1."""
    try:
        click.echo(text, err=True)
    except BrokenPipeError:
        sys.exit(outputs_gone())


def echo_result(text: str) -> None:
    """Print a command's result on stdout. A reader that left (`| head`, `| true`) ends the
    command quietly with EXIT_BROKEN_PIPE, as cat does, and a full disk or another write error
    is one line: both were a traceback or a silent exit 1, after the work was done."""
    try:
        click.echo(text)
        sys.stdout.flush()
    except BrokenPipeError:
        sys.exit(stdout_gone())
    except OSError as e:
        raise MarsvisionError(f"cannot write to stdout ({e.strerror})") from None


@contextlib.contextmanager
def out_of_room(where: str | os.PathLike[str]) -> Iterator[None]:
    """A write in the block that fails for want of room (DISK_FULL) is a one-line user error
    naming `where` (the --out it writes under), not a traceback; the writes are atomic, so
    nothing half-written is left."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise MarsvisionError(
            f"cannot write to {where} ({e.strerror}): make room, or pass another --out"
        ) from None
