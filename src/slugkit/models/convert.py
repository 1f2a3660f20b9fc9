"""Convert an open_clip ViT ``CLIP`` into an equivalent ``transformers.CLIPModel`` (+ tokenizer), exactly.

Why: diffusers pipelines and LLaVA consume HF ``CLIPTextModel`` / ``CLIPVisionModel`` towers. Converting the
embedded open_clip model gives the embedded world an HF CLIP whose text tower can drive a diffusers UNet exactly as
SD's ``text_encoder`` does, so the embedded text-to-image demo runs the same HF code path as SD 1.5 / 2.1.

The mapping (open_clip -> HF):

* ``token_embedding`` / ``positional_embedding`` -> ``text_model.embeddings.{token,position}_embedding.weight``;
* ``transformer.resblocks.i.attn.in_proj_{weight,bias}`` -> ``q_proj`` / ``k_proj`` / ``v_proj`` (split in thirds, q
  first), ``attn.out_proj`` -> ``self_attn.out_proj``, ``ln_1``/``ln_2`` -> ``layer_norm1``/``layer_norm2``,
  ``mlp.c_fc``/``mlp.c_proj`` -> ``mlp.fc1``/``mlp.fc2``; ``ln_final`` -> ``final_layer_norm``;
* ``text_projection`` (``x @ P``) -> ``text_projection.weight = P.T``; ``visual.proj`` -> ``visual_projection.weight
  = proj.T``;
* ``visual.conv1`` -> ``patch_embedding``, ``class_embedding``, ``positional_embedding`` -> ``position_embedding``,
  ``ln_pre`` / ``ln_post`` -> ``pre_layrnorm`` / ``post_layernorm`` (HF's spelling), ``logit_scale`` as is.

Activation: open_clip uses exact GELU unless the config says ``quick_gelu``; the HF config is set accordingly. The
HF text pooling takes the first ``eos_token_id`` position, open_clip the argmax token id: both are the EOT token
(49407 is the largest id). ``tests/test_convert.py`` checks that both models give the same features to 1e-5.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import torch

from ..common.rng import keeps_torch_rng


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover
        from .base import ModelLoadError

        raise ModelLoadError("transformers is not installed; install the HF extra: pip install 'slugkit[hf]'") from e
    return transformers


def hf_config_from_open_clip(cfg: dict):
    """``transformers.CLIPConfig`` equivalent to an open_clip ViT model config dict."""
    transformers = _require_transformers()
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    if isinstance(v.get("layers"), (list, tuple)) or v.get("timm_model_name"):
        raise ValueError("only open_clip ViT towers convert to transformers.CLIPModel (not ResNet / timm towers)")
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    vw, tw = v["width"], t["width"]
    v_heads = vw // v.get("head_width", 64)
    return transformers.CLIPConfig(
        text_config=dict(
            vocab_size=t.get("vocab_size", 49408), hidden_size=tw, intermediate_size=int(tw * t.get("mlp_ratio", 4.0)),
            num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
            max_position_embeddings=t.get("context_length", 77), hidden_act=act, layer_norm_eps=1e-5,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=vw, intermediate_size=int(vw * v.get("mlp_ratio", 4.0)), num_hidden_layers=v["layers"],
            num_attention_heads=v_heads, image_size=v["image_size"], patch_size=v["patch_size"], hidden_act=act,
            layer_norm_eps=1e-5,
        ),
        projection_dim=cfg["embed_dim"],
    )


def open_clip_state_to_hf(sd: dict[str, torch.Tensor], n_text: int, n_vision: int) -> dict[str, torch.Tensor]:
    """Rename / reshape an open_clip ViT CLIP state dict into ``transformers.CLIPModel`` keys."""
    out: dict[str, torch.Tensor] = {}

    def block(src: str, dst: str) -> None:
        w, b = sd[f"{src}.attn.in_proj_weight"], sd[f"{src}.attn.in_proj_bias"]
        for j, k in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}.self_attn.{k}.weight"] = w.chunk(3)[j].clone()
            out[f"{dst}.self_attn.{k}.bias"] = b.chunk(3)[j].clone()
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, h in pairs.items():
            out[f"{dst}.{h}.weight"] = sd[f"{src}.{a}.weight"]
            out[f"{dst}.{h}.bias"] = sd[f"{src}.{a}.bias"]

    out["logit_scale"] = sd["logit_scale"].reshape(())
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    for i in range(n_text):
        block(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    out["text_model.final_layer_norm.weight"] = sd["ln_final.weight"]
    out["text_model.final_layer_norm.bias"] = sd["ln_final.bias"]
    out["text_projection.weight"] = sd["text_projection"].T.contiguous()

    out["vision_model.embeddings.class_embedding"] = sd["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    out["vision_model.pre_layrnorm.weight"] = sd["visual.ln_pre.weight"]
    out["vision_model.pre_layrnorm.bias"] = sd["visual.ln_pre.bias"]
    for i in range(n_vision):
        block(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}")
    out["vision_model.post_layernorm.weight"] = sd["visual.ln_post.weight"]
    out["vision_model.post_layernorm.bias"] = sd["visual.ln_post.bias"]
    out["visual_projection.weight"] = sd["visual.proj"].T.contiguous()
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def open_clip_to_hf(model, cfg: dict):
    """A ``transformers.CLIPModel`` with the weights of the open_clip ViT ``model`` (built from ``cfg``)."""
    transformers = _require_transformers()
    hf_cfg = hf_config_from_open_clip(cfg)
    hf = transformers.CLIPModel(hf_cfg)
    sd = open_clip_state_to_hf(model.state_dict(), cfg["text_cfg"]["layers"], cfg["vision_cfg"]["layers"])
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"open_clip -> HF conversion mismatch: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def hf_tokenizer_from_open_clip(context_length: int):
    """An HF ``CLIPTokenizer`` with OpenAI CLIP's exact vocabulary, rebuilt from open_clip's bundled BPE file.

    No hub access: vocab = 256 byte symbols + their ``</w>`` forms + the 48,894 merges + the two specials (49,408
    ids, identical to OpenAI's). Padding uses ``<|endoftext|>`` as OpenAI's tokenizer does.
    """
    transformers = _require_transformers()
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [m for m in lines[1:49152 - 256 - 2 + 1] if m.strip()]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = transformers.CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)},
                                     merges=[tuple(m.split()) for m in merges], model_max_length=context_length)
    # Sanity: the ids must match open_clip's tokenizer (which the embedded model was trained with).
    ref = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)("a photo of a red circle.")[0]
    ids = tok("a photo of a red circle.")["input_ids"]
    if ref[: len(ids)].tolist() != ids:
        raise RuntimeError(f"rebuilt CLIPTokenizer disagrees with open_clip: {ids} vs {ref[:len(ids)].tolist()}")
    return tok


@keeps_torch_rng
def embedded_hf_clip(model_dir=None):
    """(CLIPModel, CLIPTokenizer, open_clip config) of the embedded model — or of the world CLIP in ``model_dir``
    (a folder ``slug world train`` wrote, e.g. a VLM's ``clip/``) — converted exactly; no files written."""
    import json

    from .open_clip import EMBEDDED_DIR, OpenClipAdapter

    folder = Path(model_dir) if model_dir is not None else Path(EMBEDDED_DIR)
    ad = OpenClipAdapter.load("embedded" if model_dir is None else f"local-dir:{folder}")
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    hf = open_clip_to_hf(ad.model, cfg)
    tok = hf_tokenizer_from_open_clip(cfg["text_cfg"].get("context_length", 77))
    return hf, tok, cfg
