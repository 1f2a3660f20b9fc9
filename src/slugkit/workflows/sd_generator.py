"""The generator-aware layer choice and step search of ``slug demo --target sd`` (see :mod:`slugkit.workflows.sd_demo`,
point 4): conditioning shifts of the text encoder's output, a temporary edit of the pipeline's text encoder, the
doubling/bisection step search on generated validation images, and the ``choose`` callback that
:func:`slugkit.workflows.unlearn.run_unlearn` calls in place of the CLIP layer choice.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch

from ..slug.search import SearchFailed, edited_values
from ..world import render as world
from ..world import t2i

# ----------------------------------------------------------------------------------------------------------------
# Conditioning shift and the generator-aware layer choice
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def conditioning(adapter, prompts: list[str]) -> torch.Tensor:
    """What the pipeline consumes: the CLIP text tower's ``last_hidden_state`` for ``prompts`` (same tokens)."""
    from ..world.t2i import CONTEXT_LENGTH

    ids = adapter.tokenizer(list(prompts), padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                            return_tensors="pt")["input_ids"]
    return adapter.model.text_model(input_ids=ids).last_hidden_state


def relative_shift(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean over prompts of ||ΔH||_F / ||H||_F (all token positions)."""
    num = (after - before).flatten(1).norm(dim=1)
    den = before.flatten(1).norm(dim=1).clamp_min(1e-12)
    return float((num / den).mean())


def shift_table(adapter, grads, searches, target: str, margin: float = 1.0) -> list[dict]:
    """Per searched layer (that forgot on CLIP): conditioning shift of the target's and the others' prompts."""
    from ..slug.search import edited

    tp = [t2i.prompt_for(target, i) for i in range(len(world.UTILITY_CAPTION_TEMPLATES))]
    op = [t2i.prompt_for(n, i) for n in t2i.concept_names() if n != target
          for i in range(len(world.UTILITY_CAPTION_TEMPLATES))]
    h_t, h_o = conditioning(adapter, tp), conditioning(adapter, op)
    rows = []
    for s in searches:
        if s.step_size is None:
            continue
        with edited(adapter.model, grads.forget, s.group, s.step_size * margin):
            st = relative_shift(h_t, conditioning(adapter, tp))
            so = relative_shift(h_o, conditioning(adapter, op))
        rows.append({"layer": s.name, "group": s.group, "step_size": s.step_size * margin, "target_shift": st,
                     "other_shift": so, "selectivity": so / max(st, 1e-12)})
    return rows


@contextlib.contextmanager
def pipeline_edit(pipe, mapping: dict[str, str], adapter, grads, group: list[str], step: float):
    """Temporarily write θ − η·g_f of ``group`` (CLIP names) into ``pipe.text_encoder`` (mapped names); restore the
    exact bytes on exit. The same values :func:`slugkit.slug.search.edited_values` puts in the patch."""
    values = edited_values(adapter.model, grads.forget, group, step)
    params = dict(pipe.text_encoder.named_parameters())
    saved = {n: params[mapping[n]].detach().clone() for n in group}
    try:
        with torch.no_grad():
            for n in group:
                params[mapping[n]].copy_(values[n].to(params[mapping[n]].dtype))
        yield
    finally:
        with torch.no_grad():
            for n in group:
                params[mapping[n]].copy_(saved[n])


def generator_step_search(evaluate, start: float, steps: int = 6, threshold: float = 0.05,
                          other_budget: float = 0.05):
    """The doubling/bisection rule on η with both criteria measured on *generated* validation images, as the official
    UnlearnCanvas search does with ua / ira (spec §4.4), but seeded, on validation seeds only, and without its
    re-evaluate-the-same-step no-op. ``evaluate(η)`` returns ``(target_recognised, other_drop)``.

    * forgot (target ≤ ``threshold``) and others kept (drop ≤ ``other_budget``): accepted; try smaller;
    * forgot but others damaged: the step is too large; try smaller;
    * not forgotten and others already damaged: larger steps only damage more — this layer cannot do it; stop;
    * neither: try larger (double while no upper bound is known).

    Returns (trajectory, smallest accepted η or None).
    """
    lo, hi, eta, best, traj = 0.0, math.inf, start, None, []
    for _ in range(steps):
        rec, drop = evaluate(eta)
        forgot, harm = rec <= threshold + 1e-9, drop > other_budget + 1e-9
        ok = forgot and not harm
        traj.append({"step_size": eta, "target_recognised": rec, "other_drop": drop, "accepted": ok})
        if ok:
            best = eta if best is None else min(best, eta)
        if forgot or harm:
            if harm and not forgot:
                break
            hi = eta
            eta = (lo + hi) / 2
        else:
            lo = eta
            eta = eta * 2 if math.isinf(hi) else (lo + hi) / 2
    return traj, best


def generator_chooser(target: str, pipe, judge, mapping: dict[str, str], *, policy: str = "shift",
                      gen_search: bool = True, gen_margin: float = 1.0, val_images: int = 20, val_other: int = 1,
                      search_steps: int = 6, threshold: float = 0.05, other_budget: float = 0.05,
                      gen_steps: int = 20, guidance: float = t2i.DEFAULT_GUIDANCE, seed: int = 0):
    """A ``choose`` callback for :func:`slugkit.workflows.unlearn.run_unlearn` (module docstring, point 4).

    Layers are tried in order of conditioning-shift selectivity (or the CLIP policy's pick first); each gets the
    generator step search, the first with an accepted step is chosen. The forgotten concept is scored at η and the
    other concepts at ``gen_margin``·η, the step finally applied, so the margin never buys forgetting with unchecked
    damage."""
    from ..slug.search import choose_layer

    def choose(searches, adapter, grads, val_before, clip_policy):
        rows = shift_table(adapter, grads, searches, target)
        by_name = {s.name: s for s in searches}
        if policy == "clip" or not rows:
            first = choose_layer(searches, clip_policy, val_before)
            order = [first] + [by_name[r["layer"]] for r in sorted(rows, key=lambda r: r["selectivity"])
                               if r["layer"] != first.name]
        else:
            order = [by_name[r["layer"]] for r in sorted(rows, key=lambda r: (r["selectivity"], r["other_shift"]))]
        info = {"policy": policy, "conditioning_shift": rows, "gen_margin": gen_margin}
        if not gen_search:
            chosen = replace(order[0], step_size=order[0].step_size * gen_margin)
            info.update(clip_step_size=order[0].step_size, step_size=chosen.step_size)
            return chosen, info
        # validation seeds: disjoint from every reported plan (those use seed_base 10_000 * (seed + 1)).
        tplan = [(target, t2i.prompt_for(target, i), 7_000_000 + 1000 * seed + i) for i in range(val_images)]
        oplan = [(c, t2i.prompt_for(c, i), 8_000_000 + 1000 * k + i) for k, c in enumerate(t2i.concept_names())
                 if c != target for i in range(val_other)]

        def others(group, eta):
            with pipeline_edit(pipe, mapping, adapter, grads, group, eta):
                rec, _, _ = t2i.recognition(pipe, judge, oplan, gen_steps, guidance)
            return float(sum(rec.values()) / len(rec))

        def tgt(group, eta):
            with pipeline_edit(pipe, mapping, adapter, grads, group, eta):
                rec, _, _ = t2i.recognition(pipe, judge, tplan, gen_steps, guidance)
            return rec[target]

        base_t, base_o = tgt(order[0].group, 0.0), others(order[0].group, 0.0)
        searched, chosen = [], None
        for layer in order:
            traj, eta = generator_step_search(
                lambda e, g=layer.group: (tgt(g, e), base_o - others(g, e * gen_margin)),
                layer.step_size, search_steps, threshold, other_budget)
            searched.append({"layer": layer.name, "clip_step_size": layer.step_size, "trajectory": traj,
                             "accepted_step": eta})
            if eta is not None:
                chosen = replace(layer, step_size=eta * gen_margin)
                info["clip_step_size"] = layer.step_size
                break
        info["generator_search"] = {"validation_images": val_images, "validation_per_other_concept": val_other,
                                    "threshold": threshold, "other_budget": other_budget,
                                    "base_target_recognised": base_t, "base_other_recognised": base_o,
                                    "layers": searched}
        if chosen is None:
            raise SearchFailed(
                f"no Pareto layer has a step at which the generator forgets {target!r} (≤ {threshold:.0%} of "
                f"{val_images} validation images) while the other concepts lose ≤ {other_budget:.0%}; try "
                "--other-budget, more --val-images, or --no-gen-search (the CLIP step)")
        info["step_size"] = chosen.step_size
        return chosen, info

    return choose


# ----------------------------------------------------------------------------------------------------------------
# Generation metrics
# ----------------------------------------------------------------------------------------------------------------


def related_to(a: str, b: str) -> bool:
    """Two object concepts are related when they share a colour or a shape."""
    ca, cb = t2i.concept_by_name(a), t2i.concept_by_name(b)
    return ca.colour == cb.colour or ca.shape == cb.shape


def generation_metrics(per_concept: dict[str, float], target: str) -> dict:
    from ..eval.generated import summarise

    return summarise(per_concept, target, related=related_to)
