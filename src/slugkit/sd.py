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
4. **Layer choice for a generator.** t2i-notes.md measured that CLIP's zero-shot ranking tolerates conditioning
   shifts a small UNet does not, so that the layer with the best CLIP retention damaged other prompts most. Among
   the Pareto layers whose search forgot the concept, slugkit therefore picks the one whose edit moves the
   *other* concepts' conditioning (relative L2 change of ``last_hidden_state``) least *relative to* how much it
   moves the forgotten concept's conditioning (``--sd-selection shift``, the default; ``clip`` uses the CLIP policy).
   Then, because the generator needs a somewhat larger shift than CLIP's argmax to drop a concept,
   the step is multiplied by ``gen_margin`` (default 1.0 = the CLIP-searched step; see the README for measured values).
5. **Evaluation** on generated images (fixed seeds, the same seeds before and after): each image is classified
   zero-shot by the **unedited** embedded CLIP over the 30 concepts. Reported: ``generated_target_recognised``
   (UA = 1 − it), ``generated_other_recognised`` (IRA: the other concepts' prompts; split into *related* — sharing a
   colour or a shape with the target — and *unrelated*), and CLIP score (100 × cosine of image and prompt in the
   judge). There is no cross-domain (CRA) figure: the embedded generator knows one domain (objects).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .data import world
from .data.shards import atomic_write_bytes
from .world import t2i

DEFAULT_SD_CONCEPT = "red triangle"
SD_CRITERION = "forget_top1"  # zero-shot over 30 concepts: top-5 would demand the concept leave a sixth of the list
DEFAULT_GEN_MARGIN = 1.0


def embedded_hf_adapter():
    """The embedded CLIP as an :class:`HFClipAdapter` (exact conversion; see :mod:`slugkit.models.convert`)."""
    from transformers import CLIPImageProcessor

    from .models.convert import embedded_hf_clip
    from .models.hf_clip import HFClipAdapter
    from .world.train import MEAN, STD

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
    from .world.t2i import CONTEXT_LENGTH

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
    from .slug.search import edited

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


def generator_chooser(target: str, policy: str = "shift", gen_margin: float = 1.0):
    """A ``choose`` callback for :func:`slugkit.unlearn.run_unlearn` (see the module docstring, point 4)."""
    from .slug.search import choose_layer

    def choose(searches, adapter, grads, val_before, clip_policy):
        rows = shift_table(adapter, grads, searches, target, gen_margin)
        if policy == "clip" or not rows:
            chosen = choose_layer(searches, clip_policy, val_before)
        else:
            best = min(rows, key=lambda r: (r["selectivity"], r["other_shift"]))
            chosen = next(s for s in searches if s.name == best["layer"])
        if gen_margin != 1.0:
            chosen = replace(chosen, step_size=chosen.step_size * gen_margin)
        return chosen, {"policy": policy, "gen_margin": gen_margin, "conditioning_shift": rows}

    return choose


# ----------------------------------------------------------------------------------------------------------------
# Generation metrics
# ----------------------------------------------------------------------------------------------------------------


def related_to(a: str, b: str) -> bool:
    ca, cb = t2i.concept_by_name(a), t2i.concept_by_name(b)
    return ca.colour == cb.colour or ca.shape == cb.shape


@torch.no_grad()
def clip_score(judge: t2i.ConceptJudge, images: torch.Tensor, prompts: list[str]) -> float:
    from .world.train import normalise

    ad = judge.adapter
    fi = ad.encode_image(normalise(images))
    ft = ad.encode_text(ad.tokenize(prompts))
    return float(100.0 * (fi * ft).sum(-1).clamp_min(0).mean())


def generation_metrics(per_concept: dict[str, float], target: str) -> dict:
    others = {c: v for c, v in per_concept.items() if c != target}
    rel = [v for c, v in others.items() if related_to(c, target)]
    unrel = [v for c, v in others.items() if not related_to(c, target)]
    return {"generated_target_recognised": per_concept[target],
            "generated_other_recognised": float(np.mean(list(others.values()))),
            "generated_related_recognised": float(np.mean(rel)) if rel else None,
            "generated_unrelated_recognised": float(np.mean(unrel)) if unrel else None,
            "UA": 1.0 - per_concept[target], "IRA": float(np.mean(list(others.values()))),
            "per_concept": per_concept}


def image_grid(rows: list[tuple[str, torch.Tensor, torch.Tensor]], path: Path, scale: int = 3) -> None:
    """PNG: per prompt a row of before images, a gap, the same seeds after; labelled on the left."""
    from PIL import Image, ImageDraw

    n = max(b.shape[0] for _, b, _ in rows)
    s = world.IMAGE_SIZE * scale
    label_w, gap, pad = 150, 16, 2
    W = label_w + 2 * n * (s + pad) + gap
    H = 18 + len(rows) * (s + pad)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.text((label_w, 2), "before", fill=(0, 0, 0))
    d.text((label_w + n * (s + pad) + gap, 2), "after (patched text encoder, same seeds)", fill=(0, 0, 0))
    for r, (label, before, after) in enumerate(rows):
        y = 18 + r * (s + pad)
        d.text((4, y + s // 2 - 6), label, fill=(0, 0, 0))
        for j, imgs in enumerate((before, after)):
            x0 = label_w + j * (n * (s + pad) + gap)
            for k in range(imgs.shape[0]):
                im = Image.fromarray(imgs[k].permute(1, 2, 0).numpy()).resize((s, s), Image.Resampling.NEAREST)
                canvas.paste(im, (x0 + k * (s + pad), y))
    import io

    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------------------------


def run_sd_demo(concept: str = DEFAULT_SD_CONCEPT, out: str | Path | None = None, *, data_dir=None,
                t2i_dir=None, n_target: int = 50, n_other: int = 10, gen_steps: int = 20, guidance: float = 5.0,
                selection: str = "shift", gen_margin: float | None = None, search=None, seed: int = 0,
                threads: int | None = 1, progress: bool = True, overwrite: bool = False, batch_size: int = 64) -> dict:
    """SLUG on the embedded CLIP's text tower, applied to the embedded text-to-image pipeline; writes ``out``."""
    from .integrations.diffusers_sd import (apply_patch_to_pipeline, consumed_text_candidates,
                                            revert_patch_from_pipeline, verify_text_encoder)
    from .patch import load_patch, tensor_sha256
    from .slug.search import SearchConfig
    from .unlearn import UnlearnConfig, _write_json, check_out_dir, run_unlearn
    from .world.demo_data import ensure_world_data

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
        verify_text_encoder(adapter.model, pipe.text_encoder)
        adapter.restrict_candidates(consumed_text_candidates(adapter, pipe.text_encoder),
                                    consumer="text encoder of the embedded text-to-image pipeline")
        search = search or SearchConfig(metric=SD_CRITERION)
        cfg = UnlearnConfig(
            concept=concept, out=str(out), model="embedded-hf", forget=cd["forget"], retain=cd["retain"],
            val_identities=str(data / "val" / "utility"), test_identities=str(data / "test" / "utility"),
            names=str(out / "data" / "concepts.txt"), identity_templates=list(world.UTILITY_EVAL_TEMPLATES),
            utility_val=str(data / "val" / "identities"), utility_test=str(data / "test" / "identities"),
            utility_classnames=str(data / "names.txt"), utility_templates=list(world.IDENTITY_EVAL_TEMPLATES),
            batch_size=batch_size, search=search, seed=seed, progress=progress, overwrite=overwrite)
        result = run_unlearn(cfg, adapter=adapter, choose=generator_chooser(concept, selection, gen_margin))
        t_slug = time.perf_counter() - t0

        # ---- generation before / after, same seeds
        t = time.perf_counter()
        judge = t2i.ConceptJudge()
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
        gen["before"]["clip_score"] = clip_score(judge, imgs_b, prompts)
        gen["after"]["clip_score"] = clip_score(judge, imgs_a, prompts)
        gen["images"] = {"target": n_target, "per_other_concept": n_other, "other_concepts": len(rec_b) - 1,
                         "sampler": f"DDIM {gen_steps} steps, guidance {guidance}", "seed_base": plan[0][2]}
        t_gen = time.perf_counter() - t

        # ---- grid: the target and a few others (related first), 8 seeds each
        show = [concept] + sorted([c for c in t2i.concept_names() if c != concept],
                                  key=lambda c: (not related_to(c, concept), c))[:5]
        rows = []
        for c in show:
            idx = [i for i, (cc, _, _) in enumerate(plan) if cc == c][:8]
            rows.append((c, imgs_b[idx], imgs_a[idx]))
        image_grid(rows, out / "generations.png")

        result["target"] = "sd"
        result["pipeline"] = {"kind": "embedded text-to-image (diffusers UNet2DConditionModel, pixel space)",
                              "text_encoder_verified": True, "consumer": adapter.consumer,
                              "candidates": len(adapter.candidate_names())}
        result["generation"] = gen
        result["timing_s"]["slug_total"] = t_slug
        result["timing_s"]["generation_eval"] = t_gen
        result["timing_s"]["total"] = time.perf_counter() - t0
        _write_json(out / "result.json", result)
        with open(out / "report.md", "a", encoding="utf-8") as f:
            f.write(render_generation_report(result))
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
    lines += ["", "![before/after](generations.png)", ""]
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


def _json(obj) -> str:
    return json.dumps(obj, indent=2)
