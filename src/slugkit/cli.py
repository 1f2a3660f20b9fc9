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
    g.add_argument("--criterion", default="forget_top5", choices=["forget_top5", "forget_top1"],
                   help="validation metric that must reach --threshold (default: forget_top5, the official rule)")
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
    from .slug.search import SearchConfig

    return SearchConfig(metric=a.criterion, threshold=a.threshold, steps=a.steps, margin=a.margin,
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
    from .report import metrics_table

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


def cmd_demo(a) -> int:
    from .unlearn import check_out_dir, run_sequential, run_unlearn
    from .world.demo_data import default_concept, world_config

    from .data import world

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
        cfgs = [world_config(c, out / f"{k + 1}-{c.replace(' ', '_')}", a.data_dir, **common)[0]
                for k, c in enumerate(concepts)]
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
    from .unlearn import UnlearnConfig, run_unlearn

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
        progress=not a.no_progress, save_gradients=a.save_gradients, gradients=a.gradients)
    result = run_unlearn(cfg)
    print_summary(result, a.out)
    return 0


def cmd_compare(a) -> int:
    """`slug compare`: SLUG and the baselines on the same data (the embedded world, or explicit data flags)."""
    from .compare import CompareConfig, render_compare, run_compare, time_ratios
    from .data import world
    from .world.demo_data import default_concept

    if a.concepts:
        print("error: --concepts (joint / sequential multi-concept forgetting) is not implemented yet",
              file=sys.stderr)
        return 2
    try:
        if a.forget or a.model != "embedded":
            concept = a.concept or ""
        else:
            concept = world.identity_by_name(a.concept or default_concept()).name
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    lrs = {}
    for item in a.lr or []:
        k, _, v = item.partition("=")
        lrs[k.strip()] = float(v)
    out = a.out or f"runs/compare-{concept.replace(' ', '_')}"
    unlearn = None
    if a.forget or a.model != "embedded":
        from .unlearn import UnlearnConfig

        missing = [f"--{k.replace('_', '-')}" for k in ("concept", "forget", "retain", "val_identities",
                                                        "test_identities") if not getattr(a, k)]
        if missing:
            print(f"error: with explicit data (or a model other than 'embedded') compare needs {', '.join(missing)}",
                  file=sys.stderr)
            return 2
        unlearn = UnlearnConfig(
            concept=a.concept, out=out, model=a.model, pretrained=a.pretrained, forget=a.forget, retain=a.retain,
            val_identities=a.val_identities, test_identities=a.test_identities, names=a.names,
            identity_templates=a.identity_template or ["{}."], related_names=a.related_names,
            utility_val=a.utility_val, utility_test=a.utility_test, utility_classnames=a.utility_classnames,
            utility_templates=a.utility_templates, forget_samples=a.forget_samples,
            retain_samples=a.retain_samples, precision=a.precision, strict=a.strict)
    cc = CompareConfig(concept=concept, out=out, methods=methods, model=a.model, data_dir=a.data_dir,
                       epochs=a.epochs, lr=lrs, batch_size=a.batch_size, select_metric=a.select_metric,
                       salun_threshold=a.salun_threshold, ssd_alpha=a.ssd_alpha, forget_samples=a.forget_samples,
                       retain_samples=a.retain_samples, seed=a.seed, threads=a.threads, overwrite=a.overwrite,
                       progress=not a.no_progress, unlearn=unlearn, mia_heldout_pairs=a.mia_heldout)
    report = run_compare(cc)
    print(render_compare(report))
    ratios = time_ratios(report)
    if ratios:
        print("method time / SLUG time: " + ", ".join(f"{k} {1 / v:.1f}x" for k, v in ratios.items() if v > 0))
    print(f"outputs: {out}/compare.json, compare.md, tradeoff.png, slug/")
    return 0


def cmd_curate(a) -> int:
    from .data.curate import curate

    summary = curate(a.shards, a.concept, a.out, aliases=a.alias or [], max_forget=a.max_forget,
                     retain=a.retain, seed=a.seed, strict=a.strict, progress=not a.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_grads(a) -> int:
    """`slug grads`: the streamed / distributed / resumable gradient pass (see slugkit.slug.gradpass)."""
    from .slug.gradpass import cmd_grads as run

    return run(a)


def _load_target(a):
    """A safetensors state dict (--checkpoint) or a model loaded through the adapter (--model/--pretrained)."""
    from .patch import load_state_dict_file

    if a.checkpoint:
        return load_state_dict_file(a.checkpoint), None
    from .models import load_adapter

    adapter = load_adapter(a.model, a.pretrained)
    return adapter.model, adapter


def _state_of(target):
    import torch

    if isinstance(target, torch.nn.Module):
        return {k: v.detach() for k, v in target.state_dict().items()}
    return target


def cmd_apply(a, revert: bool = False) -> int:
    from .patch import apply_patches, describe, load_patch, revert_patch, save_state_dict_file

    patches = [load_patch(p) for p in a.patch]
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


def cmd_inspect(a) -> int:
    from .patch import describe, load_patch

    p = load_patch(a.patch)
    if a.json:
        print(json.dumps(p.meta, indent=2, sort_keys=True))
    else:
        print(describe(p))
    return 0


def cmd_world(a) -> int:
    if a.world_cmd == "names":
        from .data.world import identity_names

        print("\n".join(identity_names()))
        return 0
    if a.world_cmd == "train":
        from .world.train import train_embedded

        kw = {k: v for k, v in (("steps", a.steps), ("threads", a.threads)) if v is not None}
        report = train_embedded(a.out, seed=a.seed, **kw)
        print(json.dumps(report, indent=2))
        return 0
    if a.world_cmd == "data":
        from .world.demo_data import ensure_world_data

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
    _add_run_args(d)
    d.set_defaults(func=cmd_demo, threads=1)  # tiny model: one thread is as fast and identical everywhere

    u = sub.add_parser("unlearn", help="unlearn a concept from a model (real-model form)")
    u.add_argument("--model", default="embedded", help="open_clip arch (ViT-B-32), hf-hub:/local-dir: id, "
                                                       "a folder, or 'embedded'")
    u.add_argument("--pretrained", default=None, help="open_clip pretrained tag or a local .safetensors file")
    u.add_argument("--precision", default="fp32")
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
    cp.add_argument("--concepts", default=None, help="A,B: several concepts (not implemented yet)")
    cp.add_argument("--methods", default="slug,ft,ga,gaft,salun,ssd",
                    help="comma list of slug, ft, ga, gaft, salun, salun-rl, ssd, ssd-cumulative")
    cp.add_argument("--epochs", type=int, default=None, help="epochs of the iterative baselines (default: each "
                                                             "method's, <= 10)")
    cp.add_argument("--lr", action="append", default=None, metavar="METHOD=LR",
                    help="learning-rate override, e.g. --lr gaft=2e-4 (repeatable)")
    cp.add_argument("--select-metric", default="forget_top1", choices=["forget_top1", "forget_top5"],
                    help="epoch selection: first epoch with validation metric 0, else the minimum (paper: FA@1)")
    cp.add_argument("--salun-threshold", type=float, default=0.5, help="SalUn mask fraction (default 0.5)")
    cp.add_argument("--ssd-alpha", type=float, default=10.0)
    cp.add_argument("--forget-samples", type=int, default=None)
    cp.add_argument("--retain-samples", type=int, default=None)
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

    c = sub.add_parser("curate", help="build forget/retain sets from shards by whole-word name match")
    c.add_argument("--shards", required=True)
    c.add_argument("--concept", required=True)
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
        ap.add_argument("--out", default=None, help="write the resulting state dict (.safetensors)")
        ap.set_defaults(func=(lambda a, r=rev: cmd_apply(a, revert=r)))

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
    w.set_defaults(func=cmd_world)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    from .data.curate import EmptyForgetSetError
    from .data.shards import ShardError
    from .models.base import ModelLoadError
    from .patch import PatchError
    from .slug.search import SearchFailed
    from .unlearn import OutputExistsError

    try:
        return a.func(a)
    except (EmptyForgetSetError, ShardError, ModelLoadError, PatchError, SearchFailed, OutputExistsError,
            FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
