"""``slug curate``: build a forget set (and a retain set) from image–caption shards by name matching.

Fixes the official ``a0_create_tar.py`` (spec §1.2): matching is **whole-word** and case-insensitive (the official
raw substring match turns "Ann" into a hit for "Annual") on Unicode-normalised text (NFKC, apostrophe/dash/space
variants; :mod:`slugkit.data.matching`, whose rule :func:`names_concept` / :class:`ConceptMatcher` this module
re-exports for every other caller), underscores in a name count as spaces (``Elon_Musk`` matches "elon musk"),
aliases are supported, the ``--max-forget`` cap really caps (a duplicate key is read once), re-runs are idempotent
(the tar is written fresh, atomically), and the concept name is never used as a path. Every forget sample goes
into a manifest (key, caption, sha256 of the image bytes, source shard); the retain set excludes every match.
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
from .matching import ConceptMatcher, concept_pattern, matches, names_concept, normalize_text
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

    The forget set is the first ``max_forget`` matches in stream order. The retain set is ``retain`` non-matching
    samples chosen deterministically by a seeded hash of (shard, key) (``retain=None``: every non-match).
    A sample goes to the forget set when :func:`names_concept` finds ``concept`` or an alias in its caption.

    Raises :class:`EmptyForgetSetError` when nothing matches (the message carries the read diagnosis),
    ``ValueError`` for an empty concept name, :class:`~slugkit.common.errors.ShardError` for a missing shard and,
    under ``strict``, for any unreadable shard or sample (not a tar, empty, truncated, duplicate key, bad image or
    caption).
    """
    pat = concept_pattern(concept, aliases)
    out = Path(out_dir)
    stats = ReadStats()
    forget_ids, other_ids, seen = [], [], set()
    # Pass 1: captions only (no image decoding) to find the matches.
    it = iter_pairs(spec, strict=strict, stats=stats, decode=False)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="curate: scanning captions", unit="sample")
    for s in it:
        if (s.source, s.key) in seen:  # the readers skip duplicates already; never let one count twice here
            stats.skipped_duplicate_key += 1
            stats.samples -= 1
            continue
        seen.add((s.source, s.key))
        if names_concept(s.caption, pat):
            if max_forget is None or len(forget_ids) < max_forget:
                forget_ids.append((s.source, s.key))
        else:
            other_ids.append((s.source, s.key))
    n_scanned = stats.samples
    if not forget_ids:
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
    if retain is not None:
        other_ids = sorted(other_ids, key=lambda sk: _order_key(sk[1], sk[0], seed))[:retain]
    forget_set, retain_set = set(forget_ids), set(other_ids)
    forget_items, retain_items, forget_manifest, retain_manifest = [], [], [], []
    # Pass 2: collect the bytes of the chosen samples (stream order), each at most once.
    for s in iter_pairs(spec, strict=strict, decode=False):
        sk = (s.source, s.key)
        if sk in forget_set:
            forget_set.discard(sk)
            dst, man = forget_items, forget_manifest
        elif sk in retain_set:
            retain_set.discard(sk)
            dst, man = retain_items, retain_manifest
        else:
            continue
        if decode_or_skip(s.data, f"{s.source}:{s.key}", strict, stats) is None:
            continue  # undecodable (a 0-byte file, garbage): not a pair; counted, and --strict names it (twelfth trial)
        key = f"{len(dst):07d}"
        dst.append((key, s.data, s.caption, s.ext if s.ext != "jpeg" else "jpg"))
        man.append({"key": key, "source_key": s.key, "source": s.source, "caption": s.caption,
                    "sha256": hashlib.sha256(s.data).hexdigest()})
    for items, ids, what in ((forget_items, forget_ids, f"whose caption names {concept!r}"),
                             (retain_items if retain != 0 and other_ids else [None], other_ids,
                              "chosen for the retain set")):
        if not items:  # every chosen image was undecodable: never an empty tar
            raise EmptyForgetSetError(f"none of the {len(ids)} pairs {what} in {spec} has an image that decodes: "
                                      f"{'; '.join(stats.problems())}")
    out.mkdir(parents=True, exist_ok=True)
    write_shard(out / "forget.tar", forget_items)
    _write_json(out / "forget_manifest.json", {"concept": concept, "aliases": list(aliases), "samples": forget_manifest})
    if retain != 0:
        write_shard(out / "retain.tar", retain_items)
        _write_json(out / "retain_manifest.json", {"excludes": concept, "samples": retain_manifest})
    summary = {"concept": concept, "aliases": list(aliases), "source": spec, "scanned": n_scanned,
               "forget": len(forget_items), "retain": len(retain_items) if retain != 0 else 0,
               "max_forget": max_forget, "seed": seed, "read_stats": stats.as_dict(), "read_problems": stats.problems(),
               "warnings": warnings}
    _write_json(out / "curate.json", summary)
    return summary


def _write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
