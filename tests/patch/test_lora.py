"""A text-encoder patch as a LoRA (slugkit.patch.lora): the factorisation, what is refused, the file, and the LoRA
loaded by diffusers (``pipe.load_lora_weights``, SD and SDXL) giving the patched encoder's outputs. The embedded
text-to-image pipeline is covered through the CLI (tests/cli/test_export.py).

Stand-ins: the tiny transformers CLIP, StableDiffusionPipeline and StableDiffusionXLPipeline of ``hf_tiny`` (random
weights, built from configs); the patch is conftest's ``hf_text_patch``. Nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from conftest import TEXT_PATCH_TENSORS, spectral_edit  # noqa: E402
from hf_tiny import tiny_sd_pipeline  # noqa: E402

from slugkit.integrations.diffusers_sd import apply_patch_to_pipeline, revert_patch_from_pipeline  # noqa: E402
from slugkit.patch import make_patch  # noqa: E402
from slugkit.patch.lora import (  # noqa: E402
    DEFAULT_MAX_ERROR,
    LoraExportError,
    check_exportable,
    export_lora,
    factor_delta,
    lora_from_patch,
    read_lora,
)

PROMPTS = ["a photo of alice abbott.", "a photo of bruno baker.", ""]


def _delta(patch, name):
    return patch.patched[name].double() - patch.original[name].double()


def _rel_error(delta, b, a):
    return float(torch.linalg.matrix_norm(delta - b.double() @ a.double()) / torch.linalg.matrix_norm(delta))


@torch.no_grad()
def _hidden(text_encoder, ids):
    return text_encoder(input_ids=ids).last_hidden_state


# ----------------------------------------------------------------------------------------------- factorisation
def test_factor_delta_smallest_rank_within_the_bound_and_forced_rank():
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(40, 24, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(30, 24, generator=g, dtype=torch.float64))[0]
    s = 0.5 ** torch.arange(24, dtype=torch.float64)
    delta = (u * s) @ v.T
    tail = [float((s[r:].square().sum() / s.square().sum()).sqrt()) for r in range(25)]
    for bound in (0.3, 1e-2, DEFAULT_MAX_ERROR):
        b, a, err = factor_delta(delta, max_error=bound)
        r = a.shape[0]
        assert b.shape == (40, r) and a.shape == (r, 30) and a.dtype == b.dtype == torch.float32
        assert err <= bound < tail[r - 1]  # the smallest such rank (Eckart–Young)
        assert err == pytest.approx(_rel_error(delta, b, a), rel=1e-12)
        assert err == pytest.approx(tail[r], rel=1e-3, abs=1e-6)
    b, a, err = factor_delta(delta, rank=1)
    assert a.shape[0] == 1 and err == pytest.approx(tail[1], rel=1e-6)
    b, a, err = factor_delta(delta, rank=1000)  # at most the full rank: exact up to float32 rounding
    assert a.shape[0] == 30 and err < 1e-6
    # the split is even (B = U·√S, A = √S·Vᵀ) and signs are canonical
    assert torch.allclose(b.double().norm(dim=0), a.double().norm(dim=1), rtol=1e-5)
    with pytest.raises(LoraExportError, match="even full rank 30"):
        factor_delta(delta, max_error=1e-12, name="x")
    with pytest.raises(LoraExportError, match="zero"):
        factor_delta(torch.zeros(4, 3), name="x")


def test_lora_modules_ranks_and_errors(hf_text_patch):
    clip, patch = hf_text_patch
    pipe = tiny_sd_pipeline(clip)
    lora = lora_from_patch(patch, pipe.text_encoder)
    assert [m.tensor for m in lora.modules] == sorted(TEXT_PATCH_TENSORS)
    for m in lora.modules:
        d = _delta(patch, m.tensor)
        assert m.module == m.tensor.removesuffix(".weight")
        assert m.lora_B.shape == (d.shape[0], m.rank) and m.lora_A.shape == (m.rank, d.shape[1])
        assert 1 < m.rank < m.full_rank == min(d.shape)
        assert m.relative_error <= DEFAULT_MAX_ERROR
        assert m.relative_error == pytest.approx(_rel_error(d, m.lora_B, m.lora_A), rel=1e-12)
        smaller = factor_delta(d, rank=m.rank - 1)[2]
        assert smaller > DEFAULT_MAX_ERROR  # the smallest rank that meets the bound
    assert len({m.rank for m in lora.modules}) > 1  # different ranks per module: the scale must still be 1
    keys = sorted(lora.state_dict())
    assert keys[0] == "text_encoder.text_model.encoder.layers.2.self_attn.k_proj.lora_A.weight"
    cfg = lora.adapter_config()
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {m.module.removeprefix("text_model."): m.rank
                                                           for m in lora.modules}


# ----------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name, words", [
    ("vision_model.encoder.layers.0.mlp.fc1.weight", "vision tower"),
    ("visual_projection.weight", "vision tower"),
    ("text_model.encoder.layers.1.layer_norm1.weight", "LayerNorm"),
    ("text_model.final_layer_norm.weight", "LayerNorm"),
    ("text_model.encoder.layers.1.self_attn.q_proj.bias", "a bias"),
    ("text_model.embeddings.token_embedding.weight", "embedding"),
    ("text_model.embeddings.position_embedding.weight", "embedding"),
])
def test_refuses_tensors_a_lora_cannot_express(hf_text_patch, name, words):
    clip, _ = hf_text_patch
    w = dict(clip.model.named_parameters())[name].detach()
    p = make_patch(clip.model, {name: w * 1.5 + 0.01}, base_model=clip.model_id, adapter="hf_clip", concept="x")
    with pytest.raises(LoraExportError, match=words) as e:
        check_exportable(p)
    assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LoraExportError, match=words):
        lora_from_patch(p, tiny_sd_pipeline(clip).text_encoder)


def test_refuses_a_patch_that_is_not_of_a_text_encoder():
    state = {"transformer.resblocks.0.mlp.c_fc.weight": torch.randn(8, 4, generator=torch.Generator().manual_seed(0))}
    p = make_patch(state, {k: v * 2 for k, v in state.items()}, base_model="embedded", adapter="open_clip",
                   concept="x")
    with pytest.raises(LoraExportError, match="open_clip.*not a text-encoder patch.*--family hf_clip"):
        check_exportable(p)


def test_refuses_a_module_that_is_not_a_linear_of_the_encoder(hf_text_patch):
    clip, patch = hf_text_patch
    te = tiny_sd_pipeline(clip, n_layers=3).text_encoder  # SD 2.x-like: layer 3 is not there
    with pytest.raises(LoraExportError, match="has no Linear text_model.encoder.layers.3.mlp.fc1"):
        lora_from_patch(patch, te)


# ----------------------------------------------------------------------------------------------- loaded by diffusers
def test_full_rank_lora_in_diffusers_equals_the_patch(tmp_path, hf_text_patch):
    clip, patch = hf_text_patch
    ids = clip.tokenize(PROMPTS)
    pipe = tiny_sd_pipeline(clip)
    base = _hidden(pipe.text_encoder, ids)
    apply_patch_to_pipeline(pipe, patch)
    want = _hidden(pipe.text_encoder, ids)
    assert (want - base).abs().max() > 1e-2  # the edit is visible
    revert_patch_from_pipeline(pipe, patch)

    lora = export_lora(patch, pipe.text_encoder, tmp_path / "lora.safetensors", rank=64)
    assert all(m.rank == m.full_rank == 64 and m.relative_error < 1e-6 for m in lora.modules)
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    got = _hidden(pipe.text_encoder, ids)
    assert (got - want).abs().max() <= 1e-5


def test_low_rank_lora_in_diffusers_is_base_plus_b_a_at_scale_one(tmp_path, hf_text_patch):
    """Default bound, a different rank per module: the loaded encoder equals W_base + B·A (scale 1 everywhere) and
    the recorded errors are the measured ones."""
    clip, patch = hf_text_patch
    f = tmp_path / "lora.safetensors"
    export_lora(patch, None, f, check=False)
    tensors, meta = read_lora(f)
    assert meta["max_error"] == DEFAULT_MAX_ERROR and meta["rank"] is None
    assert meta["patch_fingerprint"] == patch.fingerprint and meta["concept"] == "alice abbott"
    assert meta["base_sha256"] == {n: patch.meta["tensors"][n]["sha256_original"] for n in patch.names}
    ref = tiny_sd_pipeline(clip)
    params = dict(ref.text_encoder.named_parameters())
    with torch.no_grad():
        for key, name in meta["tensors"].items():
            b, a = tensors[f"{key}.lora_B.weight"], tensors[f"{key}.lora_A.weight"]
            assert meta["ranks"][key] == a.shape[0]
            assert meta["relative_errors"][key] == pytest.approx(_rel_error(_delta(patch, name), b, a), rel=1e-12)
            assert meta["relative_errors"][key] <= DEFAULT_MAX_ERROR
            params[name.removeprefix("text_model.")].add_(b @ a)
    pipe = tiny_sd_pipeline(clip)
    pipe.load_lora_weights(str(f))
    ids = clip.tokenize(PROMPTS)
    assert (_hidden(pipe.text_encoder, ids) - _hidden(ref.text_encoder, ids)).abs().max() <= 1e-5


def test_sdxl_second_encoder_and_its_projection(tmp_path):
    """SDXL: a patch of text_encoder_2 (a layer and text_projection) becomes ``text_encoder_2.*`` keys that the SDXL
    pipeline's load_lora_weights puts into that encoder; its hidden states and projected output match the patch."""
    from hf_tiny import HF_CFG_G, build_adapter, tiny_sdxl_pipeline

    clip, clip_g = build_adapter(seed=0), build_adapter(seed=1, cfg=HF_CFG_G)
    names = ["text_model.encoder.layers.4.self_attn.out_proj.weight", "text_projection.weight"]
    patch = make_patch(clip_g.model, spectral_edit(clip_g.model, names, seed=4), base_model="tiny-g", adapter="hf_clip",
                       concept="x")
    pipe = tiny_sdxl_pipeline(clip, clip_g)
    ids = clip_g.tokenize(PROMPTS)
    apply_patch_to_pipeline(pipe, patch)  # picks text_encoder_2
    with torch.no_grad():
        want = pipe.text_encoder_2(input_ids=ids, output_hidden_states=True)
    revert_patch_from_pipeline(pipe, patch)
    lora = export_lora(patch, pipe.text_encoder_2, tmp_path / "xl.safetensors", prefix="text_encoder_2", rank=64)
    assert sorted(lora.state_dict())[-1] == "text_encoder_2.text_projection.lora_B.weight"
    pipe.load_lora_weights(str(tmp_path / "xl.safetensors"))
    with torch.no_grad():
        got = pipe.text_encoder_2(input_ids=ids, output_hidden_states=True)
    assert (got.text_embeds - want.text_embeds).abs().max() <= 1e-5
    assert (got.hidden_states[-2] - want.hidden_states[-2]).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------------- the file
def test_file_is_deterministic_atomic_and_not_overwritten(tmp_path, hf_text_patch):
    clip, patch = hf_text_patch
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    export_lora(patch, None, a, check=False)
    export_lora(patch, None, b, check=False)
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(FileExistsError, match=r"overwrite=True.*choose another path$"):  # a Python caller has no --out
        export_lora(patch, None, a, rank=1, check=False)
    export_lora(patch, None, a, rank=1, overwrite=True, check=False)
    assert a.read_bytes() != b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # no temporary left
    _, meta = read_lora(a)
    assert meta["rank"] == 1 and meta["max_error"] is None
    assert json.loads(json.dumps(meta))  # every field is JSON


def test_the_lora_file_carries_the_runs_verdict(tmp_path, hf_text_patch):
    """Twentieth trial: the LoRA of a patch whose run failed (model_broken: "do not ship the patch") said nothing of it
    in the file; only `slug export` warned, on stderr. The verdict and its codes now travel in the metadata."""
    from slugkit.patch import architecture_facts

    clip, patch = hf_text_patch
    verdict = {"verdict": "fail", "verdict_codes": ["model_broken"], "warning_codes": ["worst_drop"]}
    failed = make_patch(clip.model, dict(patch.patched), base_model=clip.model_id, adapter=clip.family,
                        concept="alice abbott", architecture=architecture_facts(clip.model), extra=verdict)
    export_lora(failed, None, tmp_path / "f.safetensors", check=False)
    _, meta = read_lora(tmp_path / "f.safetensors")
    assert {k: meta[k] for k in verdict} == verdict
    export_lora(patch, None, tmp_path / "p.safetensors", check=False)  # no recorded verdict: nothing invented
    assert "verdict" not in read_lora(tmp_path / "p.safetensors")[1]


def test_the_lora_file_says_which_method_made_the_patch(tmp_path, hf_text_patch):
    """Verification 60: the LoRA of a ``--sd-fallback finetune`` patch (method layer-finetune, not SLUG) lost that label
    once exported; the method now travels in the metadata and ``slug inspect`` says it."""
    from slugkit.patch import architecture_facts
    from slugkit.patch.summary import describe_lora

    clip, patch = hf_text_patch
    ft = make_patch(clip.model, dict(patch.patched), base_model=clip.model_id, adapter=clip.family,
                    concept="alice abbott", architecture=architecture_facts(clip.model), method="layer-finetune")
    export_lora(ft, None, tmp_path / "ft.safetensors", check=False)
    meta = read_lora(tmp_path / "ft.safetensors")[1]
    assert meta["method"] == "layer-finetune"
    assert "  method:     layer-finetune (NOT SLUG: a fine-tune after SLUG's search refused)" in describe_lora(
        tmp_path / "ft.safetensors", meta)
    export_lora(patch, None, tmp_path / "slug.safetensors", check=False)
    meta = read_lora(tmp_path / "slug.safetensors")[1]
    assert meta["method"] == "slug" and "NOT SLUG" not in describe_lora(tmp_path / "slug.safetensors", meta)
    with pytest.raises(ValueError, match="may not set .*Method"):  # the patch's, not the caller's to set
        lora_from_patch(ft, None, check=False, extra={"Method": "slug"})


def test_a_lora_whose_metadata_or_tensors_were_edited_is_refused(tmp_path, hf_text_patch, capsys):
    """Trial 48: re-saving a LoRA with `slugkit.verdict` "warn" → "pass" was shown by `slug inspect` as the file's
    own. The seal (metadata and tensor hashes) catches hand edits, as patch.json's fingerprint does."""
    import safetensors
    from safetensors.torch import save_file

    from slugkit.cli import main
    from slugkit.patch import PatchFormatError

    clip, patch = hf_text_patch
    f = tmp_path / "l.safetensors"
    export_lora(patch, None, f, check=False)
    tensors, meta = read_lora(f)
    assert len(meta["seal"]) == 64
    with safetensors.safe_open(str(f), framework="pt") as h:
        raw = h.metadata()
    for name, md, ts in (("verdict", {**raw, "slugkit.verdict": json.dumps("pass")}, tensors),
                         ("tensor", raw, {k: (v * 2 if i == 0 else v) for i, (k, v) in enumerate(tensors.items())})):
        g = tmp_path / f"{name}.safetensors"
        save_file(ts, str(g), metadata=md)
        with pytest.raises(PatchFormatError, match="was edited after slug wrote it"):
            read_lora(g)
        assert main(["inspect", str(g)]) == 2  # said as a damaged LoRA, not "a file, not a patch"
        assert f"{g} is a LoRA slug wrote, damaged: " in capsys.readouterr().err
    g = tmp_path / "cut.safetensors"
    g.write_bytes(f.read_bytes()[:-40])
    assert main(["inspect", str(g)]) == 2 and f"{g} is a LoRA slug wrote, damaged: " in capsys.readouterr().err
    unsealed = {k: v for k, v in raw.items() if k != "slugkit.seal"}  # the seal deleted: refused (verify 50)
    save_file(tensors, str(tmp_path / "cut-seal.safetensors"), metadata=unsealed)
    with pytest.raises(PatchFormatError, match="has no slugkit.seal, which its format_version 2 requires"):
        read_lora(tmp_path / "cut-seal.safetensors")
    old = {**unsealed, "slugkit.format_version": "1"}  # an earlier slugkit's LoRA: read, said unsealed
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=old)
    assert "seal" not in read_lora(tmp_path / "old.safetensors")[1]
    assert main(["inspect", str(tmp_path / "old.safetensors")]) == 0
    assert "sealed:     no (a format 1 LoRA" in capsys.readouterr().out
