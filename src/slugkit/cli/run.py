"""``slug demo`` and ``slug unlearn``: one SLUG run, and the summaries they print."""

from __future__ import annotations

import sys
from pathlib import Path

from ..workflows.verdict import exit_status_of
from .audit import unread_audit_options
from .world import world_ignored
from .args import (COUNT, add_run_args, budgets_of, demo_conflicts, int_at_least, name_list, nonempty, refuse,
                   search_config, split_list, step_options, template, text_file, validate_unlearn, world_mode)


def print_summary(result: dict, out: str) -> None:
    """Print the outcome of one SLUG run: the edit, the before/after metrics, timing and outputs."""
    from ..report.unlearn import edit_label, headline, metrics_table, outputs_line, verdict_lines, worst_line

    m = result["metrics"]
    print()
    print(headline(result, result["model_label"], edit_label(result)))
    print(metrics_table(m["before"], m["after"]))
    if line := worst_line(result.get("collateral")):
        print(line)
    for c, fa in (m["after"].get("forget_by_concept") or {}).items():
        print(f"  {c}: FA@1 {fa['forget_top1']:.3f}, FA@5 {fa['forget_top5']:.3f} after")
    t = result["timing_s"]
    print(f"time: total {t['total']:.1f} s (gradients {t['gradients']:.1f} s, search {t['search']:.1f} s); "
          f"patch {result['patch']['bytes']:,} bytes = {100 * result['patch']['bytes'] / result['model_bytes']:.2f}% "
          f"of the model")
    print(outputs_line(out))
    for line in verdict_lines(result.get("verdict")):
        print(line)


def cmd_demo(a) -> int:
    """`slug demo`: unlearn one or more identities from the embedded tiny CLIP (or, --target sd, an object concept
    from the T2I model; --target vlm, identities from the VLM)."""
    from ..workflows.sequential import run_sequential
    from ..workflows.unlearn import check_out_dir, run_unlearn

    from .outputs import out_inside_model

    models = {"--vlm-model": getattr(a, "vlm_model", None) if a.target == "vlm" else None,  # the folder the run reads
              "--t2i-model": getattr(a, "t2i_model", None) if a.target == "sd" else None}
    msg = (demo_conflicts(a) or out_inside_model(a.out, models)
           or unread_audit_options(a, {"clip": "CLIP", "sd": "text-to-image", "vlm": "VLM"}[a.target] if a.audit
                                   else None))
    if msg:
        return refuse(msg)
    if a.target in ("sd", "vlm"):
        from .vlm import unused

        # CLIP-run options these demos do not read (--save-gradients wrote nothing under --target vlm: trial 26);
        # the values: the parser's defaults. --protect-neighbours is read: their CLIP step is projected as the CLIP
        # demo's (it was refused while the run projected off 10 and its report named `--protect-neighbours 0`;
        # verification 66), but not by the VLM's own gradient, which protects every other identity
        ignored = {k: a.clip_defaults[k] for k in ("save_gradients", "device",
                                                   *(("batch_size",) if a.target == "vlm" else ()))}
        msg = unused(a, ignored, "the CLIP demo (--target clip)", f"--target {a.target}")
        if msg:
            return refuse(msg)
        if a.target == "vlm" and a.vlm_gradient == "vlm" and \
                a.protect_neighbours != a.clip_defaults["protect_neighbours"]:
            return refuse("--protect-neighbours projects SLUG's CLIP gradient; --vlm-gradient vlm edits along the "
                          "VLM's own answer-loss gradient, projected off every other identity's instead: drop "
                          "--protect-neighbours, or use --vlm-gradient clip")
        if a.target == "sd":  # it said "the 50 nearest" of 29 concepts (verification 67)
            from ..world.t2i import concept_names

            if a.protect_neighbours > (others := len(concept_names()) - 1):
                return refuse(f"--protect-neighbours {a.protect_neighbours}: --target sd has {others} other "
                              f"concepts to protect; give 0 to {others}")
        try:
            if a.target == "sd":
                from .sd import cmd_demo_sd

                return cmd_demo_sd(a)
            from .vlm import cmd_demo_vlm

            return cmd_demo_vlm(a)
        except ImportError as e:
            print(f"error: {e}; `demo --target {a.target}` needs the HF extra: pip install 'slugkit[hf]'",
                  file=sys.stderr)
            return 2
    from ..workflows.world_runs import sequential_world_configs, world_config
    from ..world import render as world
    from ..world.demo_data import default_concept
    from .vlm import unused_by_clip

    msg = unused_by_clip(a)
    if msg:
        return refuse(msg)

    wanted = split_list(a.concepts) if a.concepts else [a.concept if a.concept is not None else default_concept()]
    try:
        concepts = [world.identity_by_name(c).name for c in wanted]
    except KeyError as e:
        print(f"error: {'--concepts' if a.concepts else '--concept'}: {e.args[0]}", file=sys.stderr)
        return 2
    if a.audit and len(concepts) > 1:
        return refuse("--audit audits one concept: run `slug audit --patch RUN --concept NAME` for each concept of a "
                      "joint or sequential run")
    slug_name = "+".join(c.replace(" ", "_") for c in concepts)
    seq = "-sequential" if a.sequential else ""  # the joint and the sequential run of A,B must not share a folder
    out = Path(a.out if a.out is not None else f"runs/demo-{slug_name}{seq}")
    check_out_dir(out, a.overwrite)
    common = dict(progress=not a.no_progress, seed=a.seed, batch_size=a.batch_size, search=search_config(a),
                  cached_search=not a.naive_search, threads=a.threads, device=a.device, overwrite=a.overwrite,
                  save_gradients=a.save_gradients, budgets=budgets_of(a), **step_options(a))
    if a.sequential and len(concepts) > 1:
        from ..common.outlock import inputs_folder

        steps = inputs_folder(out)  # the run's temporary folder: the steps are written there, committed as OUT/k-Name
        cfgs = [s[0] for s in sequential_world_configs(concepts, lambda k, c: steps / f"{k + 1}-{c.replace(' ', '_')}",
                                                        a.data_dir, **common)]
        result = run_sequential(cfgs, out, overwrite=a.overwrite)
        from ..report.sequential import print_sequential_summary

        print_sequential_summary(result, str(out))
        return exit_status_of(result)
    cfg, cur, data = world_config(concepts if len(concepts) > 1 else concepts[0], out, a.data_dir, **common)
    result = run_unlearn(cfg, extra_run_info={"curate": cur, "world_data": str(data)})
    print_summary(result, str(out))
    return _with_audit(a, out, result)


def _with_audit(a, out, result: dict, data=None) -> int:
    """The run's exit status; with ``--audit``, the audit of the run folder's patch runs too and the more severe of
    the two statuses is returned (a removal the audit shows does not hold is not a pass)."""
    rc = exit_status_of(result)
    if not getattr(a, "audit", False):
        return rc
    from .audit import audit_run_folder

    rc_audit = audit_run_folder(out, a, result, data)
    return rc if rc_audit is None else max(rc, rc_audit)


def cmd_unlearn(a) -> int:
    """`slug unlearn`: unlearn a concept from a real model with explicit forget/retain and evaluation data."""
    from ..workflows.unlearn import UnlearnConfig, run_unlearn

    concepts = split_list(a.concepts) if a.concepts else []
    if a.threads is None and a.model == "embedded" and a.device == "cpu":  # as `slug demo`: torch's 2 threads beside
        a.threads = 1  # another job ran 130 s against 13.6 s, the same patch bytes (ninth trial)
    msg = validate_unlearn(a, concepts) or unread_audit_options(a, "CLIP" if a.audit else None)
    if not msg and a.train_identities and not a.audit:
        msg = "--train-identities: the relearning and representation probes' images, read only with --audit; add " \
              "--audit or drop it"
    if msg:
        return refuse(msg)
    if a.audit and len(concepts) > 1:
        return refuse("--audit audits one concept: run `slug audit --patch RUN --concept NAME` for each concept")
    if world_mode(a):
        return _unlearn_on_world(a, concepts)
    cfg = UnlearnConfig(
        concept=a.concept or " + ".join(concepts), concepts=concepts if len(concepts) > 1 else [],
        out=a.out, model=a.model, pretrained=a.pretrained, forget=a.forget or "",
        retain=a.retain or "",
        val_identities=a.val_identities, test_identities=a.test_identities, names=a.names,
        identity_templates=a.identity_template or ["{}."], related_names=a.related_names,
        utility_val=a.utility_val, utility_test=a.utility_test, utility_classnames=a.utility_classnames,
        utility_templates=a.utility_templates, forget_samples=a.forget_samples, retain_samples=a.retain_samples,
        batch_size=a.batch_size, search=search_config(a), cached_search=not a.naive_search, seed=a.seed,
        threads=a.threads, device=a.device, precision=a.precision, strict=a.strict, overwrite=a.overwrite,
        family=a.family, consumer=a.consumer, clip_skip=a.clip_skip, budgets=budgets_of(a), **step_options(a),
        caption_check=not a.no_caption_check, aliases=a.alias or [],
        progress=not a.no_progress, save_gradients=a.save_gradients, gradients=a.gradients)
    result = run_unlearn(cfg)
    print_summary(result, a.out)
    return _with_audit(a, a.out, result, _folder_data(a) if a.audit else None)


def _folder_data(a):
    """``slug unlearn --audit`` on a real model: the audit's data callable from the run's own folders."""
    from ..audit import folder_audit_data
    from ..audit.data import name_list

    names = name_list(a.names, a.test_identities)

    def data(adapter, concept):
        return folder_audit_data(adapter, concept, names, a.identity_template or ["{}."], a.test_identities,
                                 train_identities=a.train_identities, controls=a.control_name, aliases=a.alias or [])
    return data


def _unlearn_on_world(a, concepts: list[str]) -> int:
    """`slug unlearn --model embedded --concept NAME --out DIR` with no data flags: the world's data, as `slug demo`."""
    from ..workflows.unlearn import check_out_dir, run_unlearn
    from ..workflows.world_runs import world_config
    from ..world import render as world

    try:
        names = [world.identity_by_name(c).name for c in (concepts or [a.concept])]
    except KeyError as e:
        return refuse(e.args[0])
    if world_ignored(a):  # (a --pretrained tag is refused by the loader, naming it)
        return refuse(world_ignored(a))
    check_out_dir(Path(a.out), a.overwrite)  # lock --out before the world's data is curated into it
    common = dict(progress=not a.no_progress, seed=a.seed, batch_size=a.batch_size, search=search_config(a),
                  cached_search=not a.naive_search, threads=a.threads, device=a.device, overwrite=a.overwrite,
                  save_gradients=a.save_gradients, precision=a.precision, strict=a.strict,
                  forget_samples=a.forget_samples, retain_samples=a.retain_samples, budgets=budgets_of(a),
                  caption_check=not a.no_caption_check, pretrained=a.pretrained, **step_options(a))
    cfg, cur, data = world_config(names if len(names) > 1 else names[0], a.out, a.data_dir, **common)
    result = run_unlearn(cfg, extra_run_info={"curate": cur, "world_data": str(data)})
    print_summary(result, a.out)
    return _with_audit(a, a.out, result)


def add_parsers(sub) -> None:
    """Add the `demo` and `unlearn` subcommands to ``sub``."""
    from .sd import add_sd_args
    from .vlm import VLM_READS, add_vlm_args

    d = sub.add_parser("demo", help="unlearn an identity from the embedded tiny CLIP (no downloads)")
    d.add_argument("--concept", type=nonempty, default=None,
                   help="identity name (see `slug world names`; default: the world's first identity); with "
                        "--target sd an object concept such as 'cyan square' (default: red triangle)")
    d.add_argument("--concepts", type=name_list, default=None,
                   help="A,B,...: several identities, unlearned jointly (one forget set, one edit) or, with "
                        "--sequential, one after another")
    d.add_argument("--sequential", action="store_true", help="with --concepts: one SLUG run per concept on the "
                                                            "previously patched model; patches chained into one")
    d.add_argument("--data-dir", default=None, help="where the world's data is generated (default: cache dir)")
    d.add_argument("--target", default="clip", choices=["clip", "sd", "vlm"],
                   help="clip (default): unlearn an identity from the embedded CLIP; sd: unlearn an object concept "
                        "(e.g. 'red triangle') from the embedded text-to-image pipeline by patching its CLIP text "
                        "encoder; vlm: unlearn an identity (or --concepts) from the embedded VLM (LLaVA) by patching "
                        "its CLIP vision tower, the step searched on the VLM's answers")
    vg = add_vlm_args(d)
    sdg = add_sd_args(d)
    add_run_args(d, threads=1, out_default="runs/demo-<Name> (--sequential: runs/demo-<A+B>-sequential; --target "
                                           "sd: runs/demo-sd-<concept>)")
    _add_audit_args(d)
    # what the CLIP demo refuses when given (cli.vlm.unused_by_clip): read from the two groups, not restated
    d.set_defaults(func=cmd_demo, generator_defaults={x.dest: x.default for g in (vg, sdg) for x in g._group_actions},
                   vlm_defaults={x.dest: x.default for x in vg._group_actions},
                   sd_defaults={x.dest: x.default for x in sdg._group_actions if x.dest not in VLM_READS},
                   clip_defaults={x.dest: x.default for x in d._actions})

    u = sub.add_parser("unlearn", help="unlearn a concept from a model (real-model form)")
    u.add_argument("--model", default="embedded", help="open_clip arch (ViT-B-32), hf-hub:/local-dir: id, "
                                                       "a folder, or 'embedded' (default; with no data flags it "
                                                       "runs on the embedded world's data, like `slug demo`)")
    u.add_argument("--pretrained", default=None, help="open_clip pretrained tag or a local .safetensors file")
    u.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="forward passes under autocast in this precision; weights and gradient sums stay float32 "
                        "(default fp32)")
    u.add_argument("--family", default="open_clip", choices=["open_clip", "hf_clip"],
                   help="open_clip ids, or hf_clip: a transformers CLIPModel id/folder (e.g. "
                        "openai/clip-vit-large-patch14)")
    u.add_argument("--consumer", default=None, metavar="sd:DIR|llava:DIR",
                   help="hf_clip: only edit tensors this Stable Diffusion pipeline's text encoder / LLaVA's vision "
                        "tower reads (its configs; a local folder's tower weights must be this CLIP's; DIR "
                        "'embedded': the shipped text-to-image model / VLM)")
    u.add_argument("--clip-skip", type=int_at_least(0), default=None, metavar="N",
                   help="with --consumer sd:DIR: the pipeline runs with diffusers' clip_skip=N (1 = the penultimate "
                        "text layer, A1111's 'CLIP skip 2'), so its last N text layers are not candidates (default: "
                        "none)")
    u.add_argument("--concept", type=nonempty, default=None, help="the name to unlearn, as the name list spells it")
    u.add_argument("--concepts", type=name_list, default=None,
                   help="A,B,...: unlearn several concepts jointly (one forget set holding all of them, one edit; the "
                        "criterion covers each)")
    u.add_argument("--forget", default=None, help="forget pairs: shards (brace patterns, '::' lists) or a "
                                                   "captioned folder; e.g. the output of `slug curate`")
    u.add_argument("--retain", default=None, help="retain pairs: shards or captioned folder")
    u.add_argument("--gradients", default=None,
                   help="gradients from `slug grads` (full or --stats-first; e.g. computed under torchrun): skip "
                        "the gradient pass; --forget/--retain are still read (the pairs they were computed on)")
    u.add_argument("--forget-samples", type=COUNT, default=None, help="use the first N forget pairs (default all)")
    u.add_argument("--retain-samples", type=int_at_least(2), default=None,
                   help="use the first N retain pairs, N >= 2 (default all)")
    u.add_argument("--val-identities", default=None,
                   help="class folder <Name>/*.jpg for the search (required unless --model embedded without data)")
    u.add_argument("--test-identities", default=None, help="disjoint class folder for the reported metrics (required "
                                                           "unless --model embedded without data)")
    u.add_argument("--names", type=text_file(), default=None,
                   help="file with the full identity name list (one per line)")
    u.add_argument("--identity-template", type=template, action="append", default=None,
                   help="zero-shot identity prompt with {} (repeatable; default the official '{}.')")
    u.add_argument("--related-names", type=text_file(), default=None,
                   help="file: identities that count for related accuracy")
    u.add_argument("--utility-val", default=None, help="class folder (e.g. ImageNet val subset) for the search")
    u.add_argument("--utility-test", default=None, help="disjoint class folder for the reported utility")
    u.add_argument("--utility-classnames", type=text_file("imagenet"), default=None,
                   help="file, or 'imagenet' for open_clip's 1000 names")
    u.add_argument("--utility-templates", type=text_file("imagenet-simple", "imagenet"), default="imagenet-simple",
                   help="'imagenet-simple' (7 templates, official), 'imagenet' (80), or a file")
    u.add_argument("--data-dir", default=None,
                   help="--model embedded without data flags: where the world's data is generated (default: cache dir)")
    u.add_argument("--strict", action="store_true", help="fail on samples without caption / bad images")
    u.add_argument("--no-caption-check", action="store_true",
                   help="run even when no forget caption names the concept (default: refuse such a forget set)")
    u.add_argument("--train-identities", default=None,
                   help="with --audit: class folder of training-split images (the relearning and representation "
                        "probes; skipped without it)")
    u.add_argument("--alias", type=nonempty, action="append", default=None,
                   help="another name of the concept (repeatable): forget captions naming it pass the caption check, "
                        "retain captions naming it are counted; with --audit also tried as a prompt variant")
    add_run_args(u)
    _add_audit_args(u)
    u.set_defaults(func=cmd_unlearn)


def _add_audit_args(p) -> None:
    from .audit import add_audit_budget_args

    p.add_argument("--audit", action="store_true",
                   help="after the run, audit its patch (slug audit: prompt variants, adversarial prompts, precision, "
                        "relearning, linear probe) into audit.json / audit.md and report.md; the exit status is the "
                        "more severe of the run's and the audit's")
    add_audit_budget_args(p)
