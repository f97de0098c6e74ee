"""The one exception type for user errors (bad input, missing files, wrong options), the
check that a command's optional dependencies are installed, and the exit code of an
interrupted command."""

from __future__ import annotations

from importlib.util import find_spec

import click

# The exit code of a command stopped by Ctrl-C (128 + SIGINT, as the shell reports it): click
# would say "Aborted!" and exit 1, an option error's code.
EXIT_INTERRUPTED = 130


class MarsvisionError(click.ClickException):
    """A user error: shown by the CLIs as one line on stderr, no traceback, exit code 1.

    The message says what failed, why, and what to do about it.
    """

    exit_code = 1


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
