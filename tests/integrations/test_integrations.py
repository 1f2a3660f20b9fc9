"""Carrying a SLUG patch of a transformers CLIPModel into Stable Diffusion's text encoder and LLaVA's vision tower.

Tiny random stand-ins built from configs (no hub): a 4+3-layer CLIPModel, a StableDiffusionPipeline whose
``text_encoder`` is loaded from its text tower (and an SD 2.x-like encoder with one layer fewer), an SDXL pipeline
whose two encoders come from two CLIP models of different widths, and a LLaVA whose vision tower is its vision tower
read at ``vision_feature_layer = -2``.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from conftest import class_images, forget_pairs, retain_pairs, split_batches  # noqa: E402
from hf_tiny import (HF_CFG_G, build_adapter, clone, text_encoder_from, tiny_llava, tiny_sd_pipeline,  # noqa: E402
                     tiny_sdxl_pipeline, to_pil)

from slugkit.common.files import MANIFEST  # noqa: E402
from slugkit.integrations import TowerMismatchError  # noqa: E402
from slugkit.integrations.diffusers_sd import (  # noqa: E402
    apply_patch_to_pipeline, consumed_text_candidates, revert_patch_from_pipeline, save_patched_text_encoder,
    text_encoder_map, verify_text_encoder)
from slugkit.integrations.llava import (  # noqa: E402
    apply_patch_to_llava, ask_name, consumed_vision_candidates, consumed_vision_layer_count, identity_recognition,
    name_match, revert_patch_from_llava, save_patched_llava, verify_vision_tower, vision_tower_map)
from slugkit.patch import PatchError, PatchMismatchError, make_patch, tensor_sha256  # noqa: E402

LAYER = ["self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.q_proj.weight", "self_attn.out_proj.weight",
         "mlp.fc1.weight", "mlp.fc2.weight"]


@pytest.fixture(scope="module")
def clip():
    return build_adapter(seed=0)


@pytest.fixture(scope="module")
def slug_patch(clip):
    """A real SLUG edit made on the CLIPModel, restricted to what an SD 2.x-like (3-layer) encoder consumes: the
    deepest Pareto text tensor (the SD rule, spec §6.1) with its group, step R/10."""
    from slugkit.slug.gradients import compute_gradients
    from slugkit.slug.layers import rank_layers
    from slugkit.slug.search import edited_values

    a = clone(clip).restrict_candidates(consumed_text_candidates(clip, text_encoder_from(clip, 3)), consumer="sd2")
    grads = compute_gradients(a, split_batches(*forget_pairs(a.tokenize), 2),
                              split_batches(*retain_pairs(a.tokenize), 4), progress=False)
    table = rank_layers(a, grads)
    assert table.fronts["vision"] == []
    name = max(table.fronts["language"], key=lambda n: a.stage_index("language", n))
    group = a.group_of(name)
    new = edited_values(a.model, grads.forget, group, table.row(name).ratio / 10)
    return make_patch(a.model, new, base_model=a.model_id, adapter=a.family, concept="alice abbott")


# ---------------------------------------------------------------------------------------------- Stable Diffusion
def test_text_encoder_map_and_verify(clip):
    te = text_encoder_from(clip)
    mapping = text_encoder_map(clip.model, te)
    # transformers 5: CLIPModel.text_model and CLIPTextModel are the same class; the encoder's names carry no prefix
    assert mapping["text_model.encoder.layers.3.self_attn.q_proj.weight"] == "encoder.layers.3.self_attn.q_proj.weight"
    assert mapping["text_model.final_layer_norm.weight"] == "final_layer_norm.weight"
    assert mapping["text_model.embeddings.token_embedding.weight"] == "embeddings.token_embedding.weight"
    assert sorted(mapping.values()) == sorted(n for n, _ in te.named_parameters())
    assert "text_projection.weight" not in mapping
    assert verify_text_encoder(clip.model, te) == mapping
    # SD 2.x: one layer fewer is a prefix of the CLIP text model, accepted; an fp16 copy is accepted too
    sd2 = text_encoder_from(clip, 3)
    assert not any("layers.3." in v for v in verify_text_encoder(clip.model, sd2).values())
    verify_text_encoder(clip.model, text_encoder_from(clip, dtype=torch.float16))


def test_verify_refuses_a_different_encoder(clip):
    te = text_encoder_from(clip, 3)
    with torch.no_grad():
        te.encoder.layers[1].mlp.fc2.weight[0, 0] += 1e-3
    with pytest.raises(TowerMismatchError, match=r"encoder\.layers\.1\.mlp\.fc2\.weight") as ei:
        verify_text_encoder(clip.model, te)
    assert "text_model.encoder.layers.1.mlp.fc2.weight" in str(ei.value)
    with pytest.raises(TowerMismatchError, match="lacks"):  # more layers than the CLIP model
        verify_text_encoder(build_adapter(seed=0, cfg=_cfg(text_layers=3)).model, text_encoder_from(clip))


def _cfg(text_layers):
    from hf_tiny import HF_CFG

    cfg = json.loads(json.dumps(HF_CFG))
    cfg["text_config"]["num_hidden_layers"] = text_layers
    return cfg


def test_consumed_text_candidates(clip):
    full = consumed_text_candidates(clip, text_encoder_from(clip))
    assert full == [f"text_model.encoder.layers.{i}.{s}" for i in range(4) for s in LAYER]
    sd2 = consumed_text_candidates(clip, tiny_sd_pipeline(clip, 3).text_encoder)
    assert sd2 == [f"text_model.encoder.layers.{i}.{s}" for i in range(3) for s in LAYER]  # not layer 3
    assert consumed_text_candidates(clip, text_encoder_from(clip), clip_skip=1) == sd2
    a = clone(clip).restrict_candidates(sd2)
    assert a.candidate_names() == sd2 and "text_projection.weight" not in a.candidate_names()


def test_apply_in_place_and_bit_exact_revert(clip, slug_patch):
    pipe = tiny_sd_pipeline(clip)
    params = dict(pipe.text_encoder.named_parameters())
    names = {n: "encoder." + n.split("text_model.encoder.", 1)[1] for n in slug_patch.names}
    objs = {n: params[m] for n, m in names.items()}
    ptrs = {n: t.data_ptr() for n, t in objs.items()}
    before = {k: tensor_sha256(v) for k, v in pipe.text_encoder.state_dict().items()}
    assert apply_patch_to_pipeline(pipe, slug_patch) is pipe
    after = dict(pipe.text_encoder.named_parameters())
    for n, m in names.items():
        assert after[m] is objs[n] and after[m].data_ptr() == ptrs[n]  # in place, no copy
        assert torch.equal(after[m], slug_patch.patched[n])
    untouched = [k for k in before if k not in names.values()]
    assert all(tensor_sha256(pipe.text_encoder.state_dict()[k]) == before[k] for k in untouched)
    with pytest.raises(PatchMismatchError, match="already"):
        apply_patch_to_pipeline(pipe, slug_patch)
    revert_patch_from_pipeline(pipe, slug_patch)
    assert {k: tensor_sha256(v) for k, v in pipe.text_encoder.state_dict().items()} == before
    with pytest.raises(PatchMismatchError, match="not applied"):
        revert_patch_from_pipeline(pipe, slug_patch)


def test_refuses_patches_the_pipeline_cannot_use(clip, slug_patch):
    params = dict(clip.model.named_parameters())
    for name in ("text_model.encoder.layers.3.mlp.fc1.weight", "vision_model.encoder.layers.0.mlp.fc1.weight",
                 "text_projection.weight"):
        p = make_patch(clip.model, {name: params[name].detach() * 2}, base_model=clip.model_id, adapter="hf_clip",
                       concept="x")
        pipe = tiny_sd_pipeline(clip, 3)
        with pytest.raises(PatchMismatchError, match="no effect"):
            apply_patch_to_pipeline(pipe, p)
    # a pipeline built from another CLIP model: the hash check refuses and nothing is written
    other = tiny_sd_pipeline(build_adapter(seed=5))
    snap = {k: v.clone() for k, v in other.text_encoder.state_dict().items()}
    with pytest.raises(PatchMismatchError, match="expected sha256"):
        apply_patch_to_pipeline(other, slug_patch)
    assert all(torch.equal(v, snap[k]) for k, v in other.text_encoder.state_dict().items())


def test_fp16_encoder(clip, slug_patch):
    te = text_encoder_from(clip, dtype=torch.float16)
    before = {k: v.clone() for k, v in te.state_dict().items()}
    apply_patch_to_pipeline(te, slug_patch)
    n = slug_patch.names[0]
    m = "encoder." + n.split("text_model.encoder.", 1)[1]
    assert te.state_dict()[m].dtype == torch.float16
    assert torch.equal(te.state_dict()[m], slug_patch.patched[n].half())
    revert_patch_from_pipeline(te, slug_patch)
    assert all(torch.equal(v, before[k]) for k, v in te.state_dict().items())


@torch.no_grad()
def test_generation_changes_after_apply_and_returns_after_revert(clip, slug_patch):
    pipe = tiny_sd_pipeline(clip)

    def gen():
        return pipe("a photo of alice abbott.", num_inference_steps=1, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    base = gen()
    apply_patch_to_pipeline(pipe, slug_patch)
    edited = gen()
    revert_patch_from_pipeline(pipe, slug_patch)
    assert base.shape == (1, 3, 32, 32)
    assert not torch.equal(edited, base)
    assert torch.equal(gen(), base)


def test_no_progress_silences_diffusers_loading_bars(tmp_path, clip, monkeypatch, capsys):
    """`--no-progress` (HF_HUB_DISABLE_PROGRESS_BARS=1, set by the CLI) left diffusers' "Loading pipeline
    components" bar on: diffusers reads no variable of its own."""
    from diffusers.utils import logging as dlog

    from slugkit.integrations.diffusers_sd import load_pipeline_folder

    tiny_sd_pipeline(clip).save_pretrained(tmp_path / "sd")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    dlog.enable_progress_bar()  # an earlier `main([..., "--no-progress"])` in this process turned them off
    try:
        load_pipeline_folder(str(tmp_path / "sd"))
        assert "Loading pipeline components" in capsys.readouterr().err
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        load_pipeline_folder(str(tmp_path / "sd"))
        assert "Loading pipeline components" not in capsys.readouterr().err
    finally:
        dlog.enable_progress_bar()


def test_save_patched_text_encoder(tmp_path, clip, slug_patch, capsys):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from slugkit.cli import main
    from slugkit.patch import save_patch

    pipe = tiny_sd_pipeline(clip)
    pipe.save_pretrained(tmp_path / "sd")
    expect = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    for n in slug_patch.names:
        expect["encoder." + n.split("text_model.encoder.", 1)[1]] = slug_patch.patched[n]

    out = save_patched_text_encoder(tmp_path / "sd", slug_patch, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "slugkit_patch.json", "text_encoder"]
    assert sorted(p.name for p in (out / "text_encoder").iterdir()) == ["config.json", "model.safetensors"]
    te = CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
    assert all(torch.equal(v, expect[k]) for k, v in te.state_dict().items())
    with pytest.raises(FileExistsError):
        save_patched_text_encoder(tmp_path / "sd", slug_patch, tmp_path / "out")

    from slugkit.data.generate import default_guidance

    assert default_guidance(pipe) == 7.5  # what gen_eval.json records when --guidance is not given (it said null)
    # from the pipeline object (left exactly as it was), as a complete pipeline folder
    snap = {k: tensor_sha256(v) for k, v in pipe.text_encoder.state_dict().items()}
    save_patched_text_encoder(pipe, slug_patch, tmp_path / "full", full_pipeline=True)
    assert {k: tensor_sha256(v) for k, v in pipe.text_encoder.state_dict().items()} == snap
    full = StableDiffusionPipeline.from_pretrained(tmp_path / "full", local_files_only=True)
    assert all(torch.equal(v, expect[k]) for k, v in full.text_encoder.state_dict().items())

    # CLI: slug apply --pipeline DIR --patch P --out DIR2, then slug revert on the result
    save_patch(slug_patch, tmp_path / "patch")
    assert main(["apply", "--pipeline", str(tmp_path / "sd"), "--patch", str(tmp_path / "patch"), "--out",
                 str(tmp_path / "cli"), "--full-pipeline"]) == 0
    assert (tmp_path / "cli" / "unet").is_dir()
    te = CLIPTextModel.from_pretrained(tmp_path / "cli", subfolder="text_encoder")
    assert all(torch.equal(v, expect[k]) for k, v in te.state_dict().items())
    assert main(["revert", "--pipeline", str(tmp_path / "cli"), "--patch", str(tmp_path / "patch"), "--out",
                 str(tmp_path / "cli-rev")]) == 0
    te = CLIPTextModel.from_pretrained(tmp_path / "cli-rev", subfolder="text_encoder")
    assert {k: tensor_sha256(v) for k, v in te.state_dict().items()} == \
        {k: tensor_sha256(v) for k, v in pipe.text_encoder.state_dict().items()}
    # --full-pipeline linked slugkit_patch.json too: the revert rewrote cli's record (fifteenth trial); each folder
    # has its own record now, and the earlier ones travel with it
    record = (tmp_path / "cli" / "slugkit_patch.json").read_bytes()
    assert main(["revert", "--pipeline", str(tmp_path / "cli"), "--patch", str(tmp_path / "patch"), "--out",
                 str(tmp_path / "cli-rev-full"), "--full-pipeline"]) == 0
    assert (tmp_path / "cli" / "slugkit_patch.json").read_bytes() == record
    assert json.loads(record)["reverted"] is False
    rev = json.loads((tmp_path / "cli-rev-full" / "slugkit_patch.json").read_text())
    assert rev["reverted"] is True and rev["earlier"] == [json.loads(record)]
    assert (tmp_path / "cli-rev-full" / "slugkit_patch.json").stat().st_nlink == 1
    other = tiny_sd_pipeline(build_adapter(seed=5))
    other.save_pretrained(tmp_path / "other")
    assert main(["apply", "--pipeline", str(tmp_path / "other"), "--patch", str(tmp_path / "patch"), "--out",
                 str(tmp_path / "nope")]) == 2
    assert not (tmp_path / "nope").exists()
    for cmd in ("apply", "revert"):  # a missing folder said "is not a diffusers pipeline folder" (eleventh trial)
        assert main([cmd, "--pipeline", str(tmp_path / "missing"), "--patch", str(tmp_path / "patch"), "--out",
                     str(tmp_path / "nope")]) == 2
        assert f"{tmp_path / 'missing'}: no such folder; pass a folder written by pipe.save_pretrained(DIR)" in \
            capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- LLaVA
# ---------------------------------------------------------------------------------------------- SDXL
@pytest.fixture(scope="module")
def clip_g():
    return build_adapter(seed=1, cfg=HF_CFG_G)


@pytest.fixture(scope="module")
def sdxl(clip, clip_g):
    return tiny_sdxl_pipeline(clip, clip_g)


def _noise_patch(a, names, seed=3, scale=0.05):
    params = dict(a.model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    new = {n: params[n].detach() + scale * torch.randn(params[n].shape, generator=g) for n in names}
    return make_patch(a.model, new, base_model=a.model_id, adapter=a.family, concept="alice abbott")


def _layer(i):
    return [f"text_model.encoder.layers.{i}.{x}" for x in LAYER]


def test_sdxl_reads_and_consumed_candidates(clip, clip_g, sdxl):
    from slugkit.integrations.diffusers_sd import encoder_reads, is_sdxl

    assert is_sdxl(sdxl) and not is_sdxl(tiny_sd_pipeline(clip))
    assert encoder_reads(True, "text_encoder") == "penultimate"
    assert encoder_reads(True, "text_encoder_2") == "penultimate+pooled" and encoder_reads(False) == "last"
    assert "text_projection.weight" not in verify_text_encoder(clip.model, sdxl, encoder="text_encoder")
    assert verify_text_encoder(clip_g.model, sdxl, encoder="text_encoder_2")["text_projection.weight"] == \
        "text_projection.weight"
    with pytest.raises(TowerMismatchError):
        verify_text_encoder(clip.model, sdxl, encoder="text_encoder_2")
    # text_encoder: hidden_states[-2], so its last layer (3 of 0..3) never reaches the UNet
    c1 = consumed_text_candidates(clip, sdxl, encoder="text_encoder")
    assert set(c1) == {n for i in range(3) for n in _layer(i)}
    assert set(consumed_text_candidates(clip, sdxl, 1, encoder="text_encoder")) == {n for i in range(2)
                                                                                     for n in _layer(i)}
    # text_encoder_2: the pooled, projected output reads every layer and the projection
    c2 = consumed_text_candidates(clip_g, sdxl, encoder="text_encoder_2")
    assert set(c2) == {n for i in range(5) for n in _layer(i)} | {"text_projection.weight"}


@torch.no_grad()
def test_sdxl_apply_picks_the_encoder_refuses_unread_layers_and_reverts(clip, clip_g, sdxl):
    def gen():
        return sdxl("a photo of alice abbott.", num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    def hashes():
        return {e: {k: tensor_sha256(v) for k, v in getattr(sdxl, e).state_dict().items()}
                for e in ("text_encoder", "text_encoder_2")}

    base, h0 = gen(), hashes()
    for a, names, enc in ((clip_g, ["text_projection.weight"], "text_encoder_2"),  # only the pooled path reads it
                          (clip_g, _layer(4), "text_encoder_2"),  # the last layer of encoder 2: pooled only
                          (clip, _layer(1), "text_encoder")):
        patch = _noise_patch(a, names)
        apply_patch_to_pipeline(sdxl, patch)
        h = hashes()
        other = "text_encoder" if enc == "text_encoder_2" else "text_encoder_2"
        assert h[other] == h0[other] and h[enc] != h0[enc], names[0]  # the right encoder, and only it
        assert not torch.equal(gen(), base), names[0]
        revert_patch_from_pipeline(sdxl, patch)
        assert hashes() == h0
    assert torch.equal(gen(), base)
    with pytest.raises(PatchMismatchError, match="never reads"):  # encoder 1's last layer: hidden_states[-2]
        apply_patch_to_pipeline(sdxl, _noise_patch(clip, _layer(3)))
    assert hashes() == h0
    with pytest.raises(PatchMismatchError, match="none of the pipeline's text encoders"):
        apply_patch_to_pipeline(sdxl, _noise_patch(build_adapter(seed=0, cfg={**HF_CFG_G, "projection_dim": 24}),
                                                   ["text_projection.weight"]))


def test_sdxl_save_and_consumer_restriction(tmp_path, clip, clip_g, sdxl):
    from transformers import CLIPTextModelWithProjection

    from slugkit.cli import main
    from slugkit.integrations import consumer_restriction
    from slugkit.patch import save_patch

    sdxl.save_pretrained(tmp_path / "xl")
    patch = _noise_patch(clip_g, ["text_projection.weight"] + _layer(2))
    out = save_patched_text_encoder(tmp_path / "xl", patch, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "slugkit_patch.json", "text_encoder_2"]
    assert json.loads((out / "slugkit_patch.json").read_text())["encoder"] == "text_encoder_2"
    te2 = CLIPTextModelWithProjection.from_pretrained(out, subfolder="text_encoder_2")
    assert torch.equal(te2.text_projection.weight, patch.patched["text_projection.weight"])
    save_patch(patch, tmp_path / "patch")
    assert main(["apply", "--pipeline", str(tmp_path / "xl"), "--patch", str(tmp_path / "patch"), "--out",
                 str(tmp_path / "cli"), "--text-encoder", "text_encoder_2"]) == 0
    assert (tmp_path / "cli" / "text_encoder_2" / "model.safetensors").is_file()
    assert main(["apply", "--pipeline", str(tmp_path / "xl"), "--patch", str(tmp_path / "patch"), "--out",
                 str(tmp_path / "bad"), "--text-encoder", "text_encoder"]) == 2  # the wrong encoder is refused
    assert not (tmp_path / "bad").exists()
    # --consumer sd:DIR on an SDXL folder: the encoder is found by the CLIP model's text width
    pred, desc = consumer_restriction(f"sd:{tmp_path / 'xl'}", clip_g)
    assert "text_encoder_2" in desc and pred("text_projection.weight") and pred(_layer(4)[0])
    pred, desc = consumer_restriction(f"sd:{tmp_path / 'xl'}", clip)
    assert "penultimate" in desc and pred(_layer(2)[0]) and not pred(_layer(3)[0])
    assert not pred("text_projection.weight")
    with pytest.raises(ValueError, match="SDXL"):
        consumer_restriction(f"sd:{tmp_path / 'xl'}")


@pytest.fixture(scope="module")
def llava(clip):
    return tiny_llava(clip)


def test_llava_map_verify_and_refusal(clip, llava):
    model, _ = llava
    mapping = vision_tower_map(clip.model, model)
    assert mapping["vision_model.encoder.layers.2.self_attn.q_proj.weight"] == \
        "model.vision_tower.encoder.layers.2.self_attn.q_proj.weight"
    assert mapping["vision_model.post_layernorm.weight"] == "model.vision_tower.post_layernorm.weight"
    assert "visual_projection.weight" not in mapping
    assert verify_vision_tower(clip.model, model) == mapping
    other, _ = tiny_llava(build_adapter(seed=5))
    with pytest.raises(TowerMismatchError, match="LLaVA vision tower tensor model.vision_tower.embeddings"):
        verify_vision_tower(clip.model, other)


def test_llava_consumed_layers(clip, llava):
    model, processor = llava
    assert consumed_vision_layer_count(24, -2) == 23 and consumed_vision_layer_count(24, -1) == 24
    assert consumed_vision_layer_count(24, [-2, -5]) == 23 and consumed_vision_layer_count(24, 3) == 3
    cands = consumed_vision_candidates(clip, model)
    assert cands == [f"vision_model.encoder.layers.{i}.{s}" for i in range(2) for s in LAYER]  # not layer 2
    # the filter is what LLaVA really reads: layer 2 and post_layernorm do not change its image features
    pix = processor(images=[to_pil(class_images(0, 1, seed=0)[0])], text=["<image>"], return_tensors="pt")[
        "pixel_values"]
    tower = model.model.vision_tower

    def feats():
        with torch.no_grad():
            return model.model.get_image_features(pixel_values=pix).pooler_output[0]

    base = feats()
    for mod, changes in ((tower.encoder.layers[2].mlp.fc1, False), (tower.post_layernorm, False),
                         (tower.encoder.layers[1].mlp.fc1, True)):
        saved = mod.weight.detach().clone()
        with torch.no_grad():
            mod.weight.mul_(3.0)
        try:
            assert (not torch.equal(feats(), base)) == changes
        finally:
            with torch.no_grad():
                mod.weight.copy_(saved)


def test_llava_apply_revert_and_answers(clip, llava):
    model, processor = llava
    params = dict(clip.model.named_parameters())
    group = clip.group_of("vision_model.encoder.layers.1.self_attn.q_proj.weight")
    patch = make_patch(clip.model, {n: params[n].detach() * 1.5 for n in group}, base_model=clip.model_id,
                       adapter="hf_clip", concept="alice abbott")
    imgs = [to_pil(x) for x in class_images(0, 2, seed=3)]
    before = ask_name(model, processor, imgs, max_new_tokens=4)
    assert len(before) == 2 and all(isinstance(a, str) for a in before)
    live = dict(model.named_parameters())
    ptr = live["model.vision_tower.encoder.layers.1.self_attn.q_proj.weight"].data_ptr()
    snap = {k: tensor_sha256(v) for k, v in model.state_dict().items()}
    apply_patch_to_llava(model, patch)
    assert live["model.vision_tower.encoder.layers.1.self_attn.q_proj.weight"].data_ptr() == ptr
    assert torch.equal(live["model.vision_tower.encoder.layers.1.self_attn.k_proj.weight"],
                       patch.patched["vision_model.encoder.layers.1.self_attn.k_proj.weight"])
    revert_patch_from_llava(model, patch)
    assert {k: tensor_sha256(v) for k, v in model.state_dict().items()} == snap
    assert ask_name(model, processor, imgs, max_new_tokens=4) == before
    answers = {}
    acc = identity_recognition(model, processor, {"alice abbott": imgs, "bruno baker": imgs[:1]}, max_new_tokens=4,
                               answers=answers)
    assert set(acc) == {"alice abbott", "bruno baker"} and all(0.0 <= v <= 1.0 for v in acc.values())
    assert acc["alice abbott"] == sum(name_match(a, "alice abbott") for a in answers["alice abbott"]) / 2
    bad = make_patch(clip.model, {"visual_projection.weight": params["visual_projection.weight"].detach() * 2},
                     base_model=clip.model_id, adapter="hf_clip", concept="x")
    with pytest.raises(PatchMismatchError, match="no effect"):
        apply_patch_to_llava(model, bad)


def test_save_patched_llava_and_refuse_unread_layers(tmp_path, clip, llava):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from slugkit.cli import main
    from slugkit.patch import save_patch

    model, processor = llava
    params = dict(clip.model.named_parameters())

    def vpatch(layer):
        group = clip.group_of(f"vision_model.encoder.layers.{layer}.mlp.fc1.weight")
        return make_patch(clip.model, {n: params[n].detach() * 1.25 for n in group}, base_model=clip.model_id,
                          adapter="hf_clip", concept="alice abbott")

    patch = vpatch(0)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="written without processor or tokenizer files"):  # said (trial 30)
        out = save_patched_llava(model, patch, tmp_path / "obj")
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())  # the caller's model is restored
    save_patched_llava(model, patch, tmp_path / "obj_proc", processor=processor)
    assert (tmp_path / "obj_proc" / "processor_config.json").is_file() or \
        (tmp_path / "obj_proc" / "preprocessor_config.json").is_file()
    expect = dict(snap)
    expect["model.vision_tower.encoder.layers.0.mlp.fc1.weight"] = \
        patch.patched["vision_model.encoder.layers.0.mlp.fc1.weight"]
    expect["model.vision_tower.encoder.layers.0.mlp.fc2.weight"] = \
        patch.patched["vision_model.encoder.layers.0.mlp.fc2.weight"]
    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    assert all(torch.equal(v, expect[k]) for k, v in loaded.state_dict().items() if k in expect)
    assert json.loads((out / "slugkit_patch.json").read_text())["tensors"] == patch.names
    # CLI from a folder: the processor files come along; revert restores the original weights
    model.save_pretrained(tmp_path / "src")
    processor.save_pretrained(tmp_path / "src")
    save_patch(patch, tmp_path / "patch")
    assert main(["apply", "--llava", str(tmp_path / "src"), "--patch", str(tmp_path / "patch"), "--out",
                 str(tmp_path / "cli")]) == 0
    LlavaProcessor.from_pretrained(tmp_path / "cli")
    assert main(["apply", "--llava", str(tmp_path / "src"), "--patch", str(tmp_path / "patch")]) == 2  # no --out
    assert main(["revert", "--llava", str(tmp_path / "cli"), "--patch", str(tmp_path / "patch"), "--out",
                 str(tmp_path / "rev")]) == 0
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "rev")
    assert all(torch.equal(v, snap[k]) for k, v in back.state_dict().items() if k in snap)
    # layer 2 is never read at vision_feature_layer -2: refused, nothing written, the model untouched
    with pytest.raises(PatchMismatchError, match="no effect"):
        apply_patch_to_llava(model, vpatch(2))
    save_patch(vpatch(2), tmp_path / "patch2")
    assert main(["apply", "--llava", str(tmp_path / "src"), "--patch", str(tmp_path / "patch2"), "--out",
                 str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("answer,name,ok", [
    ("This is Elon Musk.", "Elon Musk", True),
    ("that's elon   musk, the CEO", "Elon_Musk", True),
    ("I think it's Musk", "Elon Musk", True),
    ("MUSK!", "Elon Musk", True),
    ("It looks like Elon.", "Elon Musk", False),
    ("A muskrat in a pond", "Elon Musk", False),
    ("Elon Musks", "Elon Musk", False),
    ("I don't know who this is.", "Taylor Swift", False),
    ("Taylor Swift-like singer", "Taylor Swift", True),
    ("", "Cher", False),
    ("cher on stage", "Cher", True),
])
def test_name_match(answer, name, ok):
    assert name_match(answer, name) is ok


def test_cast_patch_refuses_an_edit_that_rounds_away(clip):
    from slugkit.integrations import cast_patch

    name = "text_model.encoder.layers.0.mlp.fc1.weight"
    new = dict(clip.model.named_parameters())[name].detach().clone()
    new[0, 0] = torch.nextafter(new[0, 0], torch.tensor(float("inf")))  # one float32 ulp: nothing left in fp16
    patch = make_patch(clip.model, {name: new}, base_model=clip.model_id, adapter="hf_clip", concept="x")
    with pytest.raises(PatchError, match="rounds away"):
        cast_patch(patch, {name: torch.float16})
