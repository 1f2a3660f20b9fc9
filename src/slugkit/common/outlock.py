"""The lock on a run's output folder (``--out``) and the claim a run holds on it; the folder itself is written by
:func:`slugkit.common.runfolder.run_folder`.

* **Lock.** ``.<name>.slug-lock`` next to OUT, held with ``fcntl.flock`` (exclusive, non-blocking). The kernel drops
  the lock when its process dies, so a dead run never blocks the next one; the file records the holder's pid and
  host, which the loser of a race is told (:class:`RunLockedError`: "another slug run is writing to OUT (pid N)").
  The file is removed by its holder on release (while still locked; a locker checks it locked the current file).
* **Journal.** The lock file also records what its holder moved where (the old folder's temporary name, the inode of
  the temporary folder being filled, whether it committed). A process that gets the lock and finds a record there
  knows that the holder died unfinished: it repairs OUT from the record (puts the old folder back, removes partial
  writes and temporary folders) and says so on stderr ("note: ... taking over its lock").
* **Early claims.** :func:`claim_out` takes the lock *before* a run, for callers that write a run's inputs before
  they call the workflow (``slug demo`` curates its forget and retain sets first): it checks OUT (a run is refused
  without ``overwrite``) and creates the run's temporary folder at once; the caller writes the inputs into it
  (:func:`inputs_folder`: ``OUT/data`` is written as ``.OUT.slug-XXXX.tmp/data``), and the run's ``run_folder`` fills
  and commits that same folder. OUT itself is not touched until the commit: while the run goes on it still holds the
  old run (``slug inspect`` reads it), a file the user puts there is theirs, and a failed or killed run leaves only
  the hidden temporary folder, which the next claim removes. The run's ``run_folder`` releases the claim; a claim
  whose run never started is undone by :func:`abandon_claims` (the CLI calls it on its way out; also at exit).
* **Interruption.** Undoing (:func:`abort`) and committing run with SIGINT/SIGTERM held back (:func:`signals_held`).

``SLUGKIT_TEST_PAUSE_AT=stage[,stage]`` (test-only) makes :func:`pause_point` print ``slugkit-test: paused at STAGE``
on stderr and sleep (``SLUGKIT_TEST_PAUSE_S``, default 60 s), so a test can interrupt a run at a named stage.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import check_flag
from .files import check_folder_target, dir_mode, register_staging, unregister_staging
from .outguard import TAG, inspect_out, refuse_unsafe_out
from .outundo import own_names, rmtree, siblings, tidy, undo_out

__all__ = ["RunLockedError", "abandon_claims", "claim_out", "inputs_folder", "is_private", "new_stage", "pause_point"]

PAUSE_ENV, PAUSE_SECONDS_ENV = "SLUGKIT_TEST_PAUSE_AT", "SLUGKIT_TEST_PAUSE_S"


class RunLockedError(RuntimeError):
    """Another process holds the lock on the output folder."""


def pause_point(stage: str) -> None:
    """Test-only: pause at ``stage`` when ``SLUGKIT_TEST_PAUSE_AT`` names it (see the module docstring)."""
    spec = os.environ.get(PAUSE_ENV)
    if spec and stage in spec.split(","):
        print(f"slugkit-test: paused at {stage}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get(PAUSE_SECONDS_ENV) or 60))


@dataclass
class Claim:
    """This process's hold on one output folder (see the module docstring)."""

    out: Path  # as the caller named it (messages)
    target: Path  # where the folder is (OUT, or what a symlink OUT points to)
    lock: Path
    fd: int
    early: bool = False  # claimed before the run: its temporary folder exists from the start (inputs_folder)
    stage_taken: bool = False  # early: the run's run_folder has taken the temporary folder made at the claim
    released_by_run: bool = True  # the run_folder that uses the claim releases it (False: out_lock does)
    created_parents: list = field(default_factory=list)
    aside: Path | None = None  # the old OUT, renamed away at the commit (deleted once the new one is in place)
    replace_run: bool = False  # OUT holds a complete run that the new one replaces
    stage: Path | None = None
    stage_id: tuple | None = None  # (st_dev, st_ino) of the temporary folder: identifies it after the rename
    committed: bool = False
    mode: int | None = None  # OUT's permission bits when it was claimed as an existing folder: the new OUT keeps them
    for_python: bool = False  # claimed by slugkit.world_config: a caller may hold it idle (a notebook) until unlearn

    def journal(self) -> None:
        """Write the holder and its moves into the lock file (read by whoever takes over after a crash)."""
        doc = {"pid": os.getpid(), "host": socket.gethostname(), "out": str(self.out),
               "aside": self.aside.name if self.aside else None, "stage": self.stage.name if self.stage else None,
               "stage_id": self.stage_id, "committed": self.committed,
               "waiting": self.for_python and not self.stage_taken}  # world_config's: held until unlearn runs
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(doc).encode(), 0)


_CLAIMS: dict[str, Claim] = {}
_CLAIMS_LOCK = threading.RLock()


def _key(path: Path) -> str:
    return os.path.abspath(path)


def _inside(path: Path, folder: Path) -> bool:
    p, f = os.path.realpath(path), os.path.realpath(folder)  # OUT/data where OUT is a symlink is inside its target
    return p.startswith(f + os.sep)


def is_private(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies inside a temporary folder this process is filling: no other writer can reach it, and
    whatever is written there is committed or removed with that run."""
    path = Path(path)
    with _CLAIMS_LOCK:
        for c in _CLAIMS.values():
            if c.stage is not None and (_key(path) == _key(c.stage) or _inside(path, c.stage)):
                return True
    return False


def inputs_folder(out: str | os.PathLike) -> Path:
    """Where a caller writes a run's inputs for OUT before the run (``slug demo``: ``inputs_folder(OUT) / "data"``):
    the temporary folder of this process's early claim on ``out``, which the run then fills and commits; ``out``
    itself when there is none (OUT is inside a temporary folder already, or not claimed early)."""
    with _CLAIMS_LOCK:
        c = _CLAIMS.get(_key(Path(out).resolve() if Path(out).is_symlink() else Path(out)))
    return c.stage if c is not None and c.early and c.stage is not None and not c.stage_taken else Path(out)


# ---------------------------------------------------------------------------------------------------- the lock
def _makedirs(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, outermost first."""
    missing, p = [], folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _holder(lock: Path) -> dict:
    """The lock file's record (the holder writes it right after locking: retry briefly when it is still empty)."""
    for _ in range(20):
        try:
            text = lock.read_text(encoding="utf-8", errors="replace")
            if text:
                return json.loads(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def _holder_text(doc: dict) -> str:
    pid, host = doc.get("pid", "unknown"), doc.get("host")
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def _acquire(out: Path, target: Path, wait: bool) -> tuple[int, Path, list]:
    """Lock ``target``: an open file descriptor holding the flock, the lock file, the parents created for it."""
    import fcntl

    lock = target.parent / f".{target.name}{TAG}lock"
    created = _makedirs(target.parent)
    try:
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    doc = _holder(lock)
                    holder = _holder_text(doc)
                    if not wait and doc.get("waiting"):  # an idle world_config claim held in a notebook (trial 37)
                        raise RunLockedError(f"another slug process ({holder}) holds {out} for a run it has not "
                                             "started (slugkit.world_config in Python): wait for it, or in that "
                                             "process run it or call slugkit.release_claims(); or choose another "
                                             "output folder") from None
                    if not wait:
                        raise RunLockedError(f"another slug run is writing to {out} ({holder}); wait for it or "
                                             "choose another --out") from None
                    print(f"waiting for the slug run that is writing to {out} ({holder})", file=sys.stderr)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                try:
                    same = os.stat(lock)
                except FileNotFoundError:
                    same = None
                if same is not None and (same.st_dev, same.st_ino) == (st.st_dev, st.st_ino):
                    return fd, lock, created
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder removed the file as we locked it: lock the new one
    except BaseException:  # the lock could not be taken: the folders made for it go again (nothing left behind)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _release(claim: Claim) -> None:
    with _CLAIMS_LOCK:
        if _CLAIMS.get(_key(claim.target)) is claim:
            del _CLAIMS[_key(claim.target)]
    try:
        claim.lock.unlink()  # while still holding the lock; _acquire checks the inode it locked is still the file
    except FileNotFoundError:
        pass
    os.close(claim.fd)


def _recover(claim: Claim, doc: dict) -> None:
    """Repair ``claim.target`` after a holder that died (``doc``: its journal; {} when unreadable) and say what was
    done: its temporary folder removed, the old folder put back if its commit had moved it away (a journal of an
    older slugkit whose early claim wrote into OUT itself: only the entries it wrote removed, :mod:`.outundo`)."""
    target, done, kept = claim.target, [], []
    aside = target.parent / doc["aside"] if doc.get("aside") else None
    committed = bool(doc.get("committed"))
    if not committed and doc.get("stage_id") and target.exists():
        st = target.stat()
        committed = [st.st_dev, st.st_ino] == list(doc["stage_id"])
    if committed:
        if aside is not None and aside.exists():
            rmtree(aside)
            done.append("removed the run it replaced")
    else:
        names = os.listdir(target) if target.is_dir() else []
        done, kept = undo_out(target, own_names(doc, names), aside, bool(doc.get("was_empty_dir")),
                              bool(doc.get("owns_target")))
    for stale in siblings(target, ".tmp"):
        rmtree(stale)
        done.append(f"removed its temporary folder {stale.name}")
    if kept:
        done.append(f"kept what it did not write: {', '.join(kept)}")
    left = [p.name for p in siblings(target, ".old")]
    print(f"note: the slug run {_holder_text(doc)} that was writing to {claim.out} ended without finishing; "
          f"taking over its lock" + "".join(f"; {d}" for d in done) +
          (f" (left alone: {', '.join(left)})" if left else ""), file=sys.stderr)


def _read_journal(fd: int) -> dict | None:
    """The record a previous holder left in the lock file (None: none; {}: unreadable)."""
    data = os.pread(fd, 1 << 16, 0)
    if not data:
        return None
    try:
        doc = json.loads(data.decode("utf-8"))
        return doc if isinstance(doc, dict) else {}
    except ValueError:
        return {}


def claim_out(out: str | os.PathLike, overwrite: bool = False, marker: str = "result.json", *, early: bool = True,
              wait: bool = False, for_python: bool = False) -> Claim:
    """Lock OUT for this process (again: the claim it already holds). ``for_python``: a claim of
    ``slugkit.world_config``, which a caller may hold idle (another process is told so). ``early`` (see the module
    docstring): refuse a run without ``overwrite``, a file always; create the run's temporary folder. Raises
    :class:`RunLockedError` when another process holds the lock (``wait``: wait for it instead)."""
    if not os.fspath(out).strip():
        raise ValueError("the output folder (--out) is empty; name a new folder (e.g. runs/NAME)")
    check_flag("overwrite", overwrite)
    out = Path(out)
    if not os.path.lexists(out):
        check_folder_target(out)  # under a file: say so, not "cannot create or lock … File exists"
    target = out.resolve() if out.is_symlink() else out
    with _CLAIMS_LOCK:
        if _key(target) in _CLAIMS:  # this process's own claim (checked when it was made)
            return _CLAIMS[_key(target)]
        own_locks = {os.path.abspath(c.lock) for c in _CLAIMS.values()}
    refuse_unsafe_out(out, target, own_locks)
    try:
        fd, lock, created = _acquire(out, target, wait)
    except OSError as e:  # name the folder the user gave (and the part of its path that failed), not our lock file
        failed = None if e.filename is None else os.fsdecode(e.filename)
        where = "" if failed is None or failed.endswith(f"{TAG}lock") or Path(failed) == out else f" at {failed}"
        raise OSError(e.errno, f"cannot create or lock this output folder{where}: {e.strerror or e}; choose "
                      "another output folder (--out)", str(out)) from None
    claim = Claim(out, target, lock, fd, early=early, created_parents=created, for_python=for_python)
    if out.is_symlink() and not target.is_dir():  # the summary names the link: say where the run goes (and made)
        print(f"note: --out {out} is a symbolic link to {target}, which does not exist yet; the run is written there"
              f"{' (made ' + ', '.join(map(str, created)) + ')' if created else ''}", file=sys.stderr, flush=True)
    with _CLAIMS_LOCK:
        _CLAIMS[_key(target)] = claim
    try:
        previous = _read_journal(fd)
        if previous is not None:
            _recover(claim, previous)
        else:
            tidy(target, claim.out)
        claim.journal()
        claim.mode = os.stat(target).st_mode & 0o7777 if target.is_dir() else None  # e.g. 0700: kept by the new OUT
        if early:
            _take(claim, overwrite, marker)
    except BaseException:
        with signals_held():
            abort(claim)
            finish(claim)
        raise
    pause_point("claimed")
    return claim


def _take(claim: Claim, overwrite: bool, marker: str) -> None:
    """Early claim: check OUT (a run is refused without ``overwrite``) and create the run's temporary folder."""
    claim.replace_run = inspect_out(claim.out, claim.target, overwrite, marker) == "run"
    new_stage(claim)


def new_stage(claim: Claim) -> Path:
    """Create the temporary folder (the umask's mode) for the run into ``claim``'s OUT, next to it; journaled."""
    stage = Path(tempfile.mkdtemp(prefix=f".{claim.target.name}{TAG}", suffix=".tmp", dir=claim.target.parent))
    stage = claim.target.parent / stage.name
    os.chmod(stage, dir_mode())
    st = stage.stat()
    claim.stage, claim.stage_id = stage, (st.st_dev, st.st_ino)
    register_staging(stage, claim.target)
    claim.journal()
    return stage


# ------------------------------------------------------------------------------------------------- the folder
def new_name(target: Path, suffix: str) -> Path:
    p = Path(tempfile.mkdtemp(prefix=f".{target.name}{TAG}", suffix=suffix, dir=target.parent))
    os.rmdir(p)
    return target.parent / p.name  # keep the caller's form of the path (relative stays relative)


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT, SIGTERM and SIGALRM (:mod:`.interrupts`) back for the block (main thread, POSIX), delivered when
    it ends. Blocking them in the main thread is not enough (a Ctrl-C reaching a torch worker thread interrupted the
    deletion of the replaced folder, sixth trial): the Python handlers are swapped for a recorder meanwhile."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)
    got: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in held}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(held))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a signal pending on the main thread reaches the recorder
        for s, h in handlers.items():
            signal.signal(s, h)
        for s in dict.fromkeys(got):
            if handlers[s] not in (signal.SIG_IGN, None):
                signal.raise_signal(s)  # now handled as it would have been (KeyboardInterrupt, Terminated, …)


def abort(claim: Claim) -> None:
    """Undo an unfinished claim: the temporary folder removed, the old folder put back if the commit had moved it
    away. Safe to repeat."""
    if claim.committed:
        return
    if claim.stage is not None:
        shutil.rmtree(claim.stage, ignore_errors=True)
        unregister_staging(claim.stage)
        claim.stage = None
    undo_out(claim.target, set(), claim.aside, False, False)
    claim.aside = None


def finish(claim: Claim) -> None:
    """Release the lock (removing its file); after a failure also the parent folders made for it, when empty."""
    _release(claim)
    if not claim.committed:
        for d in reversed(claim.created_parents):
            with contextlib.suppress(OSError):
                d.rmdir()


def abandon_claims(waiting_only: bool = False) -> None:
    """Undo and release every claim this process still holds (an early claim whose run never ran or failed);
    ``waiting_only``: only early claims whose run has not started (``slugkit.release_claims``)."""
    with _CLAIMS_LOCK:
        claims = [c for c in _CLAIMS.values() if not waiting_only or (c.early and not c.stage_taken)]
    for claim in claims:
        with signals_held():
            abort(claim)
            finish(claim)


atexit.register(abandon_claims)
