"""The Python surfaces beside `slugkit.unlearn` as a notebook user drives them (trial 29): the integrations' save and
apply functions, `export_lora`, `audit_patch` and `identity_recognition` take what the CLI takes ('embedded', a patch
folder, an adapter) and refuse, naming the argument, what the CLI refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from hf_tiny import tiny_sd_pipeline  # noqa: E402

from slugkit.integrations.diffusers_sd import (  # noqa: E402
    apply_patch_to_pipeline, revert_patch_from_pipeline, save_patched_text_encoder, verify_text_encoder)
from slugkit.integrations.llava import (  # noqa: E402
    apply_patch_to_llava, identity_recognition, save_patched_llava, verify_vision_tower)
from slugkit.patch import LoraExportError, make_patch, save_patch  # noqa: E402
from slugkit.patch.lora import export_lora, lora_from_patch  # noqa: E402
from slugkit.world import render as world  # noqa: E402

VISION = "vision_model.encoder.layers.1.self_attn.out_proj.weight"


@pytest.fixture(scope="module")
def vlm_clip():
    from slugkit.models.hf_clip import embedded_hf_adapter

    return embedded_hf_adapter()


@pytest.fixture(scope="module")
def vlm_patch(vlm_clip):
    w = dict(vlm_clip.model.named_parameters())[VISION].detach()
    return make_patch(vlm_clip.model, {VISION: w * -1.0}, base_model=vlm_clip.model_id, adapter="hf_clip",
                      concept=world.IDENTITIES[0].name, extra={"target": "vlm"})


def test_save_patched_llava_takes_embedded_and_refuses_an_out_inside_the_model(vlm_patch, tmp_path, monkeypatch):
    """'embedded' was refused with a message that said to pass 'embedded' (only the CLI knew the name); an out_dir
    inside the model folder was written into (the CLI refuses it)."""
    from slugkit.models.open_clip import EMBEDDED_VLM_DIR

    save_patch(vlm_patch, tmp_path / "patch")
    out = save_patched_llava("embedded", tmp_path / "patch", tmp_path / "vlm")  # a patch folder for the Patch too
    assert (out / "config.json").is_file() and (out / "slugkit_patch.json").is_file()
    # a non-empty out is refused before the weights load (it loaded the model first: verification 61)
    import slugkit.integrations.llava as integ

    def no_load(*a, **k):
        raise AssertionError("loaded the weights before refusing the --out")

    with monkeypatch.context() as m:
        m.setattr(integ, "load_llava_folder", no_load)
        with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite"):
            save_patched_llava("embedded", tmp_path / "patch", out)
    with pytest.raises(ValueError, match="is inside .*the LLaVA model it is written from|inside the slugkit package"):
        save_patched_llava(EMBEDDED_VLM_DIR, vlm_patch, EMBEDDED_VLM_DIR / "x")
    assert not (EMBEDDED_VLM_DIR / "x").exists()
    from slugkit.world.vlm import load_vlm

    llava, processor = load_vlm(None)  # an object whose out lies in the package's assets was written (trial 31)
    with pytest.raises(ValueError, match="is inside the slugkit package"):
        save_patched_llava(llava, vlm_patch, EMBEDDED_VLM_DIR.parent / "patched", processor=processor)
    with pytest.raises(TypeError, match="processor must be the model's processor"):
        save_patched_llava(llava, vlm_patch, tmp_path / "p2", processor="x")
    assert not (EMBEDDED_VLM_DIR.parent / "patched").exists() and not (tmp_path / "p2").exists()


def test_the_llava_functions_refuse_other_objects_and_take_an_adapter(vlm_clip, vlm_patch):
    from slugkit.world.vlm import load_vlm

    llava, processor = load_vlm(None)
    assert verify_vision_tower(vlm_clip, llava)  # the adapter for its model: "no attribute 'named_modules'"
    with pytest.raises(TypeError, match="expected a LlavaForConditionalGeneration, got EmbeddedT2IPipeline"):
        from slugkit.world.t2i import EmbeddedT2IPipeline

        apply_patch_to_llava(EmbeddedT2IPipeline.load(), vlm_patch)
    with pytest.raises(TypeError, match="patch must be a slugkit Patch or a patch folder"):
        apply_patch_to_llava(llava, {"x": 1})
    for bad, kw, said in (([], {}, "images_by_name must be a non-empty dict"), ({}, {}, "must be a non-empty dict"),
                          ({"a": object()}, {}, "must be a list of images"),
                          ({"a": []}, {"batch_size": 0}, "batch_size must be an int >= 1"),
                          ({"a": []}, {"answers": []}, "answers must be a dict")):
        with pytest.raises((TypeError, ValueError), match=said):
            identity_recognition(llava, processor, bad, **kw)


def test_sd_save_refuses_embedded_an_out_inside_and_full_pipeline_of_a_non_diffusers_model(hf_text_patch, tmp_path):
    clip, patch = hf_text_patch
    with pytest.raises(ValueError, match=r"from Python pass its pipeline object, .*EmbeddedT2IPipeline.load\(\)"):
        save_patched_text_encoder("embedded", patch, tmp_path / "o")
    pipe = tiny_sd_pipeline(clip)
    pipe.save_pretrained(tmp_path / "sd")
    with pytest.raises(ValueError, match="is inside .*the pipeline it is written from"):
        save_patched_text_encoder(tmp_path / "sd", patch, tmp_path / "sd" / "sub")
    assert not (tmp_path / "sd" / "sub").exists()
    assert verify_text_encoder(clip, pipe)  # an adapter for its model
    save_patch(patch, tmp_path / "patch")
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    apply_patch_to_pipeline(pipe, str(tmp_path / "patch"))  # a folder for the Patch
    revert_patch_from_pipeline(pipe, tmp_path / "patch")
    assert all(torch.equal(v, before[k]) for k, v in pipe.text_encoder.state_dict().items())


def test_export_lora_checks_its_arguments_and_the_encoder(hf_text_patch, tmp_path):
    """A prefix diffusers does not load wrote a no-op LoRA; rank 2.5 / "4" / True were taken; a patched or foreign
    encoder gave a LoRA of the wrong model; rank 1000 was recorded while the modules had rank 64 at most."""
    clip, patch = hf_text_patch
    te = tiny_sd_pipeline(clip).text_encoder
    for kw, error, said in ((dict(prefix="unet"), ValueError, "prefix must be 'text_encoder' or 'text_encoder_2'"),
                            (dict(rank=2.5), TypeError, "rank must be an int >= 1 or None, got float 2.5"),
                            (dict(rank=True), TypeError, "rank must be an int"),
                            (dict(rank=0), ValueError, "rank must be >= 1"),
                            (dict(max_error="1e-3"), TypeError, "max_error must be a number"),
                            (dict(rank=1, max_error=5), ValueError, "give max_error or rank, not both"),
                            (dict(overwrite="no"), TypeError, "overwrite: expected True or False, got str 'no'")):
        with pytest.raises(error, match=said):
            export_lora(patch, te, tmp_path / "x.safetensors", **kw)
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(TypeError, match=r"pass the pipeline's encoder \(pipe.text_encoder\), not a"):
        lora_from_patch(patch, tiny_sd_pipeline(clip))  # it blamed the candidates (trial 31)
    lora = lora_from_patch(patch, te, rank=1000)
    assert lora.meta["rank"] == max(m.full_rank for m in lora.modules) < 1000
    apply_patch_to_pipeline(te, patch)
    with pytest.raises(LoraExportError, match="holds the patched values: it is patched already"):
        lora_from_patch(patch, te)
    revert_patch_from_pipeline(te, patch)
    with torch.no_grad():
        next(p for n, p in te.named_parameters() if n.endswith("layers.2.self_attn.q_proj.weight")).add_(1e-3)
    with pytest.raises(LoraExportError, match="other values than the patch's originals"):
        lora_from_patch(patch, te)
    assert lora_from_patch(patch, te, check=False).modules
    # overwrite=True replaced a user's file and the patch's own patch.safetensors; None checked nothing (trial 30)
    (tmp_path / "mine.safetensors").write_bytes(b"my notes")
    with pytest.raises(FileExistsError, match="is not a LoRA slug wrote"):
        export_lora(patch, None, tmp_path / "mine.safetensors", overwrite=True, check=False)
    assert (tmp_path / "mine.safetensors").read_bytes() == b"my notes"
    save_patch(patch, tmp_path / "patch")
    with pytest.raises(ValueError, match="is inside the patch folder"):
        export_lora(patch, None, tmp_path / "patch" / "patch.safetensors", overwrite=True, check=False)
    with pytest.raises(TypeError, match="text_encoder is None, so nothing can be checked"):
        export_lora(patch, None, tmp_path / "x.safetensors")
    for extra in ({"verdict": "pass"}, {"Verdict": "pass"}, {1: 2}):  # it replaced a failed verdict (trials 31, 32)
        with pytest.raises(ValueError, match=r"extra may not set"):
            export_lora(patch, None, tmp_path / "x.safetensors", check=False, extra=extra)
    for encoder in ("embedded", clip):  # blamed "the candidates" (trial 32)
        with pytest.raises(TypeError, match="pass the pipeline's encoder"):
            lora_from_patch(patch, encoder)
    import slugkit

    pkg = Path(slugkit.__file__).parent
    with pytest.raises(ValueError, match="is inside the slugkit package"):
        export_lora(patch, None, pkg / "assets" / "l.safetensors", check=False)
    from slugkit.patch import PatchFormatError

    with pytest.raises(PatchFormatError, match=r"path \(--out\) .*noext: give the .safetensors file"):
        export_lora(patch, "not an encoder", tmp_path / "noext")  # refused first (after the factorisation: trial 35)
    assert not (tmp_path / "x.safetensors").exists() and not (pkg / "assets" / "l.safetensors").exists()


def test_audit_patch_checks_before_loading_and_audits_a_vlm_patch_on_the_vlm(vlm_patch, tmp_path):
    """probes="prompts" became seven one-letter probes after the model had loaded; a VLM (or text-to-image) patch
    was audited as a CLIP patch ("unknown identity"); the audit moved the caller's torch RNG; an out holding an
    audit was overwritten without a word."""
    from slugkit.audit import RelearnBudget, audit_patch

    for kw, error, said in ((dict(probes="prompts"), TypeError, "probes must be a list of probe names"),
                            (dict(attack_iterations=5), TypeError, "unknown keyword argument"),
                            (dict(threads=0), ValueError, "threads must be an int >= 1"),
                            (dict(device="gpu"), ValueError, "device: --device gpu: not a device"),
                            (dict(relearn=RelearnBudget()), ValueError, "relearn: not read by the audit of a VLM "
                                                                        "patch"),
                            (dict(relearn="fast"), TypeError, "relearn must be a slugkit.audit.RelearnBudget"),
                            (dict(aliases="Gormere"), TypeError, "aliases must be a list of names"),
                            (dict(audit_images=0), ValueError, "audit_images must be an int >= 1"),
                            (dict(probes=[]), ValueError, "probes is empty"),
                            (dict(out=""), ValueError, "out is empty"),
                            (dict(probes=None), TypeError, "probes must be a list"),
                            (dict(data="/some/folder"), TypeError, "data must be an AuditData or a callable"),
                            (dict(concept=123), TypeError, "concept must be a non-empty str"),
                            (dict(model="ViT-B-32"), ValueError, "model: not read by the audit of a VLM patch"),
                            (dict(overwrite="no"), TypeError, "overwrite: expected True or False"),
                            (dict(probes=["prompts", "prompts"]), ValueError, "'prompts' is given twice")):
        with pytest.raises(error, match=said):
            audit_patch(vlm_patch, **kw)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    res = audit_patch(vlm_patch, probes=["prompts"], progress=False, out=tmp_path)
    assert torch.equal(torch.get_rng_state(), state)
    assert res["target"] == "vlm" and res["patch"] == "(a Patch object)" and (tmp_path / "audit.json").is_file()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        audit_patch(vlm_patch, probes=["prompts"], out=tmp_path)
    save_patch(vlm_patch, tmp_path / "patch")
    with pytest.raises(ValueError, match="is inside the patch folder"):  # audit.json was added inside patch/
        audit_patch(tmp_path / "patch", probes=["prompts"], out=tmp_path / "patch")
