"""runtime/errors.py: message clipping."""

from __future__ import annotations


def test_a_message_exactly_at_the_limit_is_not_cut() -> None:
    from marsvision.runtime.errors import clipped

    assert clipped("abc def", 7) == "abc def"
    assert clipped("abc defg", 7) == "abc ..."


def test_a_message_that_starts_with_a_line_break_is_quoted_by_its_first_words() -> None:
    """A library error whose text starts with blank lines: its first words, not an empty quote
    ("cannot be read ()")."""
    from marsvision.runtime.errors import clipped

    assert clipped("\n  \nWeights only load failed.\nDetails", 80) == "Weights only load failed."
    assert clipped(" \n ", 80) == ""
