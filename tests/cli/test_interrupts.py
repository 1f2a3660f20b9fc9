"""Ctrl-C during an import (the first second of every command): held back until the import has finished, then the
usual unwinding (fourth new-user trial: an early Ctrl-C was swallowed by a library's import and the run went on, or
broke numpy's import into a traceback)."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

# a library whose import swallows every exception (as some do around optional parts), and takes a while
SLOW_MODULE = """
import time
try:
    time.sleep(1.5)
except BaseException:
    pass
DONE = True
"""

PROGRAM = """
import sys
sys.path.insert(0, sys.argv[1])
from slugkit.common import interrupts
try:
    with interrupts.handling():
        print("ready", flush=True)
        import slowlib
        print("imported whole:", slowlib.DONE, flush=True)
        import time
        time.sleep(30)
        print("never interrupted", flush=True)
except KeyboardInterrupt as e:
    print("raised", type(e).__name__, "after the import:", getattr(sys.modules.get("slowlib"), "DONE", False),
          flush=True)
"""


def _as_in_a_terminal() -> None:
    """In the child: Ctrl-C as a user's shell gives it (see test_run_folders._slug), also when the tests run in a
    background job (`nohup make test &` starts every process with SIGINT ignored: Python then installs no
    KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _start(tmp_path, module: str = SLOW_MODULE) -> subprocess.Popen:
    (tmp_path / "slowlib.py").write_text(module)
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PROGRAM), str(tmp_path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=_as_in_a_terminal)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.4)  # inside the import now
    return p


@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, "KeyboardInterrupt"), (signal.SIGTERM, "Terminated")])
def test_a_signal_during_an_import_is_delivered_after_it(tmp_path, sig, raised):
    """The import that would have swallowed the interrupt finishes whole; the interrupt is raised right after, by
    the import statement (fifth trial: with only the 50 ms re-check, `slug revert` finished its work first)."""
    p = _start(tmp_path)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    # raised by the import statement, once the module had run whole (the next line never ran)
    assert out.splitlines() == [f"raised {raised} after the import: True"], (out, err)


def test_three_ctrl_c_during_one_import_stop_it_at_once(tmp_path):
    """An import that hangs can still be stopped: the third press raises inside it."""
    p = _start(tmp_path, "import time\ntime.sleep(20)\nDONE = True\n")
    t = time.perf_counter()
    for _ in range(3):
        p.send_signal(signal.SIGINT)
        time.sleep(0.1)
    out, err = p.communicate(timeout=60)
    assert out.splitlines() == ["raised KeyboardInterrupt after the import: False"] and time.perf_counter() - t < 5, \
        (out, err)


def test_outside_an_import_ctrl_c_raises_at_once(tmp_path):
    (tmp_path / "slowlib.py").write_text("DONE = True\n")
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PROGRAM), str(tmp_path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=_as_in_a_terminal)
    assert p.stdout.readline().strip() == "ready"
    assert p.stdout.readline().strip() == "imported whole: True"
    t = time.perf_counter()
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert out.strip() == "raised KeyboardInterrupt after the import: True" and time.perf_counter() - t < 5


def test_handlers_are_restored_and_an_ignored_sigint_stays_ignored():
    from slugkit.common import interrupts

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job: ignored)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    with interrupts.handling():
        assert signal.getsignal(signal.SIGINT) is interrupts._on_signal
    assert {s: signal.getsignal(s) for s in before} == before
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # `nohup slug …`, a background job
    try:
        with interrupts.handling():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is interrupts._on_signal
    finally:
        signal.signal(signal.SIGINT, old)
    try:
        with interrupts.handling(active=False):
            assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_sigterm_unwinds_through_every_ctrl_c_handler():
    """``Terminated`` is a ``KeyboardInterrupt``: every ``except KeyboardInterrupt`` that cleans up after Ctrl-C (the
    run folder's temporary folder, claims) cleans up after SIGTERM too — which lets the run-folder tests interrupt the
    later stages with Ctrl-C only."""
    from slugkit.common.interrupts import Terminated

    assert issubclass(Terminated, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        raise Terminated()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_command_has_ended_leaves_its_exit_status(sig):
    """Trial 48: Ctrl-C in the ~1.5 s of interpreter shutdown after `wrote …` turned a complete run into exit 130.
    The `slug` program's main ignores both signals once the command has returned."""
    prog = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.argv = ["slug", "world", "names"]
        from slugkit.__main__ import main
        rc = main()
        print("returned", rc, flush=True)
        os.kill(os.getpid(), {int(sig)})  # as during the shutdown that follows
        time.sleep(0.3)
        sys.exit(rc)
        """)
    p = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120,
                       preexec_fn=_as_in_a_terminal)
    assert "returned 0" in p.stdout and p.returncode == 0, p.stderr[-2000:]
