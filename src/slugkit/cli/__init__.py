"""``slug``: the command-line entry point.

    slug demo [--concept NAME] [--out DIR]           SLUG on the embedded world (no downloads)
    slug unlearn --model M --concept C --forget ... --out DIR
    slug curate --shards SPEC --concept NAME --out DIR
    slug grads --model M --forget SPEC --retain SPEC --out G.safetensors   (also under torchrun)
    slug compare [--concept NAME] [--methods slug,ft,ga,gaft,salun,ssd] --out DIR
    slug apply / revert / inspect                    patches
    slug world names | train | data                  the embedded synthetic world
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_search_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("step-size search (spec §4)")
    g.add_argument("--criterion", default=None, choices=["forget_top5", "forget_top1"],
                   help="validation metric that must reach --threshold (default: forget_top5, the official rule; "
                        "forget_top1 for `demo --target sd`, whose 30-way concept list is short)")
    g.add_argument("--threshold", type=float, default=0.0)
    g.add_argument("--steps", type=int, default=10, help="evaluations per layer, S (default 10)")
    g.add_argument("--margin", type=float, default=1.1,
                   help="applied step = margin x smallest accepted step (default 1.1; 1.0 = official rule)")
    g.add_argument("--utility-floor", type=float, default=None,
                   help="also require validation utility top-1 >= base - FLOOR (e.g. 0.01)")
    g.add_argument("--selection", default="min", choices=["min", "utility", "mean", "deepest"],
                   help="how to choose among Pareto layers (default min: best worst-case retention of validation "
                        "utility and related-identity accuracy)")
    g.add_argument("--naive-search", action="store_true",
                   help="re-evaluate both towers at every step instead of the cached search (for checking)")


def _search_cfg(a):
    from ..slug.search import SearchConfig

    return SearchConfig(metric=a.criterion or "forget_top5", threshold=a.threshold, steps=a.steps, margin=a.margin,
                        utility_floor=a.utility_floor, selection=a.selection)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=False, default=None, help="output folder (refused if it holds a run)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--save-gradients", action="store_true", help="also write gradients.safetensors")
    _add_search_args(p)


def print_summary(result: dict, out: str) -> None:
    from ..report.unlearn import metrics_table

    m = result["metrics"]
    print()
    print(f"SLUG unlearned {result['concept']!r} from {result['model_label']} by editing "
          f"{result['layer']} (step {result['step_size']:.4g}, relative change {result['relative_change']:.3f})")
    print(metrics_table(m["before"], m["after"]))
    for c, fa in (m["after"].get("forget_by_concept") or {}).items():
        print(f"  {c}: FA@1 {fa['forget_top1']:.3f}, FA@5 {fa['forget_top5']:.3f} after")
    t = result["timing_s"]
    print(f"time: total {t['total']:.1f} s (gradients {t['gradients']:.1f} s, search {t['search']:.1f} s); "
          f"patch {result['patch']['bytes']:,} bytes = {100 * result['patch']['bytes'] / result['model_bytes']:.2f}% "
          f"of the model")
    print(f"outputs: {out}/result.json, report.md, pareto.png, run.json, patch/")


def cmd_demo_sd(a) -> int:
    from dataclasses import replace

    from ..workflows.sd_demo import DEFAULT_SD_CONCEPT, SD_CRITERION, print_sd_summary, run_sd_demo
    from ..world.t2i import concept_by_name

    if a.concepts:
        print("error: --target sd unlearns one concept (--concept)", file=sys.stderr)
        return 2
    try:
        concept = concept_by_name(a.concept or DEFAULT_SD_CONCEPT).name
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = a.out or f"runs/demo-sd-{concept.replace(' ', '_')}"
    search = replace(_search_cfg(a), metric=a.criterion or SD_CRITERION)
    result = run_sd_demo(concept, out, data_dir=a.data_dir, t2i_dir=a.t2i_model, n_target=a.n_target,
                         n_other=a.n_other, gen_steps=a.gen_steps, guidance=a.guidance, selection=a.sd_selection,
                         gen_search=not a.no_gen_search, val_images=a.val_images, val_other=a.val_other,
                         gen_threshold=a.gen_threshold, other_budget=a.other_budget,
                         gen_margin=a.gen_margin, search=search, seed=a.seed, threads=a.threads,
                         progress=not a.no_progress, overwrite=a.overwrite, batch_size=a.batch_size)
    print_sd_summary(result, out)
    return 0


def cmd_demo(a) -> int:
    from ..workflows.unlearn import check_out_dir, run_sequential, run_unlearn

    if a.target == "sd":
        try:
            return cmd_demo_sd(a)
        except ImportError as e:
            print(f"error: {e}; `demo --target sd` needs the HF extra: pip install 'slugkit[hf]'", file=sys.stderr)
            return 2
    from ..workflows.world_runs import sequential_world_configs, world_config
    from ..world.demo_data import default_concept

    from ..world import render as world

    wanted = [c.strip() for c in a.concepts.split(",") if c.strip()] if a.concepts else [a.concept or
                                                                                         default_concept()]
    try:
        concepts = [world.identity_by_name(c).name for c in wanted]
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    slug_name = "+".join(c.replace(" ", "_") for c in concepts)
    out = Path(a.out or f"runs/demo-{slug_name}")
    check_out_dir(out, a.overwrite)
    common = dict(progress=not a.no_progress, seed=a.seed, batch_size=a.batch_size, search=_search_cfg(a),
                  cached_search=not a.naive_search, threads=a.threads, device=a.device, overwrite=a.overwrite,
                  save_gradients=a.save_gradients)
    if a.sequential and len(concepts) > 1:
        cfgs = [s[0] for s in sequential_world_configs(concepts, lambda k, c: out / f"{k + 1}-{c.replace(' ', '_')}",
                                                        a.data_dir, **common)]
        result = run_sequential(cfgs, out, overwrite=a.overwrite)
        print_multi_summary(result, str(out))
        return 0
    cfg, cur, data = world_config(concepts if len(concepts) > 1 else concepts[0], out, a.data_dir, **common)
    result = run_unlearn(cfg, extra_run_info={"curate": cur, "world_data": str(data)})
    print_summary(result, str(out))
    return 0


def print_multi_summary(result: dict, out: str) -> None:
    print()
    print(f"SLUG unlearned {', '.join(result['concepts'])} one after another "
          f"({' then '.join(s['layer'] for s in result['steps'])})")
    print("| concept | FA@1 before | FA@1 after | FA@5 before | FA@5 after |")
    print("|---|---|---|---|---|")
    for c, m in result["per_concept"].items():
        b, a = m["before"], m["after"]
        print(f"| {c} | {b['forget_top1']:.3f} | {a['forget_top1']:.3f} | {b['forget_top5']:.3f} | "
              f"{a['forget_top5']:.3f} |")
    b, a = result["metrics"]["before"], result["metrics"]["after"]
    print(f"shared: related top-1 (identities not unlearned) {b['related_top1']:.3f} -> {a['related_top1']:.3f}, "
          f"utility top-1 {b['utility_top1']:.3f} -> {a['utility_top1']:.3f}")
    print(f"one chained patch: {out}/patch ({result['patch']['bytes']:,} bytes); per-step runs in {out}/<k>-<Name>/")


def cmd_unlearn(a) -> int:
    from ..workflows.unlearn import UnlearnConfig, run_unlearn

    if not a.out:
        print("error: --out is required", file=sys.stderr)
        return 2
    concepts = [c.strip() for c in a.concepts.split(",") if c.strip()] if a.concepts else []
    if not concepts and not a.concept:
        print("error: pass --concept NAME (or --concepts A,B)", file=sys.stderr)
        return 2
    if not a.gradients and not (a.forget and a.retain):
        print("error: pass --forget and --retain (or precomputed --gradients)", file=sys.stderr)
        return 2
    cfg = UnlearnConfig(
        concept=a.concept or " + ".join(concepts), concepts=concepts if len(concepts) > 1 else [],
        out=a.out, model=a.model, pretrained=a.pretrained, forget=a.forget or "",
        retain=a.retain or "",
        val_identities=a.val_identities, test_identities=a.test_identities, names=a.names,
        identity_templates=a.identity_template or ["{}."], related_names=a.related_names,
        utility_val=a.utility_val, utility_test=a.utility_test, utility_classnames=a.utility_classnames,
        utility_templates=a.utility_templates, forget_samples=a.forget_samples, retain_samples=a.retain_samples,
        batch_size=a.batch_size, search=_search_cfg(a), cached_search=not a.naive_search, seed=a.seed,
        threads=a.threads, device=a.device, precision=a.precision, strict=a.strict, overwrite=a.overwrite,
        family=a.family, consumer=a.consumer,
        progress=not a.no_progress, save_gradients=a.save_gradients, gradients=a.gradients)
    result = run_unlearn(cfg)
    print_summary(result, a.out)
    return 0


def cmd_compare(a) -> int:
    """`slug compare`: SLUG and the baselines on the same data (the embedded world, or explicit data flags)."""
    from ..workflows.compare import CompareConfig, render_compare, run_compare, time_ratios
    from ..world import render as world
    from ..world.demo_data import default_concept

    concepts = [c.strip() for c in a.concepts.split(",") if c.strip()] if a.concepts else []
    try:
        if a.forget or a.model != "embedded":
            concept = a.concept or " + ".join(concepts)
        else:
            concepts = [world.identity_by_name(c).name for c in concepts]
            concept = " + ".join(concepts) if concepts else world.identity_by_name(a.concept or default_concept()).name
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    lrs = {}
    for item in a.lr or []:
        k, _, v = item.partition("=")
        lrs[k.strip()] = float(v)
    out = a.out or f"runs/compare-{'+'.join(c.replace(' ', '_') for c in (concepts or [concept]))}"
    unlearn = None
    if a.forget or a.model != "embedded":
        from ..workflows.unlearn import UnlearnConfig

        missing = [f"--{k.replace('_', '-')}" for k in ("concept", "forget", "retain", "val_identities",
                                                        "test_identities") if not getattr(a, k)
                   and not (k == "concept" and concepts)]
        if missing:
            print(f"error: with explicit data (or a model other than 'embedded') compare needs {', '.join(missing)}",
                  file=sys.stderr)
            return 2
        unlearn = UnlearnConfig(
            concept=concept, concepts=concepts if len(concepts) > 1 else [], out=out, model=a.model,
            pretrained=a.pretrained, forget=a.forget, retain=a.retain,
            val_identities=a.val_identities, test_identities=a.test_identities, names=a.names,
            identity_templates=a.identity_template or ["{}."], related_names=a.related_names,
            utility_val=a.utility_val, utility_test=a.utility_test, utility_classnames=a.utility_classnames,
            utility_templates=a.utility_templates, forget_samples=a.forget_samples,
            retain_samples=a.retain_samples, precision=a.precision, strict=a.strict, device=a.device)
    cc = CompareConfig(concept=concept, out=out, methods=methods, model=a.model, data_dir=a.data_dir,
                       epochs=a.epochs, lr=lrs, batch_size=a.batch_size, select_metric=a.select_metric,
                       salun_threshold=a.salun_threshold, ssd_alpha=a.ssd_alpha, forget_loss=a.forget_loss,
                       rl_forget_fraction=a.rl_forget_fraction, importance_batch_size=a.importance_batch_size,
                       ssd_importance_loss=a.ssd_importance_loss, forget_samples=a.forget_samples,
                       retain_samples=a.retain_samples, retain_identity_fraction=a.retain_identity_fraction,
                       device=a.device, seed=a.seed, threads=a.threads, overwrite=a.overwrite,
                       progress=not a.no_progress, unlearn=unlearn, mia_heldout_pairs=a.mia_heldout,
                       concepts=concepts if len(concepts) > 1 else [],
                       modes=[m.strip() for m in a.modes.split(",") if m.strip()],
                       lr_sweep=[float(x) for x in a.lr_sweep.split(",")] if a.lr_sweep else None)
    report = run_compare(cc)
    print(render_compare(report))
    for part in ([report] if "methods" in report else [report[m] for m in ("joint", "sequential") if m in report]):
        ratios = time_ratios(part)
        if ratios:
            print(f"method time / SLUG time{' (' + part['mode'] + ')' if part.get('mode') != 'single' else ''}: "
                  + ", ".join(f"{k} {1 / v:.1f}x" for k, v in ratios.items() if v > 0))
    print(f"outputs: {out}/compare.json, compare.md, tradeoff.png, "
          + ("slug/" if "methods" in report else ", ".join(f"{m}/" for m in ("joint", "sequential") if m in report)))
    return 0


def cmd_curate(a) -> int:
    from ..data.curate import curate

    if a.generate:
        from ..data.generate import generate_pairs

        if not a.n:
            print("error: --generate needs -n N (how many images)", file=sys.stderr)
            return 2
        pipe = load_pipeline(a.pipeline, device=a.device)
        summary = generate_pairs(pipe, a.generate, a.n, a.out, caption=a.caption or a.concept, seed=a.seed,
                                 steps=a.gen_steps, guidance=a.guidance, progress=not a.no_progress)
        summary.pop("samples")
        print(json.dumps(summary, indent=2))
        return 0
    if not (a.shards and a.concept):
        print("error: curate needs --shards and --concept (or --generate PROMPT -n N --pipeline P)", file=sys.stderr)
        return 2
    summary = curate(a.shards, a.concept, a.out, aliases=a.alias or [], max_forget=a.max_forget,
                     retain=a.retain, seed=a.seed, strict=a.strict, progress=not a.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_grads(a) -> int:
    """`slug grads`: the streamed / distributed / resumable gradient pass (see slugkit.slug.gradpass); one process, or
    one rank of ``torchrun --nproc_per_node N -m slugkit.cli grads ...``."""
    import torch

    from ..models import load_adapter
    from ..slug.gradpass import PassConfig, init_distributed, run_gradpass

    if a.threads:
        torch.set_num_threads(a.threads)
    rank, world, device = init_distributed(a.device)
    try:
        adapter = load_adapter(a.model, a.pretrained, family=getattr(a, "family", "open_clip"), device=device,
                               precision=a.precision)
        if getattr(a, "consumer", None):
            from ..integrations import restrict_to_consumer

            restrict_to_consumer(adapter, a.consumer)
        cfg = PassConfig(forget=a.forget, retain=a.retain, out=a.out, batch_size=a.batch_size,
                         checkpoint_dir=a.checkpoint_dir, stats_first=a.stats_first, strict=a.strict,
                         progress=not a.no_progress)
        result = run_gradpass(adapter, cfg)
        if rank == 0 and result is not None:
            g = result.grads
            what = f"stats of every candidate + gradients of {len(result.front)} front tensors" if cfg.stats_first \
                else f"gradients of {len(g.forget)} tensors"
            print(f"wrote {a.out}: {what} (forget {g.n_forget} samples, retain {g.n_retain} samples, "
                  f"{world} rank(s))")
    finally:
        import torch.distributed as dist

        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def load_pipeline(spec: str, device: str = "cpu"):
    """``--pipeline``: ``embedded`` (the embedded text-to-image model) or a local diffusers pipeline folder."""
    if spec == "embedded":
        from ..world.t2i import EmbeddedT2IPipeline

        return EmbeddedT2IPipeline.load()
    from ..integrations.diffusers_sd import load_pipeline_folder

    return load_pipeline_folder(spec, device=device)


def _load_target(a):
    """A safetensors state dict (--checkpoint) or a model loaded through the adapter (--model/--pretrained)."""
    from ..patch import load_state_dict_file

    if a.checkpoint:
        return load_state_dict_file(a.checkpoint), None
    from ..models import load_adapter

    adapter = load_adapter(a.model, a.pretrained, family=a.family)
    return adapter.model, adapter


def _state_of(target):
    import torch

    if isinstance(target, torch.nn.Module):
        return {k: v.detach() for k, v in target.state_dict().items()}
    return target


def cmd_apply(a, revert: bool = False) -> int:
    from ..patch import apply_patches, describe, load_patch, revert_patch, save_state_dict_file

    patches = [load_patch(p) for p in a.patch]
    if a.pipeline and a.llava:
        print("error: give --pipeline or --llava, not both", file=sys.stderr)
        return 2
    if a.pipeline or a.llava:
        return _apply_to_folder(a, patches, revert)
    target, _ = _load_target(a)
    if revert:
        for p in reversed(patches):
            revert_patch(target, p)
    else:
        apply_patches(target, patches)
    if a.out:
        save_state_dict_file(_state_of(target), a.out)
    for p in patches:
        print(describe(p))
    verb = "reverted" if revert else "applied"
    print(f"{verb} {len(patches)} patch(es)" + (f"; wrote {a.out}" if a.out else " (verified; use --out to save)"))
    return 0


def _apply_to_folder(a, patches, revert: bool) -> int:
    """`slug apply --pipeline DIR | --llava DIR --patch P --out DIR2`: write the SD pipeline's text encoder (SDXL:
    the one the patch belongs to) or the whole LLaVA model, patched (or reverted), as a loadable folder."""
    from ..patch import compose_patches, describe

    flag = "--pipeline" if a.pipeline else "--llava"
    if not a.out:
        print(f"error: {flag} needs --out DIR (the patched model folder is written there)", file=sys.stderr)
        return 2
    patch = compose_patches(patches)
    if a.pipeline:
        from ..integrations.diffusers_sd import save_patched_text_encoder

        save_patched_text_encoder(a.pipeline, patch, a.out, full_pipeline=a.full_pipeline, revert=revert,
                                  overwrite=a.overwrite, encoder=a.text_encoder)
        what = f"{a.pipeline}'s text encoder; wrote {a.out} ({'pipeline' if a.full_pipeline else 'text encoder'})"
    else:
        from ..integrations.llava import save_patched_llava

        save_patched_llava(a.llava, patch, a.out, revert=revert, overwrite=a.overwrite)
        what = f"{a.llava}'s vision tower; wrote {a.out} (model + processor)"
    print(describe(patch))
    print(f"{'reverted' if revert else 'applied'} on {what}")
    return 0


def cmd_eval_sd(a) -> int:
    """`slug eval-sd`: UA / IRA / CRA / CLIP score of a pipeline before and after a text-encoder patch."""
    from ..data.folders import read_lines
    from ..eval.generated import GenerationPlan, ZeroShotJudge, before_after
    from ..models import load_adapter
    from ..patch import compose_patches, load_patch

    def names(spec):
        if not spec:
            return []
        return read_lines(spec) if Path(spec).is_file() else [c.strip() for c in spec.split(",") if c.strip()]

    concepts = names(a.concepts)
    if len(concepts) < 2:
        print("error: --concepts needs the concept list the judge chooses from (a file or A,B,C; >= 2 names)",
              file=sys.stderr)
        return 2
    pipe = load_pipeline(a.pipeline, device=a.device)
    judge_ad = load_adapter(a.judge_model, a.judge_pretrained, family=a.judge_family, device=a.device)
    templates = a.judge_template or [a.template]
    judge = ZeroShotJudge(judge_ad, concepts, templates)
    cross = names(a.cross_concepts)
    cross_judge = ZeroShotJudge(judge_ad, cross, [a.cross_template or a.template]) if cross else None
    plan = GenerationPlan.build(a.target, concepts, a.template, a.n_target, a.n_other, cross,
                                a.cross_template, seed=a.seed)
    patch = compose_patches([load_patch(p) for p in a.patch])
    r = before_after(pipe, patch, judge, plan, a.out, cross_judge=cross_judge, steps=a.steps, guidance=a.guidance,
                     progress=not a.no_progress)
    print("| generated images | before | after |\n|---|---|---|")
    for k in ("generated_target_recognised", "UA", "IRA", "CRA", "clip_score"):
        b, af = r["before"].get(k), r["after"].get(k)
        if b is not None:
            print(f"| {k} | {b:.3f} | {af:.3f} |")
    print(f"outputs: {a.out}/gen_eval.json, {a.out}/generations.png")
    return 0


def cmd_inspect(a) -> int:
    from ..patch import describe, load_patch

    p = load_patch(a.patch)
    if a.json:
        print(json.dumps(p.meta, indent=2, sort_keys=True))
    else:
        print(describe(p))
    return 0


def cmd_world(a) -> int:
    if a.world_cmd == "names":
        from ..world.render import identity_names

        print("\n".join(identity_names()))
        return 0
    if a.world_cmd == "train":
        from ..world.train import train_embedded

        kw = {k: v for k, v in (("steps", a.steps), ("threads", a.threads)) if v is not None}
        report = train_embedded(a.out, seed=a.seed, **kw)
        print(json.dumps(report, indent=2))
        return 0
    if a.world_cmd == "data":
        from ..world.demo_data import ensure_world_data

        print(ensure_world_data(a.out))
        return 0
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slug", description="Targeted unlearning with SLUG: edit one layer once.")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="unlearn an identity from the embedded tiny CLIP (no downloads)")
    d.add_argument("--concept", default=None, help="identity name (see `slug world names`)")
    d.add_argument("--concepts", default=None, help="A,B,...: several identities, unlearned jointly (one forget set, "
                                                    "one edit) or, with --sequential, one after another")
    d.add_argument("--sequential", action="store_true", help="with --concepts: one SLUG run per concept on the "
                                                            "previously patched model; patches chained into one")
    d.add_argument("--data-dir", default=None, help="where the world's data is generated (default: cache dir)")
    d.add_argument("--target", default="clip", choices=["clip", "sd"],
                   help="clip: unlearn an identity from the embedded CLIP; sd: unlearn an object concept (e.g. "
                        "'red triangle') from the embedded text-to-image pipeline by patching its CLIP text encoder")
    sdg = d.add_argument_group("--target sd")
    sdg.add_argument("--n-target", type=int, default=50, help="generated images of the forgotten concept")
    sdg.add_argument("--n-other", type=int, default=10, help="generated images per other concept (29 of them)")
    sdg.add_argument("--gen-steps", type=int, default=20, help="DDIM steps")
    sdg.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    sdg.add_argument("--sd-selection", default="shift", choices=["shift", "clip"],
                     help="layer choice among the searched Pareto layers: shift (least conditioning shift of the "
                          "other concepts relative to the target's; default) or clip (the CLIP --selection policy)")
    sdg.add_argument("--no-gen-search", action="store_true",
                     help="apply the CLIP-searched step instead of searching it on generated validation images")
    sdg.add_argument("--val-images", type=int, default=20,
                     help="generated validation images of the concept per search step")
    sdg.add_argument("--val-other", type=int, default=1,
                     help="generated validation images per other concept per search step")
    sdg.add_argument("--other-budget", type=float, default=0.05,
                     help="search accepts a step only if the other concepts' validation recognition drops by at "
                          "most this much")
    sdg.add_argument("--gen-threshold", type=float, default=0.05,
                     help="search accepts a step when at most this share of validation images is recognised")
    sdg.add_argument("--gen-margin", type=float, default=None,
                     help="applied step = this x the smallest step that forgot on validation (default 1.2)")
    sdg.add_argument("--t2i-model", default=None, help="folder of a text-to-image UNet from `slug world train-t2i`")
    _add_run_args(d)
    d.set_defaults(func=cmd_demo, threads=1)  # tiny model: one thread is as fast and identical everywhere

    u = sub.add_parser("unlearn", help="unlearn a concept from a model (real-model form)")
    u.add_argument("--model", default="embedded", help="open_clip arch (ViT-B-32), hf-hub:/local-dir: id, "
                                                       "a folder, or 'embedded'")
    u.add_argument("--pretrained", default=None, help="open_clip pretrained tag or a local .safetensors file")
    u.add_argument("--precision", default="fp32")
    u.add_argument("--family", default="open_clip", choices=["open_clip", "hf_clip"],
                   help="open_clip ids, or hf_clip: a transformers CLIPModel id/folder (e.g. "
                        "openai/clip-vit-large-patch14)")
    u.add_argument("--consumer", default=None, metavar="sd:DIR|llava:DIR",
                   help="hf_clip: only edit tensors this Stable Diffusion pipeline's text encoder / LLaVA's vision "
                        "tower reads (read from its configs)")
    u.add_argument("--concept", default=None)
    u.add_argument("--concepts", default=None, help="A,B,...: unlearn several concepts jointly (one forget set "
                                                    "holding all of them, one edit; the criterion covers each)")
    u.add_argument("--forget", default=None, help="forget pairs: shards (brace patterns, '::' lists) or a "
                                                   "captioned folder; e.g. the output of `slug curate`")
    u.add_argument("--retain", default=None, help="retain pairs: shards or captioned folder")
    u.add_argument("--gradients", default=None,
                   help="gradients from `slug grads` (full or --stats-first; e.g. computed under torchrun): skip "
                        "the gradient pass; --forget/--retain are then only recorded")
    u.add_argument("--forget-samples", type=int, default=None)
    u.add_argument("--retain-samples", type=int, default=None)
    u.add_argument("--val-identities", required=True, help="class folder <Name>/*.jpg for the search")
    u.add_argument("--test-identities", required=True, help="disjoint class folder for the reported metrics")
    u.add_argument("--names", default=None, help="file with the full identity name list (one per line)")
    u.add_argument("--identity-template", action="append", default=None,
                   help="zero-shot identity prompt with {} (repeatable; default the official '{}.')")
    u.add_argument("--related-names", default=None, help="file: identities that count for related accuracy")
    u.add_argument("--utility-val", default=None, help="class folder (e.g. ImageNet val subset) for the search")
    u.add_argument("--utility-test", default=None, help="disjoint class folder for the reported utility")
    u.add_argument("--utility-classnames", default=None, help="file, or 'imagenet' for open_clip's 1000 names")
    u.add_argument("--utility-templates", default="imagenet-simple",
                   help="'imagenet-simple' (7 templates, official), 'imagenet' (80), or a file")
    u.add_argument("--strict", action="store_true", help="fail on samples without caption / bad images")
    _add_run_args(u)
    u.set_defaults(func=cmd_unlearn)

    cp = sub.add_parser("compare", help="SLUG vs FT, GA, GA+FT, SalUn, SSD on the same data, with cost")
    cp.add_argument("--model", default="embedded", help="'embedded' (the world's data by default) or any id of "
                                                        "`slug unlearn` (then pass its data flags)")
    cp.add_argument("--concept", default=None, help="identity name (default: the demo's)")
    cp.add_argument("--concepts", default=None, help="A,B,...: several identities, unlearned jointly (one forget set) "
                                                     "and sequentially (one step per concept; SLUG chains patches)")
    cp.add_argument("--modes", default="joint,sequential", help="with --concepts: joint, sequential or both")
    cp.add_argument("--methods", default="slug,ft,ga,gaft,salun,ssd",
                    help="comma list of slug, ft, ga, gaft, salun, salun-rl, ssd, ssd-cumulative")
    cp.add_argument("--epochs", type=int, default=None, help="epochs of the iterative baselines (default: each "
                                                             "method's, <= 10)")
    cp.add_argument("--lr", action="append", default=None, metavar="METHOD=LR",
                    help="learning-rate override, e.g. --lr gaft=2e-4 (repeatable)")
    cp.add_argument("--select-metric", default="forget_top5", choices=["forget_top1", "forget_top5"],
                    help="epoch selection: first epoch with validation metric 0, else the minimum (default FA@5, "
                         "SLUG's own criterion; the paper's rule is forget_top1)")
    cp.add_argument("--lr-sweep", nargs="?", const="3e-5,1e-4,3e-4,1e-3", default=None, metavar="LR,LR,...",
                    help="GA/GA+FT/SalUn: try these learning rates in ascending order, keep the smallest that meets "
                         "the epoch rule; the whole sweep counts in the method's time (default grid "
                         "3e-5,1e-4,3e-4,1e-3)")
    cp.add_argument("--salun-threshold", type=float, default=0.5, help="SalUn mask fraction (default 0.5)")
    cp.add_argument("--ssd-alpha", type=float, default=None, help="fix SSD's α (λ = 1, one application); default: "
                                                                  "sweep α 10,5,2,1 × λ 1,.5,.2,.1 by validation")
    cp.add_argument("--forget-loss", choices=["cos", "clip"], default="cos",
                    help="GA, GA+FT, SalUn forget pass: ascent on 1 - cos (default, SLUG's) or on the CLIP loss "
                         "(the SLUG repo's _o variants)")
    cp.add_argument("--rl-forget-fraction", type=float, default=None, metavar="F",
                    help="salun-rl: share of relabelled forget pairs in each mixed batch (default: one shuffled "
                         "pass over relabelled forget + retain pairs)")
    cp.add_argument("--importance-batch-size", type=int, default=16,
                    help="batch of SalUn's saliency gradient and SSD's importances (default 16, the SLUG repo's "
                         "calc_grad pass)")
    cp.add_argument("--ssd-importance-loss", choices=["split", "clip", "cos"], default="split",
                    help="SSD importances: split = mean cos on D_f, CLIP loss on D_r (default, the SLUG repo's); "
                         "clip / cos = that loss on both")
    cp.add_argument("--forget-samples", type=int, default=None)
    cp.add_argument("--retain-samples", type=int, default=None)
    cp.add_argument("--retain-identity-fraction", type=float, default=None, metavar="F",
                    help="embedded world: a retain set of 900 pool pairs, a share F of them other identities' and "
                         "the rest utility pairs (default: the curated retain set, ~91%% identities; the paper's "
                         "LAION retain shard has few of the related test identities)")
    cp.add_argument("--device", default="cpu", help="the model's device, e.g. cuda (data stays in CPU memory and "
                                                    "each batch is moved before its forward)")
    cp.add_argument("--data-dir", default=None, help="where the world's data is generated (default: cache dir)")
    g = cp.add_argument_group("explicit data (as `slug unlearn`; required for models other than 'embedded')")
    g.add_argument("--pretrained", default=None)
    g.add_argument("--precision", default="fp32")
    for flag in ("--forget", "--retain", "--val-identities", "--test-identities", "--names", "--related-names",
                 "--utility-val", "--utility-test", "--utility-classnames"):
        g.add_argument(flag, default=None, help="see `slug unlearn --help`")
    g.add_argument("--identity-template", action="append", default=None)
    g.add_argument("--utility-templates", default="imagenet-simple")
    g.add_argument("--strict", action="store_true")
    g.add_argument("--mia-heldout", default=None, help="captioned pairs of the concept never trained on (shards or "
                                                       "folder) for the MIA; without it the MIA is skipped")
    cp.add_argument("--out", default=None)
    cp.add_argument("--overwrite", action="store_true")
    cp.add_argument("--batch-size", type=int, default=32, help="baselines' batch size (official 32); SLUG keeps "
                                                               "`slug demo`'s settings")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--threads", type=int, default=1)
    cp.add_argument("--no-progress", action="store_true")
    cp.set_defaults(func=cmd_compare)

    c = sub.add_parser("curate", help="build forget/retain sets from shards by whole-word name match, or generate "
                                      "a forget set with a text-to-image pipeline")
    c.add_argument("--shards", default=None)
    c.add_argument("--concept", default=None, help="name to match in captions (with --generate: the caption of "
                                                   "every generated image, unless --caption)")
    c.add_argument("--generate", action="append", default=None, metavar="PROMPT",
                   help="generate the forget set from PROMPT (repeatable; prompts rotate) with --pipeline")
    c.add_argument("-n", type=int, default=None, help="with --generate: number of images")
    c.add_argument("--pipeline", default="embedded", help="with --generate: a diffusers pipeline folder or "
                                                          "'embedded' (default)")
    c.add_argument("--caption", default=None, help="with --generate: caption stored with every image "
                                                   "(default --concept, else the prompt)")
    c.add_argument("--gen-steps", type=int, default=25)
    c.add_argument("--guidance", type=float, default=None)
    c.add_argument("--device", default="cpu")
    c.add_argument("--alias", action="append", default=None)
    c.add_argument("--max-forget", type=int, default=None)
    c.add_argument("--retain", type=int, default=None, help="retain samples to keep (default all non-matches; 0: "
                                                            "no retain set)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--strict", action="store_true")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_curate)

    gp = sub.add_parser("grads", help="gradient pass over shards: resumable, runs under torchrun on N ranks")
    gp.add_argument("--model", required=True, help="as `slug unlearn --model`")
    gp.add_argument("--pretrained", default=None)
    gp.add_argument("--precision", default="fp32")
    gp.add_argument("--family", default="open_clip", choices=["open_clip", "hf_clip"])
    gp.add_argument("--consumer", default=None, metavar="sd:DIR|llava:DIR", help="as `slug unlearn --consumer`")
    gp.add_argument("--forget", required=True, help="forget pairs: shards (brace patterns, '::' lists) or a folder")
    gp.add_argument("--retain", required=True, help="retain pairs: shards or a captioned folder")
    gp.add_argument("--out", required=True, help="output .safetensors (written by rank 0, atomically)")
    gp.add_argument("--batch-size", type=int, default=64, help="batches are formed within each shard")
    gp.add_argument("--checkpoint-dir", default=None, help="resume state (default OUT.ckpt; deleted on success)")
    gp.add_argument("--stats-first", action="store_true",
                    help="keep per-tensor scalars for all candidates, full gradients for the Pareto front only")
    gp.add_argument("--strict", action="store_true")
    gp.add_argument("--threads", type=int, default=None)
    gp.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK, NCCL)")
    gp.add_argument("--no-progress", action="store_true")
    gp.set_defaults(func=cmd_grads)

    for name, rev in (("apply", False), ("revert", True)):
        ap = sub.add_parser(name, help=f"{name} patch(es) to a model or a safetensors checkpoint")
        ap.add_argument("--patch", action="append", required=True, help="patch folder (repeatable to compose)")
        ap.add_argument("--checkpoint", default=None, help="a .safetensors state dict to patch")
        ap.add_argument("--model", default="embedded")
        ap.add_argument("--pretrained", default=None)
        ap.add_argument("--family", default="open_clip", choices=["open_clip", "hf_clip"])
        ap.add_argument("--out", default=None, help="write the resulting state dict (.safetensors)")
        ap.add_argument("--pipeline", default=None, help="a diffusers Stable Diffusion folder: write its text_encoder/ "
                                                         f"{'reverted' if rev else 'patched'} into --out (folder)")
        ap.add_argument("--full-pipeline", action="store_true", help="with --pipeline: --out gets every component "
                                                                     "(hard links), not only text_encoder/")
        ap.add_argument("--llava", default=None, help="a LLaVA model folder: write it with the vision tower "
                                                      f"{'reverted' if rev else 'patched'} into --out (folder)")
        ap.add_argument("--overwrite", action="store_true", help="with --pipeline / --llava: replace a non-empty --out")
        ap.add_argument("--text-encoder", default=None, choices=["text_encoder", "text_encoder_2"],
                        help="with --pipeline (SDXL): which text encoder the patch belongs to (default: the one "
                             "whose shapes fit the patch)")
        ap.set_defaults(func=(lambda a, r=rev: cmd_apply(a, revert=r)))

    ev = sub.add_parser("eval-sd", help="score a text-to-image pipeline before/after a patch on generated images "
                                        "(UA, IRA, CRA, CLIP score)")
    ev.add_argument("--pipeline", required=True, help="diffusers pipeline folder, or 'embedded'")
    ev.add_argument("--patch", action="append", required=True)
    ev.add_argument("--target", required=True, help="the forgotten concept (must be in --concepts or is added)")
    ev.add_argument("--concepts", required=True, help="in-domain concept list the judge classifies over: a file "
                                                      "(one per line) or A,B,C")
    ev.add_argument("--template", default="a photo of {}.", help="generation prompt template ({} = concept)")
    ev.add_argument("--judge-template", action="append", default=None, help="zero-shot template(s) of the judge "
                                                                            "(default: --template)")
    ev.add_argument("--cross-concepts", default=None, help="cross-domain concept list for CRA (file or A,B,C)")
    ev.add_argument("--cross-template", default=None)
    ev.add_argument("--n-target", type=int, default=10)
    ev.add_argument("--n-other", type=int, default=2)
    ev.add_argument("--judge-model", default="embedded", help="CLIP judge, as `slug unlearn --model`")
    ev.add_argument("--judge-pretrained", default=None)
    ev.add_argument("--judge-family", default="open_clip", choices=["open_clip", "hf_clip"])
    ev.add_argument("--steps", type=int, default=25, help="denoising steps")
    ev.add_argument("--guidance", type=float, default=None)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("--out", required=True)
    ev.set_defaults(func=cmd_eval_sd)

    i = sub.add_parser("inspect", help="describe a patch")
    i.add_argument("patch")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    w = sub.add_parser("world", help="the embedded synthetic world")
    wsub = w.add_subparsers(dest="world_cmd", required=True)
    wsub.add_parser("names", help="print the identity names")
    wt = wsub.add_parser("train", help="train the embedded tiny CLIP")
    wt.add_argument("--out", required=True)
    wt.add_argument("--steps", type=int, default=None)
    wt.add_argument("--seed", type=int, default=0)
    wt.add_argument("--threads", type=int, default=None)
    wdd = wsub.add_parser("data", help="write the world's shards and folders")
    wdd.add_argument("--out", default=None)
    wsub.add_parser("train-t2i", add_help=False,
                    help="train the embedded text-to-image UNet (`slug world train-t2i --help` for options)")
    w.set_defaults(func=cmd_world)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["world", "train-t2i"]:  # its own argparse (python -m slugkit.world.t2i_train)
        from ..world.t2i_train import main as t2i_main

        return t2i_main(argv[2:])
    parser = build_parser()
    a = parser.parse_args(argv)
    from ..data.curate import EmptyForgetSetError
    from ..data.shards import ShardError
    from ..models.base import ModelLoadError
    from ..patch import PatchError
    from ..slug.search import SearchFailed
    from ..workflows.unlearn import OutputExistsError

    msg = check_device(getattr(a, "device", None))
    if msg:
        print(f"error: {msg}", file=sys.stderr)
        return 2
    try:
        return a.func(a)
    except (EmptyForgetSetError, ShardError, ModelLoadError, PatchError, SearchFailed, OutputExistsError,
            FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        hint = device_error_hint(e)
        if hint is None:  # not a device problem: a bug, keep the traceback
            raise
        print(f"error: {e}\n{hint}", file=sys.stderr)
        return 2


def check_device(device: str | None) -> str | None:
    """Why ``--device`` cannot work on this machine (an unknown device string, CUDA not available), or None."""
    if device is None or device == "cpu":
        return None
    import torch

    try:
        d = torch.device(device)
    except RuntimeError as e:
        return f"--device {device}: {e}"
    if d.type == "cuda":
        if not torch.cuda.is_available():
            return (f"--device {device}: torch sees no CUDA device (torch {torch.__version__}, built for CUDA "
                    f"{torch.version.cuda or 'none'}); use --device cpu or a CUDA build of torch on a GPU machine")
        if d.index is not None and d.index >= torch.cuda.device_count():
            return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
    return None


def device_error_hint(e: RuntimeError) -> str | None:
    """A hint for a RuntimeError caused by devices (tensors on different devices, CUDA errors, out of GPU memory),
    or None for any other RuntimeError."""
    import torch

    text = str(e)
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text:
        return "the GPU ran out of memory: lower --batch-size or run with --device cpu"
    if any(k in text for k in ("on the same device", "Input type", "weight type", "device", "CUDA", "cuda")):
        return ("this is a device problem (data and model on different devices, or a CUDA error); please report it "
                "with the command line. `--device cpu` avoids it; `slug grads --device cuda` + `--gradients` runs "
                "only the gradient pass on the GPU")
    return None


if __name__ == "__main__":
    sys.exit(main())
