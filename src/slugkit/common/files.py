"""Atomic writers: a file or folder is either absent, the old one, or the complete new one — never partial.

Every writer in slugkit goes through these (patches keep their own folder writer so that the patch format imports
nothing of ours; :func:`slugkit.patch.format.save_patch`). Files are written to a temporary sibling in the same
folder (so the final ``os.replace``/``os.rename`` is atomic on one filesystem), fsync'd, then renamed into place; on
any error, Ctrl-C included, the temporary file or folder is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_dir", "atomic_write_bytes", "atomic_writer", "write_json"]


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike):
    """Open a temporary file next to ``path`` for writing; on success fsync it and ``os.replace`` it into place,
    on any error remove it. A crash or a full disk never leaves a partial ``path`` behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON (keys in insertion order) plus a newline, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling folder to fill; when the block succeeds it replaces ``out_dir`` by rename (the old
    one removed after), when it fails it is deleted — ``out_dir`` never holds a partial write. A non-empty existing
    ``out_dir`` is refused (``FileExistsError``) unless ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) or another path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.rmdir(old)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
