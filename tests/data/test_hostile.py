"""Hostile and broken input: fuzzed shards, disk-full writes, pickle checkpoints (see the README's failure table)."""

import errno
import io
import os
import tarfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from slugkit.data import shards
from slugkit.data.shards import ReadStats, ShardError, iter_samples, write_shard


def _valid_shard_bytes(n=3) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(n):
            img = Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8))
            for name, data in ((f"k{i}.jpg", shards.encode_image(img)), (f"k{i}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


VALID = _valid_shard_bytes()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_shards_never_crash(tmp_path, data):
    """Random flips / truncations / garbage: the reader yields good samples, counts the rest, and under --strict
    raises only ShardError — never another exception, never a half sample."""
    raw = bytearray(VALID)
    kind = data.draw(st.sampled_from(["flip", "truncate", "garbage", "flip+truncate"]))
    if "flip" in kind:
        for _ in range(data.draw(st.integers(1, 40))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    if "truncate" in kind:
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    if kind == "garbage":
        raw = bytearray(data.draw(st.binary(min_size=0, max_size=3000)))
    path = tmp_path / "fuzz.tar"
    path.write_bytes(bytes(raw))
    stats = ReadStats()
    got = list(iter_samples(str(path), stats=stats))
    for s in got:
        assert s.image is not None and s.image.mode == "RGB" and isinstance(s.caption, str)
    assert stats.samples == len(got) <= 3
    try:
        list(iter_samples(str(path), strict=True))
    except ShardError:
        pass


_REAL_FDOPEN = os.fdopen


class _FullDisk(io.RawIOBase):
    """A file object that accepts ``budget`` bytes, then fails like a full disk."""

    def __init__(self, fd, budget):
        self._f = _REAL_FDOPEN(fd, "wb")
        self.budget = budget

    def write(self, b):
        if len(b) > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(b)
        return self._f.write(b)

    def flush(self):
        if not self._f.closed:
            self._f.flush()

    def fileno(self):
        return self._f.fileno()

    def close(self):
        self._f.close()
        super().close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_disk_full_leaves_no_partial_artifact(tmp_path, monkeypatch):
    from slugkit.common.files import atomic_write_bytes

    monkeypatch.setattr(shards.os, "fdopen", lambda fd, mode="wb": _FullDisk(fd, budget=100))
    img = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(OSError, match="No space"):
        write_shard(tmp_path / "out.tar", [("a", img, "caption")])
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "result.json", b"x" * 1000)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp file is left behind


def test_disk_full_while_saving_a_patch(tmp_path, monkeypatch):
    import torch

    from slugkit.patch import make_patch, save_patch

    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    patch = make_patch(state, {"w": state["w"] + 1}, base_model="toy", adapter="test", concept="x")
    import slugkit.patch.format as patch_mod

    def full_disk_write(path, data):  # the second file hits a full disk half-way
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        if path.name == patch_mod.PATCH_JSON:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(patch_mod, "_write_file", full_disk_write)
    with pytest.raises(OSError, match="No space"):
        save_patch(patch, tmp_path / "patch")
    assert not (tmp_path / "patch").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_pickle_checkpoint_is_refused(tmp_path):
    from slugkit.models.base import ModelLoadError
    from slugkit.models.open_clip import resolve_model_name

    (tmp_path / "model.pt").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match="never unpickles"):
        resolve_model_name("ViT-B-32", str(tmp_path / "model.pt"))


def test_the_pickle_message_is_one_line_and_never_suggests_overwriting_the_input(tmp_path):
    """The suggested conversion printed literal "\\n"s (refuse() escapes newlines), and for a pickle named
    x.safetensors it told the user to save over the input (eleventh trial)."""
    from slugkit.common.weights import WeightsFileError, check_weights_file

    for name, target in (("pk.pt", "pk.safetensors"), ("pk.safetensors", "pk.converted.safetensors")):
        (tmp_path / name).write_bytes(b"\x80\x04not really")
        with pytest.raises(WeightsFileError) as e:
            check_weights_file(tmp_path / name, "checkpoint")
        msg = str(e.value)
        assert "\n" not in msg and "is a pickle checkpoint" in msg
        assert f"save_file(sd, {str(tmp_path / target)!r})" in msg
