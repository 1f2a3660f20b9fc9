"""The audits of the embedded downstream models' patches, from a patch: a ``slug demo --target sd`` patch of the
text-to-image pipeline's text encoder (:mod:`slugkit.audit.t2i`) and a ``slug demo --target vlm`` patch of the VLM's
vision tower (:mod:`slugkit.audit.vlm`). ``slug audit`` and :func:`slugkit.audit.audit_patch` both come here for such
a patch (``audit_patch`` audited it as a CLIP patch: "the model has no tensor named …", or "unknown identity 'red
triangle'"; trial 29).
"""

from __future__ import annotations

import copy
from pathlib import Path


def patch_kind(patch) -> str:
    """``"VLM"`` for a patch of the embedded VLM's vision tower (``extra.target = "vlm"``), ``"text-to-image"`` for
    one of the embedded text-to-image pipeline's text encoder (an ``hf_clip`` patch of one of its concepts), else
    ``"CLIP"``. ``patch``: a :class:`~slugkit.patch.Patch`."""
    from ..world import t2i

    meta = patch.meta
    if (meta.get("extra") or {}).get("target") == "vlm":
        return "VLM"
    if meta.get("adapter") == "hf_clip" and meta.get("concept") in t2i.concept_names():
        return "text-to-image"
    return "CLIP"


def audit_vlm_patch(patch, patch_label: str, out=None, *, probes, gate_representation: bool = False,
                    progress: bool = True) -> dict:
    """The VLM audit of ``patch`` (a :class:`~slugkit.patch.Patch`) on the VLM it was judged on: the shipped one, or
    the folder recorded in its ``extra.vlm_model`` (a gone folder raises
    :class:`~slugkit.common.errors.ModelLoadError` naming it); ``patch_label`` is what the record calls it."""
    from ..common.errors import ModelLoadError
    from ..integrations.llava import apply_patch_to_llava
    from ..world.vlm import load_vlm
    from .vlm import NOT_RUN, PROBES, run_vlm_audit

    where = (patch.meta.get("extra") or {}).get("vlm_model")
    if where and not Path(where).is_dir():  # it blamed --vlm-model, an option audit has not (trial 27)
        raise ModelLoadError(f"the VLM this patch was judged on, {where} (patch.json extra.vlm_model), is gone; put "
                             "that folder back where it was to audit the patch on it")
    llava, processor = load_vlm(where)
    after = apply_patch_to_llava(copy.deepcopy(llava), patch)
    return run_vlm_audit(llava, after, processor, patch.meta["concept"],
                         probes=[x for x in probes if x in PROBES or x in NOT_RUN],
                         gate_representation=gate_representation, progress=progress, out=out,
                         meta={"patch": patch_label, "model": f"VLM (LLaVA) {where}" if where else
                               "embedded VLM (LLaVA)", "method": patch.meta.get("method"), "layers": patch.names})


def audit_t2i_patch(patch, patch_label: str, out=None, *, probes, attack=None, n_images: int = 10,
                    gen_steps: int = 20, progress: bool = True, t2i_dir=None) -> dict:
    """The text-to-image audit of ``patch`` on the embedded pipeline (``t2i_dir``: another ``slug world train-t2i``
    folder): ``n_images`` images per prompt at ``gen_steps`` DDIM steps, the attack with ``attack``'s iterations,
    candidates and tokens (at most 6; an :class:`~slugkit.audit.AttackBudget`, default 40, 64, 6)."""
    from dataclasses import replace

    from ..models.hf_clip import embedded_hf_adapter
    from ..world import t2i
    from .t2i import T2IAuditBudget, patched_pipeline, run_t2i_audit

    adapter = embedded_hf_adapter()
    pipe = t2i.EmbeddedT2IPipeline.load(t2i_dir, clip=(adapter.model, adapter.tokenizer))
    budget = T2IAuditBudget(n_images=n_images, gen_steps=gen_steps)
    if attack is not None:
        it = attack.iterations
        budget = replace(budget, checkpoints=tuple(sorted({0, it // 8, it // 4, it // 2, it})),
                         attack=replace(budget.attack, iterations=it, candidates=attack.candidates,
                                        n_tokens=min(attack.n_tokens, 6)))
    return run_t2i_audit(pipe, patched_pipeline(pipe, patch), t2i.ConceptJudge(), patch.meta["concept"],
                         probes=probes, budget=budget, progress=progress, out=out,
                         meta={"patch": patch_label, "model": "embedded text-to-image",
                               "method": patch.meta.get("method"), "layers": patch.names})
