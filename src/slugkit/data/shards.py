"""Webdataset shards: read and write ``.tar`` files of ``<key>.<img-ext>`` + ``<key>.txt`` pairs.

A small reader of the webdataset layout (the format img2dataset writes for LAION), kept instead of webdataset's
because its decoders would unpickle ``.pyd``/``.pickle`` members; here nothing is ever unpickled:

* a shard is a POSIX tar; members are grouped into samples by *key* = the member path up to the first dot of its
  file name (webdataset's ``base_plus_ext``), so ``00001/abc.jpg`` and ``00001/abc.txt`` form sample ``00001/abc``;
* a sample needs an image (``jpg``/``jpeg``/``png``/``webp``) and a caption (``txt``, UTF-8, not blank); others ignored;
* a key is one sample: a later run of a key already read in the shard (a copy, or the other half of a pair whose
  members are apart) is skipped and counted (``skipped_duplicate_key``); a shard listed twice in a spec is read once;
* images are decoded into 8-bit RGB by scaling, not clipping (:mod:`slugkit.data.images`); shard lists accept brace
  patterns (``laion/{00000..00009}.tar``), several patterns separated by ``::``, and directories (``*.tar``, sorted).

Bad input is reported, never silently turned into an empty dataset: a missing shard raises :class:`ShardError`
naming it; a file that is not a tar, an empty or truncated tar, an undecodable image or caption, an image without a
caption or a duplicate key is skipped and counted in :class:`ReadStats` (or raises under ``strict=True``), whose
:meth:`~ReadStats.diagnosis` says in words what was read. Writing is in :mod:`slugkit.data.shard_writer`.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from braceexpand import braceexpand
from PIL import Image

from ..common.errors import ShardError
from .images import decode_image
from .shard_writer import encode_image, write_shard  # noqa: F401  (their home before; re-exported)
from .stats import CAPTION_EXTS, IMAGE_EXTS, LINKS_HINT, ReadStats

__all__ = ["CAPTION_EXTS", "IMAGE_EXTS", "ReadStats", "Sample", "ShardError", "count_samples", "decode_caption",
           "decode_image", "decode_or_skip", "encode_image", "expand_urls", "iter_samples", "write_shard"]


@dataclass
class Sample:
    key: str
    image: Image.Image
    caption: str
    source: str = ""  # shard path the sample came from
    data: bytes = b""  # the encoded image bytes as stored in the shard
    ext: str = ""  # the image member's extension (jpg, png, ...)


def expand_urls(spec: str | os.PathLike | Iterable[str]) -> list[str]:
    """Expand a shard spec into a list of existing local paths.

    ``spec`` may be a brace pattern, several patterns joined by ``::``, a directory (all ``*.tar`` inside, sorted),
    or an iterable of those. Raises :class:`ShardError` for a path that does not exist.
    """
    if isinstance(spec, (str, os.PathLike)):
        parts = str(spec).split("::")
    else:
        parts = [str(s) for s in spec]
    out: list[str] = []
    missing: list[str] = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        for path in braceexpand(part):
            p = Path(path)
            if p.is_dir():
                tars = sorted(str(x) for x in p.glob("*.tar"))
                if not tars:
                    raise ShardError(f"directory {p} holds no .tar shards")
                if (p / "curate.json").is_file():  # `slug curate --out` given whole: both sets read as one (trial 40),
                    # a generated forget set taken as a retain set (verify 41)
                    sets = [Path(t).name for t in tars]
                    raise ShardError(f"directory {p} is a curated set (curate.json) holding {', '.join(sets)}: "
                                     + ("its forget.tar and retain.tar are two sets, not one; " if len(sets) > 1
                                        else "") + "give the file you mean: "
                                     + ", ".join(f"{p / s} is its {s.removesuffix('.tar')} set" for s in sets))
                images = [x for x in p.iterdir() if x.suffix.lower().lstrip(".") in IMAGE_EXTS]
                if images:  # read as a folder of shards, its pairs were dropped without a word (trial 25)
                    raise ShardError(f"directory {p} holds both .tar shards ({Path(tars[0]).name}"
                                     + (f" and {len(tars) - 1} more" if len(tars) > 1 else "") + f") and images "
                                     f"({images[0].name} …): is it a folder of shards or a captioned folder? Move one "
                                     "kind out and give both, e.g. 'pairs_folder::shards_folder'")
                out.extend(tars)
            elif p.exists():
                out.append(str(p))
            else:
                missing.append(str(p))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ShardError(f"{len(missing)} shard(s) not found: {shown} (from spec {spec!r}); check the path or "
                         "brace pattern")
    if not out:
        raise ShardError(f"shard spec {spec!r} names no shards")
    return out


def _split_key(name: str) -> tuple[str, str]:
    """webdataset ``base_plus_ext``: key = path up to the first dot of the basename; ext = the rest, lower-cased."""
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(d, stem) if d else stem), ext.lower()


_MAGIC = ((b"PAR1", "a Parquet file"), (b"PK\x03\x04", "a zip archive"), (b"\x89PNG", "a PNG image"),
          (b"\xff\xd8\xff", "a JPEG image"), (b"RIFF", "a RIFF/WebP file"), (b"\x93NUMPY", "a NumPy .npy file"),
          (b"ARROW1", "an Arrow file"), (b"SQLite format 3", "an SQLite database"), (b"{", "JSON"), (b"[", "JSON"))


def _sniff(path: str) -> tuple[str, str]:
    """``("tar", "")`` for a (possibly compressed or cut) tar, ``("empty", why)`` for a 0-byte file, or
    ``("not_tar", why)`` when the first 512 bytes are no tar header (``why`` guesses what the file is)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty", "a 0-byte file"
    if _is_compressed_head(head):
        return "tar", ""
    if len(head) == 512 and (not any(head) or _checksum_ok(head)):
        return "tar", ""
    if len(head) < 512 and (head[257:262] == b"ustar" or not any(head)):
        return "tar", ""  # a tar cut inside its first header: reported as truncated
    kind = next((what for magic, what in _MAGIC if head.startswith(magic)), None)
    return "not_tar", (f"it starts like {kind}: {head[:8]!r}" if kind else
                       f"its first bytes {head[:8]!r} are no tar header; or the header is damaged")


def _checksum_ok(block: bytes) -> bool:
    """The POSIX header checksum of a 512-byte block (unsigned or, as some old tars wrote it, signed sums)."""
    try:
        stored = int(block[148:156].replace(b"\0", b" ").strip() or b"0", 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 256 + sum(block[156:])
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)
    return stored in (unsigned, signed)


def _bad_shard(path: str, stats: ReadStats, strict: bool, kind: str, why: str) -> None:
    """A shard that yields nothing at all: an error under ``strict``, else listed in ``stats``."""
    if kind == "not_tar":
        msg = (f"{path} is not a tar shard ({why}); --shards/--forget/--retain take webdataset .tar shards "
               "(<key>.jpg + <key>.txt members) or a captioned folder")
    else:
        msg = f"{path} holds no file members ({why}); nothing can be read from it"
    if strict:
        raise ShardError(msg)
    (stats.not_tar_shards if kind == "not_tar" else stats.empty_shards).append(path)
    stats.note(f"{kind if kind == 'not_tar' else 'empty'}:{path}", why)


def _duplicate(path: str, key: str, member: str, stats: ReadStats, strict: bool, split: bool = False) -> None:
    """A later run of ``key`` (``split``: it brings a member its first run lacked, so the pair's files are apart)."""
    if strict:
        raise ShardError(f"{path}: key {key!r} appears more than once (member {member} "
                         + ("is apart from the rest of its sample: a webdataset shard keeps each sample's files "
                            "together; rebuild it sorted, tar --sort=name)" if split else
                            "repeats a sample already read); every sample needs its own key"))
    stats.skipped_duplicate_key += 1
    stats.note("skipped_duplicate_key", f"{path}:{key}")
    if split:
        stats.split_keys += 1
        stats.note("split_keys", f"{path}:{key} ({member} apart from the rest of its sample)")


def _diagnose_group(key: str, group: dict[str, bytes], stats: ReadStats) -> None:
    """Count the members of a sample that cannot pair up because its base name holds dots (``img.v2.00000.jpg``
    → key ``img``, extension ``v2.00000.jpg``), and keys under which several such samples merged."""
    if any(e in group for e in IMAGE_EXTS) and any(e in group for e in CAPTION_EXTS):
        return
    dotted = [e for e in group if "." in e and e.rsplit(".", 1)[-1] in IMAGE_EXTS + CAPTION_EXTS]
    if not dotted:
        return
    stats.dotted_members += len(dotted)
    stats.note("dotted", f"{key}.{dotted[0]!s}: key {key!r}, extension {dotted[0]!r}")
    finals = [e.rsplit(".", 1)[-1] for e in group]
    if len(set(finals)) < len(finals):
        stats.merged_keys += 1


def _dots_hint(group: dict[str, bytes]) -> str:
    n = sum(1 for e in group if "." in e and e.rsplit(".", 1)[-1] in IMAGE_EXTS + CAPTION_EXTS)
    return (f"; {n} of its {len(group)} member names hold dots inside the base name, and a key ends at the first "
            "dot (webdataset), so they merged under this key: rename them without dots before the extension"
            if n else "")


def _iter_members(path: str, stats: ReadStats, strict: bool) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) groups of consecutive members with the same key.

    A key's sample is the first run of its members; a later run of the same key (not adjacent), or a second copy
    of it right behind the first (an extension repeats), is skipped and counted in ``skipped_duplicate_key``."""
    try:
        kind, why = _sniff(path)
    except FileNotFoundError as e:
        raise ShardError(f"shard not found: {path}") from e
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e.strerror or e}") from e
    if kind != "tar":
        _bad_shard(path, stats, strict, kind, why)
        return
    seen: dict[str, set[str]] = {}  # key -> the extensions of its first run
    current_key: str | None = None
    group: dict[str, bytes] | None = None  # None: the run in progress is a duplicate, skipped
    copy_exts: set[str] = set()
    n_members, first_link = 0, ""
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                if member.issym() or member.islnk():  # a tar of links holds no image: it read as "an empty tar"
                    stats.link_members += 1
                    first_link = first_link or f"{path}:{member.name} -> {member.linkname}"
                    stats.note("link_members", first_link)
                if not member.isfile():
                    continue
                n_members += 1
                key, ext = _split_key(member.name)
                stats.add_member(ext)
                if not ext:
                    continue
                if key != current_key or ext in copy_exts:
                    if group:
                        _diagnose_group(current_key, group, stats)
                        yield current_key, group
                    if key in seen:
                        group = None
                        _duplicate(path, key, member.name, stats, strict, split=ext not in seen[key])
                    else:
                        seen[key] = set()
                        group = {}
                    current_key, copy_exts = key, set()
                copy_exts.add(ext)
                if group is not None:
                    seen[key].add(ext)
                fobj = tf.extractfile(member) if group is not None else None
                if fobj is not None:
                    group[ext] = fobj.read()
            end = tf.offset
        if n_members == 0:
            _bad_shard(path, stats, strict, "empty", f"only links, e.g. {first_link}: {LINKS_HINT}" if first_link
                       else "an empty tar" if size else "a 0-byte file")
            return
        # tarfile's stream reader stops quietly when a file is cut at a header boundary; a complete archive
        # ends with two zero blocks (1024 bytes) after the last member.
        if size < end + 1024 and not _is_compressed(path):
            raise tarfile.ReadError(f"missing end-of-archive marker (file is {size} bytes, last member ends at "
                                    f"{end})")
    except (tarfile.ReadError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise ShardError(f"shard not found: {path}") from e
        if n_members == 0 and _is_compressed(path):
            _bad_shard(path, stats, strict, "not_tar", f"compressed, but what it holds is no tar or is damaged at "
                                                        f"the start: {e}")
            return
        if strict:
            raise ShardError(f"shard {path} is truncated or corrupt ({e}); re-download or re-create it") from e
        stats.truncated_shards.append(path)
        stats.note(f"truncated:{path}", str(e))
        # The group in progress may be incomplete; drop it rather than yield half a sample.
        return
    if group:
        _diagnose_group(current_key, group, stats)
        yield current_key, group


def _is_compressed_head(head: bytes) -> bool:
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00"


def _is_compressed(path: str) -> bool:
    with open(path, "rb") as f:
        return _is_compressed_head(f.read(6))


def decode_caption(raw: bytes, where: str, strict: bool, stats: ReadStats) -> str | None:
    """A caption's bytes as text (UTF-8, a leading BOM dropped, stripped). Bytes that are not UTF-8, or a blank
    caption, raise :class:`ShardError` naming ``where`` under ``strict``, else count as ``skipped_bad_caption``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if strict:
            raise ShardError(f"caption {where} is not UTF-8 (byte {raw[e.start:e.start + 1]!r} at offset {e.start}); "
                             "re-encode it as UTF-8, or run without --strict to skip it") from e
        stats.skipped_bad_caption += 1
        stats.note("skipped_bad_caption", where)
        return None
    text = text.removeprefix("\ufeff").strip()
    if not text:  # a blank caption made a pair that teaches nothing, even under --strict (ninth trial)
        if strict:
            raise ShardError(f"caption {where} is blank; write the caption, or run without --strict to skip it")
        stats.skipped_bad_caption += 1
        stats.note("skipped_bad_caption", f"{where} (blank)")
    return text or None


def iter_samples(
    spec: str | Iterable[str],
    *,
    strict: bool = False,
    stats: ReadStats | None = None,
    decode: bool = True,
) -> Iterator[Sample]:
    """Iterate the samples of every shard in ``spec`` in order.

    ``decode=False`` yields samples whose ``image`` is ``None`` (for counting and caption matching without
    paying for JPEG decoding). A shard listed twice in ``spec`` is read once: the second listing's samples are
    counted as ``skipped_duplicate_key`` (a :class:`ShardError` under ``strict``). Raises :class:`ShardError` for a
    missing shard, and under ``strict`` for any sample or shard that cannot be used (see :class:`ReadStats`).
    """
    stats = stats if stats is not None else ReadStats()
    done: set[str] = set()
    for path in expand_urls(spec):
        if os.path.realpath(path) in done:
            if strict:
                raise ShardError(f"shard {path} is listed twice in {spec!r}; its samples would count twice")
            stats.skipped_duplicate_key += sum(1 for _ in _iter_members(path, ReadStats(), False))
            stats.note("skipped_duplicate_key", f"{path} (listed twice)")
            continue
        done.add(os.path.realpath(path))
        for key, group in _iter_members(path, stats, strict):
            img_ext = next((e for e in IMAGE_EXTS if e in group), None)
            cap_ext = next((e for e in CAPTION_EXTS if e in group), None)
            where = f"{path}:{key}"
            if strict and (img_ext is None or cap_ext is None):
                _refuse_apart(path, key, group)
            if img_ext is None:
                if strict:
                    raise ShardError(f"sample {where} has no image ({', '.join(IMAGE_EXTS)}); members: "
                                     f"{', '.join(sorted(group)[:6])}{_dots_hint(group)}")
                stats.skipped_no_image += 1
                stats.note("no_image", f"{where} with {', '.join(sorted(group)[:4])}")
                continue
            if cap_ext is None:
                if strict:
                    raise ShardError(f"sample {where} has an image but no caption (.txt; members: "
                                     f"{', '.join(sorted(group)[:6])}){_dots_hint(group)}; pass non-strict to "
                                     "skip it")
                stats.skipped_no_caption += 1
                stats.note("no_caption", f"{where} with {', '.join(sorted(group)[:4])}")
                continue
            caption = decode_caption(group[cap_ext], where, strict, stats)
            if caption is None:
                continue
            image = decode_or_skip(group[img_ext], where, strict, stats) if decode else None
            if decode and image is None:
                continue
            stats.samples += 1
            yield Sample(key=key, image=image, caption=caption, source=path, data=group[img_ext], ext=img_ext)


def _refuse_apart(path: str, key: str, group: dict[str, bytes]) -> None:
    """Under ``strict``, a sample missing its image or caption whose other member comes later in the tar (a tar
    made in directory order: images first, then captions) is named as such, not as "no caption" (eleventh session;
    reading on would have found the split only at the second run of the key). Costs one more pass over the tar's
    headers, on this error path only."""
    with tarfile.open(path, mode="r|*") as tf:
        later = next((m.name for m in tf if m.isfile() and _split_key(m.name)[0] == key
                      and _split_key(m.name)[1] not in group and _split_key(m.name)[1]), None)
    if later is not None:
        raise ShardError(f"{path}: sample {key!r} is apart: {later} comes later in the tar, not next to "
                         f"{', '.join(f'{key}.{e}' for e in sorted(group))}; a webdataset shard keeps each sample's "
                         "files together: rebuild it sorted (tar --sort=name)")


def decode_or_skip(data: bytes, where: str, strict: bool, stats: ReadStats) -> Image.Image | None:
    """Decode an image into 8-bit RGB (:func:`~slugkit.data.images.decode_image`); a broken one raises
    :class:`ShardError` under ``strict``, else is counted in ``stats`` (``skipped_bad_image``) and gives ``None``."""
    try:
        return decode_image(data, where)
    except ShardError as e:
        if strict:
            raise
        stats.skipped_bad_image += 1
        stats.note("skipped_bad_image", str(e))  # the reason too: it was given under --strict only (trial 24)
        return None


def count_samples(spec: str | Iterable[str], strict: bool = False) -> int:
    """Count usable samples by iterating (no ``_stats.json`` sidecar needed, no image decoding)."""
    return sum(1 for _ in iter_samples(spec, strict=strict, decode=False))
