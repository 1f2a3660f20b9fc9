"""``slug curate``: build a forget set (and a retain set) from image–caption shards by name matching.

Fixes the official ``a0_create_tar.py`` (spec §1.2): matching is **whole-word** and case-insensitive (the official
raw substring match turns "Ann" into a hit for "Annual"), underscores in a name count as spaces (``Elon_Musk``
matches "elon musk"), aliases are supported, the ``--max-forget`` cap really caps, re-runs are idempotent (the tar
is written fresh, atomically), and the concept name is never used as a path. Every forget sample goes into a
manifest (key, caption, sha256 of the image bytes, source shard); the retain set excludes every match.
An empty forget set is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..common.errors import EmptyForgetSetError
from ..common.files import atomic_write_bytes
from .folders import iter_pairs
from .shards import ReadStats, write_shard


def concept_pattern(name: str, aliases: list[str] | tuple[str, ...] = ()) -> re.Pattern:
    """Whole-word, case-insensitive regex matching ``name`` or any alias; ``_`` and runs of spaces match any
    whitespace."""
    terms = []
    for t in [name, *aliases]:
        words = [w for w in re.split(r"[\s_]+", t.strip()) if w]
        if not words:
            continue
        terms.append(r"\s+".join(re.escape(w) for w in words))
    if not terms:
        raise ValueError("concept name is empty")
    return re.compile(r"(?<!\w)(?:" + "|".join(terms) + r")(?!\w)", re.IGNORECASE)


def matches(caption: str, pattern: re.Pattern) -> bool:
    return pattern.search(caption) is not None


def _order_key(key: str, source: str, seed: int) -> str:
    """Seeded hash of (shard file name, key): the retain selection depends on the data, not on where it lives."""
    return hashlib.sha256(f"{seed}:{os.path.basename(source)}:{key}".encode()).hexdigest()


def curate(spec: str, concept: str, out_dir: str | Path, *, aliases: list[str] = (), max_forget: int | None = None,
           retain: int | None = None, seed: int = 0, strict: bool = False, progress: bool = False) -> dict:
    """Write ``forget.tar`` + ``forget_manifest.json`` (and, if ``retain`` is not 0, ``retain.tar`` +
    ``retain_manifest.json``) into ``out_dir``. Returns a summary dict (also written as ``curate.json``).

    The forget set is the first ``max_forget`` matches in stream order. The retain set is ``retain`` non-matching
    samples chosen deterministically by a seeded hash of (shard, key) (``retain=None``: every non-match).
    """
    pat = concept_pattern(concept, aliases)
    out = Path(out_dir)
    stats = ReadStats()
    forget_ids, other_ids = [], []
    # Pass 1: captions only (no image decoding) to find the matches.
    it = iter_pairs(spec, strict=strict, stats=stats, decode=False)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="curate: scanning captions", unit="sample")
    for s in it:
        if matches(s.caption, pat):
            if max_forget is None or len(forget_ids) < max_forget:
                forget_ids.append((s.source, s.key))
        else:
            other_ids.append((s.source, s.key))
    n_scanned = stats.samples
    if not forget_ids:
        raise EmptyForgetSetError(
            f"no caption in {spec} matches {concept!r}"
            + (f" or aliases {list(aliases)}" if aliases else "")
            + f" ({n_scanned} samples scanned; matching is whole-word and case-insensitive). "
            "Check the spelling, add --alias, or point --shards at data that contains the concept."
        )
    if retain is not None:
        other_ids = sorted(other_ids, key=lambda sk: _order_key(sk[1], sk[0], seed))[:retain]
    forget_set, retain_set = set(forget_ids), set(other_ids)
    forget_items, retain_items, forget_manifest, retain_manifest = [], [], [], []
    # Pass 2: collect the bytes of the chosen samples (stream order).
    for s in iter_pairs(spec, strict=strict, decode=False):
        sk = (s.source, s.key)
        if sk in forget_set:
            dst, man = forget_items, forget_manifest
        elif sk in retain_set:
            dst, man = retain_items, retain_manifest
        else:
            continue
        key = f"{len(dst):07d}"
        dst.append((key, s.data, s.caption, s.ext if s.ext != "jpeg" else "jpg"))
        man.append({"key": key, "source_key": s.key, "source": s.source, "caption": s.caption,
                    "sha256": hashlib.sha256(s.data).hexdigest()})
    out.mkdir(parents=True, exist_ok=True)
    write_shard(out / "forget.tar", forget_items)
    _write_json(out / "forget_manifest.json", {"concept": concept, "aliases": list(aliases), "samples": forget_manifest})
    if retain != 0:
        write_shard(out / "retain.tar", retain_items)
        _write_json(out / "retain_manifest.json", {"excludes": concept, "samples": retain_manifest})
    summary = {"concept": concept, "aliases": list(aliases), "source": spec, "scanned": n_scanned,
               "forget": len(forget_items), "retain": len(retain_items) if retain != 0 else 0,
               "max_forget": max_forget, "seed": seed, "read_stats": stats.as_dict()}
    _write_json(out / "curate.json", summary)
    return summary


def _write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
