"""Data read wrongly (trust cases D1, D3-D6): duplicate keys, high-bit-depth images, undecodable captions, and a
diagnosis that names the real cause when a shard yields nothing."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import raw_tar

from slugkit.data.curate import EmptyForgetSetError, curate
from slugkit.data.folders import iter_pairs, read_class_folder
from slugkit.data.shards import ReadStats, ShardError, decode_image, iter_samples


def _img(color=(200, 30, 30), size=(8, 8), mode="RGB", fmt="JPEG") -> bytes:
    b = io.BytesIO()
    Image.new(mode, size, color).save(b, format=fmt)
    return b.getvalue()


# ------------------------------------------------------------------------------------------------ D1 duplicates
DUPLICATES = {
    "not_adjacent": [("a.jpg", _img()), ("a.txt", b"Ann Lee on stage"), ("b.jpg", _img()), ("b.txt", b"a dog"),
                     ("a.jpg", _img((0, 0, 200))), ("a.txt", b"a photo of a red circle")],
    "adjacent": [("a.jpg", _img()), ("a.txt", b"Ann Lee on stage"), ("a.jpg", _img((0, 0, 200))),
                 ("a.txt", b"a photo of a red circle"), ("b.jpg", _img()), ("b.txt", b"a dog")],
    "adjacent_caption_only": [("a.jpg", _img()), ("a.txt", b"Ann Lee on stage"), ("a.txt", b"a red circle"),
                              ("b.jpg", _img()), ("b.txt", b"a dog")],
}


@pytest.mark.parametrize("layout", sorted(DUPLICATES))
def test_duplicate_keys_in_a_shard_are_skipped_and_counted(tmp_path, layout):
    path = raw_tar(tmp_path / "d.tar", DUPLICATES[layout])
    stats = ReadStats()
    got = list(iter_samples(path, stats=stats))
    assert [(s.key, s.caption) for s in got] == [("a", "Ann Lee on stage"), ("b", "a dog")]
    assert stats.skipped_duplicate_key == 1 and stats.samples == 2
    assert stats.as_dict()["skipped_duplicate_key"] == 1
    with pytest.raises(ShardError, match=r"d\.tar.*'a'.*more than once|more than once.*'a'.*d\.tar"):
        list(iter_samples(path, strict=True))


def test_curate_cap_holds_with_duplicate_keys(tmp_path):
    path = raw_tar(tmp_path / "d.tar", DUPLICATES["not_adjacent"])
    s = curate(path, "Ann Lee", tmp_path / "out", max_forget=1)
    forget = list(iter_samples(str(tmp_path / "out" / "forget.tar")))
    assert [f.caption for f in forget] == ["Ann Lee on stage"] and s["forget"] == 1
    retain = [r.caption for r in iter_samples(str(tmp_path / "out" / "retain.tar"))]
    assert retain == ["a dog"]
    assert s["read_stats"]["skipped_duplicate_key"] == 1
    with pytest.raises(ShardError, match="more than once"):
        curate(path, "Ann Lee", tmp_path / "strict", max_forget=1, strict=True)


def test_curate_counts_a_shard_listed_twice_once(tmp_path):
    path = raw_tar(tmp_path / "p.tar", [("a.jpg", _img()), ("a.txt", b"Ann Lee"), ("b.jpg", _img()),
                                        ("b.txt", b"a dog")])
    s = curate(f"{path}::{path}", "Ann Lee", tmp_path / "out", max_forget=5)
    assert s["forget"] == 1 and s["retain"] == 1
    assert len(list(iter_samples(str(tmp_path / "out" / "forget.tar")))) == 1
    assert len(list(iter_samples(str(tmp_path / "out" / "retain.tar")))) == 1


def test_a_copied_shard_or_folder_is_read_once_whatever_its_name(tmp_path, capsys):
    """A shard copied under another name (same keys, another file) and a folder holding the same pairs as a shard were
    read twice, silently: every pair counted double in the gradients. A pair byte-identical to one read earlier in
    the same read (image bytes and caption) is skipped and counted, naming both; a same image with another caption
    is another pair."""
    import shutil

    members = [("a.jpg", _img()), ("a.txt", b"Ann Lee on stage"), ("b.jpg", _img((0, 0, 200))),
               ("b.txt", b"a dog"), ("c.jpg", _img()), ("c.txt", b"a red square")]
    path = raw_tar(tmp_path / "d.tar", members)
    copy = tmp_path / "copy_of_d.tar"
    shutil.copy(path, copy)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(_img((0, 0, 200)))
    (folder / "x.txt").write_text("a dog")
    (folder / "y.jpg").write_bytes(_img((0, 0, 200)))
    (folder / "y.txt").write_text("a blue dog")
    for spec, kept, skipped, example in (
            (f"{path}::{copy}", ["Ann Lee on stage", "a dog", "a red square"], 3, f"{copy}:a = {path}:a"),
            (f"{path}::{folder}", ["Ann Lee on stage", "a dog", "a red square", "a blue dog"], 1,
             f"{folder / 'x.jpg'} = {path}:b"),
            (str(path), ["Ann Lee on stage", "a dog", "a red square"], 0, None)):
        stats = ReadStats()
        assert [s.caption for s in iter_pairs(spec, stats=stats)] == kept, spec
        assert stats.skipped_duplicate_pair == skipped and stats.samples == len(kept), spec
        assert stats.as_dict()["skipped_duplicate_pair"] == skipped
        if example:
            line = next(p for p in stats.problems() if "byte-identical" in p)
            assert line.startswith(f"{skipped} pair(s) byte-identical") and example in line, line
            with pytest.raises(ShardError, match="the same image and caption twice"):
                list(iter_pairs(spec, strict=True))
    # curate writes each pair once and says why
    s = curate(f"{path}::{copy}", "Ann Lee", tmp_path / "out")
    assert [f.caption for f in iter_samples(str(tmp_path / "out" / "forget.tar"))] == ["Ann Lee on stage"]
    assert sorted(r.caption for r in iter_samples(str(tmp_path / "out" / "retain.tar"))) == ["a dog", "a red square"]
    assert s["read_stats"]["skipped_duplicate_pair"] == 3
    assert any("byte-identical" in p for p in s["read_problems"])


def test_captioned_folder_key_collision_is_skipped_and_counted(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "a.png")  # same key "a", same caption a.txt
    (tmp_path / "a.txt").write_text("Ann Lee")
    stats = ReadStats()
    got = list(iter_pairs(str(tmp_path), stats=stats))
    assert len(got) == 1 and stats.skipped_duplicate_key == 1
    with pytest.raises(ShardError, match=r"a\.jpg.*a\.png|a\.png.*a\.jpg"):
        list(iter_pairs(str(tmp_path), strict=True))


# ------------------------------------------------------------------------------------------- D3 pixel formats
def _png16(w, h, colour_type, values) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB)."""
    row = b"\x00" + struct.pack(">" + "H" * len(values), *values) * w
    raw = row * h

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _encode(im: Image.Image, fmt: str) -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt)
    return b.getvalue()


def _palette_with_transparency() -> bytes:
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 0
    return _encode(p, "PNG")


SCALED = {  # encoded bytes -> expected RGB of pixel (1, 1), within 1
    "I;16 greyscale PNG 40000": (_encode(Image.new("I;16", (4, 4), 40000), "PNG"), (156, 156, 156)),
    "16-bit greyscale PNG (hand-written)": (_png16(4, 4, 0, (40000,)), (156, 156, 156)),
    "16-bit RGB PNG": (_png16(4, 4, 2, (40000, 1000, 65535)), (156, 4, 255)),
    "16-bit RGBA PNG, opaque": (_png16(4, 4, 6, (40000, 1000, 65535, 65535)), (156, 4, 255)),
    "mode I TIFF 40000": (_encode(Image.new("I", (4, 4), 40000), "TIFF"), (156, 156, 156)),
    "mode F TIFF 0.5": (_encode(Image.new("F", (4, 4), 0.5), "TIFF"), (128, 128, 128)),
    "palette with transparency": (_palette_with_transparency(), (255, 255, 255)),  # transparent -> white
    "RGBA fully transparent": (_encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG"), (255, 255, 255)),
    "LA half transparent": (_encode(Image.new("LA", (4, 4), (0, 128)), "PNG"), (127, 127, 127)),
    "CMYK JPEG red": (_encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"), (255, 0, 0)),
    "8-bit L PNG (unchanged)": (_encode(Image.new("L", (4, 4), 77), "PNG"), (77, 77, 77)),
}


@pytest.mark.parametrize("what", sorted(SCALED))
def test_pixel_formats_become_8bit_rgb_by_scaling(what):
    data, want = SCALED[what]
    im = decode_image(data, what)
    assert im.mode == "RGB"
    got = im.getpixel((1, 1))
    assert all(abs(g - w) <= 1 for g, w in zip(got, want)), (got, want)


def test_high_bit_depth_in_a_shard_is_scaled_not_clipped(tmp_path):
    """The D3 example: a 16-bit greyscale PNG of value 40000 is about 155, not white."""
    path = raw_tar(tmp_path / "h.tar", [("a.png", _img(40000, (32, 32), "I;16", "PNG")), ("a.txt", b"grey")])
    (s,) = iter_samples(path)
    assert np.asarray(s.image).max() <= 157 and np.asarray(s.image).min() >= 155


@pytest.mark.parametrize("what,image", [
    ("float image outside [0, 1]", Image.new("F", (4, 4), 3.5)),
    ("32-bit integers beyond 16 bits", Image.new("I", (4, 4), 1_000_000)),
])
def test_pixel_values_without_a_known_range_are_skipped_and_counted(tmp_path, what, image):
    path = raw_tar(tmp_path / "f.tar", [("a.png", _encode(image, "TIFF")), ("a.txt", b"x"),
                                       ("b.jpg", _img()), ("b.txt", b"fine")])
    stats = ReadStats()
    assert [s.key for s in iter_samples(path, stats=stats)] == ["b"] and stats.skipped_bad_image == 1
    with pytest.raises(ShardError, match=r"f\.tar:a.*(range|outside)"):
        list(iter_samples(path, strict=True))


def test_class_folder_images_are_scaled_too(tmp_path):
    (tmp_path / "Ann_Lee").mkdir()
    Image.new("I;16", (4, 4), 40000).save(tmp_path / "Ann_Lee" / "0.png")
    ((im, y),) = list(read_class_folder(tmp_path).load())
    assert abs(im.getpixel((0, 0))[0] - 156) <= 1 and y == 0


# ------------------------------------------------------------------------------------ D4 undecodable captions
def test_captioned_folder_latin1_caption_is_skipped_and_counted(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "bad.jpg")
    (tmp_path / "bad.txt").write_bytes("café with Ann Lee".encode("latin-1"))
    Image.new("RGB", (8, 8)).save(tmp_path / "good.jpg")
    (tmp_path / "good.txt").write_text("Ann Lee again", encoding="utf-8")
    stats = ReadStats()
    got = list(iter_pairs(str(tmp_path), stats=stats))
    assert [s.caption for s in got] == ["Ann Lee again"]
    assert stats.skipped_bad_caption == 1 and stats.as_dict()["skipped_bad_caption"] == 1
    with pytest.raises(ShardError, match=r"bad\.txt.*UTF-8"):
        list(iter_pairs(str(tmp_path), strict=True))
    s = curate(str(tmp_path), "Ann Lee", tmp_path / "out")  # the run does not abort
    assert s["forget"] == 1 and s["read_stats"]["skipped_bad_caption"] == 1


def test_shard_latin1_caption_is_a_bad_caption(tmp_path):
    path = raw_tar(tmp_path / "c.tar", [("a.jpg", _img()), ("a.txt", "café".encode("latin-1"))])
    stats = ReadStats()
    assert list(iter_samples(path, stats=stats)) == [] and stats.skipped_bad_caption == 1
    with pytest.raises(ShardError, match=r"c\.tar:a.*UTF-8"):
        list(iter_samples(path, strict=True))


# --------------------------------------------------------------------------------- D5/D6 diagnoses, not spelling
def _parquet(path):
    path.write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    return str(path)


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    return str(path)


def _empty_tar(path):
    return raw_tar(path, [])


def _zero_bytes(path):
    path.write_bytes(b"")
    return str(path)


def _gzipped_json(path):
    import gzip

    path.write_bytes(gzip.compress(b'{"caption": "Ann Lee"}\n' * 50))
    return str(path)


def _dotted(path):
    return raw_tar(path, [m for i in range(3) for m in ((f"img.v2.{i:05d}.jpg", _img()),
                                                       (f"img.v2.{i:05d}.txt", b"Ann Lee"))])


def _other_caption_ext(path):
    return raw_tar(path, [m for i in range(3) for m in ((f"s{i}.jpg", _img()), (f"s{i}.caption", b"Ann Lee"))])


def _no_captions(path):
    return raw_tar(path, [(f"s{i}.jpg", _img()) for i in range(3)])


DIAGNOSES = {  # maker -> patterns the message must contain (besides the file name)
    "parquet": (_parquet, "x.parquet", [r"not a tar", r"Parquet"]),
    "random bytes": (_random_bytes, "x.tar", [r"not a tar"]),
    "empty tar": (_empty_tar, "x.tar", [r"no file members|empty"]),
    "0-byte file": (_zero_bytes, "x.tar", [r"no file members", r"0-byte"]),
    "gzip that holds no tar": (_gzipped_json, "x.tar.gz", [r"not a tar", r"compressed"]),
    "dots in base names": (_dotted, "x.tar", [r"6 member", r"dot", r"v2\.00000\.jpg", r"merged", r"1 key"]),
    "captions with another extension": (_other_caption_ext, "x.tar", [r"6 member", r"caption", r"\.txt",
                                                                      r"3 image"]),
    "images without captions": (_no_captions, "x.tar", [r"3 member", r"3 image", r"\.txt"]),
}


@pytest.mark.parametrize("case", sorted(DIAGNOSES))
def test_empty_forget_set_names_the_real_cause(tmp_path, case):
    make, name, patterns = DIAGNOSES[case]
    path = make(tmp_path / name)
    with pytest.raises(EmptyForgetSetError) as ei:
        curate(path, "Ann Lee", tmp_path / "out")
    msg = str(ei.value)
    assert "spelling" not in msg and name in msg, msg
    for pat in patterns:
        assert __import__("re").search(pat, msg), (pat, msg)
    stats = ReadStats()
    list(iter_samples(path, stats=stats))
    assert stats.diagnosis() in msg


@pytest.mark.parametrize("case", ["parquet", "random bytes", "empty tar", "0-byte file", "gzip that holds no tar"])
def test_strict_names_a_shard_that_is_not_a_tar_or_empty(tmp_path, case):
    make, name, patterns = DIAGNOSES[case]
    path = make(tmp_path / name)
    with pytest.raises(ShardError) as ei:
        list(iter_samples(path, strict=True))
    assert name in str(ei.value) and __import__("re").search(patterns[0], str(ei.value))


def test_not_a_tar_is_not_reported_as_truncated(tmp_path):
    stats = ReadStats()
    path = _parquet(tmp_path / "x.parquet")
    assert list(iter_samples(path, stats=stats)) == []
    assert stats.not_tar_shards == [path] and stats.truncated_shards == []
    d = stats.as_dict()
    assert d["not_tar_shards"] == [path]
    assert all(isinstance(v, int) for k, v in d.items() if k.startswith("skipped_"))  # what the verdict sums


def test_spelling_hint_only_when_pairs_were_read(tmp_path):
    path = raw_tar(tmp_path / "ok.tar", [("a.jpg", _img()), ("a.txt", b"a dog")])
    with pytest.raises(EmptyForgetSetError, match="1 samples scanned.*spelling"):
        curate(path, "Ann Lee", tmp_path / "out")


def test_names_and_template_files_are_read_strictly(tmp_path):
    """Sixteenth trial: a name listed twice was two classes (the concept read 0.000 before any edit), a template
    without {} put utility at chance and passed, an empty templates file ended in a traceback, a byte-order mark made
    the first comment line a class, a Latin-1 or PNG file gave a bare codec error, a folder read as a file."""
    from slugkit.data.folders import read_lines, read_names, read_templates

    f = tmp_path / "names.txt"
    f.write_bytes("\ufeff# my names\r\nJowen Gormere\r\n\r\nHasa Malwick\r\n".encode())
    assert read_lines(f) == read_names(f) == ["Jowen Gormere", "Hasa Malwick"]
    for read, text, said in (
            (read_names, "Jowen Gormere\nHasa Malwick\njowen  gormere\n",
             r"names.txt: 'jowen  gormere' is listed twice \(entries 1 and 3\)"),
            (read_names, "# only a comment\n", "holds no names"),
            (read_templates, "a photo of a {}.\na photo of\n", r"the template 'a photo of' has no \{\}"),
            (read_templates, "\n# nothing\n", "holds no templates")):
        f.write_text(text)
        with pytest.raises(ValueError, match=said):
            read(f)
    b = tmp_path / "latin.txt"
    b.write_bytes("Jos\xe9 Mart\xedn\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt is not UTF-8 text \(byte 3\)"):
        read_lines(b)
    with pytest.raises(ValueError, match="is a folder; give a text file"):
        read_lines(tmp_path)


def test_one_name_rule_for_name_lists_class_folders_and_audit_folders(tmp_path):
    """Three copies of the name rule had drifted: the audit's kept a double space ("jowen  gormere" was not in the
    name list there while `unlearn` accepted it). `data.folders.name_key` is now the one rule."""
    from PIL import Image

    from slugkit.audit.data import folder_audit_data
    from slugkit.data.folders import name_key

    assert name_key(" Jowen__Gormere ") == name_key("jowen  GORMERE") == name_key("Jowen Gormere") == "jowen gormere"
    assert name_key("STRASSE") == name_key("straße")  # case folded, not only lowered
    assert name_key("Jowen Gormere") != name_key("Jowen Gormer")
    for d in ("jowen  gormere", "Hasa_Malwick"):
        (tmp_path / "test" / d).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "test" / d / "0.png")

    class Adapter:
        @staticmethod
        def preprocess(img):
            import torch
            return torch.zeros(3, 4, 4)

    data = folder_audit_data(Adapter(), "jowen_gormere", ["Jowen Gormere", "Hasa Malwick"], ["{}."],
                             str(tmp_path / "test"))
    assert data.concept == "Jowen Gormere" and sorted(data.test) == ["Hasa Malwick", "Jowen Gormere"]


# ------------------------------------------------------------------------------------------------ trial 24
def test_folder_links_upper_case_captions_and_huge_images(tmp_path, monkeypatch):
    """A linked subfolder was skipped without a word (600 of 611 pairs unread), `UP1.JPG` + `UP1.TXT` was "no
    caption", and an image over PIL's decompression-bomb size leaked PIL's warning line or was skipped with no reason
    but under --strict (trial 24): links are followed (a loop read once), `.TXT` pairs, the warning is silenced and
    the skip says why."""
    import os

    root = tmp_path / "set"
    (root / "real").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for d, stem in ((root / "real", "a"), (tmp_path / "elsewhere", "b")):
        (d / f"{stem}.jpg").write_bytes(_img())
        (d / f"{stem}.txt").write_text(f"Ann Lee {stem}")
    os.symlink(tmp_path / "elsewhere", root / "linked")
    os.symlink(root, root / "real" / "loop")  # a link back up: read once, no endless walk
    (root / "UP1.JPG").write_bytes(_img((0, 200, 0)))
    (root / "UP1.TXT").write_text("Ann Lee upper")
    stats = ReadStats()
    got = sorted(s.key for s in iter_pairs(str(root), stats=stats))
    assert got == ["UP1", "linked/b", "real/a"] and stats.problems() == []

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40×40 > 1000 warns; 50×50 > 2×1000 is refused by PIL
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # a leaked DecompressionBombWarning fails the test
        assert decode_image(_img(size=(40, 40)), "big.jpg").size == (40, 40)
    (root / "huge.jpg").write_bytes(_img(size=(50, 50)))
    (root / "huge.txt").write_text("Ann Lee huge")
    stats = ReadStats()
    assert len(list(iter_pairs(str(root), stats=stats))) == 3
    assert stats.skipped_bad_image == 1 and "decompression bomb" in stats.problems()[0]


def test_a_tar_of_links_names_the_links(tmp_path):
    """`tar cf x.tar -C dir .` over links stores links: it read as "an empty tar" (trial 24)."""
    import tarfile

    (tmp_path / "d").mkdir()
    for name in ("a.jpg", "a.txt"):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = tarfile.SYMTYPE, f"/elsewhere/{name}"
        with tarfile.open(tmp_path / "links.tar", "a") as tf:
            tf.addfile(info)
    stats = ReadStats()
    assert list(iter_samples(str(tmp_path / "links.tar"), stats=stats)) == []
    assert stats.link_members == 2
    assert "only links, e.g. " in stats.problems()[0] and "tar -h" in stats.problems()[0]
    with pytest.raises(ShardError, match="only links"):
        list(iter_samples(str(tmp_path / "links.tar"), strict=True))


def test_what_a_captioned_folder_holds_but_does_not_read_is_said(tmp_path):
    """Trial 25: a folder with one stray .tar beside its images was read as a folder of shards (its pairs dropped
    without a word); a .tar below a captioned folder, a folder linked twice and an image link to nothing ("a caption
    with no image") were not said, or said wrongly."""
    import os

    from slugkit.data.shards import expand_urls

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jpg").write_bytes(_img())
    (mixed / "a.txt").write_text("Ann Lee")
    raw_tar(mixed / "extra.tar", [("b.jpg", _img()), ("b.txt", b"Bo Ray")])
    with pytest.raises(ShardError, match=r"holds both \.tar shards \(extra\.tar\) and images \(a\.jpg"):
        expand_urls(str(mixed))
    with pytest.raises(ShardError, match="holds both"):
        list(iter_pairs(str(mixed)))

    root = tmp_path / "set"
    (root / "old").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "s.jpg").write_bytes(_img((0, 0, 200)))
    (tmp_path / "shared" / "s.txt").write_text("Ann Lee shared")
    os.symlink(tmp_path / "shared", root / "a")
    os.symlink(tmp_path / "shared", root / "b")
    raw_tar(root / "old" / "x.tar", [("c.jpg", _img()), ("c.txt", b"Cy Dee")])
    os.symlink("/nonexistent/x.jpg", root / "dang.jpg")
    (root / "dang.txt").write_text("Ann Lee dangling")
    stats = ReadStats()
    assert [s.key for s in iter_pairs(str(root), stats=stats)] == ["a/s"]
    said = "\n".join(stats.problems())
    assert stats.skipped_broken_link == 1 and stats.skipped_no_image == 0
    assert "1 pair(s) skipped: the image or caption is a link to nothing (e.g. " in said and "dang.jpg -> " in said
    assert f"{root / 'b'} is the folder {root / 'a'} again (linked twice): read once" in said
    assert "1 .tar file(s) inside the captioned folder" in said and f"'{root}::{root / 'old' / 'x.tar'}'" in said
