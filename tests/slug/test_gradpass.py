"""The streamed gradient pass (``slug grads``): equals ``compute_gradients``, runs on 2 gloo ranks under torchrun with
the same result, resumes after a SIGKILL to the same result, refuses a foreign checkpoint, and its stats-first mode
ranks layers exactly like the full mode."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import slugkit

from conftest import TINY_CFG

open_clip = pytest.importorskip("open_clip")

from PIL import Image  # noqa: E402

from slugkit.data.folders import iter_pairs  # noqa: E402
from slugkit.data.shards import write_shard  # noqa: E402
from slugkit.slug.gradients import Gradients, compute_gradients  # noqa: E402
from slugkit.slug.gradpass import (  # noqa: E402
    SLEEP_ENV, CheckpointMismatchError, PassConfig, assign_units, list_shards, load_stats, rank_from_stats,
    run_gradpass)
from slugkit.slug.layers import rank_layers  # noqa: E402

ATOL = 1e-6
BS = 2
WORDS = ["alice abbott", "a dog", "a red car", "a tree", "two cats", "a chair", "a boat", "bruno baker"]


def _image(rng) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random open_clip model as a local-dir model, and forget (3 shards) / retain (1 shard) sets.

    Three forget shards of 3, 2, 3 samples (partial batches at size 2); one retain shard of 7 samples: with 2 ranks
    the forget shards are split by shard and the single retain shard by batch index.
    """
    from safetensors.torch import save_file

    from slugkit.models.open_clip import OpenClipAdapter

    root = tmp_path_factory.mktemp("gradpass")
    model_dir = root / "model"
    model_dir.mkdir()
    a = OpenClipAdapter.from_config(TINY_CFG, seed=0)
    save_file({k: v.contiguous() for k, v in a.model.state_dict().items()},
              str(model_dir / "open_clip_model.safetensors"))
    (model_dir / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CFG,
        "preprocess_cfg": {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                           "resize_mode": "shortest"}}))
    rng = np.random.default_rng(0)
    forget = root / "forget"
    for i, n in enumerate((3, 2, 3)):
        write_shard(forget / f"{i:05d}.tar",
                    [(f"f{i}_{k}", _image(rng), f"a photo of alice abbott {k}", "png") for k in range(n)])
    retain = root / "retain"
    write_shard(retain / "00000.tar",
                [(f"r{k}", _image(rng), f"a photo of {WORDS[1 + k % 7]}", "png") for k in range(7)])
    return {"model": str(model_dir), "forget": str(forget / "{00000..00002}.tar"), "retain": str(retain), "root": root}


def _adapter(world):
    from slugkit.models import load_adapter

    torch.set_num_threads(1)
    return load_adapter(world["model"])


def _full(world, out, **kw):
    return run_gradpass(_adapter(world), PassConfig(world["forget"], world["retain"], out=str(out), batch_size=BS,
                                                    **kw))


def _assert_equal_grads(got: Gradients, ref: Gradients, atol=ATOL):
    assert (got.n_forget, got.n_retain) == (ref.n_forget, ref.n_retain)
    for split in ("forget", "retain"):
        a, b = getattr(got, split), getattr(ref, split)
        assert sorted(a) == sorted(b)
        for n in b:
            assert torch.allclose(a[n], b[n], rtol=0, atol=atol), (split, n, (a[n] - b[n]).abs().max().item())


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    env.pop(SLEEP_ENV, None)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(world, out, *extra, bs=BS):
    return ["-m", "slugkit.cli", "grads", "--model", world["model"], "--forget", world["forget"], "--retain",
            world["retain"], "--out", str(out), "--batch-size", str(bs), "--threads", "1", "--no-progress", *extra]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted single-process full-mode run (also written to disk)."""
    out = tmp_path_factory.mktemp("ref") / "g.safetensors"
    res = _full(world, out)
    assert out.is_file() and not Path(f"{out}.ckpt").exists()  # checkpoint directory removed after success
    return res, out


def test_out_folder_refused_up_front(world, tmp_path, capsys):
    """`slug grads --out <existing folder>` (or a path under a file) is refused before the pass, as one line
    `error: <path>: <reason>`, with no `*.ckpt/` left behind."""
    from slugkit.cli import main

    d = tmp_path / "grads"
    d.mkdir()
    assert main(_cli(world, d)[2:]) == 2
    assert capsys.readouterr().err == f"error: {d}: is a folder; --out names the .safetensors file to write\n"
    f = tmp_path / "notes.txt"
    f.write_text("x")
    assert main(_cli(world, f / "g.safetensors")[2:]) == 2
    assert capsys.readouterr().err == (f"error: {f}: is a file, not a folder, so {f / 'g.safetensors'} cannot be "
                                       "created under it\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grads", "notes.txt"] and list(d.iterdir()) == []


def test_existing_out_needs_overwrite(world, reference, tmp_path, capsys):
    """A second `slug grads --out FILE` replaced a finished pass without a word; it is refused unless --overwrite
    (the file untouched), and --overwrite replaces it."""
    from slugkit.cli import main

    out = tmp_path / "g.safetensors"
    out.write_bytes(reference[1].read_bytes())
    before = out.read_bytes()
    assert main(_cli(world, out)[2:]) == 2
    assert capsys.readouterr().err == (f"error: {out} already exists; pass --overwrite to replace it, or choose "
                                       "another --out\n")
    assert out.read_bytes() == before and not Path(f"{out}.ckpt").exists()
    out.write_bytes(b"my notes")  # trial 39: --overwrite replaced any file; only a gradients file slug wrote now
    assert main(_cli(world, out, "--overwrite")[2:]) == 2
    assert "is not a gradients file slug wrote; --overwrite replaces only those" in capsys.readouterr().err
    assert out.read_bytes() == b"my notes"
    Gradients({"x": torch.ones(2)}, {"x": torch.ones(2)}, 1, 1).save(out)  # another pass's file: replaced
    assert main(_cli(world, out, "--overwrite")[2:]) == 0
    _assert_equal_grads(Gradients.load(out), reference[0].grads)
    for bad, words in ((tmp_path / "g.pt", "use a name ending in .safetensors"),
                       (Path(slugkit.__file__).parent / "g.safetensors", "inside the slugkit package")):
        assert main(_cli(world, bad)[2:]) == 2
        assert words in capsys.readouterr().err and not bad.exists()
    pkg = Path(slugkit.__file__).parent / "ck"  # verify 41: the resume state was written into the package
    assert main(_cli(world, tmp_path / "h.safetensors", "--checkpoint-dir", str(pkg))[2:]) == 2
    assert "--checkpoint-dir" in capsys.readouterr().err and not pkg.exists()
    cli = _cli(world, tmp_path / "h.safetensors")[2:]
    cli[cli.index("--retain") + 1] = cli[cli.index("--forget") + 1]
    assert main(cli) == 2
    assert "--retain and --forget are the same set" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- (a)
def test_streaming_equals_compute_gradients(world, reference):
    """Same batches (formed within each shard) -> the same gradients as the in-memory ``compute_gradients``."""
    a = _adapter(world)

    def batches(spec):
        for shard in list_shards(spec):
            samples = list(iter_pairs(shard))
            for i in range(0, len(samples), BS):
                chunk = samples[i:i + BS]
                yield torch.stack([a.preprocess(s.image) for s in chunk]), a.tokenize([s.caption for s in chunk])

    ref = compute_gradients(a, batches(world["forget"]), batches(world["retain"]), progress=False)
    res, out = reference
    assert (res.grads.n_forget, res.grads.n_retain) == (8, 7)
    _assert_equal_grads(res.grads, ref)
    _assert_equal_grads(Gradients.load(out), ref)
    assert max(v.abs().max().item() for v in ref.forget.values()) > 1e-3  # non-trivial: 1e-6 is a real check


def test_a_shard_listed_twice_or_copied_is_read_once(world, reference, tmp_path, capsys):
    """`slug grads --forget 'a.tar::a.tar'` and a copy of a shard under another name were read twice by the streaming
    pass, their pairs weighted double; each is now read once, said in a note, and the gradients equal the
    reference's."""
    import shutil

    first = world["root"] / "forget" / "00000.tar"
    shutil.copy(first, tmp_path / "copy_of_00000.tar")
    dropped = []
    spec = f"{world['forget']}::{first}::{tmp_path / 'copy_of_00000.tar'}"
    assert list_shards(spec, dropped) == list_shards(world["forget"])
    assert dropped == [(str(first.resolve()), str(first.resolve())),
                       (str((tmp_path / "copy_of_00000.tar").resolve()), str(first.resolve()))]
    res = run_gradpass(_adapter(world), PassConfig(spec, world["retain"], out=str(tmp_path / "g.safetensors"),
                                                   batch_size=BS))
    _assert_equal_grads(res.grads, reference[0].grads)
    err = capsys.readouterr().err
    assert f"note: --forget: {first.resolve()} is listed twice; read once" in err
    assert f"is a copy of {first.resolve()}; read once" in err


def test_unit_assignment():
    shards = ["a", "b", "c"]
    assert [u.id for u in assign_units("forget", shards, 0, 2)] == ["forget:0", "forget:2"]
    assert [u.id for u in assign_units("forget", shards, 1, 2)] == ["forget:1"]
    # fewer shards than ranks: every rank reads each shard, keeps batches with index % W == rank
    assert [u.id for u in assign_units("retain", ["a"], 1, 2)] == ["retain:0:1"]


# ---------------------------------------------------------------------------------------------- (b)
def test_torchrun_two_gloo_ranks_equal_single_process(world, reference, tmp_path):
    out = tmp_path / "g2.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *_cli(world, out)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 rank(s)" in p.stdout
    _assert_equal_grads(Gradients.load(out), reference[0].grads)
    assert not Path(f"{out}.ckpt").exists()


# ---------------------------------------------------------------------------------------------- (c)
def test_resume_after_sigkill_equals_uninterrupted(world, reference, tmp_path):
    from safetensors import safe_open

    out, ck = tmp_path / "g.safetensors", tmp_path / "ck"
    env = _env()
    env[SLEEP_ENV] = "60"  # test-only: sleep after each checkpoint so the kill lands mid-pass
    proc = subprocess.Popen([sys.executable, *_cli(world, out, "--checkpoint-dir", str(ck))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank_file = ck / "rank0-of-1.safetensors"
    try:
        deadline = time.time() + 90
        while not rank_file.is_file():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # no partial output
    with safe_open(str(rank_file), framework="pt") as f:
        meta = json.loads(f.metadata()["slugkit"])
    assert meta["split"] == "forget" and meta["done"] == ["forget:0"] and meta["count"] == 3
    assert not any(p.name.endswith(".tmp") for p in ck.iterdir())

    # a different command (batch size) is refused and leaves the checkpoint alone
    bad = subprocess.run([sys.executable, *_cli(world, out, "--checkpoint-dir", str(ck), bs=3)], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "different command" in bad.stderr and "batch_size" in bad.stderr
    assert rank_file.is_file() and not out.exists()
    # so is another CPU thread count: the sums' bits follow it (trial 49: a resume under 2 threads matched neither)
    two = [x if x != "1" or i == 0 or c[i - 1] != "--threads" else "2"
           for c in [_cli(world, out, "--checkpoint-dir", str(ck))] for i, x in enumerate(c)]
    bad = subprocess.run([sys.executable, *two], env=_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "differs in: cpu_threads" in bad.stderr, bad.stderr[-3000:]
    assert "with --threads 1: it was written with 1 CPU thread, and" in bad.stderr and rank_file.is_file()

    # the same command resumes and gives exactly the uninterrupted result
    p = subprocess.run([sys.executable, *_cli(world, out, "--checkpoint-dir", str(ck))], env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stderr and "1 unit(s)" in p.stderr
    got, ref = Gradients.load(out), reference[0].grads
    for split in ("forget", "retain"):
        for n, v in getattr(ref, split).items():
            assert torch.equal(getattr(got, split)[n], v), (split, n)
    assert not ck.exists()


def test_foreign_checkpoint_refused_in_process(world, tmp_path):
    a = _adapter(world)
    ck = tmp_path / "ck"
    ck.mkdir()
    # a checkpoint of another model: same data, different weights
    from slugkit.slug.checkpoint import fingerprint, fingerprint_digest, save_sums

    cfg = PassConfig(world["forget"], world["retain"], out=str(tmp_path / "g.safetensors"), batch_size=BS,
                     checkpoint_dir=str(ck))
    names = a.candidate_names()
    fp = fingerprint(a, names, list_shards(cfg.forget), list_shards(cfg.retain), cfg, 1)
    fp["weights_sha256"] = "0" * 64
    sums = {n: torch.zeros_like(p) for n, p in a.model.named_parameters() if n in names}
    save_sums(ck / "rank0-of-1.safetensors", sums, names, {"digest": fingerprint_digest(fp), "fingerprint": fp,
                                                             "split": "forget", "done": [], "count": 0})
    with pytest.raises(CheckpointMismatchError, match="weights_sha256"):
        run_gradpass(a, cfg)


def test_a_shard_rewritten_at_the_same_size_is_not_resumed(world, tmp_path, monkeypatch, capsys):
    """A finished shard re-curated in place keeps its size (tar padding): the resume took the old sums, and the
    interrupted command said only "interrupted" (twelfth trial)."""
    import shutil

    import slugkit.slug.gradpass as gp
    from slugkit.cli import main

    shutil.copytree(world["root"] / "forget", tmp_path / "forget")
    shutil.copytree(world["root"] / "retain", tmp_path / "retain")
    forget, retain = str(tmp_path / "forget" / "{00000..00002}.tar"), str(tmp_path / "retain")
    real, calls = gp.save_sums, []

    def stop_after_first(*args, **kw):
        real(*args, **kw)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(gp, "save_sums", stop_after_first)
    out = tmp_path / "g.safetensors"
    args = ["grads", "--model", world["model"], "--forget", forget, "--retain", retain,
            "--batch-size", str(BS), "--out", str(out), "--no-progress"]
    assert main(args) == 130 and calls
    err = capsys.readouterr().err
    assert f"note: the finished shards are checkpointed in {out}.ckpt; rerun the same command to resume" in err
    monkeypatch.setattr(gp, "save_sums", real)
    first = list_shards(forget)[0]
    st = os.stat(first)
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten: same size, later modification time
    assert main(args) == 2
    err = capsys.readouterr().err  # names the shard and why (it advised rerunning the same command: 13th trial)
    assert "holds a checkpoint of a different command (rank0-of-1.safetensors differs in: forget; changed shards: " \
           f"{first} (modified since))" in err and "the shards changed: the checkpoint's sums are of the old data" in err
    # a shard left out of the command is named too (it said only "differs in: forget"; trial 24)
    two = str(tmp_path / "forget" / "{00000..00001}.tar")
    assert main([*args[:4], two, *args[5:]]) == 2
    assert f"changed shards: {first} (modified since), {list_shards(forget)[2]} (gone))" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- (d)
def test_stats_first_ranks_like_full_mode(world, reference, tmp_path):
    a = _adapter(world)
    out = tmp_path / "s.safetensors"
    res = run_gradpass(a, PassConfig(world["forget"], world["retain"], out=str(out), batch_size=BS, stats_first=True))
    full = reference[0].grads
    names = a.candidate_names()
    ref_table = rank_layers(a, full, names)
    table = rank_from_stats(a, load_stats(out), names)
    assert table.fronts == ref_table.fronts and table.excluded == ref_table.excluded
    assert [r.name for r in table.rows] == [r.name for r in ref_table.rows]
    for r, q in zip(table.rows, ref_table.rows):
        assert r.on_front == q.on_front
        assert r.importance == pytest.approx(q.importance, rel=1e-5, abs=1e-9)
        assert r.alignment == pytest.approx(q.alignment, rel=1e-5, abs=1e-6)
        assert r.forget_grad_norm == pytest.approx(q.forget_grad_norm, rel=1e-5)
        assert r.retain_grad_norm == pytest.approx(q.retain_grad_norm, rel=1e-5)
    # full gradients only for the front tensors, equal to the full mode's
    front = ref_table.front_names()
    assert res.front == front and len(front) < len(names)
    g = Gradients.load(out)
    assert sorted(g.forget) == sorted(front) == sorted(g.retain)
    for n in front:
        assert torch.equal(g.forget[n], full.forget[n]) and torch.equal(g.retain[n], full.retain[n])
    # rank_layers on the stats-first file (front tensors only) finds the same front
    assert rank_layers(a, g, names).fronts == ref_table.fronts


@pytest.mark.parametrize("crash_after", [1, 4])
def test_resume_uses_checkpointed_sums(world, reference, tmp_path, monkeypatch, crash_after):
    """In process: crash after the ``crash_after``-th checkpoint (1: mid forget split; 4: after the forget spill and
    the only retain unit), resume, get the uninterrupted result bit for bit; and a resumed run really takes the
    completed units from the checkpoint (poisoning its sums changes the result)."""
    import slugkit.slug.gradpass as gp

    calls = []

    def crash(_s):
        calls.append(1)
        if len(calls) == crash_after:
            raise KeyboardInterrupt("simulated kill")

    ck = tmp_path / "ck"
    cfg = PassConfig(world["forget"], world["retain"], out=str(tmp_path / "g.safetensors"), batch_size=BS,
                     checkpoint_dir=str(ck))
    monkeypatch.setenv(SLEEP_ENV, "1")
    monkeypatch.setattr(gp.time, "sleep", crash)
    with pytest.raises(KeyboardInterrupt):
        run_gradpass(_adapter(world), cfg)
    assert not Path(cfg.out).exists()
    assert (ck / "forget.safetensors").is_file() == (crash_after == 4)
    ref = reference[0].grads
    if crash_after == 1:  # poison a copy of the checkpoint: the resumed run must use (not recompute) its sums
        import shutil

        from safetensors.torch import load_file, save_file

        from slugkit.slug.gradpass import _read_meta

        ck2 = tmp_path / "ck2"
        shutil.copytree(ck, ck2)
        f = ck2 / "rank0-of-1.safetensors"
        meta = _read_meta(f)
        save_file({k: v * 0 for k, v in load_file(str(f)).items()}, str(f), metadata={"slugkit": json.dumps(meta)})
        poisoned = run_gradpass(_adapter(world), PassConfig(cfg.forget, cfg.retain, out=None, batch_size=BS,
                                                            checkpoint_dir=str(ck2))).grads
        n = next(iter(ref.forget))
        assert not torch.allclose(poisoned.forget[n], ref.forget[n], atol=1e-6)
        assert torch.equal(poisoned.retain[n], ref.retain[n])
    res = run_gradpass(_adapter(world), cfg).grads
    for split in ("forget", "retain"):
        for n, v in getattr(ref, split).items():
            assert torch.equal(getattr(res, split)[n], v), (split, n)
    assert not ck.exists()


def test_provenance_sees_every_parameter_and_a_folders_files(world, tmp_path):
    """A bias-only change passed the gradients file's weights check (only the candidate tensors were hashed), and a
    captioned folder's fingerprint was [-1, -1] whatever it held (fourteenth trial)."""
    from slugkit.slug.gradfile import state_sha256
    from slugkit.slug.checkpoint import folder_stat

    a = _adapter(world)
    before = state_sha256(a.model)
    bias = next(p for n, p in a.model.named_parameters() if n.endswith("bias") and n not in a.candidate_names())
    with torch.no_grad():
        bias.add_(1e-3)
    assert state_sha256(a.model) != before
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.txt").write_text("Alice Abbott")
    first = folder_stat(str(tmp_path / "f"))
    (tmp_path / "f" / "a.txt").write_text("Bruno Baker!")
    st = os.stat(tmp_path / "f" / "a.txt")
    os.utime(tmp_path / "f" / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert first[0] > 0 and folder_stat(str(tmp_path / "f")) != first


def _tar_with(path: Path, members: dict[str, bytes]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _members(shard: Path) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(shard) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}


def test_a_pair_repeated_in_another_shard_is_read_once_resumed_too(world, reference, tmp_path, monkeypatch):
    """`slug grads` skipped copied pairs only within a shard: a pair repeated in another shard counted twice, while
    `slug unlearn` reads it once, so `--gradients` refused the file for a pair count it could never reach (trial 24).
    The split's shards now share one set of pair digests, kept in the checkpoint, so a pass killed after the first
    shard and resumed still reads the repeat once: the gradients equal the reference's and the skip is counted."""
    import slugkit.slug.gradpass as gp

    m = _members(world["root"] / "forget" / "00000.tar")
    _tar_with(tmp_path / "again.tar", {"again0.png": m["f0_0.png"], "again0.txt": m["f0_0.txt"]})
    spec = f"{world['forget']}::{tmp_path / 'again.tar'}"
    assert sum(1 for _ in iter_pairs(spec)) == 8  # what `slug unlearn` reads
    res = run_gradpass(_adapter(world), PassConfig(spec, world["retain"], out=None, batch_size=BS,
                                                   checkpoint_dir=str(tmp_path / "ck0")))
    _assert_equal_grads(res.grads, reference[0].grads)
    assert res.read_stats["forget"].skipped_duplicate_pair == 1
    assert "a pair of an earlier shard" in res.read_stats["forget"].problems()[0]

    calls = []

    def crash(_s):
        calls.append(1)
        if len(calls) == 1:  # after the first forget shard: the repeat comes in the last one
            raise KeyboardInterrupt("simulated kill")

    cfg = PassConfig(spec, world["retain"], out=str(tmp_path / "g.safetensors"), batch_size=BS,
                     checkpoint_dir=str(tmp_path / "ck"))
    monkeypatch.setenv(SLEEP_ENV, "1")
    monkeypatch.setattr(gp.time, "sleep", crash)
    with pytest.raises(KeyboardInterrupt):
        run_gradpass(_adapter(world), cfg)
    res = run_gradpass(_adapter(world), cfg)
    for split in ("forget", "retain"):
        for n, v in getattr(reference[0].grads, split).items():
            assert torch.equal(getattr(res.grads, split)[n], v), (split, n)
    st = res.read_stats["forget"]
    assert (st.samples, st.skipped_duplicate_pair) == (8, 1)  # the first run's shard is counted too
    from slugkit.slug.gradfile import read_provenance

    prov = read_provenance(cfg.out)
    assert prov["read_stats"]["forget"]["skipped_duplicate_pair"] == 1 and prov["batch_size"] == BS
    assert prov["retain_batches"] == 4 and res.warnings == []  # 7 pairs in one shard at batch 2


def test_shards_smaller_than_a_batch_are_warned_about():
    """50 retain shards of 3 pairs at batch 64 gave retain gradients at cosine 0.82 to `slug unlearn`'s, which batches
    across shards, and another layer (trial 24); `slug grads` now says so."""
    from slugkit.slug.gradpass import small_shards_warning

    (w,) = small_shards_warning(150, 50, 64)
    assert w.startswith("the 150 retain pairs made 50 batches of 3.0 pairs on average") and "3 of up to 64" in w
    assert small_shards_warning(7, 4, 2) == [] and small_shards_warning(1000, 20, 64) == []


def test_a_file_batched_otherwise_is_said_by_unlearn(tmp_path):
    """`slug unlearn --gradients` took a file computed at another --batch-size, or over shards smaller than a batch,
    without a word, though the contrastive retain loss (its negatives are the batch) makes that another gradient."""
    from slugkit.slug.gradfile import batching_record, save_full
    from slugkit.slug.gradients import Gradients

    g = Gradients({"w": torch.ones(2)}, {"w": torch.ones(2)}, 100, 150)

    def record(prov, batch_size=64):
        path = tmp_path / "g.safetensors"
        save_full(path, g, prov)
        return batching_record(path, batch_size, 150)

    same = record({"batch_size": 64, "retain_batches": 3})
    assert same["warnings"] == [] and same["run_retain_batches"] == 3
    (w,) = record({"batch_size": 64, "retain_batches": 3}, batch_size=32)["warnings"]
    assert "was computed at --batch-size 64, this run's is 32" in w and "pass --batch-size 64" in w
    (w,) = record({"batch_size": 64, "retain_batches": 50})["warnings"]
    assert "formed its 150 retain pairs into 50 batches of 3.0 pairs on average" in w
    assert "would form 3 of up to 64" in w
    assert record({"batch_size": 64, "retain_batches": 4})["warnings"] == []  # within 1.5x of one stream's
    old = record(None)  # an older slugkit's file records no batching: nothing to compare, nothing said
    assert old["batch_size"] is None and old["warnings"] == []


def test_cli_grads_reads_a_folder_in_a_list_and_says_what_it_skipped(world, tmp_path, capsys):
    """`slug grads --forget 'a.tar::my_folder'` was refused ("holds no .tar shards") while `slug unlearn` read it, and
    `slug grads` dropped a corrupt image without a word (`slug unlearn` warns): trial 24."""
    from slugkit.cli import main

    folder = tmp_path / "my folder"
    folder.mkdir()
    _image(np.random.default_rng(5)).save(folder / "ok.png")
    (folder / "ok.txt").write_text("a photo of alice abbott")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "broken.txt").write_text("a photo of alice abbott again")
    shard = world["root"] / "forget" / "00000.tar"
    assert list_shards(f"{shard}::{folder}") == [str(shard.resolve()), str(folder.resolve())]
    out = tmp_path / "g.safetensors"
    assert main(["grads", "--model", world["model"], "--forget", f"{shard}::{folder}", "--retain", world["retain"],
                 "--out", str(out), "--batch-size", str(BS), "--threads", "1", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "(forget 4 samples, retain 7 samples" in cap.out  # 3 in the shard + the folder's good pair
    assert f"warning: --forget {shard}::{folder}: 1 image(s) could not be decoded" in cap.err
    assert "broken.jpg" in cap.err
    g = Gradients.load(out)
    assert g.n_forget == 4


def test_bad_input_leaves_no_checkpoint_that_blocks_the_corrected_rerun(world, tmp_path):
    """A retain set of links only failed after the forget split and left OUT.ckpt, which refused the corrected rerun
    as "a checkpoint of a different command" (trial 25): an input error now removes it."""
    bad = tmp_path / "retain.tar"
    _tar_with(bad, {})
    out = tmp_path / "g.safetensors"
    cfg = PassConfig(world["forget"], str(bad), out=str(out), batch_size=BS)
    with pytest.raises(ValueError, match="yielded no usable image"):
        run_gradpass(_adapter(world), cfg)
    assert not Path(f"{out}.ckpt").exists() and not out.exists()
    _tar_with(bad, _members(Path(world["root"]) / "retain" / "00000.tar"))
    assert run_gradpass(_adapter(world), cfg).grads.n_retain == 7


def test_a_file_that_holds_no_gradients_is_named(tmp_path):
    """Trial 39: a LoRA given as --gradients said "not enough values to unpack (expected 2, got 1)", a truncated file
    was safetensors' traceback."""
    from safetensors.torch import save_file

    lora = tmp_path / "l.safetensors"
    save_file({"text_encoder.m.lora_A.weight": torch.ones(2, 2)}, str(lora),
              metadata={"slugkit.format": '"slugkit-lora"'})
    other = tmp_path / "o.safetensors"
    save_file({"w": torch.ones(2)}, str(other))
    for path, words in ((lora, "is a slugkit LoRA, not the gradients"), (other, "is no slugkit gradients file")):
        with pytest.raises(ValueError, match=words):
            Gradients.load(path)
    bad_meta = tmp_path / "m.safetensors"
    save_file({"forget/w": torch.ones(2)}, str(bad_meta), metadata={"slugkit": "{not json"})
    with pytest.raises(ValueError, match="its metadata is not JSON"):
        Gradients.load(bad_meta)
    g = tmp_path / "g.safetensors"
    Gradients({"x": torch.ones(3)}, {"x": torch.ones(3)}, 2, 5).save(g)
    assert Gradients.load(g).n_retain == 5
    assert Gradients.is_file_of_ours(g) and not any(Gradients.is_file_of_ours(p) for p in (lora, other, bad_meta))
    g.write_bytes(g.read_bytes()[:-4])
    with pytest.raises(ValueError, match="is not a readable gradients file"):
        Gradients.load(g)
    # a folder said "(OSError: No such device)", a patch.json "header too large"; each is named for what it is
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "patch.json").write_text('{"format": "slugkit-patch"}')
    (tmp_path / "x.json").write_text(' {"a": 1}')
    for path, what in ((tmp_path / "p", "a patch folder"), (tmp_path, "a folder"),
                       (tmp_path / "p" / "patch.json", r"a patch's metadata file \(patch.json\)"),
                       (tmp_path / "x.json", "a JSON text file")):
        with pytest.raises(ValueError, match=f"is {what}, not the gradients file `slug grads`"):
            Gradients.load(path)


def test_a_checkpoint_dir_holding_files_of_ours_that_are_no_checkpoint_is_refused_without_advising_deletion(tmp_path):
    """Trial 48: --checkpoint-dir RUN/patch was "a checkpoint of a different command … or delete the directory"."""
    from safetensors.torch import save_file

    from slugkit.slug.checkpoint import CheckpointMismatchError, check_checkpoint_dir

    folder = tmp_path / "patch"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "patch.safetensors"), metadata={"format": "slugkit-patch"})
    with pytest.raises(CheckpointMismatchError) as e:
        check_checkpoint_dir(folder, {"format": "slugkit-gradpass-1"})
    assert "holds patch.safetensors, which is no `slug grads` checkpoint" in str(e.value)
    assert "delete" not in str(e.value)
    (folder / "junk.safetensors").write_bytes(b"not a safetensors file")  # unreadable: named too, never deleted
    with pytest.raises(CheckpointMismatchError, match="junk.safetensors, patch.safetensors, which are no"):
        check_checkpoint_dir(folder, {"format": "slugkit-gradpass-1"})
