"""One writer per --out for outputs that are not run folders (slugkit.common.sentinel): `slug audit`, `slug apply` /
`revert`, `slug grads` (trial 49: two `slug apply --out X` both said "wrote X", one's model was the other's; two
`slug grads` resumed from each other's live checkpoint)."""

import subprocess
import sys

import pytest

from slugkit.cli import main
from slugkit.common.outlock import RunLockedError
from slugkit.common.sentinel import one_writer


@pytest.fixture()
def sleeper():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


@pytest.mark.parametrize("argv, holder", [
    (["apply", "--patch", "p", "--checkpoint", "c.safetensors", "--out"], "slug apply"),
    (["revert", "--patch", "p", "--checkpoint", "c.safetensors", "--out"], "slug apply"),
    (["grads", "--model", "embedded", "--forget", "f.tar", "--retain", "r.tar", "--out"], "slug grads"),
    (["export", "--lora", "p", "--pipeline", "embedded", "--out"], "slug export")])
def test_a_live_writer_of_the_same_out_refuses_the_second_command(tmp_path, capsys, sleeper, argv, holder):
    import torch

    from slugkit.patch import make_patch, save_patch

    out = tmp_path / "m.safetensors"
    (tmp_path / ".m.safetensors.slug-writing").write_text(f"{sleeper} {holder}")
    patch = tmp_path / "p"  # a real patch: apply / revert check their --patch before taking --out (verification 67)
    save_patch(make_patch({"a": torch.ones(2)}, {"a": torch.ones(2) * 2}, base_model="toy", adapter="open_clip",
                          concept="A", step_size=1.0), patch)
    argv = [str(patch) if x == "p" else x for x in argv]
    assert main([*argv, str(out)]) == 2
    assert f"another {holder} (pid {sleeper}) is writing to {out}; wait for it" in capsys.readouterr().err
    assert not out.exists()


def test_the_sentinel_is_taken_over_from_a_dead_writer_and_leaves_no_folder(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".x.slug-writing").write_text(f"{dead.stdout.strip()} slug apply")
    with one_writer(tmp_path / "x", "slug revert"):
        assert (tmp_path / ".x.slug-writing").read_text().endswith(" slug revert")
        with pytest.raises(RunLockedError, match="another slug revert"):
            with one_writer(tmp_path / "x", "slug apply"):
                pass
    assert not (tmp_path / ".x.slug-writing").exists()
    with one_writer(tmp_path / "new" / "deeper" / "x.safetensors"):
        assert (tmp_path / "new" / "deeper").is_dir()
    assert not (tmp_path / "new").exists()  # made for the sentinel only, removed again


def test_temporary_files_a_killed_write_left_are_removed_and_named(tmp_path, capsys):
    """Trial 49: `kill -9` of `slug revert --out m.safetensors` left `.m.safetensors.670mymfv.tmp` (the whole
    checkpoint) that no later write removed or named."""
    stale = tmp_path / ".m.safetensors.670mymfv.tmp"
    stale.write_bytes(b"x" * 10)
    folder = tmp_path / ".m.safetensors.ab_cd123.tmp"
    folder.mkdir()
    mine = tmp_path / ".m.safetensors.notes.tmp"  # not a slug temp name: kept
    mine.write_text("keep")
    with one_writer(tmp_path / "m.safetensors", "slug revert"):
        pass
    assert not stale.exists() and not folder.exists() and mine.exists()
    err = capsys.readouterr().err
    assert f"note: removed {stale}, a temporary file an interrupted write of {tmp_path / 'm.safetensors'} left" in err
    assert "a temporary folder" in err
