"""Trust cases on `slug apply / revert / inspect` with checkpoints (no demo run needed): E1, E2, E4, E5 and the F
items (inspect escaping, apply manners)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from slugkit.cli import main
from slugkit.patch import load_state_dict_file, make_patch, save_patch

LFS = (b"version https://git-lfs.github.com/spec/v1\n"
       b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1234567\n")
META = {"format": "pt", "modelspec.title": "my model", "modelspec.architecture": "clip", "modelspec.author": "me"}


def base_state(dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"enc.w": torch.randn(16, 8, generator=g).to(dtype), "enc.b": torch.randn(8, generator=g).to(dtype),
            "steps": torch.arange(4)}


@pytest.fixture
def patch_dir(tmp_path):
    base = base_state()
    new = {"enc.w": base["enc.w"] - 0.05 * torch.randn(16, 8, generator=torch.Generator().manual_seed(1))}
    save_patch(make_patch(base, new, base_model="toy", adapter="open_clip", concept="x"), tmp_path / "patch")
    return tmp_path / "patch"


def _err(capsys) -> str:
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- E1 / E2


def test_e1_apply_checkpoint_with_first_byte_0x80(tmp_path, patch_dir, capsys):
    for pad in range(512):
        data = safetensors.torch.save(base_state(), metadata={"format": "pt", "pad": "x" * pad})
        if data[0] == 0x80:
            break
    ck = tmp_path / "te.safetensors"
    ck.write_bytes(data)
    assert main(["apply", "--patch", str(patch_dir), "--checkpoint", str(ck), "--out",
                 str(tmp_path / "out.safetensors")]) == 0, _err(capsys)
    assert (tmp_path / "out.safetensors").is_file()


def test_e2_lfs_pointer_checkpoint_is_one_line(tmp_path, patch_dir, capsys):
    ck = tmp_path / "model.safetensors"
    ck.write_bytes(LFS)
    for cmd in ("apply", "revert"):
        assert main([cmd, "--patch", str(patch_dir), "--checkpoint", str(ck)]) == 2
        err = _err(capsys)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert str(ck) in err and "Git LFS pointer" in err and "git lfs pull" in err


# ---------------------------------------------------------------------------------------------- E4 / E5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_e5_apply_then_revert_is_byte_exact_and_keeps_metadata(tmp_path, patch_dir, capsys, dtype):
    src = tmp_path / "model.safetensors"
    safetensors.torch.save_file(base_state(dtype), str(src), metadata=META)
    mid, back = tmp_path / "patched.safetensors", tmp_path / "back.safetensors"
    assert main(["apply", "--patch", str(patch_dir), "--checkpoint", str(src), "--out", str(mid)]) == 0, _err(capsys)
    with safetensors.safe_open(str(mid), "pt") as f:
        assert f.metadata() == META
    patched = load_state_dict_file(mid)
    assert patched["enc.w"].dtype == dtype and not torch.equal(patched["enc.w"], base_state(dtype)["enc.w"])
    assert main(["revert", "--patch", str(patch_dir), "--checkpoint", str(mid), "--out", str(back)]) == 0
    assert back.read_bytes() == src.read_bytes()


# ---------------------------------------------------------------------------------------------- F: apply manners


def test_f_apply_needs_a_target(tmp_path, patch_dir, capsys):
    for cmd in ("apply", "revert"):
        assert main([cmd, "--patch", str(patch_dir), "--out", str(tmp_path / "y.safetensors")]) == 2
        assert _err(capsys) == (f"error: slug {cmd} needs --model M (or --checkpoint FILE, --pipeline DIR, "
                                f"--llava DIR)\n")
    assert not (tmp_path / "y.safetensors").exists()


def test_f_out_over_an_existing_file_needs_overwrite(tmp_path, patch_dir, capsys):
    src = tmp_path / "model.safetensors"
    safetensors.torch.save_file(base_state(), str(src), metadata=META)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    assert main(["apply", "--patch", str(patch_dir), "--checkpoint", str(src), "--out", str(out)]) == 2
    err = _err(capsys)
    assert str(out) in err and "--overwrite" in err
    assert out.read_bytes() == b"precious"
    assert main(["apply", "--patch", str(patch_dir), "--checkpoint", str(src), "--out", str(out),
                 "--overwrite"]) == 0
    assert "enc.w" in load_state_dict_file(out)
    from slugkit.patch import load_patch

    before = load_patch(patch_dir).fingerprint
    for inside in (patch_dir / "patch.safetensors", patch_dir / "sub" / "x.safetensors"):  # the patch was destroyed
        assert main(["apply", "--patch", str(patch_dir), "--checkpoint", str(src), "--out", str(inside),
                     "--overwrite"]) == 2
        assert "is inside the patch" in _err(capsys)
    assert main(["apply", "--patch", str(patch_dir), "--pipeline", "embedded", "--out", str(patch_dir)]) == 2
    assert f"--out {patch_dir} is the patch folder {patch_dir}" in _err(capsys)  # "inside" it: verification 66
    assert load_patch(patch_dir).fingerprint == before
    for target in ("nowhere/q.safetensors", "loop.safetensors"):  # a dangling link, a loop: replaced without a word
        link = tmp_path / f"link-{target.replace('/', '_')}"
        link.symlink_to(tmp_path / target)
        if target.startswith("loop"):
            (tmp_path / target).symlink_to(link)
        assert main(["apply", "--patch", str(patch_dir), "--checkpoint", str(src), "--out", str(link)]) == 2
        assert f"{link} is a symbolic link; pass --overwrite" in _err(capsys) and link.is_symlink()


def test_f_new_options_have_help_with_default():
    import argparse

    from slugkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd in ("apply", "revert"):
        helps = {o: act.help for act in sub.choices[cmd]._actions for o in act.option_strings}
        for flag in ("--model", "--clip-skip", "--overwrite"):
            assert "default" in (helps[flag] or ""), (cmd, flag, helps[flag])
        assert sub.choices[cmd].get_default("model") is None


# ---------------------------------------------------------------------------------------------- F: inspect


def test_f_inspect_escapes_control_characters(tmp_path, capsys):
    evil = "\x1b[2J\r\nbase model: evil"
    base = base_state()
    p = make_patch(base, {"enc.w": base["enc.w"] * 2}, base_model={"id": "toy\x9b2J"}, adapter="open_clip",
                   concept=evil, metrics={"\x1b]0;x\x07": 1.0})
    save_patch(p, tmp_path / "p")
    assert main(["inspect", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\x9b" not in out and "\x07" not in out
    assert not any(line.startswith("base model: evil") for line in out.splitlines())
    assert "\\x1b[2J\\r\\nbase model: evil" in out
    assert main(["inspect", str(tmp_path / "p"), "--json"]) == 0
    out = capsys.readouterr().out
    assert not [c for c in out if (ord(c) < 0x20 and c != "\n") or 0x7f <= ord(c) < 0xa0]
    meta = json.loads(out)
    assert meta["concept"] == evil and meta["base_model"]["id"] == "toy\x9b2J"


def test_the_wrote_line_escapes_a_newline_in_out(tmp_path, patch_dir, capsys):
    """A newline in `--out` split `slug apply`'s "wrote OUT" line (and `slug audit`'s; eighth trial): the success
    lines escape it as the errors do; accented letters are shown as they are."""
    ck = tmp_path / "te.safetensors"
    safetensors.torch.save_file(base_state(), str(ck), metadata={"format": "pt"})
    for name, shown in (("ou\nt.safetensors", "ou\\nt.safetensors"), ("née.safetensors", "née.safetensors")):
        assert main(["apply", "--patch", str(patch_dir), "--checkpoint", str(ck), "--out", str(tmp_path / name)]) == 0
        line = [x for x in capsys.readouterr().out.splitlines() if "patch(es)" in x]
        assert line == [f"applied 1 patch(es); wrote {tmp_path / shown}"], line


def test_a_folder_with_patches_below_it_names_them(tmp_path):
    """`slug inspect runs/compare` said "no patch … (a run's is RUN/patch)": a compare run's is slug/patch (eleventh
    trial). One patch below a folder is its patch; several are named."""
    from slugkit.patch.format import resolve_patch_dir

    for sub in ("joint/slug/patch", "sequential/slug/patch"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "patch.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"holds no patch but 2 below it: .*joint/slug/patch, "
                                                r".*sequential/slug/patch"):
        resolve_patch_dir(tmp_path)
    assert resolve_patch_dir(tmp_path / "joint") == tmp_path / "joint" / "slug" / "patch"


def test_a_patch_file_given_as_the_model_is_named_as_such(tmp_path, patch_dir, capsys):
    """Trial 38: `--checkpoint RUN/patch/patch.safetensors` said "the model has no tensor named … (did you mean
    'patched/…')"; and an open_clip architecture given weights of another said to download them elsewhere."""
    for flag, extra in (("--checkpoint", []), ("--pretrained", ["--model", "embedded"])):
        assert main(["apply", "--patch", str(patch_dir), flag, str(patch_dir / "patch.safetensors"), *extra,
                     "--out", str(tmp_path / "o.safetensors")]) == 2
        assert (f"error: {flag} {patch_dir / 'patch.safetensors'} is a slugkit patch's tensor file, not a model"
                in _err(capsys))
    from slugkit.models import ModelLoadError, load_adapter
    from slugkit.models.open_clip import EMBEDDED_DIR

    with pytest.raises(ModelLoadError, match=r"does not fit 'ViT-B-32' \(open_clip: .*\): pass the --model the "
                                             r"checkpoint was saved from") as e:
        load_adapter("ViT-B-32", str(EMBEDDED_DIR / "open_clip_model.safetensors"))
    assert "network" not in str(e.value)
