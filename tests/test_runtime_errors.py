"""runtime/errors.py: message clipping (a case a mutation audit found unchecked)."""

from __future__ import annotations


def test_a_message_exactly_at_the_limit_is_not_cut() -> None:
    from marsvision.runtime.errors import clipped

    assert clipped("abc def", 7) == "abc def"
    assert clipped("abc defg", 7) == "abc ..."
