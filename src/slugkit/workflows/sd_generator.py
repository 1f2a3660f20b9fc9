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


def concept_prompts(name: str) -> list[str]:
    """The prompts the pipeline is given for concept ``name``: one per world caption template (8)."""
    return [t2i.prompt_for(name, i) for i in range(len(world.UTILITY_CAPTION_TEMPLATES))]


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
                          other_budget: float = 0.05, neighbour_budget: float | None = None):
    """The doubling/bisection rule on η with both criteria measured on *generated* validation images, as the official
    UnlearnCanvas search does with ua / ira (spec §4.4), but seeded, on validation seeds only, and without its
    re-evaluate-the-same-step no-op. ``evaluate(η)`` returns ``(target_recognised, other_drop)`` or
    ``(target_recognised, other_drop, worst_neighbour_drop, worst_neighbour)``; the others are *damaged* when their
    mean drop exceeds ``other_budget`` or (with ``neighbour_budget``) the worst nearest neighbour's drop exceeds
    ``neighbour_budget``:

    * forgot (target ≤ ``threshold``) and others kept: accepted; try smaller;
    * forgot but others damaged: the step is too large; try smaller;
    * not forgotten and others already damaged: larger steps only damage more — this layer cannot do it; stop;
    * neither: try larger (double while no upper bound is known).

    Returns (trajectory, smallest accepted η or None).
    """
    lo, hi, eta, best, traj = 0.0, math.inf, start, None, []
    for _ in range(steps):
        rec, drop, *nb = evaluate(eta)
        forgot = rec <= threshold + 1e-9
        nb_harm = bool(nb) and neighbour_budget is not None and nb[0] > neighbour_budget + 1e-9
        harm = drop > other_budget + 1e-9 or nb_harm
        ok = forgot and not harm
        row = {"step_size": eta, "target_recognised": rec, "other_drop": drop, "accepted": ok}
        if nb:
            row.update(neighbour_drop=nb[0], worst_neighbour=nb[1] if len(nb) > 1 else None)
        traj.append(row)
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


def validation_plans(target: str, neighbours: list[str], val_images: int, val_other: int, val_neighbour: int,
                     seed: int = 0):
    """``(target plan, others plan)`` of the generator search: ``val_images`` of the target, ``val_neighbour`` of each
    nearest neighbour and ``val_other`` of every other concept; seeds 7,000,000 + 1000·seed + i (target) and
    8,000,000 + 1000·k + i (concept k), disjoint from every reported plan (seed_base 10,000·(seed + 1))."""
    tplan = [(target, t2i.prompt_for(target, i), 7_000_000 + 1000 * seed + i) for i in range(val_images)]
    oplan = [(c, t2i.prompt_for(c, i), 8_000_000 + 1000 * k + i) for k, c in enumerate(t2i.concept_names())
             if c != target for i in range(max(val_other, val_neighbour) if c in neighbours else val_other)]
    return tplan, oplan


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
                      identities: bool = False) -> tuple[dict, dict]:
    """The searched layers' forget gradients projected onto the null space of their Linear inputs on the
    :func:`kept_prompts`, keeping the top principal directions holding ``energy`` of their second moment
    (:mod:`slugkit.slug.nullspace`). Returns ``(forget gradients with those groups replaced, per-tensor info)``."""
    from ..slug.nullspace import null_space_gradients

    names = sorted({n for s in searches if s.step_size is not None for n in s.group})
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


def matched_steps(adapter, grads, forget: dict, searches, target: str, iters: int = 4):
    """Start steps for the projected gradients ``forget``: per searched layer, the step at which the projected edit
    moves the target's conditioning as much as the raw edit does at its CLIP step (:func:`secant_log`, ``iters``
    steps from the step of equal Frobenius norm). A layer whose projected
    gradient vanishes (< 1e-9 of the raw norm) gets ``step_size=None`` (not a candidate). Returns (searches, start
    records)."""
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
                           "start": eta}
    return out, records


def closest(searched: list[dict], threshold: float, other_budget: float, neighbour_budget: float | None) -> str:
    """``"; closest: <layer> step η: ..."`` for a refusal: the searched step that came nearest to acceptance (among
    those that forgot, the least damage relative to the budgets; else the lowest recognition of the concept)."""
    def harm(t):
        h = t["other_drop"] / max(other_budget, 1e-9)
        if t.get("neighbour_drop") is not None and neighbour_budget is not None:
            h = max(h, t["neighbour_drop"] / max(neighbour_budget, 1e-9))
        return h

    rows = [(L["layer"], t) for L in searched for t in L["trajectory"]]
    if not rows:
        return ""
    forgot = [r for r in rows if r[1]["target_recognised"] <= threshold + 1e-9]
    layer, t = min(forgot, key=lambda r: harm(r[1])) if forgot else min(rows, key=lambda r: r[1]["target_recognised"])
    nb = (f", worst neighbour {t['worst_neighbour']!r} {-t['neighbour_drop']:+.2f}"
          if t.get("neighbour_drop") is not None else "")
    return (f"; closest: {layer.removeprefix('text_model.encoder.')} step {t['step_size']:.4g}: concept recognised "
            f"{t['target_recognised']:.2f}, others {-t['other_drop']:+.3f}{nb}")


def generator_chooser(target: str, pipe, judge, mapping: dict[str, str], *, policy: str = "shift",
                      gen_search: bool = True, gen_margin: float = 1.0, val_images: int = 20, val_other: int = 1,
                      search_steps: int = 6, threshold: float = 0.05, other_budget: float = 0.05,
                      gen_steps: int = 20, guidance: float = t2i.DEFAULT_GUIDANCE, seed: int = 0,
                      neighbours: list[str] = (), val_neighbour: int = 20, neighbour_budget: float | None = 0.20,
                      step: str = "slug", null_energy: float | None = None):
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
    edit. Raises :class:`~slugkit.slug.search.SearchFailed` when no layer has an accepted step (the message names the
    criteria) and ``ValueError`` for an unknown ``step``."""
    from types import SimpleNamespace

    from ..slug.nullspace import DEFAULT_ENERGY
    from ..slug.search import choose_layer

    neighbours = list(neighbours)
    if step not in ("slug", "null-space"):
        raise ValueError(f"unknown step {step!r}: slug or null-space")

    def choose(searches, adapter, grads, val_before, clip_policy):
        info = {"policy": policy, "gen_margin": gen_margin, "step": step, "neighbours": neighbours}
        g_edit, clip_steps = grads, {s.name: s.step_size for s in searches}
        if step == "null-space":
            energy = DEFAULT_ENERGY if null_energy is None else null_energy
            forget, ns = null_space_forget(adapter, grads, searches, target, energy)
            g_edit = SimpleNamespace(forget=forget)
            searches, starts = matched_steps(adapter, grads, forget, searches, target)
            info["null_space"] = {"energy": energy, "kept_prompts": len(kept_prompts(target)),
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
            if step == "null-space":
                grads.forget.update({n: g_edit.forget[n] for n in chosen.group})
            return chosen, info

        if not gen_search:
            chosen = replace(order[0], step_size=order[0].step_size * gen_margin)
            info.update(clip_step_size=clip_steps[order[0].name], step_size=chosen.step_size)
            return done(chosen)
        tplan, oplan = validation_plans(target, neighbours, val_images, val_other, val_neighbour, seed)

        def others(group, eta):
            with pipeline_edit(pipe, mapping, adapter, g_edit, group, eta):
                return t2i.recognition(pipe, judge, oplan, gen_steps, guidance)[0]

        def tgt(group, eta):
            with pipeline_edit(pipe, mapping, adapter, g_edit, group, eta):
                return t2i.recognition(pipe, judge, tplan, gen_steps, guidance)[0][target]

        base_t, base_per = tgt(order[0].group, 0.0), others(order[0].group, 0.0)
        base_o = float(sum(base_per.values()) / len(base_per))

        def evaluate(group, eta):
            rec_t = tgt(group, eta)
            per = others(group, eta * gen_margin)
            drops = {c: base_per[c] - per[c] for c in neighbours}
            worst = max(neighbours, key=lambda c: (drops[c], -neighbours.index(c))) if neighbours else None
            mean_drop = base_o - float(sum(per.values()) / len(per))
            return (rec_t, mean_drop) if worst is None else (rec_t, mean_drop, drops[worst], worst)

        searched, chosen = [], None
        for layer in order:
            traj, eta = generator_step_search(lambda e, g=layer.group: evaluate(g, e), layer.step_size,
                                              search_steps, threshold, other_budget, neighbour_budget)
            searched.append({"layer": layer.name, "clip_step_size": clip_steps[layer.name],
                             "start_step": layer.step_size, "trajectory": traj, "accepted_step": eta})
            if eta is not None:
                chosen = replace(layer, step_size=eta * gen_margin)
                info["clip_step_size"] = clip_steps[layer.name]
                break
        info["generator_search"] = {"validation_images": val_images, "validation_per_other_concept": val_other,
                                    "validation_per_neighbour": val_neighbour if neighbours else None,
                                    "threshold": threshold, "other_budget": other_budget,
                                    "neighbour_budget": neighbour_budget if neighbours else None,
                                    "base_target_recognised": base_t, "base_other_recognised": base_o,
                                    "base_neighbour_recognised": {c: base_per[c] for c in neighbours},
                                    "layers": searched}
        if chosen is None:
            bounded = bool(neighbours) and neighbour_budget is not None and neighbour_budget < 1.0
            nb = (f", and none of its {len(neighbours)} nearest neighbours loses more than {neighbour_budget:.0%} "
                  f"(of {val_neighbour} validation images each)") if bounded else ""
            raise SearchFailed(
                f"no Pareto layer has a step at which the generator forgets {target!r} (≤ {threshold:.0%} of "
                f"{val_images} validation images) while the other concepts lose ≤ {other_budget:.0%} on average{nb}"
                f"{closest(searched, threshold, other_budget, neighbour_budget)}; try --other-budget / "
                "--neighbour-budget, more --val-images, or --no-gen-search (the CLIP step)")
        info["step_size"] = chosen.step_size
        return done(chosen)

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
