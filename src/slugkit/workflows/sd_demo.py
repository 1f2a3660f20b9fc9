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
5. **Evaluation** on generated images (fixed seeds, the same seeds before and after): each image is classified
   zero-shot by the **unedited** embedded CLIP over the 30 concepts. Reported: ``generated_target_recognised``
   (UA = 1 − it), ``generated_other_recognised`` (IRA: the other concepts' prompts; split into *related* — sharing a
   colour or a shape with the target — and *unrelated*), and CLIP score (100 × cosine of image and prompt in the
   judge). There is no cross-domain (CRA) figure: the embedded generator knows one domain (objects).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..world import render as world
from ..common.files import atomic_write_bytes
from ..eval.generated import image_grid
from ..slug.search import SearchFailed, edited_values
from ..world import t2i

DEFAULT_SD_CONCEPT = "red triangle"
SD_CRITERION = "forget_top1"  # zero-shot over 30 concepts: top-5 would demand the concept leave a sixth of the list
DEFAULT_GEN_MARGIN = 1.2  # applied step = 1.2 x the smallest step that forgot on validation (noise margin)


def embedded_hf_adapter():
    """The embedded CLIP as an :class:`HFClipAdapter` (exact conversion; see :mod:`slugkit.models.convert`)."""
    from transformers import CLIPImageProcessor

    from ..models.convert import embedded_hf_clip
    from ..models.hf_clip import HFClipAdapter
    from ..world.train import MEAN, STD

    hf, tok, _ = embedded_hf_clip()
    proc = CLIPImageProcessor(size={"shortest_edge": world.IMAGE_SIZE},
                              crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
                              image_mean=list(MEAN), image_std=list(STD))
    return HFClipAdapter(hf, tok, proc, {"family": "hf_clip", "model": "embedded (converted to transformers)",
                                         "pretrained": None})


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
    """A ``choose`` callback for :func:`slugkit.unlearn.run_unlearn` (module docstring, point 4).

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
                threads: int | None = 1, progress: bool = True, overwrite: bool = False, batch_size: int = 64) -> dict:
    """SLUG on the embedded CLIP's text tower, applied to the embedded text-to-image pipeline; writes ``out``."""
    from ..integrations.diffusers_sd import (apply_patch_to_pipeline, consumed_text_candidates,
                                            revert_patch_from_pipeline, verify_text_encoder)
    from ..patch import load_patch, tensor_sha256
    from ..slug.search import SearchConfig
    from ..common.files import write_json
    from .unlearn import UnlearnConfig, check_out_dir, run_unlearn
    from ..world.demo_data import ensure_world_data

    concept = t2i.concept_by_name(concept).name
    gen_margin = DEFAULT_GEN_MARGIN if gen_margin is None else gen_margin
    out = Path(out or f"runs/demo-sd-{concept.replace(' ', '_')}")
    check_out_dir(out, overwrite)
    n_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        data = ensure_world_data(data_dir, progress=progress)
        cd = write_concept_data(concept, out / "data")
        adapter = embedded_hf_adapter()
        pipe = t2i.EmbeddedT2IPipeline.load(t2i_dir, clip=(adapter.model, adapter.tokenizer))
        mapping = verify_text_encoder(adapter.model, pipe.text_encoder)
        judge = t2i.ConceptJudge()
        adapter.restrict_candidates(consumed_text_candidates(adapter, pipe.text_encoder),
                                    consumer="text encoder of the embedded text-to-image pipeline")
        search = search or SearchConfig(metric=SD_CRITERION)
        cfg = UnlearnConfig(
            concept=concept, out=str(out), model="embedded-hf", forget=cd["forget"], retain=cd["retain"],
            val_identities=str(data / "val" / "utility"), test_identities=str(data / "test" / "utility"),
            names=str(out / "data" / "concepts.txt"), identity_templates=list(world.UTILITY_EVAL_TEMPLATES),
            utility_val=str(data / "val" / "identities"), utility_test=str(data / "test" / "identities"),
            utility_templates=list(world.IDENTITY_EVAL_TEMPLATES),
            batch_size=batch_size, search=search, seed=seed, progress=progress, overwrite=overwrite)
        chooser = generator_chooser(concept, pipe, judge, mapping, policy=selection, gen_search=gen_search,
                                    gen_margin=gen_margin, val_images=val_images, val_other=val_other,
                                    threshold=gen_threshold, other_budget=other_budget,
                                    gen_steps=gen_steps, guidance=guidance, seed=seed)
        result = run_unlearn(cfg, adapter=adapter, choose=chooser)
        t_slug = time.perf_counter() - t0

        # ---- generation before / after, same seeds
        t = time.perf_counter()
        plan = t2i.generation_plan(concept, n_target, n_other, seed_base=10_000 * (seed + 1))
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
        gen["images"] = {"target": n_target, "per_other_concept": n_other, "other_concepts": len(rec_b) - 1,
                         "sampler": f"DDIM {gen_steps} steps, guidance {guidance}", "seed_base": plan[0][2]}
        t_gen = time.perf_counter() - t

        # ---- grid: the target and a few others (related first), 8 seeds each
        show = [concept] + sorted([c for c in t2i.concept_names() if c != concept],
                                  key=lambda c: (not related_to(c, concept), c))[:5]
        rows = []
        for c in show:
            idx = [i for i, (cc, _, _) in enumerate(plan) if cc == c][:8]
            rows.append((c, _pil(imgs_b[idx]), _pil(imgs_a[idx])))
        image_grid(rows, out / "generations.png")

        result["target"] = "sd"
        result["pipeline"] = {"kind": "embedded text-to-image (diffusers UNet2DConditionModel, pixel space)",
                              "text_encoder_verified": True, "consumer": adapter.consumer,
                              "candidates": len(adapter.candidate_names())}
        result["generation"] = gen
        result["timing_s"]["slug_total"] = t_slug
        result["timing_s"]["generation_eval"] = t_gen
        result["timing_s"]["total"] = time.perf_counter() - t0
        write_json(out / "result.json", result)
        report = (out / "report.md").read_text(encoding="utf-8") + render_generation_report(result)
        atomic_write_bytes(out / "report.md", report.encode("utf-8"))
        return result
    finally:
        torch.set_num_threads(n_threads)


def render_generation_report(result: dict) -> str:
    g = result["generation"]
    b, a = g["before"], g["after"]
    lines = ["", "## Generated images (embedded text-to-image pipeline, patched text encoder)", "",
             f"{g['images']['target']} images of the forgotten concept, {g['images']['per_other_concept']} of each of "
             f"{g['images']['other_concepts']} other concepts ({g['images']['sampler']}; same seeds before and "
             "after), classified zero-shot by the unedited embedded CLIP over the 30 concepts.", "",
             "| metric | before | after |", "|---|---|---|"]
    for k, label in [("generated_target_recognised", "forgotten concept recognised"),
                     ("generated_other_recognised", "other concepts recognised (IRA)"),
                     ("generated_related_recognised", "… related (same colour or shape)"),
                     ("generated_unrelated_recognised", "… unrelated"),
                     ("clip_score", "CLIP score (judge)")]:
        fb, fa = b.get(k), a.get(k)
        lines.append(f"| {label} | {fb:.3f} | {fa:.3f} |" if fb is not None else f"| {label} | – | – |")
    lines += ["", "Layer choice for the generator (conditioning shift = relative change of the text encoder's "
              "`last_hidden_state`):", "", "| layer | step | target shift | other shift | other/target |",
              "|---|---|---|---|---|"]
    for r in result.get("chooser", {}).get("conditioning_shift", []):
        lines.append(f"| {r['layer']} | {r['step_size']:.4g} | {r['target_shift']:.3f} | {r['other_shift']:.3f} | "
                     f"{r['selectivity']:.3f} |")
    gs = result.get("chooser", {}).get("generator_search")
    if gs:
        lines += ["", f"Step search on generated validation images ({gs['validation_images']} images of the concept and "
                  f"{gs['validation_per_other_concept']} of each other concept, seeds disjoint from the ones above;"
                  " "
                  f"accepted when at most {gs['threshold']:.0%} of the concept's images are recognised and the others "
                  f"lose at most {gs['other_budget']:.0%} at the applied step = {result['chooser']['gen_margin']} x "
                  f"step; unedited: {gs['base_target_recognised']:.0%} / {gs['base_other_recognised']:.0%}):", "",
                  "| layer | step | concept recognised | others' drop | accepted |", "|---|---|---|---|---|"]
        for L in gs["layers"]:
            lines += [f"| {L['layer']} | {t['step_size']:.4g} | {t['target_recognised']:.2f} | "
                      f"{t['other_drop']:+.3f} | {'yes' if t['accepted'] else 'no'} |" for t in L["trajectory"]]
        lines += ["", f"Applied step: {result['step_size']:.4g} (the CLIP search's step for this layer: "
                  f"{result['chooser']['clip_step_size']:.4g})."]
    lines += ["", "In the CLIP table at the top of this report, \"other identities\" are the 29 other object concepts "
              "and \"utility\" the world's 60 identities (the SD demo unlearns an object concept).", "",
              "![before/after](generations.png)", ""]
    return "\n".join(lines)


def print_sd_summary(result: dict, out: str) -> None:
    g = result["generation"]
    b, a = g["before"], g["after"]
    print()
    print(f"SLUG unlearned {result['concept']!r} from the embedded text-to-image pipeline by editing "
          f"{', '.join(result['group'])} (step {result['step_size']:.4g}) of its CLIP text encoder")
    print("| generated images | before | after |")
    print("|---|---|---|")
    print(f"| '{result['concept']}' recognised | {b['generated_target_recognised']:.3f} | "
          f"{a['generated_target_recognised']:.3f} |")
    print(f"| other concepts recognised | {b['generated_other_recognised']:.3f} | "
          f"{a['generated_other_recognised']:.3f} |")
    print(f"| CLIP score | {b['clip_score']:.2f} | {a['clip_score']:.2f} |")
    m = result["metrics"]
    print(f"CLIP (test): FA@1 {m['before']['forget_top1']:.3f} -> {m['after']['forget_top1']:.3f}, other concepts "
          f"top-1 {m['before']['related_top1']:.3f} -> {m['after']['related_top1']:.3f}")
    t = result["timing_s"]
    print(f"time: SLUG {t['slug_total']:.1f} s, generation eval {t['generation_eval']:.1f} s; "
          f"patch {result['patch']['bytes']:,} bytes")
    print(f"outputs: {out}/result.json, report.md, generations.png, patch/")
