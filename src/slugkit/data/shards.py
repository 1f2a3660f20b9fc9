"""Webdataset shards: read and write ``.tar`` files of ``<key>.<img-ext>`` + ``<key>.txt`` pairs.

This is a small, dependency-free reader of the webdataset layout (the format img2dataset writes for LAION):

* a shard is a POSIX tar; members are grouped into samples by *key* = the member path up to the first dot of its
  file name (webdataset's ``base_plus_ext``), so ``00001/abc.jpg`` and ``00001/abc.txt`` form sample ``00001/abc``;
* a sample needs one image (``jpg``/``jpeg``/``png``/``webp``) and a caption (``txt``); other members
  (``json``, ``npy`` ...) are ignored, and nothing is ever unpickled (webdataset's own decoders would unpickle
  ``.pyd``/``.pickle`` members; we do not read them at all);
* shard lists accept brace patterns (``laion/{00000..00009}.tar``), several patterns separated by ``::``, and
  directories (every ``*.tar`` inside, sorted).

Bad input is reported, never silently turned into an empty dataset: a missing shard raises
:class:`ShardError` naming it; a truncated tar, an undecodable image or an image without a caption is skipped and
counted in :class:`ReadStats` (or raises under ``strict=True``).

Writing is deterministic (sorted-free: samples are written in the order given, with fixed mtime/uid/gid) and
atomic (a temporary file renamed into place), so a crash never leaves half a shard behind.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from braceexpand import braceexpand
from PIL import Image

from ..common.errors import ShardError
from ..common.files import atomic_write_bytes

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt",)


@dataclass
class Sample:
    key: str
    image: Image.Image
    caption: str
    source: str = ""  # shard path the sample came from
    data: bytes = b""  # the encoded image bytes as stored in the shard
    ext: str = ""  # the image member's extension (jpg, png, ...)


@dataclass
class ReadStats:
    samples: int = 0
    skipped_no_caption: int = 0
    skipped_no_image: int = 0
    skipped_bad_image: int = 0
    truncated_shards: list[str] = field(default_factory=list)
    manifest: list[dict] = field(default_factory=list)  # filled by callers that record what they used

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "skipped_no_caption": self.skipped_no_caption,
            "skipped_no_image": self.skipped_no_image,
            "skipped_bad_image": self.skipped_bad_image,
            "truncated_shards": list(self.truncated_shards),
        }


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


def _iter_members(path: str, stats: ReadStats, strict: bool) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) groups of consecutive members with the same key."""
    current_key: str | None = None
    group: dict[str, bytes] = {}
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if not ext:
                    continue
                if key != current_key:
                    if current_key is not None:
                        yield current_key, group
                    current_key, group = key, {}
                fobj = tf.extractfile(member)
                if fobj is None:
                    continue
                group[ext] = fobj.read()
            end = tf.offset
        # tarfile's stream reader stops quietly when a file is cut at a header boundary; a complete archive
        # ends with two zero blocks (1024 bytes) after the last member.
        if size < end + 1024 and not _is_compressed(path):
            raise tarfile.ReadError(f"missing end-of-archive marker (file is {size} bytes, last member ends at "
                                    f"{end})")
    except (tarfile.ReadError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise ShardError(f"shard not found: {path}") from e
        if strict:
            raise ShardError(f"shard {path} is truncated or not a tar file ({e}); re-download or re-create it") from e
        stats.truncated_shards.append(path)
        # The group in progress may be incomplete; drop it rather than yield half a sample.
        return
    if current_key is not None:
        yield current_key, group


def _is_compressed(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00"


def decode_image(data: bytes, where: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception as e:  # PIL raises a zoo of exception types for broken files
        raise ShardError(f"cannot decode image {where}: {e}") from e


def iter_samples(
    spec: str | Iterable[str],
    *,
    strict: bool = False,
    stats: ReadStats | None = None,
    decode: bool = True,
) -> Iterator[Sample]:
    """Iterate the samples of every shard in ``spec`` in order.

    ``decode=False`` yields samples whose ``image`` is ``None`` (for counting and caption matching without
    paying for JPEG decoding).
    """
    stats = stats if stats is not None else ReadStats()
    for path in expand_urls(spec):
        for key, group in _iter_members(path, stats, strict):
            img_ext = next((e for e in IMAGE_EXTS if e in group), None)
            cap_ext = next((e for e in CAPTION_EXTS if e in group), None)
            where = f"{path}:{key}"
            if img_ext is None:
                if strict:
                    raise ShardError(f"sample {where} has no image ({', '.join(IMAGE_EXTS)})")
                stats.skipped_no_image += 1
                continue
            if cap_ext is None:
                if strict:
                    raise ShardError(f"sample {where} has an image but no caption (.txt); pass non-strict to skip it")
                stats.skipped_no_caption += 1
                continue
            try:
                caption = group[cap_ext].decode("utf-8").strip()
            except UnicodeDecodeError as e:
                if strict:
                    raise ShardError(f"caption of {where} is not UTF-8") from e
                stats.skipped_no_caption += 1
                continue
            image = decode_or_skip(group[img_ext], where, strict, stats) if decode else None
            if decode and image is None:
                continue
            stats.samples += 1
            yield Sample(key=key, image=image, caption=caption, source=path, data=group[img_ext], ext=img_ext)


def decode_or_skip(data: bytes, where: str, strict: bool, stats: ReadStats) -> Image.Image | None:
    """Decode an image; a broken one raises under ``strict``, else is counted in ``stats`` and gives ``None``."""
    try:
        return decode_image(data, where)
    except ShardError:
        if strict:
            raise
        stats.skipped_bad_image += 1
        return None


def count_samples(spec: str | Iterable[str], strict: bool = False) -> int:
    """Count usable samples by iterating (no ``_stats.json`` sidecar needed, no image decoding)."""
    return sum(1 for _ in iter_samples(spec, strict=strict, decode=False))


def encode_image(image: Image.Image, ext: str = "jpg", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if ext in ("jpg", "jpeg"):
        image.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    elif ext == "png":
        image.save(buf, format="PNG")
    else:
        raise ValueError(f"unsupported image extension {ext!r}")
    return buf.getvalue()


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def write_shard(
    path: str | os.PathLike,
    samples: Iterable[tuple],
    image_ext: str = "jpg",
) -> int:
    """Write ``(key, image, caption[, ext])`` items as one webdataset shard, atomically and deterministically.

    ``image`` is a PIL image (encoded as ``ext``, default ``image_ext``) or already-encoded bytes.

    Keys must not contain dots (webdataset splits the key at the first dot). Returns the number of samples.
    """
    buf = io.BytesIO()
    n = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for item in samples:
            key, image, caption = item[:3]
            ext = item[3] if len(item) > 3 else image_ext
            if "." in os.path.basename(key):
                raise ValueError(f"sample key {key!r} contains a dot; webdataset keys end at the first dot")
            data = image if isinstance(image, bytes) else encode_image(image, ext)
            _add_bytes(tf, f"{key}.{ext}", data)
            _add_bytes(tf, f"{key}.txt", caption.encode("utf-8"))
            n += 1
    atomic_write_bytes(path, buf.getvalue())
    return n
