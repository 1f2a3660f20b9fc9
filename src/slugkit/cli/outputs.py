"""Where a CLI command may write: :mod:`slugkit.common.outputs`' checks re-exported (the Python API checks outputs
the same way), and :func:`out_file_taken` of `slug apply` / `revert`."""

import os
from pathlib import Path

from ..common.files import check_parents
from ..common.outputs import out_inside_model, out_inside_run

__all__ = ["out_file_taken", "out_inside_model", "out_inside_run"]


def out_file_taken(a) -> str | None:
    """`slug apply` / `revert` into a file (--model / --checkpoint): an existing ``--out`` is not replaced without
    --overwrite. Checked after the run-folder and patch-folder checks, where --overwrite would not help (it said
    "pass --overwrite", which then said "inside the patch": verification 66). Any ``--out`` under a file is refused
    here, naming that file (it said "FILE: File exists", the writer's mkdir: verification 67)."""
    if not a.out:
        return None
    try:
        check_parents(Path(a.out))
    except NotADirectoryError as e:
        return f"--out {a.out}: {e.filename} {e.strerror}; choose another --out"
    if a.pipeline or a.llava:
        return None
    if os.path.lexists(a.out) and not a.overwrite:  # a symbolic link too (dangling, or a loop: exists() is False)
        what = "is a symbolic link" if Path(a.out).is_symlink() else "already exists"
        return f"{a.out} {what}; pass --overwrite to replace it, or choose another --out"
    return None
