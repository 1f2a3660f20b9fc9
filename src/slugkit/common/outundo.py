"""Putting an output folder (``--out``) back after an unfinished run, without deleting what slug did not write.

Today a run writes only into its temporary folder until the commit renames it into place
(:mod:`slugkit.common.runfolder`), so undoing it is: remove the temporary folder, and put the old folder back if the
commit had renamed it away (:func:`undo_out` with ``owns_target`` False). A lock left by an older slugkit, whose
early claim moved OUT aside and wrote the run's inputs into OUT itself (journal ``owns_target``), is repaired by
removing only the entries that run wrote — those its journal lists (``entries``), or else the names slug writes
(:data:`~.outguard.KNOWN_ENTRIES`, ``slug demo --sequential``'s ``N-Name`` step folders) — and keeping the rest: a
file the user put into OUT meanwhile is moved into the previous folder when that is put back (the previous version
of the same name kept as ``NAME.before-slug``), and named on stderr.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .files import kept_name
from .outguard import KNOWN_ENTRIES, TAG
from .text import printable

__all__ = ["own_names", "rmtree", "siblings", "tidy", "undo_out"]

_STEP_FOLDER = re.compile(r"^[0-9]+-")  # `slug demo --sequential`'s OUT/1-Name, OUT/2-Name ...


def rmtree(path: Path) -> None:
    """Remove ``path``: a file or symlink (never followed), or a folder and everything in it."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def siblings(target: Path, suffix: str) -> list[Path]:
    """slug's folders next to ``target`` ending in ``suffix`` (``.tmp``: being written; ``.old``: moved aside)."""
    prefix = f".{target.name}{TAG}"
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return [target.parent / n for n in names if n.startswith(prefix) and n.endswith(suffix)]


def own_names(doc: dict, names: list[str]) -> set[str]:
    """Which of ``names`` (entries of OUT) the run whose journal is ``doc`` wrote: its recorded ``entries``; for a
    journal without them, the names slug writes."""
    if isinstance(doc.get("entries"), list):
        return set(doc["entries"]) & set(names)
    return {n for n in names if n in KNOWN_ENTRIES or _STEP_FOLDER.match(n)}


def _shown(name: str) -> str:
    return printable(name)


def undo_out(target: Path, own: set[str], aside: Path | None, was_empty_dir: bool, owns_target: bool
             ) -> tuple[list[str], list[str]]:
    """Put OUT (``target``) back as it was before an unfinished run: the run's entries ``own`` removed (when it
    ``owns_target``), the previous folder ``aside`` renamed back, the entries slug did not write kept — moved into
    the previous folder when there is one (its own entry of the same name is renamed ``NAME.before-slug``), else left
    in OUT. Returns (what was done, the entries kept, printable). Safe to repeat."""
    done, kept = [], []
    if owns_target and target.is_dir() and not target.is_symlink():
        names = sorted(os.listdir(target))
        mine = [n for n in names if n in own]
        for n in mine:
            rmtree(target / n)
        if mine:
            done.append("removed its partial output")
        foreign = [n for n in names if n not in own]
        if foreign and aside is not None and aside.is_dir():
            for n in foreign:
                if os.path.lexists(aside / n):  # the previous version keeps the name "from before slug"
                    old = kept_name(n, aside, target)
                    os.rename(aside / n, aside / old)
                    kept.append(f"{_shown(n)} (the previous one as {_shown(old)})")
                else:
                    kept.append(_shown(n))
                os.rename(target / n, aside / n)
        else:
            kept = [_shown(n) for n in foreign]
        if not os.listdir(target) and ((aside is not None and aside.exists()) or not was_empty_dir):
            os.rmdir(target)
    if aside is not None and aside.exists() and not os.path.lexists(target):
        os.rename(aside, target)
        done.append("put the previous folder back")
    return done, kept


def tidy(target: Path, out) -> None:
    """When a claim of OUT finds no record of an unfinished run: remove leftover temporary folders, and name any
    ``.old`` folder next to OUT (a previous OUT that could not be put back) instead of leaving it unmentioned."""
    import sys

    for stale in siblings(target, ".tmp"):
        rmtree(stale)
    left = sorted(p.name for p in siblings(target, ".old"))
    if left:
        print(f"note: next to {out} is {', '.join(left)}, a previous {out} slug could not put back; left alone: "
              "look inside (your files may be there) before deleting it", file=sys.stderr)

