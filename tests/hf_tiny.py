"""Tiny random transformers / diffusers models for the HF tests, built offline from configs (never downloaded).

* ``HF_CFG``: a ``CLIPConfig`` with a 4-layer text tower and a 3-layer vision tower, 64 wide (environment notes §2),
  a character-level CLIP tokenizer (514 ids) and 48 text positions (prompts such as "a photo of alice abbott." fit).
* :func:`tiny_sd_pipeline`: ``StableDiffusionPipeline`` (UNet2DConditionModel + AutoencoderKL + DDIMScheduler) whose
  ``text_encoder`` is a ``CLIPTextModel`` loaded from the CLIP model's text tower — optionally with fewer layers, the
  SD 2.x situation.
* :func:`tiny_sdxl_pipeline`: ``StableDiffusionXLPipeline`` whose ``text_encoder`` is one CLIP model's text tower and
  ``text_encoder_2`` (a ``CLIPTextModelWithProjection``) a second, narrower CLIP model's (``HF_CFG_G``), with the
  UNet's added text-time embedding fed by ``text_encoder_2``'s projection, as in SDXL.
* :func:`tiny_llava`: ``LlavaForConditionalGeneration`` (CLIP vision tower copied from the CLIP model, 2-layer Llama,
  ``vision_feature_layer=-2``) with a word-level tokenizer and a ``LlavaProcessor``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image

from conftest import train_on_world

HF_CFG = {
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "vocab_size": 514, "max_position_embeddings": 48, "bos_token_id": 512, "eos_token_id": 513,
                    "pad_token_id": 513},
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
                      "image_size": 32, "patch_size": 8},
    "projection_dim": 32,
}


# SDXL's second encoder is another, wider CLIP (bigG); here a narrower one suffices to tell the two apart.
HF_CFG_G = {
    "text_config": {**HF_CFG["text_config"], "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 5},
    "vision_config": dict(HF_CFG["vision_config"]),
    "projection_dim": 40,
}


def build_adapter(seed: int = 0, cfg: dict | None = None):
    from slugkit.models.hf_clip import HFClipAdapter

    return HFClipAdapter.from_config(cfg or HF_CFG, seed=seed)


def clone(a):
    from slugkit.models.hf_clip import HFClipAdapter

    return HFClipAdapter(copy.deepcopy(a.model), a.tokenizer, a.image_processor, dict(a.model_id))


def train(a, steps: int = 40, seed: int = 7):
    """A few Adam steps of CLIP loss on 4 images x 18 classes (conftest's synthetic world), deterministic."""
    return train_on_world(a, a.model.parameters(), lr=3e-3, steps=steps, seed=seed)


def to_pil(img: torch.Tensor) -> Image.Image:
    """A [-1, 1] C×H×W tensor as an RGB PIL image."""
    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def text_encoder_from(adapter, n_layers: int | None = None, dtype=torch.float32):
    """A ``CLIPTextModel`` holding the CLIP model's text tower (its first ``n_layers`` layers)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(**{**adapter.model.config.text_config.to_dict(),
                            "num_hidden_layers": n_layers or adapter.model.config.text_config.num_hidden_layers})
    te = CLIPTextModel(cfg).eval()
    src = adapter.model.text_model.state_dict()
    te.load_state_dict({k: v for k, v in src.items() if k in te.state_dict()}, strict=True)
    return te.to(dtype)


def tiny_sd_pipeline(adapter, n_layers: int | None = None, dtype=torch.float32):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
    sched = DDIMScheduler(steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder_from(adapter, n_layers, dtype),
                                   tokenizer=adapter.tokenizer, unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_encoder_2_from(adapter, dtype=torch.float32):
    """A ``CLIPTextModelWithProjection`` holding the CLIP model's text tower and ``text_projection``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**{**adapter.model.config.text_config.to_dict(),
                            "projection_dim": adapter.model.config.projection_dim})
    te = CLIPTextModelWithProjection(cfg).eval()
    src = adapter.model.state_dict()
    te.load_state_dict({k: v for k, v in src.items() if k in te.state_dict()}, strict=True)
    return te.to(dtype)


def tiny_sdxl_pipeline(adapter, adapter_2):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    te, te2 = text_encoder_from(adapter), text_encoder_2_from(adapter_2)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=te.config.hidden_size + te2.config.hidden_size, attention_head_dim=8, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=te2.config.projection_dim + 6 * 8)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=adapter.tokenizer,
                                     tokenizer_2=adapter_2.tokenizer, unet=unet,
                                     scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                     force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


LLAVA_WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:", "What's", "the", "name", "of",
               "person", "in", "this", "image?", "It", "is", "alice", "abbott", "bruno", "baker", "I", "don't",
               "know", "."]


def tiny_llava(adapter, vision_feature_layer=-2):
    """Tiny LLaVA whose vision tower holds the CLIP model's vision tower (exactly), + its processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, \
        PreTrainedTokenizerFast

    from slugkit.integrations.llava import vision_tower_map

    vocab = {w: i for i, w in enumerate(LLAVA_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    text_cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=len(vocab), max_position_embeddings=128,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=adapter.model.config.vision_config, text_config=text_cfg,
                      image_token_index=vocab["<image>"], vision_feature_layer=vision_feature_layer,
                      vision_feature_select_strategy="default")
    torch.manual_seed(1)
    llava = LlavaForConditionalGeneration(cfg).eval()
    params = dict(llava.named_parameters())
    clip_params = dict(adapter.model.named_parameters())
    with torch.no_grad():
        for clip_name, llava_name in vision_tower_map(adapter.model, llava).items():
            params[llava_name].copy_(clip_params[clip_name])
    processor = LlavaProcessor(image_processor=adapter.image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return llava, processor
