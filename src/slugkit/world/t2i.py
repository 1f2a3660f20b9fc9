"""The embedded text-to-image model: a tiny pixel-space diffusion model conditioned on the embedded CLIP's text tower.

It stands in for Stable Diffusion so that SD unlearning is *real* offline: the same relation SD has to CLIP.

* **Text encoder**: the embedded open_clip CLIP's text tower, converted exactly to a ``transformers.CLIPTextModel``
  (:mod:`slugkit.models.convert`) and **frozen**. The UNet reads all token states of ``last_hidden_state`` (pads
  included, padded with ``<|endoftext|>``) through cross-attention, exactly as SD 1.x does; ``text_projection`` is
  not consumed. A SLUG patch computed on the HF CLIP applies to this pipeline's ``text_encoder`` with the same
  :func:`slugkit.integrations.diffusers_sd.apply_patch_to_pipeline` call a user makes on SD.
* **Concepts**: the world's 30 object classes (colour x shape), not the 60 identities: an identity is five
  attributes at once (colour, shape, pattern, border, tint) and a ~1 M-parameter UNet trained for tens of minutes
  on 2 CPU cores cannot draw all of them reliably; colour x shape it can. The generator is trained on the classes'
  *plain* renders (no stripes/dots/outline; random tint, size, colour jitter and noise as in the world), which
  the embedded CLIP (trained on every variant) recognises as well as the others.
* **UNet**: diffusers ``UNet2DConditionModel`` in pixel space (32x32x3), channels (16, 32, 64), cross-attention at
  the 8x8 level (down and up): 0.99 M parameters, 0.6 s per training step of 64 on one core (cross-attention at
  16x16 as well, the prototype's layout, cost 1.1 s per step; its quality was not compared).
* **Training images**: near-centred plain renders (see :func:`render_plain`); the judge sees them as in-distribution
  (the world's images put shapes anywhere, the centre included).
* **Training** (``slug world train-t2i``): DDPM, cosine schedule, epsilon prediction with min-SNR-5 loss weighting
  (faster convergence), AdamW + warm-up + cosine decay, EMA weights, 10% caption dropout (for classifier-free
  guidance) and **conditioning noise**: Gaussian noise of random relative size (up to ``cond_noise``) on the token
  states. t2i-notes.md found that a tiny UNet trained on a few hundred distinct conditioning tensors is far less
  tolerant of conditioning shifts than CLIP's zero-shot ranking; the noise teaches it to tolerate small shifts
  (what an edit does to *other* prompts) while large shifts (what it does to the forgotten concept) still matter.
  Seeded, fixed thread count: a rerun is bit-identical (tested on a short run; the shipped 3500-step, 45-minute run
  was not repeated).
* **Sampling**: DDIM (default 20 steps, eta 0) with classifier-free guidance 3. On the shipped model the embedded
  CLIP recognises 87% of generated images at guidance 3 (20 per class), 86% at 2 and 84% at 1.5 (6 per class), but
  only 33% at 5, the prototype's choice: it over-saturates the backgrounds. The null prompt ``""`` is encoded by the
  *current* (possibly patched) text encoder, as SD does. One seed per image: same seed, same image.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from slugkit.common.rng import keeps_torch_rng
from slugkit.world import render as world

T2I_DIR = Path(__file__).resolve().parent.parent / "assets" / "embedded_t2i"
UNET_FILE = "unet.safetensors"
CONFIG_FILE = "t2i_config.json"
CONTEXT_LENGTH = 20
DEFAULT_GUIDANCE = 3.0


@dataclass
class T2IConfig:
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    steps: int = 3500
    batch_size: int = 64
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    cond_noise: float = 0.2
    train_per_class: int = 400
    seed: int = 0
    threads: int = 1
    time_budget_s: float | None = None
    stop_at: int | None = None  # stop after this many steps (the LR schedule still spans ``steps``)

    def unet_kwargs(self, cross_dim: int) -> dict:
        return dict(
            sample_size=world.IMAGE_SIZE, in_channels=3, out_channels=3,
            block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_dim, attention_head_dim=self.attention_head_dim,
            norm_num_groups=self.norm_num_groups,
        )


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as e:  # pragma: no cover
        from slugkit.models.base import ModelLoadError

        raise ModelLoadError("diffusers is not installed; install the HF extra: pip install 'slugkit[hf]'") from e
    return diffusers


def make_scheduler(kind: str = "ddpm"):
    diffusers = _require_diffusers()
    kw = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
              clip_sample=True)
    if kind == "ddim":
        return diffusers.DDIMScheduler(**kw, set_alpha_to_one=True, steps_offset=1)
    return diffusers.DDPMScheduler(**kw)


# ----------------------------------------------------------------------------------------------------------------
# Concepts and prompts
# ----------------------------------------------------------------------------------------------------------------


def concept_names() -> list[str]:
    """The 30 object classes, e.g. ``"red circle"``."""
    return [c.name for c in world.UTILITY_CLASSES]


def concept_by_name(name: str) -> world.UtilityClass:
    low = name.strip().lower()
    for c in world.UTILITY_CLASSES:
        if c.name == low:
            return c
    import difflib

    close = difflib.get_close_matches(" ".join(low.split()), concept_names(), n=1, cutoff=0.8)
    try:  # an identity for the text-to-image demo: say where identities go (trial 38)
        person = f"{world.identity_by_name(low).name!r} is an identity: the CLIP demo (no --target) and --target vlm " \
                 "unlearn identities; "
    except KeyError:
        person = ""
    raise ValueError(f"unknown concept {name!r} for the embedded text-to-image model; {person}"
                     + (f"did you mean {close[0]!r}? " if close else "")
                     + f"choose one of: {', '.join(concept_names())}")


def concept_phrases(name: str) -> list[str]:
    """Every way the world's captions name object concept ``name``: the span of each caption template from its first
    placeholder to its last, filled in ("red triangle", "triangle that is red", "red thing shaped like a triangle")
    — the aliases a forget-caption check must accept."""
    c = concept_by_name(name)
    out = []
    for t in world.UTILITY_CAPTION_TEMPLATES:
        first = min(t.index("{colour}"), t.index("{shape}"))
        last = max(t.index("{colour}") + len("{colour}"), t.index("{shape}") + len("{shape}"))
        phrase = t[first:last].format(colour=c.colour, shape=c.shape)
        if phrase not in out:
            out.append(phrase)
    return out


def prompt_for(name: str, i: int) -> str:
    """The i-th prompt for concept ``name``: rotates over the world's 8 object caption templates."""
    c = concept_by_name(name)
    return world.utility_caption(c, i % len(world.UTILITY_CAPTION_TEMPLATES))


SPREAD = 0.25


def render_plain(cls: world.UtilityClass, rng: np.random.Generator):
    """A training image of ``cls`` for the generator: plain (no pattern, no outline), near the centre (offset x
    ``SPREAD``); random tint, size, colour jitter and pixel noise as in the world."""
    tint = world.TINTS[int(rng.integers(len(world.TINTS)))]
    return world._render(cls.colour, cls.shape, "plain", "none", tint, rng, spread=SPREAD)


# ----------------------------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------------------------


class EmbeddedT2IPipeline:
    """``text_encoder`` (HF ``CLIPTextModel``) + ``tokenizer`` + ``unet`` + DDIM sampler, in pixel space.

    Shaped like a diffusers ``StableDiffusionPipeline`` where it matters for patching: ``pipe.text_encoder`` is the
    tensor owner a SLUG text-tower patch edits in place.
    """

    def __init__(self, text_encoder, tokenizer, unet, scheduler=None):
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.unet = unet.eval()
        self.scheduler = scheduler or make_scheduler("ddim")

    @classmethod
    @keeps_torch_rng
    def load(cls, t2i_dir: str | os.PathLike | None = None, clip=None,
             files: tuple[str, str] = (CONFIG_FILE, UNET_FILE), hint: str | None = None) -> "EmbeddedT2IPipeline":
        """The shipped model (or ``t2i_dir``); ``clip``: an ``(hf CLIPModel, tokenizer)`` pair to take the text tower
        from (default: the embedded CLIP, converted). ``files``: the config and weight file names (the embedded
        canvas has its own); ``hint``: what to do, for the error naming a missing file."""
        diffusers = _require_diffusers()
        from safetensors.torch import load_file

        d = Path(t2i_dir) if t2i_dir else T2I_DIR
        if t2i_dir:
            from slugkit.models.base import check_model_folder

            check_model_folder(d, hint or "--t2i-model: give the folder `slug world train-t2i --out DIR` wrote")
        cfg_file, w_file = d / files[0], d / files[1]
        for f in (cfg_file, w_file):
            if not f.is_file():
                from slugkit.models.base import ModelLoadError

                default = (f"{d} is not a complete text-to-image model; write one with `slug world train-t2i --out "
                           "DIR` and pass it as --t2i-model DIR" if t2i_dir else  # "reinstall slugkit" (trial 40)
                           f"reinstall slugkit or run `slug world train-t2i --out {d}`")
                raise ModelLoadError(f"{f} is missing; {hint or default}")
        meta = json.loads(cfg_file.read_text())
        unet = diffusers.UNet2DConditionModel(**meta["unet"])
        unet.load_state_dict(load_file(str(w_file)))
        return pipeline_with_unet(unet, clip)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                              return_tensors="pt")["input_ids"]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[N, context, width]``: the text encoder's ``last_hidden_state`` (what the UNet cross-attends to)."""
        return self.text_encoder(input_ids=self.tokenize(prompts)).last_hidden_state

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 20, guidance: float = DEFAULT_GUIDANCE,
                 batch_size: int = 100, progress: bool = False) -> torch.Tensor:
        """uint8 images ``[N, 3, 32, 32]``, one per (prompt, seed); deterministic for the same inputs."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        from ..common.progress import vanishing_bar

        out = []
        null = self.encode_prompts([""])
        batches = range(0, len(prompts), batch_size)
        for lo in vanishing_bar(batches, desc="generating", disable=not progress):
            ps, ss = list(prompts[lo:lo + batch_size]), list(seeds[lo:lo + batch_size])
            cond = self.encode_prompts(ps)
            ctx = torch.cat([null.expand(len(ps), -1, -1), cond])
            x = torch.stack([torch.randn(3, world.IMAGE_SIZE, world.IMAGE_SIZE,
                                         generator=torch.Generator().manual_seed(int(s))) for s in ss])
            self.scheduler.set_timesteps(steps)
            for t in self.scheduler.timesteps:
                eps = self.unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
                e_u, e_c = eps.chunk(2)
                x = self.scheduler.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
        return torch.cat(out)

    def generate_images(self, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                        guidance: float | None = None) -> list:
        """PIL images, one per (prompt, seed): the call :func:`slugkit.data.generate.pipeline_images` makes on any
        pipeline that has this method (diffusers pipelines are called their own way). ``guidance=None``: the
        default scale."""
        from PIL import Image

        x = self(prompts, seeds, steps=steps) if guidance is None else self(prompts, seeds, steps=steps,
                                                                            guidance=guidance)
        return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in x]


def pipeline_with_unet(unet, clip=None) -> EmbeddedT2IPipeline:
    """A pipeline around ``unet`` with the embedded CLIP's text tower (or ``clip = (hf CLIPModel, tokenizer)``)."""
    from transformers import CLIPTextModel

    if clip is None:
        from slugkit.models.convert import embedded_hf_clip

        hf, tok, _ = embedded_hf_clip()
    else:
        hf, tok = clip
    te = CLIPTextModel(hf.config.text_config)
    te.load_state_dict(hf.text_model.state_dict())
    return EmbeddedT2IPipeline(te, tok, unet)


# ----------------------------------------------------------------------------------------------------------------
# Judge: the (unedited) embedded CLIP, zero-shot over the 30 concepts
# ----------------------------------------------------------------------------------------------------------------


def _judge_base():
    from slugkit.eval.generated import ZeroShotJudge

    return ZeroShotJudge


class ConceptJudge(_judge_base()):
    """Zero-shot top-1 over the 30 object classes by the (unedited) embedded CLIP; takes uint8 image tensors (the
    pipeline's output) or PIL images."""

    def __init__(self, clip_adapter=None):
        from slugkit.models.open_clip import OpenClipAdapter

        super().__init__(clip_adapter or OpenClipAdapter.load("embedded"), concept_names(),
                         world.UTILITY_EVAL_TEMPLATES)

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            from slugkit.world.train import normalise  # bit-identical to open_clip's eval transform at 32x32

            return self.adapter.encode_image(normalise(images))
        return super().features(images)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation of a pipeline: recognition of generated images per concept
# ----------------------------------------------------------------------------------------------------------------


def generation_plan(target: str | None, n_target: int, n_other: int, seed_base: int = 0) -> list[tuple[str, str, int]]:
    """``(concept, prompt, seed)`` triples: ``n_target`` for ``target`` and ``n_other`` for every other concept
    (every concept when ``target`` is None). Seeds are distinct per image and fixed."""
    plan = []
    for k, name in enumerate(concept_names()):
        n = n_target if name == target else n_other
        for i in range(n):
            plan.append((name, prompt_for(name, i), seed_base + 1000 * k + i))
    return plan


def recognition(pipe: EmbeddedT2IPipeline, judge: ConceptJudge, plan, steps: int = 20, guidance: float = DEFAULT_GUIDANCE,
                progress: bool = False) -> tuple[dict[str, float], torch.Tensor, list[str]]:
    """Per concept: the share of its generated images the judge classifies as that concept; plus images, preds."""
    from slugkit.eval.generated import recognised_share

    imgs = pipe([p for _, p, _ in plan], [s for _, _, s in plan], steps=steps, guidance=guidance, progress=progress)
    pred = judge.predict(imgs)
    return recognised_share(pred, [c for c, _, _ in plan]), imgs, pred
