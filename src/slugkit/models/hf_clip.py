"""transformers ``CLIPModel`` adapter: ``openai/clip-vit-large-patch14``, ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``,
``openai/clip-vit-large-patch14-336``, any local folder written by ``save_pretrained``, or ``embedded`` (the shipped
CLIP converted exactly, :func:`embedded_hf_adapter`).

This is the model family of the official SD / UnlearnCanvas / LLaVA experiments (spec §2.7, §6, §7). The SLUG core
sees it through the same :class:`~slugkit.models.base.Adapter` protocol as open_clip; what differs is declared here.

Where we depart from the official HF code (on purpose, spec §9.1):

* **Tower split.** The official scripts call a name "vision" if it contains ``vision`` (or ``vision_model``), so
  ``visual_projection.weight`` lands in the *language* tower, where it can dominate genuine text layers and push them
  off the front (spec §3.4 [BUG]). Here vision = names under ``vision_model.`` **and** ``visual_projection``.
* **Sign.** The official HF gradient code does not negate its cosine loss and then steps with λ < 0 in the binary
  searches, which *increases* forget alignment (spec §2.7 [BUG]). We keep the one convention of every family
  (``base.py``): L_forget = mean cos(f_I, f_T) and the edit θ ← θ − η·∇L_forget with η > 0, i.e. alignment goes down.
* **Gradients** come from the shared core (``slug.gradients``): ``zero_grad`` between batches and splits, real
  captions (the official HF path replaces every caption, retain included, by the concept name).

Candidates follow the HF filter of spec §3.4: every parameter except names containing ``bias``, ``norm`` (layer
norms, ``pre_layrnorm``, ``post_layernorm``, ``final_layer_norm``), ``embedding``/``embeddings``, ``position`` or
``logit_scale``. That leaves, per encoder layer, ``self_attn.{k,v,q,out}_proj.weight`` and ``mlp.fc{1,2}.weight``,
plus ``text_projection.weight`` and ``visual_projection.weight``. Groups (spec §4.1): a chosen ``q/k/v_proj`` moves
all three projections of its layer, a chosen ``fc1``/``fc2`` moves both; ``out_proj`` and the projections move alone.

``precision`` (``fp32`` | ``bf16`` | ``fp16``) is autocast over float32 weights (:mod:`slugkit.models.base`): the
model is always loaded with ``dtype=torch.float32`` (also when the folder stores fp16 weights), never cast.
:meth:`HFClipAdapter.restrict_candidates` limits candidates to what a downstream consumer reads (SD's text encoder,
LLaVA's vision tower; see :mod:`slugkit.integrations`): an edit the consumer never reads has no effect on it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..common.rng import keeps_torch_rng
from .base import Adapter, ModelLoadError, Stage, autocast_dtype, check_local_weights, check_precision
from .hub import hub_offline, hub_unreachable, unreachable_note  # noqa: F401 (hub_offline: its home before)

HF_EXCLUDE = ("bias", "norm", "embedding", "position", "logit_scale")
_GROUP_RE = re.compile(r"^(?P<layer>.*\.layers\.\d+\.)(?P<comp>self_attn\.[qkv]_proj|mlp\.fc[12])\.weight$")
_QKV = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj")  # named_parameters() order
_MLP = ("mlp.fc1", "mlp.fc2")


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ModelLoadError("transformers is not installed; install the HF extra: pip install 'slugkit[hf]'") from e
    return transformers


def features(out) -> torch.Tensor:
    """The projected embedding from ``get_image_features`` / ``get_text_features``: transformers 4.x returns the
    tensor; 5.x returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the *projected* features."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"cannot find the projected features in {type(out).__name__}")
    return pooled


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte → printable-unicode table (the alphabet of CLIP's byte-level BPE)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def char_tokenizer(model_max_length: int = 77):
    """A character-level ``CLIPTokenizer`` with no merges, built offline (tests, tiny models).

    Vocabulary: the 256 byte symbols, their 256 end-of-word variants, ``<|startoftext|>`` (512) and
    ``<|endoftext|>`` (513, also the pad token) — 514 ids, the real CLIP layout with the merges left out.
    """
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=model_max_length)


def _image_processor_for(size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


class HFClipAdapter(Adapter):
    """Adapter for ``transformers.CLIPModel`` (see the module docstring for filters, towers and groups)."""

    family = "hf_clip"

    def __init__(self, model, tokenizer, image_processor, model_id: dict, precision: str = "fp32"):
        autocast_dtype(precision)  # an unknown string fails here; the device check comes with each autocast()
        self.precision = precision
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_id = model_id
        self.consumer: str | None = None  # human description of the candidate restriction, if any
        self._allowed: Callable[[str], bool] | None = None
        self._stages: dict[str, list[Stage]] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    @keeps_torch_rng
    def load(cls, model: str, pretrained: str | None = None, device: str = "cpu", precision: str = "fp32",
             cache_dir: str | None = None) -> "HFClipAdapter":
        """``CLIPModel.from_pretrained(model)`` plus its tokenizer and image processor.

        ``model`` is a hub id (downloaded / cached by ``huggingface_hub``) or a local folder written by
        ``save_pretrained`` (``config.json``, weights, tokenizer and preprocessor files); ``embedded`` (or
        ``embedded-hf``) is the shipped CLIP converted exactly, offline. ``pretrained`` is accepted
        for symmetry with open_clip and must be ``None`` (HF ids carry their weights). With ``HF_HUB_OFFLINE`` set,
        only local files / the cache are used. ``precision``: ``fp32`` | ``bf16`` | ``fp16``, the autocast dtype of
        every forward; the weights are float32 (``ValueError`` before anything is read for an unknown string, ``fp16``
        on the CPU, or an autocast torch cannot run on ``device``).
        """
        check_precision(precision, device)
        _require_transformers()
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        if pretrained:
            raise ModelLoadError(f"--pretrained {pretrained!r} is not used by the hf_clip family: a transformers id "
                                 f"or folder carries its weights (pass --model {pretrained} instead?)")
        local = Path(model).is_dir()
        if model in EMBEDDED_HF_IDS and not local:  # the shipped CLIP, converted (it went to the hub: eighth trial)
            e = embedded_hf_adapter()
            e.model.to(device).eval()
            return cls(e.model, e.tokenizer, e.image_processor, {**e.model_id, "precision": precision}, precision)
        if not local and (model.startswith(("/", "./", "../", "~")) or model.count("/") > 1):  # not a hub id
            raise ModelLoadError(f"{model}: no such folder (a hub id is ORG/NAME; a local model is a folder written "
                                 "by save_pretrained)")  # it advised `hf download /tmp/...` (verify 45)
        if not local and Path(model).exists():
            raise ModelLoadError(f"{model} is a file; the hf_clip family loads a folder written by save_pretrained "
                                 f"(config.json + model.safetensors + tokenizer/preprocessor files) or a hub id")
        if local:
            check_local_weights(Path(model), family="hf_clip")
        why = None if local else hub_unreachable() if not hub_offline() else None  # fail at once, not after ~50 s
        kw = {"cache_dir": cache_dir, "local_files_only": local or hub_offline() or why is not None}
        try:
            net = CLIPModel.from_pretrained(model, dtype=torch.float32, **kw)
            tokenizer = AutoTokenizer.from_pretrained(model, **kw)
            image_processor = CLIPImageProcessor.from_pretrained(model, **kw)
        except Exception as e:
            where = (f"the folder {model} (it needs config.json, model.safetensors, the tokenizer files and "
                     f"preprocessor_config.json, as written by CLIPModel/CLIPProcessor.save_pretrained)") if local \
                else f"the hub id {model!r}"
            how = ("Copy the missing files into it (a local folder is never completed from the hub)." if local else
                   "If this machine cannot reach the Hugging Face hub, fetch the model elsewhere, e.g. "
                   f"`hf download {model} --local-dir DIR` (or CLIPModel/CLIPProcessor.from_pretrained(id)"
                   ".save_pretrained(DIR)), copy DIR here and pass --model DIR.")
            raise ModelLoadError(f"could not load transformers CLIPModel from {where}: {type(e).__name__}: "
                                 f"{' '.join(str(e).split()).rstrip('.')}.{unreachable_note(why)} {how}") from e
        net.to(device).eval()
        return cls(net, tokenizer, image_processor,
                   {"family": "hf_clip", "model": model, "pretrained": None, "precision": precision}, precision)

    @classmethod
    def from_config(cls, config, seed: int = 0, tokenizer=None, image_processor=None,
                    model_id: dict | None = None, precision: str = "fp32") -> "HFClipAdapter":
        """An architecture-exact ``CLIPModel`` with random weights (seeded) from a ``CLIPConfig`` or its kwargs dict.

        Without ``tokenizer`` a character-level CLIP tokenizer is built (:func:`char_tokenizer`; the text config's
        ``vocab_size`` must be ≥ 514); without ``image_processor`` a ``CLIPImageProcessor`` for the vision config's
        image size (OpenAI mean/std, resize shortest side + centre crop). ``precision`` as in :meth:`load`.
        """
        _require_transformers()
        from transformers import CLIPConfig, CLIPModel

        cfg = config if isinstance(config, CLIPConfig) else CLIPConfig(**config)
        torch.manual_seed(seed)
        net = CLIPModel(cfg).eval()
        if tokenizer is None:
            tokenizer = char_tokenizer(cfg.text_config.max_position_embeddings)
            if len(tokenizer) > cfg.text_config.vocab_size:
                raise ValueError(f"the character tokenizer needs vocab_size >= {len(tokenizer)}, the config has "
                                 f"{cfg.text_config.vocab_size}; pass a tokenizer")
        if image_processor is None:
            image_processor = _image_processor_for(cfg.vision_config.image_size)
        return cls(net, tokenizer, image_processor,
                   model_id or {"family": "hf_clip", "model": "config", "config": cfg.to_dict(), "seed": seed},
                   precision)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write model, tokenizer and image processor so that :meth:`load` (``--model DIR``) reads them back."""
        out_dir = Path(out_dir)
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)
        return out_dir

    # ------------------------------------------------------------------ declarations
    def tower_of(self, name: str) -> str:
        """``vision`` for ``vision_model.*`` and ``visual_projection.*`` (fixing the official split), else
        ``language`` (``logit_scale`` included, as in the open_clip adapter; it is never a candidate)."""
        return "vision" if name.startswith(("vision_model.", "visual_projection")) else "language"

    def all_candidate_names(self) -> list[str]:
        """The HF filter of spec §3.4, before any consumer restriction."""
        return [n for n, _ in self.model.named_parameters() if not any(s in n for s in HF_EXCLUDE)]

    def candidate_names(self) -> list[str]:
        names = self.all_candidate_names()
        return names if self._allowed is None else [n for n in names if self._allowed(n)]

    def restrict_candidates(self, names_or_predicate: Iterable[str] | Callable[[str], bool] | None,
                            consumer: str | None = None) -> "HFClipAdapter":
        """Keep only candidates a downstream consumer reads: a set of names or a predicate; ``None`` lifts it.

        Whole groups stay together: restricting to a name that is part of a q/k/v or fc1/fc2 group requires the
        other members too (they live in the same layer, so any consumer reads all or none of them).
        """
        if names_or_predicate is None:
            self._allowed, self.consumer = None, None
            return self
        if callable(names_or_predicate):
            pred = names_or_predicate
        else:
            allowed = set(names_or_predicate)
            unknown = sorted(allowed - set(self.all_candidate_names()))
            if unknown:
                raise ValueError(f"not candidate tensors of this model: {unknown[:3]}")
            pred = allowed.__contains__
        for n in self.all_candidate_names():
            if pred(n) and not all(pred(m) for m in self.group_of(n)):
                raise ValueError(f"the restriction keeps {n} but not all of its group {self.group_of(n)}")
        self._allowed = pred
        self.consumer = consumer or "restricted"
        return self

    def group_of(self, name: str) -> list[str]:
        """q/k/v of the same layer (k, v, q: ``named_parameters()`` order), fc1+fc2 of the same layer, or the tensor
        alone (spec §4.1; each member later moves with its own g_f and the same step size)."""
        m = _GROUP_RE.match(name)
        if not m:
            return [name]
        comps = _QKV if m["comp"] in _QKV else _MLP
        return [f"{m['layer']}{c}.weight" for c in comps]

    # ------------------------------------------------------------------ encoders and losses
    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def preprocess(self, image) -> torch.Tensor:
        """PIL image → C×H×W float tensor with the model's image processor (resize, centre crop, OpenAI norm)."""
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids padded to the model's maximum length (77 for CLIP) and truncated to it (EOS kept)."""
        return self.tokenizer(list(texts), padding="max_length", max_length=self.context_length, truncation=True,
                              return_tensors="pt")["input_ids"]

    def eos_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of the pooled (EOS) token per row, exactly as ``CLIPTextModel`` picks it.

        Configs from before transformers PR #24773 carry ``eos_token_id == 2`` and pool at ``argmax(input_ids)``
        (the EOT id is the largest); newer ones pool at the first ``eos_token_id``.
        """
        tm = self.model.text_model
        if tm.eos_token_id == 2:
            return tokens.to(torch.int).argmax(dim=-1)
        return (tokens.to(torch.int) == tm.eos_token_id).int().argmax(dim=-1)

    def attention_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokenizer's padding mask, recovered from the ids: 1 up to and including the pooled EOS, 0 after.

        (The protocol passes token ids only. Under the causal mask padding never reaches the EOS position, so the
        pooled features are the same with or without it; we pass it as HF's processor would.)
        """
        pos = torch.arange(tokens.shape[-1], device=tokens.device)
        return (pos[None, :] <= self.eos_index(tokens).to(tokens.device)[:, None]).long()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """N×C×H×W float32 pixels → N×D float32 L2-normalised embeddings (forward under :meth:`autocast`)."""
        return F.normalize(self._forward(lambda: features(self.model.get_image_features(pixel_values=images))), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """N×L int64 token ids → N×D float32 L2-normalised embeddings (forward under :meth:`autocast`)."""
        mask = self.attention_mask(tokens)
        return F.normalize(self._forward(lambda: features(self.model.get_text_features(input_ids=tokens,
                                                                                     attention_mask=mask))), dim=-1)

    def retain_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Symmetric CLIP InfoNCE with ``logit_scale.exp()`` (HF's ``outputs.loss``; same formula as open_clip)."""
        fi = self.encode_image(images)
        ft = self.encode_text(tokens)
        logits = self.model.logit_scale.exp() * fi @ ft.T
        labels = torch.arange(len(fi), device=fi.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    # ------------------------------------------------------------------ staged forward
    def stages(self, tower: str) -> list[Stage]:
        """The tower as embeddings → each encoder layer → head; composing them equals ``encode_*`` before the L2
        normalisation (same modules called with the same arguments as ``CLIPVisionModel``/``CLIPTextModel``), each
        run under :meth:`autocast`; the head returns float32."""
        if tower not in self._stages:
            st = self._vision_stages() if tower == "vision" else self._text_stages()
            self._stages[tower] = self.autocast_stages(st)
        return self._stages[tower]

    def _names_under(self, prefix: str) -> list[str]:
        return [n for n, _ in self.model.named_parameters() if n.startswith(prefix)]

    def _vision_stages(self) -> list[Stage]:
        vm, proj = self.model.vision_model, self.model.visual_projection

        def embeds(x, ctx):
            return vm.pre_layrnorm(vm.embeddings(x, interpolate_pos_encoding=False))

        stem = self._names_under("vision_model.embeddings.") + self._names_under("vision_model.pre_layrnorm.")
        stages = [Stage("vision_model.embeds", embeds, stem)]
        for i, layer in enumerate(vm.encoder.layers):
            stages.append(Stage(f"vision_model.encoder.layers.{i}", _vision_layer_fn(layer),
                                self._names_under(f"vision_model.encoder.layers.{i}.")))

        def head(x, ctx):
            return proj(vm.post_layernorm(x[:, 0, :]))

        stages.append(Stage("vision_model.head", head,
                            self._names_under("vision_model.post_layernorm.") + self._names_under("visual_projection")))
        return stages

    def _text_stages(self) -> list[Stage]:
        tm, proj = self.model.text_model, self.model.text_projection

        def embeds(tokens, ctx):
            return tm.embeddings(input_ids=tokens.view(-1, tokens.shape[-1]))

        stages = [Stage("text_model.embeds", embeds, self._names_under("text_model.embeddings."))]
        for i, layer in enumerate(tm.encoder.layers):
            stages.append(Stage(f"text_model.encoder.layers.{i}", self._text_layer_fn(layer),
                                self._names_under(f"text_model.encoder.layers.{i}.")))

        def head(x, tokens):
            x = tm.final_layer_norm(x)
            pooled = x[torch.arange(x.shape[0], device=x.device), self.eos_index(tokens).to(x.device)]
            return proj(pooled)

        stages.append(Stage("text_model.head", head,
                            self._names_under("text_model.final_layer_norm.") + self._names_under("text_projection")))
        return stages

    def _text_layer_fn(self, layer):
        tm = self.model.text_model

        def fn(x, tokens):
            mask = _causal_mask(tm.config, x, self.attention_mask(tokens).to(x.device))
            return layer(x, mask, is_causal=True)

        return fn


def _vision_layer_fn(layer):
    return lambda x, ctx: layer(x, None)


def _causal_mask(config, x: torch.Tensor, attention_mask: torch.Tensor):
    """The causal+padding mask ``CLIPTextModel.forward`` builds (transformers 5 ``create_causal_mask``; the 4.x
    encoder layers take a different signature and are not supported)."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=config, inputs_embeds=x, attention_mask=attention_mask, past_key_values=None)


def embedded_hf_adapter(model_dir=None, label: str | None = None):
    """The embedded CLIP as an :class:`HFClipAdapter` (exact conversion; the shipped ``preprocess_cfg``): what
    ``--model embedded --family hf_clip`` loads, and the CLIP of the text-to-image, VLM and canvas demos. With
    ``model_dir``: the world CLIP in that folder (a VLM's own ``clip/``), its patches naming ``label``."""
    import json

    from transformers import CLIPImageProcessor

    from .convert import embedded_hf_clip
    from .open_clip import EMBEDDED_DIR

    hf, tok, _ = embedded_hf_clip(model_dir)
    folder = Path(model_dir) if model_dir is not None else Path(EMBEDDED_DIR)
    pre = json.loads((folder / "open_clip_config.json").read_text())["preprocess_cfg"]
    proc = CLIPImageProcessor(size={"shortest_edge": pre["size"]}, crop_size={"height": pre["size"],
                              "width": pre["size"]}, image_mean=list(pre["mean"]), image_std=list(pre["std"]))
    return HFClipAdapter(hf, tok, proc, {"family": "hf_clip", "model": label or EMBEDDED_HF_LABEL, "pretrained": None})


EMBEDDED_HF_LABEL = "embedded (converted to transformers)"  # the patches of those demos name their base model so
EMBEDDED_HF_IDS = ("embedded", "embedded-hf", EMBEDDED_HF_LABEL)  # --model values that load it with --family hf_clip
