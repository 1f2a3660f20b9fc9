"""A run's output folder (``--out``), written so that it cannot be corrupted: one writer at a time, never partial.

    with run_folder(out, overwrite, marker="result.json") as tmp:
        ...  # write the whole run into tmp
    # OUT is now the complete run; on any error or Ctrl-C it is as it was before and tmp is gone

* **Lock** on OUT for the whole run (:mod:`slugkit.common.outlock`): a second run into the same OUT stops at once
  with "another slug run is writing to OUT (pid N)"; a dead run's lock is taken over and its leftovers repaired.
* **Temporary folder** ``.<name>.slug-XXXX.tmp`` next to OUT (same filesystem), in which the whole run is written.
  Paths inside it that the run records are written as OUT's (:func:`~slugkit.common.files.final_paths`); an
  OSError naming a path inside it names OUT's instead.
* **Commit.** The tree gets the modes the umask gives (``mkstemp``/``mkdtemp`` made 0600/0700;
  :func:`~slugkit.common.files.fix_modes`), except OUT itself when it existed as a folder: it keeps the mode it had
  (a user who made OUT 0700 to keep a run private still has a 0700 OUT after the run), and is renamed to OUT,
  SIGINT/SIGTERM held back meanwhile. The run's own top-level entries are recorded in ``OUT/.slugkit-entries.json``
  (:data:`~slugkit.common.outguard.MANIFEST`). A folder holding a complete run (``marker`` present) is replaced only
  with ``overwrite``, renamed away first and deleted after the rename succeeded, except the entries slug did not
  write (a user's notes; :func:`~slugkit.common.outguard.foreign_entries`): they are carried into the new run and
  named on stderr, as is an entry of the old run holding a file the user put there (kept whole, as
  ``NAME.before-slug``). A folder holding something else keeps all its entries: they are hard-linked into the new
  folder (copied where links fail) first. Until that rename OUT is not touched — also after an early claim
  (:func:`~slugkit.common.outlock.claim_out`), whose inputs are written into the temporary folder
  (:func:`~slugkit.common.outlock.inputs_folder`).
* **Failure** — any exception, ``KeyboardInterrupt`` and a full disk included: the temporary folder is removed and
  OUT is as before. A ``kill -9`` leaves only the hidden temporary folder, removed by the next claim of OUT.
* **Nesting.** Inside a private folder (the temporary folder of a run) ``run_folder`` writes in place: ``slug
  compare``'s SLUG run and ``slug demo --sequential``'s steps are committed with their parent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
from pathlib import Path

from .errors import check_flag
from .files import MANIFEST, final_path, fix_modes, kept_name, link_or_copy, read_manifest, unregister_staging
from .outguard import (TAG, edited_entries, foreign_entries, inspect_out, nested_foreign, write_manifest,
                       writer_of)
from .outlock import (Claim, RunLockedError, abandon_claims, abort, claim_out, finish, inputs_folder,
                      is_private, new_name, new_stage, pause_point, rmtree, signals_held)
from .text import printable

__all__ = ["RunLockedError", "abandon_claims", "claim_out", "inputs_folder", "is_private", "out_lock", "pause_point",
           "run_folder", "settle"]


@contextlib.contextmanager
def out_lock(out: str | os.PathLike, wait: bool = True):
    """Hold the lock on OUT for the block (waiting for another process by default), without touching OUT; a
    :func:`run_folder` inside the block uses it."""
    claim = claim_out(out, early=False, wait=wait)
    claim.released_by_run = False
    try:
        yield claim
    finally:
        with signals_held():
            abort(claim)
            finish(claim)


def settle(path: str | os.PathLike) -> None:
    """Before a command reads ``path`` (a run or patch folder, or a file in one): when the slug run that was writing
    the run folder it lies in (``path``, or one of its two parents) died unfinished (``kill -9``), repair that folder
    now, saying so. A run still writing it leaves it alone: the run there stays whole until the new one's commit."""
    p = Path(path)
    for folder in [p, *list(p.parents)[:2]]:
        if not folder.name or not (folder.parent / f".{folder.name}{TAG}lock").exists() or writer_of(folder):
            continue
        with contextlib.suppress(RunLockedError, ValueError, OSError):  # a folder no run may claim: nothing to repair
            with out_lock(folder, wait=False):
                pass


# --------------------------------------------------------------------------------------------------- commit
def _link_tree(s: Path, d: Path) -> None:
    if s.is_symlink():
        os.symlink(os.readlink(s), d)
    elif s.is_dir():
        d.mkdir()
        for entry in sorted(os.listdir(s)):
            _link_tree(s / entry, d / entry)
        shutil.copystat(s, d)
    else:
        link_or_copy(s, d)


def _start(claim: Claim, overwrite: bool, marker: str) -> Path:
    """The temporary folder for a run into OUT: made at an early claim (holding the caller's inputs), else now."""
    if claim.early and claim.stage is not None and not claim.stage_taken:
        claim.stage_taken = True
        claim.journal()  # no longer "waiting": the run has started
        return claim.stage
    if claim.stage is not None:
        raise RuntimeError(f"{claim.out} is already being written by this process")
    claim.replace_run = inspect_out(claim.out, claim.target, overwrite, marker) == "run"
    return new_stage(claim)


def _carry(src: Path, stage: Path, names: list[str], own: set[str]) -> tuple[list[str], list[str]]:
    """Link ``names`` of ``src`` (entries slug did not write) into the run: into their place, or, where the run wrote
    the same name, as ``NAME.before-slug`` (a user's own ``report.md`` or ``data/`` in --out). Returns (carried,
    kept under another name as ``"NAME as NEW"``)."""
    carried, renamed = [], []
    for entry in sorted(names, key=lambda e: e in own):  # the user's own names first: a new name never takes one
        if entry in own or os.path.lexists(stage / entry):
            new = kept_name(entry, stage, src)
            _link_tree(src / entry, stage / new)
            renamed.append(f"{entry} as {new}")
        else:
            _link_tree(src / entry, stage / entry)
            carried.append(entry)
    return carried, renamed


def _commit(claim: Claim) -> None:
    """Rename the temporary folder to OUT. The run's own entries are recorded first (:data:`MANIFEST`); then OUT is
    renamed away — from then on nothing can be written into it — and the entries it held that the run did not write
    are linked into the new folder: of a replaced run only those slug did not write (:func:`foreign_entries`) and
    its entries holding a user's file or edit, named on stderr (of a run folder without :data:`MANIFEST`, every
    entry: nothing tells its run's files from a user's); an entry of the user's with a name the run wrote is kept as
    ``NAME.before-slug``. The old folder is deleted once the new one is in place. (Listing OUT before the
    rename lost files written in between: sixth trial.)"""
    stage, target = claim.stage, claim.target
    own = set(os.listdir(stage))
    write_manifest(stage, sorted(own))
    fix_modes(stage)  # the run's files only: a carried file is a hard link, chmod would change the user's own file
    if claim.mode is not None:
        os.chmod(stage, claim.mode)
    kept, renamed, legacy = [], [], False
    if target.exists():
        claim.aside = new_name(target, ".old")
        claim.journal()
        os.rename(target, claim.aside)
        src, replaced = claim.aside, claim.replace_run
        # a run folder without MANIFEST (an older slugkit's, or a folder of yours holding a result.json): nothing
        # records which entries a run wrote, so every one is kept (a name the new run writes as NAME.before-slug)
        legacy = replaced and read_manifest(src) is None
        theirs = foreign_entries(src) if replaced and not legacy else os.listdir(src)
        if replaced:  # an entry of the old run holding a file the user put there or edited (even during this run):
            mine = {f.split("/")[0] for f in nested_foreign(src)} | set(edited_entries(src))  # kept whole
            theirs += sorted(mine - set(theirs))
        carried, renamed = _carry(src, stage, theirs, own)
        kept = carried  # named, also from a folder that held no run (world_config no longer curates into OUT)
    recreated = _rename_in(stage, target, own, kept, renamed)
    unregister_staging(stage)
    claim.stage, claim.committed = None, True
    claim.journal()
    for old in ([claim.aside] if claim.aside is not None else []) + recreated:
        rmtree(old)  # what the user wrote there is linked into the new OUT
    claim.aside = None
    if kept or renamed:
        names = [printable(n) for n in kept + renamed]  # a newline in a name broke the line
        what = ("everything the folder held, as it has no " + MANIFEST + " to tell a run's files from yours (an "
                "older slugkit's run, or a folder of yours; delete what you no longer need)" if legacy else
                "what slug did not write there")
        print(f"note: kept in {claim.out} {what}: {', '.join(names)}", file=sys.stderr)


def _rename_in(stage: Path, target: Path, own: set[str], kept: list, renamed: list) -> list[Path]:
    """Rename ``stage`` to ``target``. When something recreated OUT after it was renamed away (a logger's
    ``makedirs(OUT/data)``: the rename failed with "Directory not empty", the new run was discarded and the old one
    stranded in a hidden folder — seventh trial), that OUT is renamed away too, all of it carried in as the user's
    (added to ``kept``/``renamed``), and the rename tried again. Returns the folders renamed away this way."""
    away = []
    for attempt in range(5):
        try:
            os.rename(stage, target)
            return away
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == 4:
                raise
        away.append(new_name(target, ".old"))
        os.rename(target, away[-1])
        k, r = _carry(away[-1], stage, os.listdir(away[-1]), own)
        kept += k
        renamed += r
    return away


def _name_final(e: BaseException) -> None:
    """Make an OSError raised inside the temporary folder name the final path."""
    if isinstance(e, OSError):
        if e.filename is not None:
            e.filename = final_path(os.fsdecode(e.filename))
        if e.filename2 is not None:
            e.filename2 = final_path(os.fsdecode(e.filename2))


@contextlib.contextmanager
def run_folder(out: str | os.PathLike, overwrite: bool = False, marker: str = "result.json", *, wait: bool = False):
    """Yield a private temporary folder to write a whole run into; rename it to ``out`` when the block succeeds,
    remove it (and restore ``out``) when it fails. ``marker``: the file whose presence makes ``out`` a complete run
    (refused without ``overwrite``). Inside a private folder (:func:`is_private`) it yields ``out`` itself."""
    check_flag("overwrite", overwrite)
    out = Path(out)
    if is_private(out):
        yield out
        return
    claim = claim_out(out, early=False, wait=wait)
    try:
        stage = _start(claim, overwrite, marker)
    except BaseException:
        if claim.released_by_run:
            abort(claim)
            finish(claim)
        raise
    try:
        yield stage
        pause_point("commit")
        with signals_held():
            _commit(claim)
    except BaseException as e:
        _name_final(e)
        if claim.committed and isinstance(e, KeyboardInterrupt):  # held back during the commit, delivered after it
            print(f"note: {out} had been written whole when the interrupt came", file=sys.stderr)
        with signals_held():
            abort(claim)
            if claim.released_by_run:
                finish(claim)
        raise
    pause_point("committed")
    if claim.released_by_run:
        finish(claim)


