"""SLUG for text-to-image pipelines: ``slug demo --target sd`` on the embedded world.

The flow is SD's (spec §6.1), run on the embedded stand-ins:

1. **CLIP**: the embedded open_clip model converted exactly to a ``transformers.CLIPModel``
   (:func:`slugkit.models.convert.embedded_hf_clip`), wrapped in :class:`~slugkit.models.hf_clip.HFClipAdapter` —
   the adapter a user gets for ``openai/clip-vit-large-patch14`` (SD 1.5) or ``laion/CLIP-ViT-H-14-...`` (SD 2.1).
2. **Pipeline**: :class:`~slugkit.world.t2i.EmbeddedT2IPipeline` (a diffusers ``UNet2DConditionModel`` conditioned on
   the CLIP text tower's ``last_hidden_state``). slugkit checks by tensor hashes that ``pipe.text_encoder`` *is* the
   CLIP text tower, then restricts the candidates to the text-tower tensors the pipeline consumes.
3. **SLUG**: gradients on forget pairs of the concept (images + captions) and retain pairs, Pareto front, step-size
   search on CLIP zero-shot metrics (30-way over the object classes), exactly :func:`slugkit.unlearn.run_unlearn`.
4. **Layer and step for a generator.** t2i-notes.md measured that CLIP's zero-shot ranking tolerates conditioning
   shifts a small UNet does not, and that the CLIP-searched step is not the step at which the generator forgets.
   So, among the Pareto layers whose CLIP search forgot the concept, slugkit picks the one whose edit moves the
   *other* concepts' conditioning (relative L2 change of ``last_hidden_state``) least *relative to* how much it
   moves the forgotten concept's conditioning (``--sd-selection shift``, the default; ``clip`` uses the CLIP
   policy), and then searches that layer's step on **generated validation images** (the official UnlearnCanvas
   search does this too with ua / ira, spec §4.4; here seeded, on validation seeds disjoint from the reported
   ones): the doubling/bisection rule from the CLIP step, accepted when at most ``gen_threshold`` of the concept's
   validation images are still recognised *and* the other concepts' validation recognition drops by at most
   ``other_budget`` at the applied step (``gen_margin`` x the accepted step, default 1.2, a noise margin like the
   CLIP search's 1.1). Layers are tried in selectivity order until one has an accepted step; if none has, the run
   fails with a clear message rather than shipping a patch that damages the pipeline (``--no-gen-search``: the
   CLIP step of the most selective layer, unchecked).
   **Nearest neighbours** (issue 12: a mean over 29 concepts hid purple triangle 0.9 → 0.2 when red triangle was
   erased): the 5 concepts nearest the target by the pipeline's own text encoder (cosine of the projected pooled
   features of their 8 prompts, :func:`slugkit.eval.generated.target_neighbours`) get 20 validation images each
   and a step is accepted only if none of them loses more than ``neighbour_budget`` (default: the verdict's
   ``worst_drop``, 0.20) besides the mean bound. ``--sd-step null-space`` projects each layer's forget gradient
   onto the null space of its inputs on the other concepts' prompts (:mod:`slugkit.slug.nullspace`).
5. **Evaluation** on generated images (fixed seeds, the same seeds before and after): each image is classified
   zero-shot by the **unedited** embedded CLIP over the 30 concepts. Reported: ``generated_target_recognised``
   (UA = 1 − it), ``generated_other_recognised`` (IRA: the other concepts' prompts; split into *related* — sharing a
   colour or a shape with the target — and *unrelated*), and CLIP score (100 × cosine of image and prompt in the
   judge); ``collateral`` (:func:`slugkit.eval.collateral.collateral_record`): every other concept's before/after,
   the worst, and the nearest neighbours, which get ``n_neighbour`` (20) images each so that one image moves their
   estimate by at most 0.05. There is no cross-domain (CRA) figure: the embedded generator knows one domain.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..common.files import atomic_write_bytes, write_json
from ..common.runfolder import claim_out, run_folder
from ..eval.generated import DEFAULT_N_NEIGHBOUR, collateral_of, image_grid, target_neighbours
from ..report.fallback import fallback_lines
from ..report.sd import CLIP_TERMS, render_generation_report
from ..report.unlearn import clip_section, downstream_head
from ..world import render as world
from ..world import t2i
from .layer_ft import FINETUNE_METHOD
from .sd_layer_ft import METHOD as FT_METHOD
from .sd_generator import concept_prompts, generation_metrics, generator_chooser, related_to, validation_plans
from .verdict import Budgets, check_downstream_recognised, sd_verdict, verdict_fields

DEFAULT_SD_CONCEPT = "red triangle"
SD_CRITERION = "forget_top1"  # zero-shot over 30 concepts: top-5 would demand the concept leave a sixth of the list
DEFAULT_GEN_MARGIN = 1.2  # applied step = 1.2 x the smallest step that forgot on validation (noise margin)
NEIGHBOUR_SIMILARITY = ("cosine of the pipeline text encoder's projected pooled features (8 prompts per concept "
                        "averaged)")


def embedded_hf_adapter():
    """The embedded CLIP as an :class:`HFClipAdapter` (:func:`slugkit.models.hf_clip.embedded_hf_adapter`)."""
    from ..models.hf_clip import embedded_hf_adapter as converted

    return converted()


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def write_concept_data(concept: str, out: Path, n_forget: int = 100, retain_per_identity: int = 10,
                       retain_per_class: int = 10) -> dict:
    """Forget and retain pair shards for an object concept, drawn from the world's pool split.

    forget: ``n_forget`` captioned images of the concept; retain: ``retain_per_class`` of every other object class
    and ``retain_per_identity`` of every identity (29·10 + 60·10 = 890 by default). Also writes ``concepts.txt``.
    """
    c = t2i.concept_by_name(concept)
    out.mkdir(parents=True, exist_ok=True)
    forget = world.make_samples("pool", "utility", n_forget, classes=[c.index])
    others = [k.index for k in world.UTILITY_CLASSES if k.index != c.index]
    retain = world.make_samples("pool", "utility", retain_per_class, classes=others)
    retain += world.make_samples("pool", "identity", retain_per_identity)
    # Interleave so every retain batch mixes identities and objects (sorted by a fixed hash of the key).
    retain.sort(key=lambda s: hash_key(s.key))
    world.write_pair_shards(forget, out, prefix="forget", per_shard=10_000)
    world.write_pair_shards(retain, out, prefix="retain", per_shard=10_000)
    atomic_write_bytes(out / "concepts.txt", ("\n".join(t2i.concept_names()) + "\n").encode())
    return {"concept": c.name, "n_forget": len(forget), "n_retain": len(retain),
            "forget": str(out / "forget-00000.tar"), "retain": str(out / "retain-00000.tar")}


def hash_key(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


def _pil(images: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]


# ----------------------------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------------------------


def run_sd_demo(concept: str = DEFAULT_SD_CONCEPT, out: str | Path | None = None, *, data_dir=None,
                t2i_dir=None, n_target: int = 50, n_other: int = 10, gen_steps: int = 20,
                guidance: float = t2i.DEFAULT_GUIDANCE, selection: str = "shift", gen_search: bool = True,
                gen_margin: float | None = None, val_images: int = 20, val_other: int = 1,
                gen_threshold: float = 0.05, other_budget: float = 0.05, search=None, seed: int = 0,
                threads: int | None = 1, progress: bool = True, overwrite: bool = False, batch_size: int = 64,
                budgets=None, neighbours_k: int | None = None, n_neighbour: int = DEFAULT_N_NEIGHBOUR,
                val_neighbour: int = DEFAULT_N_NEIGHBOUR, neighbour_budget: float | None = None,
                step: str = "slug", null_energy: float | None = None, null_layers: str = "front",
                max_searched: int | None = None, max_layers: int = 2, fallback: str | None = None,
                protect_neighbours: int | None = None) -> dict:
    """SLUG on the embedded CLIP's text tower, applied to the embedded text-to-image pipeline; writes ``out``
    with ``result.json → verdict`` judged on the generated images (:func:`slugkit.workflows.verdict.sd_verdict`:
    ``gen_threshold`` + ``budgets.forget_tolerance``, ``other_budget``, ``budgets.worst_drop``)
    (assembled in a temporary folder and renamed into place at the end, :func:`slugkit.common.runfolder.run_folder`).

    ``protect_neighbours``: the CLIP run's (:class:`~slugkit.workflows.unlearn.UnlearnConfig`; None: its default,
    10): its step is projected off the nearest concepts' gradients, 0 the paper's step.

    Worst-case collateral (issue 12): the ``neighbours_k`` (default :data:`slugkit.eval.collateral.NEIGHBOURS_K`)
    concepts nearest the target by the pipeline's text encoder (:func:`target_neighbours`) get ``n_neighbour``
    reported images each (the others ``n_other``) and ``val_neighbour`` validation images each; the search bounds
    the worst neighbour's validation drop by ``neighbour_budget`` (default ``budgets.worst_drop``, 0.20).
    ``step="null-space"``: the projected SLUG step (:func:`slugkit.workflows.sd_generator.generator_chooser`);
    ``null_layers="all"`` with it: every Linear group of the consumed text tower is a candidate, not only the CLIP
    Pareto layers that forgot; ``max_searched``: the generator search tries at most that many layers.
    ``max_layers`` (1–3): when no layer has an accepted step, the closest layer's partial step and up to
    ``max_layers`` − 1 more layers, each searched on the edited model
    (:func:`slugkit.workflows.rounds.generator_rounds`); 1: the paper's single layer. ``fallback="finetune"``
    (**not SLUG**, needs the generator search): when every SLUG round refused, one layer of the text encoder is
    fine-tuned on the generator (:mod:`slugkit.workflows.sd_layer_ft`) and judged by the same validation criteria;
    a passing edit is written as ``method: "layer-finetune"`` in ``result.json`` and the patch, and the report says
    so."""
    from ..eval.collateral import NEIGHBOURS_K
    from ..slug.search import SearchConfig
    from ..world.demo_data import ensure_world_data
    from .unlearn import run_unlearn

    concept = t2i.concept_by_name(concept).name
    if fallback not in (None, "finetune"):
        raise ValueError(f"fallback must be None or 'finetune', got {fallback!r}")
    if fallback and not gen_search:
        raise ValueError("fallback='finetune' is judged on generated validation images: it needs the generator "
                         "search (gen_search=True)")
    gen_margin = DEFAULT_GEN_MARGIN if gen_margin is None else gen_margin
    budgets = budgets or Budgets()
    k = NEIGHBOURS_K if neighbours_k is None else neighbours_k
    neighbour_budget = budgets.worst_drop if neighbour_budget is None else neighbour_budget
    out = Path(out if out is not None else f"runs/demo-sd-{concept.replace(' ', '_')}")
    n_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        claim_out(out, overwrite)  # an existing run is refused before the loading and the check below
        t0 = time.perf_counter()
        adapter, pipe, mapping, judge = _clip_and_pipeline(t2i_dir)
        t_load = time.perf_counter() - t0  # loaded here, so run_unlearn's own load_model timing reads ~0
        tplan = validation_plans(concept, [], val_images, 0, 0, seed)[0]  # the generator search's own images
        base_target = t2i.recognition(pipe, judge, tplan, gen_steps, guidance)[0][concept]
        check_downstream_recognised({concept: base_target}, gen_threshold, "the unedited pipeline draws",
                                    "check --t2i-model (a model trained by `slug world train-t2i` with enough "
                                    "--steps draws each concept)")
        with run_folder(out, overwrite) as stage:  # no folder when there is nothing to unlearn
            data = ensure_world_data(data_dir, progress=progress)
            cd = write_concept_data(concept, stage / "data")
            neighbours = target_neighbours(pipe, concept, t2i.concept_names(), concept_prompts, k,
                                           projection=adapter.model.text_projection)
            names = [c for c, _ in neighbours]
            cfg = _sd_config(concept, stage, data, cd, search or SearchConfig(metric=SD_CRITERION),
                             batch_size=batch_size, seed=seed, progress=progress, overwrite=overwrite,
                             budgets=budgets, max_layers=max_layers,
                             **({} if protect_neighbours is None else {"protect_neighbours": protect_neighbours}))
            chooser = generator_chooser(concept, pipe, judge, mapping, policy=selection, gen_search=gen_search,
                                        gen_margin=gen_margin, val_images=val_images, val_other=val_other,
                                        threshold=gen_threshold, other_budget=other_budget,
                                        gen_steps=gen_steps, guidance=guidance, seed=seed, neighbours=names,
                                        val_neighbour=val_neighbour, neighbour_budget=neighbour_budget,
                                        step=step, null_energy=null_energy, null_layers=null_layers,
                                        max_searched=max_searched, max_layers=max_layers,
                                        base_target=base_target, fallback=fallback, progress=progress)
            result = run_unlearn(cfg, adapter=adapter, choose=chooser,  # writes into the temporary folder
                                 extra_run_info={"sd": {"step": step, "fallback": fallback}})
            t_slug = time.perf_counter() - t0

            t = time.perf_counter()
            plan = reported_plan(concept, n_target, n_other, names, n_neighbour, seed_base=10_000 * (seed + 1))
            gen, imgs_b, imgs_a = _generation_before_after(pipe, judge, plan, stage, concept, (n_target, n_other),
                                                           gen_steps, guidance, progress)
            gen["images"].update(per_neighbour=n_neighbour, neighbours=len(names))
            gen["collateral"] = collateral_of(gen["before"], gen["after"], concept, neighbours, k, NEIGHBOUR_SIMILARITY)
            t_gen = time.perf_counter() - t
            _write_grid(concept, plan, imgs_b, imgs_a, stage / "generations.png", gen["collateral"])

            result["target"] = "sd"
            result["pipeline"] = {"kind": "embedded text-to-image (diffusers UNet2DConditionModel, pixel space)",
                                  "model": os.path.realpath(t2i_dir) if t2i_dir else "embedded",  # what to apply to
                                  "text_encoder_verified": True, "consumer": adapter.consumer,
                                  "candidates": len(adapter.candidate_names())}
            result["generation"] = gen
            result["verdict"] = sd_verdict(concept, result["verdict"], gen["before"], gen["after"], gen_threshold,
                                           other_budget, budgets.forget_tolerance).to_json()
            finetuned = result["method"] == FINETUNE_METHOD  # not SLUG: the fallback's displacement is the edit
            _mark_patch(stage / "patch", result["verdict"], step, edit=(
                f"theta <- theta + delta, delta: {FT_METHOD} (slugkit.workflows.sd_layer_ft; SLUG refused)"
                if finetuned else None), **({"method": FINETUNE_METHOD} if finetuned else {}),
                downstream=downstream_record(
                "generated images", gen["before"]["generated_target_recognised"],
                gen["after"]["generated_target_recognised"], gen["collateral"]))
            result["timing_s"]["load_model"] = result["timing_s"].get("load_model", 0.0) + t_load
            result["timing_s"]["slug_total"] = t_slug
            result["timing_s"]["generation_eval"] = t_gen
            result["timing_s"]["total"] = time.perf_counter() - t0
            write_json(stage / "result.json", result)
            report = (downstream_head(result, "the generated images", "Generated images", "generator search",
                                      CLIP_TERMS)
                      + "".join(line + "\n" for line in fallback_lines(result["chooser"]) + [""] if finetuned)
                      + clip_section((stage / "report.md").read_text(encoding="utf-8"), result, out)
                      + _generation_report(result))
            atomic_write_bytes(stage / "report.md", report.encode("utf-8"))
        return result
    finally:
        torch.set_num_threads(n_threads)


def _generation_report(result: dict) -> str:
    """:func:`render_generation_report`; a layer off the CLIP Pareto front (``null_layers="all"``) has no CLIP step,
    which the report then says instead of a number."""
    chooser = result.get("chooser") or {}
    if "clip_step_size" not in chooser or chooser["clip_step_size"] is not None:
        return render_generation_report(result)
    md = render_generation_report({**result, "chooser": {**chooser, "clip_step_size": float("nan")}})
    return md.replace("(the CLIP search's step for this layer: nan)",
                      "(a layer off the CLIP Pareto front: no CLIP step; --null-space-layers all)")


def downstream_record(judged_on: str, before: float, after: float, collateral: dict | None) -> dict:
    """``extra.downstream`` of a patch judged on a downstream model: the concept's recognition before → after there,
    the other concepts' mean drop and the worst one; `slug inspect` prints it beside the CLIP metrics (an SD patch
    looked failed: its CLIP FA@1 0.66 was all inspect showed; ninth trial)."""
    w = (collateral or {}).get("worst") or {}
    return {"judged_on": judged_on, "concept": [before, after], "others_mean_drop": (collateral or {}).get("mean_drop"),
            "worst_other": [w.get("concept"), w.get("drop"), w.get("before"), w.get("after")]}  # drop, then values


def _mark_patch(folder: Path, verdict: dict, step: str = "slug", edit: str | None = None, **fields) -> None:
    """Record the pipeline's verdict in the patch (``extra.verdict``; the CLIP run marked it with CLIP's, which does
    not decide for a generator) and, for the null-space step (or any ``edit`` text), what the edit is
    (``extra.edit``), and any other ``fields`` (e.g. ``target="vlm"``; ``method`` replaces the patch's own
    ``method``, "slug", e.g. with "layer-finetune"). Only ``patch.json`` changes; the tensors
    and their hashes stay as they are."""
    from ..patch import load_patch, save_patch

    patch = load_patch(folder)
    extra = dict(patch.meta.get("extra") or {})
    method = fields.pop("method", patch.meta.get("method"))  # the patch's own "method" (e.g. layer-finetune)
    want = {**verdict_fields(verdict), **fields}
    if edit is not None:
        want["edit"] = edit
    elif step == "null-space":
        want["edit"] = ("theta <- theta - step_size * g (I - P): the forget gradient projected onto the null space "
                        "of the layer's inputs on the other concepts' prompts (slugkit.slug.nullspace)")
    if any(extra.get(key) != v for key, v in want.items()) or method != patch.meta.get("method"):
        patch.meta["extra"] = {**extra, **want}
        patch.meta["method"] = method
        save_patch(patch, folder, overwrite=True)


def reported_plan(concept: str, n_target: int, n_other: int, neighbours: list[str], n_neighbour: int,
                  seed_base: int) -> list[tuple[str, str, int]]:
    """The reported ``(concept, prompt, seed)`` triples: :func:`slugkit.world.t2i.generation_plan` (``n_target`` of
    the concept, ``n_other`` of each other) with each nearest neighbour topped up to ``n_neighbour`` images, seeds and
    prompts continuing its own (``seed_base + 1000·k + i``, template i mod 8), so the first ``n_other`` are the
    plain plan's."""
    plan = t2i.generation_plan(concept, n_target, n_other, seed_base=seed_base)
    want = set(neighbours)
    out = []
    for k, name in enumerate(t2i.concept_names()):
        own = [it for it in plan if it[0] == name]
        extra = range(len(own), n_neighbour) if name in want else range(0)
        out += own + [(name, t2i.prompt_for(name, i), seed_base + 1000 * k + i) for i in extra]
    return out


def _clip_and_pipeline(t2i_dir):
    """The converted CLIP (candidates restricted to what the pipeline's text encoder feeds the UNet), the pipeline
    built on its text tower (checked by tensor hashes to *be* that tower), the CLIP→pipeline name map and the
    judge."""
    from ..integrations.diffusers_sd import consumed_text_candidates, verify_text_encoder

    adapter = embedded_hf_adapter()
    pipe = t2i.EmbeddedT2IPipeline.load(t2i_dir, clip=(adapter.model, adapter.tokenizer))
    mapping = verify_text_encoder(adapter.model, pipe.text_encoder)
    judge = t2i.ConceptJudge()
    adapter.restrict_candidates(consumed_text_candidates(adapter, pipe.text_encoder),
                                consumer="text encoder of the embedded text-to-image pipeline")
    return adapter, pipe, mapping, judge


def _sd_config(concept: str, out: Path, data: Path, cd: dict, search, **kw):
    """The SLUG run on the object concept: forget/retain from :func:`write_concept_data`; the zero-shot "identities"
    are the 30 object concepts and "utility" the world's identities."""
    from .unlearn import UnlearnConfig

    return UnlearnConfig(
        concept=concept, out=str(out), model="embedded-hf", family="hf_clip", forget=cd["forget"], retain=cd["retain"],
        val_identities=str(data / "val" / "utility"), test_identities=str(data / "test" / "utility"),
        names=str(out / "data" / "concepts.txt"), identity_templates=list(world.UTILITY_EVAL_TEMPLATES),
        utility_val=str(data / "val" / "identities"), utility_test=str(data / "test" / "identities"),
        utility_templates=list(world.IDENTITY_EVAL_TEMPLATES), search=search,
        aliases=t2i.concept_phrases(concept)[1:], **kw)


def _generation_before_after(pipe, judge, plan, out: Path, concept: str, counts: tuple[int, int], gen_steps: int,
                             guidance: float, progress: bool):
    """Recognition and CLIP score of the plan's generated images before and after the patch in ``out/patch`` (same
    seeds; ``counts`` = images of the concept, of each other concept), the pipeline reverted bit-exactly afterwards;
    returns (metrics, images before, images after)."""
    from ..integrations.diffusers_sd import apply_patch_to_pipeline, revert_patch_from_pipeline
    from ..patch import load_patch, tensor_sha256

    rec_b, imgs_b, _ = t2i.recognition(pipe, judge, plan, gen_steps, guidance, progress)
    patch = load_patch(out / "patch")
    before_hash = {n: tensor_sha256(p) for n, p in pipe.text_encoder.named_parameters()}
    apply_patch_to_pipeline(pipe, patch)
    try:
        rec_a, imgs_a, _ = t2i.recognition(pipe, judge, plan, gen_steps, guidance, progress)
    finally:
        revert_patch_from_pipeline(pipe, patch)
    if {n: tensor_sha256(p) for n, p in pipe.text_encoder.named_parameters()} != before_hash:
        raise RuntimeError("revert did not restore the pipeline's text encoder bit-exactly")
    prompts = [p for _, p, _ in plan]
    gen = {"before": generation_metrics(rec_b, concept), "after": generation_metrics(rec_a, concept)}
    gen["before"]["clip_score"] = judge.clip_score(imgs_b, prompts)
    gen["after"]["clip_score"] = judge.clip_score(imgs_a, prompts)
    gen["images"] = {"target": counts[0], "per_other_concept": counts[1], "other_concepts": len(rec_b) - 1,
                     "sampler": f"DDIM {gen_steps} steps, guidance {guidance}", "seed_base": plan[0][2]}
    return gen, imgs_b, imgs_a


def _write_grid(concept: str, plan, imgs_b, imgs_a, path: Path, collateral: dict | None = None) -> None:
    """``generations.png``: the target and five others — the most damaged other concept and the nearest neighbours
    (``collateral``; it showed the first related concepts by name, not the cyan circle that lost 0.30: trial 44),
    topped up with related ones — 8 seeds each, before | after."""
    first = ([collateral["worst"]["concept"]] if collateral and collateral.get("worst") else []) + [
        n["concept"] for n in ((collateral or {}).get("neighbours") or {}).get("concepts", [])]
    rest = sorted([c for c in t2i.concept_names() if c != concept], key=lambda c: (not related_to(c, concept), c))
    show = [concept] + list(dict.fromkeys(c for c in first + rest if c != concept))[:5]
    rows = []
    for c in show:
        idx = [i for i, (cc, _, _) in enumerate(plan) if cc == c][:8]
        rows.append((c, _pil(imgs_b[idx]), _pil(imgs_a[idx])))
    image_grid(rows, path)
