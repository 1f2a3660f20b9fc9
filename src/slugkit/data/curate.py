"""``slug curate``: build a forget set (and a retain set) from image–caption shards by name matching.

Fixes the official ``a0_create_tar.py`` (spec §1.2): matching is **whole-word** and case-insensitive (the official
raw substring match turns "Ann" into a hit for "Annual") on Unicode-normalised text (NFKC, apostrophe/dash/space
variants; :mod:`slugkit.data.matching`, whose rule :func:`names_concept` / :class:`ConceptMatcher` this module
re-exports for every other caller), underscores in a name count as spaces (``Elon_Musk`` matches "elon musk"),
aliases are supported, the ``--max-forget`` cap really caps (a duplicate key is read once), re-runs are idempotent
(the tar is written fresh, atomically), and the concept name is never used as a path. Every forget sample goes
into a manifest (key, caption, sha256 of the image bytes, source shard); the retain set excludes every match and
every variant spelling (:func:`~slugkit.data.matching.variant_pattern`: ``Jowen-Gormere``, ``#JowenGormere``).
An empty forget set is an error (:class:`EmptyForgetSetError`) whose message says what was read
(:meth:`ReadStats.diagnosis`): a file that is not a tar, an empty shard, members that do not pair up — and
suggests the spelling only when usable pairs were read and none named the concept.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..common.errors import EmptyForgetSetError
from ..common.files import atomic_write_bytes
from .folders import iter_pairs
from .matching import ConceptMatcher, concept_pattern, matches, names_concept, normalize_text, variant_pattern
from .shards import ReadStats, decode_or_skip, write_shard

__all__ = ["ConceptMatcher", "EmptyForgetSetError", "concept_pattern", "curate", "matches", "names_concept",
           "normalize_text"]


def _order_key(key: str, source: str, seed: int) -> str:
    """Seeded hash of (shard file name, key): the retain selection depends on the data, not on where it lives."""
    return hashlib.sha256(f"{seed}:{os.path.basename(source)}:{key}".encode()).hexdigest()


def curate(spec: str, concept: str, out_dir: str | Path, *, aliases: list[str] = (), max_forget: int | None = None,
           retain: int | None = None, seed: int = 0, strict: bool = False, progress: bool = False) -> dict:
    """Write ``forget.tar`` + ``forget_manifest.json`` (and, if ``retain`` is not 0, ``retain.tar`` +
    ``retain_manifest.json``) into ``out_dir``. Returns a summary dict (also written as ``curate.json``).

    The forget set is the first ``max_forget`` matches in stream order whose image decodes. The retain set is
    ``retain`` non-matching samples whose image decodes, chosen deterministically by a seeded hash of (shard, key)
    (``retain=None``: every non-match); an undecodable one is skipped, counted, and replaced by the next in rank.
    A sample goes to the forget set when :func:`names_concept` finds ``concept`` or an alias in its caption; one whose
    caption holds only a variant spelling (:func:`~slugkit.data.matching.variant_pattern`) goes to neither set, and is
    counted (``variant_spellings`` in the summary, with up to 3 examples). ``curate.json`` records ``max_retain``,
    and warns when more than half of 20 or more captions name the concept (or an alias), naming which.

    Raises :class:`EmptyForgetSetError` when nothing matches (the message carries the read diagnosis),
    ``ValueError`` for an empty concept name, :class:`~slugkit.common.errors.ShardError` for a missing shard and,
    under ``strict``, for any unreadable shard or sample (not a tar, empty, truncated, duplicate key, bad image or
    caption), and ``ValueError`` for an alias that spells the concept itself.
    """
    pat = concept_pattern(concept, aliases)
    same = [al for al in aliases if concept_pattern(al).fullmatch(normalize_text(concept))]
    if same:
        raise ValueError(f"--alias {same[0]!r} is the concept {concept!r} itself; an alias is another name for it")
    variant, own = variant_pattern(concept, aliases), concept_pattern(concept)
    variants, own_matches = [], 0
    alias_pats = {al: concept_pattern(al) for al in aliases}
    alias_matches = dict.fromkeys(aliases, 0)  # an alias that matched nothing said nothing (a misspelling?)
    out = Path(out_dir)
    stats = ReadStats()
    forget_ids, other_ids, seen, bad_matches = [], [], set(), 0
    # Pass 1: the captions, to find the matches (only the matches' images are decoded, up to the cap).
    it = iter_pairs(spec, strict=strict, stats=stats, decode=False)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="curate: scanning captions", unit="sample")
    for s in it:
        if (s.source, s.key) in seen:  # the readers skip duplicates already; never let one count twice here
            stats.skipped_duplicate_key += 1
            stats.note("skipped_duplicate_key", f"{s.source}:{s.key}")  # the warning's example read "?"
            stats.samples -= 1
            continue
        seen.add((s.source, s.key))
        if names_concept(s.caption, pat):
            own_matches += names_concept(s.caption, own)
            for al, ap in alias_pats.items():
                alias_matches[al] += names_concept(s.caption, ap)
            if max_forget is None or len(forget_ids) < max_forget:
                if decode_or_skip(s.data, f"{s.source}:{s.key}", strict, stats) is None:
                    bad_matches += 1  # decoded here: the cap counts usable pairs (fourteenth trial)
                else:
                    forget_ids.append((s.source, s.key))
        elif variant.search(normalize_text(s.caption)):
            variants.append(s.caption)  # names it in another spelling: never a retain pair, not a forget pair
        else:
            other_ids.append((s.source, s.key))
    n_scanned = stats.samples - stats.skipped_bad_image  # usable (an undecodable match is not)
    if not forget_ids:
        if bad_matches:  # every pair naming the concept has an undecodable image: never an empty tar
            raise EmptyForgetSetError(f"none of the {bad_matches} pairs whose caption names {concept!r} in {spec} has "
                                      f"an image that decodes: {'; '.join(stats.problems())}")
        if n_scanned == 0:
            raise EmptyForgetSetError(f"no usable image–caption pairs in {spec}, so nothing can match {concept!r}: "
                                      f"{stats.diagnosis()}")
        problems = stats.problems()
        if stats.split_keys:  # the pairs are apart: that, not the spelling, is why (tenth trial)
            raise EmptyForgetSetError(f"no caption in {spec} matches {concept!r}, and some of its pairs could not be "
                                      f"read ({n_scanned} scanned): {'; '.join(problems)}")
        raise EmptyForgetSetError(
            f"no caption in {spec} matches {concept!r}"
            + (f" or aliases {list(aliases)}" if aliases else "")
            + f" ({n_scanned} samples scanned; matching is whole-word and case-insensitive after Unicode "
            "normalisation). Check the spelling, add --alias, or point --shards at data that contains the concept."
            + (f" While reading: {'; '.join(problems)}." if problems else "")
        )
    warnings = [] if retain == 0 or other_ids else [  # unlearn then stopped at "an empty tar" (twelfth trial)
        f"every one of the {n_scanned} usable captions names {concept!r}" + (" or an alias" if aliases else "")
        + ": retain.tar is empty, and SLUG needs a retain set (its gradient keeps what the model should not lose); "
        "add pairs that do not name the concept (--shards A::B), or pass --max-retain 0 for a forget set only"]
    # Most captions match: a pool of the concept's own pairs (a multi-word name) is normal; a single word, or an
    # alias that made the majority, is likely a common word (--alias a: 746 of 1000; --concept a: 51 of 76, and an
    # alias equal to the concept was blamed for the concept's own matches: 17th trial).
    matched, half = len(forget_ids) + bad_matches, n_scanned / 2
    culprit = (f"is an alias ({', '.join(map(repr, aliases))}) too common a word?" if own_matches <= half else
               f"is {concept!r} too common a word?" if len(concept.replace("_", " ").split()) == 1 else None)
    if n_scanned >= 20 and matched > half and culprit:
        warnings.append(f"{matched} of the {n_scanned} captions name {concept!r}" + (" or an alias" if aliases else "")
                        + f": {culprit} Every one of them went to the forget set (up to --max-forget) and none to "
                        "the retain set")
    unmatched = [al for al, n in alias_matches.items() if n == 0]
    if unmatched:
        many = len(unmatched) > 1
        warnings.append(" and ".join(f"--alias {al!r}" for al in unmatched) + f" matched none of the {n_scanned} "
                        f"captions (the forget set holds the captions naming {concept!r}"
                        + (" or another alias" if len(unmatched) < len(aliases) else "")
                        + f"); check {'their' if many else 'its'} spelling — an alias is matched as whole words, like "
                          "the concept")
    ranked = sorted(other_ids, key=lambda sk: _order_key(sk[1], sk[0], seed)) if retain is not None else other_ids
    want = len(ranked) if retain is None else retain
    # Pass 2: collect the bytes of the chosen samples, each at most once, in stream order; a retain pair whose image
    # does not decode is replaced by the next in rank (one more pass only when some did not: fourteenth trial).
    forget_set, forget_got, retain_got, start = set(forget_ids), {}, {}, 0
    while len(retain_got) < want and start < len(ranked):
        retain_set = set(ranked[start:start + want - len(retain_got)])
        start += len(retain_set)
        for k, s in enumerate(iter_pairs(spec, strict=strict, decode=False)):
            sk = (s.source, s.key)
            if sk in forget_set:
                forget_set.discard(sk)
                forget_got[k] = s
            elif sk in retain_set and decode_or_skip(s.data, f"{s.source}:{s.key}", strict, stats) is not None:
                retain_got[k] = s  # an undecodable one is counted (--strict: named) and skipped
    if forget_set:  # no retain pass ran (--max-retain 0, or no other pairs): one pass for the forget pairs
        forget_got = {k: s for k, s in enumerate(iter_pairs(spec, strict=strict, decode=False))
                      if (s.source, s.key) in forget_set}
    forget_manifest, retain_manifest = [], []
    forget_items = _pairs([forget_got[k] for k in sorted(forget_got)], forget_manifest)
    retain_items = _pairs([retain_got[k] for k in sorted(retain_got)], retain_manifest)
    if retain != 0 and other_ids and not retain_items:  # every other pair's image was undecodable
        raise EmptyForgetSetError(f"none of the {len(other_ids)} pairs without {concept!r} in {spec} has an image that "
                                  f"decodes, so the retain set would be empty: {'; '.join(stats.problems())}")
    out.mkdir(parents=True, exist_ok=True)
    write_shard(out / "forget.tar", forget_items)
    _write_json(out / "forget_manifest.json",
                {"concept": concept, "aliases": list(aliases), "samples": forget_manifest})
    if retain != 0:
        write_shard(out / "retain.tar", retain_items)
        _write_json(out / "retain_manifest.json", {"excludes": concept, "samples": retain_manifest})
    summary = {"concept": concept, "aliases": list(aliases), "source": spec, "scanned": n_scanned,
               "forget": len(forget_items), "retain": len(retain_items) if retain != 0 else 0,
               "max_forget": max_forget, "max_retain": retain, "seed": seed,
               "variant_spellings": {"excluded_from_retain": len(variants), "examples": variants[:3]},
               "read_stats": stats.as_dict(), "read_problems": stats.problems(),
               "alias_matches": alias_matches, "warnings": warnings}
    _write_json(out / "curate.json", summary)
    return summary


def _pairs(samples, manifest: list) -> list[tuple]:
    """``(key, image bytes, caption, ext)`` items for :func:`write_shard`, keyed 0000000… in order; ``manifest``
    gets each one's key, source key and shard, caption and image sha256."""
    items = []
    for s in samples:
        key = f"{len(items):07d}"
        items.append((key, s.data, s.caption, s.ext if s.ext != "jpeg" else "jpg"))
        manifest.append({"key": key, "source_key": s.key, "source": s.source, "caption": s.caption,
                         "sha256": hashlib.sha256(s.data).hexdigest()})
    return items


def _write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
