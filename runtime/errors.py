"""The one exception type for user errors (bad input, missing files, wrong options)."""

from __future__ import annotations

import click


class MarsvisionError(click.ClickException):
    """A user error: shown by the CLIs as one line on stderr, no traceback, exit code 1.

    The message says what failed, why, and what to do about it.
    """

    exit_code = 1
