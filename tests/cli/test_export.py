"""`slug export --lora PATCH --pipeline DIR|embedded --out FILE`: a text-encoder patch as a LoRA file, loaded back with
diffusers (``pipe.load_lora_weights``; the embedded pipeline through diffusers' text-encoder loader), its recorded
ranks and errors, the refusals (exit 2, one line naming the problem) and byte-identical reruns.

Stand-ins: conftest's ``hf_text_patch`` on the tiny transformers CLIP of ``hf_tiny``, saved with a tiny
StableDiffusionPipeline folder built from it; the shipped embedded text-to-image pipeline. Nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from conftest import TEXT_PATCH_TENSORS, spectral_edit  # noqa: E402
from hf_tiny import build_adapter, tiny_sd_pipeline  # noqa: E402

from slugkit.cli import main  # noqa: E402
from slugkit.integrations.diffusers_sd import apply_patch_to_pipeline  # noqa: E402
from slugkit.patch import load_patch, make_patch, save_patch  # noqa: E402
from slugkit.patch.lora import DEFAULT_MAX_ERROR, read_lora  # noqa: E402

PROMPTS = ["a photo of alice abbott.", "a photo of bruno baker.", ""]


@pytest.fixture(scope="module")
def sd(tmp_path_factory, hf_text_patch):
    """A folder with ``sd/`` (the tiny pipeline of the patch's CLIP, saved) and ``patch/``."""
    clip, patch = hf_text_patch
    root = tmp_path_factory.mktemp("export")
    tiny_sd_pipeline(clip).save_pretrained(root / "sd")
    save_patch(patch, root / "patch")
    return root


def _export(sd, out, *extra) -> int:
    return main(["export", "--lora", str(sd / "patch"), "--pipeline", str(sd / "sd"), "--out", str(out), *extra])


def _error_line(capsys) -> str:
    """The one ``error: ...`` line on stderr (after any library progress bars), checked to be the last line."""
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith("error: ")
    assert sum(line.startswith("error: ") for line in lines) == 1
    return lines[-1]


@torch.no_grad()
def _hidden(text_encoder, ids):
    return text_encoder(input_ids=ids).last_hidden_state


def test_full_rank_lora_loads_into_the_pipeline_as_the_patch(sd, tmp_path, hf_text_patch, capsys):
    from diffusers import StableDiffusionPipeline

    clip, patch = hf_text_patch
    out = tmp_path / "lora.safetensors"
    assert _export(sd, out, "--rank", "64") == 0
    printed = capsys.readouterr().out
    for name in TEXT_PATCH_TENSORS:
        assert f"text_encoder.{name.removesuffix('.weight')}: rank 64 of 64, relative error" in printed
    assert f"wrote {out}" in printed
    from slugkit.cli import main

    assert main(["inspect", str(out)]) == 0  # trial 39: "is a file, not a patch"
    shown = capsys.readouterr().out
    assert shown.startswith("slugkit LoRA (slugkit ") and "  encoder:    text_encoder" in shown
    assert "  rank:       forced 64" in shown and f"  modules ({len(TEXT_PATCH_TENSORS)}):" in shown
    import re  # each module's error as export printed it (0.000887 here, 8.866e-04 there: verification 66)

    said = re.findall(r"relative error (\S+)", printed)
    assert said and all(f"relative error {e}" in shown for e in said)
    assert f"patch fingerprint: {patch.fingerprint[:16]}…" in shown
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["patch_fingerprint"] == patch.fingerprint

    ref = StableDiffusionPipeline.from_pretrained(sd / "sd", local_files_only=True)
    apply_patch_to_pipeline(ref, patch)
    pipe = StableDiffusionPipeline.from_pretrained(sd / "sd", local_files_only=True)
    pipe.load_lora_weights(str(out))
    ids = clip.tokenize(PROMPTS)
    assert (_hidden(pipe.text_encoder, ids) - _hidden(ref.text_encoder, ids)).abs().max() <= 1e-5


def test_error_bound_and_forced_rank(sd, tmp_path, hf_text_patch, capsys):
    _, patch = hf_text_patch
    default, loose, one = tmp_path / "d.safetensors", tmp_path / "l.safetensors", tmp_path / "1.safetensors"
    assert _export(sd, default) == 0
    printed = capsys.readouterr().out
    assert _export(sd, loose, "--max-error", "0.3") == 0
    assert "warning:" not in capsys.readouterr().err
    assert _export(sd, one, "--rank", "1") == 0
    # a forced rank far from the edit is said (rank 1 at error 0.51 was written without a word: trial 43)
    assert "warning: the forced rank reproduces the patch's edit only to a relative error of" in \
        capsys.readouterr().err
    (t_d, m_d), (_, m_l), (_, m_1) = read_lora(default), read_lora(loose), read_lora(one)
    assert m_d["max_error"] == DEFAULT_MAX_ERROR and m_l["max_error"] == 0.3 and m_1["max_error"] is None
    assert m_1["rank"] == 1 and m_d["rank"] is None
    for key, name in m_d["tensors"].items():
        b, a = t_d[f"{key}.lora_B.weight"].double(), t_d[f"{key}.lora_A.weight"].double()
        delta = patch.patched[name].double() - patch.original[name].double()
        measured = float(torch.linalg.matrix_norm(delta - b @ a) / torch.linalg.matrix_norm(delta))
        assert m_d["relative_errors"][key] == pytest.approx(measured, rel=1e-12)
        assert m_d["relative_errors"][key] <= DEFAULT_MAX_ERROR
        assert f"{key}: rank {m_d['ranks'][key]} of 64, relative error {measured:.3e}" in printed
        assert m_l["ranks"][key] < m_d["ranks"][key]
        assert m_d["relative_errors"][key] < m_l["relative_errors"][key] <= 0.3
        assert m_1["ranks"][key] == 1 and m_1["relative_errors"][key] > m_l["relative_errors"][key]


def test_embedded_pipeline(tmp_path, capsys):
    """`--pipeline embedded`: the LoRA of a patch of the embedded CLIP's text tower gives the patched encoder's outputs
    in the embedded text-to-image pipeline. That pipeline is not a diffusers pipeline (no load_lora_weights), so the
    LoRA goes into its text encoder through peft directly (inject_adapter_in_model + set_peft_model_state_dict, with
    the file's lora_adapter_metadata as the LoraConfig) and through diffusers' own text-encoder loader."""
    import peft
    from diffusers import StableDiffusionPipeline

    from slugkit.models.convert import embedded_hf_clip
    from slugkit.world.t2i import EmbeddedT2IPipeline, pipeline_with_unet

    hf, tok, _ = embedded_hf_clip()
    names = ["text_model.encoder.layers.0.self_attn.out_proj.weight", "text_model.encoder.layers.2.mlp.fc2.weight"]
    patch = make_patch(hf, spectral_edit(hf, names, seed=2), base_model="embedded", adapter="hf_clip",
                       concept="red triangle")
    save_patch(patch, tmp_path / "patch")
    out = tmp_path / "red_triangle.safetensors"
    assert main(["export", "--lora", str(tmp_path / "patch"), "--pipeline", "embedded", "--out", str(out),
                 "--rank", "1000"]) == 0
    printed = capsys.readouterr().out
    assert "load_lora_into_text_encoder" in printed and "rank 1000 asked, capped at the full rank 64: exact" in printed

    pipe = EmbeddedT2IPipeline.load(clip=(hf, tok))
    ids = pipe.tokenize(["a photo of a red triangle.", "a blue star", ""])
    apply_patch_to_pipeline(pipe, patch)
    want = _hidden(pipe.text_encoder, ids)
    tensors, meta = read_lora(out)
    assert meta["ranks"] == {f"text_encoder.{n.removesuffix('.weight')}": 64 for n in names}
    cfg = {k.removeprefix("text_encoder."): v for k, v in meta["lora_adapter_metadata"].items()}
    te = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), pipeline_with_unet(pipe.unet, (hf, tok)).text_encoder)
    state = {k.removeprefix("text_encoder.").removeprefix("text_model."): v for k, v in tensors.items()}
    assert not peft.set_peft_model_state_dict(te, state).unexpected_keys
    assert (_hidden(te, ids) - want).abs().max() <= 1e-5

    # `slug apply --pipeline embedded` writes the same patched text encoder (it was refused while export took it)
    from transformers import CLIPTextModel

    assert main(["apply", "--pipeline", "embedded", "--patch", str(tmp_path / "patch"), "--out",
                 str(tmp_path / "te")]) == 0
    written = CLIPTextModel.from_pretrained(tmp_path / "te", subfolder="text_encoder").eval()
    assert (_hidden(written, ids) - want).abs().max() <= 1e-6
    assert main(["apply", "--pipeline", "embedded", "--full-pipeline", "--patch", str(tmp_path / "patch"), "--out",
                 str(tmp_path / "te2")]) == 2
    assert "not a diffusers pipeline" in capsys.readouterr().err

    te = pipeline_with_unet(pipe.unet, (hf, tok)).text_encoder
    state, alphas, file_meta = StableDiffusionPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, te, metadata=file_meta)
    assert (_hidden(te, ids) - want).abs().max() <= 1e-5


def _saved_patch(tmp_path, model, name, adapter="hf_clip"):
    w = dict(model.named_parameters())[name].detach() if hasattr(model, "named_parameters") else model[name]
    p = make_patch(model, {name: w * 1.5 + 0.01}, base_model="tiny", adapter=adapter, concept="x")
    return str(save_patch(p, tmp_path / "bad"))


@pytest.mark.parametrize("name, words", [
    ("vision_model.encoder.layers.0.mlp.fc1.weight", "vision tower"),
    ("text_model.encoder.layers.1.layer_norm1.weight", "belongs to a LayerNorm"),
    ("text_model.encoder.layers.1.self_attn.q_proj.bias", "it is a bias"),
])
def test_refuses_edits_a_lora_cannot_express(sd, tmp_path, hf_text_patch, capsys, name, words):
    clip, _ = hf_text_patch
    out = tmp_path / "x.safetensors"
    bad = _saved_patch(tmp_path, clip.model, name)
    assert main(["export", "--lora", bad, "--pipeline", str(sd / "sd"), "--out", str(out)]) == 2
    err = _error_line(capsys)
    assert name in err and words in err
    assert not out.exists()


def test_refuses_a_patch_that_is_not_of_a_text_encoder(sd, tmp_path, capsys):
    state = {"visual.proj": torch.randn(8, 4, generator=torch.Generator().manual_seed(0))}
    bad = _saved_patch(tmp_path, state, "visual.proj", adapter="open_clip")
    assert main(["export", "--lora", bad, "--pipeline", str(sd / "sd"), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = _error_line(capsys)
    assert "'visual.proj'" in err and "not a text-encoder patch" in err and "--family hf_clip" in err


def test_refuses_another_base_model(sd, tmp_path, capsys):
    tiny_sd_pipeline(build_adapter(seed=5)).save_pretrained(tmp_path / "other")
    capsys.readouterr()
    out = tmp_path / "x.safetensors"
    assert main(["export", "--lora", str(sd / "patch"), "--pipeline", str(tmp_path / "other"), "--out", str(out)]) == 2
    err = _error_line(capsys)
    assert "does not fit the patch, no LoRA written" in err and "expected sha256" in err
    assert "text_model.encoder.layers.2.self_attn" in err
    assert not out.exists()


def test_refuses_a_layer_the_pipeline_does_not_read(sd, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert _export(sd, out, "--clip-skip", "1") == 2  # the patch edits layer 3, the last one: skipped
    assert "text_model.encoder.layers.3.mlp.fc1.weight, which the pipeline never reads" in _error_line(capsys)
    assert not out.exists()


def test_refuses_to_overwrite_and_bad_options(sd, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"keep me")
    assert _export(sd, out) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert _export(sd, out, "--overwrite") == 2  # --overwrite replaces only a LoRA slug wrote (trial 30)
    assert "is not a LoRA slug wrote; overwrite replaces only those" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    out.unlink()
    assert _export(sd, out) == 0 and _export(sd, out, "--overwrite") == 0
    assert read_lora(out)[1]["format"] == "slugkit-lora"
    assert _export(sd, tmp_path / "lora.bin") == 2
    assert ".safetensors" in capsys.readouterr().err
    for extra in (["--rank", "2", "--max-error", "0.1"], ["--max-error", "0"], ["--max-error", "1.5"], ["--rank", "0"]):
        with pytest.raises(SystemExit) as e:
            _export(sd, tmp_path / "y.safetensors", *extra)
        assert e.value.code == 2
    assert not (tmp_path / "y.safetensors").exists()
    # an encoder the pipeline lacks: a TypeError traceback (seventeenth trial), now one line; apply --pipeline too
    capsys.readouterr()
    assert _export(sd, tmp_path / "y.safetensors", "--text-encoder", "text_encoder_2") == 2
    assert "--text-encoder text_encoder_2: this pipeline has no text_encoder_2 (it has text_encoder)" in \
        _error_line(capsys)
    assert main(["apply", "--patch", str(sd / "patch"), "--pipeline", str(sd / "sd"), "--out", str(tmp_path / "o"),
                 "--text-encoder", "text_encoder_2"]) == 2
    assert "sd has no text_encoder_2/ (it has text_encoder)" in _error_line(capsys)
    assert not (tmp_path / "y.safetensors").exists() and not (tmp_path / "o").exists()


def test_a_folder_it_cannot_write_in_is_refused_before_the_work(sd, tmp_path, capsys, monkeypatch):
    """Twentieth trial: an --out in a read-only folder failed only after the factorisation (~17 s on the embedded
    pipeline). As root a chmod does not stop a write, so the access check the command makes is what is simulated."""
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *k, **kw: False if str(p) == str(ro) else real(p, mode, *k,
                                                                                                     **kw))
    assert _export(sd, ro / "x.safetensors") == 2
    assert f"--out {ro / 'x.safetensors'}: cannot write in {ro} (read-only or not yours)" in _error_line(capsys)
    assert list(ro.iterdir()) == []


def test_two_exports_are_byte_identical(sd, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _export(sd, a) == 0 and _export(sd, b) == 0
    assert a.read_bytes() == b.read_bytes()


def test_inspect_of_a_model_folder_slug_wrote_describes_its_record(sd, tmp_path, capsys):
    """Trial 43: `slug inspect` of a patched pipeline folder said "not a patch"; it holds the record of the patch
    applied (slugkit_patch.json), which is described (and printed with --json)."""
    out = tmp_path / "patched"
    assert main(["apply", "--patch", str(sd / "patch"), "--pipeline", str(sd / "sd"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    said = capsys.readouterr().out
    fp = load_patch(sd / "patch").fingerprint
    assert said.startswith(f"{out} is a model slug wrote with a patch applied (") and f"patch {fp[:12]} of " in said
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["patch_fingerprint"] == fp
    # its sub-folder (the encoder one loads) says the same; a damaged record is named (verify 45)
    rec = next(out.rglob("slugkit_patch.json"))
    sub = next(d for d in out.iterdir() if d.is_dir())
    assert main(["inspect", str(sub)]) == 0 and f"patch {fp[:12]} of " in capsys.readouterr().out
    # a joint fine-tune's record: the names as words (it printed Python's ['A', 'B']) and "NOT SLUG"
    data = json.loads(rec.read_text())
    rec.write_text(json.dumps({**data, "concept": ["Jowen Gormere", "Hasa Malwick"], "method": "layer-finetune"}))
    assert main(["inspect", str(out)]) == 0
    said = capsys.readouterr().out
    assert "of 'Jowen Gormere', 'Hasa Malwick' (method layer-finetune: NOT SLUG" in said and "['" not in said
    rec.write_text('{"patch_fin')
    assert main(["inspect", str(out)]) == 2
    assert "the record of the patch slug applied here is not readable JSON" in capsys.readouterr().err


def test_apply_to_a_non_empty_out_is_refused_before_the_model_loads(sd, tmp_path, monkeypatch, capsys):
    """`slug apply --pipeline/--llava … --out EXISTING` loaded the weights, then refused the folder (verification
    61): the refusal now comes first."""
    import slugkit.integrations.diffusers_sd as dsd

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def no_load(*a, **k):
        raise AssertionError("loaded the text encoder before refusing the --out")

    monkeypatch.setattr(dsd, "_folder_text_encoder", no_load)
    assert main(["apply", "--patch", str(sd / "patch"), "--pipeline", str(sd / "sd"), "--out", str(out)]) == 2
    assert "holds files slug did not write (notes.txt" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    import slugkit.cli.patches as cli_patches  # --pipeline embedded loaded the shipped model first (verification 62)

    monkeypatch.setattr(cli_patches, "load_pipeline", no_load, raising=False)
    assert main(["apply", "--patch", str(sd / "patch"), "--pipeline", "embedded", "--out", str(out)]) == 2
    assert "holds files slug did not write (notes.txt" in capsys.readouterr().err


def test_refuses_a_pipeline_that_already_holds_the_patch(sd, tmp_path, capsys):
    """Verification 66: exporting from a pipeline `slug apply` had patched ended in apply's advice, "The patch is
    already applied to this model; nothing to do (`slug revert` …)", which an export cannot follow."""
    patched = tmp_path / "patched"
    assert main(["apply", "--pipeline", str(sd / "sd"), "--patch", str(sd / "patch"), "--out", str(patched),
                 "--full-pipeline"]) == 0
    capsys.readouterr()
    out = tmp_path / "x.safetensors"
    assert main(["export", "--lora", str(sd / "patch"), "--pipeline", str(patched), "--out", str(out)]) == 2
    err = _error_line(capsys)
    assert "does not fit the patch, no LoRA written" in err and "holds the patched values" in err
    assert "give the pipeline the patch was made for, not a patched copy" in err and "nothing to do" not in err
    assert not out.exists()
