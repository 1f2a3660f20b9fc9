"""Does a caption name a concept? One rule for curation, the retain filter and the forget-caption check.

A caption names a concept when, after **both** are normalised by :func:`normalize_text`, the concept's name (or an
alias) occurs in it as whole words:

* normalisation: Unicode NFKC (composes decomposed letters, ``Zoe\\u0308`` → ``Zoë``; folds compatibility forms
  such as fullwidth letters and ligatures), apostrophe variants ``’ ʼ ‘ ` ´ ′ ＇`` → ``'``, dash variants
  ``‐ ‑ ‒ – — ― − ﹣ －`` → ``-``, invisible format characters (soft hyphen, zero-width joiners, BOM) removed,
  every run of Unicode whitespace (NBSP, thin and ideographic spaces, tabs, newlines) → one space, then
  ``casefold`` (``ß`` = ``ss``); accents are **not** folded away (``Zoe`` does not name ``Zoë``);
* in the name, ``_`` counts as a space (``Elon_Musk`` = ``Elon Musk``); in a caption ``_`` joins words, as in
  identifiers (``ann_lee`` does not name ``Ann Lee``);
* whole words: the match must not touch a letter, digit, ``_`` or combining mark on either side, so ``Ann`` does
  not name "Annual" (the official raw substring match does) and ``Zoë`` does not name ``Zoëy``.

For ASCII captions and names this is the earlier rule (case-insensitive, whole word, any whitespace run between
the words); the one ASCII difference is that a backtick now counts as an apostrophe.
"""

from __future__ import annotations

import re
import unicodedata

APOSTROPHES = "\u2019\u02bc\u2018`\u00b4\u2032\uff07\u201b"  # ’ ʼ ‘ ` ´ ′ ＇ ‛
DASHES = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe63\uff0d\u2043"  # ‐ ‑ ‒ – — ― − ﹣ － ⁃
_TRANSLATE = {**{ord(c): "'" for c in APOSTROPHES}, **{ord(c): "-" for c in DASHES}}
_SPACE = re.compile(r"\s+")
# Lookarounds of a whole-word match: letters, digits and _ (\w) and combining marks are parts of a word.
_WORDCHAR = r"\w\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"


def normalize_text(text: str) -> str:
    """``text`` normalised for concept matching (see the module docstring): NFKC, apostrophe and dash variants
    unified, format characters removed, whitespace runs → one space, casefolded; leading/trailing space stripped.

    Pure function of ``text``; never raises for a ``str``."""
    s = unicodedata.normalize("NFKC", text.translate(_TRANSLATE)).translate(_TRANSLATE)
    if not s.isascii():
        s = "".join(c for c in s if unicodedata.category(c) != "Cf")
    s = unicodedata.normalize("NFKC", s.casefold())
    return _SPACE.sub(" ", s).strip()


def concept_pattern(name: str, aliases: list[str] | tuple[str, ...] = ()) -> re.Pattern:
    """Whole-word regex for ``name`` or any alias, to be searched in :func:`normalize_text`-normalised captions
    (:func:`matches` / :func:`names_concept` do that). Names are normalised the same way; ``_`` in a name and runs
    of whitespace match any whitespace. Compiled case-insensitive, so it also finds plain ASCII spellings in raw
    captions. Raises ``ValueError`` when the name and every alias are empty."""
    terms = []
    for t in [name, *aliases]:
        words = [w for w in re.split(r"[\s_]+", normalize_text(t or "")) if w]
        if not words:
            continue
        terms.append(r"\s+".join(re.escape(w) for w in words))
    if not terms:
        raise ValueError("concept name is empty")
    return re.compile(rf"(?<![{_WORDCHAR}])(?:" + "|".join(terms) + rf")(?![{_WORDCHAR}])", re.IGNORECASE)


def variant_pattern(name: str, aliases: list[str] | tuple[str, ...] = ()) -> re.Pattern:
    """Regex for the spellings of ``name`` (or an alias) that :func:`concept_pattern` deliberately does not count as
    naming it, to be searched in :func:`normalize_text`-normalised captions: the words joined by ``-``, ``_``, ``.``,
    ``/``, ``\\``, ``+``, ``%20``/``%5F``/``%2D`` (URL-encoded space, ``_``, ``-``) or nothing (``Jowen-Gormere``,
    ``jowen_gormere.jpg``, ``#JowenGormere``, ``Jowen%20Gormere``); a letter may not come before the name, and for a
    one-word name not after it either (so ``Musk`` is not found in "muskrat"), while digits and, after a name of
    several words, letters may (``JowenGormere2024``, ``#JowenGormereFan``, ``IMG_jowengormere01.jpg``).
    ``slug curate`` keeps such captions out of the retain set (which must never name the concept) without putting
    them in the forget set (trials 17–19: they sat in retain.tar without a word). A caption that
    :func:`concept_pattern` matches also matches this one. Raises ``ValueError`` when the name and every alias are
    empty."""
    terms = []
    for t in [name, *aliases]:
        words = [w for w in re.split(r"[\s_]+", normalize_text(t or "")) if w]
        if words:
            after = "" if len(words) > 1 else r"(?![^\W\d_])"
            terms.append(r"(?:[\s\-_./+\\]|%20|%5f|%2d)*".join(re.escape(w) for w in words) + after)
    if not terms:
        raise ValueError("concept name is empty")
    return re.compile(r"(?<![^\W\d_])(?:" + "|".join(terms) + ")", re.IGNORECASE)


class ConceptMatcher:
    """The matching rule bound to one concept: ``ConceptMatcher("Elon Musk", ["Musk"]).matches(caption)``.

    ``pattern`` is :func:`concept_pattern` of the name and aliases; raises ``ValueError`` when all are empty."""

    def __init__(self, name: str, aliases: list[str] | tuple[str, ...] = ()):
        self.name, self.aliases = name, list(aliases)
        self.pattern = concept_pattern(name, self.aliases)

    def matches(self, caption: str) -> bool:
        """True when ``caption`` names the concept (whole words, after normalisation)."""
        return self.pattern.search(normalize_text(caption)) is not None

    __call__ = matches

    def mention_end(self, caption: str) -> int | None:
        """:func:`mention_end` of this concept in ``caption``."""
        return mention_end(caption, self.pattern)

    def __repr__(self) -> str:
        return f"ConceptMatcher({self.name!r}, {self.aliases!r})"


def names_concept(caption: str, concept: re.Pattern | ConceptMatcher | str) -> bool:
    """True when ``caption`` names ``concept``: a pattern from :func:`concept_pattern`, a :class:`ConceptMatcher`,
    or a plain name. The caption is normalised first; this is the rule ``slug curate`` splits forget from retain by.
    """
    if isinstance(concept, ConceptMatcher):
        return concept.matches(caption)
    if isinstance(concept, str):
        concept = concept_pattern(concept)
    return concept.search(normalize_text(caption)) is not None


def mention_end(caption: str, concept: re.Pattern | ConceptMatcher | str) -> int | None:
    """Offset in the **raw** ``caption`` just past the first mention of ``concept`` (``caption[:end]`` is the shortest
    prefix that still names it), or ``None`` when the caption does not name it. For checks on the raw text, e.g.
    whether a tokenizer's context still holds the name; ``pattern.search(raw_caption)`` would miss normalised forms.
    """
    if isinstance(concept, ConceptMatcher):
        concept = concept.pattern
    elif isinstance(concept, str):
        concept = concept_pattern(concept)
    m = concept.search(normalize_text(caption))
    if m is None:
        return None
    target = normalize_text(caption)[:m.end()]
    lo, hi = 1, len(caption)  # smallest k whose normalised prefix starts with the text up to the first mention
    while lo < hi:
        k = (lo + hi) // 2
        if normalize_text(caption[:k]).startswith(target):
            hi = k
        else:
            lo = k + 1
    return lo


def matches(caption: str, pattern: re.Pattern) -> bool:
    """:func:`names_concept` for a compiled :func:`concept_pattern` (kept for existing callers)."""
    return names_concept(caption, pattern)
