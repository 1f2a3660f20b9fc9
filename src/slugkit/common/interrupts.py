"""Ctrl-C and SIGTERM for the ``slug`` program: never inside an ``import``.

Python raises ``KeyboardInterrupt`` at whatever line runs when Ctrl-C arrives. In the first second of a command that
is nearly always a library's import (numpy, torch, open_clip), and some of those imports catch every exception and
carry on without the module, or leave a half-initialised package behind: the fourth new-user trial saw an early
Ctrl-C swallowed (the run went on and exited 0) or turned into an ``AttributeError`` traceback from numpy (exit 1).

So, while ``slug`` is the program (:func:`handling`, installed by the ``slug`` script, :mod:`slugkit.__main__`,
before it imports anything else of slugkit's, and by :func:`slugkit.cli.main`), SIGINT and SIGTERM are held back
while an import is executing (a frame of ``importlib._bootstrap`` on the main thread's stack) and delivered as soon
as it has finished: the ``import`` statement that finished it raises (checked every 50 ms with ``SIGALRM`` too; the
fifth trial saw ``slug revert`` do all its work in the 50 ms after torch's import, the Ctrl-C lost). Ctrl-C then
unwinds the run as anywhere else (``interrupted``, exit 130; SIGTERM: :class:`Terminated`, ``terminated``, exit
143). A third Ctrl-C during one import is delivered at once (an import that hangs can still be stopped).
"""

from __future__ import annotations

import builtins
import contextlib
import signal
import sys
import threading

__all__ = ["Terminated", "handling", "ignore_while_exiting"]

RETRY_S = 0.05  # how often a held-back signal is re-checked
PRESSES_TO_FORCE = 3  # Ctrl-C presses during one import that raise at once


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that the run unwinds exactly as on Ctrl-C (temporary folder removed,
    claims undone) instead of dying with its partial output in place."""


_pending: list[int] = []  # signals held back (in arrival order); [] when none


def _importing(frame) -> bool:
    """Whether ``frame`` (the main thread's current frame) is inside an import being executed."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _raise(signum: int):
    _pending.clear()
    signal.setitimer(signal.ITIMER_REAL, 0)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_signal(signum, frame):
    if _importing(frame) and _pending.count(signal.SIGINT) + 1 < PRESSES_TO_FORCE:
        _pending.append(signum)
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    _raise(signum)


def _on_retry(signum, frame):
    if not _pending:
        return
    if _importing(frame):
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    _raise(signal.SIGTERM if signal.SIGTERM in _pending else signal.SIGINT)


_import = builtins.__import__


def _import_then_deliver(name, globals=None, locals=None, fromlist=(), level=0):
    """``__import__``, after which a signal held back during the import is delivered (unless still inside one)."""
    module = _import(name, globals, locals, fromlist, level)
    if _pending and not _importing(sys._getframe(1)):
        _raise(signal.SIGTERM if signal.SIGTERM in _pending else signal.SIGINT)
    return module


@contextlib.contextmanager
def handling(active: bool = True):
    """For the block: SIGINT raises ``KeyboardInterrupt`` and SIGTERM :class:`Terminated`, both held back while an
    import executes (module docstring). ``active`` False, or outside the main thread: nothing changes (a caller that
    runs ``slug``'s ``main(argv)`` in-process keeps its own handlers). The previous handlers are restored after."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = {signal.SIGINT: _on_signal, signal.SIGTERM: _on_signal, signal.SIGALRM: _on_retry}
    # a signal the shell made us ignore (`nohup`, a background job's SIGINT) stays ignored
    old = {s: signal.signal(s, h) for s, h in wanted.items() if signal.getsignal(s) != signal.SIG_IGN}
    old_import, builtins.__import__ = builtins.__import__, _import_then_deliver
    try:
        yield
    finally:
        builtins.__import__ = old_import
        signal.setitimer(signal.ITIMER_REAL, 0)
        _pending.clear()
        for s, h in old.items():
            signal.signal(s, h)


def ignore_while_exiting() -> None:
    """SIGINT and SIGTERM ignored from here on — for the ``slug`` program once its command has returned: the work is
    done and said (``wrote …``, ``verdict: pass``), and the interpreter's shutdown (torch's teardown, ~1.5 s) would
    otherwise end by the signal with exit 130/143, a complete artifact reading as an interrupted run (trial 48). Main
    thread only (elsewhere nothing changes); a signal the shell already made us ignore stays ignored."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
