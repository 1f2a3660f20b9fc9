"""One writer at a time for an output that is not a run folder (``slug audit --out``): a sentinel file beside it,
created exclusively and holding the writer's pid. Two audits into one folder both said "wrote", and one's files were
the other's (verify 47: the "audit.json exists" check and the write were apart). A sentinel whose writer died is
taken over. (Run folders have the flock-based claim of :mod:`slugkit.common.outlock`, with its journal and
recovery; an audit writes two files and a report section, which need neither.)"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .outlock import RunLockedError


@contextlib.contextmanager
def one_writer(out: str | os.PathLike, what: str = "slug audit"):
    """Hold ``.<out name>.slug-audit`` beside ``out`` for the block; :class:`RunLockedError` naming the holder's pid
    when a live process holds it."""
    out = Path(out)
    mark = out.parent / f".{out.name}.slug-audit"
    out.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid = int(mark.read_text() or 0)
                if pid <= 0:
                    raise ValueError(pid)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                mark.unlink(missing_ok=True)  # its writer is gone (or had not written its pid: retried once more)
                continue
            except PermissionError:  # alive, another user's
                pass
            raise RunLockedError(f"another {what} (pid {pid}) is writing to {out}; wait for it or choose another "
                                 "--out") from None
    else:
        raise RunLockedError(f"could not take {mark}; remove it if no {what} is running")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        mark.unlink(missing_ok=True)
