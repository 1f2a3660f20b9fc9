"""The run folder: one writer at a time (a lock that dies with its process), assembled in a temporary folder and
renamed into place, nothing left by a failure, Ctrl-C or a killed process; modes follow the umask."""

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from slugkit.common.errors import OutputExistsError
from slugkit.common.files import write_json
from slugkit.common.outguard import MANIFEST
from slugkit.common.runfolder import (RunLockedError, abandon_claims, claim_out, inputs_folder, out_lock,
                                     run_folder)


@pytest.fixture(autouse=True)
def _no_claims_left():
    yield
    abandon_claims()  # a failing test must not leave a claim behind for the next one


def _leftovers(parent):
    """Temporary folders, old folders and lock files of slugkit next to the run folders in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if ".slug-" in p.name)


def _names(out):
    """The entries of a run folder, without the manifest of the run's own entries."""
    return sorted(p.name for p in out.iterdir() if p.name != MANIFEST)


def _old_run(out):
    """A run slug wrote (with its manifest of entries): result.json and patch/patch.json."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with run_folder(out) as tmp:
        (tmp / "result.json").write_text('{"old": true}')
        (tmp / "patch").mkdir()
        (tmp / "patch" / "patch.json").write_text("old patch")


def _committed_run(out, report: str):
    """A run committed by run_folder (so with its manifest): result.json, report.md and patch/patch.json."""
    with run_folder(out) as tmp:
        (tmp / "result.json").write_text("{}")
        (tmp / "report.md").write_text(report)
        (tmp / "patch").mkdir()
        (tmp / "patch" / "patch.json").write_text("{}")


def _both_claims_refused(out, error, match: str) -> None:
    """An early claim (`slug demo`) and a run folder's own claim of ``out`` with --overwrite both raise ``error``."""
    for early in (True, False):
        with pytest.raises(error, match=match):
            if early:
                claim_out(out, overwrite=True)
            else:
                with run_folder(out, overwrite=True):
                    pass


def _child(code: str, *args: str) -> subprocess.Popen:
    """A python process running ``code`` (which prints ``ready`` once it holds what the test needs)."""
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "ready", (line, p.stderr.read() if p.poll() is not None else "")
    return p


HOLD_RUN = """
    import sys, time
    from pathlib import Path
    from slugkit.common.runfolder import run_folder
    with run_folder(sys.argv[1], overwrite=True) as tmp:
        (tmp / "result.json").write_text("{}")
        print("ready", flush=True)
        time.sleep(60)
"""

HOLD_EARLY = """
    import sys, time
    from pathlib import Path
    from slugkit.common.runfolder import claim_out, inputs_folder
    out = Path(sys.argv[1])
    claim_out(out, overwrite=True)
    inp = inputs_folder(out)  # the run's temporary folder: out itself is not touched
    (inp / "data").mkdir(parents=True)
    (inp / "data" / "forget.tar").write_text("partial")
    print("ready", flush=True)
    time.sleep(60)
"""


def test_run_appears_whole_by_rename(tmp_path):
    out = tmp_path / "run"
    with run_folder(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".run.slug-") and not out.exists()
        (tmp / "patch").mkdir()
        (tmp / "patch" / "patch.json").write_text("{}")
        write_json(tmp / "run.json", {"out": str(tmp), "forget": str(tmp / "data" / "forget.tar")})
        (tmp / "result.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "patch", "result.json", "run.json"]
    doc = json.loads((out / MANIFEST).read_text())
    assert doc["entries"] == [MANIFEST, "patch", "result.json", "run.json"] and doc["files"] == ["patch/patch.json"]
    assert sorted(doc["stamps"]) == ["patch/patch.json", "result.json", "run.json"]  # [size, mtime_ns] each
    assert json.loads((out / "run.json").read_text()) == {"out": str(out), "forget": str(out / "data" / "forget.tar")}
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError, ValueError])
def test_failure_leaves_nothing_and_keeps_the_old_run(tmp_path, error):
    out = tmp_path / "run"
    with pytest.raises(error):
        with run_folder(out) as tmp:
            (tmp / "data").mkdir()
            (tmp / "data" / "forget.tar").write_text("x")
            raise error()
    assert list(tmp_path.iterdir()) == []
    _old_run(out)
    with pytest.raises(error):
        with run_folder(out, overwrite=True) as tmp:
            (tmp / "result.json").write_text("{}")
            raise error()
    assert json.loads((out / "result.json").read_text()) == {"old": True}
    assert _leftovers(tmp_path) == []


def test_existing_run_needs_overwrite_and_is_replaced_whole(tmp_path):
    out = tmp_path / "run"
    _old_run(out)
    with pytest.raises(OutputExistsError, match="already holds a run"):
        with run_folder(out):
            pass
    with run_folder(out, overwrite=True) as tmp:
        (tmp / "result.json").write_text('{"new": true}')
    assert _names(out) == ["result.json"]  # the old run's patch/ went with it
    assert _leftovers(tmp_path) == []


def test_other_files_in_out_are_kept(tmp_path, capfd):
    """A folder that holds no run (a caller's inputs, a user's notes) keeps what the run does not write, and names it
    (it was kept without a word: trial 36)."""
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "data" / "forget.tar").write_text("inputs")
    (out / "notes.txt").write_text("mine")
    (out / "report.md").write_text("stale")
    with run_folder(out) as tmp:
        (tmp / "report.md").write_text("new")
        (tmp / "result.json").write_text("{}")
    assert (out / "data" / "forget.tar").read_text() == "inputs" and (out / "notes.txt").read_text() == "mine"
    assert (out / "report.md").read_text() == "new"
    assert (out / "report.md.before-slug").read_text() == "stale"  # the user's own report.md was replaced silently
    assert _leftovers(tmp_path) == []
    assert "kept in" in (err := capfd.readouterr().err) and "data, notes.txt" in err and "report.md as" in err, err


def test_a_users_entries_named_like_the_runs_are_kept_aside(tmp_path, capfd):
    """`slug demo --out userdir` where userdir held the user's own data/ and report.md (no run): they were replaced
    without a word (new-user trial). They are kept as NAME.before-slug and named; early claims (the demo) too."""
    out = tmp_path / "userdir"
    (out / "data").mkdir(parents=True)
    (out / "data" / "important.csv").write_text("mine")
    (out / "report.md").write_text("my report")
    (out / "data.before-slug").write_text("B")  # already there: never overwritten (third trial)
    claim_out(out)
    inp = inputs_folder(out)  # the run's temporary folder: out itself is not touched
    (inp / "data").mkdir()
    (inp / "data" / "forget.tar").write_text("curated")
    with run_folder(out) as tmp:
        (tmp / "report.md").write_text("slug's")
        (tmp / "result.json").write_text("{}")
    assert (out / "data" / "forget.tar").read_text() == "curated" and (out / "report.md").read_text() == "slug's"
    assert (out / "data.before-slug-1" / "important.csv").read_text() == "mine"
    assert (out / "data.before-slug").read_text() == "B"
    assert (out / "report.md.before-slug").read_text() == "my report"
    err = capfd.readouterr().err
    assert "data as data.before-slug-1, report.md as report.md.before-slug" in err and _leftovers(tmp_path) == []


def test_overwrite_refuses_a_users_files_inside_the_runs_folders(tmp_path):
    """`--overwrite` deleted a user's note put into RUN/patch/ and RUN/data/ with the old run (new-user trial):
    refused before any work, naming them; the top level's are carried (test above)."""
    out = tmp_path / "run"
    with run_folder(out) as tmp:
        (tmp / "result.json").write_text("{}")
        (tmp / "patch").mkdir()
        (tmp / "patch" / "patch.json").write_text("{}")
    (out / "patch" / "mynote.txt").write_text("mine")
    _both_claims_refused(out, OutputExistsError, r"holds files slug did not write inside its run's folders "
                                                 r"\(patch/mynote.txt\); --overwrite would delete them")
    assert (out / "patch" / "mynote.txt").read_text() == "mine" and _leftovers(tmp_path) == []
    (out / "patch" / "mynote.txt").unlink()
    mine = tmp_path / "mine"
    mine.mkdir()
    (out / "patch" / "link").symlink_to(mine)  # a symlink and an empty folder went silently (third trial)
    (out / "patch" / "emptydir").mkdir()
    with pytest.raises(OutputExistsError, match=r"\(patch/link, patch/emptydir/\)"):
        claim_out(out, overwrite=True)
    (out / "patch" / "link").unlink()
    (out / "patch" / "emptydir").rmdir()
    with run_folder(out, overwrite=True) as tmp:
        (tmp / "result.json").write_text('{"new": 1}')
    assert _names(out) == ["result.json"]


@pytest.mark.parametrize("foreign", ["compare.json", "canvas.json", "result.json"])
def test_another_commands_run_is_a_run_too(tmp_path, foreign, capfd):
    """`slug compare --out` on a demo's run folder (or the reverse) must not merge into it: every command's marker
    counts, whichever command asks."""
    out = tmp_path / "run"
    with run_folder(out, marker=foreign) as tmp:  # that command's run, with its manifest
        (tmp / foreign).write_text('{"old": true}')
        (tmp / "data").mkdir()
    for marker in ("result.json", "compare.json", "canvas.json"):
        with pytest.raises(OutputExistsError, match=f"already holds a run \\({foreign} present\\)"):
            with run_folder(out, marker=marker):
                pass
    assert (out / foreign).read_text() == '{"old": true}' and (out / "data").is_dir()
    with run_folder(out, overwrite=True, marker="compare.json") as tmp:
        (tmp / "compare.json").write_text("{}")
    assert _names(out) == ["compare.json"]  # replaced whole, nothing merged
    assert _leftovers(tmp_path) == []
    said = f"note: {out} holds another command's run ({foreign}); --overwrite replaces it"  # fifth trial: silent
    assert (said in capfd.readouterr().err) == (foreign != "compare.json")


def test_refused_lock_leaves_no_folders_it_made(tmp_path):
    """A lock file that cannot be made (here: its name too long) takes the parent folders made for it away."""
    out = tmp_path / "new" / "deeper" / ("x" * 250)  # a legal folder name; ".<name>.slug-lock" is not
    with pytest.raises(OSError, match="cannot create or lock this output folder"):
        claim_out(out)
    assert list(tmp_path.iterdir()) == []


def test_a_mount_point_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """A mount point (a docker volume given as --out) cannot be renamed over or removed: a run into it failed at the
    end and the next run's recovery deleted files in it (new-user trial) — it is refused up front, nothing touched."""
    from slugkit.common import outlock

    out = tmp_path / "vol"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    monkeypatch.setattr(outlock.os.path, "ismount", lambda p: os.fspath(p) == os.fspath(out))
    with pytest.raises(ValueError, match=r"is a mount point; .* choose a folder inside it \(e\.g\. .*vol/run\)"):
        claim_out(out)
    with pytest.raises(ValueError, match="is a mount point"):
        with run_folder(out):
            pass
    assert (out / "mine.txt").read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["vol"]
    with run_folder(out / "run") as tmp:  # a folder inside it is fine
        (tmp / "result.json").write_text("{}")
    assert (out / "run" / "result.json").exists()


def test_file_in_the_way_is_refused(tmp_path):
    f = tmp_path / "run"
    f.write_text("a file")
    with pytest.raises(NotADirectoryError) as e:
        with run_folder(f):
            pass
    assert e.value.filename == str(f) and f.read_text() == "a file"
    assert _leftovers(tmp_path) == []


def test_nested_runs_inside_a_temporary_folder_write_in_place(tmp_path):
    out = tmp_path / "cmp"
    with run_folder(out, marker="compare.json") as tmp:
        with run_folder(tmp / "slug") as inner:
            assert inner == tmp / "slug"
            inner.mkdir()
            (inner / "result.json").write_text("{}")
        (tmp / "compare.json").write_text("{}")
    assert (out / "slug" / "result.json").is_file() and _leftovers(tmp_path) == []


def test_early_claim_owns_what_the_caller_writes(tmp_path):
    """`slug demo` claims OUT, curates OUT/data, then runs: the data becomes part of the run, an old run comes back
    when the new one fails, and a claim whose run never ran is undone."""
    out = tmp_path / "run"
    _old_run(out)
    with pytest.raises(OutputExistsError):
        claim_out(out, overwrite=False)
    assert json.loads((out / "result.json").read_text()) == {"old": True} and _leftovers(tmp_path) == []
    claim_out(out, overwrite=True)
    inp = inputs_folder(out)  # the run's temporary folder: out itself is not touched
    (inp / "data").mkdir(parents=True)
    (inp / "data" / "forget.tar").write_text("new inputs")
    with pytest.raises(KeyboardInterrupt):
        with run_folder(out, overwrite=True) as tmp:
            (tmp / "result.json").write_text("{}")
            raise KeyboardInterrupt
    assert _names(out) == ["patch", "result.json"]  # the old run, untouched
    assert _leftovers(tmp_path) == []

    claim_out(out, overwrite=True)
    inp = inputs_folder(out)  # the run's temporary folder: out itself is not touched
    (inp / "data").mkdir(parents=True)
    (inp / "data" / "forget.tar").write_text("new inputs")
    with run_folder(out, overwrite=True) as tmp:
        (tmp / "result.json").write_text('{"new": true}')
    assert _names(out) == ["data", "result.json"]
    assert (out / "data" / "forget.tar").read_text() == "new inputs" and _leftovers(tmp_path) == []

    claim_out(out, overwrite=True)  # claimed and inputs written, then the command fails before its run starts
    inp = inputs_folder(out)  # the run's temporary folder: out itself is not touched
    (inp / "data").mkdir(parents=True)
    (inp / "data" / "forget.tar").write_text("partial")
    abandon_claims()
    assert json.loads((out / "result.json").read_text()) == {"new": True} and _leftovers(tmp_path) == []


def test_second_writer_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "run"
    holder = _child(HOLD_RUN, str(out))
    try:
        with pytest.raises(RunLockedError) as e:
            with run_folder(out, overwrite=True):
                pass
        assert str(e.value) == (f"another slug run is writing to {out} (pid {holder.pid}); wait for it or choose "
                                "another --out")
        with pytest.raises(RunLockedError):
            claim_out(out, overwrite=True)
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


def test_dead_holders_lock_is_taken_over_and_its_leftovers_removed(tmp_path, capfd):
    out = tmp_path / "run"
    holder = _child(HOLD_RUN, str(out))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert any(n.endswith(".tmp") for n in _leftovers(tmp_path))  # what a SIGKILL leaves
    with run_folder(out) as tmp:
        (tmp / "result.json").write_text("{}")
    err = capfd.readouterr().err
    assert f"pid {holder.pid}" in err and "taking over its lock" in err
    assert _leftovers(tmp_path) == []


def test_a_dead_early_claim_leaves_out_untouched(tmp_path, capfd):
    """An early claim (`slug demo` curating its inputs) writes into its temporary folder, not into OUT: the old run
    stays in place while the new one is prepared, and a `kill -9` leaves only the hidden folder, removed (and said)
    by the next claim. (OUT used to be moved aside and its inputs curated into a visible OUT/data, where a file the
    user put was deleted with them, fifth trial.)"""
    out = tmp_path / "run"
    _old_run(out)
    holder = _child(HOLD_EARLY, str(out))
    assert _names(out) == ["patch", "result.json"]  # still the old run, readable while the new one is prepared
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert _names(out) == ["patch", "result.json"] and any(n.endswith(".tmp") for n in _leftovers(tmp_path))
    with pytest.raises(OutputExistsError):  # the old run is there, so it needs --overwrite
        claim_out(out, overwrite=False)
    assert "removed its temporary folder .run.slug-" in capfd.readouterr().err
    assert _leftovers(tmp_path) == []


def test_waiting_lock_serialises_writers(tmp_path):
    out = tmp_path / "world"
    holder = _child(HOLD_RUN, str(out))
    holder.kill()  # the kernel drops its lock: a waiting claim gets it at once
    holder.wait()
    with out_lock(out, wait=True):
        with run_folder(out, overwrite=True, marker="world.json") as tmp:
            (tmp / "world.json").write_text("{}")
    assert (out / "world.json").is_file() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_run_folder_modes_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        out = tmp_path / "run"
        with run_folder(out) as tmp:
            fd, name = tempfile.mkstemp(dir=tmp)  # as save_patch's own writer leaves files: 0600
            os.close(fd)
            sub = tempfile.mkdtemp(dir=tmp)  # ... and its temporary folder: 0700
            (tmp / "result.json").write_text("{}")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes == {"run": 0o777 & ~mask, os.path.basename(name): 0o666 & ~mask,
                     os.path.basename(sub): 0o777 & ~mask, "result.json": 0o666 & ~mask, MANIFEST: 0o666 & ~mask}


@pytest.mark.parametrize("early", [False, True], ids=["lazy", "early"])
@pytest.mark.parametrize("held", ["empty", "other", "run"])
def test_an_existing_out_keeps_its_mode(tmp_path, early, held):
    """A user who made OUT 0700 (a private run) keeps a 0700 OUT after the run replaced it; what is inside follows
    the umask (0022 here)."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        out.mkdir()
        if held == "other":
            (out / "notes.txt").write_text("mine")
        elif held == "run":
            (out / "result.json").write_text("{}")
        os.chmod(out, 0o700)
        if early:
            claim_out(out, overwrite=True)
            inp = inputs_folder(out)  # the run's temporary folder: out itself is not touched
            (inp / "data").mkdir(parents=True)  # as slug demo curates its inputs first
        with run_folder(out, overwrite=True) as tmp:
            (tmp / "result.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "result.json").stat().st_mode) == 0o644
    assert (out / "notes.txt").read_text() == "mine" if held == "other" else not (out / "notes.txt").exists()
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------- slug never deletes what it did not write
def test_overwrite_keeps_the_users_files_and_names_them(tmp_path, capfd):
    """`--overwrite` replaced a run folder whole, deleting a user's notes kept in it (new-user trial): the entries no
    slug run wrote are carried into the new run and named on stderr; the old run's own entries go."""
    out = tmp_path / "run"
    with run_folder(out) as tmp:
        (tmp / "result.json").write_text("{}")
        (tmp / "generations.png").write_text("old png")
        (tmp / "2-step").mkdir()  # a name only the manifest knows as the run's
    (out / "notes.txt").write_text("mine")
    (out / "odd\nname").write_text("mine too")  # printed escaped: a newline in a name broke the note line
    (out / "thesis").mkdir()
    (out / "thesis" / "ch1.tex").write_text("chapter")
    capfd.readouterr()
    with run_folder(out, overwrite=True) as tmp:
        (tmp / "result.json").write_text('{"new": true}')
    assert _names(out) == ["notes.txt", "odd\nname", "result.json", "thesis"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "thesis" / "ch1.tex").read_text() == "chapter"
    assert f"note: kept in {out} what slug did not write there: notes.txt, odd\\nname, thesis\n" in \
        capfd.readouterr().err
    assert json.loads((out / MANIFEST).read_text())["entries"] == [MANIFEST, "result.json"]  # still the user's
    # an early claim (slug demo) replacing a run keeps them too; a run folder without its manifest (an older
    # slugkit's): nothing says which entries a run wrote, so every one is kept, a name the new run writes aside
    (out / MANIFEST).unlink()
    (out / "report.md").write_text("old report")
    claim_out(out, overwrite=True)
    inp = inputs_folder(out)  # the run's temporary folder: out itself is not touched
    (inp / "data").mkdir()
    with run_folder(out, overwrite=True) as tmp:
        (tmp / "result.json").write_text("{}")
    assert _names(out) == ["data", "notes.txt", "odd\nname", "report.md", "result.json", "result.json.before-slug",
                           "thesis"] and _leftovers(tmp_path) == []
    assert (out / "result.json.before-slug").read_text() == '{"new": true}'
    assert (out / "result.json").read_text() == "{}"
    err = capfd.readouterr().err
    assert f"everything the folder held, as it has no {MANIFEST}" in err and "result.json as result.json.before-slug" \
        in err and "report.md" in err


@pytest.mark.parametrize("marker", ["result.json", "canvas.json", "compare.json", "curate.json"])
def test_a_users_folder_holding_a_result_json_loses_nothing_to_overwrite(tmp_path, capfd, marker):
    """A folder of the user's that happens to hold a ``result.json`` (and a ``data/`` and ``report.md`` of theirs)
    is taken for a run — refused without --overwrite — and with it is replaced keeping every entry: without a
    manifest nothing tells a run's files from the user's (their data/ and report.md were deleted as a run's)."""
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "data" / "scan.csv").write_text("1,2")
    (out / marker).write_text('{"accuracy": 0.9}')
    (out / "report.md").write_text("my report")
    with pytest.raises(OutputExistsError):
        claim_out(out, overwrite=False, marker=marker)
    with run_folder(out, overwrite=True, marker=marker) as tmp:
        (tmp / marker).write_text("{}")
        (tmp / "data").mkdir()
    assert (out / "data.before-slug" / "scan.csv").read_text() == "1,2" and (out / "report.md").read_text() == \
        "my report" and (out / f"{marker}.before-slug").read_text() == '{"accuracy": 0.9}'
    err = capfd.readouterr().err
    assert "data as data.before-slug" in err and _leftovers(tmp_path) == []
    assert "--overwrite replaces it" not in err  # another command's marker: kept too, not replaced (verify 56)


def test_a_users_files_put_into_out_while_a_run_goes_on_are_kept(tmp_path, capfd):
    """Files the user writes into OUT while an `--overwrite` run goes on — beside the old run's, or inside its own
    folders (`OUT/data/extra.txt`: the fifth trial saw it recorded as the run's, then deleted) — are kept: OUT is not
    touched until the commit, which carries them (an old run's folder holding one is kept whole as
    NAME.before-slug) and names them. A file edited in place keeps its mode (a carried file is a hard link)."""
    out = tmp_path / "run"
    _old_run(out)
    with run_folder(out, overwrite=True) as tmp:  # a run with its own data/ and manifest
        (tmp / "result.json").write_text("{}")
        (tmp / "patch").mkdir()
        (tmp / "data").mkdir()
        (tmp / "data" / "forget.tar").write_text("old set")
    (out / "notes.txt").write_text("old notes")
    os.chmod(out / "notes.txt", 0o600)
    claim_out(out, overwrite=True)
    inp = inputs_folder(out)
    (inp / "data").mkdir()
    (inp / "data" / "forget.tar").write_text("new set")
    (out / "notes.txt").write_text("new notes")  # during the run
    (out / "data" / "extra.txt").write_text("mine")
    capfd.readouterr()
    with run_folder(out, overwrite=True) as tmp:
        (tmp / "result.json").write_text("{}")
    assert _names(out) == ["data", "data.before-slug", "notes.txt", "result.json"]
    assert (out / "notes.txt").read_text() == "new notes" and stat.S_IMODE((out / "notes.txt").stat().st_mode) == 0o600
    assert (out / "data" / "forget.tar").read_text() == "new set"
    assert (out / "data.before-slug" / "extra.txt").read_text() == "mine"
    assert json.loads((out / MANIFEST).read_text())["entries"] == [MANIFEST, "data", "result.json"]
    assert "what slug did not write there: notes.txt, data as data.before-slug" in capfd.readouterr().err
    claim_out(out, overwrite=True)  # a run that fails: OUT, with the file the user added meanwhile, stays as it is
    (out / "draft.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        with run_folder(out, overwrite=True):
            raise KeyboardInterrupt
    assert _names(out) == ["data", "data.before-slug", "draft.txt", "notes.txt", "result.json"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("before", ["a run", "nothing"])
def test_a_killed_run_leaves_what_the_user_wrote_after(tmp_path, capfd, before):
    """After `kill -9` of an `--overwrite` demo, files the user then wrote into OUT were deleted by the next run's
    repair (fourth and fifth trials): the dead run wrote only into its temporary folder, so the repair removes that
    and nothing in OUT."""
    out = tmp_path / "run"
    if before == "a run":
        _old_run(out)
    holder = _child(HOLD_EARLY, str(out))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("written after the kill")
    capfd.readouterr()
    claim_out(out, overwrite=True)
    abandon_claims()
    assert "removed its temporary folder" in capfd.readouterr().err
    assert _names(out) == (["notes.txt", "patch", "result.json"] if before == "a run" else ["notes.txt"])
    assert _leftovers(tmp_path) == []


def test_a_run_being_replaced_stays_readable_and_a_dead_writer_is_cleaned_up_by_a_reader(tmp_path, capsys):
    """During an `--overwrite` demo, `slug inspect/audit RUN` said "no patch there" (the old run was set aside,
    fourth trial): the old run stays in place until the commit, so it is read; a file output into the folder being
    written is refused; after a kill, the reader removes the dead run's temporary folder and says so."""
    from slugkit.cli import main
    from slugkit.cli.outputs import out_inside_run
    from slugkit.common.runfolder import settle

    out = tmp_path / "run"
    _old_run(out)
    holder = _child(HOLD_EARLY, str(out))
    try:
        assert main(["inspect", str(out)]) == 2  # read: our stand-in patch has no patch.safetensors
        assert "holds no patch.safetensors" in capsys.readouterr().err
        assert "is inside the run folder" in out_inside_run(str(out / "model"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    fresh = tmp_path / "fresh"  # no run there yet: a file output into the folder being written is refused too
    other = _child(HOLD_EARLY, str(fresh))
    try:
        assert out_inside_run(str(fresh / "m")) == (f"--out {fresh / 'm'}: another slug run is writing {fresh} "
                                                    f"(pid {other.pid}); wait for it or write elsewhere")
    finally:
        other.kill()
        other.wait()
    assert main(["inspect", str(out / "patch")]) == 2
    err = capsys.readouterr().err
    assert "ended without finishing; taking over its lock; removed its temporary folder" in err
    assert _names(out) == ["patch", "result.json"] and not [n for n in _leftovers(tmp_path) if n.startswith(".run.")]
    settle(out / "patch")  # nothing to do, nothing said
    settle(tmp_path / "absent")
    assert capsys.readouterr().err == ""


def test_an_out_holding_run_folders_is_refused(tmp_path):
    """`slug demo --out runs` where runs/demo-X is a run was accepted, the runs taken in as the user's files (fourth
    trial); a run (compare, a sequential demo) holding its own runs is replaced as usual."""
    parent = tmp_path / "runs"
    parent.mkdir()
    _old_run(parent / "demo-a")
    (parent / "demo-a" / "run.json").write_text("{}")
    _both_claims_refused(parent, ValueError, f"{parent}: holds slug run folders \\(demo-a\\); a run folder of its own "
                                             f"is needed: choose a new one \\(e.g. {parent / 'NAME'}\\)")
    with run_folder(parent / "cmp") as tmp:
        (tmp / "compare.json").write_text("{}")
        (tmp / "compare.md").write_text("")
        (tmp / "slug").mkdir()
        (tmp / "slug" / "result.json").write_text("{}")
        (tmp / "slug" / "run.json").write_text("{}")
    with run_folder(parent / "cmp", overwrite=True, marker="compare.json") as tmp:
        (tmp / "compare.json").write_text('{"new": 1}')
    assert _leftovers(parent) == [] and _leftovers(tmp_path) == []
    deep = tmp_path / "deep"  # runs/2024/demo-b, three levels at most (eighth trial: one level only was looked at)
    _old_run(deep / "2024" / "11" / "demo-b")
    _old_run(deep / ".hidden" / "demo-c")  # hidden folders are not entered
    _both_claims_refused(deep, ValueError, "holds slug run folders \\(2024/11/demo-b\\); a run folder")
    _old_run(tmp_path / "deeper" / "a" / "b" / "c" / "demo-d")  # four levels down: not looked for
    claim_out(tmp_path / "deeper")
    abandon_claims()


def test_a_journal_without_entries_is_judged_by_the_names_slug_writes(tmp_path, capfd):
    """A lock left by a slugkit that did not record its entries: the names slug writes go, the rest is kept."""
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "1-Ada_Quill").mkdir()
    (out / "notes.txt").write_text("mine")
    (tmp_path / ".run.slug-lock").write_text(json.dumps({"pid": 2 ** 22 + 1, "owns_target": True, "aside": None,
                                                         "was_empty_dir": False, "committed": False}))
    with run_folder(out) as tmp:
        (tmp / "result.json").write_text("{}")
    assert _names(out) == ["notes.txt", "result.json"]
    assert "kept what it did not write: notes.txt" in capfd.readouterr().err and _leftovers(tmp_path) == []


def test_an_out_inside_another_run_is_refused(tmp_path):
    """`--out RUN/patch` was accepted, and a later `--overwrite` of it deleted RUN's patch files (new-user trial)."""
    run = tmp_path / "run"
    _old_run(run)
    for inner in (run / "patch", run / "patch" / "deeper", run / "mine"):
        with pytest.raises(ValueError, match=f"inside the slug run folder {run} \\(result.json present\\)"):
            with run_folder(inner, overwrite=True):
                pass
        with pytest.raises(ValueError, match="choose a folder outside"):
            claim_out(inner, overwrite=True)
    assert (run / "patch" / "patch.json").read_text() == "old patch" and not (run / "mine").exists()
    plain = tmp_path / "project"  # someone else's result.json alone does not make a slug run
    plain.mkdir()
    (plain / "result.json").write_text("{}")
    with run_folder(plain / "runs" / "a") as tmp:
        (tmp / "result.json").write_text("{}")
    assert (plain / "runs" / "a" / "result.json").exists() and _leftovers(plain) == []


def test_an_out_inside_a_folder_being_written_is_refused(tmp_path):
    out = tmp_path / "n"
    holder = _child(HOLD_RUN, str(out))
    try:
        with pytest.raises(ValueError, match=f"is inside {out}, which another slug run is writing \\(pid "
                                             f"{holder.pid}\\)"):
            claim_out(out / "sub")
        stage = next(p for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
        with pytest.raises(ValueError, match="a slug run's temporary folder"):
            claim_out(stage / "sub")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("where", ["at", "below"])
def test_a_bind_mount_is_refused(tmp_path, monkeypatch, where):
    """A bind mount of the same filesystem is not seen by os.path.ismount: the run finished, then failed with EBUSY
    (new-user trial). /proc/self/mountinfo is read too; a mount inside OUT is refused as well (removing the replaced
    folder would delete files in it)."""
    from slugkit.common import outguard

    out = tmp_path / "vol"
    (out / "m").mkdir(parents=True)
    point = os.path.realpath(out if where == "at" else out / "m")
    monkeypatch.setattr(outguard, "_mount_points", lambda: ["/", point])
    with pytest.raises(ValueError, match="is a mount point" if where == "at" else "holds a mount point"):
        claim_out(out, overwrite=True)
    assert (out / "m").is_dir() and _leftovers(tmp_path) == []


def test_mountinfo_is_parsed_with_its_escapes():
    from slugkit.common import outguard

    points = outguard._mount_points()
    if not os.path.exists("/proc/self/mountinfo"):
        pytest.skip("no /proc/self/mountinfo here")
    assert "/" in points and all("\\040" not in p for p in points)


@pytest.mark.parametrize("kind", ["to a run", "dangling"])
def test_an_out_symlink_is_followed_by_an_early_claim(tmp_path, kind, capfd):
    """`--out LINK` (a symlink to a run, or to a folder not made yet) failed with "link: File exists" once the early
    claim had moved the old folder aside (new-user trial): the run now lands in the link's target. A link to a folder
    not made yet is said, with the folders made for it (the summary names the link only; eighth trial)."""
    real = tmp_path / "real" / "x"
    if kind == "to a run":
        real.parent.mkdir()
        _old_run(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    capfd.readouterr()
    claim_out(link, overwrite=True)
    said = capfd.readouterr().err
    if kind == "dangling":
        assert f"is a symbolic link to {real}, which does not exist yet" in said and f"(made {real.parent})" in said
    else:
        assert "symbolic link" not in said
    inp = inputs_folder(link)  # the run's temporary folder: link itself is not touched
    (inp / "data").mkdir()
    (inp / "data" / "forget.tar").write_text("inputs")
    with run_folder(link, overwrite=True) as tmp:
        (tmp / "result.json").write_text("{}")
    assert link.is_symlink() and _names(real) == ["data", "result.json"]
    assert (real / "data" / "forget.tar").read_text() == "inputs" and _leftovers(real.parent) == []


def test_an_audit_written_into_a_run_goes_with_it(tmp_path, capfd):
    """`slug audit RUN` writes audit.json/audit.md into the finished run (write_audit records them): a later
    --overwrite must not carry the old patch's audit into the new run as if it were the user's."""
    from slugkit.common.outguard import record_entries

    out = tmp_path / "run"
    with run_folder(out) as tmp:
        (tmp / "result.json").write_text("{}")
    (out / "audit.json").write_text('{"old": true}')
    record_entries(out, ["audit.json"])
    capfd.readouterr()
    with run_folder(out, overwrite=True) as tmp:
        (tmp / "result.json").write_text("{}")
    assert _names(out) == ["result.json"] and "kept in" not in capfd.readouterr().err
    record_entries(tmp_path / "nothing", ["x"])  # no manifest: nothing to do


def test_a_quoted_tilde_a_home_folder_and_a_git_repository_are_refused(tmp_path, monkeypatch):
    """`--out '~/runs/x'` made a folder named '~' and printed `~/runs/x` as if it were home; `--out ~` and
    `--out REPO` mixed a run with the user's files (third new-user trial)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    (tmp_path / "worktree").mkdir()
    (tmp_path / "worktree" / ".git").write_text("gitdir: ../repo/.git/worktrees/w\n")  # a worktree's .git is a file
    for out, said in (("~/runs/x", "which the shell did not expand"), (tmp_path / "home", "is your home folder"),
                      (tmp_path / "repo", "is a git repository"), (tmp_path / "worktree", "is a git repository")):
        with pytest.raises(ValueError, match=said):
            claim_out(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "repo", "worktree"]
    with run_folder(tmp_path / "repo" / "runs" / "a") as tmp:  # inside them is fine
        (tmp / "result.json").write_text("{}")


def test_a_ctrl_c_held_back_during_the_commit_says_the_run_is_whole(tmp_path, monkeypatch, capfd):
    """A Ctrl-C during the commit is delivered when it is done: the run is complete, and the note says so (the
    fifth trial saw `verdict: pass`, a complete folder, and a death by SIGINT without a word)."""
    import contextlib

    import slugkit.common.runfolder as rf

    @contextlib.contextmanager
    def held_then_delivered():
        yield
        raise KeyboardInterrupt

    monkeypatch.setattr(rf, "signals_held", held_then_delivered)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with run_folder(out) as tmp:
            (tmp / "result.json").write_text("{}")
    assert f"note: {out} had been written whole when the interrupt came" in capfd.readouterr().err
    assert _names(out) == ["result.json"]


def test_a_users_edit_of_a_runs_own_file_is_kept_on_overwrite(tmp_path, capfd):
    """`echo notes >> RUN/report.md; slug demo --out RUN --overwrite` replaced the edited report without a word
    (fifth trial): the manifest stamps each file (size, modification time); an entry edited since is kept whole as
    NAME.before-slug and named. slug's own later changes (`slug audit` rewriting report.md) are re-stamped."""
    import time

    from slugkit.common.outguard import edited_entries, record_entries

    out = tmp_path / "run"
    _committed_run(out, "slug's report\n")
    assert edited_entries(out) == []
    time.sleep(0.01)
    (out / "report.md").write_text("slug's report\nwith the audit section\n")  # as `slug audit RUN` does
    record_entries(out, ["report.md"])
    assert edited_entries(out) == []
    with open(out / "report.md", "a") as f:
        f.write("MY IMPORTANT NOTES\n")
    os.utime(out / "patch" / "patch.json", ns=(0, 0))  # touched only: the same content is the run's
    assert edited_entries(out) == ["report.md"]
    (out / "patch" / "patch.json").write_text("[]")  # the same size, another content
    assert edited_entries(out) == ["patch", "report.md"]
    capfd.readouterr()
    with run_folder(out, overwrite=True) as tmp:
        (tmp / "result.json").write_text("{}")
        (tmp / "report.md").write_text("new report\n")
    assert "MY IMPORTANT NOTES" in (out / "report.md.before-slug").read_text()
    assert (out / "report.md").read_text() == "new report\n" and (out / "patch" / "patch.json").exists()
    assert "patch, report.md as report.md.before-slug" in capfd.readouterr().err


def test_a_run_copied_with_cp_r_is_replaced_whole_by_overwrite(tmp_path, capfd):
    """`cp -r RUN COPY; slug demo --out COPY --overwrite` kept every entry of the copied run as NAME.before-slug and
    called them the user's: cp -r gives every file a new modification time, which the manifest took for an edit. The
    manifest also records each file's sha256, so a file with its content unchanged is the run's."""
    import shutil

    from slugkit.common.outguard import edited_entries

    _committed_run(tmp_path / "run", "slug's report\n")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy, copy_function=shutil.copyfile)  # as cp -r: new times
    assert os.stat(copy / "report.md").st_mtime_ns != os.stat(tmp_path / "run" / "report.md").st_mtime_ns
    assert edited_entries(copy) == []
    capfd.readouterr()
    with run_folder(copy, overwrite=True) as tmp:
        (tmp / "result.json").write_text("{}")
    assert _names(copy) == ["result.json"], _names(copy)
    assert "kept in" not in capfd.readouterr().err


def test_a_file_written_into_out_during_the_commit_is_kept(tmp_path, monkeypatch, capfd):
    """Files written into OUT in the ~0.1 s of an `--overwrite` commit were deleted without a word (sixth trial):
    OUT was listed before it was renamed away. It is listed after the rename now, when nothing can be added."""
    import slugkit.common.runfolder as rf

    out = tmp_path / "run"
    with run_folder(out) as tmp:  # a run with its manifest
        (tmp / "result.json").write_text("{}")
        (tmp / "patch").mkdir()
        (tmp / "patch" / "patch.json").write_text("{}")
    real = rf.new_name

    def a_user_write_just_before_the_rename(target, suffix):
        (out / "late.txt").write_text("mine")  # the user's write, while the commit runs
        (out / "patch" / "late-inside.txt").write_text("mine too")
        return real(target, suffix)

    monkeypatch.setattr(rf, "new_name", a_user_write_just_before_the_rename)
    capfd.readouterr()
    with run_folder(out, overwrite=True) as tmp:
        (tmp / "result.json").write_text("{}")
    assert (out / "late.txt").read_text() == "mine"
    assert (out / "patch" / "late-inside.txt").read_text() == "mine too"  # the old run's patch/, kept whole
    assert "late.txt, patch" in capfd.readouterr().err and _leftovers(tmp_path) == []


def test_signals_held_also_holds_a_signal_taken_by_another_thread():
    """A process-wide SIGINT is handed to any thread that does not block it (torch's workers); Python then ran the
    handler in the main thread inside the held block (sixth trial: it stopped the deletion of the replaced folder
    half-way, leaving a hidden .old folder). The handler is held too now: KeyboardInterrupt comes after the block."""
    import threading

    from slugkit.common.outlock import signals_held

    go, sent = threading.Event(), threading.Event()

    def sender():  # started before the block: its signal mask is not the block's
        go.wait()
        os.kill(os.getpid(), signal.SIGINT)
        sent.set()

    t = threading.Thread(target=sender)
    t.start()
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                go.set()
                sent.wait(5)
                for _ in range(100_000):  # bytecode: where Python runs pending handlers
                    pass
                done = True
    finally:
        signal.signal(signal.SIGINT, old)
        t.join()
    assert done  # the block ran to its end; the interrupt came after it


def test_an_out_recreated_during_the_commit_is_carried_not_a_failure(tmp_path, monkeypatch, capfd):
    """A logger's `makedirs(OUT/data)` during the commit recreated OUT after it was renamed away: the rename of the
    new run failed ("Directory not empty"), the run was discarded and the old one stranded in a hidden .old folder
    nothing mentioned (seventh trial). The recreated OUT is carried in as the user's and the rename retried; a
    stranded .old folder is named by the next claim."""
    import slugkit.common.runfolder as rf

    out = tmp_path / "run"
    _old_run(out)
    real = rf._carry
    seen = []

    def carry_while_a_logger_recreates_out(src, stage, names, own):
        if not seen:
            seen.append(1)
            (out / "data").mkdir(parents=True)  # OUT is renamed away at this point: this makes a new one
            (out / "data" / "log.txt").write_text("mine")
        return real(src, stage, names, own)

    monkeypatch.setattr(rf, "_carry", carry_while_a_logger_recreates_out)
    with run_folder(out, overwrite=True) as tmp:
        (tmp / "result.json").write_text('{"new": true}')
    assert json.loads((out / "result.json").read_text()) == {"new": True}
    assert (out / "data" / "log.txt").read_text() == "mine" and _leftovers(tmp_path) == []
    assert "what slug did not write there: data" in capfd.readouterr().err
    stranded = tmp_path / ".run.slug-abcd.old"
    stranded.mkdir()
    claim_out(out, overwrite=True)
    assert f"note: next to {out} is .run.slug-abcd.old, a previous {out} slug could not put back" in \
        capfd.readouterr().err
    abandon_claims()
    assert stranded.is_dir()


def test_what_is_left_of_a_run_whose_result_was_deleted_is_a_run(tmp_path, capfd):
    """A run folder whose result.json the user deleted was taken for a folder of the user's: a new run into it kept
    the old run's report.md, patch/ … as NAME.before-slug and called them the user's. Its manifest still names the
    run's entries: it is refused without --overwrite, and replaced with it, the user's own files kept."""
    out = tmp_path / "run"
    _committed_run(out, "old")
    (out / "result.json").unlink()
    (out / "notes.txt").write_text("mine")
    for early in (True, False):
        with pytest.raises(OutputExistsError, match=r"holds what is left of a run slug wrote \(\.slugkit-entries\.json "
                                                    r"lists result\.json, which is gone\); pass --overwrite"):
            if early:
                claim_out(out)
            else:
                with run_folder(out):
                    pass
    with run_folder(out, overwrite=True) as tmp:
        (tmp / "result.json").write_text('{"new": 1}')
        (tmp / "report.md").write_text("new")
    assert _names(out) == ["notes.txt", "report.md", "result.json"], _names(out)
    assert (out / "report.md").read_text() == "new" and (out / "notes.txt").read_text() == "mine"
    assert "before-slug" not in capfd.readouterr().err and _leftovers(tmp_path) == []
    model = tmp_path / "model"  # a folder slug wrote that is no run (a trained model's): still the user's to add to
    model.mkdir()
    (model / MANIFEST).write_text(json.dumps({"entries": ["model.safetensors"]}))
    (model / "model.safetensors").write_text("w")
    with run_folder(model) as tmp:
        (tmp / "result.json").write_text("{}")
    assert (model / "model.safetensors").read_text() == "w"


def test_overwrite_must_be_a_bool_everywhere_a_folder_is_replaced(tmp_path):
    """overwrite="no" (or "False", a str from a config file) is truthy: it replaced a finished run, a patch folder or a
    model folder. Refused as a TypeError naming overwrite by every writer, before anything is touched."""
    from slugkit.common.files import atomic_dir, check_replaceable
    from slugkit.patch import make_patch, save_patch

    out = tmp_path / "run"
    with run_folder(out) as tmp:
        (tmp / "result.json").write_text("{}")
    for call in (lambda: claim_out(out, overwrite="no"), lambda: run_folder(out, "False").__enter__(),
                 lambda: atomic_dir(out, overwrite="no").__enter__(), lambda: check_replaceable(out, "no")):
        with pytest.raises(TypeError, match="overwrite: expected True or False, got str"):
            call()
    lin = torch.nn.Linear(2, 2)
    patch = make_patch(lin, {"weight": lin.weight.detach() * 2}, base_model="t", adapter="t", concept="c")
    with pytest.raises(TypeError, match="save_patch: overwrite: expected True or False, got str 'no'"):
        save_patch(patch, tmp_path / "p", overwrite="no")
    assert _names(out) == ["result.json"] and not (tmp_path / "p").exists() and _leftovers(tmp_path) == []
    import numpy as np  # numpy's bool (a sweep's mask) is a bool, for save_patch as for the run folder

    save_patch(patch, tmp_path / "p", overwrite=np.bool_(False))
    check_replaceable(out, np.bool_(True))


def test_another_commands_marker_without_a_manifest_is_kept_and_not_said_to_be_replaced(tmp_path, capfd):
    """`slug curate --out F --overwrite` where F is a folder of the user's holding a `result.json`: kept whole, and
    the note "holds another command's run …; --overwrite replaces it" is not printed beside the one saying it was
    kept (verification 56: the two contradicted each other)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "result.json").write_text('{"a": 1}')
    with run_folder(out, overwrite=True, marker="curate.json") as tmp:
        (tmp / "curate.json").write_text("{}")
    err = capfd.readouterr().err
    assert (out / "result.json").read_text() == '{"a": 1}' and (out / "curate.json").read_text() == "{}"
    assert "--overwrite replaces it" not in err and "everything the folder held" in err
