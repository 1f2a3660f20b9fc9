"""Worst-case collateral: per-concept damage to everything that is not the forget concept, its worst case, and the
target's nearest neighbours (issue 12).

A mean over 59 other identities (or 29 other objects) hides where an edit's damage concentrates: on the concepts
nearest to the one removed. Every report therefore gives, next to the mean,

* ``per_concept``: each other concept's accuracy before and after and its drop (fractions; drop = before − after);
* ``worst``: the concept with the largest drop (ties → the first in name order) and its numbers;
* ``neighbours``: the ``k`` concepts nearest the target by the **model's own text embedding** (cosine similarity of
  the zero-shot class embeddings: each class's prompts embedded, L2-normalised, averaged over templates,
  renormalised — the classifier of :mod:`slugkit.eval.zeroshot`), with their before/after. ``k`` defaults to
  :data:`NEIGHBOURS_K` = 5; with several targets (joint unlearning) a concept's similarity is its largest to any
  target.

The accuracy is top-1 zero-shot over the full name list for CLIP runs and the judge's recognition of generated
images for text-to-image runs; the record does not care which (``metric`` names it).
"""

from __future__ import annotations

import torch

NEIGHBOURS_K = 5


def nearest_concepts(class_embeddings: torch.Tensor, names: list[str], targets: list[int], k: int = NEIGHBOURS_K,
                     exclude: set[str] | None = None) -> list[tuple[str, float]]:
    """The ``k`` concepts most similar to the targets, most similar first: ``[(name, cosine), ...]``.

    ``class_embeddings``: C x D (one row per entry of ``names``; normalised or not — rows are normalised here).
    ``targets``: indices into ``names``. ``exclude``: names never returned (besides the targets). Ties → name order.
    Raises ``ValueError`` when the shapes disagree or ``k`` < 0."""
    if class_embeddings.ndim != 2 or class_embeddings.shape[0] != len(names):
        raise ValueError(f"class embeddings of shape {tuple(class_embeddings.shape)} do not match {len(names)} names")
    if k < 0:
        raise ValueError(f"the number of neighbours must be >= 0, not {k}")
    e = torch.nn.functional.normalize(class_embeddings.detach().float().cpu(), dim=-1)
    sims = (e @ e[list(targets)].T).max(dim=1).values
    skip = {names[t] for t in targets} | set(exclude or ())
    ranked = sorted((i for i in range(len(names)) if names[i] not in skip), key=lambda i: (-float(sims[i]), names[i]))
    return [(names[i], float(sims[i])) for i in ranked[:k]]


def worst_drop(before: dict[str, float], after: dict[str, float]) -> tuple[str | None, float]:
    """``(concept, drop)`` of the largest before − after over the concepts in both dicts (``(None, 0.0)`` when none;
    ties → the first in name order)."""
    common = sorted(set(before) & set(after))
    if not common:
        return None, 0.0
    name = common[0]
    for c in common[1:]:  # strict >: the first in name order wins a tie
        if before[c] - after[c] > before[name] - after[name]:
            name = c
    return name, float(before[name] - after[name])


def collateral_record(before: dict[str, float], after: dict[str, float], neighbours: list[tuple[str, float]],
                      metric: str, k: int = NEIGHBOURS_K, similarity: str = "text embedding cosine") -> dict:
    """The JSON record of the damage to the other concepts: mean, worst, per concept, nearest neighbours.

    ``before`` / ``after``: ``{concept: accuracy}`` (fractions) over the same other concepts. Raises ``ValueError``
    when they name different concepts (a silent mismatch would hide a concept's damage)."""
    if set(before) != set(after):
        raise ValueError(f"per-concept accuracies before/after cover different concepts: "
                         f"{sorted(set(before) ^ set(after))[:5]}")
    per = {c: {"before": float(before[c]), "after": float(after[c]), "drop": float(before[c] - after[c])}
           for c in sorted(before)}
    n = len(per)
    mean_b = sum(v["before"] for v in per.values()) / n if n else None
    mean_a = sum(v["after"] for v in per.values()) / n if n else None
    name, drop = worst_drop(before, after)
    return {
        "metric": metric,
        "concepts": n,
        "mean_before": mean_b,
        "mean_after": mean_a,
        "mean_drop": (mean_b - mean_a) if n else None,
        "worst": {"concept": name, **per[name]} if name is not None else None,
        "neighbours": {"k": k, "similarity": similarity,
                       "concepts": [{"concept": c, "similarity": s, **per[c]} for c, s in neighbours if c in per]},
        "per_concept": per,
    }
