"""Conditioning of the embedded text-to-image pipeline and the null-space step's helpers, for
:mod:`slugkit.workflows.sd_generator`: what the UNet reads (the text tower's token states), the relative shift an
edit causes, the prompts of a concept, the prompts the null-space step protects, the projected forget gradients and
their start steps (matched to the raw edit's effect on the target's conditioning), and the extra candidate groups of
``null_layers="all"``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..world import render as world
from ..world import t2i


@torch.no_grad()
def conditioning(adapter, prompts: list[str]) -> torch.Tensor:
    """What the pipeline consumes: the CLIP text tower's ``last_hidden_state`` for ``prompts`` (same tokens)."""
    from ..world.t2i import CONTEXT_LENGTH

    ids = adapter.tokenizer(list(prompts), padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                            return_tensors="pt")["input_ids"]
    return adapter.model.text_model(input_ids=ids).last_hidden_state


def per_prompt_shift(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``[P]``: per prompt ||ΔH||_F / ||H||_F over all token positions (``before``/``after``: ``[P, T, D]``)."""
    return (after - before).flatten(1).norm(dim=1) / before.flatten(1).norm(dim=1).clamp_min(1e-12)


def relative_shift(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean over prompts of :func:`per_prompt_shift`."""
    return float(per_prompt_shift(before, after).mean())


def concept_prompts(name: str) -> list[str]:
    """The prompts the pipeline is given for concept ``name``: one per world caption template (8)."""
    return [t2i.prompt_for(name, i) for i in range(len(world.UTILITY_CAPTION_TEMPLATES))]


def kept_prompts(target: str, identities: bool = False) -> list[str]:
    """The prompts whose layer inputs the null-space step protects: every other concept's 8 prompts, the empty
    prompt (classifier-free guidance encodes it with the edited encoder too) and, with ``identities``, the 60 world
    identities' 10 caption templates (the retain set's other half, which CLIP's utility metric reads). Not by
    default: the pipeline draws objects only, and protecting the 600 identity captions too left too little room —
    green circle and blue star, accepted without them, were refused with them (energy 0.99)."""
    kept = [p for n in t2i.concept_names() if n != target for p in concept_prompts(n)] + [""]
    if identities:
        kept += [world.identity_caption(i, k) for i in world.IDENTITIES
                 for k in range(len(world.IDENTITY_CAPTION_TEMPLATES))]
    return kept


def null_space_forget(adapter, grads, searches, target: str, energy: float,
                      identities: bool = False, extra=()) -> tuple[dict, dict]:
    """The searched layers' (and the ``extra`` groups') forget gradients projected onto the null space of their
    Linear inputs on the :func:`kept_prompts`, keeping the top principal directions holding ``energy`` of their
    second moment (:mod:`slugkit.slug.nullspace`). Returns ``(forget gradients with those groups replaced,
    per-tensor info)``."""
    from ..slug.nullspace import null_space_gradients

    names = sorted({n for s in searches if s.step_size is not None for n in s.group}
                   | {n for s in extra for n in s.group})
    kept = kept_prompts(target, identities)
    proj, info = null_space_gradients(adapter.model, grads.forget, names, lambda: conditioning(adapter, kept),
                                      energy=energy)
    return {**grads.forget, **proj}, info


def secant_log(f, goal: float, x0: float, iters: int = 4, tol: float = 0.01) -> float:
    """``x > 0`` with ``f(x) ≈ goal`` for an increasing ``f > 0`` that behaves like a power law: secant steps on
    ``log f`` against ``log x`` from ``x0`` (the first step assumes ``f ∝ x``; slopes clipped to [0.1, 5]), at most
    ``iters`` steps, stopping within a relative ``tol``. Returns the evaluated x whose ``f`` came closest."""
    lg = math.log(max(goal, 1e-12))
    xs = [math.log(x0)]
    fs = [math.log(max(f(x0), 1e-12))]
    for _ in range(iters):
        if abs(fs[-1] - lg) < tol:
            break
        slope = 1.0 if len(xs) < 2 or xs[-1] == xs[-2] else (fs[-1] - fs[-2]) / (xs[-1] - xs[-2])
        xs.append(xs[-1] + (lg - fs[-1]) / min(max(slope, 0.1), 5.0))
        fs.append(math.log(max(f(math.exp(xs[-1])), 1e-12)))
    return math.exp(xs[min(range(len(xs)), key=lambda i: abs(fs[i] - lg))])


# Which layers the null-space step may edit. "front": the CLIP Pareto layers that forgot on CLIP (the SLUG step's
# candidates). "all": every Linear group of the consumed text tower. Why (measured on "yellow cross", energy 0.999):
# the front held layer 0's v_proj/out_proj/fc1+fc2 and layer 1's q/k/v; at layer 0 every token of the target's
# prompts also occurs in some kept prompt ("yellow" in yellow square, "cross" in red cross), so the concept lives
# only in how tokens combine and the projected edit that still moves the target moves its worst neighbour nearly
# as much (worst-neighbour/target conditioning shift 0.78-0.97 at the matched start steps; with energy 0.99, on
# validation: yellow square lost 0.75, or yellow star 0.25 with the concept still at 0.10). The MLPs of layers 1-3
# (fc2 reads a 256-wide GELU feature) separate the combination: 0.02-0.05 at a target shift of 0.5, and
# layers.1.mlp forgot the concept on validation (20 images) with no drop of any other concept.
NULL_LAYERS = ("front", "all")
EXTRA_SHIFT_GOAL = 0.5  # target shift an extra layer is started at when no Pareto layer forgot on CLIP


def extra_groups(adapter, grads, searches) -> list:
    """``--null-space-layers all``: a :class:`~slugkit.slug.search.LayerSearch` (``step_size=None``,
    ``val_metrics={}``: no CLIP search) for every candidate group of Linear weights with a forget gradient that
    ``searches`` does not already hold — the text tower's q/k/v, out_proj and fc1+fc2 of every layer the pipeline
    consumes, not only the CLIP Pareto front. ``ratio`` = ‖θ‖/‖g_f‖ of the group's first tensor, as the ranking's."""
    from ..slug.nullspace import module_of
    from ..slug.search import LayerSearch

    have = {frozenset(s.group) for s in searches}
    params = dict(adapter.model.named_parameters())
    out = []
    for n in adapter.candidate_names():
        group = adapter.group_of(n)
        if frozenset(group) in have or not all(x in grads.forget for x in group):
            continue
        try:
            for x in group:
                module_of(adapter.model, x)
        except ValueError:
            continue
        have.add(frozenset(group))
        gn = float(grads.forget[n].float().norm())
        ratio = float(params[n].detach().float().norm()) / gn if gn > 0 else math.inf
        tower = adapter.tower_of(n)
        out.append(LayerSearch(n, group, tower, ratio, depth=adapter.stage_index(tower, n), val_metrics={}))
    return out


def matched_steps(adapter, grads, forget: dict, searches, target: str, iters: int = 4, extra=()):
    """Start steps for the projected gradients ``forget``: per searched layer, the step at which the projected edit
    moves the target's conditioning as much as the raw edit does at its CLIP step (:func:`secant_log`, ``iters``
    steps from the step of equal Frobenius norm). A layer whose projected
    gradient vanishes (< 1e-9 of the raw norm) gets ``step_size=None`` (not a candidate). ``extra`` layers (no CLIP
    step, :func:`extra_groups`) are started where the projected edit moves the target's conditioning by the median of
    the searched layers' goals (:data:`EXTRA_SHIFT_GOAL` when none has one), from the step whose ‖η·g‖ equals the
    median of theirs at the CLIP step, in ``2·iters`` secant steps; they are appended after ``searches``. Returns
    (searches, start records)."""
    from ..slug.search import edited

    tp = concept_prompts(target)
    h_t = conditioning(adapter, tp)

    def shift(g, group, eta):
        with edited(adapter.model, g, group, eta):
            return relative_shift(h_t, conditioning(adapter, tp))

    out, records = [], {}
    for s in searches:
        if s.step_size is None:
            out.append(s)
            continue
        raw = sum(float(grads.forget[n].float().norm()) ** 2 for n in s.group) ** 0.5
        new = sum(float(forget[n].float().norm()) ** 2 for n in s.group) ** 0.5
        if new < 1e-9 * raw:
            out.append(replace(s, step_size=None))
            records[s.name] = {"norm_ratio": new / max(raw, 1e-30), "start": None}
            continue
        goal = shift(grads.forget, s.group, s.step_size)
        eta = secant_log(lambda e, g=s.group: shift(forget, g, e), goal, s.step_size * raw / new, iters)
        out.append(replace(s, step_size=eta))
        records[s.name] = {"norm_ratio": new / raw, "clip_step_size": s.step_size, "target_shift": goal,
                           "start": eta, "raw_norm": raw}
    goals = sorted(r["target_shift"] for r in records.values() if r.get("start") is not None)
    sizes = sorted(r["clip_step_size"] * r["raw_norm"] for r in records.values() if r.get("start") is not None)
    goal = goals[len(goals) // 2] if goals else EXTRA_SHIFT_GOAL
    for s in extra:
        raw = sum(float(grads.forget[n].float().norm()) ** 2 for n in s.group) ** 0.5
        new = sum(float(forget[n].float().norm()) ** 2 for n in s.group) ** 0.5
        if new < 1e-9 * raw:
            out.append(replace(s, step_size=None))
            records[s.name] = {"norm_ratio": new / max(raw, 1e-30), "start": None, "extra": True}
            continue
        x0 = (sizes[len(sizes) // 2] if sizes else 1.0) / new
        eta = secant_log(lambda e, g=s.group: shift(forget, g, e), goal, x0, 2 * iters)
        out.append(replace(s, step_size=eta))
        records[s.name] = {"norm_ratio": new / raw, "clip_step_size": None, "target_shift": goal, "start": eta,
                           "extra": True}
    for r in records.values():
        r.pop("raw_norm", None)
    return out, records
