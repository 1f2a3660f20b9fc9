"""Training the embedded VLM (:mod:`slugkit.world.vlm`): ``slug world train-vlm``.

Only the projector and the language model learn; the vision tower (the embedded CLIP's) is frozen, so its features
at ``vision_feature_layer`` are computed once for every training image and the training step runs
projector -> Llama on them (the same computation ``LlavaForConditionalGeneration.forward`` does with pixel values;
``tests/world/test_vlm.py`` checks the two agree). Loss: next-token cross-entropy on the answer tokens only.

Data (the world's ``train`` split, which the embedded CLIP was trained on; validation and test images come from the
``val`` / ``test`` splits): ``per_identity`` images of each of the 60 identities, each asked every question of
:data:`~slugkit.world.vlm.TRAIN_NAME_QUESTIONS` (answer: the full name), and ``per_class`` images of each of the 30
object classes, each asked the three utility questions. Seeded, fixed thread count: a rerun is bit-identical.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import render as world
from . import vlm


@dataclass(frozen=True)
class VLMConfig:
    per_identity: int = 40
    per_class: int = 40
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    seed: int = 0
    threads: int = 1
    feature_noise: float = 0.0  # std of gaussian noise added to the tower features, in units of each channel's std
    feature_layer: int = -2  # LLaVA's vision_feature_layer (LLaVA-1.5: -2)
    clip: str | None = None  # a `slug world train` folder whose image tower the VLM reads (None: the embedded CLIP)


def _lr(step: int, cfg: VLMConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


@torch.no_grad()
def tower_features(llava, processor, images, batch_size: int = 256) -> torch.Tensor:
    """``[N, 16, 64]``: the frozen vision tower's ``hidden_states[vision_feature_layer]`` without CLS — what the
    projector reads — for PIL ``images``."""
    out = []
    layer = llava.config.vision_feature_layer
    for i in range(0, len(images), batch_size):
        px = processor.image_processor(images=list(images[i:i + batch_size]), return_tensors="pt")["pixel_values"]
        hs = llava.model.vision_tower(px, output_hidden_states=True).hidden_states[layer]
        out.append(hs[:, 1:])
    return torch.cat(out)


def qa_ids(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt ids, answer ids)``: the LLaVA-1.5 prompt for ``question`` with ``<image>`` expanded to the image
    tokens (``<s>`` first), and `` answer`` + ``</s>``."""
    p = tokenizer(vlm.PROMPT.format(question=question).replace("<image>", "<image>" * vlm.IMAGE_TOKENS))["input_ids"]
    return p, tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def examples(tokenizer, per_identity: int, per_class: int, split: str = "train"):
    """``(images, items)``: PIL images of ``split`` and ``(image_index, prompt_ids, answer_ids)`` items in a fixed
    order — every name question for each identity image, every utility question for each object image."""
    def ids(question: str, answer: str):
        return qa_ids(tokenizer, question, answer)

    images, items = [], []
    for s in world.make_samples(split, "identity", per_identity):
        images.append(s.image)
        items += [(len(images) - 1, *ids(q, s.class_name)) for q in vlm.TRAIN_NAME_QUESTIONS]
    for s in world.make_samples(split, "utility", per_class):
        images.append(s.image)
        ans = vlm.utility_answers(world.UTILITY_CLASSES[s.label])
        items += [(len(images) - 1, *ids(q, ans[k])) for k, q in vlm.UTILITY_QUESTIONS.items()]
    return images, items


def name_probability(llava, processor, images, name: str, batch_size: int = 64) -> list[float]:
    """The VLM's probability of answering :data:`~slugkit.world.vlm.NAME_QUESTION` about each PIL image with
    ``name`` or its last name (what :func:`slugkit.integrations.llava.name_match` counts): for each, the product of
    its token probabilities under teacher forcing, the end-of-answer token excluded (prompt and answer tokens as
    :func:`qa_ids` builds them for training); the two summed, at most 1. The search's margin below greedy naming
    (``slug demo --target vlm --vlm-name-prob``): an image the VLM does not name may still give the name nearly as
    much as its answer, and an unseen one like it name it. Returns ``[float]`` in [0, 1], one per image."""
    tok = processor.tokenizer
    words = name.split()
    answers = [" ".join(words)] + ([words[-1]] if len(words) > 1 else [])  # name_match: full or last name
    out = [0.0] * len(images)
    for said in answers:
        prompt, answer = qa_ids(tok, vlm.NAME_QUESTION, said)
        answer = answer[:-1]  # the name alone: a longer answer that starts with it names the person too
        for i in range(0, len(images), batch_size):
            chunk = list(images[i:i + batch_size])
            ids, mask, labels, _ = _batch([(k, prompt, answer) for k in range(len(chunk))], tok.pad_token_id)
            px = processor.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                logits = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits
            for k, v in enumerate(answer_log_prob(logits[:, :-1], labels).exp()):
                out[i + k] = min(1.0, out[i + k] + float(v))
    return out


def answer_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]``: the summed log-probability of each row's answer tokens under teacher forcing. ``logits`` ``[B, T-1,
    vocab]`` predict tokens ``1..T-1`` (:func:`next_token_logits`, or a LLaVA forward's logits without the last
    position); ``labels`` ``[B, T]`` hold the answer ids and -100 elsewhere (:func:`_batch`). Differentiable in
    ``logits``; computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    tgt = labels[:, 1:]
    return (logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (tgt != -100)).sum(1)


def _batch(items, pad: int):
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100 outside the answers) and image indices."""
    n = max(len(p) + len(a) for _, p, a in items)
    ids = torch.full((len(items), n), pad)
    labels = torch.full((len(items), n), -100)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for r, (_, p, a) in enumerate(items):
        seq = p + a
        ids[r, :len(seq)] = torch.tensor(seq)
        labels[r, len(p):len(seq)] = torch.tensor(a)
        mask[r, :len(seq)] = 1
    return ids, mask, labels, torch.tensor([i for i, _, _ in items])


def next_token_logits(llava, feats: torch.Tensor, ids, mask) -> torch.Tensor:
    """``[B, T-1, vocab]``: the logits predicting tokens ``1..T-1`` of ``ids`` ``[B, T]`` with image features
    ``feats`` ``[B, 16, 64]`` in the image-token positions: projector -> embeddings (``masked_scatter`` as
    ``LlavaModel``) -> Llama -> tied head. Differentiable in ``feats``."""
    emb = llava.get_input_embeddings()(ids)
    img = llava.model.multi_modal_projector(feats).to(emb.dtype)
    where = (ids == llava.config.image_token_id).unsqueeze(-1).expand_as(emb)
    emb = emb.masked_scatter(where, img.reshape(-1))
    h = llava.model.language_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    return llava.lm_head(h[:, :-1])


def lm_loss(llava, feats: torch.Tensor, ids, mask, labels) -> torch.Tensor:
    """Next-token cross-entropy of the answers (``labels`` ``[B, T]``, -100 outside them) with image features
    ``feats`` ``[B, 16, 64]`` (:func:`next_token_logits`)."""
    logits = next_token_logits(llava, feats, ids, mask)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def train_vlm(cfg: VLMConfig = VLMConfig(), progress: bool = True) -> tuple[object, object, dict]:
    """Train the projector and LM; returns ``(llava, processor, info)``. Deterministic for a fixed config (thread
    count included)."""
    from tqdm.auto import tqdm

    from .train import _num_threads

    with _num_threads(cfg.threads):
        t0 = time.perf_counter()
        tok = vlm.build_tokenizer()
        processor = vlm.build_processor(tok)
        llava, _ = vlm.build_vlm(tok, cfg.hidden, cfg.layers, cfg.heads, cfg.seed, cfg.feature_layer, cfg.clip)
        images, items = examples(tok, cfg.per_identity, cfg.per_class)
        feats = tower_features(llava, processor, images)
        fstd = feats.reshape(-1, feats.shape[-1]).std(0)
        t_data = time.perf_counter() - t0
        params = [p for p in llava.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        order, pos, losses = torch.randperm(len(items), generator=gen), 0, []
        llava.train()
        t1 = time.perf_counter()
        for step in tqdm(range(cfg.steps), desc="training the embedded VLM", disable=not progress):
            if pos + cfg.batch_size > len(order):
                order, pos = torch.randperm(len(items), generator=gen), 0
            batch = [items[i] for i in order[pos:pos + cfg.batch_size].tolist()]
            pos += cfg.batch_size
            ids, mask, labels, img = _batch(batch, tok.pad_token_id)
            for g in opt.param_groups:
                g["lr"] = _lr(step, cfg)
            f = feats[img]
            if cfg.feature_noise:
                f = f + cfg.feature_noise * fstd * torch.randn(f.shape, generator=gen)
            loss = lm_loss(llava, f, ids, mask, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
        llava.eval()
        info = {"steps_done": cfg.steps, "train_items": len(items), "train_images": len(images),
                "final_loss": sum(losses[-50:]) / len(losses[-50:]), "data_s": round(t_data, 1),
                "train_s": round(time.perf_counter() - t1, 1), "params": sum(p.numel() for p in llava.parameters()),
                "trained_params": sum(p.numel() for p in params)}
    return llava, processor, info


def evaluate_vlm(llava, processor, per_identity: int = 20, per_class: int = 20, split: str = "test") -> dict:
    """Naming accuracy over every identity and utility accuracy per question kind on ``split`` images
    (:func:`slugkit.world.vlm.vlm_scores`), with the worst identity."""
    s = vlm.vlm_scores(llava, processor, vlm.identity_images(split, per_identity), vlm.utility_images(split, per_class))
    worst = min(s["named"], key=s["named"].get)
    return {"split": split, "per_identity_images": per_identity, "per_class_images": per_class,
            "named": sum(s["named"].values()) / len(s["named"]),
            "worst_identity": {"name": worst, "named": s["named"][worst]},
            "utility_accuracy": s["utility_accuracy"], "utility_per_kind": s["utility_per_kind"],
            "per_identity": s["named"], "utility_per_class": s["utility_per_class"]}


def write_vlm(out: str | Path, llava, processor, cfg: VLMConfig, info: dict, overwrite: bool = False,
              progress: bool = True) -> Path:
    """``out`` (atomically): ``config.json`` + ``model.safetensors`` + ``generation_config.json`` (save_pretrained),
    the processor's files (tokenizer, image processor, chat template) and ``train_report.json``. ``progress=False``
    also silences transformers' "Writing model shards" bar (``--no-progress`` printed it)."""
    from transformers.utils import logging as hf_logging

    from ..common.files import atomic_dir

    out = Path(out)
    was = hf_logging.is_progress_bar_enabled()
    with atomic_dir(out, overwrite, marker="train_report.json") as tmp:
        if not progress:
            hf_logging.disable_progress_bar()
        try:
            llava.save_pretrained(tmp)
        finally:
            if was:
                hf_logging.enable_progress_bar()
        processor.save_pretrained(tmp)
        if cfg.clip:  # the CLIP whose tower it holds goes with it: SLUG runs on that CLIP (vlm.vlm_clip_dir)
            (tmp / vlm.CLIP_SUBDIR).mkdir()
            for name in ("open_clip_config.json", "open_clip_model.safetensors", "train_report.json"):
                if (Path(cfg.clip) / name).is_file():
                    shutil.copyfile(Path(cfg.clip) / name, tmp / vlm.CLIP_SUBDIR / name)
        report = {"train": asdict(cfg), "info": info,
                  "versions": {"torch": torch.__version__, "python": platform.python_version()}}
        (tmp / "train_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return out


def check_world_clip(clip) -> None:
    """``--clip DIR`` of ``slug world train-vlm``: a folder ``slug world train --out DIR`` wrote (open_clip config and
    weights of the world's CLIP architecture, 32-px images, patch 8, width 64). Raises ``ValueError`` naming it."""
    d = Path(clip)
    if not d.is_dir():
        raise ValueError(f"--clip {clip}: {'is a file' if d.exists() else 'no such folder'}; give the folder "
                         "`slug world train --out DIR` wrote")
    missing = [n for n in ("open_clip_config.json", "open_clip_model.safetensors") if not (d / n).is_file()]
    if missing:
        raise ValueError(f"--clip {clip}: no {' or '.join(missing)} in it; give the folder `slug world train --out "
                         "DIR` wrote")
    try:
        vis = json.loads((d / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--clip {clip}: its open_clip_config.json is not a CLIP's ({type(e).__name__}: {e}); give "
                         "the folder `slug world train --out DIR` wrote") from None
    if (vis.get("image_size"), vis.get("patch_size"), vis.get("width")) != (world.IMAGE_SIZE, 8, 64):
        raise ValueError(f"--clip {clip}: its image tower ({vis.get('image_size')} px, patch {vis.get('patch_size')}, "
                         f"width {vis.get('width')}) is not the world's (32 px, patch 8, width 64) the VLM is built on")
    from ..models.base import ModelLoadError
    from ..models.open_clip import OpenClipAdapter

    try:  # a config the weights do not fit printed open_clip's missing-keys dump and advice for other commands
        OpenClipAdapter.load(f"local-dir:{d.resolve()}")
    except (ModelLoadError, RuntimeError, OSError, ValueError) as e:
        said = " ".join(str(e).split())
        raise ValueError(f"--clip {clip}: open_clip could not load it ({said[:200]}{' …' if len(said) > 200 else ''})"
                         "; give the folder `slug world train --out DIR` wrote, unchanged") from None


def train_embedded_vlm(out: str | Path, cfg: VLMConfig = VLMConfig(), eval_images: int = 20, overwrite: bool = False,
                       progress: bool = True) -> dict:
    """``slug world train-vlm``: train (:func:`train_vlm`), evaluate on ``eval_images`` test images per identity and
    per object class (:func:`evaluate_vlm`, in the report) and write ``out`` (:func:`write_vlm`). Returns the
    report's ``info``."""
    from ..common.outguard import check_model_out
    from .train import _num_threads

    if isinstance(eval_images, bool) or not isinstance(eval_images, int) or not 0 <= eval_images <= 50:
        raise ValueError(f"--eval-images: must be in [0, 50] (the test split's images per identity), got "
                         f"{eval_images!r}")  # 100000 was accepted and ran out of memory after the training (trial 35)
    check_model_out(out, overwrite, "train_report.json", "processor_config.json")  # before training: none wasted
    if cfg.clip is not None:
        check_world_clip(cfg.clip)
    llava, processor, info = train_vlm(cfg, progress=progress)
    if eval_images:
        with _num_threads(cfg.threads):
            info["eval"] = evaluate_vlm(llava, processor, eval_images, eval_images)
    write_vlm(out, llava, processor, cfg, info, overwrite=overwrite, progress=progress)
    return info
