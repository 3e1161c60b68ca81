import io

import pytest

from miles.utils.progress import Progress, announce, format_seconds


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_log_lines_are_rate_limited_and_show_total_and_eta() -> None:
    out, clock = io.StringIO(), Clock()
    p = Progress("rollout 3", 10, "samples", stream=out, interval_s=5.0, clock=clock)
    clock.t += 1
    p.advance(2)  # within the interval: no line
    clock.t += 5
    p.advance(2)  # 4/10 after 6 s: ETA 9 s
    p.close()
    p.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert lines == [
        "[miles] rollout 3: 0/10 samples, 0.0 s",
        "[miles] rollout 3: 4/10 samples, 6.0 s, ETA 9.0 s",
        "[miles] rollout 3: 4/10 samples, 6.0 s, ETA 9.0 s",
    ]


def test_done_never_exceeds_total_and_advance_after_close_is_ignored() -> None:
    out = io.StringIO()
    with Progress("eval", 3, stream=out, interval_s=0.0) as p:
        p.advance(5)
    p.advance(1)
    assert p.done == 3
    assert out.getvalue().splitlines()[-1].startswith("[miles] eval: 3/3, ")


def test_terminal_redraws_one_line() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out, clock = Tty(), Clock()
    p = Progress("train", 2, stream=out, redraw_s=0.0, clock=clock)
    p.advance()
    p.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 3


def test_negative_total_is_refused() -> None:
    with pytest.raises(ValueError, match="total must be >= 0"):
        Progress("x", -1, stream=io.StringIO())


def test_announce_and_format_seconds() -> None:
    out = io.StringIO()
    announce("loading model m", out)
    assert out.getvalue() == "[miles] loading model m\n"
    assert format_seconds(42.04) == "42.0 s"
    assert format_seconds(185) == "3 min 05 s"
    assert format_seconds(3720) == "1 h 02 min"
