"""Scoring shared by the probes: zero-shot classifiers whose class prompts a probe may replace, and top-k hits.

A classifier is built as in :mod:`slugkit.eval.zeroshot` (spec §1.4): each class's prompts are embedded,
L2-normalised, averaged and renormalised; logits = 100 · f_img · W. A probe changes **only the concept's class**
(its prompts: another template, a name variant, an adversarial prompt) and keeps every other class as the run
scored it, so a hit means the variant brings the concept back against the same competitors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..eval.zeroshot import _batched, topk_hits


@torch.no_grad()
def text_features(adapter, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """``[len(prompts), D]`` float32 CPU, L2-normalised (batched as :mod:`slugkit.eval.zeroshot` does)."""
    return _batched(lambda x, c: adapter.encode_text(x).float(), adapter.tokenize(prompts), batch_size,
                    device=adapter.device, out_device="cpu")


@torch.no_grad()
def image_features(adapter, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``[N, D]`` float32 CPU, L2-normalised, for preprocessed images ``[N, C, H, W]``."""
    return _batched(lambda x, c: adapter.encode_image(x).float(), images, batch_size, device=adapter.device,
                    out_device="cpu")


def class_weights(adapter, class_prompts: list[list[str]]) -> torch.Tensor:
    """``[D, C]`` zero-shot classifier: for class c, the renormalised mean of its prompts' features."""
    flat = [p for ps in class_prompts for p in ps]
    feats = text_features(adapter, flat)
    cols, k = [], 0
    for ps in class_prompts:
        cols.append(F.normalize(feats[k:k + len(ps)].mean(0), dim=-1))
        k += len(ps)
    return torch.stack(cols, dim=1)


def name_prompts(names: list[str], templates: list[str]) -> list[list[str]]:
    return [[t.format(n) for t in templates] for n in names]


def hit_rates(feats: torch.Tensor, weights: torch.Tensor, label: int) -> dict:
    """``{"top1", "top5"}``: share of the images (``feats`` ``[N, D]``) whose top-1 / top-5 class is ``label``."""
    logits = 100.0 * feats @ weights
    labels = torch.full((feats.shape[0],), label, dtype=torch.long)
    return {"top1": topk_hits(logits, labels, 1).float().mean().item(),
            "top5": topk_hits(logits, labels, 5).float().mean().item()}
