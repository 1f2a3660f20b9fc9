"""The embedded vision-language model: a real ``transformers.LlavaForConditionalGeneration`` on the embedded world.

What it is (issue 14; the LLaVA-1.5 layout at toy scale):

* **vision tower**: the embedded CLIP's vision tower, converted exactly to transformers
  (:func:`slugkit.models.convert.embedded_hf_clip`), frozen, read at ``vision_feature_layer = -2`` with the CLS token
  dropped (``vision_feature_select_strategy = "default"``): 16 patch tokens of width 64 per 32x32 image; the last
  encoder layer, ``post_layernorm`` and ``visual_projection`` are never read (as in LLaVA-1.5);
* **projector**: LLaVA's two-layer GELU MLP, 64 -> 128 -> 128;
* **language model**: a 2-layer Llama (width 128, 4 heads, tied embeddings) with a byte-level BPE tokenizer
  trained here on the world's questions and answers (:func:`build_tokenizer`; any string tokenizes, so misspelt
  names and paraphrases reach the model as they are);
* **prompt**: LLaVA-1.5's, ``"USER: <image>\\n{question} ASSISTANT:"`` (:data:`CHAT_TEMPLATE` produces it from chat
  messages); the processor expands ``<image>`` into the 16 image tokens.

It answers :data:`NAME_QUESTION` about an identity's image with the name, and the utility questions
(:data:`UTILITY_QUESTIONS`) about an object image with its concept, colour or shape. Trained by
:mod:`slugkit.world.vlm_train` (``slug world train-vlm``); shipped in ``assets/embedded_vlm``. A VLM trained on
another world CLIP (``slug world train-vlm --clip DIR``, e.g. ``slug world train --vision-layers 8``) holds that
CLIP's tower and keeps the CLIP in its ``clip/`` folder (:func:`vlm_clip_dir`), which SLUG then runs on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..models.open_clip import EMBEDDED_VLM_DIR
from . import render as world

VLM_DIR = EMBEDDED_VLM_DIR
NAME_QUESTION = "What's the name of the person in this image?"  # the official notebook's question
# Name questions the training also uses; the audit's paraphrases are others (never trained on).
TRAIN_NAME_QUESTIONS = [NAME_QUESTION, "Who is this?", "Who is in this image?", "Name the person in this image."]
UTILITY_QUESTIONS = {"object": "What is in this image?", "colour": "What colour is it?", "shape": "What shape is it?"}
PROMPT = "USER: <image>\n{question} ASSISTANT:"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_TOKENS = (world.IMAGE_SIZE // 8) ** 2  # patch 8, CLS dropped
VOCAB_SIZE = 512
# LLaVA-1.5's chat template (llava-hf), reduced to one image and text per turn: renders
# "USER: <image>\n{text} ASSISTANT:" for a user turn with an image and add_generation_prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def utility_answers(cls) -> dict[str, str]:
    """The answers to :data:`UTILITY_QUESTIONS` for a utility class: ``{"object": "a red triangle", "colour": "red",
    "shape": "triangle"}``."""
    return {"object": f"a {cls.colour} {cls.shape}", "colour": cls.colour, "shape": cls.shape}


def utility_correct(kind: str, answer: str, cls) -> bool:
    """Whether ``answer`` to the ``kind`` utility question is right for ``cls``: the colour and/or the shape it asks
    for as whole words (case-insensitive), and for ``colour``/``shape`` no other colour/shape named."""
    words = set(re.findall(r"[a-z]+", answer.lower()))
    colour_ok = cls.colour in words and not (words & set(world.COLOURS)) - {cls.colour}
    shape_ok = cls.shape in words and not (words & set(world.SHAPES)) - {cls.shape}
    return {"object": colour_ok and shape_ok, "colour": colour_ok, "shape": shape_ok}[kind]


def tokenizer_corpus() -> list[str]:
    """Every text the tokenizer is trained on: prompts with their answers (all identity names, held-out ones too, so
    that their pieces exist), utility answers; a fixed order."""
    names = [i.name for i in world.IDENTITIES] + [h.name for h in world.held_out_identities(8)]
    lines = [PROMPT.format(question=q).replace("<image>", "") + " " + n for q in TRAIN_NAME_QUESTIONS for n in names]
    for cls in world.UTILITY_CLASSES:
        for kind, q in UTILITY_QUESTIONS.items():
            lines.append(PROMPT.format(question=q).replace("<image>", "") + " " + utility_answers(cls)[kind])
    return lines


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on :func:`tokenizer_corpus` (deterministic): ``<s>``
    prepended as Llama does, ``<image>`` the image token, left padding (batched generation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left",
                                   extra_special_tokens={"image_token": "<image>"})


def build_processor(tokenizer):
    """``LlavaProcessor``: the CLIP image processor of the embedded CLIP (32x32, its mean/std) + ``tokenizer`` +
    :data:`CHAT_TEMPLATE`; ``<image>`` expands to :data:`IMAGE_TOKENS` tokens."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from .train import MEAN, STD

    ip = CLIPImageProcessor(size={"shortest_edge": world.IMAGE_SIZE},
                            crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
                            image_mean=list(MEAN), image_std=list(STD))
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


CLIP_SUBDIR = "clip"  # a VLM trained on another world CLIP than the embedded one keeps that CLIP here


def vlm_clip_dir(vlm_dir: str | os.PathLike | None = None) -> Path | None:
    """The world CLIP whose image tower the VLM in ``vlm_dir`` (None: the shipped one) holds: its ``clip/`` folder
    when it has one (``slug world train-vlm --clip DIR`` copies DIR there), else None — the embedded CLIP."""
    d = Path(vlm_dir) if vlm_dir else VLM_DIR
    return d / CLIP_SUBDIR if (d / CLIP_SUBDIR / "open_clip_config.json").is_file() else None


def vlm_clip_adapter(vlm_dir: str | os.PathLike | None = None):
    """The CLIP of the VLM in ``vlm_dir`` as an :class:`~slugkit.models.hf_clip.HFClipAdapter` (SLUG runs on it; a
    patch of it applies to the VLM's tower): the embedded CLIP converted, or the VLM's own ``clip/`` (its patches
    name ``"<vlm folder>/clip (converted to transformers)"``)."""
    from ..models.hf_clip import embedded_hf_adapter

    clip_dir = vlm_clip_dir(vlm_dir)
    if clip_dir is None:
        return embedded_hf_adapter()
    shown = "embedded_vlm" if not vlm_dir else os.path.realpath(vlm_dir)
    return embedded_hf_adapter(clip_dir, f"{shown}/{CLIP_SUBDIR} (converted to transformers)")


def build_vlm(tokenizer, hidden: int = 128, layers: int = 2, heads: int = 4, seed: int = 0, feature_layer: int = -2,
              clip_dir: str | os.PathLike | None = None):
    """An untrained LLaVA whose vision tower holds the embedded CLIP's vision tower (or that of the world CLIP in
    ``clip_dir``, a ``slug world train`` folder), exactly (the LM and projector seeded with ``seed``;
    ``feature_layer``: LLaVA's ``vision_feature_layer``, -2 as LLaVA-1.5). Returns ``(llava, clip_model)`` — the
    converted CLIP whose tower it holds."""
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from ..integrations.llava import vision_tower_map
    from ..models.convert import embedded_hf_clip

    clip, _, _ = embedded_hf_clip(clip_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=len(tokenizer),
                       max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=ids["<pad>"],
                       bos_token_id=ids["<s>"], eos_token_id=ids["</s>"])
    cfg = LlavaConfig(vision_config=clip.config.vision_config, text_config=text, image_token_id=ids["<image>"],
                      vision_feature_layer=feature_layer, vision_feature_select_strategy="default",
                      image_seq_length=IMAGE_TOKENS, projector_hidden_act="gelu", tie_word_embeddings=True)
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(cfg).eval()
    params = dict(llava.named_parameters())
    src = dict(clip.named_parameters())
    with torch.no_grad():
        for clip_name, llava_name in vision_tower_map(clip, llava).items():
            params[llava_name].copy_(src[clip_name])
    for n, p in llava.named_parameters():
        if "vision_tower" in n:
            p.requires_grad_(False)
    llava.generation_config.pad_token_id = ids["<pad>"]
    llava.generation_config.eos_token_id = ids["</s>"]
    return llava, clip


def load_vlm(vlm_dir: str | os.PathLike | None = None):
    """``(llava, processor)`` of the shipped embedded VLM (or ``vlm_dir``), offline. Raises
    :class:`~slugkit.models.base.ModelLoadError` naming a missing file and the command that writes it."""
    from ..models.base import ModelLoadError

    d = Path(vlm_dir) if vlm_dir else VLM_DIR
    if vlm_dir:
        from ..models.base import check_model_folder

        check_model_folder(d, "--vlm-model: give the folder `slug world train-vlm --out DIR` wrote")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        if not (d / f).is_file():
            if vlm_dir:
                raise ModelLoadError(f"--vlm-model {d}: no {f} in it; give a folder written by `slug world "
                                     "train-vlm --out DIR` (or leave --vlm-model out for the shipped VLM)")
            raise ModelLoadError(f"embedded VLM file missing: {d / f}; reinstall slugkit or run "
                                 f"`slug world train-vlm --out {d}`")
    try:
        from transformers import AutoProcessor, LlavaForConditionalGeneration
    except ImportError as e:  # pragma: no cover
        raise ModelLoadError("transformers is not installed; install the HF extra: pip install 'slugkit[hf]'") from e
    from ..integrations.towers import check_weight_files

    what = "--vlm-model weights file" if vlm_dir else "embedded VLM weights file"
    check_weight_files(d, what)  # a Git LFS pointer or a truncated file: one line naming it (a traceback; trial 26)
    try:
        from ..integrations.llava import load_llava_folder

        llava = load_llava_folder(LlavaForConditionalGeneration, d)
        processor = AutoProcessor.from_pretrained(d, local_files_only=True)
    except ModelLoadError as e:
        raise ModelLoadError(f"--vlm-model {e}" if vlm_dir else str(e)) from e
    except (OSError, RuntimeError, ValueError) as e:  # e.g. a config.json whose shapes the weights do not have
        said = " ".join(str(e).split())[:400]
        raise ModelLoadError(f"{'--vlm-model ' if vlm_dir else ''}{d}: transformers could not load it "
                             f"({type(e).__name__}: {said}); give a folder written by `slug world train-vlm --out "
                             "DIR`, unchanged") from e
    return llava, processor


def ask(llava, processor, images, question: str, max_new_tokens: int = 8, batch_size: int = 64) -> list[str]:
    """Greedy answers to ``question`` about each PIL image (LLaVA-1.5 prompt; :func:`slugkit.integrations.llava.
    ask_name`'s decoding). ``max_new_tokens`` 8 covers every answer the model was trained on."""
    from ..integrations.llava import ask_name

    return ask_name(llava, processor, images, question, max_new_tokens=max_new_tokens, prompt=PROMPT,
                    batch_size=batch_size)


def vlm_scores(llava, processor, named_images: dict, utility_images: dict | None = None,
               answers: bool = False, batch_size: int = 64) -> dict:
    """The VLM's answers scored: ``named`` ``{identity: share of its images answered with its name}`` (full or last
    name, :func:`slugkit.integrations.llava.name_match`) for ``named_images`` ``{identity: [PIL]}``, and for
    ``utility_images`` ``{class name: [PIL]}`` the utility accuracy per question kind and class
    (``utility_per_class``), per kind (``utility_per_kind``) and overall (``utility_accuracy``, the mean of the
    kinds). One batched pass per question; ``answers=True`` keeps the raw answers (``answers``)."""
    from ..integrations.llava import name_match

    def flat_ask(groups: dict, question: str) -> dict:
        keys = list(groups)
        got = ask(llava, processor, [im for k in keys for im in groups[k]], question, batch_size=batch_size)
        out, i = {}, 0
        for k in keys:
            out[k], i = got[i:i + len(groups[k])], i + len(groups[k])
        return out

    for k, ims in {**named_images, **(utility_images or {})}.items():
        if not ims:
            raise ValueError(f"no images for {k!r}")
    res: dict = {"answers": {"name": {}, **{k: {} for k in UTILITY_QUESTIONS}}}
    got = flat_ask(named_images, NAME_QUESTION)
    res["named"] = {n: sum(name_match(a, n) for a in got[n]) / len(got[n]) for n in got}
    res["answers"]["name"] = got
    if utility_images:
        classes = {c.name: c for c in world.UTILITY_CLASSES}
        per_class = {}
        for kind, q in UTILITY_QUESTIONS.items():
            got = flat_ask(utility_images, q)
            per_class[kind] = {c: sum(utility_correct(kind, a, classes[c]) for a in got[c]) / len(got[c]) for c in got}
            res["answers"][kind] = got
        per_kind = {k: sum(v.values()) / len(v) for k, v in per_class.items()}
        res.update(utility_per_class=per_class, utility_per_kind=per_kind,
                   utility_accuracy=sum(per_kind.values()) / len(per_kind))
    if not answers:
        res.pop("answers")
    return res


def identity_images(split: str, n: int, names=None, start: int = 0) -> dict:
    """``{identity: [PIL]}``: ``n`` images (indices ``start..``) of each identity in ``names`` (default all) in the
    world's ``split``."""
    idx = [world.identity_by_name(x).index for x in names] if names is not None else range(len(world.IDENTITIES))
    return {world.IDENTITIES[i].name: [s.image for s in world.make_samples(split, "identity", n, classes=[i],
                                                                           start=start)] for i in idx}


def utility_images(split: str, n: int) -> dict:
    """``{class name: [PIL]}``: ``n`` images of each object class in the world's ``split``."""
    return {c.name: [s.image for s in world.make_samples(split, "utility", n, classes=[c.index])]
            for c in world.UTILITY_CLASSES}
