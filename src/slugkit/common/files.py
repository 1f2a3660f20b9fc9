"""Atomic writers: a file or folder is either absent, the old one, or the complete new one — never partial.

Every writer in slugkit goes through these (patches keep their own folder writer so that the patch format imports
nothing of ours; :func:`slugkit.patch.format.save_patch`). Files are written to a temporary sibling in the same
folder (so the final ``os.replace``/``os.rename`` is atomic on one filesystem), fsync'd, then renamed into place; on
any error, Ctrl-C included, the temporary file or folder is removed. A whole run folder is assembled the same way,
under a lock: :mod:`slugkit.common.runfolder`.

**Modes.** ``mkstemp`` creates 0600 files and ``mkdtemp`` 0700 folders, and a rename keeps the mode; every file and
folder written here is given the mode a plain ``open()`` / ``mkdir()`` would have under the process's umask
(:func:`file_mode`, :func:`dir_mode`).

**Final paths.** While a run is assembled in a temporary folder (:func:`slugkit.common.runfolder.run_folder`), the
paths a run records must name the folder it will be renamed to. :func:`write_json` writes every string that names a
path inside a registered temporary folder with the final folder instead (:func:`final_paths`), so ``run.json``
reads ``runs/demo-X/data/forget.tar``, never ``runs/.demo-X.slug-k2j4.tmp/data/forget.tar``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from .errors import check_flag
from .text import printable

MANIFEST = ".slugkit-entries.json"  # the top-level entries slug wrote into an output folder (JSON: {"entries": [...]})

__all__ = ["MANIFEST", "atomic_dir", "atomic_write_bytes", "atomic_writer", "check_file_target", "check_folder_target",
           "check_parents", "check_replaceable", "current_umask", "dir_mode", "file_mode", "final_path", "final_paths",
           "fix_modes", "kept_name", "link_or_copy", "read_manifest", "register_staging", "unregister_staging",
           "write_json"]


# ------------------------------------------------------------------------------------------------------- modes
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status`` (Linux ≥ 4.7) without changing it; elsewhere by the
    ``os.umask(0); os.umask(old)`` round trip, which is racy across threads (a file another thread creates in that
    instant gets mode 0666/0777) — acceptable here: slugkit writes its outputs from one thread."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


def file_mode(executable: bool = False) -> int:
    """The mode ``open(path, "w")`` (or an executable file) gets under the current umask."""
    return (0o777 if executable else 0o666) & ~current_umask()


def dir_mode() -> int:
    """The mode ``os.mkdir`` gets under the current umask."""
    return 0o777 & ~current_umask()


def fix_modes(root: str | os.PathLike) -> None:
    """Give ``root`` and everything below it the modes a plain ``open()`` / ``mkdir()`` would have under the current
    umask (files keep their executable bit). For trees that were written through ``mkstemp``/``mkdtemp`` (0600/0700)
    by writers outside this module, e.g. a patch folder. Symbolic links are left alone."""
    root = Path(root)
    dmode, fmode, xmode = dir_mode(), file_mode(), file_mode(executable=True)
    if root.is_symlink() or not root.exists():
        return
    if not root.is_dir():
        os.chmod(root, xmode if os.stat(root).st_mode & 0o111 else fmode)
        return
    os.chmod(root, dmode)
    for base, dirs, files in os.walk(root):
        for d in dirs:
            p = os.path.join(base, d)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for name in files:
            p = os.path.join(base, name)
            if not os.path.islink(p):
                os.chmod(p, xmode if os.stat(p).st_mode & 0o111 else fmode)


# ------------------------------------------------------------------------------------------------- final paths
_STAGING: dict[str, str] = {}  # temporary folder name -> final folder name (siblings: same parent)
_STAGING_LOCK = threading.Lock()


def register_staging(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Record that the temporary folder ``tmp`` will be renamed to its sibling ``final`` (see :func:`final_paths`)."""
    with _STAGING_LOCK:
        _STAGING[Path(tmp).name] = Path(final).name


def unregister_staging(tmp: str | os.PathLike) -> None:
    with _STAGING_LOCK:
        _STAGING.pop(Path(tmp).name, None)


def final_path(path: str) -> str:
    """``path`` with every component that is a registered temporary folder replaced by its final name (the two are
    siblings, so the rest of the path is unchanged)."""
    with _STAGING_LOCK:
        names = dict(_STAGING)
    for tmp, final in names.items():
        if tmp in path:
            path = re.sub(r"(^|[/\\])" + re.escape(tmp) + r"(?=$|[/\\])", r"\g<1>" + final.replace("\\", r"\\"),
                          path)
    return path


def final_paths(obj):
    """``obj`` (JSON-like: dicts, lists, tuples, strings) with :func:`final_path` applied to every string value."""
    if not _STAGING:
        return obj
    if isinstance(obj, str):
        return final_path(obj)
    if isinstance(obj, dict):
        return {k: final_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(final_paths(v) for v in obj)
    return obj


# ------------------------------------------------------------------------------------------- output paths
def check_file_target(path: str | os.PathLike | None, hint: str = "expected a file") -> None:
    """Refuse, before any work, a file output ``path`` that is a folder (``IsADirectoryError``) or lies under a
    file (``NotADirectoryError``); both name the path (the CLI prints ``error: <path>: <reason>``). None: no output."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"is a folder; {hint}", str(p))
    check_parents(p)


def check_folder_target(path: str | os.PathLike, hint: str = "expected a folder") -> None:
    """Refuse, before any work, a folder output ``path`` that is a file or lies under one (``NotADirectoryError``)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"is not a folder; {hint}", str(p))
    check_parents(p)


def check_parents(p: Path) -> None:
    """Refuse an output ``p`` whose nearest existing ancestor is a file (``NotADirectoryError`` naming that file)."""
    parent = p.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"is a file, not a folder, so {p} cannot be created under it",
                                 str(parent))


# ----------------------------------------------------------------------------------------------------- writers
@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike):
    """Open a temporary file next to ``path`` for writing; on success fsync it and ``os.replace`` it into place,
    on any error remove it. A crash or a full disk never leaves a partial ``path`` behind. The file gets the mode
    ``open()`` would give it under the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a read-only folder: the error named the temporary file, not the --out given
        e.filename = str(path)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and (e.filename is None or e.filename == tmp):
            e.filename = str(path)  # "error: <path>: No space left on device" names the file being written
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON (keys in insertion order) plus a newline, written atomically; paths inside a run's
    temporary folder are written as their final paths (:func:`final_paths`)."""
    atomic_write_bytes(path, (json.dumps(final_paths(obj), indent=2, sort_keys=False) + "\n").encode())


def check_replaceable(out_dir: str | os.PathLike, overwrite: bool, marker: str | None = None) -> None:
    """Refuse (``FileExistsError``, naming the folder and what to do) a non-empty ``out_dir`` without ``overwrite``,
    and with it one that does not hold ``marker`` (the file slug writes into every folder of this kind): slug never
    deletes a folder it did not write (``slug apply --pipeline P --out ~/Documents --overwrite`` wiped the folder)."""
    check_flag("overwrite", overwrite)
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    foreign = marker is not None and not (out_dir / marker).is_file()
    if not overwrite and not foreign:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it (overwrite=True in "
                              "Python), or choose another --out")
    if foreign:  # refused with or without --overwrite (it advised --overwrite, then refused it: trial 43)
        names = sorted(os.listdir(out_dir))
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise FileExistsError(f"{out_dir} holds files slug did not write ({shown}; no {marker}); --overwrite "
                              "replaces only a folder slug wrote, so choose another path (or empty this one)")


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False, marker: str | None = None):
    """Yield a temporary sibling folder to fill; when the block succeeds it replaces ``out_dir`` by rename (the old
    one removed after), when it fails it is deleted — ``out_dir`` never holds a partial write. A non-empty existing
    ``out_dir`` is refused (``FileExistsError``, :func:`check_replaceable`) unless ``overwrite`` and, when ``marker``
    is given, it holds ``marker`` (slug wrote it). The new folder's tree gets the umask's modes; ``out_dir`` itself,
    when it existed as a folder, keeps its mode (e.g. 0700)."""
    if not os.fspath(out_dir).strip():  # "" meant ".": ". already exists and is not empty" (trial 30)
        raise ValueError("the output folder's path is empty; give a folder")
    check_flag("overwrite", overwrite)
    out_dir = Path(out_dir)
    if os.path.lexists(out_dir) and not out_dir.is_dir():  # a user's file was moved to a hidden .old (trial 26)
        raise FileExistsError(f"{out_dir} exists and is not a folder; a folder is written there: choose another "
                              "path, or remove that file first")
    check_replaceable(out_dir, overwrite, marker)
    made = [d for d in (out_dir.parent, *out_dir.parent.parents) if not d.exists()]  # deepest first
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    mode = os.stat(out_dir).st_mode & 0o7777 if out_dir.is_dir() else None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    except OSError as e:  # it named the hidden temporary folder (`/sys/.x.ddn6uufi.tmp`: trial 26), not the output
        raise OSError(e.errno, e.strerror, str(out_dir)) from None
    try:
        yield tmp
        own = sorted(os.listdir(tmp))
        (tmp / MANIFEST).write_text(json.dumps({"entries": sorted(own + [MANIFEST])}) + "\n", encoding="utf-8")
        kept = _keep_foreign(out_dir, tmp, own) if out_dir.is_dir() else []
        fix_modes(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.rmdir(old)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if kept:
            names = [printable(n) for n in kept]
            print(f"note: kept in {out_dir} what slug did not write there: {', '.join(names)}", file=sys.stderr)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made:  # the parents it created for OUT, if still empty (a failed apply left `wf/`: 23rd trial)
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _keep_foreign(old: Path, new: Path, own: list[str]) -> list[str]:
    """Carry the entries of the folder ``old`` that slug did not write (not in its :data:`MANIFEST`) into ``new``,
    hard-linked where possible; one named like an entry slug writes now is kept as ``NAME.before-slug``. In a folder
    without a manifest (``slug world train`` wrote none, nor did slug before the manifest) only the entries slug
    writes now (``own``) are replaced and every other one is kept: such a folder counted as all slug's, and
    ``slug world train-vlm --overwrite`` deleted a user's notes and another command's model beside its marker
    (fifteenth trial). Returns what was kept, as printed."""
    doc = read_manifest(old)
    written = set(doc["entries"]) if doc is not None else set(own) | {MANIFEST}
    kept, mine = [], sorted(set(os.listdir(old)) - written)
    for name in sorted(mine, key=lambda e: e in own):  # the user's names first: a new name never takes one
        dst = name if not os.path.lexists(new / name) else kept_name(name, new, old)
        if (old / name).is_dir() and not (old / name).is_symlink():
            shutil.copytree(old / name, new / dst, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(old / name, new / dst)
        kept.append(name if dst == name else f"{name} as {dst}")
    return kept


def read_manifest(folder: Path) -> dict | None:
    """``folder``'s :data:`MANIFEST` (``{"entries": [...], "files": [...] | None}``), or None when it has none or it
    is unreadable."""
    try:
        doc = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("entries"), list) else None


def kept_name(name: str, *folders: Path) -> str:
    """``NAME.before-slug`` (``-1``, ``-2`` … when taken in any of ``folders``): where a user's entry named like one
    slug writes is kept."""
    new, i = f"{name}.before-slug", 1
    while any(os.path.lexists(Path(f) / new) for f in folders):
        new, i = f"{name}.before-slug-{i}", i + 1
    return new


def link_or_copy(src, dst) -> None:
    """Hard-link ``src`` to ``dst`` (a symlink as itself), copying where links fail (another filesystem)."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
