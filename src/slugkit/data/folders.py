"""Image folders: captioned folders (forget/retain pairs) and class folders (zero-shot evaluation).

* **Captioned folder** — ``root/**/<stem>.<jpg|jpeg|png|webp>`` with a sidecar ``<stem>.txt`` caption, the layout
  img2dataset writes with ``--output_format files``. Images without a caption, captions that are not UTF-8 and a
  second image of the same stem (``a.jpg`` + ``a.png`` would share ``a.txt``; the first in sorted order is kept)
  are skipped, and so is a caption with no image, counted in :class:`~slugkit.data.stats.ReadStats` (an error
  naming the file under ``strict``).
* **Class folder** (torchvision ``ImageFolder`` layout) — ``root/<class_dir>/*.jpg``; classes are the sorted
  sub-directory names. Class *names* (what the zero-shot prompts say) come from ``root/classnames.txt`` (one per line,
  in sorted-directory order), else from the directory names with ``_`` replaced by spaces (CelebA-style
  ``Elon_Musk`` → ``Elon Musk``). For ImageNet, pass ``classnames="imagenet"`` to use open_clip's 1000 class names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .shards import (CAPTION_EXTS, IMAGE_EXTS, ReadStats, Sample, ShardError, decode_caption, decode_image,
                     decode_or_skip)


def folder_files(root: str | Path, notes: dict | None = None) -> list[Path]:
    """Every file below ``root``, sorted, following links to folders (``Path.rglob`` skipped a linked subfolder
    without a word: 600 of 611 retain pairs unread; trial 24); a folder reached twice (a link loop, two links to one
    folder) is read once. ``notes`` (optional) collects ``"broken"``: links to nothing (as ``(link, target)``) and
    ``"again"``: folders reached a second time (as ``(path, the path it was read under)``)."""
    root, out, seen = Path(root), [], {}
    notes = notes if notes is not None else {}
    for d, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:
            if not Path(d).is_relative_to(seen[real]):  # a loop back up is no second copy
                notes.setdefault("again", []).append((d, seen[real]))
            dirs[:] = []
            continue
        seen[real] = d
        dirs.sort()
        for f in files:
            path = os.path.join(d, f)
            if os.path.isfile(path):
                out.append(Path(path))
            elif os.path.islink(path) and not os.path.exists(path):
                notes.setdefault("broken", []).append((path, os.readlink(path)))
    return sorted(out)


def _image_files(root: str | Path, files: list[Path] | None = None) -> list[Path]:
    """The images of :func:`folder_files` (or of ``files``), sorted."""
    return [p for p in (folder_files(root) if files is None else files) if p.suffix.lower().lstrip(".") in IMAGE_EXTS]


def _folder_notes(root: Path, every: list[Path], notes: dict, stats: ReadStats) -> set[Path]:
    """What a captioned folder holds that is not read — a folder linked twice, ``.tar`` shards below it — said in
    ``stats``; links to nothing (an image link to nothing was reported as "a caption with no image"; trial 25):
    returns the stems of those that are images or captions, whose pairs :func:`iter_caption_folder` skips as such."""
    broken = {}
    for link, target in notes.get("broken", []):
        if Path(link).suffix.lower().lstrip(".") in IMAGE_EXTS + CAPTION_EXTS:
            broken[Path(link).with_suffix("")] = f"{link} -> {target}"
    for path, first in notes.get("again", []):
        stats.note("folder_again", f"{path} is the folder {first} again (linked twice): read once")
    tars = [f for f in every if f.suffix.lower() == ".tar"]
    if tars:
        stats.note("tars_in_folder", f"{len(tars)} .tar file(s) inside the captioned folder {root} are not read (e.g. "
                                     f"{tars[0]}): give shards as a part of the spec, e.g. '{root}::{tars[0]}'")
    if broken:
        stats.skipped_broken_link += len(broken)
        stats.note("skipped_broken_link", next(iter(broken.values())))
    return set(broken)


def iter_caption_folder(root: str | Path, *, strict: bool = False, stats: ReadStats | None = None,
                        decode: bool = True) -> Iterator[Sample]:
    """Pairs of a captioned folder in sorted file order: ``key`` is the image's path below ``root`` without its
    suffix, ``source`` is ``root``. ``decode=False`` yields ``image=None``. Raises :class:`ShardError` for a missing
    or image-less folder, and under ``strict`` for an image without caption, a caption that is not UTF-8, an image
    that does not decode, or two images with the same key (naming the files)."""
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"image folder not found: {root}")
    stats = stats if stats is not None else ReadStats()
    notes: dict = {}
    every = folder_files(root, notes)
    broken = _folder_notes(root, every, notes, stats)
    files = _image_files(root, every)
    if not files:
        raise ShardError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTS)})"
                         + (f"; {len(broken)} link(s) to nothing, e.g. {stats.examples['skipped_broken_link']}"
                            if broken else ""))
    stems = {f.with_suffix("") for f in files}  # a caption with no image was not even counted (ninth trial)
    # .txt in any case (UP1.JPG + UP1.TXT was "no caption"; trial 24), a lower-case one first
    captions = {c.with_suffix(""): c for c in every if c.suffix.lower() == ".txt" and c.suffix != ".txt"}
    captions.update({c.with_suffix(""): c for c in every if c.suffix == ".txt"})
    orphans = sorted(c for c in captions.values() if c.with_suffix("") not in stems | broken)
    if orphans and strict:
        raise ShardError(f"caption {orphans[0]} has no image ({', '.join(IMAGE_EXTS)}) beside it"
                         + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""))
    stats.skipped_no_image += len(orphans)
    if orphans:
        stats.note("no_image", str(orphans[0]))
    first: dict[str, Path] = {}
    for f in files:
        cap = captions.get(f.with_suffix(""), f.with_suffix(".txt"))
        key = str(f.relative_to(root).with_suffix(""))
        stats.add_member(f.suffix.lower().lstrip("."))
        if key in first:
            if strict:
                raise ShardError(f"images {first[key]} and {f} have the same key {key!r} (and caption {cap.name}); "
                                 "keep one of them")
            stats.skipped_duplicate_key += 1
            stats.note("skipped_duplicate_key", f"{f} (same key as {first[key].name})")
            continue
        first[key] = f
        if not cap.is_file() and f.with_suffix("") in broken:  # its caption is a link to nothing: counted
            continue
        if not cap.is_file():
            if strict:
                raise ShardError(f"image {f} has no caption file {cap.name}")
            stats.skipped_no_caption += 1
            stats.note("no_caption", str(f))
            continue
        stats.add_member("txt")
        caption = decode_caption(cap.read_bytes(), str(cap), strict, stats)
        if caption is None:
            continue
        caption = caption.replace("\r\n", "\n").replace("\r", "\n")  # as text-mode reading did
        data = f.read_bytes()
        image = decode_or_skip(data, str(f), strict, stats) if decode else None
        if decode and image is None:
            continue
        stats.samples += 1
        yield Sample(key=key, image=image, caption=caption, source=str(root), data=data,
                     ext=f.suffix.lower().lstrip("."))


def iter_pairs(spec: str, *, strict: bool = False, stats: ReadStats | None = None,
               decode: bool = True, seen: set[bytes] | None = None) -> Iterator[Sample]:
    """Image–caption pairs from webdataset shards (brace patterns, ``::``-joined lists, dirs of .tar) or a
    captioned folder (a directory with images and ``.txt`` captions, no ``.tar``) — also as a part of a ``::`` list
    (``pool::my_folder``: curate's own advice, "add pairs … (--shards A::B)", had failed on a folder A with
    "holds no .tar shards"; seventeenth trial).

    A pair whose image bytes and caption equal those of a pair already yielded by this call (another key, another
    shard or folder: a copy of a shard under another name was read twice, its pairs weighted double in the
    gradients) is skipped and counted as ``skipped_duplicate_pair`` with an example naming both; under ``strict`` a
    :class:`ShardError`. Costs a SHA-256 of each pair and 16 bytes per pair read. ``seen``: the 16-byte digests of
    pairs read by earlier calls, updated in place — the streaming gradient pass (:mod:`slugkit.slug.gradpass`) reads
    shard by shard and shares one set over a split's shards, so that it reads each pair once as this function does
    over a whole spec (it counted a pair repeated in another shard twice, and ``slug unlearn --gradients`` then
    refused its file for a pair count it could never reach: trial 24)."""
    import hashlib

    stats = stats if stats is not None else ReadStats()
    first: dict[bytes, str] = {}
    for s in _iter_pairs(spec, strict, stats, decode):
        digest = hashlib.sha256(s.data + b"\0" + s.caption.encode("utf-8")).digest()[:16]
        if digest in first or (seen is not None and digest in seen):
            where = f"{_named(s)} = {first.get(digest, 'a pair of an earlier shard')}"
            if strict:
                raise ShardError(f"{where}: the same image and caption twice; each pair would count twice — remove "
                                 "the copy (a shard or folder copied under another name?)")
            stats.skipped_duplicate_pair += 1
            stats.samples -= 1
            stats.note("skipped_duplicate_pair", where)
            continue
        first[digest] = _named(s)
        if seen is not None:
            seen.add(digest)
        yield s


def _named(s: Sample) -> str:
    """A pair as a user finds it: ``shard.tar:key``, or a captioned folder's image file."""
    return os.path.join(s.source, f"{s.key}.{s.ext}") if os.path.isdir(s.source) else f"{s.source}:{s.key}"


def _iter_pairs(spec: str, strict: bool, stats: ReadStats, decode: bool) -> Iterator[Sample]:
    from .shards import iter_samples

    parts = [x.strip() for x in str(spec).split("::") if x.strip()]
    if len(parts) > 1 and any(is_captioned_folder(x) for x in parts):
        yield from _mixed_pairs(spec, parts, strict, stats, decode)
    elif is_captioned_folder(spec):
        yield from iter_caption_folder(Path(spec), strict=strict, stats=stats, decode=decode)
    else:
        yield from iter_samples(spec, strict=strict, stats=stats, decode=decode)


def _mixed_pairs(spec: str, parts: list[str], strict: bool, stats: ReadStats, decode: bool) -> Iterator[Sample]:
    """A ``::`` list with captioned folders in it: each part as what it is, a folder or shard listed twice read once
    (its pairs counted as ``skipped_duplicate_key``, as :func:`~slugkit.data.shards.iter_samples` does for shards;
    ``folder::folder`` had written every retain pair twice: eighteenth trial)."""
    from .shards import expand_urls, iter_samples

    seen: set[str] = set()
    for part in parts:
        paths = [part] if is_captioned_folder(part) else expand_urls(part)
        again = [x for x in paths if os.path.realpath(x) in seen]
        if again and strict:
            raise ShardError(f"{again[0]} is listed twice in {spec!r}; its samples would count twice")
        for x in again:
            stats.skipped_duplicate_key += sum(1 for _ in iter_pairs(x, stats=ReadStats(), decode=False))
            stats.note("skipped_duplicate_key", f"{x} (listed twice)")
        new = [x for x in paths if os.path.realpath(x) not in seen]
        seen.update(os.path.realpath(x) for x in new)
        if new and is_captioned_folder(part):
            yield from iter_caption_folder(Path(part), strict=strict, stats=stats, decode=decode)
        elif new:
            yield from iter_samples(new, strict=strict, stats=stats, decode=decode)


def is_captioned_folder(part: str) -> bool:
    """A directory that holds images and ``.txt`` captions rather than ``.tar`` shards (one source of pairs)."""
    p = Path(part)
    return p.is_dir() and not any(p.glob("*.tar"))


@dataclass
class ClassFolder:
    root: Path
    classnames: list[str]  # what prompts say, index = label
    dirnames: list[str]
    files: list[Path]
    labels: list[int]

    def load(self, strict: bool = True):
        for f, y in zip(self.files, self.labels):
            yield decode_image(f.read_bytes(), str(f)), y

    @property
    def empty(self) -> list[str]:
        """The class folders (directory names) that hold no image: silently left out of every metric (trial 43)."""
        held = set(self.labels)
        return [d for y, d in enumerate(self.dirnames) if y not in held]


def read_class_folder(root: str | Path, classnames: str | list[str] | None = None) -> ClassFolder:
    root = Path(root)
    if not root.is_dir():  # a file said "not found" (sixteenth trial)
        raise ShardError(f"{root} is a file, not a class folder (<class name>/<images>)" if root.exists() else
                         f"class folder not found: {root}")
    dirs = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not dirs:
        raise ShardError(f"class folder {root} has no class sub-directories (expected root/<class>/<image>)")
    if classnames is None and (root / "classnames.txt").is_file():
        classnames = str(root / "classnames.txt")
    if classnames == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES)
    elif isinstance(classnames, str):
        names = [ln.strip() for ln in Path(classnames).read_text(encoding="utf-8").splitlines() if ln.strip()]
    elif isinstance(classnames, list):
        names = list(classnames)
    else:
        names = [d.replace("_", " ") for d in dirs]
    if len(names) != len(dirs):
        raise ShardError(f"{root}: {len(dirs)} class directories but {len(names)} class names "
                         f"({classnames}); they must match one to one in sorted-directory order")
    files, labels = [], []
    for y, d in enumerate(dirs):
        for f in _image_files(root / d):
            files.append(f)
            labels.append(y)
    if not files:
        raise ShardError(f"class folder {root} holds no images")
    return ClassFolder(root, names, dirs, files, labels)


def read_lines(path: str | Path) -> list[str]:
    """The stripped lines of a UTF-8 text file of names or templates (a byte-order mark is dropped: it made the first
    line another class), without blank lines and comment lines (first non-blank character ``#``: a ``# comment`` line
    became a concept). ``FileNotFoundError`` names a missing file, ``ValueError`` a folder or a file that is not UTF-8
    text (a PNG said "'utf-8' codec can't decode byte 0x89", naming no file)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p} is a folder; give a text file (one entry per line)")
    if not p.is_file():
        raise FileNotFoundError(f"file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text (byte {e.start}); give a UTF-8 text file, one entry per line "
                         "(iconv -f latin1 -t utf-8 converts a Latin-1 one)") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def name_key(name: str) -> str:
    """The key under which two spellings of a class name are the same name: underscores read as spaces, runs of
    whitespace as one space, case folded (``"Jowen_Gormere"``, ``" jowen  gormere"`` -> ``"jowen gormere"``). The one
    rule for name lists, class folders, ``--concept`` and audit folders alike."""
    return " ".join(name.replace("_", " ").split()).casefold()


def read_names(path: str | Path) -> list[str]:
    """:func:`read_lines` of a name list, refusing (``ValueError``, naming the file) a name given twice (compared
    case- and space-insensitively: ``unlearn --names`` with a name listed twice counted it as two classes, and the
    concept's own top-1 read 0.000 before any edit) and an empty list."""
    names = read_lines(path)
    if not names:
        raise ValueError(f"{path} holds no names (blank and '#' lines are skipped)")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        key = name_key(n)
        if key in seen:
            raise ValueError(f"{path}: {n!r} is listed twice (entries {seen[key] + 1} and {i + 1}); list each name "
                             "once")
        seen[key] = i
    return names


def read_templates(path: str | Path) -> list[str]:
    """:func:`read_lines` of a prompt-template file, refusing (``ValueError``, naming the file and line) an empty
    file and a template without ``{}`` (every class got the same prompt: utility read chance, 0.033, and passed;
    an empty file ended in a reshape traceback)."""
    templates = read_lines(path)
    if not templates:
        raise ValueError(f"{path} holds no templates (blank and '#' lines are skipped); give one per line, each with "
                         "{} where the class name goes")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"{path}: the template {bad[0]!r} has no {{}}; each template needs {{}} where the class name "
                         "goes (otherwise every class gets the same prompt)")
    return templates


def shared_images(a: str | Path, b: str | Path) -> list[tuple[Path, Path]]:
    """Image files of folder ``b`` that are also in folder ``a``: the same file (a hard or symbolic link: same
    inode) or the same bytes (a copy; only files whose size occurs in both folders are hashed, each once). Pairs
    ``(file in a, file in b)``. Used to keep the test images out of the validation the search sees (fifth trial:
    ``cp -al`` of the validation folder passed as the test folder was not noticed)."""
    import hashlib

    fa = {p: p.stat() for p in _image_files(Path(a))}
    fb = {p: p.stat() for p in _image_files(Path(b))}
    by_inode = {(st.st_dev, st.st_ino): p for p, st in fa.items()}
    sizes_b = {st.st_size for st in fb.values()}
    by_content = {(st.st_size, hashlib.sha256(p.read_bytes()).digest()): p for p, st in fa.items()
                  if st.st_size in sizes_b}
    sizes_a = {size for size, _ in by_content}
    out = []
    for p, st in fb.items():
        same = by_inode.get((st.st_dev, st.st_ino))
        if same is None and st.st_size in sizes_a:
            same = by_content.get((st.st_size, hashlib.sha256(p.read_bytes()).digest()))
        if same is not None:
            out.append((same, p))
    return out


def images_with_digests(folder: str | Path, digests: dict[str, str]) -> list[tuple[Path, str]]:
    """Image files of ``folder`` whose sha256 (hex) is a key of ``digests``: ``[(file, digests[sha])]``. Used to keep
    the forget set's own images out of the test and validation folders (ninth trial: the forget images copied in as
    the concept's test images read FA@5 0.00 where the held-out ones read 0.06, and flipped the verdict)."""
    import hashlib

    out = []
    for p in _image_files(Path(folder)):
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        if sha in digests:
            out.append((p, digests[sha]))
    return out

