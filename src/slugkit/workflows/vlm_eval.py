"""The embedded VLM's scores as ``slug demo --target vlm`` records them (:mod:`slugkit.workflows.vlm_demo`): one
scoring's metrics, the test-split scores before and after a patch applied through the LLaVA integration, and the
identities nearest the targets (the look-alikes the search bounds and the report names)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..world import render as world
from ..world import vlm


def vlm_metrics(scores: dict, targets: list[str]) -> dict:
    """The demo's record of one scoring (:func:`slugkit.world.vlm.vlm_scores`' ``scores``): the targets' naming
    accuracy (mean and per target), the other identities' mean, utility accuracy, per identity and per class; all
    fractions in [0, 1] (``other_named`` None when every identity is a target)."""
    named = scores["named"]
    others = {n: v for n, v in named.items() if n not in targets}
    return {"target_named": sum(named[t] for t in targets) / len(targets),
            "target_named_by_concept": {t: named[t] for t in targets},
            "other_named": sum(others.values()) / len(others) if others else None,
            "utility_accuracy": scores.get("utility_accuracy"), "utility_per_kind": scores.get("utility_per_kind"),
            "per_identity": named, "utility_per_class": scores.get("utility_per_class")}


def scored_before_after(llava, processor, patch_dir: Path, targets, n_target, n_other, n_utility):
    """Test-split scores of the VLM without and with the patch (applied in place through the LLaVA integration,
    reverted bit-exactly after); the sample answers for the report."""
    from ..integrations.llava import apply_patch_to_llava, revert_patch_from_llava
    from ..patch import load_patch, tensor_sha256

    named = vlm.identity_images("test", n_other)
    named.update(vlm.identity_images("test", n_target, targets))
    util = vlm.utility_images("test", n_utility)
    b = vlm.vlm_scores(llava, processor, named, util, answers=True)
    patch = load_patch(patch_dir)
    before_hash = {n: tensor_sha256(p) for n, p in llava.named_parameters()}
    apply_patch_to_llava(llava, patch)
    try:
        a = vlm.vlm_scores(llava, processor, named, util, answers=True)
    finally:
        revert_patch_from_llava(llava, patch)
    if {n: tensor_sha256(p) for n, p in llava.named_parameters()} != before_hash:
        raise RuntimeError("revert did not restore the VLM's vision tower bit-exactly")
    rec = {"before": vlm_metrics(b, targets), "after": vlm_metrics(a, targets),
           "images": {"target": n_target, "per_other_identity": n_other, "utility_per_class": n_utility,
                      "split": "test", "question": vlm.NAME_QUESTION, "utility_questions": vlm.UTILITY_QUESTIONS}}
    return rec, {"before": b["answers"], "after": a["answers"]}


def text_neighbours(adapter, targets: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` identities nearest the targets by the CLIP text embedding (identity templates averaged, cosine;
    :func:`slugkit.eval.collateral.nearest_concepts`), ``[(name, cosine)]`` nearest first."""
    from ..eval.collateral import nearest_concepts

    names = world.identity_names()
    with torch.no_grad():
        emb = torch.stack([torch.nn.functional.normalize(adapter.encode_text(adapter.tokenize(
            [t.format(n) for t in world.IDENTITY_EVAL_TEMPLATES])), dim=-1).mean(0) for n in names])
    return nearest_concepts(torch.nn.functional.normalize(emb, dim=-1), names, [names.index(t) for t in targets], k)
