"""The part of the labelled fine-tune fallbacks (``slug demo --target vlm --vlm-fallback finetune``,
``--target sd --sd-fallback finetune``; **not SLUG**) that does not depend on the downstream model: fine-tune the
candidate groups in turn, judge each exactly as the downstream search judges a SLUG step, keep the first accepted
as a step-1 edit. The optimisers are :mod:`slugkit.workflows.vlm_layer_ft` (the VLM's answers) and
:mod:`slugkit.workflows.sd_layer_ft` (the generator)."""

from __future__ import annotations

import contextlib

import torch

from ..common.progress import status

FINETUNE_METHOD = "layer-finetune"  # result.json's and the patch's "method" for such an edit


def try_finetunes(adapter, consumer, mapping: dict, groups: list[list[str]], optimise, evaluate, judge, rec: dict,
                  what: str, progress: bool = True) -> tuple:
    """Fine-tune each group of ``groups`` (lists of the CLIP's tensor names) in turn: ``optimise({consumer name:
    parameter})`` returns the optimiser's record (``delta``: consumer name → θ_ft − θ, ``relative_change``,
    ``final_loss``, ``train_s``, ``data``) with the consumer restored, and ``judge(1, evaluate(group, 1, g, 1,
    label="the fine-tuned values"))`` judges the edit θ − 1·g with ``g = −delta`` (``mapping``: CLIP name →
    ``consumer``'s name) as a SLUG step is judged: the target and the collateral both at the fine-tuned values.
    Every try's row (validation figures, relative change, losses, seconds) is appended to ``rec["tried"]``; the
    first accepted group's first tensor is ``rec["accepted"]``. Returns ``(chosen, g, rec)``: a
    :class:`~slugkit.slug.search.LayerSearch` with ``step_size`` 1 and ``g`` ``{CLIP name: −delta}`` (θ − 1·g is
    the fine-tuned value, what the patch stores), or ``(None, None, rec)`` when none is accepted."""
    from ..slug.search import LayerSearch

    params = dict(consumer.named_parameters())
    clip_params = dict(adapter.model.named_parameters())
    rec.setdefault("tried", [])
    for i, group in enumerate(groups, 1):
        try_ = f"fine-tune {i} of {len(groups)} (not SLUG)"  # each try's lines say which (each said "SLUG refused")
        status(f"SLUG refused: {try_}: {' + '.join(group)} on {what}" if i == 1 else
               f"{try_}, as fine-tune {i - 1} was not accepted: {' + '.join(group)} on {what}", progress)
        ft = optimise({mapping[n]: params[mapping[n]] for n in group})
        g = {n: -ft["delta"][mapping[n]] for n in group}
        row, forgot, harm = judge(1.0, evaluate(group, 1.0, g, 1.0, label="the fine-tuned values"))  # not "step 1"
        why = "; ".join(w for bad, w in ((not forgot, "the concept is still recognised"),
                                         (harm, "the collateral exceeds a budget (the figures above)")) if bad)
        status(f"  {try_}: " + ("accepted on the validation images" if row["accepted"] else f"not accepted: {why}"),
               progress)
        rec["tried"].append({"layer": group[0], "group": group, **row,
                             "relative_change": {n: ft["relative_change"][mapping[n]] for n in group},
                             "final_loss": ft["final_loss"], "train_s": ft["train_s"], "data": ft["data"]})
        if row["accepted"]:
            name = rec["accepted"] = group[0]
            tower = adapter.tower_of(name)
            ratio = float(clip_params[name].detach().float().norm()) / max(float(g[name].float().norm()), 1e-30)
            return LayerSearch(name, group, tower, ratio, depth=adapter.stage_index(tower, name), accepted_step=1.0,
                               step_size=1.0, val_metrics={}), g, rec
    return None, None, rec


def finetune_refusal(rec: dict, option: str) -> str:
    """The refusal's clause for a fallback that did not pass either (``rec``: :func:`try_finetunes`' record,
    ``option``: e.g. ``"--vlm-fallback finetune"``)."""
    from ..common.text import group_label
    from .gen_search import described

    rows = "; ".join(described(group_label(r), r) for r in rec["tried"]) or "no group to fine-tune"
    return f"; the one-layer fine-tune ({option}, step 1 = the fine-tuned values) did not pass either: {rows}"


def check_fallback(fallback: str | None, option: str = "fallback") -> None:
    """``ValueError`` unless ``fallback`` is None or ``"finetune"``. The fine-tune runs after every SLUG round
    ``max_layers`` allows has refused, on the unedited model (:func:`slugkit.workflows.rounds.generator_rounds`), so
    it never replaces an edit SLUG would make."""
    if fallback not in (None, "finetune"):
        raise ValueError(f"{option} must be None or 'finetune', got {fallback!r}")


@contextlib.contextmanager
def trained(params: dict, lr: float, frozen=()):
    """``params`` (``{name: parameter}``) made trainable under a fresh Adam (``lr``), the ``frozen`` parameters (an
    iterable; e.g. the rest of the model) not; yields ``(optimizer, saved values)``. On exit — also on an error or
    Ctrl-C — the values are restored bit for bit, their gradients dropped and every ``requires_grad`` flag put back,
    so the caller's model is the one it passed in."""
    frozen = [p for p in frozen if all(p is not q for q in params.values())]
    was = [(p, p.requires_grad) for p in [*params.values(), *frozen]]
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        for p in frozen:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        yield torch.optim.Adam(params.values(), lr=lr), saved
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
                p.grad = None
            for p, flag in was:
                p.requires_grad_(flag)


def displacement(params: dict, saved: dict) -> dict:
    """``{"delta": {name: θ_now − θ_saved} (CPU, the parameter's dtype), "relative_change": {name: ||delta|| /
    ||θ_saved||}}`` of an optimisation run inside :func:`trained`."""
    with torch.no_grad():
        delta = {n: (p.detach() - saved[n]).to("cpu", copy=True) for n, p in params.items()}
        return {"delta": delta, "relative_change": {n: float(d.float().norm() / saved[n].float().norm().clamp_min(
            1e-12)) for n, d in delta.items()}}
