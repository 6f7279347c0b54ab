"""Untrusted text in messages: names read from files are escaped and cut (``shown``), and a whole
message is bounded and printable where it is shown (``bounded``)."""

from __future__ import annotations

from workbench.errors import MESSAGE_LIMIT, bounded, shown


def test_shown_quotes_escapes_and_cuts_a_name() -> None:
    assert shown("model.norm.weight") == "'model.norm.weight'"
    assert shown("a\x00b\nc") == "'a\\x00b\\nc'"
    long = "x" * 500
    assert shown(long, limit=10) == "'xxxxxxxxxx' (+490 characters)"


def test_bounded_escapes_control_characters_and_cuts_the_middle() -> None:
    assert bounded("tensor 'a\x1b[31m' is bad") == "tensor 'a\\x1b[31m' is bad"
    assert bounded("two\nlines") == "two\nlines"
    message = "S" * 1000 + "M" * 5000 + "E" * 1000
    cut = bounded(message)
    head, tail = MESSAGE_LIMIT * 2 // 3, MESSAGE_LIMIT // 4
    assert cut == "S" * head + f" [... {7000 - head - tail} characters cut ...] " + "E" * tail
    assert len(cut) < MESSAGE_LIMIT + 60
