"""Checks of a file or folder output (``--out`` of ``slug apply/export/grads/audit``, a run's folder, ``out`` of
``slugkit.unlearn`` and ``audit_patch``) before any work; the text names the output as the CLI does (``--out``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["out_inside_model", "out_inside_run", "patch_out_refusal"]


def out_inside_run(out, flag: str = "--out") -> str | None:
    """A file output (``slug apply/export/grads/audit --out``) starting with an unexpanded ``~``, inside another slug
    run's folder (it mixes with that run, whose next ``--overwrite`` refuses it), or at or inside a folder another slug
    run is writing (it would be replaced with it); the refusal text, or None. ``flag``: how the text names the
    output (a Python function's argument as ``"path (--out)"``; the CLI says ``--out``)."""
    from .outguard import inside_run, writer_of

    if out and os.fspath(out).startswith("~") and not os.path.lexists(out):  # quoted: the shell did not expand it
        return (f"{flag} {out}: starts with '~', which the shell did not expand; write it out "
                f"({os.path.expanduser(out)})")
    holder = inside_run(out) if out else None
    if holder is not None:
        return f"{flag} {out} is inside the run folder {holder[0]}; write it outside that run"
    for d in (Path(out), *Path(os.path.realpath(out)).parents) if out else ():  # about to be replaced by that run
        writer = writer_of(d)
        if writer:
            return f"{flag} {out}: another slug run is writing {d} ({writer}); wait for it or write elsewhere"
    return None


def out_inside_model(out, models: dict[str, str | None], flag: str = "--out") -> str | None:
    """A run folder ``out`` inside the slugkit package (the shipped models' folders) or inside one of ``models``
    (``{"--vlm-model": DIR, ...}``, None entries skipped): the refusal text, or None. `slug demo --target vlm --out
    MODEL/run` wrote a run into the VLM folder it read, the package's own assets too (trial 26), while `slug apply`
    and `slug eval-sd` refuse such an --out. ``flag``: as for :func:`out_inside_run`."""
    if not out:
        return None
    real = os.path.realpath(out)
    places = {"the slugkit package": Path(__file__).resolve().parents[1], **{f"{flag} {d}": Path(d) for flag, d in
                                                                     models.items() if d}}
    for what, d in places.items():
        folder = os.path.realpath(d)
        if real == folder or real.startswith(folder + os.sep):
            return f"{flag} {out} is inside {what} ({folder}), whose files it would mix with; write it elsewhere"
    return None


def patch_out_refusal(out_dir, flag: str = "out_dir (--out)") -> str | None:
    """A patch folder ``out_dir`` (:func:`slugkit.patch.save_patch`) inside the slugkit package, inside (or being)
    a slug run's folder — ``RUN/patch`` with ``overwrite=True`` replaced the run's own patch under its
    ``result.json`` — or another run's folder being written: the refusal text, or None. A folder inside this
    process's own run being written (its temporary folder) is the run's to write."""
    from .outguard import is_run
    from .outlock import is_private

    if is_private(out_dir):
        return None
    if Path(out_dir).is_dir() and is_run(Path(out_dir)):  # the run's root: "overwrite" pointed at deleting the run
        return f"{flag} {out_dir} is a run folder; write the patch into a folder of its own"
    return out_inside_model(out_dir, {}, flag) or out_inside_run(out_dir, flag)
