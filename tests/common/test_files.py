"""The atomic writers: outputs honour the umask, errors name the file, recorded paths are final paths."""

import errno
import json
import os
import stat
import tempfile

import pytest

from slugkit.common import files
from slugkit.common.files import atomic_dir, atomic_write_bytes, write_json


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_current_umask_reads_without_changing(umask):
    assert files.current_umask() == umask
    assert files.current_umask() == umask  # unchanged by the read


def test_atomic_write_bytes_honours_umask(tmp_path, umask):
    p = tmp_path / "sub" / "x.json"
    atomic_write_bytes(p, b"{}")
    assert _mode(p) == 0o666 & ~umask  # mkstemp alone would give 0600 whatever the umask
    write_json(tmp_path / "y.json", {"a": 1})
    assert _mode(tmp_path / "y.json") == 0o666 & ~umask
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert _mode(p) == _mode(plain)


def test_atomic_dir_honours_umask(tmp_path, umask):
    with atomic_dir(tmp_path / "d") as tmp:
        fd, name = tempfile.mkstemp(dir=tmp)  # 0600, as a writer outside files.py makes it
        os.close(fd)
        os.mkdir(tmp / "sub", 0o700)
    assert _mode(tmp_path / "d") == 0o777 & ~umask
    assert _mode(tmp_path / "d" / "sub") == 0o777 & ~umask
    assert _mode(tmp_path / "d" / os.path.basename(name)) == 0o666 & ~umask


def test_atomic_dir_keeps_an_existing_folders_mode(tmp_path, umask):
    d = tmp_path / "d"
    d.mkdir()
    (d / "old.txt").write_text("x")
    os.chmod(d, 0o750)
    with atomic_dir(d, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("y")
    assert _mode(d) == 0o750 and _mode(d / "new.txt") == 0o666 & ~umask
    assert (d / "old.txt").read_text() == "x"  # a folder without a manifest: what slug does not write now is kept


def test_overwrite_replaces_only_a_folder_slug_wrote(tmp_path):
    """`slug apply --pipeline P --out ~/Documents --overwrite` replaced the folder whole (new-user trial): with a
    marker, --overwrite replaces only a folder holding it, and the refusal names what is there."""
    docs = tmp_path / "Documents"
    docs.mkdir()
    for i in range(7):
        (docs / f"letter{i}.txt").write_text("mine")
    # without --overwrite too: it advised --overwrite, which was then refused (trial 43)
    with pytest.raises(FileExistsError, match=r"Documents holds files slug did not write .*replaces only a folder"):
        with atomic_dir(docs, marker="slugkit_patch.json"):
            pass
    with pytest.raises(FileExistsError, match=r"holds files slug did not write \(letter0.txt, .*letter4.txt and 2 "
                                              r"more; no slugkit_patch.json\); --overwrite replaces only a folder"):
        with atomic_dir(docs, overwrite=True, marker="slugkit_patch.json"):
            pass
    assert len(list(docs.iterdir())) == 7 and sorted(p.name for p in tmp_path.iterdir()) == ["Documents"]
    out = tmp_path / "patched"
    with atomic_dir(out, marker="slugkit_patch.json") as tmp:
        (tmp / "slugkit_patch.json").write_text("{}")
        (tmp / "old.bin").write_text("x")
    (out / "README.md").write_text("my model card")  # a user's file in slug's output: kept (and named)
    (out / "README.md.before-slug").write_text("older card")  # and one already named so: not overwritten
    with atomic_dir(out, overwrite=True, marker="slugkit_patch.json") as tmp:  # slug's own output: replaced
        (tmp / "slugkit_patch.json").write_text("{}")
        (tmp / "README.md").write_text("slug's")
    assert sorted(p.name for p in out.iterdir()) == [files.MANIFEST, "README.md", "README.md.before-slug",
                                                     "README.md.before-slug-1", "slugkit_patch.json"]
    assert (out / "README.md.before-slug-1").read_text() == "my model card" and not (out / "old.bin").exists()
    assert (out / "README.md.before-slug").read_text() == "older card"


def test_fix_modes_keeps_executable_bit(tmp_path, umask):
    f = tmp_path / "tool.sh"
    f.write_text("#!/bin/sh\n")
    os.chmod(f, 0o700)
    g = tmp_path / "data.bin"
    g.write_bytes(b"")
    os.chmod(g, 0o600)
    files.fix_modes(tmp_path)
    assert _mode(f) == 0o777 & ~umask and _mode(g) == 0o666 & ~umask


def test_failed_write_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "x.bin")
    assert list(tmp_path.iterdir()) == []


def test_final_paths_map_temporary_folders(tmp_path):
    tmp, final = tmp_path / ".run.slug-ab12.tmp", tmp_path / "run"
    files.register_staging(tmp, final)
    try:
        doc = {"out": str(tmp), "forget": str(tmp / "data" / "forget.tar"), "rel": ".run.slug-ab12.tmp/x",
               "other": str(tmp_path / ".run.slug-ab12.tmpx"), "n": 3, "list": [str(tmp / "a")]}
        write_json(tmp_path / "r.json", doc)
        got = json.loads((tmp_path / "r.json").read_text())
    finally:
        files.unregister_staging(tmp)
    assert got == {"out": str(final), "forget": str(final / "data" / "forget.tar"), "rel": "run/x",
                   "other": str(tmp_path / ".run.slug-ab12.tmpx"), "n": 3, "list": [str(final / "a")]}
    assert files.final_path(str(tmp)) == str(tmp)  # unregistered: unchanged


def test_output_targets_checked_before_work(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(IsADirectoryError) as e:
        files.check_file_target(d)
    assert e.value.filename == str(d)
    with pytest.raises(NotADirectoryError) as e:
        files.check_file_target(f / "g.safetensors")
    assert e.value.filename == str(f)
    with pytest.raises(NotADirectoryError):
        files.check_folder_target(f)
    files.check_file_target(tmp_path / "new" / "g.safetensors")
    files.check_folder_target(tmp_path / "new.ckpt")
    files.check_file_target(None)


def test_a_write_that_cannot_start_names_the_file_asked_for(tmp_path, monkeypatch):
    """A read-only folder: the error named the temporary file (`.x.safetensors.3b9h65nu.tmp: Read-only file
    system`), not the --out given (fifteenth trial)."""
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".x.safetensors.3b9h65nu.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(tmp_path / "x.safetensors", b"data")
    assert e.value.filename == str(tmp_path / "x.safetensors") and e.value.errno == errno.EROFS


def test_a_failed_atomic_dir_removes_the_parents_it_created(tmp_path):
    """Twenty-third trial: a refused `slug apply --pipeline … --out wf/pipe` left an empty `wf/`."""
    (tmp_path / "keep").mkdir()
    for out in (tmp_path / "wf" / "a" / "pipe", tmp_path / "keep" / "pipe"):
        with pytest.raises(ValueError):
            with atomic_dir(out):
                raise ValueError("refused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"] and list((tmp_path / "keep").iterdir()) == []
    with atomic_dir(tmp_path / "wf" / "b" / "pipe") as tmp:  # a success keeps them
        (tmp / "x").write_text("x")
    assert (tmp_path / "wf" / "b" / "pipe" / "x").read_text() == "x"


def test_atomic_dir_never_moves_a_file_aside_and_names_its_own_path(tmp_path):
    """A folder written over an existing file moved the file to a hidden `.NAME.….old` and left it there (`slug apply
    --llava … --out notes.txt`, exit 0); a folder it cannot create was named by its temporary sibling
    (`/sys/.x.ddn6uufi.tmp: Operation not permitted`; trial 26)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt exists and is not a folder"):
        with atomic_dir(notes, overwrite=True):
            pytest.fail("the block ran")
    assert notes.read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    if os.path.isdir("/proc/self"):  # procfs takes no new folders, even from root
        with pytest.raises(OSError) as e:
            with atomic_dir("/proc/slugkit-test-out"):
                pytest.fail("the block ran")
        assert e.value.filename == "/proc/slugkit-test-out"
