"""``slug inspect``: a patch, a LoRA `slug export` wrote, or a model folder `slug apply` wrote (its
``slugkit_patch.json``), described — every field of the untrusted files escaped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..common.text import printable


def say_found(given: str, flag: str) -> Path:
    """The patch folder ``given`` names (:func:`slugkit.patch.format.resolve_patch_dir`), with a note on stderr when
    it was found below ``given`` rather than at it or at ``given/patch`` (apply said so; inspect, export and audit
    used such a patch without a word)."""
    from ..patch.format import resolve_patch_dir

    found = resolve_patch_dir(given)
    if Path(given).is_dir() and found not in (Path(given), Path(given) / "patch"):  # found deeper: say which
        print(f"note: {flag} {printable(given)}: using the patch at {printable(found)}", file=sys.stderr)
    return found


def _provenance_of(folder: Path) -> tuple[Path, dict] | None:
    """``(file, record)`` of the ``slugkit_patch.json`` a patched model folder holds (at its top, in one of its
    sub-folders such as ``text_encoder/``, or — ``folder`` being that sub-folder — in its parent), when ``folder``
    holds no patch itself; else None. A record that is not one (truncated, empty, not an object) raises
    ``ValueError`` naming the file (it said "holds no patch.json": verify 45)."""
    if not folder.is_dir() or (folder / "patch.json").is_file() or (folder / "patch" / "patch.json").is_file():
        return None
    for f in [folder / "slugkit_patch.json", *sorted(folder.glob("*/slugkit_patch.json")),
              folder.parent / "slugkit_patch.json"]:
        if not f.is_file():
            continue
        try:
            rec = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{printable(str(f))}: the record of the patch slug applied here is not readable JSON "
                             f"({type(e).__name__}); re-run the slug apply that wrote this folder") from None
        if not isinstance(rec, dict) or "patch_fingerprint" not in rec:
            raise ValueError(f"{printable(str(f))}: the record of the patch slug applied here holds no "
                             "patch_fingerprint; re-run the slug apply that wrote this folder")
        return f, rec
    return None


def cmd_inspect(a) -> int:
    """`slug inspect`: describe a patch (or print its metadata as JSON). Fields of the untrusted ``patch.json`` are
    printed escaped: no control character reaches the terminal either way."""
    from ..patch import describe, load_patch

    if Path(a.patch).is_file() and Path(a.patch).suffix == ".safetensors" and not (
            Path(a.patch).parent / "patch.json").is_file():  # a LoRA `slug export` wrote (trial 39)
        from ..patch import PatchFormatError
        from ..patch.lora import read_lora
        from ..patch.summary import describe_lora

        try:
            _, meta = read_lora(a.patch)
        except (PatchFormatError, OSError, ValueError) as e:
            meta = None
            with open(a.patch, "rb") as f:  # a LoRA of ours, damaged (edited, truncated) was "a file, not a patch"
                if b'"slugkit-lora' in f.read(1 << 16):  # (trial 48): its header names it
                    print(f"error: {printable(a.patch)} is a LoRA slug wrote, damaged: {printable(str(e))}",
                          file=sys.stderr)
                    return 2
        if meta is not None:
            print(json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=True).replace("\x7f", "\\u007f")
                  if a.json else describe_lora(a.patch, meta))
            return 0
    written = _provenance_of(Path(a.patch))
    if written is not None:  # a model `slug apply` wrote: "not a patch" (trial 43)
        where, rec = written
        if a.json:
            print(json.dumps(rec, indent=2, sort_keys=True, ensure_ascii=True).replace("\x7f", "\\u007f"))
            return 0
        state = "reverted" if rec.get("reverted") else "applied"
        concept = rec.get("concept")
        source = rec.get("source")
        print(f"{printable(a.patch)} is a model slug wrote with a patch {state} ({printable(where)}): patch "
              f"{printable(str(rec.get('patch_fingerprint', '?'))[:12])} of "
              + (", ".join(printable(repr(c)) for c in concept) if isinstance(concept, list) and concept else
                 printable(repr(concept)) if concept else "an unnamed concept")  # a joint run's: not ['A', 'B']
              + (" (method layer-finetune: NOT SLUG, a fine-tune after SLUG's search refused)"
                 if rec.get("method") == "layer-finetune" else "")
              + f", {len(rec.get('tensors') or [])} tensor(s), written from "
              + (printable(str(source)) if source else "a model object (e.g. the embedded pipeline), not a folder")
              + (f"; {len(rec['earlier'])} earlier record(s) (--json)" if rec.get("earlier") else "")
              + ". Inspect the patch itself with slug inspect PATCH_FOLDER.")
        return 0
    p = load_patch(say_found(a.patch, "slug inspect"))
    if a.json:  # ASCII JSON: every control character (C0, C1) is a \uXXXX escape; DEL too
        print(json.dumps(p.meta, indent=2, sort_keys=True, ensure_ascii=True).replace("\x7f", "\\u007f"))
    else:
        print(describe(p))
    return 0
