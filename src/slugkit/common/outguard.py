"""What an output folder (``--out``) may be, checked before a run claims it, and which of its entries are a run's.

slug never deletes a file it did not write. Three checks keep that promise before any work
(:func:`refuse_unsafe_out`, called by :func:`slugkit.common.outlock.claim_out`):

* **Not inside another run.** An OUT inside another slug run's folder (``--out RUN/patch``) would be deleted with
  that run's outputs when RUN is replaced (``--overwrite``) — and replacing it would delete RUN's files. Refused, as
  is an OUT inside a folder another process is writing (its lock is held) or inside a run's temporary folder.
* **Not a mount point, and no mount point inside.** A run folder is put in place by a rename, which cannot replace
  a mount point (``EBUSY`` after all the work), and removing a replaced folder would walk into a filesystem mounted
  inside it. ``os.path.ismount`` misses a bind mount of the same filesystem, so Linux's ``/proc/self/mountinfo`` is
  read as well.
* **Not the current folder or one holding it** (it is renamed away).

**Whose entries.** A committed run folder records its own top-level entries, and the files inside its folders, in
:data:`MANIFEST` (``.slugkit-entries.json``; :func:`write_manifest`; files written into it later by slug, such as
``slug audit RUN``'s, are added: :func:`record_entries`). When a run replaces a run (``--overwrite``), the entries of
the old folder that slug did not write — a user's ``notes.txt`` — are carried into the new folder and named on
stderr (:func:`foreign_entries`); a user's file inside the old run's own folders refuses the ``--overwrite``
(:func:`nested_foreign`); an entry of the user's named like one the run writes is kept as ``NAME.before-slug``
(:mod:`slugkit.common.runfolder`). A run folder without a manifest (an older slugkit's, or a folder of the user's
that holds a ``result.json``) is still a run (refused without ``--overwrite``), but nothing records which of its
entries a run wrote, so ``--overwrite`` keeps every one of them (its ``report.md`` as ``report.md.before-slug``
beside the new run's): a user's ``data/`` beside their own ``result.json`` was deleted as a run's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import sys
from pathlib import Path

from .errors import OutputExistsError
from .files import MANIFEST, atomic_write_bytes, check_replaceable, read_manifest

__all__ = ["KNOWN_ENTRIES", "MANIFEST", "RUN_MARKERS", "TAG", "edited_entries", "foreign_entries", "inside_run",
           "inspect_out", "is_run", "lost_markers", "nested_foreign", "own_entries", "record_entries",
           "refuse_unsafe_out", "write_manifest", "writer_of"]

TAG = ".slug-"  # siblings of OUT: .<name>.slug-lock, .<name>.slug-XXXX.tmp (being written), .<name>.slug-XXXX.old
# the marker file of every slug command's run folder: a folder holding any of them is a run, whichever command asks
RUN_MARKERS = ("result.json", "compare.json", "canvas.json", "world.json", "curate.json")  # curate.json: trial 40
# what slug commands write at a run folder's top level (for folders from before MANIFEST); compare's method folders
KNOWN_ENTRIES = frozenset({
    "result.json", "report.md", "pareto.png", "layers.json", "run.json", "generations.png", "audit.json", "audit.md",
    "data", "patch", "compare.json", "compare.md", "tradeoff.png", "audit", "sequential", "joint", "slug", "ft", "ga",
    "gaft", "salun", "salun-rl", "ssd", "ssd-cumulative", "canvas.json", "canvas.md", "canvas.png", "world.json",
    "val", "test", "pool", "names.txt", "identity_templates.txt", "utility_templates.txt", "concepts.txt",
    "curate.json", "forget.tar", "retain.tar", "forget_manifest.json", "retain_manifest.json", MANIFEST})
# a marker alone could be anyone's result.json: a slug run also holds one of these (or the manifest)
_COMPANIONS = ("patch", "run.json", "compare.md", "canvas.md", "names.txt", MANIFEST)


def is_run(folder: Path) -> str | None:
    """The marker of the slug run that ``folder`` holds (a marker and a companion entry present), else None."""
    marker = next((m for m in RUN_MARKERS if (folder / m).is_file()), None)
    if marker is None or not any(os.path.lexists(folder / c) for c in _COMPANIONS):
        return None
    return marker


def _tree(folder: Path, entries) -> list[str]:
    """Everything inside the top-level folders ``entries`` of ``folder``, relative paths: files, symlinks (never
    followed) and empty folders (with a trailing ``/``)."""
    out = []
    for e in sorted(entries):
        top = folder / e
        if not top.is_dir() or top.is_symlink():
            continue
        for root, dirs, files in os.walk(top):
            rel = Path(root).relative_to(folder).as_posix()
            links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
            out += [f"{rel}/{n}" for n in sorted(files + links)]
            if not dirs and not files:
                out.append(rel + "/")
    return out


HASHED_UP_TO = 64 << 20  # bytes: files up to this size are stamped with their sha256 too


def _sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _stamps(folder: Path, paths, hashes: bool = False) -> dict[str, list]:
    """``{relative path: [size, mtime_ns]}`` of the regular files among ``paths`` (a link is not followed); with
    ``hashes``, ``[size, mtime_ns, sha256]`` for files up to :data:`HASHED_UP_TO` bytes."""
    out = {}
    for rel in paths:
        try:
            st = os.lstat(folder / rel)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            out[rel] = [st.st_size, st.st_mtime_ns]
            if hashes and st.st_size <= HASHED_UP_TO:
                out[rel].append(_sha256(folder / rel))
    return out


def _same(folder: Path, rel: str, now: list, then: list) -> bool:
    """Whether the file ``rel`` is as the run wrote it: same size and time, or same size and content (``cp -r``
    and ``touch`` change the time alone)."""
    if now[:2] == then[:2]:
        return True
    return len(then) > 2 and then[2] is not None and now[0] == then[0] and _sha256(folder / rel) == then[2]


def write_manifest(folder: Path, entries: list[str], max_files: int = 50_000) -> None:
    """Record ``entries`` (top-level names the run wrote) in ``folder/MANIFEST``, and everything inside those that
    are folders (:func:`_tree`; omitted beyond ``max_files``), with each file's size and modification time
    (``stamps``: a file the user edits later is told from the run's, :func:`edited_entries`)."""
    files = _tree(folder, entries)
    keep = len(files) <= max_files
    doc = {"entries": sorted(set(entries) | {MANIFEST}), "files": files if keep else None,
           "stamps": _stamps(folder, [*entries, *files], hashes=True) if keep else None}
    (folder / MANIFEST).write_text(json.dumps(doc) + "\n", encoding="utf-8")


def record_entries(folder: Path, names: list[str]) -> None:
    """Add ``names`` (written into a finished run folder afterwards, e.g. by ``slug audit RUN``; also files it
    rewrote, such as ``report.md``) to its manifest, with their current stamps, so a later ``--overwrite`` removes
    them with the run instead of carrying a stale audit into the new one. No-op for a folder without a manifest."""
    doc = read_manifest(folder)
    if doc is not None:
        doc["entries"] = sorted(set(doc["entries"]) | set(names))
        if isinstance(doc.get("stamps"), dict):
            doc["stamps"].update(_stamps(folder, names, hashes=True))
        atomic_write_bytes(folder / MANIFEST, (json.dumps(doc) + "\n").encode())


def edited_entries(folder: Path) -> list[str]:
    """Top-level entries of the run folder ``folder`` holding a file of the run's that was changed after the run
    wrote it (its size, or its time and content, differ from the manifest's stamp: a user's edit of ``report.md``;
    a run folder copied with ``cp -r`` has new times and the same content: not edited), sorted; [] for a run that
    recorded no stamps."""
    doc = read_manifest(folder)
    stamps = doc.get("stamps") if doc else None
    if not isinstance(stamps, dict):
        return []
    now = _stamps(folder, stamps)
    return sorted({rel.split("/")[0] for rel, st in now.items()
                   if not (isinstance(stamps[rel], list) and _same(folder, rel, st, stamps[rel]))})


def nested_foreign(folder: Path) -> list[str]:
    """Files inside the run's own folders (``patch/``, ``data/`` …) of the run folder ``folder`` that the run did not
    write (a user's note in ``patch/``), relative paths; [] when the run recorded no file list (older runs)."""
    doc = read_manifest(folder)
    if doc is None or not isinstance(doc.get("files"), list):
        return []
    files = set(doc["files"])
    return [f for f in _tree(folder, doc["entries"]) if f not in files]


def lost_markers(folder: Path, markers=RUN_MARKERS) -> list[str]:
    """The run markers (``markers``, default :data:`RUN_MARKERS`) that ``folder``'s :data:`MANIFEST` lists but that
    are gone: what is left of a slug run whose ``result.json`` was deleted. Judged a run, it is replaced only with
    ``--overwrite`` and its entries are told from the user's by the manifest (they were all kept as
    ``NAME.before-slug``: a user's files)."""
    doc = read_manifest(folder)
    listed = set() if doc is None else set(doc["entries"])
    return [m for m in markers if m in listed and not os.path.lexists(folder / m)]


def own_entries(folder: Path) -> set[str]:
    """The top-level names the run in ``folder`` wrote: its :data:`MANIFEST`, else :data:`KNOWN_ENTRIES`."""
    doc = read_manifest(folder)
    return set(KNOWN_ENTRIES) if doc is None else set(doc["entries"])


def foreign_entries(folder: Path) -> list[str]:
    """Top-level names in the run folder ``folder`` that no slug run wrote (a user's files), sorted."""
    own = own_entries(folder)
    return sorted(n for n in os.listdir(folder) if n not in own)


def inspect_out(out, target: Path, overwrite: bool, marker: str) -> str:
    """What OUT (``out`` as the user gave it, ``target`` the folder it names) holds: ``absent``, ``empty``, ``run``
    (``marker`` or another command's marker, :data:`RUN_MARKERS`, present — or gone from a folder whose manifest
    lists it, what is left of a run whose ``result.json`` was deleted — refused without ``overwrite``, replaced with
    it, the user's entries kept) or ``other``; a file is refused."""
    if not target.exists():
        return "absent"
    if not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder; choose another --out", str(out))
    if not any(target.iterdir()):
        return "empty"
    markers = tuple(dict.fromkeys((marker, *RUN_MARKERS)))
    found = [m for m in markers if (target / m).exists()]
    gone = [] if found else lost_markers(target, markers)
    if not (found or gone):
        return "other"
    if not overwrite:
        what = "a curated set" if (found or gone)[0] == "curate.json" else "a run"
        held = (f"already holds {what} ({found[0]} present)" if found else
                f"holds what is left of {what} slug wrote ({MANIFEST} lists {gone[0]}, which is gone)")
        raise OutputExistsError(f"{out} {held}; pass --overwrite (overwrite=True) to replace it (files slug did "
                                "not write are kept) or choose another --out")
    mine = nested_foreign(target)
    if mine:  # inside the run's own folders they would go with them; top-level ones are carried over
        raise OutputExistsError(f"{out} holds files slug did not write inside its run's folders "
                                f"({', '.join(mine[:5])}{' …' if len(mine) > 5 else ''}); --overwrite would delete "
                                "them with that run: move them out first")
    # `slug curate --out DEMO_RUN --overwrite` replaced a demo's run silently; a folder without MANIFEST is not
    # replaced but kept whole (runfolder's note says so; this one contradicted it, verification 56)
    if found and found[0] != marker and read_manifest(target) is not None:
        print(f"note: {out} holds another command's run ({found[0]}); --overwrite replaces it", file=sys.stderr)
    return "run"


# ------------------------------------------------------------------------------------------------ the checks
def _mount_points() -> list[str]:
    """Every mount point of this process's mount namespace (Linux ``/proc/self/mountinfo``; [] elsewhere)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:  # field 5: the mount point, with space, tab, newline, backslash as octal escapes
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def _mounts_at_or_below(real: str) -> list[str]:
    found = [m for m in _mount_points() if m == real or m.startswith(real.rstrip(os.sep) + os.sep)]
    if os.path.ismount(real) and real not in found:
        found.insert(0, real)
    return sorted(found)


def writer_of(folder: Path, own_locks: set[str] = frozenset()) -> str | None:
    """``pid N`` when another process holds the slug lock on ``folder`` (its lock file exists and is locked)."""
    import fcntl

    lock = folder.parent / f".{folder.name}{TAG}lock"
    if not lock.exists() or os.path.abspath(lock) in own_locks:
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        try:
            return f"pid {json.loads(os.pread(fd, 1 << 16, 0).decode()).get('pid', 'unknown')}"
        except (OSError, ValueError, AttributeError):
            return "pid unknown"
    finally:
        os.close(fd)


def inside_run(path: str | os.PathLike) -> tuple[Path, str] | None:
    """``(folder, marker)`` of the slug run folder that ``path`` lies strictly inside, or None (``slug audit`` and
    ``slug apply`` outputs: a file written into another run's folders refuses that run's ``--overwrite``)."""
    for a in Path(os.path.realpath(path)).parents:
        marker = is_run(a)
        if marker is not None:
            return a, marker
    return None


MODEL_MARKERS = ("train_report.json", "t2i_config.json", "canvas_config.json")  # what slug's trainers write


def check_model_out(out: str | os.PathLike, overwrite: bool, marker: str, kind: str | None = None) -> None:
    """Before a trainer's work (``slug world train | train-t2i | train-canvas | train-vlm --out``): refuse, with
    ``FileExistsError`` naming ``--out`` and what to do, a file, a slug run folder or a folder inside one (replacing
    the run would delete the model, and the model's folder would take the run's files), and a non-empty folder without
    ``overwrite`` or, with it, one without ``marker`` (:func:`slugkit.common.files.check_replaceable`) or without
    ``kind`` (the file that tells this trainer's model from another's: ``train-vlm --overwrite`` replaced a CLIP that
    ``slug world train`` wrote, as both write ``train_report.json``). They wrote into any folder, replacing a user's
    files without a word (fifteenth trial)."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder; give a folder for the model")
    marker_run = is_run(out) if out.is_dir() else None
    holder = (out, marker_run) if marker_run else inside_run(out)
    if holder is not None:
        raise FileExistsError(f"--out {out} is {'the' if holder[0] == out else 'inside the'} slug run folder "
                              f"{holder[0]} ({holder[1]}); write the model outside that run")
    mine = [m for m in (marker, kind) if m]
    other = [m for m in MODEL_MARKERS if (out / m).is_file()] if out.is_dir() else []
    if overwrite and other and any(not (out / m).is_file() for m in mine):  # said "files slug did not write"
        raise FileExistsError(f"--out {out} holds another model slug wrote ({', '.join(other)}; no "
                              f"{' / '.join(m for m in mine if not (out / m).is_file())}); --overwrite replaces only a "
                              "model of the same kind, so choose another --out")
    check_replaceable(out, overwrite, marker)
    package = Path(__file__).resolve().parents[1]
    real = Path(os.path.realpath(out))
    if overwrite and (real == package or package in real.parents) and out.is_dir() and any(out.iterdir()):
        print(f"note: --out {out} is inside the slugkit package: this replaces the model slugkit ships (reinstall "
              "slugkit, or `git checkout` it in a checkout, to restore it)", file=sys.stderr)


def runs_below(folder: Path, depth: int = 3, budget: int = 2000) -> list[str]:
    """Run folders at most ``depth`` levels below ``folder`` (``a``, ``2024/a``), sorted; at most ``budget`` folders
    are looked at (a large tree is not walked whole); symbolic links, hidden folders and runs are not entered."""
    found, level = [], [(folder, "")]
    for _ in range(depth):
        below = []
        for d, rel in level:
            try:
                names = sorted(e.name for e in os.scandir(d) if e.is_dir(follow_symlinks=False))
            except OSError:
                continue
            for n in names[:max(budget, 0)]:
                budget -= 1
                if is_run(d / n):
                    found.append(f"{rel}{n}")
                elif not n.startswith("."):  # not into .git, nor a run's temporary folder
                    below.append((d / n, f"{rel}{n}/"))
        level = below
    return sorted(found)


def refuse_unsafe_out(out: Path, target: Path, own_locks: set[str] = frozenset()) -> None:
    """Raise ``ValueError`` (naming ``out`` and what to do) when ``target`` (OUT, or what an OUT symlink points to)
    is the current folder or holds it, is or holds a mount point, or lies inside another slug run's folder, inside a
    folder another slug process is writing, or inside a run's temporary folder. ``own_locks``: lock files this
    process holds (its own nested runs are not refused)."""
    real = os.path.realpath(target)
    here = os.path.realpath(os.getcwd())
    if here == real or here.startswith(real.rstrip(os.sep) + os.sep):
        raise ValueError(f"{out}: is the current folder or holds it; a run folder is put in place by a rename, so "
                         "choose a new folder (e.g. runs/NAME)")
    mounts = _mounts_at_or_below(real)
    if real in mounts:
        raise ValueError(f"{out}: is a mount point; a run folder is put in place by a rename, which cannot replace a "
                         f"mount point, so choose a folder inside it (e.g. {out / 'run'})")
    if mounts and os.path.isdir(real):
        raise ValueError(f"{out}: holds a mount point ({mounts[0]}); replacing the folder would remove files of the "
                         "filesystem mounted there, so choose another --out (or unmount it)")
    if os.fspath(out).startswith("~") and not os.path.lexists(out):  # quoted: the shell did not expand it
        raise ValueError(f"{out}: starts with '~', which the shell did not expand (was it quoted?); slug would make a "
                         f"folder named '~' here: write the path out, e.g. {os.path.expanduser(os.fspath(out))}")
    home = real == os.path.realpath(os.path.expanduser("~"))
    if home or os.path.lexists(os.path.join(real, ".git")):  # .git: a folder, or a file in a worktree
        inside = Path(os.path.normpath(out)) / "runs" / "NAME"  # not ~/.cache/../runs/NAME
        raise ValueError(f"{out}: is {'your home folder' if home else 'a git repository'}; a run folder's outputs "
                         f"would mix with its files: choose a new folder inside it (e.g. {inside})")
    if os.path.isdir(real) and is_run(Path(real)) is None:
        runs = runs_below(Path(real))
        if runs:  # the new run would take them in as "files slug did not write"
            raise ValueError(f"{out}: holds slug run folders ({', '.join(runs[:3])}{', …' if len(runs) > 3 else ''});"
                             f" a run folder of its own is needed: choose a new one (e.g. {out / 'NAME'})")
    holder = inside_run(real)
    if holder is not None:
        raise ValueError(f"{out}: is inside the slug run folder {holder[0]} ({holder[1]} present); a run folder cannot "
                         f"hold another run's outputs: choose a folder outside {holder[0]}")
    for a in Path(real).parents:
        if a.name.startswith(".") and TAG in a.name and a.name.endswith((".tmp", ".old")):
            raise ValueError(f"{out}: is inside {a}, a slug run's temporary folder; choose another --out")
        writer = writer_of(a, own_locks)
        if writer is not None:
            raise ValueError(f"{out}: is inside {a}, which another slug run is writing ({writer}); wait for it "
                             "and choose a folder outside it")
