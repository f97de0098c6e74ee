"""runtime/errors.py: message clipping and stops reported inside library errors, cases the
mutation audit found unchecked."""

from __future__ import annotations

import builtins
import sys
from typing import Any

import pytest


def test_a_message_exactly_at_the_limit_is_not_cut() -> None:
    from marsvision.runtime.errors import clipped

    assert clipped("abc def", 7) == "abc def"
    assert clipped("abc defg", 7) == "abc ..."


def test_a_stop_in_the_context_of_a_library_error_stays_a_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """C code that meets a pending Ctrl-C raises its own error while it is being handled: the
    stop is that error's __context__, not its __cause__ (no `raise ... from`)."""
    from marsvision.runtime.backends.onnxruntime import ort_module
    from marsvision.runtime.errors import Stopped, stop_inside

    def wrapped(stop: BaseException) -> ImportError:
        try:
            try:
                raise stop
            except BaseException:
                raise ImportError("initialization failed")  # noqa: B904 - as C code does
        except ImportError as e:
            return e

    assert isinstance(stop_inside(wrapped(KeyboardInterrupt())), KeyboardInterrupt)
    assert stop_inside(ImportError("no module")) is None
    real = builtins.__import__
    for stop in (KeyboardInterrupt(), Stopped(15)):

        def failing(name: str, *args: Any, s: BaseException = stop, **kw: Any) -> Any:
            if name == "onnxruntime":
                raise wrapped(s)
            return real(name, *args, **kw)

        monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
        monkeypatch.setattr(builtins, "__import__", failing)
        with pytest.raises(type(stop)):
            ort_module()
        monkeypatch.undo()
