"""Checks of a file or folder output (``--out`` of ``slug apply/export/grads/audit``, a run's folder, ``out`` of
``slugkit.unlearn`` and ``audit_patch``) before any work; the text names the output as the CLI does (``--out``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["out_inside_model", "out_inside_run"]


def out_inside_run(out) -> str | None:
    """A file output (``slug apply/export/grads/audit --out``) starting with an unexpanded ``~``, inside another slug
    run's folder (it mixes with that run, whose next ``--overwrite`` refuses it), or at or inside a folder another slug
    run is writing (it would be replaced with it); the refusal text, or None."""
    from .outguard import inside_run, writer_of

    if out and os.fspath(out).startswith("~") and not os.path.lexists(out):  # quoted: the shell did not expand it
        return f"--out {out}: starts with '~', which the shell did not expand; write it out ({os.path.expanduser(out)})"
    holder = inside_run(out) if out else None
    if holder is not None:
        return f"--out {out} is inside the run folder {holder[0]}; write it outside that run"
    for d in (Path(out), *Path(os.path.realpath(out)).parents) if out else ():  # about to be replaced by that run
        writer = writer_of(d)
        if writer:
            return f"--out {out}: another slug run is writing {d} ({writer}); wait for it or write elsewhere"
    return None


def out_inside_model(out, models: dict[str, str | None]) -> str | None:
    """A run folder ``out`` inside the slugkit package (the shipped models' folders) or inside one of ``models``
    (``{"--vlm-model": DIR, ...}``, None entries skipped): the refusal text, or None. `slug demo --target vlm --out
    MODEL/run` wrote a run into the VLM folder it read, the package's own assets too (trial 26), while `slug apply`
    and `slug eval-sd` refuse such an --out."""
    if not out:
        return None
    real = os.path.realpath(out)
    places = {"the slugkit package": Path(__file__).resolve().parents[1], **{f"{flag} {d}": Path(d) for flag, d in
                                                                     models.items() if d}}
    for what, d in places.items():
        folder = os.path.realpath(d)
        if real == folder or real.startswith(folder + os.sep):
            return f"--out {out} is inside {what} ({folder}), whose files it would mix with; write the run elsewhere"
    return None
