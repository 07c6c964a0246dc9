"""Stop strings, table-driven: across deltas, overlapping, multi-byte, and streamed == whole."""

from __future__ import annotations

import pytest

from service.engine.stops import StopMatcher

CASES = [
    # (deltas, stops, include, expected released text, stopped)
    (["Hello", " wor", "ld"], ("world",), False, "Hello ", True),
    (["Hello", " wor", "ld"], ("world",), True, "Hello world", True),
    (["a", "b", "c"], ("bc",), False, "a", True),  # a stop spanning two deltas
    (["abc"], ("ab", "bc"), False, "", True),  # overlapping stops: the earliest wins
    (["xabc"], ("bc", "abc"), False, "x", True),
    (["xab", "c"], ("abcd", "bc"), False, "xa", True),  # a longer stop's prefix held, a shorter one matched
    (["The end", "."], ("END",), False, "The end.", False),  # case matters
    (["wo", "rm"], ("world",), False, "worm", False),  # held "wo" is released once it cannot match
    (["你好", "世", "界!"], ("世界",), False, "你好", True),  # multi-byte characters
    (["🙂🙂", "🚀"], ("🙂🚀",), True, "🙂🙂🚀", True),
    (["line\n", "\n", "next"], ("\n\n",), False, "line", True),
    (["abc"], (), False, "abc", False),
]


@pytest.mark.parametrize(("deltas", "stops", "include", "expected", "stopped"), CASES)
def test_stop_table(deltas: list[str], stops: tuple[str, ...], include: bool, expected: str, stopped: bool) -> None:
    m = StopMatcher(stops, include)
    released = [m.push(d) for d in deltas]
    out = "".join(released) + m.flush()
    assert out == expected
    assert m.stopped is stopped
    whole = StopMatcher(stops, include)  # one delta with everything: the same text
    assert whole.push("".join(deltas)) + whole.flush() == expected


def test_prefix_is_never_shown_before_it_is_decided() -> None:
    m = StopMatcher(("STOP",))
    assert m.push("go ST") == "go "
    assert m.push("O") == ""
    assert m.push("P and more") == ""
    assert m.stopped


def test_before_min_tokens_nothing_stops_or_is_held() -> None:
    m = StopMatcher(("ab",))
    assert m.push("xab", can_stop=False) == "xab"
    assert not m.stopped
    assert m.push("ab") == ""
    assert m.stopped
