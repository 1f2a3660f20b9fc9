"""Beyond one layer, when one is not enough (issue 12): the multi-layer fallback of a SLUG run.

The paper edits one layer and names the limit itself: for some concepts no single Pareto layer reaches the forget
criterion within the drop budgets. When that happens (no layer's search accepted a step, or every accepted layer
breaks the worst-neighbour or the utility budget on validation) and ``max_layers`` > 1, the run

1. takes a **partial step** on the layer the policy would have chosen (or, when none forgot, the layer whose search
   got closest): the largest η in {η_L·2^-j, j = 0..:data:`PARTIAL_HALVINGS`} at which validation keeps every other
   identity's drop within **half** the worst budget and the utility drop within half the utility budget (the other
   half is left to the next layer);
2. applies it to the model (temporarily, restored at the end), **recomputes the forget and retain gradients on the
   edited model** (one more gradient pass), ranks the remaining candidates (the edited layer's tensors are not
   candidates again), projects the step off the neighbours as in round 1, and searches the new Pareto front;
3. chooses among the new layers with the same policy and budgets, measured against the **unedited** model's
   validation metrics; if that layer still breaks the worst budget and ``max_layers`` allows, repeats from 1;
4. when the last round still breaks a budget, keeps round 1's single layer if it is no further past its budgets on
   validation (:func:`excess`; the fallback must earn its extra layer), and says so in ``why``.

Each round costs one gradient pass and is recorded (layer, step, relative change, why) in ``result.json →
layers_edited``; the patch holds every edited group (it must stay ≤ 1% of the model's bytes: a second layer that would
exceed it is not a candidate). A run whose last round still fails the criterion raises
:class:`~slugkit.slug.search.SearchFailed` (no patch); one that forgets but still breaks the worst budget is written
with the verdict's ``worst_drop`` warning. ``max_layers = 1`` is the paper's method.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

from ..common.progress import status
from ..eval.zeroshot import PARTS, SuiteEvaluator
from ..slug.search import SearchFailed, choose_layer, edited, edited_values, worst_val_drop

PARTIAL_HALVINGS = 6
PATCH_SHARE = 0.01  # the patch stays within this share of the model's bytes
# a later round's why: it met the budgets on the validation images, what the search sees — the test images decide the
# verdict (a failed run's layer table said "completes the removal", twenty-third trial)
VALIDATED = "completes the removal within the budgets on the validation images (the verdict is the test images')"


@dataclass
class Edit:
    """One edited group: the layer's search record (``step_size`` = the η applied) and the gradients it used."""

    search: object  # slugkit.slug.search.LayerSearch
    grads: object  # slugkit.slug.gradients.Gradients (projected forget gradients of its round)
    why: str
    round: int
    searches: list = field(default_factory=list)  # rounds > 1: every layer that round searched (LayerSearch)

    def to_json(self) -> dict:
        s = self.search
        return {"layer": s.name, "group": s.group, "tower": s.tower, "step_size": s.step_size,
                "relative_change": s.step_size / s.ratio, "round": self.round, "why": self.why}


@contextlib.contextmanager
def applied(model, edits: list[Edit]):
    """All ``edits`` applied to ``model`` in place (each θ ← θ − η·g of its round); the exact bytes restored on exit."""
    with contextlib.ExitStack() as stack:
        for e in edits:
            stack.enter_context(edited(model, e.grads.forget, e.search.group, e.search.step_size))
        yield


def composed_values(model, edits: list[Edit]) -> dict:
    """The new values of every tensor ``edits`` change (what the patch stores), = :func:`applied`'s values bit for
    bit: each edit's θ − η·g computed on the values before it, in round order (a tensor edited twice holds both
    steps; the rounds edit disjoint groups, each θ − η·g of the unedited model). CPU tensors in the model's dtype."""
    values: dict = {}
    for e in edits:
        values.update(edited_values(model, e.grads.forget, e.search.group, e.search.step_size, base=values))
    return values


def shortfall(chosen, val_before: dict, worst_budget: float | None, utility_budget: float | None = None) -> str | None:
    """Why the chosen layer is not enough (``None``: it is): its validation worst single-identity drop, or its
    validation utility drop, over budget."""
    if chosen is None:
        return "no Pareto layer reached the forget criterion"
    name, drop = worst_val_drop(chosen.val_metrics, val_before)
    if worst_budget is not None and drop > worst_budget + 1e-6:
        return f"{chosen.name} forgets but drops {name!r} by {drop:.2f} on validation (> worst budget {worst_budget:g})"
    u0, u1 = val_before.get("utility_top1"), (chosen.val_metrics or {}).get("utility_top1")
    if utility_budget is not None and u0 is not None and u1 is not None and u0 - u1 > utility_budget + 1e-6:
        return (f"{chosen.name} forgets but drops utility by {u0 - u1:.3f} on validation (> utility budget "
                f"{utility_budget:g})")
    return None


def excess(chosen, val_before: dict, worst_budget: float | None, utility_budget: float | None) -> float:
    """How far past its budgets a choice is on validation: max(worst drop / worst budget, utility drop / utility
    budget) (≤ 1: within both). What the fallback compares round 1's single layer with."""
    out = 0.0
    if worst_budget is not None:  # a budget of 0 counts every drop (1e-9: no division by zero)
        out = worst_val_drop(chosen.val_metrics, val_before)[1] / max(worst_budget, 1e-9)
    u0, u1 = val_before.get("utility_top1"), (chosen.val_metrics or {}).get("utility_top1")
    if utility_budget is not None and u0 is not None and u1 is not None:
        out = max(out, (u0 - u1) / max(utility_budget, 1e-9))
    return out


def partial_step(adapter, grads, layer, val_eval: SuiteEvaluator, val_before: dict, worst_budget: float | None,
                 utility_budget: float):
    """``layer`` at the largest of η_L·2^-j (j = 0..PARTIAL_HALVINGS) whose validation metrics keep the worst
    single-identity drop and the utility drop within half their budgets (against ``val_before``); None when none
    does.
    η_L: the applied step, or the largest step the search evaluated when it accepted none."""
    eta = layer.step_size or max(st.step_size for st in layer.trajectory)
    cache = val_eval.prepare(layer.name, PARTS)
    for _ in range(PARTIAL_HALVINGS + 1):
        with edited(adapter.model, grads.forget, layer.group, eta):
            m = val_eval.evaluate_cached(cache)
        _, worst = worst_val_drop(m, val_before)
        util_drop = (val_before.get("utility_top1") or 0.0) - (m.get("utility_top1") or 0.0)
        if (worst_budget is None or worst <= worst_budget / 2 + 1e-6) and util_drop <= utility_budget / 2 + 1e-6:
            return replace(layer, step_size=eta, val_metrics=m)
        eta /= 2
    return None


def closest(searches):
    """The searched layer whose trajectory reached the lowest criterion metric (ties → front order)."""
    def best(s):
        return min((st.metrics.get("forget_top5", st.metrics.get("forget_top1", 1.0)) for st in s.trajectory),
                   default=1.0)
    return min(searches, key=best)


def group_bytes(adapter, groups: list[list[str]]) -> int:
    """Bytes of the distinct tensors of ``groups`` (a group edited in two rounds counts once)."""
    params = dict(adapter.model.named_parameters())
    return sum(params[n].numel() * params[n].element_size() for n in dict.fromkeys(n for g in groups for n in g))


def room_after(adapter, groups: list[list[str]]) -> list[str]:
    """The candidates a next round may edit once ``groups`` are edited: not already edited, and the patch of all of
    them within :data:`PATCH_SHARE` of the model's bytes (a patch stores new and base values: ~2x the tensors).

    Measured and not kept: letting a generator round step an edited layer again, along the gradient recomputed on
    the edited model (commit 66bfeac; README, "A second layer" of the VLM section) — on the embedded VLM's first 10
    identities it passed as many as before with ``--max-layers 2`` (one gained, one lost)."""
    cap = PATCH_SHARE * adapter.model_bytes() / 2
    done = {n for g in groups for n in g}
    used = group_bytes(adapter, groups)
    return [n for n in adapter.candidate_names() if n not in done and
            used + group_bytes(adapter, [adapter.group_of(n)]) <= cap]


def next_front(cfg, adapter, data, names: list[str], stages) -> tuple:
    """One more round's SLUG step on the (edited) model: gradients of ``names``, their ranking, the neighbour
    projection and the step-size search on the new Pareto front; returns (gradients, searches)."""
    grads, _ = stages["gradients"](cfg, adapter, data, names)
    table = stages["layers"](cfg, adapter, grads, None, names)
    grads, _, ratios = stages["protect"](cfg, adapter, grads, table, data)
    round_eval = SuiteEvaluator(adapter, data["val_suite"], cfg.eval_batch_size)
    return grads, stages["search"](cfg, adapter, grads, table, ratios, round_eval)


def more_rounds(cfg, adapter, data, first: tuple, val_before: dict, stages) -> list[Edit]:
    """Round 1's outcome ``first = (searches, chosen or None, grads)`` extended by the fallback (module docstring).

    ``stages``: the run's stage functions ``{"gradients", "layers", "protect", "search"}`` (those of
    :mod:`slugkit.workflows.unlearn`, so each round is the same SLUG step on the edited model). Returns the edits
    in order; raises :class:`SearchFailed` when no round forgets."""
    searches, chosen, grads = first
    budget = cfg.search.worst_budget
    why = shortfall(chosen, val_before, budget, cfg.budgets.utility_drop)
    if why is None or cfg.max_layers <= 1:
        if chosen is None:
            raise SearchFailed("no Pareto layer reached the forget criterion within the search budget; try more "
                               "--steps, a larger forget set, --criterion forget_top1, or --max-layers 2")
        note = "" if why is None else f"; {why} (no second layer: --max-layers {cfg.max_layers})"
        return [Edit(chosen, grads, "chosen by the layer policy" + note, 1)]
    edits, tried = [], ""
    single, first_grads = chosen, grads  # round 1's own choice, kept when the fallback does no better
    for rnd in range(1, cfg.max_layers):
        layer = chosen if chosen is not None else closest(searches)
        with applied(adapter.model, edits):
            base_eval = SuiteEvaluator(adapter, data["val_suite"], cfg.eval_batch_size)
            part = partial_step(adapter, grads, layer, base_eval, val_before, budget, cfg.budgets.utility_drop)
        if part is None:  # even a small step of it breaks a budget: nothing to build on
            tried = f"no partial step of {layer.name} stays within half the budgets"
            break
        closest_note = "" if chosen is not None else f" ({layer.name} got closest)"
        edits.append(Edit(part, grads, f"partial step: {why}{closest_note}", rnd))
        status(f"round {rnd + 1}: {why}; recomputing gradients on the edited model", cfg.progress)
        with applied(adapter.model, edits):
            names = room_after(adapter, [e.search.group for e in edits])
            if not names:
                chosen, tried = None, "no other candidate fits the patch-size cap"
                break
            grads, searches = next_front(cfg, adapter, data, names, stages)
        try:
            chosen = choose_layer(searches, cfg.search.selection, val_before, budget, cfg.budgets.utility_drop)
        except SearchFailed:
            chosen = None
        why = shortfall(chosen, val_before, budget, cfg.budgets.utility_drop)
        if why is None or rnd + 1 >= cfg.max_layers:
            break
    if chosen is None and single is None:
        raise SearchFailed(f"no combination of up to {cfg.max_layers} layers reached the forget criterion within the "
                           f"budgets ({why}); try --worst-budget, more --steps or a larger forget set")
    if why is not None and single is not None and (
            chosen is None or excess(single, val_before, budget, cfg.budgets.utility_drop)
            <= excess(chosen, val_before, budget, cfg.budgets.utility_drop)):
        tried = tried or " + ".join([e.search.name for e in edits] + ([chosen.name] if chosen is not None else []))
        return [Edit(single, first_grads, f"single layer kept: the fallback ({tried}) did no better ({why})", 1)]
    edits.append(Edit(chosen, grads, VALIDATED if why is None
                      else f"best found; {why}", len(edits) + 1, searches))
    return edits


def generator_rounds(cfg, adapter, data, first: tuple, val_before: dict, choose, stages) -> tuple[list[Edit], dict]:
    """The multi-layer fallback for a ``choose`` callback that judges on a downstream model's outputs (the SD demo's
    :func:`~slugkit.workflows.sd_generator.generator_chooser`): round 1 is ``choose`` on round 1's searches; when it
    refuses (:class:`~slugkit.workflows.gen_search.GeneratorRefused`) but names a partial step (the layer and step
    that lowered the concept most within half the budgets) and ``cfg.max_layers`` allows, that partial edit is
    applied, the gradients are recomputed on the edited model (one more gradient pass, as :func:`more_rounds`), the
    remaining candidates are ranked and searched, and ``choose(..., prior=edits)`` judges the next layer with every
    earlier edit applied, its budgets measured against the unedited pipeline. A run whose last round still refuses
    raises :class:`SearchFailed` (no patch; its ``info`` holds every round's record, as a refusal in round 1 carries
    its own), unless ``choose`` has a ``fallback`` attribute (``fallback(error, adapter, round 1's gradients)`` →
    ``(chosen, record)``, e.g. the SD chooser's ``--sd-fallback finetune``, not SLUG): then that makes the one edit
    on the unedited model, or raises. Returns (edits, the chooser record: the last round's, with every
    round's under ``rounds`` when there are several)."""
    try:
        return _generator_rounds(cfg, adapter, data, first, val_before, choose, stages)
    except SearchFailed as e:
        fallback = getattr(choose, "fallback", None)  # e.g. --sd-fallback finetune: not SLUG, labelled as such
        if fallback is None:
            raise
        grads = first[2]
        chosen, info = fallback(e, adapter, grads)  # on the unedited model; raises SearchFailed when it fails too
        return [Edit(chosen, grads, info["why"], 1)], info


def _generator_rounds(cfg, adapter, data, first: tuple, val_before: dict, choose, stages) -> tuple[list[Edit], dict]:
    searches, _, grads = first
    edits, infos = [], []
    for rnd in range(1, max(cfg.max_layers, 1) + 1):
        with applied(adapter.model, edits):
            if rnd > 1:
                names = room_after(adapter, [e.search.group for e in edits])
                if not names:
                    raise SearchFailed(f"{infos[-1]['refusal']}; no other candidate fits the patch-size cap for a "
                                       f"round {rnd} (no patch)")
                status(f"round {rnd}: partial step of {', '.join(edits[-1].search.group)}; recomputing gradients "
                       "on the edited model", cfg.progress)
                grads, searches = next_front(cfg, adapter, data, names, stages)
            try:
                chosen, info = choose(searches, adapter, grads, val_before, cfg.search.selection,
                                      **({"prior": list(edits)} if edits else {}))
            except SearchFailed as e:
                partial = getattr(e, "partial", None)
                infos.append({**getattr(e, "info", {}), "refusal": str(e)})
                if partial is None or rnd >= cfg.max_layers:
                    if not edits:
                        raise
                    err = SearchFailed(f"{len(edits) + 1} rounds of layer edits did not forget within the budgets "
                                       f"(round 1: {infos[0]['refusal']}; round {rnd}: {e}) (no patch)")
                    err.info = {**infos[-1], "rounds": infos}  # every round's search, for the refusal's record
                    raise err from e
                edits.append(Edit(partial, grads, f"partial step (no single layer forgets within the budgets; "
                                  f"lowered the concept most within half of them): {str(e).split(';')[0]}", rnd))
                continue
        infos.append(info)
        edits.append(Edit(chosen, grads, info.get("why", "chosen by the generator-aware search") if rnd == 1 else
                          f"{VALIDATED} (generator-aware search)", rnd,
                          searches if rnd > 1 else []))  # round 1's searches are the run's own (records.py)
        break
    return edits, infos[0] if len(infos) == 1 else {**infos[-1], "rounds": infos}
