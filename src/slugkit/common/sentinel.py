"""One writer at a time for an output that is not a run folder (``slug audit --out``, ``slug apply``/``revert``/
``grads`` ``--out``): a sentinel file beside it,
created exclusively and holding the writer's pid. Two audits into one folder both said "wrote", and one's files were
the other's (verify 47: the "audit.json exists" check and the write were apart; trial 49: two ``slug apply --out
X`` both said "wrote X", and two ``slug grads`` shared one checkpoint folder). A sentinel whose writer died is
taken over. (Run folders have the flock-based claim of :mod:`slugkit.common.outlock`, with its journal and
recovery; an audit writes two files and a report section, which need neither.)"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .outlock import RunLockedError


@contextlib.contextmanager
def one_writer(out: str | os.PathLike, what: str = "slug audit"):
    """Hold ``.<out name>.slug-writing`` beside ``out`` for the block; :class:`RunLockedError` naming the holder's
    pid (and ``what`` it is) when a live process holds it. Folders created for the sentinel are removed again when
    the block leaves them empty (a refusal inside it leaves nothing behind)."""
    out = Path(out)
    mark = out.parent / f".{out.name}.slug-writing"
    made, d = [], out.parent
    while not d.exists() and d != d.parent:
        made.append(d)
        d = d.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # under a file, or not creatable: no one can write there; the command's own check says why
        yield
        return
    try:
        with _held(mark, out, what):
            yield
    finally:
        for d in made:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def _held(mark: Path, out: Path, what: str):
    for _ in range(3):
        try:
            fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid_text, _, holder = (mark.read_text() or "0").partition(" ")
                pid = int(pid_text)
                if pid <= 0:
                    raise ValueError(pid)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                mark.unlink(missing_ok=True)  # its writer is gone (or had not written its pid: retried once more)
                continue
            except PermissionError:  # alive, another user's
                pass
            raise RunLockedError(f"another {holder or what} (pid {pid}) is writing to {out}; wait for it or choose "
                                 "another --out") from None
    else:
        raise RunLockedError(f"could not take {mark}; remove it if no {what} is running")
    try:
        os.write(fd, f"{os.getpid()} {what}".encode())
        os.close(fd)
        _drop_stale_temps(out)
        yield
    finally:
        mark.unlink(missing_ok=True)


def run_as_one_writer(outs, what: str, run, refuse):
    """``run()`` holding :func:`one_writer` on each of ``outs`` (falsy ones skipped) — the CLI's ``slug apply`` /
    ``revert`` / ``export`` / ``grads`` —, or ``refuse(message)`` when another live writer holds one of them."""
    with contextlib.ExitStack() as stack:
        try:
            for out in outs:
                if out:
                    stack.enter_context(one_writer(out, what))
        except RunLockedError as e:
            return refuse(str(e))
        return run()


def _drop_stale_temps(out: Path) -> None:
    """Remove the temporary files and folders a killed write of ``out`` left beside it (``.<name>.XXXXXXXX.tmp``,
    :func:`slugkit.common.files.atomic_write_bytes` / ``atomic_dir``), saying so: with the sentinel held no other slug
    process writes ``out``, so they are no one's (trial 49: a ``kill -9`` of ``slug revert --out`` left a full-size
    hidden copy of the checkpoint that later writes neither removed nor named)."""
    import glob
    import re
    import shutil
    import sys

    pattern = re.compile(r"\." + re.escape(out.name) + r"\.[A-Za-z0-9_]{8}\.tmp")
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.*.tmp")):
        if not pattern.fullmatch(p.name) or p.is_symlink():
            continue
        kind = "folder" if p.is_dir() else "file"
        try:
            shutil.rmtree(p) if kind == "folder" else p.unlink()
        except OSError:
            continue
        print(f"note: removed {p}, a temporary {kind} an interrupted write of {out} left", file=sys.stderr)
