"""The step search on a downstream model's outputs and its multi-layer fallback (issue 12): the doubling/bisection
rule shared by the text-to-image demo (:mod:`slugkit.workflows.sd_generator`), the VLM demo
(:mod:`slugkit.workflows.vlm_demo`) and SLUG on a canvas (:mod:`slugkit.workflows.canvas_slug`), the refusal that
carries a partial step, and how that partial step is found."""

from __future__ import annotations

import math

from ..common.text import group_label
from ..slug.search import SearchFailed


def generator_step_search(evaluate, start: float, steps: int = 6, threshold: float = 0.05,
                          other_budget: float = 0.05, neighbour_budget: float | None = None,
                          utility_budget: float | None = None, first_accepted: bool = False,
                          upper: float = math.inf, plateau_stop: bool = False):
    """The doubling/bisection rule on η with both criteria measured on *generated* validation images, as the official
    UnlearnCanvas search does with ua / ira (spec §4.4), but seeded, on validation seeds only, and without its
    re-evaluate-the-same-step no-op. ``evaluate(η)`` returns ``(target_recognised, other_drop)`` or
    ``(target_recognised, other_drop, worst_neighbour_drop, worst_neighbour)`` or, with a fifth element, also the
    ``utility_drop`` (the VLM demo's utility questions); the others are *damaged* when their mean drop exceeds
    ``other_budget`` or (with ``neighbour_budget``) the worst nearest neighbour's drop exceeds ``neighbour_budget``
    or (with ``utility_budget``) the utility drop exceeds it:

    * forgot (target ≤ ``threshold``) and others kept: accepted; try smaller;
    * forgot but others damaged: the step is too large; try smaller;
    * not forgotten and others already damaged: larger steps only damage more — this layer cannot do it; stop;
    * neither: try larger (double while no upper bound is known).

    With ``first_accepted`` the search stops at the first accepted η (SLUG's UnlearnCanvas script: "stop when UA-hit
    is 0 and the IRA change is < 0.1, or after 11 iterations"). ``upper``: a known upper end of the bracket (that
    script's ``r_hi = 10 × start``: growing bisects towards it instead of doubling). ``plateau_stop`` (not the
    official rule; the canvas's null-space step): leave the layer when two successive growing steps measured the
    same recognition and the same drop — measured on the canvas, a null-space edit that has not moved the target by
    5.5 × its first step did not move it up to the bracket's end either, and the official bisection towards that end
    spent 9 more generations per such layer (a refusal searching 4 layers: 40 s instead of ~11). Returns
    (trajectory, smallest accepted η or None).
    """
    lo, hi, eta, best, traj = 0.0, upper, start, None, []
    for _ in range(steps):
        row, forgot, harm = judged(eta, evaluate(eta), threshold, other_budget, neighbour_budget, utility_budget)
        ok = row["accepted"]
        if (plateau_stop and not (forgot or harm) and traj and not traj[-1]["accepted"]
                and traj[-1]["step_size"] < eta and traj[-1]["target_recognised"] == row["target_recognised"]
                and traj[-1]["other_drop"] == row["other_drop"]):
            traj.append({**row, "plateau": True})
            break
        traj.append(row)
        if ok:
            best = eta if best is None else min(best, eta)
            if first_accepted:
                break
        if forgot or harm:
            if harm and not forgot:
                break
            hi = eta
            eta = (lo + hi) / 2
        else:
            lo = eta
            eta = eta * 2 if math.isinf(hi) else (lo + hi) / 2
    return traj, best


def judged(eta: float, result: tuple, threshold: float, other_budget: float, neighbour_budget: float | None = None,
           utility_budget: float | None = None) -> tuple[dict, bool, bool]:
    """``(trajectory row, forgot, harm)`` of one evaluated step (``result``: what :func:`generator_step_search`'s
    ``evaluate`` returns)."""
    rec, drop, *nb = result
    forgot = rec <= threshold + 1e-9
    nb_harm = bool(nb) and nb[0] is not None and neighbour_budget is not None and nb[0] > neighbour_budget + 1e-9
    util_harm = len(nb) > 2 and utility_budget is not None and nb[2] > utility_budget + 1e-9
    harm = drop > other_budget + 1e-9 or nb_harm or util_harm
    row = {"step_size": eta, "target_recognised": rec, "other_drop": drop, "accepted": forgot and not harm}
    if nb:
        row.update(neighbour_drop=nb[0], worst_neighbour=nb[1] if len(nb) > 1 else None)
    if len(nb) > 2:
        row["utility_drop"] = nb[2]
    return row, forgot, harm


PROBE_HALVINGS, PROBE_LAYERS = 3, 2  # the fallback's smaller steps when no measured one qualifies (fallback_partial)


class GeneratorRefused(SearchFailed):
    """No searched layer has an accepted step. ``partial``: the layer at the step from which a second layer may
    finish the removal (:func:`partial_row`; None: none qualifies), ``info``: the round's chooser record."""

    def __init__(self, message: str, partial=None, info: dict | None = None):
        super().__init__(message)
        self.partial, self.info = partial, info or {}


def partial_row(searched: list[dict], base_target: float, other_budget: float,
                neighbour_budget: float | None, allowed=None, utility_budget: float | None = None) -> dict | None:
    """The multi-layer fallback's first edit (issue 12, :func:`slugkit.workflows.rounds.generator_rounds`): among
    every step the generator search measured, the one that lowered the concept's validation recognition most while
    the others' mean drop stayed within **half** ``other_budget``, the worst neighbour's within half
    ``neighbour_budget`` and (rows that carry one, the VLM's) the utility drop within half ``utility_budget`` (the
    other half is left to the next layer); ties → the least mean damage. Only steps that
    lowered the recognition below ``base_target`` qualify, and only layers in ``allowed`` (None: any; the
    fallback passes those after which another layer still fits the patch-size cap). Costs no generation: the
    trajectories are reused.
    Returns ``{"layer", "step_size" (η at which the concept was measured), ...the trajectory row}`` or None."""
    rows = []
    for L in searched:
        if allowed is not None and L["layer"] not in allowed:
            continue
        for t in L["trajectory"]:
            nb, ut = t.get("neighbour_drop"), t.get("utility_drop")
            if (t["target_recognised"] < base_target - 1e-9 and t["other_drop"] <= other_budget / 2 + 1e-9
                    and (nb is None or neighbour_budget is None or nb <= neighbour_budget / 2 + 1e-9)
                    and (ut is None or utility_budget is None or ut <= utility_budget / 2 + 1e-9)):
                rows.append({"layer": L["layer"], **({"group": L["group"]} if L.get("group") else {}), **t})
    return min(rows, key=lambda r: (r["target_recognised"], r["other_drop"]), default=None)


def fallback_partial(adapter, prior, order, searched: list[dict], base_target: float, other_budget: float,
                     neighbour_budget: float | None, utility_budget: float | None = None, probe=None,
                     halvings: int = PROBE_HALVINGS, probe_layers: int = PROBE_LAYERS) -> tuple[dict | None, str]:
    """``(row, why_not)``: :func:`partial_row` among the searched layers after which another candidate still fits
    the patch-size cap (:func:`slugkit.workflows.rounds.room_after`, the ``prior`` edits counted), and — when there
    is none — the reason a refusal gives for not trying a second layer.

    ``probe(group, η)`` (the chooser's ``evaluate``): when no measured step qualifies, smaller steps are measured —
    the search leaves a layer at its first step when that step already harms the others without forgetting, so
    nothing smaller was seen. On up to ``probe_layers`` allowed searched layers, those whose lowest measured
    recognition is lowest first, η_min·2^-j (j = 1..``halvings``, η_min the smallest step measured on the layer) is
    evaluated until a step qualifies; each probed step is appended to its layer's trajectory with ``"probe": True``
    (so the record shows every generation paid for). Costs up to ``probe_layers`` × ``halvings`` validation
    generations, only on a refusal."""
    from .rounds import room_after

    kept = [list(e.search.group) for e in prior]
    allowed = {s.name for s in order if room_after(adapter, kept + [list(s.group)])}
    row = partial_row(searched, base_target, other_budget, neighbour_budget, allowed, utility_budget)
    if row is not None:
        return row, ""
    groups = {s.name: s.group for s in order}
    layers = sorted((L for L in searched if L["layer"] in allowed and L["trajectory"]),
                    key=lambda L: min(t["target_recognised"] for t in L["trajectory"]))
    for L in layers[:probe_layers] if probe is not None else []:
        eta = min(t["step_size"] for t in L["trajectory"])
        for _ in range(halvings):
            eta /= 2
            got, _, _ = judged(eta, probe(groups[L["layer"]], eta), 0.0, other_budget, neighbour_budget,
                               utility_budget)  # never accepted: smaller than a step that did not forget
            L["trajectory"].append({**got, "accepted": False, "probe": True})
            row = partial_row([L], base_target, other_budget, neighbour_budget, allowed, utility_budget)
            if row is not None:
                return row, ""
    smallest = (f" (the smallest: {described(group_label(layers[0]), layers[0]['trajectory'][-1])}; unedited "
                f"{base_target:.2f})" if probe is not None and layers else None)
    if partial_row(searched, base_target, other_budget, neighbour_budget, None, utility_budget) is not None:
        return None, (" (no second layer: the layers whose steps lowered it within half the budgets leave no room "
                      "for another within the 1% patch-size cap" + (
                          f"; nor did {halvings} halvings of the other layers' smallest steps{smallest}"
                          if smallest else "") + ")")
    return None, (" (no second layer: no searched step lowered it within half the budgets" + (
        f", nor {halvings} halvings of the closest layers' smallest steps{smallest}" if smallest else "") + ")")


def closest(searched: list[dict], threshold: float, other_budget: float, neighbour_budget: float | None,
            utility_budget: float | None = None) -> str:
    """``"; closest: <layer> step η: ..."`` for a refusal: the searched step that came nearest to acceptance (among
    those that forgot, the least damage relative to the budgets; else the lowest recognition of the concept)."""
    def harm(t):
        h = t["other_drop"] / max(other_budget, 1e-9)
        if t.get("neighbour_drop") is not None and neighbour_budget is not None:
            h = max(h, t["neighbour_drop"] / max(neighbour_budget, 1e-9))
        if t.get("utility_drop") is not None and utility_budget is not None:
            h = max(h, t["utility_drop"] / max(utility_budget, 1e-9))
        return h

    rows = [(group_label(L), t) for L in searched for t in L["trajectory"]]
    if not rows:
        return ""
    forgot = [r for r in rows if r[1]["target_recognised"] <= threshold + 1e-9]
    layer, t = min(forgot, key=lambda r: harm(r[1])) if forgot else min(rows, key=lambda r: r[1]["target_recognised"])
    return f"; closest: {described(layer, t)}"


def described(layer: str, t: dict) -> str:
    """``"<layer> step η: concept recognised r, others −d[, worst neighbour …][, utility …]"``: one measured step.
    A row with a utility drop is the VLM's (only its search measures one), whose answers name the person or not:
    ``"named on r of the validation images"``."""
    nb = (f", worst neighbour {t['worst_neighbour']!r} {0.0 - t['neighbour_drop']:+.2f}"  # 0 - x: no "-0.00"
          if t.get("neighbour_drop") is not None else "")
    ut = f", utility {0.0 - t['utility_drop']:+.3f}" if t.get("utility_drop") is not None else ""
    rec = (f"named on {t['target_recognised']:.2f} of the validation images" if "utility_drop" in t else
           f"concept recognised {t['target_recognised']:.2f}")
    return (f"{layer.removeprefix('text_model.encoder.')} step {t['step_size']:.4g}: {rec}, "
            f"others {0.0 - t['other_drop']:+.3f}{nb}{ut}")
