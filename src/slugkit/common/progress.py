"""Progress that reads well in a terminal and in a log file.

* :func:`status` — one line on stderr saying what a slow step is doing ("loading model ViT-B-32", "reading the
  forget set"), for steps with no natural count;
* :class:`PlainLines` — wraps stderr when it is not a terminal (a log file, CI, a pipe) and turns tqdm's ``\\r``
  frames into plain lines: at most one line per ``interval`` seconds per bar, plus the bar's final state, instead of
  hundreds of carriage-return frames in one line. :func:`plain_progress_if_not_a_tty` installs it.
"""

from __future__ import annotations

import io
import sys
import time

__all__ = ["PlainLines", "leave_bar", "plain_progress_if_not_a_tty", "status", "vanishing_bar"]


def status(message: str, enabled: bool = True) -> None:
    """Print ``message`` as one line on stderr (flushed), unless disabled (``--no-progress``)."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


def leave_bar() -> bool:
    """tqdm's ``leave`` for a bar that should vanish when done: False in a terminal, True elsewhere. A bar closed with
    ``leave=False`` never draws its final state, so in a log its last line is its last refresh (tqdm redraws at most
    every 0.1 s): "gradients: retain: 93% 14/15" for a pass that finished. Left, it ends on its final state."""
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):
        return True


def vanishing_bar(iterable, **kwargs):
    """``tqdm(iterable, **kwargs)`` that clears itself when done in a terminal and ends on its final state in a log
    (:func:`leave_bar`)."""
    from tqdm.auto import tqdm  # a widget in a notebook (trial 28), the plain bar elsewhere

    return tqdm(iterable, leave=leave_bar(), **kwargs)


class PlainLines(io.TextIOBase):
    """A text stream that forwards plain text unchanged and rewrites ``\\r`` progress frames as sparse lines.

    A frame is the text between two ``\\r`` (or between ``\\r`` and ``\\n``). It is written as its own line when at
    least ``interval`` seconds passed since the last frame line, and always when a newline ends it (tqdm's last
    state). Blank frames (tqdm clearing its bar) are dropped. ``clock`` is injectable for tests.
    """

    def __init__(self, stream, interval: float = 10.0, clock=time.monotonic):
        self.stream, self.interval, self.clock = stream, interval, clock
        self._frame = ""
        self._in_frame = False
        self._pending = ""
        self._last = -float("inf")

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    def fileno(self) -> int:
        return self.stream.fileno()

    def _emit(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def write(self, s: str) -> int:
        for ch_block in _split_keep(s):
            if ch_block == "\r":
                if self._in_frame and self._frame.strip():
                    if self.clock() - self._last >= self.interval:
                        self._emit(self._frame.rstrip())
                        self._last, self._pending = self.clock(), ""
                    else:
                        self._pending = self._frame.rstrip()  # shown if the bar clears itself next
                elif self._in_frame and self._pending:
                    self._emit(self._pending)  # a bar clearing itself (leave=False): its last state
                    self._last, self._pending = self.clock(), ""
                elif not self._in_frame and self._frame:
                    self._emit(self._frame)  # plain text cut by a frame: keep it
                self._frame, self._in_frame = "", True
            elif ch_block == "\n":
                self._pending = ""
                if self._frame.strip() or not self._in_frame:
                    self._emit(self._frame.rstrip() if self._in_frame else self._frame)
                    if self._in_frame:
                        self._last = self.clock()
                self._frame, self._in_frame = "", False
            else:
                self._frame += ch_block
        return len(s)

    def flush(self) -> None:
        if not self._in_frame and self._frame:
            self.stream.write(self._frame)
            self._frame = ""
        self.stream.flush()


def _split_keep(s: str) -> list[str]:
    out, cur = [], ""
    for ch in s:
        if ch in "\r\n":
            if cur:
                out.append(cur)
                cur = ""
            out.append(ch)
        else:
            cur += ch
    if cur:
        out.append(cur)
    return out


def plain_progress_if_not_a_tty(interval: float = 10.0) -> None:
    """Wrap ``sys.stderr`` in :class:`PlainLines` when it is not a terminal (idempotent)."""
    err = sys.stderr
    if isinstance(err, PlainLines) or err is None:
        return
    try:
        tty = err.isatty()
    except (AttributeError, ValueError):
        return
    if not tty:
        sys.stderr = PlainLines(err, interval)
