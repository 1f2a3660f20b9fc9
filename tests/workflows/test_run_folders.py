"""Run folders that cannot be corrupted, end to end with real `slug` processes (trust cases B1–B3, C, F):

* two `slug demo` runs into one ``--out``: one runs, the other stops at once with the lock error, and the surviving
  run is made of its own concept's data;
* Ctrl-C at named stages: exit 130, "interrupted", and ``--out`` is either untouched or a complete run;
* a full disk, a read-only target, a file in the way: one line ``error: <path>: <reason>``, exit 2, nothing left;
* every run command refuses an ``--out`` another process is writing;
* a closed stdout ends quietly; outputs follow the umask.

The world's data comes from the shared cache (``slugkit.world.demo_data.default_data_dir``), generated once.
"""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slugkit.cli import main
from slugkit.world import render as world
from slugkit.world.demo_data import ensure_world_data

pytestmark = pytest.mark.slow
LOCKED = "another slug run is writing to"


@pytest.fixture(scope="module")
def world_dir():
    return ensure_world_data(None, progress=False)


def _slug(*args: str, env: dict | None = None, umask: int | None = None, **kw) -> subprocess.Popen:
    def pre():
        # A terminal's Ctrl-C reaches a process whose SIGINT is the default and unblocked; a child inherits an ignored
        # or blocked SIGINT from this pytest process, whatever an earlier test in the session left (the full suite
        # timed out here while the test alone passed), so set what a user's shell gives.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        if umask is not None:
            os.umask(umask)

    return subprocess.Popen([sys.executable, "-m", "slugkit.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, preexec_fn=pre,
                            **kw)


def _demo_args(out: Path, world_dir: Path, *extra: str) -> list[str]:
    # one layer: these runs test the folder, not the method, and a second round cost ~10 s a run
    return ["demo", "--out", str(out), "--data-dir", str(world_dir), "--threads", "1", "--no-progress",
            "--max-layers", "1", *extra]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".slug-" in p.name)


def _check_complete_run(out: Path, concept: str) -> None:
    """A complete run of ``concept``: every file there, its forget set curated for it, no temporary paths."""
    from slugkit.patch import load_patch

    result = json.loads((out / "result.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert result["concept"] == concept and run["config"]["out"] == str(out)
    curated = json.loads((out / "data" / "forget_manifest.json").read_text())
    assert curated["concept"] == concept
    assert all(concept.lower() in s["caption"].lower() for s in curated["samples"])
    used = [s["sha256"] for s in run["data"]["forget"]["samples"]]
    assert used == [s["sha256"] for s in curated["samples"]]  # the run read its own concept's forget set
    assert load_patch(out / "patch").meta["concept"] == concept
    for f in ("result.json", "run.json", "layers.json", "report.md"):
        assert ".slug-" not in (out / f).read_text(), f


def test_two_demos_into_one_folder_one_wins(tmp_path, world_dir):
    out = tmp_path / "run"
    concepts = [world.IDENTITIES[3].name, world.IDENTITIES[4].name]
    procs = {c: _slug(*_demo_args(out, world_dir, "--concept", c), umask=0o022) for c in concepts}
    done = {c: (p.wait(timeout=600), *p.communicate()) for c, p in procs.items()}
    assert sorted(rc for rc, _, _ in done.values()) == [0, 2], {c: d[2][-2000:] for c, d in done.items()}
    winner = next(c for c, d in done.items() if d[0] == 0)
    loser = next(c for c in concepts if c != winner)
    err = done[loser][2]
    assert err.strip() == (f"error: {LOCKED} {out} (pid {procs[winner].pid}); wait for it or choose another --out")
    _check_complete_run(out, winner)
    assert _leftovers(tmp_path) == []
    # F: the umask's modes (022), not mkstemp's 0600 / mkdtemp's 0700
    for p in [out, *out.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p


def _interrupt_at(stage: str, args: list[str], umask: int | None = None, sig=signal.SIGINT) -> tuple[int, str]:
    """Run `slug ARGS` until it pauses at ``stage``, press Ctrl-C (SIGINT; or send ``sig``), return (exit status,
    stderr)."""
    p = _slug(*args, env={"SLUGKIT_TEST_PAUSE_AT": stage, "SLUGKIT_TEST_PAUSE_S": "120"}, umask=umask)
    seen = []
    for line in p.stderr:
        seen.append(line)
        if line.startswith(f"slugkit-test: paused at {stage}"):
            break
    else:
        p.wait()
        pytest.fail(f"never paused at {stage}: {''.join(seen)[-3000:]}")
    p.send_signal(sig)
    rc = p.wait(timeout=120)
    return rc, "".join(seen) + p.stderr.read()


def test_ctrl_c_leaves_nothing_or_a_complete_run(tmp_path, world_dir):
    """B2: Ctrl-C after the claim, after the gradients (data curated, nothing of the run written yet) and with the
    whole run written but not yet renamed: exit 130, `interrupted`, and nothing that blocks a rerun."""
    out = tmp_path / "run"
    concept = world.IDENTITIES[0].name
    for stage in ("claimed", "gradients", "commit"):
        rc, err = _interrupt_at(stage, _demo_args(out, world_dir))
        assert rc == 130 and err.rstrip().endswith("interrupted") and "Traceback" not in err, (stage, err[-3000:])
        assert not out.exists() and _leftovers(tmp_path) == [], stage
    # the rerun needs no --overwrite, and (F) its outputs follow umask 077
    p = _slug(*_demo_args(out, world_dir), umask=0o077)
    rc, (_, err) = p.wait(timeout=600), p.communicate()
    assert rc == 0, err[-3000:]
    _check_complete_run(out, concept)
    for q in [out, *out.rglob("*")]:
        assert stat.S_IMODE(q.stat().st_mode) == (0o700 if q.is_dir() else 0o600), q
    # an interrupted --overwrite leaves the old run as it was
    before = {q.relative_to(out): q.read_bytes() for q in out.rglob("*") if q.is_file()}
    rc, err = _interrupt_at("gradients", _demo_args(out, world_dir, "--overwrite", "--concept",
                                                    world.IDENTITIES[5].name))
    assert rc == 130 and "interrupted" in err
    assert {q.relative_to(out): q.read_bytes() for q in out.rglob("*") if q.is_file()} == before
    assert _leftovers(tmp_path) == []
    # kill -9 of an --overwrite run, then a file written into OUT and into its data/: the next run's repair deleted
    # them (fourth and fifth trials). The run writes only into its temporary folder: OUT is the old run throughout
    rc, err = _interrupt_at("gradients", _demo_args(out, world_dir, "--overwrite"), sig=signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert {q.relative_to(out): q.read_bytes() for q in out.rglob("*") if q.is_file()} == before
    (out / "notes.txt").write_text("mine")
    (out / "data" / "extra.txt").write_text("mine too")
    p = _slug(*_demo_args(out, world_dir, "--overwrite"))
    rc, (_, err) = p.wait(timeout=600), p.communicate()
    assert rc == 2 and "taking over its lock; removed its temporary folder" in err, err[-3000:]
    assert "holds files slug did not write inside its run's folders (data/extra.txt)" in err  # refused up front
    assert (out / "notes.txt").read_text() == "mine" and (out / "data" / "extra.txt").read_text() == "mine too"
    assert _leftovers(tmp_path) == []


def test_sigterm_unwinds_like_ctrl_c(tmp_path, world_dir):
    """SIGTERM (kill, a scheduler's cancel) once the forget set is curated into OUT/data and after the gradients:
    exit 143, `terminated`, and no OUT/data or temporary folder left (it used to die with OUT/data in place). SIGTERM
    raises ``Terminated``, a ``KeyboardInterrupt``, so the later stages unwind as Ctrl-C does (the test above; a
    SIGTERM at "commit" was checked here too, at the cost of a whole demo run)."""
    out = tmp_path / "run"
    rc, err = _interrupt_at("gradients", _demo_args(out, world_dir), sig=signal.SIGTERM)
    assert rc == 143 and err.rstrip().endswith("terminated") and "Traceback" not in err, err[-3000:]
    assert not out.exists() and _leftovers(tmp_path) == []


def test_disk_full_leaves_nothing(tmp_path, world_dir, monkeypatch, capsys):
    """B3, simulated: every fsync reports a full disk (the first write is the curated forget set)."""
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "run"
    assert main(_demo_args(out, world_dir)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}") and err.endswith(": No space left on device\n") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_read_only_target_leaves_nothing(tmp_path, world_dir, monkeypatch, capsys):
    """C, simulated: the filesystem under ``ro/`` refuses every write with EROFS."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(real):
        def f(path, *a, **k):
            if str(os.fspath(path)).startswith(str(ro)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return real(path, *a, **k)
        return f

    monkeypatch.setattr(os, "open", refuse(real_open))
    monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
    out = ro / "run"
    assert main(_demo_args(out, world_dir)) == 2
    assert capsys.readouterr().err == (f"error: {out}: cannot create or lock this output folder: Read-only file "
                                       "system; choose another output folder (--out)\n")
    assert list(ro.iterdir()) == []


@pytest.fixture
def tmpfs(tmp_path):
    """A 3.7 MB tmpfs (root only): too small for the demo's curated data."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3700k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_real_full_and_read_only_filesystems(tmpfs, world_dir, capsys):
    out = tmpfs / "run"
    assert main(_demo_args(out, world_dir)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}/") and err.endswith(": No space left on device\n") and err.count("\n") == 1
    assert list(tmpfs.iterdir()) == []
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert main(_demo_args(out, world_dir)) == 2
    assert capsys.readouterr().err == (f"error: {out}: cannot create or lock this output folder: Read-only file "
                                       "system; choose another output folder (--out)\n")


def test_out_is_a_file(tmp_path, world_dir, capsys):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    assert main(_demo_args(f, world_dir)) == 2
    assert capsys.readouterr().err == f"error: {f}: exists and is not a folder; choose another --out\n"
    assert f.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


HOLD = """
    import sys, time
    from slugkit.common.runfolder import claim_out
    claim_out(sys.argv[1], overwrite=True)
    print("ready", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("command", ["demo", "demo-sequential", "demo-sd", "compare", "unlearn"])
def test_every_run_command_refuses_a_folder_being_written(tmp_path, world_dir, command, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), str(out)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "ready"
    a, b = world.IDENTITIES[0].name, world.IDENTITIES[1].name
    argv = {
        "demo": _demo_args(out, world_dir),
        "demo-sequential": _demo_args(out, world_dir, "--concepts", f"{a},{b}", "--sequential"),
        "demo-sd": _demo_args(out, world_dir, "--target", "sd"),
        "compare": ["compare", "--out", str(out), "--data-dir", str(world_dir), "--no-progress"],
        "unlearn": ["unlearn", "--concept", a, "--forget", str(world_dir / "pool"),
                    "--retain", str(world_dir / "val" / "identities"),  # not read: the lock refuses first
                    "--val-identities", str(world_dir / "val" / "identities"),
                    "--test-identities", str(world_dir / "test" / "identities"), "--out", str(out), "--no-progress"],
    }[command]
    try:
        t = time.perf_counter()
        assert main(argv) == 2
        assert time.perf_counter() - t < 60  # refused before the work, not after it
        err = capsys.readouterr().err
        assert err == f"error: {LOCKED} {out} (pid {holder.pid}); wait for it or choose another --out\n"
    finally:
        holder.kill()
        holder.wait()


def test_world_data_written_once_by_concurrent_processes(tmp_path):
    """Two processes that need the same world data folder: one writes it (temp folder + rename), the other waits and
    uses it; the folder is never seen half written. (A smaller world: the counts are patched in the children.)"""
    code = textwrap.dedent("""
        import sys
        import slugkit.world.demo_data as d
        d.COUNTS = {"pool": (2, 1), "val": (1, 1), "test": (1, 1)}
        print(d.ensure_world_data(sys.argv[1], progress=False))
    """)
    out = tmp_path / "world"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    seen_partial = False
    while any(p.poll() is None for p in procs):  # a reader never sees the folder half written
        seen_partial |= out.exists() and not (out / "world.json").exists()
        time.sleep(0.005)
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert not seen_partial
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    assert all(r[1].strip() == str(out) for r in results)
    assert json.loads((out / "world.json").read_text())["spec"]["counts"]["pool"] == [2, 1]
    assert len([p for p in (out / "val" / "identities").iterdir() if p.is_dir()]) == len(world.IDENTITIES)
    assert _leftovers(tmp_path) == []


def test_closed_stdout_ends_quietly(tmp_path):
    """`slug world names | head -1`: the reader is gone before slug writes; exit 141 (as SIGPIPE), no traceback."""
    p = _slug("world", "names")
    p.stdout.close()  # the reader went away
    rc = p.wait(timeout=120)
    err = p.stderr.read()
    assert rc == 141 and err == "", err


def test_ctrl_c_anywhere_is_exit_130(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(world, "identity_names", interrupted)
    try:
        rc = main(["world", "names"])
    except KeyboardInterrupt:  # escaped main (it must not: a traceback, and the test session would stop)
        rc = "KeyboardInterrupt escaped"
    assert rc == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_world_data_is_never_written_over_a_run(tmp_path):
    """`slug world data --out RUN` and `slug demo --data-dir RUN` replaced a finished run with the world's data
    (the world folder is written with overwrite, as a cache): another command's run is refused, untouched."""
    from slugkit.common.errors import OutputExistsError

    run = tmp_path / "run"
    (run / "patch").mkdir(parents=True)
    (run / "result.json").write_text('{"concept": "x"}')
    with pytest.raises(OutputExistsError, match=r"holds a slug run \(result.json present\), not the world's data"):
        ensure_world_data(run, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["patch", "result.json"] and _leftovers(tmp_path) == []


def test_world_data_cli_says_what_it_holds(world_dir, tmp_path, capsys):
    """`slug world data` printed only the folder name and refused --no-progress (third new-user trial)."""
    from slugkit.cli import main

    assert main(["world", "data", "--out", str(world_dir), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(f"world data in {world_dir}: identity_templates.txt, names.txt, pool/")
    mine = tmp_path / "world"  # a user's file in it is not listed as the world's (fourth trial)
    subprocess.run(["cp", "-al", str(world_dir), str(mine)], check=True)
    (mine / "notes.txt").write_text("mine")
    assert main(["world", "data", "--out", str(mine), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "notes.txt" not in out.split(" (also")[0]
    assert out.rstrip().endswith("(also there, not the world's: notes.txt)")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text("{}")
    (tmp_path / "run" / "run.json").write_text("{}")
    assert main(["world", "data", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "not the world's data" in capsys.readouterr().err


def test_world_data_errors_name_the_data_folder_options(world_dir, tmp_path, capsys):
    """`demo --data-dir FILE` said "choose another --out"; an outdated world holding a user's file in pool/ said
    "--overwrite would delete them", an option neither `demo` nor `world data` has (fifth trial)."""
    from slugkit.cli import main

    (tmp_path / "afile").write_text("x")
    assert main(["demo", "--data-dir", str(tmp_path / "afile"), "--out", str(tmp_path / "o")]) == 2
    assert "is a file, not a folder; the world's data is written into a folder: choose another --data-dir" in \
        capsys.readouterr().err
    old = tmp_path / "world"
    subprocess.run(["cp", "-al", str(world_dir), str(old)], check=True)
    (old / "world.json").unlink()
    (old / "world.json").write_text(json.dumps({"spec": {"outdated": True}}))
    from slugkit.common.outguard import write_manifest

    write_manifest(old, [p.name for p in old.iterdir() if not p.name.startswith(".")])  # as slug writes the world
    (old / "pool" / "mine.txt").write_text("mine")
    assert main(["world", "data", "--out", str(old), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "inside the world's folders (pool/mine.txt); the outdated world is rewritten there" in err, err
    assert "--overwrite" not in err and (old / "pool" / "mine.txt").read_text() == "mine"
