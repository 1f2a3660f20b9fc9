"""The generator-aware layer choice and step search of ``slug demo --target sd`` (see :mod:`slugkit.workflows.sd_demo`,
point 4): conditioning shifts of the text encoder's output, a temporary edit of the pipeline's text encoder, the
doubling/bisection step search on generated validation images, and the ``choose`` callback that
:func:`slugkit.workflows.unlearn.run_unlearn` calls in place of the CLIP layer choice.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..common.progress import status
from ..slug.search import SearchFailed, carried_edits, edited_consumer
from ..world import t2i
from .gen_search import GeneratorRefused, closest, fallback_partial, generator_step_search, judged, partial_row
from .sd_conditioning import (EXTRA_SHIFT_GOAL, NULL_LAYERS, concept_prompts, conditioning, extra_groups,
                              kept_prompts, matched_steps, null_space_forget, relative_shift, secant_log)

# ----------------------------------------------------------------------------------------------------------------
# The generator-aware layer choice
# ----------------------------------------------------------------------------------------------------------------


def shift_table(adapter, grads, searches, target: str, margin: float = 1.0, neighbours: list[str] = ()) -> list[dict]:
    """Per searched layer (that forgot on CLIP): conditioning shift (:func:`relative_shift`) of the target's prompts,
    the other concepts' and — with ``neighbours`` — the nearest neighbours' prompts (8 templates each) at the
    layer's CLIP step x ``margin``; ``selectivity`` = other / target, ``neighbour_selectivity`` = neighbour /
    target. ``grads.forget`` holds the gradients the edit uses."""
    from ..slug.search import edited

    tp = concept_prompts(target)
    op = [p for n in t2i.concept_names() if n != target for p in concept_prompts(n)]
    npr = [p for n in neighbours for p in concept_prompts(n)]
    h_t, h_o = conditioning(adapter, tp), conditioning(adapter, op)
    h_n = conditioning(adapter, npr) if npr else None
    rows = []
    for s in searches:
        if s.step_size is None:
            continue
        with edited(adapter.model, grads.forget, s.group, s.step_size * margin):
            st = relative_shift(h_t, conditioning(adapter, tp))
            so = relative_shift(h_o, conditioning(adapter, op))
            sn = relative_shift(h_n, conditioning(adapter, npr)) if npr else None
        row = {"layer": s.name, "group": s.group, "step_size": s.step_size * margin, "target_shift": st,
               "other_shift": so, "selectivity": so / max(st, 1e-12)}
        if sn is not None:
            row.update(neighbour_shift=sn, neighbour_selectivity=sn / max(st, 1e-12))
        rows.append(row)
    return rows


def pipeline_edit(pipe, mapping: dict[str, str], adapter, grads, group: list[str], step: float):
    """Temporarily write θ − η·g_f of ``group`` (CLIP names) into ``pipe.text_encoder`` (mapped names); restore the
    exact bytes on exit (:func:`slugkit.slug.search.edited_consumer`: the values the patch stores)."""
    return edited_consumer(pipe.text_encoder, mapping, adapter.model, grads.forget, group, step)


def validation_plans(target: str, neighbours: list[str], val_images: int, val_other: int, val_neighbour: int,
                     seed: int = 0):
    """``(target plan, others plan)`` of the generator search: ``val_images`` of the target, ``val_neighbour`` of each
    nearest neighbour and ``val_other`` of every other concept; seeds 7,000,000 + 1000·seed + i (target) and
    8,000,000 + 1000·k + i (concept k), disjoint from every reported plan (seed_base 10,000·(seed + 1))."""
    tplan = [(target, t2i.prompt_for(target, i), 7_000_000 + 1000 * seed + i) for i in range(val_images)]
    oplan = [(c, t2i.prompt_for(c, i), 8_000_000 + 1000 * k + i) for k, c in enumerate(t2i.concept_names())
             if c != target for i in range(max(val_other, val_neighbour) if c in neighbours else val_other)]
    return tplan, oplan


def generator_chooser(target: str, pipe, judge, mapping: dict[str, str], *, policy: str = "shift",
                      gen_search: bool = True, gen_margin: float = 1.0, val_images: int = 20, val_other: int = 1,
                      search_steps: int = 6, threshold: float = 0.05, other_budget: float = 0.05,
                      gen_steps: int = 20, guidance: float = t2i.DEFAULT_GUIDANCE, seed: int = 0,
                      neighbours: list[str] = (), val_neighbour: int = 20, neighbour_budget: float | None = 0.20,
                      step: str = "slug", null_energy: float | None = None, null_layers: str = "front",
                      max_searched: int | None = None, max_layers: int = 1, base_target: float | None = None,
                      fallback: str | None = None, progress: bool = False):
    """A ``choose`` callback for :func:`slugkit.workflows.unlearn.run_unlearn` (module docstring, point 4).

    Layers are tried in order of conditioning-shift selectivity (``policy="shift"``: other / target shift;
    ``"neighbour"``: nearest neighbours' / target shift; ``"clip"``: the CLIP policy's pick first); each gets the
    generator step search, the first with an accepted step is chosen. The forgotten concept is scored at η and the
    other concepts at ``gen_margin``·η, the step finally applied, so the margin never buys forgetting with unchecked
    damage. The ``neighbours`` (names, nearest first) get ``val_neighbour`` validation images each and a step is
    accepted only if the worst of them loses at most ``neighbour_budget`` (None: unbounded) besides the mean bound.

    ``step="null-space"``: every searched layer's forget gradient is projected onto the null space of its inputs on
    the kept prompts (:func:`null_space_forget`, ``null_energy`` default
    :data:`slugkit.slug.nullspace.DEFAULT_ENERGY`) and searched from the step at which it moves the target's
    conditioning as much as the raw edit at its CLIP step (:func:`matched_steps`); the chosen group's projected
    gradients are **written into** ``grads.forget``, so run_unlearn's test evaluation and patch use the projected
    edit. ``null_layers="all"`` (null-space step only): besides the Pareto layers that forgot on CLIP, every other
    Linear group of the consumed text tower is a candidate (:func:`extra_groups`; started by :func:`matched_steps`)
    and takes its place in the selectivity order. ``max_searched``: the generator search tries at most this many
    layers of the order (None: every one; each costs up to ``search_steps`` validation generations). Raises
    :class:`GeneratorRefused` (a :class:`~slugkit.slug.search.SearchFailed`) when no layer has an accepted step
    (the message names the criteria; with ``max_layers`` > 1 it carries the :func:`partial_row` a second layer
    may build on) and ``ValueError`` for an unknown ``step`` or ``null_layers``, ``null_layers="all"`` with the SLUG
    step or ``max_searched`` < 1. ``base_target``: the unedited pipeline's recognition of the target on its
    validation images (:func:`validation_plans`' first plan, same ``val_images``, ``seed``, ``gen_steps`` and
    ``guidance``) when the caller has already measured it — ``slug demo --target sd`` does, to refuse a concept with
    nothing to unlearn before the run — so round 1 does not generate those images again. ``progress``: one line on
    stderr per searched layer and per measured step (each step generates the validation images: tens of seconds on a
    CPU).

    ``choose(..., prior=edits)`` (round ≥ 2 of :func:`slugkit.workflows.rounds.generator_rounds`): ``edits`` are
    already applied to ``adapter.model``; their values are copied into the pipeline's text encoder for the round, and
    every drop is measured against the **unedited** pipeline's validation recognition (kept from round 1).

    ``fallback="finetune"`` (**not SLUG**): ``choose.fallback`` is set, so that when every round refused,
    :func:`slugkit.workflows.rounds.generator_rounds` fine-tunes the groups of
    :func:`slugkit.workflows.sd_layer_ft.fallback_groups` in turn on the unedited model and keeps the first the same
    validation criteria accept (its displacement as the edit, step 1; the record says ``edit_method:
    layer-finetune``), or refuses with each try's row added to the message."""
    from types import SimpleNamespace

    from ..slug.nullspace import DEFAULT_ENERGY
    from ..slug.search import choose_layer

    neighbours = list(neighbours)
    if step not in ("slug", "null-space"):
        raise ValueError(f"unknown step {step!r}: slug or null-space")
    if null_layers not in NULL_LAYERS:
        raise ValueError(f"unknown null_layers {null_layers!r}: {' or '.join(NULL_LAYERS)}")
    if max_searched is not None and max_searched < 1:
        raise ValueError(f"max_searched must be >= 1 or None, got {max_searched}")
    if fallback not in (None, "finetune"):
        raise ValueError(f"unknown fallback {fallback!r}: None or 'finetune'")
    if null_layers != "front" and step != "null-space":
        raise ValueError(f"null_layers={null_layers!r} needs the null-space step (the SLUG step searches the Pareto "
                         "layers that forgot on CLIP)")

    state = {}  # the unedited pipeline's validation recognition, measured once (round 1)

    tplan, oplan = validation_plans(target, neighbours, val_images, val_other, val_neighbour, seed)

    def scorer(adapter, g_edit, group0):
        """``evaluate(group, eta, g=None, scale=gen_margin, label=None)`` on the validation images: the target at η
        along ``g`` (default ``g_edit.forget``), the others at ``scale``·η (the step applied), drops against the
        unedited pipeline (measured once, at η = 0 on ``group0``); ``label`` names the edit in the progress line in
        place of "step η" (a fine-tune's "step 1" is its fine-tuned values)."""
        def recognised(plan, group, eta, g):
            if group is None:  # the unedited pipeline
                return t2i.recognition(pipe, judge, plan, gen_steps, guidance)[0]
            with pipeline_edit(pipe, mapping, adapter, SimpleNamespace(forget=g_edit.forget if g is None else g),
                               group, eta):
                return t2i.recognition(pipe, judge, plan, gen_steps, guidance)[0]

        if "base" not in state:
            state["base"] = (recognised(tplan, group0, 0.0, None)[target] if base_target is None else base_target,
                             recognised(oplan, group0, 0.0, None))
        base_t, base_per = state["base"]
        base_o = float(sum(base_per.values()) / len(base_per))

        def evaluate(group, eta, g=None, scale=gen_margin, label=None):
            rec_t = recognised(tplan, group, eta, g)[target]
            per = recognised(oplan, group, eta * scale, g)
            drops = {c: base_per[c] - per[c] for c in neighbours}
            worst = max(neighbours, key=lambda c: (drops[c], -neighbours.index(c))) if neighbours else None
            mean_drop = base_o - float(sum(per.values()) / len(per))
            at = "," if scale == 1.0 else f"; at the step applied ({scale:g} × η = {eta * scale:.4g}):"
            status(f"  {label or f'step {eta:.4g}'}: concept recognised {rec_t:.2f} (unedited {base_t:.2f}){at} "
                   f"others {round(-mean_drop, 3) + 0.0:+.3f}"  # + 0.0: no "-0.00" (verification 66)
                   + (f", worst neighbour {worst!r} {round(-drops[worst], 2) + 0.0:+.2f}" if worst else ""),
                   progress)  # the collateral is measured at the margin's step (the trial took it for η's)
            return (rec_t, mean_drop) if worst is None else (rec_t, mean_drop, drops[worst], worst)

        return evaluate

    def choose(searches, adapter, grads, val_before, clip_policy, prior=()):
        if not prior:  # round 1: nothing to carry (and no pipeline touched before the search needs it)
            return choose_round(searches, adapter, grads, val_before, clip_policy, [])
        with carried_edits(pipe.text_encoder, mapping, adapter.model, [n for e in prior for n in e.search.group]):
            return choose_round(searches, adapter, grads, val_before, clip_policy, list(prior))

    def choose_round(searches, adapter, grads, val_before, clip_policy, prior):
        rnd = len(prior) + 1
        info = {"round": rnd, "policy": policy, "gen_margin": gen_margin, "step": step, "neighbours": neighbours}
        g_edit, clip_steps = grads, {s.name: s.step_size for s in searches}
        if step == "null-space":
            energy = DEFAULT_ENERGY if null_energy is None else null_energy
            extra = extra_groups(adapter, grads, searches) if null_layers == "all" else []
            clip_steps.update({s.name: None for s in extra})
            forget, ns = null_space_forget(adapter, grads, searches, target, energy, extra=extra)
            g_edit = SimpleNamespace(forget=forget)
            searches, starts = matched_steps(adapter, grads, forget, searches, target, extra=extra)
            info["null_space"] = {"energy": energy, "kept_prompts": len(kept_prompts(target)), "layers": null_layers,
                                  "tensors": ns, "start_steps": starts}
            if not any(s.step_size is not None for s in searches):
                raise SearchFailed(f"the null-space projection (energy {energy:g}) leaves no forget gradient in any "
                                   "searched layer; lower --null-space-energy")
        rows = shift_table(adapter, g_edit, searches, target, neighbours=neighbours)
        info["conditioning_shift"] = rows
        by_name = {s.name: s for s in searches}
        key = {"neighbour": lambda r: (r.get("neighbour_selectivity", r["selectivity"]), r["selectivity"])}.get(
            policy, lambda r: (r["selectivity"], r["other_shift"]))
        if policy == "clip" or not rows:
            first = choose_layer(searches, clip_policy, val_before)
            order = [first] + [by_name[r["layer"]] for r in sorted(rows, key=key) if r["layer"] != first.name]
        else:
            order = [by_name[r["layer"]] for r in sorted(rows, key=key)]

        def done(chosen):
            if step == "null-space":  # the projected gradient is the edit: its ratio ‖θ‖/‖g‖ too (the raw one's
                grads.forget.update({n: g_edit.forget[n] for n in chosen.group})  # gave relative change 7.34 of a
                theta = dict(adapter.model.named_parameters())[chosen.name]  # tensor moved by 0.224; verification 66)
                gn = float(g_edit.forget[chosen.name].float().norm())
                chosen = replace(chosen, ratio=float(theta.detach().float().norm()) / gn if gn > 0 else math.inf)
            return chosen, info

        if not gen_search:
            chosen = replace(order[0], step_size=order[0].step_size * gen_margin)
            info.update(clip_step_size=clip_steps[order[0].name], step_size=chosen.step_size)
            return done(chosen)
        evaluate = scorer(adapter, g_edit, order[0].group)
        base_t, base_per = state["base"]
        base_o = float(sum(base_per.values()) / len(base_per))
        searched, chosen = [], None
        for k, layer in enumerate(order[:max_searched]):
            status(f"round {rnd}: generator step search on {', '.join(layer.group)} ({k + 1} of "
                   f"{len(order[:max_searched])}), from step {layer.step_size:.4g}", progress)
            traj, eta = generator_step_search(lambda e, g=layer.group: evaluate(g, e), layer.step_size,
                                              search_steps, threshold, other_budget, neighbour_budget)
            searched.append({"layer": layer.name, "group": list(layer.group),
                             "clip_step_size": clip_steps[layer.name], "start_step": layer.step_size,
                             "trajectory": traj, "accepted_step": eta})
            if eta is not None:
                chosen = replace(layer, step_size=eta * gen_margin, accepted_step=eta)  # not the CLIP search's
                info["clip_step_size"] = clip_steps[layer.name]
                break
        info["generator_search"] = {"validation_images": val_images, "validation_per_other_concept": val_other,
                                    "validation_per_neighbour": val_neighbour if neighbours else None,
                                    "threshold": threshold, "other_budget": other_budget,
                                    "neighbour_budget": neighbour_budget if neighbours else None,
                                    "base_target_recognised": base_t, "base_other_recognised": base_o,
                                    "base_neighbour_recognised": {c: base_per[c] for c in neighbours},
                                    "max_searched": max_searched, "layers_in_order": len(order),
                                    "layers": searched}
        if chosen is None:
            cut = (f" (searched the first {max_searched} of {len(order)} in selectivity order)"
                   if max_searched is not None and max_searched < len(order) else "")
            bounded = bool(neighbours) and neighbour_budget is not None and neighbour_budget < 1.0
            nb = (f", and none of its {len(neighbours)} nearest neighbours loses more than {neighbour_budget:.0%} "
                  f"(of {val_neighbour} validation images each)") if bounded else ""
            row, why_not = fallback_partial(adapter, prior, order, searched, base_t, other_budget,
                                            neighbour_budget, probe=evaluate) if max_layers > rnd else (None, "")
            partial = None
            if row is not None:
                info["partial_step"] = {**row, "applied_step": row["step_size"] * gen_margin}
                partial, _ = done(replace(by_name[row["layer"]], step_size=row["step_size"] * gen_margin))
            raise GeneratorRefused(
                f"no {'candidate' if null_layers == 'all' else 'Pareto'} layer{cut} has a step at which the generator "
                f"forgets {target!r} (≤ {threshold:.0%} of {val_images} validation images) while the other "
                f"concepts lose ≤ {other_budget:.0%} on average{nb}{why_not}"
                f"{closest(searched, threshold, other_budget, neighbour_budget)}; try --other-budget / "
                "--neighbour-budget, more --val-images" + ("" if fallback else ", or --no-gen-search (the CLIP step)"),
                partial, info)
        info["step_size"] = chosen.step_size
        return done(chosen)

    def finetune_after(err, adapter, grads):
        """``choose.fallback`` (``--sd-fallback finetune``): every SLUG round refused (``err``); the pipeline and
        ``adapter.model`` are unedited again. Returns ``(chosen, record)`` and writes the fine-tune's −delta into
        ``grads.forget``, or raises :class:`SearchFailed` with ``err``'s message and each try's row."""
        from .layer_ft import FINETUNE_METHOD, finetune_refusal
        from .sd_layer_ft import METHOD, finetune_fallback

        info = {**(getattr(err, "info", None) or {}), "refusal": str(err)}
        chosen, g, info["fallback"] = finetune_fallback(
            pipe, mapping, adapter, target, scorer(adapter, grads, None), lambda eta, res: judged(
                eta, res, threshold, other_budget, neighbour_budget), seed=seed, gen_steps=gen_steps,
            guidance=guidance, progress=progress)
        if chosen is None:
            refused = SearchFailed(f"{err}{finetune_refusal(info['fallback'], '--sd-fallback finetune')}")
            refused.info = info
            raise refused from err
        grads.forget.update(g)
        info.update(policy="SLUG refused; " + METHOD, edit_method=FINETUNE_METHOD, step_size=1.0,
                    clip_step_size=None,
                    why="fine-tuned after SLUG's search refused (--sd-fallback finetune; not SLUG)")
        return chosen, info

    if fallback:
        choose.fallback = finetune_after
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


# re-exported: the tests and callers know these names from here
__all__ = ["EXTRA_SHIFT_GOAL", "NULL_LAYERS", "GeneratorRefused", "closest", "concept_prompts", "conditioning",
           "extra_groups", "fallback_partial", "generation_metrics", "generator_chooser", "generator_step_search",
           "kept_prompts", "matched_steps", "null_space_forget", "partial_row", "pipeline_edit", "related_to",
           "relative_shift", "secant_log", "shift_table", "validation_plans"]
