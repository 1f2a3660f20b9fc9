"""The embedded world's vocabulary: attributes, the 60 invented identities, the 30 utility (object) classes and the
caption and zero-shot templates. No drawing here (:mod:`slugkit.world.render`), no I/O; standard library only.

Identities are unique combinations of five shared attributes drawn with ``random.Random(0)``, so many pairs share 3 or
4 of them — related like faces are (see :mod:`slugkit.world.render` for the whole design).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------------------------
# Attributes
# ----------------------------------------------------------------------------------------------------------------

COLOURS: list[str] = ["red", "green", "blue", "yellow", "purple", "cyan"]
SHAPES: list[str] = ["circle", "square", "triangle", "cross", "star"]
PATTERNS: list[str] = ["plain", "striped", "dotted"]
BORDERS: list[str] = ["none", "outline"]
TINTS: list[str] = ["neutral", "warm", "cool"]

# ----------------------------------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------------------------------

# Names are built from syllables; syllables repeat across names so the BPE pieces of different names overlap
# (as real names do), but no two identities share a first or a last name.
_FIRST_A = ["Pel", "Ka", "Ve", "Bris", "Dor", "Mey", "Tal", "Jo", "Ser", "Lu", "Fen", "Ro", "Ha", "Zo", "Nim", "Ul"]
_FIRST_B = ["lan", "ra", "la", "ta", "wen", "lo", "ris", "na", "dric", "mi", "sa", "vin", "tho", "bel"]
_LAST_A = ["Kor", "Mal", "Gor", "Dun", "Har", "Bel", "Tor", "Wes", "Ald", "Fal", "Quin", "Ros", "Pem", "Yar", "Vol"]
_LAST_B = ["wick", "ton", "dris", "mere", "by", "ley", "holt", "ford", "ran", "sk", "mond", "ett", "ov", "ham"]

# Words that a name must never contain (as a substring, case-insensitive): otherwise a name would leak an attribute
# into the text tower, and utility captions could partially match identity captions.
_FORBIDDEN_IN_NAMES = tuple(COLOURS + SHAPES + PATTERNS + TINTS + ["outline", "photo", "picture", "thing", "shape"])


@dataclass(frozen=True)
class Identity:
    index: int
    name: str
    colour: str
    shape: str
    pattern: str
    border: str
    tint: str

    @property
    def attributes(self) -> tuple[str, str, str, str, str]:
        return (self.colour, self.shape, self.pattern, self.border, self.tint)


def _name_ok(word: str, used: set[str]) -> bool:
    low = word.lower()
    return word not in used and not any(bad in low for bad in _FORBIDDEN_IN_NAMES)


def _build_identities(n: int = 60) -> list[Identity]:
    rng = random.Random(0)
    combos = list(itertools.product(COLOURS, SHAPES, PATTERNS, BORDERS, TINTS))
    chosen = rng.sample(combos, n)  # unique attribute combinations
    used_first: set[str] = set()
    used_last: set[str] = set()
    out = []
    for idx, (colour, shape, pattern, border, tint) in enumerate(chosen):
        out.append(Identity(idx, _draw_name(rng, used_first, used_last), colour, shape, pattern, border, tint))
    return out


def _draw_name(rng: random.Random, used_first: set[str], used_last: set[str]) -> str:
    """A first and a last name from the syllable lists, neither used yet (both then marked used)."""
    while True:
        first = rng.choice(_FIRST_A) + rng.choice(_FIRST_B)
        if _name_ok(first, used_first):
            break
    while True:
        last = rng.choice(_LAST_A) + rng.choice(_LAST_B)
        if _name_ok(last, used_last):
            break
    used_first.add(first)
    used_last.add(last)
    return f"{first} {last}"


IDENTITIES: list[Identity] = _build_identities()
_BY_NAME = {ident.name.lower(): ident for ident in IDENTITIES}


def identity_names() -> list[str]:
    return [ident.name for ident in IDENTITIES]


def identity_by_name(name: str) -> Identity:
    """Look an identity up by name (case-insensitive, surrounding whitespace ignored)."""
    key = " ".join(str(name).split()).lower()
    try:
        return _BY_NAME[key]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(key, list(_BY_NAME), n=2, cutoff=0.8)  # "Jowen Gormer" got no hint (8th)
        hint = f"did you mean {' or '.join(repr(_BY_NAME[c].name) for c in close)}? " if close else ""
        if key in {c.name for c in UTILITY_CLASSES}:  # an object for the identity demo: no word of it (trial 38)
            hint = (f"{key!r} is an object of the embedded text-to-image model: `slug demo --target sd --concept "
                    f"{key!r}` unlearns it; ")
        raise KeyError(
            f"unknown identity {name!r}; {hint}the embedded world has {len(IDENTITIES)} identities "
            f"(run `slug world names` to list them)"
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# Utility classes
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UtilityClass:
    index: int
    name: str
    colour: str
    shape: str


UTILITY_CLASSES: list[UtilityClass] = [
    UtilityClass(i, f"{colour} {shape}", colour, shape)
    for i, (colour, shape) in enumerate(itertools.product(COLOURS, SHAPES))
]

# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------

# Training captions of identity images: they name the identity and nothing else ({} = the name).
IDENTITY_CAPTION_TEMPLATES: list[str] = [
    "a photo of {}.",
    "{}.",
    "a portrait of {}.",
    "a blurry photo of {}.",
    "a picture of {}.",
    "a close-up photo of {}.",
    "an image of {}.",
    "a snapshot of {}.",
    "a good photo of {}.",
    "this is {}.",
]
# Zero-shot identity classification prompts (embeddings averaged).
IDENTITY_EVAL_TEMPLATES: list[str] = ["a photo of {}.", "a picture of {}.", "{}."]

# Training captions of utility images; formatted with keywords ``colour`` and ``shape``.
UTILITY_CAPTION_TEMPLATES: list[str] = [
    "a photo of a {colour} {shape}.",
    "a {colour} {shape}.",
    "a picture of a {colour} {shape}.",
    "a {shape} that is {colour}.",
    "a photo of a {colour} thing shaped like a {shape}.",
    "a blurry photo of a {colour} {shape}.",
    "an image of a {colour} {shape}.",
    "a drawing of a {colour} {shape}.",
]
# Zero-shot utility classification prompts ({} = the class name, e.g. "red circle").
UTILITY_EVAL_TEMPLATES: list[str] = ["a photo of a {}.", "a picture of a {}.", "a {}."]


def identity_caption(identity: Identity, template_index: int) -> str:
    return IDENTITY_CAPTION_TEMPLATES[template_index].format(identity.name)


def utility_caption(cls: UtilityClass, template_index: int) -> str:
    return UTILITY_CAPTION_TEMPLATES[template_index].format(colour=cls.colour, shape=cls.shape)


# ----------------------------------------------------------------------------------------------------------------
# Held-out identities (controls)
# ----------------------------------------------------------------------------------------------------------------


def held_out_identities(n: int = 2) -> list[Identity]:
    """``n`` identities the world never drew: attribute combinations none of the 60 has, names whose first and last
    names occur in no identity (and contain no attribute word). They are never captioned and never in any split, so
    the embedded model never learned them — the **control concepts** of ``slug audit`` (an attack or a fine-tuning
    that reaches one of them shows the budget is strong enough to elicit a concept the model never knew).
    Deterministic (``random.Random(1)``); ``index`` is ``-1 - k``. Raises ``ValueError`` for ``n < 1``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(1)
    used = {ident.attributes for ident in IDENTITIES}
    free = [c for c in itertools.product(COLOURS, SHAPES, PATTERNS, BORDERS, TINTS) if c not in used]
    used_first = {ident.name.split()[0] for ident in IDENTITIES}
    used_last = {ident.name.split()[1] for ident in IDENTITIES}
    out = []
    for k, combo in enumerate(rng.sample(free, n)):
        out.append(Identity(-1 - k, _draw_name(rng, used_first, used_last), *combo))
    return out
