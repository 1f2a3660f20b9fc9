"""Progress in logs (trust case F): tqdm's carriage-return frames become sparse plain lines when stderr is not a
terminal; plain text passes unchanged."""

import io

from tqdm import tqdm

from slugkit.common.progress import PlainLines


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_tqdm_frames_become_sparse_lines():
    out, clock = io.StringIO(), Clock()
    stream = PlainLines(out, interval=10.0, clock=clock)
    bar = tqdm(total=100, desc="gradients", file=stream, mininterval=0, ncols=60)
    for _ in range(100):
        clock.t += 0.5  # 50 s in all: about one line every 10 s, plus the final state
        bar.update(1)
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert 3 <= len(lines) <= 8, lines
    assert lines[-1].startswith("gradients: 100%")


def test_plain_text_and_blank_frames():
    out = io.StringIO()
    stream = PlainLines(out, interval=10.0, clock=Clock())
    stream.write("error: something\n")
    stream.write("\r   \r")  # a bar clearing itself
    stream.write("warning: x\n")
    assert out.getvalue() == "error: something\nwarning: x\n"


def test_first_frame_is_shown_and_partial_text_is_flushed():
    out, clock = io.StringIO(), Clock()
    stream = PlainLines(out, interval=10.0, clock=clock)
    stream.write("\rloading: 1/3")
    stream.write("\rloading: 2/3")  # first frame shown (no line yet), second frame within the interval: dropped
    stream.write("\rloading: 3/3\n")
    stream.write("partial")
    stream.flush()
    assert out.getvalue() == "loading: 1/3\nloading: 3/3\npartial"


def test_a_bar_that_clears_itself_still_logs_its_last_state():
    out, clock = io.StringIO(), Clock()
    stream = PlainLines(out, interval=10.0, clock=clock)
    bar = tqdm(total=10, desc="gradients: forget", file=stream, mininterval=0, ncols=60, leave=False)
    for _ in range(10):
        clock.t += 0.1
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("gradients: forget:   0%") and lines[-1].startswith("gradients: forget: 100%")


def test_bars_that_vanish_in_a_terminal_end_on_their_final_state_in_a_log(monkeypatch):
    """A ``leave=False`` bar never draws its final state: in a log, a pass that finished read "93% 14/15" (its last
    0.1 s refresh). Off a terminal, :func:`vanishing_bar` leaves the bar, so the log ends on 15/15."""
    import sys

    from slugkit.common.progress import leave_bar, vanishing_bar

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", PlainLines(out, interval=10.0))
    assert leave_bar() is True
    for _ in vanishing_bar(range(15), desc="gradients: retain", unit="batch", file=sys.stderr):
        pass  # faster than tqdm's 0.1 s refresh: only the first frame would be drawn before close
    assert out.getvalue().splitlines()[-1].startswith("gradients: retain: 100%|") and "15/15" in out.getvalue()

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert leave_bar() is False  # a terminal: the bar clears itself as before
