"""Weights files are recognised by parsing them (E1, E2 of the trust cases): safetensors whose first byte is 0x80 are
accepted, pickles, Git LFS pointers, truncated and foreign files are refused with the cause named."""

import pytest
import safetensors.torch
import torch

from slugkit.common.weights import WeightsFileError, check_weights_file, safetensors_header


def _safetensors_with_first_byte(byte: int) -> bytes:
    for k in range(400):
        data = safetensors.torch.save({"w" + "x" * k: torch.arange(3, dtype=torch.float32)})
        if data[0] == byte:
            return data
    raise AssertionError("no header length found")


def test_safetensors_starting_with_0x80_is_accepted(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(_safetensors_with_first_byte(0x80))
    header = check_weights_file(f)
    assert [k for k in header if k != "__metadata__"][0].startswith("w")


@pytest.mark.parametrize("name,content,cause", [
    ("lfs.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 492\n", "Git LFS pointer"),
    ("raw.pt", b"\x80\x04\x95junk", "pickle"),
    ("empty.safetensors", b"", "is empty"),
    ("notes.safetensors", b"hello, this is text and not weights at all", "not a safetensors file"),
])
def test_non_safetensors_are_refused_with_their_cause(tmp_path, name, content, cause):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(WeightsFileError, match=cause) as e:
        check_weights_file(f)
    assert str(f) in str(e.value)


def test_torch_save_zip_is_refused_as_pickle(tmp_path):
    f = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, f)
    with pytest.raises(WeightsFileError, match="pickle"):
        check_weights_file(f)


def test_truncated_safetensors_is_refused(tmp_path):
    data = safetensors.torch.save({"w": torch.zeros(16)})
    f = tmp_path / "cut.safetensors"
    f.write_bytes(data[:-8])
    assert safetensors_header(f) is None
    with pytest.raises(WeightsFileError, match="truncated"):
        check_weights_file(f)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        check_weights_file(tmp_path / "nope.safetensors", what="checkpoint")


def test_a_folder_is_named_as_one(tmp_path):
    """`slug apply --checkpoint DIR` said "checkpoint not found: DIR" (new-user trial): a folder is named as one, with
    the .safetensors files it holds."""
    with pytest.raises(IsADirectoryError, match=r"is a folder; the checkpoint is a \.safetensors file"):
        check_weights_file(tmp_path, "checkpoint")
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(IsADirectoryError, match=r"this folder holds model\.safetensors") as e:
        check_weights_file(tmp_path, "checkpoint")
    assert e.value.filename == str(tmp_path)
