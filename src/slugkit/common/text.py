"""Text from untrusted places (file names, ``patch.json`` fields, ``--out``) made safe to print on one line.

A concept such as ``"\\x1b[2J\\r\\nbase model: evil"`` or a file name with a newline would clear the terminal, fake
a line or split one. :func:`printable` writes control characters (C0, DEL, C1), Unicode format characters (bidi
overrides, zero-width marks), surrogates and line/paragraph separators as escapes (``\\x1b``, ``\\r``, ``\\n``,
``\\u202e``); everything else, accented letters included, is printed as is (``ascii()`` escaped those too).
"""

from __future__ import annotations

import unicodedata

__all__ = ["did_you_mean", "printable"]

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPED = ("Cc", "Cf", "Cs", "Zl", "Zp")  # controls, format characters, surrogates, line/paragraph separators


def _escape(c: str) -> str:
    if c in _SHORT:
        return _SHORT[c]
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else (f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")


def printable(value) -> str:
    """``str(value)`` with every character that can move the cursor, recolour or reorder a terminal line escaped
    (see the module docstring). Never raises."""
    s = value if isinstance(value, str) else str(value)
    if s.isprintable():
        return s
    return "".join(_escape(c) if unicodedata.category(c) in _ESCAPED else c for c in s)


def did_you_mean(name: str, known, cutoff: float = 0.7) -> str:
    """``"did you mean 'harley'? "`` for the closest of ``known`` to ``name`` (case aside, :mod:`difflib`), else
    ``""``: the hint of a refused name (`--targets Harley`, `--styles van_gogh` got none; trials 38, 40)."""
    import difflib

    lower = {str(k).lower(): k for k in known}
    close = difflib.get_close_matches(str(name).lower(), list(lower), n=1, cutoff=cutoff)
    return f"did you mean {lower[close[0]]!r}? " if close else ""


def group_label(entry: dict, short: bool = True) -> str:
    """Every tensor of a searched or tried entry (``{"layer", "group"?}``), ``" + "``-joined — an MLP group was named
    by its first tensor in a refusal's "closest" and the reports' tables (verification 64); ``short``: without the
    text tower's ``text_model.encoder.`` prefix, as the refusals write names."""
    names = entry.get("group") or [entry["layer"]]
    return " + ".join(n.removeprefix("text_model.encoder.") if short else n for n in names)
