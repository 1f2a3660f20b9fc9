"""SLUG on a canvas (issue 15): one layer of the text encoder, the step searched on generated images.

The paper's UnlearnCanvas run (spec ``baselines.md`` §7.5, ``slug-algorithm.md`` §6.2, ``src/clip/eval_uncanvas.py``)
edits the SD text encoder at a Pareto-front layer and searches the step on generations judged by the benchmark's
classifiers: 3 images of the target (UA-hit) and one image each of 3 other concepts of the same domain (IRA),
stopping at the first step where the target is no longer recognised and IRA moved by less than 0.1, or after 11
iterations. Here, on any :class:`~slugkit.world.canvas.Grid` (the embedded canvas or UnlearnCanvas itself):

1. forget pairs: images of every (style, object) pair that names the target, with its prompt; retain pairs:
   images of every other pair; SLUG's forget (∇ mean cos) and retain (∇ CLIP loss) gradients on the CLIP whose text
   tower *is* the generator's (:func:`slugkit.slug.gradients.compute_gradients`; hash-checked by the caller);
2. importance and alignment of every text layer the generator consumes; the Pareto front first (by importance),
   then the other layers (:func:`slugkit.workflows.vlm_gradients.vlm_layer_order` — the same ordering);
3. per layer, the bisection rule of :func:`slugkit.workflows.gen_search.generator_step_search` from the
   official first step 0.4 × ‖θ‖/‖g_f‖ in the official bracket [0, 10 × that] (``start_fraction``), stopping at the
   first accepted step as the official script does: accepted when the
   target-domain judge recognises at most ``threshold`` of the ``val_target`` validation images of the target and
   the accuracy on the ``val_other`` other concepts dropped by at most ``ira_budget`` (0.1); the first layer with an
   accepted step wins. Departures: the validation seeds (9,000,000 + i) are fixed and disjoint from the answer set's,
   the other concepts are drawn once per target from a seeded generator (the official script redraws them at every
   iteration, unseeded), the validation images are ones the unedited model draws recognisably
   (:func:`recognised_plan`), and a layer whose step cannot forget without harming is left for the next Pareto
   layer (the official script searches one layer).

``step="null-space"`` (``slug canvas lite --methods slug-null-space``; not the paper's step): issue 12's null-space
variant (:mod:`slugkit.slug.nullspace`) — every candidate Linear group's forget gradient projected onto the null
space of its inputs on the **other** pairs' prompts and the empty prompt (classifier-free guidance encodes it with the
edited encoder too), keeping ``null_energy`` of their second moment, so that the edit leaves what the UNet reads for
every other (style, object) prompt unchanged up to the energy left out; the layers are then tried by how far the
projected edit at its start step moves the target prompts' text states (:func:`null_space_order`: the Pareto order
says how the *unprojected* gradient would act), and searched by the same rule from a larger first step,
:data:`NULL_START` = 2.2 R (a 220 % relative change of the layer, in the bracket [0, 10 × that]), leaving a layer
whose recognition and drop did not change between two growing steps (``plateau_stop`` of
:func:`~slugkit.workflows.gen_search.generator_step_search`). Why 2.2 R: the projection removes the part of the
gradient that acts on the inputs the target's prompts share with every other prompt ("An … image in … style."), so
the same relative change moves the generator far less — measured on the embedded canvas's 13 targets, the official
0.4 R first step forgot the 3 validation images of one (harley, whose edit left half of its answer-set images
recognised) and three were refused; from 2.2 R twelve of 13 are accepted (mond is refused), eight at the first
step, harley and kasa at half of it (the validation others dropped at the first), cross at 5.5 × it, slan on the
fourth layer searched; on the baselines' 8 targets the answer-set UA of styles rose from 85 % to 95 % and of objects
from 72 % to 91 %, the other concepts kept, in 3.4 s instead of 5.3. A calibration on the targets the benchmark
reports (the canvas has no others); the search still halves any step that costs the other concepts, so a first step
too large for another model costs generations, not collateral. 1.2 R was measured too and not kept: styles' UA 90 %,
objects' 80 %, 4.5 s, slan and mond refused.
The kept prompts are the answer set's other prompts, as the baselines' retain data and UCE's preserved prompts are.

Returns the edited text-encoder tensors as a :class:`~slugkit.methods.diffusion.DiffusionEdit` (its tensors are
named as in the pipeline's text encoder; apply with :func:`slugkit.methods.diffusion.applied` on
``pipe.text_encoder``). Raises :class:`~slugkit.slug.search.SearchFailed` when no searched layer has an accepted step
(its ``time_s``: the search's seconds; ``record``: the step, its first step and every searched layer's trajectory).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..methods.diffusion import DiffusionEdit, storage
from ..slug.search import SearchFailed, edited_consumer, edited_values
from .gen_search import closest, generator_step_search

VAL_TARGET, VAL_OTHER = 3, 3  # the official n_test during the search
SEARCH_STEPS = 11  # the official iteration cap
IRA_BUDGET = 0.10  # the official stopping rule: IRA changed by < 0.1
START = 0.4  # the official first step, x R = ||theta|| / ||g_f|| (a 40 % relative change; spec §4.1, §4.4)
NULL_START = 2.2  # the null-space step's first step, x R of the projected gradient (module docstring: measured)
BRACKET = 10.0  # the official r_hi = 10 x the first step (growing bisects towards it)
STEPS = ("slug", "null-space")  # the paper's step; issue 12's null-space variant (module docstring)


def canvas_pairs(ctx, target: str, n_forget: int = 8, n_retain: int = 2, seed: int = 0):
    """SLUG's data for ``target`` on ``ctx.grid``: ``(forget, retain)``, each ``(images uint8 [N, H, W, 3],
    prompts)`` — ``n_forget`` images per target pair, ``n_retain`` per other pair. Data preparation (on
    UnlearnCanvas: reading the dataset's images), kept out of the method's timed part as it is for the baselines."""
    grid = ctx.grid
    return (grid.images(grid.target_pairs(target), n_forget, seed, 1616),
            grid.images(grid.other_pairs(target), n_retain, seed + 1, 1616))


def canvas_gradients(ctx, forget, retain, progress: bool = False):
    """SLUG's forget and retain gradients (module docstring, point 1) on :func:`canvas_pairs`' data; batches of
    64."""
    from ..slug.gradients import compute_gradients

    grid, adapter = ctx.grid, ctx.adapter

    def batches(data):
        x, prompts = data
        x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        return [(grid.clip_inputs(x[i:i + 64], adapter), adapter.tokenize(prompts[i:i + 64]))
                for i in range(0, len(x), 64)]

    return compute_gradients(adapter, batches(forget), batches(retain), adapter.candidate_names(), progress=progress)


def validation_plan(grid, target: str, val_target: int = VAL_TARGET, val_other: int = VAL_OTHER, seed: int = 0,
                    tries: int = 1):
    """``[(style, object, prompt, seed)]``: ``tries`` × ``val_target`` candidate images of the target and ``tries``
    candidates for each of ``val_other`` other concepts of its domain (drawn from ``default_rng([seed, 7, target
    index])``), the other domain's concept cycling; seeds 9,000,000 + i."""
    dom = grid.domain_of(target)
    names, cross = grid.names(dom), grid.names("object" if dom == "style" else "style")
    rng = np.random.default_rng([seed, 7, names.index(target)])
    others = [n for n in names if n != target]
    chosen = [others[i] for i in sorted(rng.choice(len(others), min(val_other, len(others)), replace=False))]
    rows = []
    for j, name in enumerate([target] * (val_target * tries) + [n for n in chosen for _ in range(tries)]):
        other = cross[(j + names.index(name)) % len(cross)]
        style, obj = (name, other) if dom == "style" else (other, name)
        rows.append((style, obj, grid.prompt(obj, style), 9_000_000 + j))
    return rows


def recognised_plan(ctx, target: str, val_target: int = VAL_TARGET, val_other: int = VAL_OTHER, seed: int = 0,
                    tries: int = 4, sampling_steps: int | None = None):
    """The validation images the search judges: of :func:`validation_plan`'s candidates, generated by the unedited
    model, the first ``val_target`` on which the target-domain judge recognises the target and, per other concept,
    the first one recognised as that concept — so that "not recognised" after an edit means forgotten, not "never
    drawn", and a drop of the others is a real drop. (Departure from the official script, which judges random
    generations: on a generator that misdraws a concept, its first tiny step is "accepted".) Candidates are
    generated round by round, only as many as slots are still empty (the target's next candidates in order, each
    unfilled other concept's next one; most slots fill in the first round), so the selection is the
    first-recognised one in candidate order at a fraction of the ``tries`` × cost. By construction the unedited
    model recognises every chosen image, so the search's baseline is 1.0 on both sides. Returns ``(plan, info)``;
    ``SearchFailed`` when no candidate of the target is recognised."""
    dom = ctx.grid.domain_of(target)
    names = ctx.grid.names(dom)
    cand = validation_plan(ctx.grid, target, val_target, val_other, seed, tries)
    label = [s if dom == "style" else o for s, o, _, _ in cand]
    queue = [i for i in range(len(cand)) if label[i] == target]  # the target's candidates, in order
    other_names = list(dict.fromkeys(n for n in label if n != target))
    per_other = {n: [i for i in range(len(cand)) if label[i] == n] for n in other_names}
    tgt, oth, generated, seen, t_generated, k = [], {}, 0, 0, 0, 0
    while True:
        # as many of the target's next candidates as slots are empty, and each unfilled other concept's k-th
        need = val_target - len(tgt)
        want, queue = queue[:need], queue[need:]
        want += [per_other[n][k] for n in other_names if n not in oth and k < len(per_other[n])]
        if not want:
            break
        imgs = ctx.pipe([cand[i][2] for i in want], [cand[i][3] for i in want], **ctx.sampling(sampling_steps))
        pred = ctx.judges.predict(imgs)[0 if dom == "style" else 1]
        generated, k = generated + len(want), k + 1
        for i, p in zip(want, pred):
            ok = int(p) == names.index(label[i])
            if label[i] == target:
                seen, t_generated = seen + ok, t_generated + 1
                if ok:
                    tgt.append(i)
            elif ok and label[i] not in oth:
                oth[label[i]] = i
    if not tgt:
        raise SearchFailed(f"the unedited generator does not draw {target!r} recognisably on any of "
                           f"{val_target * tries} validation images: there is nothing to forget")
    info = {"candidates_generated": generated, "target_images": len(tgt), "other_images": len(oth),
            "target_recognised": f"{seen}/{t_generated}"}
    return [cand[i] for i in tgt + [oth[n] for n in other_names if n in oth]], info


@torch.no_grad()
def text_states(ctx, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """``[P, context, width]`` float32 CPU: the CLIP text tower's ``last_hidden_state`` of ``prompts`` tokenized by
    the generator's tokenizer at ``ctx.max_length`` — what the generator's UNet reads (the towers are hash-checked
    to be one)."""
    model, tok = ctx.adapter.model, ctx.pipe.tokenizer
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tok(list(prompts[i:i + batch_size]), padding="max_length", max_length=ctx.max_length,
                  truncation=True, return_tensors="pt")["input_ids"].to(dev)
        out.append(model.text_model(input_ids=ids).last_hidden_state.float().cpu())
    return torch.cat(out)


def null_space_order(ctx, target: str, forget: dict, order: list, energy: float,
                     start_fraction: float = NULL_START) -> tuple[dict, list, dict]:
    """The null-space step's gradients and layer order (module docstring): ``(forget gradients with every candidate
    Linear group's replaced by g(I − P), [(layer, start step, target shift)] by descending target shift, record)``.
    The start step is ``start_fraction`` × ‖θ‖/‖g(I − P)‖ (the layer's first tensor, as the SLUG step's); the target
    shift is the mean relative change ‖ΔH‖/‖H‖ of the target prompts' text states at that step. Groups holding a
    non-Linear tensor cannot be projected and are left out; a group whose projected gradient vanishes (< 1e-9 of
    the raw norm) too. Raises :class:`SearchFailed` when none is left."""
    from ..slug.nullspace import module_of, null_space_gradients
    from ..slug.search import edited
    from .sd_conditioning import per_prompt_shift

    model, grid = ctx.adapter.model, ctx.grid
    linear = []
    for layer in order:
        try:
            [module_of(model, n) for n in layer.group]
        except ValueError:
            continue
        linear.append(layer)
    kept = [grid.prompt(o, s) for s, o in grid.other_pairs(target)] + [""]
    names = list(dict.fromkeys(n for layer in linear for n in layer.group))
    proj, tensors = null_space_gradients(model, forget, names, lambda: text_states(ctx, kept), energy=energy)
    projected = {**forget, **proj}
    prompts = [grid.prompt(o, s) for s, o in grid.target_pairs(target)]
    h0 = text_states(ctx, prompts)
    params = dict(model.named_parameters())
    rows = []
    for layer in linear:
        g = float(sum(float(proj[n].float().norm()) ** 2 for n in layer.group)) ** 0.5
        if g < 1e-9 * float(sum(float(forget[n].float().norm()) ** 2 for n in layer.group)) ** 0.5:
            continue
        start = start_fraction * float(params[layer.name].detach().norm()) / max(
            float(proj[layer.name].float().norm()), 1e-30)
        with edited(model, projected, layer.group, start):
            shift = float(per_prompt_shift(h0, text_states(ctx, prompts)).mean())
        rows.append((layer, start, shift))
    if not rows:
        raise SearchFailed(f"the null-space projection (energy {energy:g}) leaves no forget gradient in any candidate "
                           "text layer; lower the energy")
    rows.sort(key=lambda r: -r[2])
    record = {"energy": energy, "kept_prompts": len(kept), "tensors": tensors,
              "order": [{"layer": r[0].name, "start_step": r[1], "target_shift": r[2]} for r in rows]}
    return projected, rows, record


def slug_canvas(target: str, ctx, *, threshold: float = 0.0, ira_budget: float = IRA_BUDGET,
                val_target: int = VAL_TARGET, val_other: int = VAL_OTHER, search_steps: int = SEARCH_STEPS,
                max_searched: int | None = 4, seed: int = 0, sampling_steps: int | None = None,
                start_fraction: float | None = None, step: str = "slug", null_energy: float | None = None,
                progress: bool = False) -> DiffusionEdit:
    """SLUG on ``ctx``'s canvas for ``target`` (module docstring). ``ctx``: a
    :class:`~slugkit.workflows.canvas_lite.CanvasContext` (its adapter restricted to the text layers the generator
    consumes, its mapping from adapter tensor names to ``pipe.text_encoder`` names); ``sampling_steps``: DDIM steps
    of the validation images (default: the context's); ``step``: ``"slug"`` (the paper's) or ``"null-space"``
    (``null_energy``: default :data:`slugkit.slug.nullspace.DEFAULT_ENERGY`); ``start_fraction``: the first step
    in R = ‖θ‖/‖g‖ of the step's own gradient (default :data:`START`, the official 0.4, for ``"slug"``;
    :data:`NULL_START` for ``"null-space"``). ``ValueError`` for another step."""
    from ..slug.nullspace import DEFAULT_ENERGY
    from .vlm_gradients import vlm_layer_order

    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}: {' or '.join(STEPS)}")
    if start_fraction is None:
        start_fraction = NULL_START if step == "null-space" else START

    adapter, pipe, mapping, judges, grid = ctx.adapter, ctx.pipe, ctx.mapping, ctx.judges, ctx.grid
    t_data = time.perf_counter()
    forget, retain = canvas_pairs(ctx, target, seed=seed)
    t0 = time.perf_counter()  # the method's time starts with its data in hand, as the baselines' does
    t_data = t0 - t_data
    searched = []
    try:
        grads = canvas_gradients(ctx, forget, retain, progress=progress)
        order, table = vlm_layer_order(adapter, grads.forget, grads.retain)
        params = dict(adapter.model.named_parameters())
        g_forget, null_space = grads.forget, None  # the step's direction (the projected one with null-space)
        starts = [(layer, start_fraction * float(params[layer.name].detach().norm()) / max(
            float(grads.forget[layer.name].norm()), 1e-30)) for layer in order]
        if step == "null-space":
            energy = DEFAULT_ENERGY if null_energy is None else null_energy
            g_forget, rows, null_space = null_space_order(ctx, target, grads.forget, order, energy, start_fraction)
            starts = [(layer, start) for layer, start, _ in rows]
        plan, val_info = recognised_plan(ctx, target, val_target, val_other, seed, sampling_steps=sampling_steps)
        dom = grid.domain_of(target)
        names = grid.names(dom)
        truth = np.array([names.index(s if dom == "style" else o) for s, o, _, _ in plan])

        def score(group, eta):
            with edited_consumer(pipe.text_encoder, mapping, adapter.model, g_forget, group, eta):
                imgs = pipe([p for _, _, p, _ in plan], [s for *_, s in plan], **ctx.sampling(sampling_steps))
            ps, po = judges.predict(imgs)
            pred = ps if dom == "style" else po
            hit = pred == truth
            is_t = truth == names.index(target)
            return float(hit[is_t].mean()), float(hit[~is_t].mean())

        base_t, base_o = 1.0, 1.0  # recognised_plan chose images the unedited model draws recognisably

        def evaluate(group, eta):
            t_acc, o_acc = score(group, eta)
            return t_acc, base_o - o_acc

        chosen = None
        for layer, start in starts[:max_searched]:
            traj, eta = generator_step_search(lambda e, g=layer.group: evaluate(g, e), start, search_steps, threshold,
                                              ira_budget, first_accepted=True, upper=BRACKET * start,
                                              plateau_stop=step == "null-space")
            searched.append({"layer": layer.name, "group": layer.group, "start_step": start, "trajectory": traj,
                             "accepted_step": eta})
            if eta is not None:
                chosen = (layer, eta)
                break
        if chosen is None:
            n_t = int((truth == names.index(target)).sum())
            share = (f"none of its {n_t} validation images" if threshold <= 0 else
                     f"<= {threshold:.0%} of its validation images")
            raise SearchFailed(f"no searched text layer has a step at which the canvas stops drawing {target!r} "
                               f"(recognised on {share}) while the other {dom}s' "
                               f"accuracy drops <= {ira_budget:.0%} (searched {len(searched)} layers"
                               f"{', null-space step' if step == 'null-space' else ''})"
                               f"{closest(searched, threshold, ira_budget, None)}")
    except SearchFailed as e:  # a refusal costs its search: the caller records this time (as the edit's time_s)
        e.time_s = time.perf_counter() - t0  # and what it measured (a refused row's info: trial 51)
        e.record = {"step": step, "start_fraction": start_fraction, "search": searched}
        raise
    layer, eta = chosen
    values = edited_values(adapter.model, g_forget, layer.group, eta)
    tensors = {mapping[n]: v.detach().float().cpu().contiguous() for n, v in values.items()}
    return DiffusionEdit(tensors, time.perf_counter() - t0, storage(tensors), None,
                         {"layer": layer.name, "group": layer.group, "step_size": eta, "module": "text_encoder",
                          "data_s": t_data,
                          "base_validation": {"target": base_t, "others": base_o, **val_info}, "search": searched,
                          "front": table["fronts"], "step": step, "start_fraction": start_fraction,
                          **({"null_space": null_space} if null_space else {})})


def row_info(info: dict) -> dict:
    """A SLUG row's ``info`` as ``canvas.json`` keeps it: the search's measured steps per layer tried (``search``:
    ``layer``, ``start_step``, ``accepted_step``, ``trajectory`` of ``step_size`` / ``target_recognised`` /
    ``other_drop`` / ``accepted``), without each layer's repeated tensor group (``info.group`` names the chosen
    one). The steps were left out, so "accepted at the first step" could not be read from the files (trial 51)."""
    if "search" not in info:
        return info
    return {**info, "search": [{k: v for k, v in L.items() if k != "group"} for L in info["search"]]}


__all__ = ["IRA_BUDGET", "NULL_START", "SEARCH_STEPS", "STEPS", "VAL_OTHER", "VAL_TARGET", "SearchFailed",
           "canvas_gradients", "canvas_pairs", "null_space_order", "row_info", "slug_canvas", "text_states",
           "validation_plan"]
