"""SLUG for a LLaVA-style VLM: ``slug demo --target vlm`` on the embedded world (issue 14; paper §5.3).

The flow is the paper's for LLaVA-1.5, run on the embedded VLM (:mod:`slugkit.world.vlm`):

1. **CLIP**: the embedded open_clip model converted exactly to a ``transformers.CLIPModel`` — the adapter a user gets
   for ``openai/clip-vit-large-patch14-336``; slugkit checks by tensor hashes that the VLM's vision tower *is* its
   vision tower and restricts the candidates to the encoder layers the VLM reads (``vision_feature_layer = -2``:
   layers 0 .. L-2; :func:`slugkit.integrations.llava.consumed_vision_candidates`).
2. **SLUG** on CLIP: forget pairs of the identity (or identities, jointly) and retain pairs curated from the world's
   pool, gradients, Pareto front and CLIP step-size search, exactly :func:`slugkit.workflows.unlearn.run_unlearn`.
3. **Step for the VLM.** The CLIP criterion is not the VLM's: the step is searched on the **VLM's own answers** to
   "What's the name of the person in this image?" on validation images (the paper uses a 10-image subset per
   identity; here the world's ``val`` split, disjoint from the reported ``test`` images), with the doubling/
   bisection rule of :func:`slugkit.workflows.gen_search.generator_step_search`: accepted when at most
   ``threshold`` of the target's validation images are still named (every target's, for several; an image whose
   answer is another still counts when the VLM gives the name a probability >= ``name_prob``, 0.1) while the other
   identities' naming drops by at most ``other_budget`` on average, the worst of the ``k`` nearest identities (by
   the CLIP text embedding) by at most ``neighbour_budget`` and the utility questions' accuracy by at most
   ``utility_budget``; the collateral is scored at 1.2 × the step (the step applied). Layers are tried in the CLIP
   policy's order (its pick first); a layer whose CLIP search found no step starts from the largest step that
   search tried. No accepted step: the run fails with a clear message and ships no patch.
   ``--vlm-gradient vlm`` (not the paper's): the edit uses the VLM's own answer-loss gradient instead, projected off
   the other identities' and the utility answers' gradients (:func:`vlm_gradients`), on every consumed layer.
   The VLM's is far more selective than the CLIP's on ten identities (README); the default stays the paper's.
4. **Evaluation** on held-out ``test`` images, before and after the patch applied through the LLaVA integration
   (hash-checked, reverted bit-exactly after): naming accuracy of the target(s), of every other identity (mean,
   worst, nearest neighbours) and utility-question accuracy (the benchmark analogue); sample answers in the report.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..common.files import atomic_write_bytes, write_json
from ..common.runfolder import claim_out, run_folder
from ..slug.neighbours import project_off
from ..slug.search import SearchFailed, carried_edits, edited_consumer
from ..world import render as world
from ..world import vlm
from ..world.vlm_train import name_probability
from .gen_search import GeneratorRefused, closest, fallback_partial, generator_step_search, judged
from .vlm_eval import scored_before_after, text_neighbours, vlm_metrics  # noqa: F401  (text_neighbours: re-exported)
from .layer_ft import check_fallback, finetune_refusal
from .vlm_layer_ft import METHOD, finetune_fallback
from .vlm_gradients import vlm_gradients, vlm_layer_order  # noqa: F401  (re-exported: callers know them from here)

DEFAULT_VAL_IMAGES = 10  # the paper's 10-image subset per identity
VAL_OTHER, VAL_NEIGHBOUR, VAL_UTILITY = 5, 20, 3  # validation images per other identity / neighbour / object class
TEST_TARGET, TEST_OTHER, TEST_UTILITY = 50, 20, 10  # reported images (one image moves a neighbour by <= 0.05)
UTILITY_BUDGET = 0.03  # issue 14: utility accuracy may drop by at most 3 points
DEFAULT_MARGIN = 1.2  # applied step = 1.2 x the smallest that forgot on 10 validation images (as the SD demo's)
# A validation image still names the target when the VLM gives the name this probability (name_probability),
# even if its greedy answer is another: the target's validation-to-test gap (README, issue 14: 2 -> 4 of 10)
DEFAULT_NAME_PROB = 0.1


def default_out(targets: list[str]) -> str:
    """``runs/demo-vlm-<Name>[+<Name>...]``."""
    return f"runs/demo-vlm-{'+'.join(t.replace(' ', '_') for t in targets)}"


def vlm_chooser(targets: list[str], llava, processor, mapping: dict[str, str], neighbours: list[str], *,
                val_images: int = DEFAULT_VAL_IMAGES, val_other: int = VAL_OTHER, val_neighbour: int = VAL_NEIGHBOUR,
                val_utility: int = VAL_UTILITY, threshold: float = 0.05, other_budget: float = 0.05,
                neighbour_budget: float | None = 0.20, utility_budget: float = UTILITY_BUDGET, search_steps: int = 8,
                max_searched: int | None = None, gradient: str = "clip", protect_all: bool = True,
                margin: float = DEFAULT_MARGIN, per_image: bool = False, n_protect: int | None = None,
                progress: bool = True, max_layers: int = 1, name_prob: float | None = DEFAULT_NAME_PROB,
                fallback: str | None = None, seed: int = 0):
    """A ``choose`` callback for :func:`slugkit.workflows.unlearn.run_unlearn` (module docstring, point 3).

    ``gradient="clip"``: SLUG's CLIP forget gradient on the CLIP Pareto layers (the paper's method); ``"vlm"``: the
    VLM's own answer-loss gradient (:func:`vlm_gradients`), projected off the other identities' (``protect_all``;
    else the ``neighbours``') and the utility answers' gradients, on every consumed group in
    :func:`vlm_layer_order`, each searched from 0.1 × its ratio; the chosen group's VLM gradient is **written into**
    ``grads.forget``, so the test evaluation and the patch use it. The target is scored at η and the collateral at
    ``margin`` × η, the step finally applied (10 validation images leave noise: without the margin Dorla Volwick
    forgot on validation and was still named on 12 % of 50 test images). A validation image counts as naming the
    target when its answer names it or, with ``name_prob`` (None: answers only), when the VLM gives the full and the
    last name that summed probability or more (:func:`slugkit.world.vlm_train.name_probability`): 0 of 10 named
    left Zomi Harford named on 6 % of the test images, 0 of 10 with the name below 0.1 on each, on none. Raises
    :class:`~slugkit.slug.search.SearchFailed` naming the criteria and the closest step when no layer has an
    accepted step, ``ValueError`` for another ``gradient`` or ``n_protect`` < 1. ``max_layers`` > 1: a refusal
    carries the partial step a next layer may build on and ``choose(..., prior=edits)`` searches that layer with the
    earlier edits in the VLM, drops measured against the unedited VLM, exactly as the SD path's
    (:func:`slugkit.workflows.rounds.generator_rounds`). ``fallback="finetune"`` (**not SLUG**): ``choose.fallback``
    is set, so that when every round refused, the groups of :func:`slugkit.workflows.vlm_layer_ft.fallback_layers`
    are fine-tuned on the unedited VLM's answers in turn (:func:`~slugkit.workflows.vlm_layer_ft.finetune_fallback`,
    ``seed``) and judged by the same criteria; the first accepted is the edit (its displacement, step 1; the record
    says ``edit_method: layer-finetune``), none a refusal with each try's row added to the message."""
    if gradient not in ("clip", "vlm"):
        raise ValueError(f"unknown gradient {gradient!r}: clip or vlm")
    if name_prob is not None and not 0.0 < name_prob <= 1.0:
        raise ValueError(f"name_prob must be in (0, 1] (or None: the answers only), got {name_prob!r}")
    if n_protect is not None and n_protect < 1:
        raise ValueError(f"n_protect must be >= 1 (images per protected identity), got {n_protect}")
    check_fallback(fallback)
    from ..common.progress import status
    from ..slug.search import choose_layer

    named_val = vlm.identity_images("val", val_images, targets)
    named_val.update({n: ims for n, ims in vlm.identity_images("val", max(val_other, val_neighbour)).items()
                      if n not in targets for ims in [ims if n in neighbours else ims[:val_other]]})
    util_val = vlm.utility_images("val", val_utility)

    state = {}  # the unedited VLM's validation scores, measured once (round 1)

    def scorer(adapter, g_edit, group0):
        """``evaluate(group, eta, g=None, scale=margin, label=None)`` on the validation images: the target at η along
        ``g`` (default ``g_edit``), the collateral at ``scale`` × η (the step applied), drops against the unedited VLM
        (measured once, at η = 0 on ``group0``); ``label`` is the SD scorer's (this one prints no step line)."""
        def score(group, eta, likely=False, g=None):
            """The validation scores at ``eta``; with ``likely`` (the target's criterion, not the collateral's)
            also the share of the target's images named or giving the name >= ``name_prob``."""
            likely = likely and name_prob is not None
            with edited_consumer(llava, mapping, adapter.model, g_edit if g is None else g, group, eta):
                raw = vlm.vlm_scores(llava, processor, named_val, util_val, answers=likely)
                m = vlm_metrics(raw, targets)
                if likely:  # an image counts as naming the target when its name is likely
                    from ..integrations.llava import name_match

                    m["target_likely_by_concept"] = {}
                    for t in targets:
                        p = name_probability(llava, processor, named_val[t], t)
                        said = raw["answers"]["name"][t]
                        m["target_likely_by_concept"][t] = sum(
                            name_match(a, t) or q >= name_prob for a, q in zip(said, p)) / len(p)
                return m

        if "base" not in state:
            state["base"] = score(group0, 0.0)
        base = state["base"]

        def evaluate(group, eta, g=None, scale=margin, label=None):
            m = score(group, eta, likely=True, g=g)
            worst_t = max(m["target_likely_by_concept" if name_prob is not None else "target_named_by_concept"]
                          .values())
            if scale != 1.0:
                m = score(group, eta * scale, g=g)  # the collateral at the step that will be applied
            drops = {n: base["per_identity"][n] - m["per_identity"][n] for n in neighbours}
            worst = max(neighbours, key=lambda n: (drops[n], -neighbours.index(n))) if neighbours else None
            return (worst_t, base["other_named"] - m["other_named"], drops[worst] if worst else None, worst,
                    base["utility_accuracy"] - m["utility_accuracy"])

        return evaluate

    def choose(searches, adapter, grads, val_before, clip_policy, prior=()):
        with carried_edits(llava, mapping, adapter.model, [n for e in prior for n in e.search.group]):
            return choose_round(searches, adapter, grads, val_before, clip_policy, list(prior))

    def choose_round(searches, adapter, grads, val_before, clip_policy, prior):
        g_edit, extra = grads.forget, {"round": len(prior) + 1}
        if gradient == "vlm":
            status("gradients of the VLM's answers (forget: the target's name; retain: other names, utility)",
                   progress)
            names = [n for n in adapter.candidate_names() if n in grads.forget]
            protected = [n for n in world.identity_names() if n not in targets] if protect_all else neighbours
            n_prot = n_protect if n_protect is not None else (5 if protect_all else 20)
            g_edit, g_ret, basis = vlm_gradients(llava, processor, mapping, names, targets, protect=protected,
                                                 n_protect=n_prot, per_image=per_image)
            order, extra["vlm_layers"] = vlm_layer_order(adapter, g_edit, g_ret)
            g_edit, extra["protected"] = project_off(g_edit, basis, [s.group for s in order])
            extra["protected_directions"] = (
                f"{len(protected)} identities' names" + (f" on each of {n_prot} images" if per_image else "")
                + " + 3 utility questions x 30 object classes")
            params = dict(adapter.model.named_parameters())
            for s in order:  # the unit of the step: R = ||theta|| / ||g|| of the projected gradient
                gn = float(g_edit[s.name].float().norm())
                s.ratio = float(params[s.name].detach().float().norm()) / gn if gn > 0 else s.ratio
        else:
            found = [s for s in searches if s.step_size is not None]
            first = [choose_layer(found, clip_policy, val_before)] if found else []
            order = first + [s for s in searches if s not in first and s.step_size is not None] + \
                [s for s in searches if s.step_size is None and s.trajectory]

        if not order:
            raise SearchFailed("no candidate layer of the VLM's vision tower has a CLIP step search to start from")
        evaluate = scorer(adapter, g_edit, order[0].group)
        base = state["base"]

        searched, chosen = [], None
        for layer in order[:max_searched]:
            if gradient == "vlm":
                start = 0.1 * layer.ratio
            else:
                start = layer.step_size if layer.step_size is not None else max(t.step_size for t in layer.trajectory)
            status(f"VLM step search on {', '.join(layer.group)} from step {start:.4g}", progress)
            traj, eta = generator_step_search(lambda e, g=layer.group: evaluate(g, e), start, search_steps,
                                              threshold, other_budget, neighbour_budget, utility_budget)
            searched.append({"layer": layer.name, "group": list(layer.group), "clip_step_size": layer.step_size,
                             "start_step": start, "trajectory": traj, "accepted_step": eta})
            if eta is not None:
                chosen = replace(layer, step_size=eta * margin, accepted_step=eta)  # not the CLIP search's
                break
        info = {"gradient": gradient, "neighbours": neighbours, **extra,
                "policy": ("VLM-gradient Pareto front first, by importance" if gradient == "vlm" else
                           "clip order, then layers without a CLIP step"),
                "vlm_search": {"validation_images": val_images, "validation_per_other": val_other,
                               "validation_per_neighbour": val_neighbour, "validation_utility_per_class": val_utility,
                               "threshold": threshold, "other_budget": other_budget,
                               "neighbour_budget": neighbour_budget, "utility_budget": utility_budget,
                               "margin": margin, "name_prob": name_prob,
                               "base_target_named": base["target_named_by_concept"],
                               "base_other_named": base["other_named"], "base_utility": base["utility_accuracy"],
                               "layers_in_order": len(order), "layers": searched}}
        if chosen is None:
            partial = None
            row, why_not = None, ""
            if max_layers > len(prior) + 1:
                row, why_not = fallback_partial(adapter, prior, order, searched,
                                                max(base["target_named_by_concept"].values()), other_budget,
                                                neighbour_budget, utility_budget, probe=evaluate)
            if row is not None:
                info["partial_step"] = {**row, "applied_step": row["step_size"] * margin}
                partial = replace(next(s for s in order if s.name == row["layer"]), step_size=row["step_size"] * margin)
                if gradient == "vlm":
                    grads.forget.update({n: g_edit[n] for n in partial.group})
            raise GeneratorRefused(
                f"no candidate layer of the VLM's vision tower has a step at which the VLM stops naming "
                f"{' + '.join(targets)} (<= {threshold:.0%} of {val_images} validation images"
                + (f" answered with the name or giving it probability >= {name_prob:g}" if name_prob is not None
                   else "") + ") while the other "
                f"identities lose <= {other_budget:.0%} on average"
                + (f", none of the {len(neighbours)} nearest more than {neighbour_budget:.0%}"
                   if neighbour_budget is not None and neighbours else "")
                + f" and utility <= {utility_budget:.0%}{why_not}"
                f"{closest(searched, threshold, other_budget, neighbour_budget, utility_budget)}"
                + "; try "
                + ("--vlm-gradient vlm (the VLM's own gradient, more selective), " if gradient == "clip" else "")
                + ("--vlm-name-prob (a larger P, or off: a looser target criterion, which the test images may not "
                   "bear out), " if name_prob is not None else "")
                + "--other-budget / --neighbour-budget / --vlm-utility-budget, or more --val-images", partial, info)
        info.update(step_size=chosen.step_size, clip_step_size=searched[-1]["clip_step_size"])
        if gradient == "vlm":
            grads.forget.update({n: g_edit[n] for n in chosen.group})
        return chosen, info

    def finetune_after(err, adapter, grads):
        """``choose.fallback`` (``--vlm-fallback finetune``): every SLUG round refused (``err``); the VLM and
        ``adapter.model`` are unedited again. Returns ``(chosen, record)`` and writes the fine-tune's −delta into
        ``grads.forget``, or raises :class:`SearchFailed` with ``err``'s message and each try's row."""
        info = {**(getattr(err, "info", None) or {}), "refusal": str(err)}
        first = adapter.group_of(adapter.candidate_names()[0])  # η = 0: any group is the unedited VLM
        chosen, g_ft, info["fallback"] = finetune_fallback(
            llava, processor, mapping, adapter, targets, neighbours, scorer(adapter, grads.forget, first),
            lambda eta, res: judged(eta, res, threshold, other_budget, neighbour_budget, utility_budget), seed,
            progress)
        if chosen is None:
            refused = SearchFailed(f"{err}{finetune_refusal(info['fallback'], '--vlm-fallback finetune')}")
            refused.info = info
            raise refused from err
        grads.forget.update(g_ft)
        info.update(policy="SLUG refused; " + METHOD, edit_method="layer-finetune", step_size=1.0,
                    clip_step_size=None, why="fine-tuned after SLUG's search refused (--vlm-fallback finetune; "
                    "not SLUG)")
        return chosen, info

    if fallback:
        choose.fallback = finetune_after
    return choose


def _refuse_patched_vlm(vlm_dir) -> None:
    """Raise ``ValueError`` when ``vlm_dir`` holds a VLM a slugkit patch was applied to (``slugkit_patch.json``, not
    reverted): its vision tower is no longer the CLIP's it was built on, and the demo has no other CLIP to take."""
    import json

    record = Path(vlm_dir) / "slugkit_patch.json" if vlm_dir else None
    try:
        info = json.loads(record.read_text(encoding="utf-8")) if record and record.is_file() else None
    except (OSError, ValueError):
        info = None
    if isinstance(info, dict) and not info.get("reverted"):
        built_on = "its clip/" if vlm.vlm_clip_dir(vlm_dir) else "the embedded CLIP"
        raise ValueError(f"--vlm-model {vlm_dir} holds a patched VLM (its slugkit_patch.json: the patch of "
                         f"{info.get('concept')!r} applied), so its vision tower is not that of the CLIP it was built "
                         f"on ({built_on}); the demo unlearns "
                         "from a VLM that holds its CLIP's tower: pass the unpatched folder, or revert it first (slug "
                         "revert --llava DIR --patch PATCH --out DIR2)")


def run_vlm_demo(concepts: list[str] | str | None = None, out: str | Path | None = None, *, data_dir=None,
                 vlm_dir=None, val_images: int = DEFAULT_VAL_IMAGES, threshold: float = 0.05,
                 other_budget: float = 0.05, neighbour_budget: float | None = None,
                 utility_budget: float = UTILITY_BUDGET, n_target: int = TEST_TARGET, n_other: int = TEST_OTHER,
                 n_utility: int = TEST_UTILITY, search=None, seed: int = 0, threads: int | None = 1,
                 progress: bool = True, overwrite: bool = False, budgets=None, neighbours_k: int | None = None,
                 max_searched: int | None = None, gradient: str = "clip", per_image: bool = False,
                 n_protect: int | None = None, max_layers: int | None = None, protect_neighbours: int | None = None,
                 name_prob: float | None = DEFAULT_NAME_PROB, fallback: str | None = None) -> dict:
    """SLUG on the embedded CLIP's vision tower, the step searched and the result measured on the embedded VLM's
    answers; writes ``out`` (``result.json`` with the CLIP demo's keys plus ``vlm.before`` / ``vlm.after``,
    ``report.md`` with sample answers, ``patch/``), assembled in a temporary folder and renamed into place. Several
    ``concepts`` are unlearned jointly (one edit). Raises ``KeyError`` for an unknown identity and
    :class:`~slugkit.slug.search.SearchFailed` when no step passes the VLM criteria (no folder written).
    ``max_layers`` (1–3; default 2): when no layer has an accepted step, the closest step
    within half the budgets and up to ``max_layers`` − 1 more layers
    (:func:`slugkit.workflows.rounds.generator_rounds`); 1: the paper's one layer.
    ``fallback="finetune"`` (**not SLUG**): when every SLUG round refuses, a one-layer fine-tune of the unedited VLM
    on its answers (:mod:`slugkit.workflows.vlm_layer_ft`) judged by the same criteria; a run it passes records
    ``method: "layer-finetune"`` in ``result.json`` and the patch, and says so in the report.
    ``protect_neighbours``: the CLIP run's (None: its default, 10); it projects the CLIP gradient, not the VLM's."""
    from ..eval.collateral import NEIGHBOURS_K, collateral_record
    from ..report.unlearn import clip_section, downstream_head
    from ..report.fallback import fallback_lines
    from ..report.vlm import render_vlm_report
    from ..integrations.llava import consumed_vision_candidates, verify_vision_tower
    from ..world.demo_data import default_concept
    from .sd_demo import _mark_patch, downstream_record
    from .unlearn import run_unlearn
    from .verdict import Budgets, check_downstream_recognised, vlm_verdict
    from .world_runs import world_config

    max_layers = max_layers or 2
    check_fallback(fallback)  # before the folder is claimed
    wanted = [concepts] if isinstance(concepts, str) else list(concepts or [default_concept()])
    targets = [world.identity_by_name(c).name for c in wanted]
    budgets = budgets or Budgets()
    neighbour_budget = budgets.worst_drop if neighbour_budget is None else neighbour_budget
    k = NEIGHBOURS_K if neighbours_k is None else neighbours_k
    out = Path(out if out is not None else default_out(targets))
    n_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        claim_out(out, overwrite)  # an existing run is refused before the loading and the check below
        t0 = time.perf_counter()
        adapter = vlm.vlm_clip_adapter(vlm_dir)  # the embedded CLIP, or the VLM's own clip/ (train-vlm --clip)
        llava, processor = vlm.load_vlm(vlm_dir)
        try:
            mapping = verify_vision_tower(adapter.model, llava)
        except Exception:
            _refuse_patched_vlm(vlm_dir)  # "use the CLIP it was made from" cannot be followed here (trial 26)
            raise
        t_load = time.perf_counter() - t0  # loaded here, so run_unlearn's own load_model timing reads ~0
        adapter.restrict_candidates(consumed_vision_candidates(adapter, llava),
                                    consumer="vision tower of the embedded VLM (LLaVA, vision_feature_layer -2)")
        named = vlm.vlm_scores(llava, processor, vlm.identity_images("val", val_images, targets))["named"]
        check_downstream_recognised(named, threshold, "the unedited VLM names", "check --vlm-model (a VLM "
                                    "trained by `slug world train-vlm` with enough --steps names each identity)")
        neighbours = text_neighbours(adapter, targets, k)
        names = [n for n, _ in neighbours]
        chooser = vlm_chooser(targets, llava, processor, mapping, names, val_images=val_images, threshold=threshold,
                              other_budget=other_budget, neighbour_budget=neighbour_budget,
                              utility_budget=utility_budget, max_searched=max_searched, gradient=gradient,
                              per_image=per_image, n_protect=n_protect, progress=progress, max_layers=max_layers,
                              name_prob=name_prob, fallback=fallback, seed=seed)
        with run_folder(out, overwrite) as stage:  # the whole run folder appears at once, or not at all
            cfg, cur, data = world_config(targets if len(targets) > 1 else targets[0], stage, data_dir,
                                          progress=progress, seed=seed, overwrite=overwrite, budgets=budgets,
                                          threads=threads, **({"search": search} if search is not None else {}))
            # run.json: the converted CLIP (it said open_clip) and the VLM judged on, with the gradient (trial 26)
            own_clip = vlm.vlm_clip_dir(vlm_dir)
            cfg = replace(cfg, model=os.path.realpath(own_clip) if own_clip else "embedded-hf", family="hf_clip",
                          max_layers=max_layers, protect_neighbours=cfg.protect_neighbours if protect_neighbours
                          is None else protect_neighbours)
            vlm_info = {"model": os.path.realpath(vlm_dir) if vlm_dir else "embedded", "gradient": gradient,
                        **({"fallback": fallback} if fallback else {})}
            result = run_unlearn(cfg, adapter=adapter, choose=chooser,
                                 extra_run_info={"curate": cur, "world_data": str(data), "vlm": vlm_info})
            t_slug = time.perf_counter() - t0
            t = time.perf_counter()
            vlm_rec, samples = scored_before_after(llava, processor, stage / "patch", targets, n_target, n_other,
                                                   n_utility)
            vlm_rec["collateral"] = collateral_record(
                {n: v for n, v in vlm_rec["before"]["per_identity"].items() if n not in targets},
                {n: v for n, v in vlm_rec["after"]["per_identity"].items() if n not in targets}, neighbours,
                metric="share of the identity's test images the VLM answers with its name", k=k,
                similarity="cosine of the CLIP text embeddings of the identity templates")
            result["target"] = "vlm"  # the VLM judged on (absolute: `slug audit` reads it from another folder too)
            result["vlm_model"] = vlm_info["model"]
            result["vlm"] = vlm_rec
            result["verdict"] = vlm_verdict(targets, result["verdict"], vlm_rec, threshold, other_budget,
                                            utility_budget, budgets).to_json()
            result["timing_s"]["load_model"] = result["timing_s"].get("load_model", 0.0) + t_load
            result["timing_s"].update(slug_total=t_slug, vlm_eval=time.perf_counter() - t,
                                      total=time.perf_counter() - t0)
            finetuned = result["method"] == "layer-finetune"  # not SLUG: the fallback's displacement is the edit
            _mark_patch(stage / "patch", result["verdict"], edit=(
                f"theta <- theta + delta, delta: {METHOD} (slugkit.workflows.vlm_layer_ft; SLUG refused)" if finetuned
                else "theta <- theta - step_size * g, g: the VLM's own answer-loss gradient projected off the other "
                "identities' and the utility answers' gradients (slugkit.workflows.vlm_demo.vlm_gradients)"
                if gradient == "vlm" else None), target="vlm", **({"method": "layer-finetune"} if finetuned else {}),
                **({"vlm_model": os.path.realpath(vlm_dir)} if vlm_dir else {}),
                downstream=downstream_record("the VLM's answers (target named)", vlm_rec["before"]["target_named"],
                                             vlm_rec["after"]["target_named"], vlm_rec["collateral"]))
            write_json(stage / "result.json", result)
            head = downstream_head(result, "the VLM's answers", "The embedded VLM", "VLM search") + "".join(
                line + "\n" for line in fallback_lines(result["chooser"]) + [""] if finetuned)
            report = (head + clip_section((stage / "report.md").read_text(encoding="utf-8"), result, out)
                      + render_vlm_report(result, samples))
            atomic_write_bytes(stage / "report.md", report.encode("utf-8"))
        return result
    finally:
        torch.set_num_threads(n_threads)
