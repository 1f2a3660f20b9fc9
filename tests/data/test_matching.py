"""Unicode-normalised whole-word concept matching (trust case D2), and curate's forget/retain split built on it."""

import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from slugkit.data.curate import concept_pattern, curate, matches
from slugkit.data.shards import iter_samples, write_shard

NAME = "Zoë O'Brien-Łukasz"
NFD = unicodedata.normalize("NFD", NAME)


@pytest.mark.parametrize("caption", [
    f"a photo of {NFD}",                               # decomposed ë
    "a photo of Zoë O’Brien-Łukasz",                   # curly apostrophe
    "Zoë Oʼ Brien-Łukasz".replace("ʼ ", "ʼ"),          # modifier letter apostrophe
    "Zoë O‘Brien-Łukasz", "Zoë O`Brien-Łukasz", "Zoë O´Brien-Łukasz",
    "Zoë O'Brien–Łukasz", "Zoë O'Brien—Łukasz", "Zoë O'Brien‐Łukasz", "Zoë O'Brien‑Łukasz",
    "Zoë O'Brien‒Łukasz", "Zoë O'Brien−Łukasz",
    "Zoë\u00a0O'Brien-Łukasz", "Zoë\u2009O'Brien-Łukasz", "Zoë\u3000O'Brien-Łukasz", "Zoë \t O'Brien-Łukasz",
    "ZOË O’BRIEN-ŁUKASZ", "zoë o'brien-łukasz's dog", "(Zoë O'Brien-Łukasz)", "«Zoë O’Brien–Łukasz»",
    "Ｚｏë O'Brien-Łukasz",                              # fullwidth letters (NFKC)
    unicodedata.normalize("NFD", "ZOË O’BRIEN—ŁUKASZ."),
])
def test_unicode_variants_of_the_name_match(caption):
    assert matches(caption, concept_pattern(NAME))
    assert matches(caption, concept_pattern(NFD))  # the name itself may come decomposed
    assert matches(caption, concept_pattern("Zoë O’Brien‐Łukasz"))


@pytest.mark.parametrize("caption", [
    "Zoëy O'Brien-Łukasz", "Zoë O'Brien-Łukaszewicz", "xZoë O'Brien-Łukasz", "Zoë OBrien-Łukasz",
    "Zoe O'Brien-Lukasz",  # accents are not folded away
    unicodedata.normalize("NFD", "Zoë O'Brien-Łukasz") + "\u0301",  # a combining mark extends the last letter
])
def test_other_words_do_not_match(caption):
    assert not matches(caption, concept_pattern(NAME))


def test_public_rule_is_the_same_everywhere():
    from slugkit.data.curate import ConceptMatcher, names_concept, normalize_text

    m = ConceptMatcher(NAME, ["Zoë"])
    assert m.matches(f"{NFD}") and m.matches("ZOË.") and not m.matches("Zoëy")
    assert names_concept("Zoë O’Brien–Łukasz", concept_pattern(NAME))
    assert names_concept("Zoë O’Brien–Łukasz", m) and names_concept("zoë", "Zoë")
    assert normalize_text("A\u00a0B’C—D_E") == "a b'c-d_e"
    for c in ["a photo of Ann Lee.", "ANN LEE", "ann_lee", "Annual Leeds", "Ann  Lee", "Lee, Ann"]:
        assert matches(c, concept_pattern("Ann_Lee")) == (concept_pattern("Ann_Lee").search(c) is not None)


def _img(v):
    return Image.fromarray(np.full((4, 4, 3), v % 256, dtype=np.uint8))


def test_curate_puts_unicode_variants_into_the_forget_set(tmp_path):
    """The D2 example: NFD and a curly apostrophe used to land in the retain set."""
    caps = [f"a photo of {NFD}", "a photo of Zoë O’Brien-Łukasz", "a dog", "a red circle"]
    write_shard(tmp_path / "p.tar", [(f"s{i}", _img(i), c) for i, c in enumerate(caps)])
    s = curate(str(tmp_path / "p.tar"), NAME, tmp_path / "out")
    assert s["forget"] == 2
    assert [r.caption for r in iter_samples(str(tmp_path / "out" / "retain.tar"))] == ["a dog", "a red circle"]


# ---------------------------------------------------------------------------------------- property: curate split
LETTERS = "abcdefghijklmnoprstuvwyzéëłøñåüçß"
APOSTROPHES = ["'", "’", "ʼ", "‘", "`", "´", "＇"]
DASHES = ["-", "‐", "‑", "‒", "–", "—", "−", "－"]
SPACES = [" ", "\u00a0", "\u2009", "\u3000", "\t", "  ", "\u202f", "\n"]
WRAPS = [("", ""), ("(", ")"), ("«", "»"), ("“", "”"), ("‘", "’"), ("", "."), ("", "'s"), ("", "’s"), ("#", "!"),
         ("[", "],"), ("", ":"), ("¿", "?")]

word = st.text(LETTERS, min_size=2, max_size=6)
part = st.lists(word, min_size=1, max_size=2)  # words joined inside a part by ' or -


@st.composite
def names(draw):
    parts = draw(st.lists(st.tuples(part, st.sampled_from(["'", "-"])), min_size=1, max_size=3))
    return " ".join(j.join(ws) for ws, j in parts)


@st.composite
def spelling(draw, name):
    """The name as someone may have typed it: per-character case and normal form, punctuation variants."""
    out = []
    for ch in name:
        if ch == "'":
            out.append(draw(st.sampled_from(APOSTROPHES)))
        elif ch == "-":
            out.append(draw(st.sampled_from(DASHES)))
        elif ch == " ":
            out.append(draw(st.sampled_from(SPACES)))
        else:
            ch = draw(st.sampled_from([ch, ch.upper(), ch.lower()]))
            out.append(unicodedata.normalize(draw(st.sampled_from(["NFC", "NFD"])), ch))
    return "".join(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_curate_never_writes_a_caption_naming_the_concept_into_retain(tmp_path_factory, data):
    name = data.draw(names(), label="name")
    query = data.draw(spelling(name), label="name as given to curate")
    captions, named = [], []
    for i in range(data.draw(st.integers(1, 4))):  # captions naming the concept
        pre, post = data.draw(st.sampled_from(WRAPS))
        lead = data.draw(st.sampled_from(["фото ", "", "портрет: ", "我和 "]))  # fillers share no word with a name
        captions.append(f"{lead}{pre}{data.draw(spelling(name))}{post}{data.draw(st.sampled_from(['', ' 2024']))}")
        named.append(True)
    for i in range(data.draw(st.integers(1, 4))):  # captions that contain the name only inside longer words
        extra = data.draw(st.text(LETTERS, min_size=1, max_size=3))
        glued = f"{extra}{data.draw(spelling(name))}" if i % 2 else f"{data.draw(spelling(name))}{extra}"
        captions.append(f"фото {glued} и собака")
        named.append(False)
    order = data.draw(st.permutations(range(len(captions))))
    captions, named = [captions[j] for j in order], [named[j] for j in order]
    tmp = tmp_path_factory.mktemp("prop")
    write_shard(tmp / "p.tar", [(f"s{i}", _img(i), c) for i, c in enumerate(captions)], image_ext="png")
    summary = curate(str(tmp / "p.tar"), query, tmp / "out")
    forget = [f.caption for f in iter_samples(str(tmp / "out" / "forget.tar"), decode=False)]
    retain = [r.caption for r in iter_samples(str(tmp / "out" / "retain.tar"), decode=False)] \
        if (tmp / "out" / "retain.tar").exists() else []
    assert forget == [c for c, n in zip(captions, named) if n]  # stream order
    # the name glued to letters after it ("…Fan") is kept out of both sets as a variant spelling, never in forget
    assert set(retain) <= {c for c, n in zip(captions, named) if not n}
    assert len(retain) + summary["variant_spellings"]["excluded_from_retain"] == named.count(False)


@pytest.mark.parametrize("caption,end", [
    ("a photo of Ann Lee at the beach", len("a photo of Ann Lee")),
    ("a photo of ANN\u00a0LEE’s dog", len("a photo of ANN\u00a0LEE")),
    (unicodedata.normalize("NFD", "é Ann Lee and Ann Lee"), len(unicodedata.normalize("NFD", "é Ann Lee"))),
    ("Annual Leeds", None),
])
def test_mention_end_is_an_offset_in_the_raw_caption(caption, end):
    from slugkit.data.curate import ConceptMatcher
    from slugkit.data.matching import mention_end

    assert mention_end(caption, concept_pattern("Ann Lee")) == end == ConceptMatcher("Ann Lee").mention_end(caption)
    if end is not None:
        assert matches(caption[:end], concept_pattern("Ann Lee")) and not matches(caption[:end - 1],
                                                                                concept_pattern("Ann Lee"))


# ------------------------------------------------------------------------------- ASCII: the rule as it was before
def _old_rule(name, aliases=()):
    import re

    terms = [r"\s+".join(re.escape(w) for w in re.split(r"[\s_]+", t.strip()) if w) for t in [name, *aliases]]
    return re.compile(r"(?<!\w)(?:" + "|".join(t for t in terms if t) + r")(?!\w)", re.IGNORECASE)


ASCII = "abAB '-_.,;!?()\t\n01"


@settings(max_examples=300, deadline=None)
@given(name=st.text(ASCII, min_size=1, max_size=8).filter(lambda n: any(c.isalnum() for c in n)),
       caption=st.text(ASCII, max_size=30))
def test_ascii_captions_match_as_before(name, caption):
    """Normalisation changes nothing for ASCII (the backtick, now an apostrophe, is left out of the alphabet)."""
    assert matches(caption, concept_pattern(name)) == (_old_rule(name).search(caption) is not None)


def test_embedded_world_captions_match_as_before():
    """The world's captions are ASCII: every (caption, identity) pair matches exactly as before, so the embedded
    demo's curated sets stay identical."""
    from slugkit.world import names as W

    caps = {W.identity_caption(i, t) for i in W.IDENTITIES for t in range(len(W.IDENTITY_CAPTION_TEMPLATES))}
    caps |= {W.utility_caption(c, t) for c in W.UTILITY_CLASSES for t in range(len(W.UTILITY_CAPTION_TEMPLATES))}
    for ident in W.IDENTITIES:
        new, old = concept_pattern(ident.name), _old_rule(ident.name)
        assert {c for c in caps if matches(c, new)} == {c for c in caps if old.search(c)}
