"""Trust cases E1, E2, E4, E5, E6 and F (inspect) of ``shared/cases/trust-cases.md`` on the library: checkpoints are
recognised by their header, LFS pointers are named, half-precision targets are patched through a cast, the user's
safetensors metadata survives, the architecture a patch was made on is recorded and checked, and ``describe`` never
prints a control character from an untrusted ``patch.json``.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from slugkit.patch import (PatchError, PatchFormatError, PatchMismatchError, apply_patch, compose_patches, describe,
                           load_patch, load_state_dict_file, make_patch, revert_patch, save_patch, save_state_dict_file,
                           tensor_sha256)

open_clip = pytest.importorskip("open_clip")

CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 4, "layers": 2},
}
FC = "visual.transformer.resblocks.1.mlp.c_fc.weight"
LFS = (b"version https://git-lfs.github.com/spec/v1\n"
       b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1234567\n")


def tiny_clip(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**CFG, **kw).eval()


def edited(model, names=(FC,), eta: float = 0.05, seed: int = 123) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    return {n: sd[n] - eta * torch.randn(sd[n].shape, generator=g) for n in names}


def make(model, **kw):
    return make_patch(model, edited(model), base_model={"id": "tiny"}, adapter="open_clip", concept="x", **kw)


def first_byte_safetensors(tensors: dict, first: int = 0x80, **meta) -> bytes:
    """safetensors bytes (written by safetensors itself) whose header length puts ``first`` in byte 0."""
    for pad in range(512):
        data = safetensors.torch.save(tensors, metadata={"format": "pt", **meta, "pad": "x" * pad})
        if data[0] == first:
            return data
    raise AssertionError("no padding gives that first byte")


# ---------------------------------------------------------------------------------------------- E1 / E2: checkpoints


def test_e1_checkpoint_whose_first_byte_is_0x80_loads(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    path = tmp_path / "te.safetensors"
    path.write_bytes(first_byte_safetensors(sd))
    assert path.read_bytes()[0] == 0x80
    loaded = load_state_dict_file(path)
    assert set(loaded) == {"a", "b"} and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_e1_pickles_are_still_refused_with_the_advice(tmp_path):
    pt = tmp_path / "model.safetensors"  # a pickle under a safetensors name: judged by content
    torch.save({"x": torch.zeros(2)}, pt)
    with pytest.raises(PatchFormatError, match="(?s)never unpickles.*save_file"):
        load_state_dict_file(pt)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"\x80\x04\x95" + b"\x00" * 40)  # pickle protocol 4 opcode stream
    with pytest.raises(PatchFormatError, match="never unpickles"):
        load_state_dict_file(raw)


def test_e2_lfs_pointer_checkpoint_is_named(tmp_path):
    ptr = tmp_path / "model.safetensors"
    ptr.write_bytes(LFS)
    with pytest.raises(PatchFormatError, match=r"(?s)model\.safetensors.*Git LFS pointer.*git lfs pull") as ei:
        load_state_dict_file(ptr)
    assert "\n" not in str(ei.value)  # one line
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(PatchFormatError, match="empty"):
        load_state_dict_file(empty)


# ---------------------------------------------------------------------------------------------- E4: half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_e4_half_precision_open_clip_model_is_patched_through_a_cast(dtype):
    base = tiny_clip()
    patch = make(base)
    model = tiny_clip().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_patch(model, patch)
    sd = model.state_dict()
    assert sd[FC].dtype == dtype and torch.equal(sd[FC], patch.patched[FC].to(dtype))
    assert all(torch.equal(sd[k], before[k]) for k in before if k != FC)
    revert_patch(model, patch)
    assert all(tensor_sha256(v) == tensor_sha256(before[k]) for k, v in model.state_dict().items())  # bit-exact
    # the hash check still runs on the cast originals: another fp16 model is refused, untouched
    other = tiny_clip(seed=1).to(dtype)
    snap = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PatchMismatchError, match="expected sha256"):
        apply_patch(other, patch)
    assert all(torch.equal(v, snap[k]) for k, v in other.state_dict().items())


def test_e4_half_precision_state_dict_and_round_away():
    base = tiny_clip().state_dict()
    patch = make_patch(base, edited(tiny_clip()), base_model="tiny", adapter="open_clip", concept="x")
    half = {k: v.half() for k, v in base.items()}
    apply_patch(half, patch)
    assert half[FC].dtype == torch.float16 and torch.equal(half[FC], patch.patched[FC].half())
    revert_patch(half, patch)
    assert torch.equal(half[FC], base[FC].half())
    # an edit of one float32 ulp disappears in fp16: refused, the target untouched
    tiny = base[FC].clone()
    tiny[0, 0] = torch.nextafter(tiny[0, 0], torch.tensor(float("inf")))
    p2 = make_patch(base, {FC: tiny}, base_model="tiny", adapter="open_clip", concept="x")
    snap = half[FC].clone()
    with pytest.raises(PatchError, match="rounds away"):
        apply_patch(half, p2)
    assert torch.equal(half[FC], snap)


def test_e4_cast_patch_lives_in_patch_ops():
    from slugkit.integrations import cast_patch as from_integrations
    from slugkit.patch import cast_patch

    assert cast_patch is from_integrations


# ---------------------------------------------------------------------------------------------- E5: metadata


def test_e5_save_state_dict_file_keeps_metadata_deterministically(tmp_path):
    sd = {"w": torch.randn(4, 3), "b": torch.zeros(3, dtype=torch.float16)}
    meta = {"modelspec.title": "mine", "modelspec.architecture": "clip", "format": "pt", "zeta": "1", "alpha": "2"}
    outs = []
    for i in range(6):  # safetensors keeps __metadata__ in a hash map: the order would vary between calls
        outs.append(save_state_dict_file(sd, tmp_path / f"o{i}.safetensors", metadata=meta).read_bytes())
    assert len(set(outs)) == 1
    header = json.loads(outs[0][8:8 + int.from_bytes(outs[0][:8], "little")])
    assert header["__metadata__"] == meta and list(header["__metadata__"]) == sorted(meta)
    back = load_state_dict_file(tmp_path / "o0.safetensors")
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_e5_template_write_is_byte_exact(tmp_path):
    base = tiny_clip().state_dict()
    src = tmp_path / "src.safetensors"
    safetensors.torch.save_file(base, str(src), metadata={"format": "pt", "modelspec.title": "t",
                                                           "modelspec.author": "me", "ss_x": "y"})
    patch = make_patch(base, edited(tiny_clip()), base_model="tiny", adapter="open_clip", concept="x")
    state = load_state_dict_file(src)
    apply_patch(state, patch)
    mid = save_state_dict_file(state, tmp_path / "mid.safetensors", template=src)
    with safetensors.safe_open(str(mid), "pt") as f:
        assert f.metadata() == {"format": "pt", "modelspec.title": "t", "modelspec.author": "me", "ss_x": "y"}
    state = load_state_dict_file(mid)
    assert torch.equal(state[FC], patch.patched[FC])
    revert_patch(state, patch)
    assert save_state_dict_file(state, tmp_path / "back.safetensors", template=mid).read_bytes() == src.read_bytes()


# ---------------------------------------------------------------------------------------------- E6: architecture


def test_e6_architecture_facts_of_open_clip():
    from slugkit.patch import architecture_facts

    gelu, quick = architecture_facts(tiny_clip()), architecture_facts(tiny_clip(quick_gelu=True))
    assert gelu["text.activation"] == "gelu" and gelu["vision.activation"] == "gelu"
    assert quick["text.activation"] == "quick_gelu" and quick["vision.activation"] == "quick_gelu"
    assert architecture_facts({"w": torch.zeros(1)}) == {}


def test_e6_patch_records_the_activation_and_refuses_another(tmp_path):
    from slugkit.patch import architecture_facts

    base = tiny_clip()
    patch = make(base, architecture=architecture_facts(base))
    assert patch.meta["architecture"]["text.activation"] == "gelu"
    save_patch(patch, tmp_path / "p")
    loaded = load_patch(tmp_path / "p")
    assert loaded.meta["architecture"] == patch.meta["architecture"]
    quick = tiny_clip(quick_gelu=True)  # the same weights, loaded as QuickGELU: the hashes agree, the outputs do not
    snap = {k: v.clone() for k, v in quick.state_dict().items()}
    with pytest.raises(PatchMismatchError, match="(?s)activation.*gelu.*quick_gelu") as ei:
        apply_patch(quick, loaded)
    assert "was not modified" in str(ei.value)
    assert all(torch.equal(v, snap[k]) for k, v in quick.state_dict().items())
    apply_patch(tiny_clip(), loaded)  # the architecture it was made on: fine
    # a state dict has no config: nothing to compare; an old patch without the field applies to either model
    apply_patch(tiny_clip(quick_gelu=True).state_dict(), loaded)
    apply_patch(tiny_clip(quick_gelu=True), make(tiny_clip()))


def test_e6_architecture_survives_cast_and_compose():
    from slugkit.patch import architecture_facts, cast_patch

    base = tiny_clip()
    arch = architecture_facts(base)
    p = make(base, architecture=arch)
    assert cast_patch(p, {FC: torch.float16}).meta["architecture"] == arch
    other = make_patch(base, edited(base, names=("text_projection",)), base_model={"id": "tiny"},
                       adapter="open_clip", concept="y", architecture=arch)
    assert compose_patches([p, other]).meta["architecture"] == arch
    quick_arch = {**arch, "text.activation": "quick_gelu"}
    odd = make_patch(base, edited(base, names=("text_projection",)), base_model={"id": "tiny"},
                     adapter="open_clip", concept="y", architecture=quick_arch)
    with pytest.raises(PatchError, match="architecture"):
        compose_patches([p, odd])


# ---------------------------------------------------------------------------------------------- F: describe


EVIL = "\x1b[2J\r\nbase model: evil"


def test_f_describe_escapes_control_characters():
    base = tiny_clip()
    p = make_patch(base, edited(base), base_model={"id": "tiny\x9b31m"}, adapter="open\x07clip", concept=EVIL,
                   method="slug\x00", metrics={"k\x1b": "v\r\x85", "f": 0.5}, extra={})
    text = describe(p)
    bad = [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7f <= ord(c) < 0xa0]
    assert not bad, bad
    assert not any(line.startswith("base model: evil") for line in text.splitlines())
    assert sum(line.lstrip().startswith("base model:") for line in text.splitlines()) == 1
    assert "\\x1b[2J\\r\\nbase model: evil" in text
    for needle in ("tiny\\x9b31m", "open\\x07clip", "slug\\x00", "k\\x1b", "v\\r\\x85"):
        assert needle in text, needle


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o077, 0o700)])
def test_saved_patch_folder_follows_the_umask(tmp_path, umask, mode):
    """Trust case F: a patch folder a teammate should read is not 0700 whatever the umask."""
    import os
    import stat

    import torch

    from slugkit.patch import make_patch, save_patch

    state = {"w": torch.arange(6, dtype=torch.float32)}
    patch = make_patch(state, {"w": state["w"] + 1}, base_model="toy", adapter="test", concept="x")
    old = os.umask(umask)
    try:
        out = save_patch(patch, tmp_path / "patch")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == mode
    assert stat.S_IMODE((out / "patch.json").stat().st_mode) == mode & 0o666
